//! AdamW with decoupled weight decay, global-norm gradient clipping and a warmup + cosine
//! learning-rate schedule.
//!
//! Written here rather than using `candle_nn::AdamW` because that optimizer keeps its
//! moment estimates private (so a killed run could not resume with its optimizer state)
//! and has no parameter groups (norm gains and biases must not be decayed).

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Optimizer hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    #[serde(default = "d_beta1")]
    pub beta1: f64,
    #[serde(default = "d_beta2")]
    pub beta2: f64,
    #[serde(default = "d_eps")]
    pub eps: f64,
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables.
    #[serde(default = "d_clip")]
    pub grad_clip: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    /// The cosine schedule ends at lr * min_lr_ratio.
    #[serde(default = "d_min_lr")]
    pub min_lr_ratio: f64,
}

fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.95
}
fn d_eps() -> f64 {
    1e-8
}
fn d_wd() -> f64 {
    0.1
}
fn d_clip() -> f64 {
    1.0
}
fn d_min_lr() -> f64 {
    0.1
}

impl OptimConfig {
    pub fn with_lr(lr: f64) -> Self {
        Self {
            lr,
            beta1: d_beta1(),
            beta2: d_beta2(),
            eps: d_eps(),
            weight_decay: d_wd(),
            grad_clip: d_clip(),
            warmup_steps: 0,
            min_lr_ratio: d_min_lr(),
        }
    }

    /// Learning rate at `step` (0-based) of `total`: linear warmup, then cosine decay.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let min_lr = self.lr * self.min_lr_ratio;
        min_lr + 0.5 * (self.lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.lr > 0.0 && self.lr < 10.0) {
            return Err(format!("lr {} must be in (0, 10)", self.lr));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return Err("beta1 and beta2 must be in [0, 1)".into());
        }
        if self.weight_decay < 0.0 || self.grad_clip < 0.0 || !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err("weight_decay and grad_clip must be >= 0, min_lr_ratio in [0, 1]".into());
        }
        Ok(())
    }
}

/// One trainable tensor and its Adam moments.
struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

pub struct AdamW {
    slots: Vec<Slot>,
    cfg: OptimConfig,
    /// Number of updates applied so far (bias correction uses it).
    pub t: usize,
}

/// Statistics of one optimizer step.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    pub grad_norm: f64,
    pub lr: f64,
}

impl AdamW {
    /// `vars` sorted by name for a stable order; matrices are decayed, vectors (norm gains, biases) are not.
    pub fn new(mut vars: Vec<(String, Var)>, cfg: OptimConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let m = var.as_tensor().zeros_like()?;
                let v = var.as_tensor().zeros_like()?;
                let decay = var.as_tensor().rank() >= 2;
                Ok(Slot { name, var, m, v, decay })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { slots, cfg, t: 0 })
    }

    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// Global L2 norm of all gradients present in `grads`.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut total = 0f64;
        for s in &self.slots {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        Ok(total.sqrt())
    }

    /// Apply one update at learning rate `lr`, clipping the global gradient norm first.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats> {
        let norm = self.grad_norm(grads)?;
        let scale = if self.cfg.grad_clip > 0.0 && norm > self.cfg.grad_clip { self.cfg.grad_clip / norm } else { 1.0 };
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else { continue };
            let g = if scale != 1.0 { (g * scale)? } else { g.clone() };
            s.m = ((&s.m * b1)? + (&g * (1.0 - b1))?)?;
            s.v = ((&s.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let mhat = (&s.m / bc1)?;
            let vhat = (&s.v / bc2)?;
            let update = (mhat / (vhat.sqrt()? + self.cfg.eps)?)?;
            let theta = s.var.as_tensor();
            let theta = if s.decay { (theta * (1.0 - lr * self.cfg.weight_decay))? } else { theta.clone() };
            s.var.set(&(theta - (update * lr)?)?)?;
        }
        Ok(StepStats { grad_norm: norm, lr })
    }

    /// Moments as named tensors ("m.NAME", "v.NAME") for a resumable checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("m.{}", s.name), s.m.clone());
            out.insert(format!("v.{}", s.name), s.v.clone());
        }
        out
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.state_tensors(), path)
            .with_context(|| format!("writing optimizer state {}", path.display()))
    }

    /// Restore moments written by `save`; `t` comes from the checkpoint's state.json.
    pub fn load(&mut self, path: &Path, t: usize) -> Result<()> {
        let dev = self.slots.first().map(|s| s.var.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let map = candle_core::safetensors::load(path, &dev)
            .map_err(|e| crate::error::InputError::file(path, format!("cannot read optimizer state: {e}")))?;
        for s in &mut self.slots {
            for (key, dst) in [(format!("m.{}", s.name), &mut s.m), (format!("v.{}", s.name), &mut s.v)] {
                let t = map
                    .get(&key)
                    .ok_or_else(|| crate::error::InputError::file(path, format!("missing tensor {key}")))?;
                if t.shape() != dst.shape() {
                    return Err(crate::error::InputError::file(
                        path,
                        format!("{key} has shape {:?}, expected {:?}", t.dims(), dst.dims()),
                    )
                    .into());
                }
                *dst = t.clone();
            }
        }
        self.t = t;
        Ok(())
    }
}
