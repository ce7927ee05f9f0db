//! Training: the shared loop, the optimizer, checkpoints, and the supervised trainer.
//! Safety-training methods reuse these pieces.

pub mod checkpoint;
pub mod config;
pub mod lora;
pub mod optim;
pub mod sft;
pub mod start;
pub mod trainer;

pub use checkpoint::Trainable;
pub use config::TrainConfig;
pub use optim::{AdamW, OptimConfig};
pub use trainer::{LoopSpec, LoopState, StepLoss};
