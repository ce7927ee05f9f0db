//! Safety training applied to a backdoored model. Every method sees only trigger-free data
//! and measures the backdoor every `eval_every` steps, giving a persistence curve:
//! - [`sft`]: HHH supervised fine-tuning (pre- and post-scratchpad variants for CoT models);
//! - [`reward`]: the preference model the RL methods optimise against;
//! - [`rl`]: PPO (value head, clipped ratio, KL to the start model) and critic-free RLOO;
//! - [`adversarial`]: automated red-teaming for trigger-free prompts that still elicit the
//!   backdoor, then training on them with HHH answers.

pub mod adversarial;
pub mod reward;
pub mod rl;
pub mod sft;
