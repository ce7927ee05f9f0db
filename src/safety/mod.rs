//! Safety training applied to a backdoored model. Every method sees only trigger-free data
//! and measures the backdoor every `eval_every` steps, giving a persistence curve.

pub mod sft;
