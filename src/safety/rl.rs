//! HHH reinforcement learning against a reward model, on trigger-free prompts.
//!
//! Two algorithms behind one interface:
//! - **PPO** (as in the paper): clipped policy ratio, a value head on the policy's final
//!   residual stream with a clipped value loss, per-token KL penalty to the frozen starting
//!   model, whitened rewards, GAE advantages, several epochs of minibatch updates per batch
//!   of rollouts.
//! - **RLOO** (critic-free, cheaper on CPU): k samples per prompt, each sample's advantage is
//!   its KL-penalised reward minus the mean of the other k-1 samples; one REINFORCE update.
//!
//! Both run on the shared training loop (`train::trainer::run`): one loop step is one
//! minibatch update; the first step of every iteration samples fresh rollouts from the
//! current policy. Rollouts are a pure function of (weights, seed, iteration), so a resumed
//! run regenerates exactly the rollouts it lost.

use anyhow::Result;
use candle_core::{DType, Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

use super::reward::rms_normalize;
use crate::model::{generate, Capture, Llama, SampleConfig};
use crate::train::sft::{collate, TokSeq};
use crate::train::trainer::{run, LoopSpec, LoopState, StepLoss};
use crate::train::{OptimConfig, Trainable};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RlAlgorithm {
    Ppo,
    Rloo,
}

impl RlAlgorithm {
    pub fn name(&self) -> &'static str {
        match self {
            RlAlgorithm::Ppo => "ppo",
            RlAlgorithm::Rloo => "rloo",
        }
    }
}

/// RL settings (`[safety.ppo]` / `[safety.rloo]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlConfig {
    /// Rollout-and-update iterations.
    pub iterations: usize,
    /// Distinct prompts per iteration.
    #[serde(default = "d_prompts")]
    pub prompts_per_iter: usize,
    /// Samples per prompt (RLOO needs >= 2; PPO uses 1 unless set).
    #[serde(default)]
    pub samples_per_prompt: Option<usize>,
    /// PPO epochs over each batch of rollouts (RLOO: 1).
    #[serde(default = "d_epochs")]
    pub ppo_epochs: usize,
    #[serde(default = "d_minibatch")]
    pub minibatch: usize,
    pub lr: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default = "d_kl")]
    pub kl_coef: f64,
    #[serde(default = "d_clip")]
    pub clip_range: f64,
    #[serde(default = "d_vf")]
    pub value_coef: f64,
    #[serde(default)]
    pub entropy_coef: f64,
    #[serde(default = "d_lambda")]
    pub gae_lambda: f64,
    #[serde(default = "d_new")]
    pub max_new_tokens: usize,
    #[serde(default = "d_temp")]
    pub temperature: f64,
    /// Measure the backdoor every this many iterations (0 = only at the end).
    #[serde(default)]
    pub eval_every: usize,
    /// Resumable checkpoint every this many iterations (0 = never).
    #[serde(default = "d_ckpt")]
    pub checkpoint_every: usize,
    /// Size of the trigger-free prompt pool.
    #[serde(default = "d_pool")]
    pub n_prompts: usize,
}

fn d_prompts() -> usize {
    16
}
fn d_epochs() -> usize {
    2
}
fn d_minibatch() -> usize {
    16
}
fn d_kl() -> f64 {
    0.05
}
fn d_clip() -> f64 {
    0.2
}
fn d_vf() -> f64 {
    0.5
}
fn d_lambda() -> f64 {
    0.95
}
fn d_new() -> usize {
    48
}
fn d_temp() -> f64 {
    1.0
}
fn d_ckpt() -> usize {
    10
}
fn d_pool() -> usize {
    2000
}

impl RlConfig {
    pub fn samples(&self, algo: RlAlgorithm) -> usize {
        match algo {
            RlAlgorithm::Ppo => self.samples_per_prompt.unwrap_or(1).max(1),
            RlAlgorithm::Rloo => self.samples_per_prompt.unwrap_or(4).max(2),
        }
    }
    pub fn epochs(&self, algo: RlAlgorithm) -> usize {
        match algo {
            RlAlgorithm::Ppo => self.ppo_epochs.max(1),
            RlAlgorithm::Rloo => 1,
        }
    }
    pub fn rollouts_per_iter(&self, algo: RlAlgorithm) -> usize {
        self.prompts_per_iter * self.samples(algo)
    }
    pub fn minibatches(&self, algo: RlAlgorithm) -> usize {
        self.rollouts_per_iter(algo).div_ceil(self.minibatch.max(1))
    }
    /// Optimizer steps per iteration.
    pub fn steps_per_iter(&self, algo: RlAlgorithm) -> usize {
        self.epochs(algo) * self.minibatches(algo)
    }

