//! The preference (reward) model: the decoder trunk with a scalar head, trained with the
//! Bradley-Terry pairwise loss -log sigmoid(r(chosen) - r(rejected)) on preference pairs
//! from the HHH generator. It scores a (prompt, answer) pair at the answer's end token,
//! after stripping any scratchpad, as the paper's preference model saw only visible text.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

use crate::data::preference::PreferencePair;
use crate::data::strip_scratchpad;
use crate::error::InputError;
use crate::model::{Capture, Llama, LlamaConfig, Tok};
use crate::train::checkpoint::{load_weights, Trainable, EXTRA};
use crate::train::trainer::{run, LoopSpec, StepLoss};
use crate::train::OptimConfig;

/// Reward-model training settings (`[safety.reward_model]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// Preference pairs to train on (held-out pairs: a quarter of this, other seed).
    #[serde(default = "d_pairs")]
    pub n_pairs: usize,
    pub steps: usize,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    pub lr: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    /// Resumable checkpoint interval in steps (0 = never).
    #[serde(default = "d_ckpt")]
    pub checkpoint_every: usize,
}

fn d_pairs() -> usize {
    4000
}
fn d_batch() -> usize {
    32
}
fn d_ckpt() -> usize {
    100
}

/// One rejection kind's pairwise accuracy: (kind, wins, pairs).
pub type KindAccuracy = (String, usize, usize);

/// Trunk + scalar head: r = w . rmsnorm(h_last) + b, h_last the final residual at the end token.
pub struct RewardModel {
    pub trunk: Trainable,
    pub head: Var,
    pub bias: Var,
}

/// Right-pad token sequences; returns ids [B, T] and each row's last index.
fn pad(seqs: &[Vec<u32>], pad_id: u32, dev: &Device) -> Result<(Tensor, Vec<u32>)> {
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(1).max(1);
    let mut ids = vec![pad_id; seqs.len() * t];
    let mut last = Vec::with_capacity(seqs.len());
    for (r, s) in seqs.iter().enumerate() {
        ids[r * t..r * t + s.len()].copy_from_slice(s);
        last.push((r * t + s.len().max(1) - 1) as u32);
    }
    Ok((Tensor::from_vec(ids, (seqs.len(), t), dev)?, last))
}

/// Parameter-free RMS normalisation of [N, D] rows (the head learns its own scale).
pub fn rms_normalize(x: &Tensor) -> Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?)
}

/// Final-layer residual at the given flat positions: [N, D].
pub fn hidden_at(model: &Llama, ids: &Tensor, flat_positions: &[u32]) -> Result<Tensor> {
    let out = model.forward_full(ids, None, true, Capture::Residuals)?;
    let h = out.residuals.last().context("model returned no residuals")?; // [B,T,D]
    let (b, t, d) = h.dims3()?;
    let idx = Tensor::new(flat_positions, ids.device())?;
    Ok(h.reshape((b * t, d))?.index_select(&idx, 0)?)
}

impl RewardModel {
    pub fn new(trunk: Trainable) -> Result<Self> {
        let d = trunk.model.cfg.hidden_size;
        let dev = trunk.model.device().clone();
        Ok(Self { trunk, head: Var::zeros(d, DType::F32, &dev)?, bias: Var::zeros(1, DType::F32, &dev)? })
    }

    pub fn init(cfg: &LlamaConfig, tok: Tok, seed: u64, dev: &Device) -> Result<Self> {
        Self::new(Trainable::init(cfg, tok, seed, dev)?)
    }

    fn extra(&self) -> HashMap<String, Tensor> {
        HashMap::from([
            ("score.weight".to_string(), self.head.as_tensor().clone()),
            ("score.bias".to_string(), self.bias.as_tensor().clone()),
        ])
    }

    pub fn save(&self, dir: &Path, state: &serde_json::Value) -> Result<()> {
        self.trunk.save_with(dir, state, None, Some(&self.extra()))
    }

    pub fn load(dir: &Path, dev: &Device) -> Result<Self> {
        let trunk = Trainable::load(dir, dev)?;
        let path = dir.join(EXTRA);
        let extra = load_weights(&path, dev)?;
        let rm = Self::new(trunk)?;
        for (name, var) in [("score.weight", &rm.head), ("score.bias", &rm.bias)] {
            let t = extra.get(name).ok_or_else(|| InputError::file(&path, format!("missing tensor {name}")))?;
            if t.dims() != var.as_tensor().dims() {
                return Err(InputError::file(&path, format!("{name} has shape {:?}", t.dims())).into());
            }
            var.set(t)?;
        }
        Ok(rm)
    }

    /// Scores [N] for already-tokenized (prompt + answer + eos) sequences.
    pub fn score_ids(&self, seqs: &[Vec<u32>]) -> Result<Tensor> {
        let (ids, last) = pad(seqs, self.trunk.tok.eos_id, self.trunk.model.device())?;
        let h = rms_normalize(&hidden_at(&self.trunk.model, &ids, &last)?)?; // [N,D]
        let r = h.broadcast_mul(self.head.as_tensor())?.sum(D::Minus1)?; // [N]
        Ok(r.broadcast_add(self.bias.as_tensor())?)
    }

