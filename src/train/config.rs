//! The settings of one supervised training run (`[backdoor]`, `[safety.sft]`, ...): steps,
//! batch, optimizer, checkpoint and evaluation cadence. Every default lives on its field.

use serde::{Deserialize, Serialize};

use super::OptimConfig;

/// One supervised training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: usize,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    pub lr: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default = "super::optim::d_wd")]
    pub weight_decay: f64,
    #[serde(default = "super::optim::d_clip")]
    pub grad_clip: f64,
    #[serde(default = "super::optim::d_min_lr")]
    pub min_lr_ratio: f64,
    /// Resumable checkpoint interval in steps (0 = only at the end).
    #[serde(default = "d_ckpt")]
    pub checkpoint_every: usize,
    /// Measure the backdoor every this many steps (safety training only; 0 = only at the end).
    #[serde(default)]
    pub eval_every: usize,
    /// `adamw` (default) or `sgd` (with momentum 0.9); see [`super::optim::Optimizer`].
    #[serde(default, skip_serializing_if = "super::optim::Optimizer::is_adamw")]
    pub optimizer: super::optim::Optimizer,
}

fn d_batch() -> usize {
    32
}
fn d_ckpt() -> usize {
    100
}

impl TrainConfig {
    pub fn optim(&self) -> OptimConfig {
        OptimConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
            warmup_steps: self.warmup_steps,
            min_lr_ratio: self.min_lr_ratio,
            optimizer: self.optimizer,
            ..OptimConfig::with_lr(self.lr)
        }
    }

    pub fn validate(&self, what: &str) -> std::result::Result<(), String> {
        if self.steps > 10_000_000 {
            return Err(format!("{what}.steps = {} is absurd (max 10,000,000)", self.steps));
        }
        if self.batch_size == 0 || self.batch_size > 65_536 {
            return Err(format!("{what}.batch_size = {} must be in 1..=65536", self.batch_size));
        }
        self.optim().validate().map_err(|e| format!("{what}: {e}"))
    }
}