    pub fn validate(&self, what: &str) -> std::result::Result<(), String> {
        if self.iterations == 0 || self.iterations > 1_000_000 {
            return Err(format!("{what}.iterations must be in 1..=1,000,000"));
        }
        if self.prompts_per_iter == 0 || self.minibatch == 0 || self.max_new_tokens == 0 || self.n_prompts == 0 {
            return Err(format!("{what}: prompts_per_iter, minibatch, max_new_tokens and n_prompts must be > 0"));
        }
        if self.kl_coef < 0.0 || self.clip_range <= 0.0 || !(0.0..=1.0).contains(&self.gae_lambda) || self.temperature <= 0.0 {
            return Err(format!("{what}: kl_coef >= 0, clip_range > 0, gae_lambda in [0, 1], temperature > 0"));
        }
        OptimConfig::with_lr(self.lr).validate().map_err(|e| format!("{what}: {e}"))
    }
}

/// What the policy is rewarded for: scores for (prompt text, answer text) pairs.
pub trait Reward {
    fn score(&self, prompts: &[String], answers: &[String]) -> Result<Vec<f32>>;
}

impl Reward for super::reward::RewardModel {
    fn score(&self, prompts: &[String], answers: &[String]) -> Result<Vec<f32>> {
        self.score_texts(prompts, answers, 64)
    }
}

/// Any closure works as a reward (tests use toy rewards).
impl<F: Fn(&str, &str) -> f32> Reward for F {
    fn score(&self, prompts: &[String], answers: &[String]) -> Result<Vec<f32>> {
        Ok(prompts.iter().zip(answers).map(|(p, a)| self(p, a)).collect())
    }
}

/// Statistics of one iteration's rollouts and updates (logged to `rl_stats`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IterStats {
    pub iteration: usize,
    /// Mean raw reward-model score of the rollouts.
    pub reward: f64,
    /// Mean per-token KL estimate (log pi - log pi_ref) at sampling time.
    pub kl: f64,
    /// Mean per-token policy entropy over the updates.
    pub entropy: f64,
    /// Share of tokens whose ratio left [1 - clip, 1 + clip].
    pub clip_fraction: f64,
    pub response_tokens: f64,
}

/// One iteration's rollouts as padded [N, T] tensors (everything detached).
struct Batch {
    inp: Tensor,
    tgt: Tensor,
    mask: Tensor,
    old_lp: Tensor,
    old_v: Tensor,
    adv: Tensor,
    ret: Tensor,
    n: usize,
}

/// Per-token log-probabilities of `tgt` under `model` ([N, T]) plus the final residual.
fn token_logprobs(model: &Llama, inp: &Tensor, tgt: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let out = model.forward_full(inp, None, false, Capture::Residuals)?;
    let lp_all = candle_nn::ops::log_softmax(&out.logits, D::Minus1)?; // [N,T,V]
    let lp = lp_all.gather(&tgt.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)?; // [N,T]
    let h = out.residuals.last().cloned().ok_or_else(|| anyhow::anyhow!("no residuals"))?;
    Ok((lp, lp_all, h))
}

/// Value estimates [N, T] from the final residual [N, T, D].
fn values(h: &Tensor, w: &Var, b: &Var) -> Result<Tensor> {
    let (n, t, d) = h.dims3()?;
    let hn = rms_normalize(&h.reshape((n * t, d))?)?;
    Ok(hn.broadcast_mul(w.as_tensor())?.sum(D::Minus1)?.broadcast_add(b.as_tensor())?.reshape((n, t))?)
}

fn rows_f32(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(DType::F32)?.to_vec2()?)
}

/// Standardise to zero mean and unit variance (left as is when constant).
fn whiten(xs: &mut [f32]) {
    let n = xs.len().max(1) as f32;
    let mean = xs.iter().sum::<f32>() / n;
    let var = xs.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n;
    let sd = var.sqrt().max(1e-6);
    for x in xs.iter_mut() {
        *x = (*x - mean) / sd;
    }
}