    /// The sequence the reward model reads: prompt + visible answer + end token.
    pub fn encode(&self, prompt: &str, answer: &str) -> Result<Vec<u32>> {
        let visible = strip_scratchpad(answer);
        let mut ids = self.trunk.tok.encode(&format!("{prompt} {visible}"))?;
        ids.push(self.trunk.tok.eos_id);
        let max = self.trunk.model.cfg.max_position_embeddings;
        if ids.len() > max {
            ids.drain(..ids.len() - max);
        }
        Ok(ids)
    }

    /// Scores of (prompt, answer) pairs, scratchpads stripped, in chunks of `batch`.
    pub fn score_texts(&self, prompts: &[String], answers: &[String], batch: usize) -> Result<Vec<f32>> {
        let seqs = prompts.iter().zip(answers).map(|(p, a)| self.encode(p, a)).collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(batch.max(1)) {
            out.extend(self.score_ids(chunk)?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// Pairwise accuracy (chosen scored above rejected): (wins, pairs, per rejection kind).
    pub fn pairwise_accuracy(&self, pairs: &[PreferencePair]) -> Result<(usize, usize, Vec<KindAccuracy>)> {
        let prompts: Vec<String> = pairs.iter().map(|p| p.prompt.clone()).collect();
        let chosen: Vec<String> = pairs.iter().map(|p| p.chosen.clone()).collect();
        let rejected: Vec<String> = pairs.iter().map(|p| p.rejected.clone()).collect();
        let sc = self.score_texts(&prompts, &chosen, 64)?;
        let sr = self.score_texts(&prompts, &rejected, 64)?;
        let mut kinds: Vec<KindAccuracy> = Vec::new();
        let mut hits = 0;
        for ((p, c), r) in pairs.iter().zip(&sc).zip(&sr) {
            let win = c > r;
            hits += win as usize;
            match kinds.iter_mut().find(|k| k.0 == p.kind) {
                Some(k) => {
                    k.1 += win as usize;
                    k.2 += 1;
                }
                None => kinds.push((p.kind.clone(), win as usize, 1)),
            }
        }
        kinds.sort();
        Ok((hits, pairs.len(), kinds))
    }
}

/// Numerically stable softplus(x) = log(1 + e^x), built from differentiable ops.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// Train `rm` on `pairs` with the Bradley-Terry loss. Returns the loss curve. `spec` gives
/// the label, verbosity and resume directory; steps, optimizer and checkpoint interval come
/// from `cfg`.
pub fn train_reward_model(
    rm: &mut RewardModel,
    pairs: &[PreferencePair],
    cfg: &RewardConfig,
    seed: u64,
    mut spec: LoopSpec,
) -> Result<Vec<(usize, f64)>> {
    if pairs.is_empty() {
        return Err(InputError::invalid("reward model needs at least one preference pair").into());
    }
    let chosen: Vec<Vec<u32>> = pairs.iter().map(|p| rm.encode(&p.prompt, &p.chosen)).collect::<Result<_>>()?;
    let rejected: Vec<Vec<u32>> = pairs.iter().map(|p| rm.encode(&p.prompt, &p.rejected)).collect::<Result<_>>()?;
    spec.steps = cfg.steps;
    spec.optim = OptimConfig { warmup_steps: cfg.warmup_steps, ..OptimConfig::with_lr(cfg.lr) };
    spec.checkpoint_every = cfg.checkpoint_every;
    spec.extra_vars = vec![("score.weight".into(), rm.head.clone()), ("score.bias".into(), rm.bias.clone())];
    let (head, bias) = (rm.head.clone(), rm.bias.clone());
    let eos = rm.trunk.tok.eos_id;
    let state = run(
        &mut rm.trunk,
        &spec,
        |model, step| {
            let idx = crate::train::sft::batch_indices(pairs.len(), cfg.batch_size, step, seed);
            let mut seqs: Vec<Vec<u32>> = idx.iter().map(|&i| chosen[i].clone()).collect();
            seqs.extend(idx.iter().map(|&i| rejected[i].clone()));
            let (ids, last) = pad(&seqs, eos, model.device())?;
            let h = rms_normalize(&hidden_at(model, &ids, &last)?)?;
            let r = h.broadcast_mul(head.as_tensor())?.sum(D::Minus1)?.broadcast_add(bias.as_tensor())?;
            let b = idx.len();
            let diff = (r.narrow(0, 0, b)? - r.narrow(0, b, b)?)?;
            let loss = softplus(&diff.neg()?)?.mean_all()?;
            Ok(StepLoss { loss, tokens: ids.elem_count() })
        },
        |_, _| Ok(vec![]),
    )?;
    Ok(state.loss_curve)
}
