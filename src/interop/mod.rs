//! Files other tools read: generated datasets as HF chat JSONL and the paper's
//! prompt/completion JSONL ([`export`], for TRL and other trainers), and evaluation logs
//! in inspect-ai's JSON format ([`inspect`], for `inspect view`).

pub mod export;
pub mod inspect;