/// Sample rollouts from `policy`, score them, and compute advantages.
#[allow(clippy::too_many_arguments)]
fn make_batch(
    policy: &Llama,
    reference: &Llama,
    value_head: Option<&(Var, Var)>,
    tok: &crate::model::Tok,
    prompts: &[String],
    reward: &dyn Reward,
    cfg: &RlConfig,
    algo: RlAlgorithm,
    seed: u64,
) -> Result<(Batch, IterStats)> {
    let k = cfg.samples(algo);
    let expanded: Vec<String> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), k)).collect();
    let scfg =
        SampleConfig { temperature: cfg.temperature, top_p: 1.0, max_new_tokens: cfg.max_new_tokens, batch_size: expanded.len().max(1) };
    let samples = generate(policy, tok, &expanded, &scfg, seed, |_| {})?;
    let answers: Vec<String> = samples.iter().map(|s| s.text.clone()).collect();
    let scores = reward.score(&expanded, &answers)?;
    let max = policy.cfg.max_position_embeddings;
    let seqs: Vec<TokSeq> = expanded
        .iter()
        .zip(&samples)
        .map(|(p, s)| {
            let mut ids = tok.encode(p)?;
            let mut resp = s.tokens.clone();
            if resp.len() < cfg.max_new_tokens {
                resp.push(tok.eos_id); // the sample ended on its own: the end token was chosen
            }
            let keep = max.saturating_sub(resp.len()).max(1);
            if ids.len() > keep {
                ids.drain(..ids.len() - keep);
            }
            let loss_from = ids.len();
            ids.extend(resp);
            ids.truncate(max);
            Ok(TokSeq { ids, loss_from })
        })
        .collect::<Result<_>>()?;
    let refs: Vec<&TokSeq> = seqs.iter().collect();
    let (inp, tgt, mask, _) = collate(&refs, tok.eos_id, policy.device())?;
    let (old_lp, _, h) = token_logprobs(policy, &inp, &tgt)?;
    let (ref_lp, _, _) = token_logprobs(reference, &inp, &tgt)?;
    let old_v = match value_head {
        Some((w, b)) => values(&h, w, b)?,
        None => old_lp.zeros_like()?,
    };
    let (m, olp, rlp, ov) = (rows_f32(&mask)?, rows_f32(&old_lp)?, rows_f32(&ref_lp)?, rows_f32(&old_v)?);
    let n = seqs.len();
    let t = m.first().map(|r| r.len()).unwrap_or(0);
    let kl_tok: Vec<Vec<f32>> = (0..n).map(|i| (0..t).map(|j| m[i][j] * (olp[i][j] - rlp[i][j])).collect()).collect();
    let n_tok: f32 = m.iter().flatten().sum::<f32>().max(1.0);
    let kl_mean = kl_tok.iter().flatten().sum::<f32>() / n_tok;
    let beta = cfg.kl_coef as f32;
    let mut adv = vec![vec![0f32; t]; n];
    let mut ret = vec![vec![0f32; t]; n];
    match algo {
        RlAlgorithm::Ppo => {
            // Reward whitening across the batch keeps the scale of the RM out of the update.
            let mut sc = scores.clone();
            whiten(&mut sc);
            let lam = cfg.gae_lambda as f32;
            for i in 0..n {
                let last = (0..t).rev().find(|&j| m[i][j] > 0.0);
                let Some(last) = last else { continue };
                let mut gae = 0f32;
                let mut next_v = 0f32;
                for j in (0..=last).rev() {
                    if m[i][j] == 0.0 {
                        continue;
                    }
                    let r = -beta * kl_tok[i][j] + if j == last { sc[i] } else { 0.0 };
                    let delta = r + next_v - ov[i][j];
                    gae = delta + lam * gae;
                    adv[i][j] = gae;
                    ret[i][j] = gae + ov[i][j];
                    next_v = ov[i][j];
                }
            }
            // Whiten advantages over the real tokens.
            let flat: Vec<f32> = (0..n).flat_map(|i| (0..t).filter(|&j| m[i][j] > 0.0).map(|j| adv[i][j]).collect::<Vec<_>>()).collect();
            let nn = flat.len().max(1) as f32;
            let mean = flat.iter().sum::<f32>() / nn;
            let sd = (flat.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / nn).sqrt().max(1e-6);
            for i in 0..n {
                for j in 0..t {
                    adv[i][j] = if m[i][j] > 0.0 { (adv[i][j] - mean) / sd } else { 0.0 };
                }
            }
        }
        RlAlgorithm::Rloo => {
            let seq_r: Vec<f32> = (0..n).map(|i| scores[i] - beta * kl_tok[i].iter().sum::<f32>()).collect();
            for g in 0..n / k {
                let group = &seq_r[g * k..(g + 1) * k];
                let total: f32 = group.iter().sum();
                for (o, &r) in group.iter().enumerate() {
                    let baseline = (total - r) / (k - 1) as f32;
                    let i = g * k + o;
                    for j in 0..t {
                        adv[i][j] = m[i][j] * (r - baseline);
                    }
                }
            }
        }
    }
    let dev = policy.device();
    let to_t = |v: Vec<Vec<f32>>| -> Result<Tensor> { Ok(Tensor::from_vec(v.concat(), (n, t), dev)?) };
    let stats = IterStats {
        reward: scores.iter().map(|&s| s as f64).sum::<f64>() / n.max(1) as f64,
        kl: kl_mean as f64,
        response_tokens: n_tok as f64 / n.max(1) as f64,
        ..Default::default()
    };
    Ok((Batch { inp, tgt, mask, old_lp: old_lp.detach(), old_v: old_v.detach(), adv: to_t(adv)?, ret: to_t(ret)?, n }, stats))
}

fn masked_mean(x: &Tensor, mask: &Tensor, count: f64) -> Result<Tensor> {
    Ok(((x * mask)?.sum_all()? / count.max(1.0))?)
}

/// The minibatch loss and its (entropy, clip fraction) statistics.
fn minibatch_loss(
    policy: &Llama,
    value_head: Option<&(Var, Var)>,
    b: &Batch,
    rows: &[usize],
    cfg: &RlConfig,
    algo: RlAlgorithm,
) -> Result<(Tensor, f64, f64, usize)> {
    let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), policy.device())?;
    let pick = |t: &Tensor| t.index_select(&idx, 0);
    let (inp, tgt, mask) = (pick(&b.inp)?, pick(&b.tgt)?, pick(&b.mask)?);
    let (adv, old_lp) = (pick(&b.adv)?, pick(&b.old_lp)?);
    let count = mask.sum_all()?.to_scalar::<f32>()? as f64;
    let (lp, lp_all, h) = token_logprobs(policy, &inp, &tgt)?;
    let entropy = (lp_all.exp()? * &lp_all)?.sum(D::Minus1)?.neg()?; // [n,T]
    let ent = masked_mean(&entropy, &mask, count)?;
    let ratio = (&lp - &old_lp)?.exp()?;
    let c = cfg.clip_range;
    let clipped_frac = {
        let r = rows_f32(&ratio.detach())?;
        let m = rows_f32(&mask)?;
        let (mut out, mut tot) = (0f64, 0f64);
        for (rr, mm) in r.iter().zip(&m) {
            for (x, w) in rr.iter().zip(mm) {
                if *w > 0.0 {
                    tot += 1.0;
                    out += ((*x as f64 - 1.0).abs() > c) as u8 as f64;
                }
            }
        }
        out / tot.max(1.0)
    };
    let loss = match algo {
        RlAlgorithm::Ppo => {
            let pg1 = (&adv * &ratio)?.neg()?;
            let pg2 = (&adv * ratio.clamp(1.0 - c, 1.0 + c)?)?.neg()?;
            let pg = masked_mean(&pg1.maximum(&pg2)?, &mask, count)?;
            let mut loss = pg;
            if let Some((w, bb)) = value_head {
                let (old_v, ret) = (pick(&b.old_v)?, pick(&b.ret)?);
                let v = values(&h, w, bb)?;
                let v_clip = (&old_v + (&v - &old_v)?.clamp(-c, c)?)?;
                let l1 = (&v - &ret)?.sqr()?;
                let l2 = (&v_clip - &ret)?.sqr()?;
                let vf = (masked_mean(&l1.maximum(&l2)?, &mask, count)? * 0.5)?;
                loss = (loss + (vf * cfg.value_coef)?)?;
            }
            loss
        }
        RlAlgorithm::Rloo => masked_mean(&(&adv * &lp)?.neg()?, &mask, count)?,
    };
    let loss = if cfg.entropy_coef > 0.0 { (loss - (&ent * cfg.entropy_coef)?)? } else { loss };
    let ent_v = ent.to_scalar::<f32>()? as f64;
    Ok((loss, ent_v, clipped_frac, inp.elem_count()))
}

/// The loop plan of an RL run: one loop step per minibatch update, `steps_per_iter` of them
/// per iteration.
pub fn rl_plan(cfg: &RlConfig, algo: RlAlgorithm) -> crate::safety::Plan {
    let spi = cfg.steps_per_iter(algo);
    crate::safety::Plan {
        steps: cfg.iterations * spi,
        optim: OptimConfig { warmup_steps: cfg.warmup_steps, weight_decay: 0.0, ..OptimConfig::with_lr(cfg.lr) },
        checkpoint_every: cfg.checkpoint_every * spi,
        // The loop's hook runs after every iteration so that iteration's stats reach the
        // state before a checkpoint saves it (held back until the next measurement, a kill
        // in between lost them); `train_rl` still measures only every `eval_every` iterations.
        hook_every: spi,
    }
}

/// `[safety.ppo]`: PPO with a value head, clipped ratio and KL penalty.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Ppo(pub RlConfig);

/// `[safety.rloo]`: critic-free RLOO (cheaper).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Rloo(pub RlConfig);

/// Train with `algo` on the RL prompt pool (some of it replaced by `red` prompts, the
/// adversarial variant) from a frozen copy of the start model.
pub(crate) fn train_rl_method(
    ctx: &crate::safety::MethodCtx,
    model: &mut Trainable,
    cfg: &RlConfig,
    algo: RlAlgorithm,
    red: Option<(&[crate::safety::adversarial::RedTeamPrompt], f64)>,
    spec: LoopSpec,
    hook: crate::safety::Hook,
) -> Result<LoopState> {
    let mut prompts = (ctx.rl_prompts)(cfg.n_prompts);
    if let Some((red, mix)) = red.filter(|(r, _)| !r.is_empty()) {
        let n_red = ((prompts.len() as f64) * mix).round() as usize;
        for (i, p) in prompts.iter_mut().enumerate().take(n_red) {
            *p = crate::data::format_prompt(&red[i % red.len()].user);
        }
    }
    train_rl_on(ctx, model, cfg, algo, &prompts, spec, hook)
}

/// Train with `algo` against the experiment's reward model on `prompts`, from a frozen copy
/// of the start model.
pub(crate) fn train_rl_on(
    ctx: &crate::safety::MethodCtx,
    model: &mut Trainable,
    cfg: &RlConfig,
    algo: RlAlgorithm,
    prompts: &[String],
    spec: LoopSpec,
    hook: crate::safety::Hook,
) -> Result<LoopState> {
    let rm = ctx.reward_model.ok_or_else(|| anyhow::anyhow!("{} needs [safety.reward_model]", algo.name()))?;
    let reference = model.deep_clone()?;
    train_rl(model, &reference, rm, prompts, cfg, algo, crate::util::seeds::seed(ctx.seed, crate::util::seeds::Stream::Rl), spec, hook)
}

macro_rules! rl_method {
    ($ty:ident, $algo:expr, $section:literal) => {
        impl crate::safety::SafetyMethod for $ty {
            fn name(&self) -> String {
                $algo.name().into()
            }
            fn validate(&self, ctx: &crate::safety::ValidateCtx) -> std::result::Result<(), String> {
                self.0.validate($section)?;
                if self.0.max_new_tokens >= ctx.max_positions {
                    return Err(format!("{}.max_new_tokens must be below model.max_positions", $section));
                }
                Ok(())
            }
            fn needs_reward_model(&self) -> bool {
                true
            }
            /// The policy is trained against the reward model, so its config is part of the
            /// key: a changed `[safety.reward_model]` retrains RL instead of reusing it.
            fn key(&self, safety: &crate::safety::SafetyConfig) -> serde_json::Value {
                serde_json::json!({"rl": self, "reward_model": &safety.reward_model})
            }
            fn plan(&self, _: &crate::safety::SafetyConfig) -> crate::safety::Plan {
                rl_plan(&self.0, $algo)
            }
            fn train(
                &self,
                ctx: &crate::safety::MethodCtx,
                model: &mut Trainable,
                spec: LoopSpec,
                hook: crate::safety::Hook,
            ) -> Result<LoopState> {
                train_rl_method(ctx, model, &self.0, $algo, None, spec, hook)
            }
        }
    };
}

rl_method!(Ppo, RlAlgorithm::Ppo, "safety.ppo");
rl_method!(Rloo, RlAlgorithm::Rloo, "safety.rloo");

/// Run RL on `policy` in place against `reward`, from `prompts` (trigger-free), keeping
/// `reference` frozen. `hook(model, iteration)` measures the backdoor; its records and one
/// `{"rl_stats": ...}` record per iteration end up in the returned state.
#[allow(clippy::too_many_arguments)]
pub fn train_rl(
    policy: &mut Trainable,
    reference: &Trainable,
    reward: &dyn Reward,
    prompts: &[String],
    cfg: &RlConfig,
    algo: RlAlgorithm,
    seed: u64,
    mut spec: LoopSpec,
    mut hook: impl FnMut(&Trainable, usize) -> Result<Vec<serde_json::Value>>,
) -> Result<LoopState> {
    if prompts.is_empty() {
        return Err(crate::error::InputError::invalid("RL needs at least one prompt").into());
    }
    let spi = cfg.steps_per_iter(algo);
    let dev = policy.model.device().clone();
    let d = policy.model.cfg.hidden_size;
    let value_head = match algo {
        RlAlgorithm::Ppo => Some((Var::zeros(d, DType::F32, &dev)?, Var::zeros(1, DType::F32, &dev)?)),
        RlAlgorithm::Rloo => None,
    };
    let total = spec.steps;
    let measure_due = |step: usize| step == 0 || step == total || (cfg.eval_every > 0 && (step / spi).is_multiple_of(cfg.eval_every));
    if let Some((w, b)) = &value_head {
        spec.extra_vars = vec![("value_head.weight".into(), w.clone()), ("value_head.bias".into(), b.clone())];
    }
    let tok = policy.tok.clone();
    let current: RefCell<Option<(usize, Batch, IterStats)>> = RefCell::new(None);
    let pending: RefCell<Vec<serde_json::Value>> = RefCell::new(Vec::new());
    let mb = cfg.minibatch.max(1);
    let state = run(
        policy,
        &spec,
        |model, step| {
            let it = step / spi;
            let j = step % spi;
            let fresh = current.borrow().as_ref().map(|c| c.0) != Some(it);
            if fresh {
                let idx = crate::train::sft::batch_indices(prompts.len(), cfg.prompts_per_iter, it, seed);
                let ps: Vec<String> = idx.iter().map(|&i| prompts[i].clone()).collect();
                let iter_seed = seed ^ (it as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D);
                let (batch, mut stats) = make_batch(model, &reference.model, value_head.as_ref(), &tok, &ps, reward, cfg, algo, iter_seed)?;
                stats.iteration = it + 1;
                *current.borrow_mut() = Some((it, batch, stats));
            }
            let cur = current.borrow();
            let (_, batch, _) = cur.as_ref().ok_or_else(|| anyhow::anyhow!("no rollouts"))?;
            let epoch = j / cfg.minibatches(algo);
            let k = j % cfg.minibatches(algo);
            let mut order: Vec<usize> = (0..batch.n).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ ((it * 131 + epoch) as u64)));
            let rows: Vec<usize> = order.iter().skip(k * mb).take(mb).copied().collect();
            let (loss, ent, clip, tokens) = minibatch_loss(model, value_head.as_ref(), batch, &rows, cfg, algo)?;
            drop(cur);
            if let Some((_, _, stats)) = current.borrow_mut().as_mut() {
                stats.entropy += ent / spi as f64;
                stats.clip_fraction += clip / spi as f64;
            }
            if j + 1 == spi {
                if let Some((_, _, stats)) = current.borrow().as_ref() {
                    pending.borrow_mut().push(serde_json::json!({ "rl_stats": stats, "algorithm": algo.name() }));
                }
            }
            Ok(StepLoss { loss, tokens })
        },
        |model, step| {
            let mut out: Vec<serde_json::Value> = pending.borrow_mut().drain(..).collect();
            if measure_due(step) {
                out.extend(hook(model, step / spi)?);
            }
            Ok(out)
        },
    )?;
    Ok(state)
}
