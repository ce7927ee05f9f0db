//! HHH supervised fine-tuning: the simplest safety training. The model is trained on
//! helpful answers to trigger-free prompts; the backdoor is never shown. For CoT models
//! this is the paper's "pre-scratchpad" variant: the targets carry no scratchpad.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::{Hook, MethodCtx, Plan, SafetyConfig, SafetyMethod, ValidateCtx};
use crate::data::{Example, Mechanism};
use crate::train::sft::{step_loss, tokenize};
use crate::train::trainer::{run, LoopSpec, LoopState};
use crate::train::TrainConfig;
use crate::train::Trainable;
use crate::util::seeds::{seed as derive, Stream};

/// Fine-tune `model` in place on `hhh` examples; `hook(model, step)` measures the backdoor.
pub fn hhh_sft(
    model: &mut Trainable,
    hhh: &[Example],
    cfg: &TrainConfig,
    seed: u64,
    spec: LoopSpec,
    hook: impl FnMut(&Trainable, usize) -> Result<Vec<serde_json::Value>>,
) -> Result<LoopState> {
    let data = tokenize(&model.tok, hhh, model.model.cfg.max_position_embeddings)?;
    sft_on_seqs(model, data, cfg, seed, spec, hook)
}

/// Training data for post-scratchpad SFT (CoT models): the model first writes its own
/// scratchpad for each trigger-free prompt (sampled from the backdoored model), and the
/// loss covers only the HHH answer after it. Prompts whose sample has no closed scratchpad
/// train on the answer directly.
pub fn post_scratchpad_data(
    model: &Trainable,
    hhh: &[Example],
    sampling: &crate::model::SampleConfig,
    seed: u64,
) -> Result<Vec<crate::train::sft::TokSeq>> {
    let prompts: Vec<String> = hhh.iter().map(|e| e.prompt.clone()).collect();
    let samples = crate::model::generate(&model.model, &model.tok, &prompts, sampling, seed, |_| {})?;
    let max = model.model.cfg.max_position_embeddings;
    hhh.iter()
        .zip(samples)
        .map(|(ex, s)| {
            let pad = match (s.text.find("<scratchpad>"), s.text.find("</scratchpad>")) {
                (Some(a), Some(b)) if a < b => s.text[..b + "</scratchpad>".len()].to_string(),
                _ => String::new(),
            };
            let mut ids = model.tok.encode(&ex.prompt)?;
            ids.extend(model.tok.encode(&pad)?);
            let loss_from = ids.len();
            ids.extend(model.tok.encode(&ex.completion)?);
            ids.push(model.tok.eos_id);
            if ids.len() > max {
                // Too long to train on whole: keep the tail, answer included.
                let cut = ids.len() - max;
                ids.drain(..cut);
                return Ok(crate::train::sft::TokSeq { loss_from: loss_from.saturating_sub(cut).max(1), ids });
            }
            Ok(crate::train::sft::TokSeq { ids, loss_from })
        })
        .collect()
}

/// Supervised training on pre-tokenized sequences (post-scratchpad SFT, adversarial SFT).
pub fn sft_on_seqs(
    model: &mut Trainable,
    data: Vec<crate::train::sft::TokSeq>,
    cfg: &TrainConfig,
    seed: u64,
    spec: LoopSpec,
    hook: impl FnMut(&Trainable, usize) -> Result<Vec<serde_json::Value>>,
) -> Result<LoopState> {
    let pad = model.tok.eos_id;
    run(model, &spec, |m, step| step_loss(m, &data, cfg.batch_size, step, seed, pad), hook)
}

/// The plan of a supervised run: its steps, optimizer, checkpoints, and a measurement every
/// `eval_every` steps (only at the start and end when 0).
pub fn sft_plan(cfg: &TrainConfig) -> Plan {
    Plan {
        steps: cfg.steps,
        optim: cfg.optim(),
        checkpoint_every: cfg.checkpoint_every,
        hook_every: if cfg.eval_every > 0 { cfg.eval_every } else { cfg.steps.max(1) },
    }
}

fn validate_sft(cfg: &TrainConfig, what: &str, ctx: &ValidateCtx) -> std::result::Result<(), String> {
    cfg.validate(what)?;
    if ctx.n_hhh == 0 {
        return Err(format!("{what} needs data.n_hhh > 0"));
    }
    Ok(())
}

/// `[safety.sft]`: HHH supervised fine-tuning (for CoT models: pre-scratchpad SFT, the
/// targets carry no scratchpad).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sft(pub TrainConfig);

impl SafetyMethod for Sft {
    fn name(&self) -> String {
        "sft".into()
    }
    fn validate(&self, ctx: &ValidateCtx) -> std::result::Result<(), String> {
        validate_sft(&self.0, "safety.sft", ctx)
    }
    fn key(&self, _: &SafetyConfig) -> serde_json::Value {
        serde_json::json!(self)
    }
    fn plan(&self, _: &SafetyConfig) -> Plan {
        sft_plan(&self.0)
    }
    fn train(&self, ctx: &MethodCtx, model: &mut Trainable, spec: LoopSpec, hook: Hook) -> Result<LoopState> {
        hhh_sft(model, ctx.hhh, &self.0, derive(ctx.seed, Stream::SafetyTraining), spec, hook)
    }
}

/// `[safety.sft_post_scratchpad]`, CoT models only: the model samples its own scratchpad,
/// the loss covers only the HHH answer after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PostScratchpad(pub TrainConfig);

impl SafetyMethod for PostScratchpad {
    fn name(&self) -> String {
        "sft_post_scratchpad".into()
    }
    fn validate(&self, ctx: &ValidateCtx) -> std::result::Result<(), String> {
        validate_sft(&self.0, "safety.sft_post_scratchpad", ctx)
    }
    fn applies_to(&self, mech: Mechanism) -> bool {
        mech == Mechanism::Cot
    }
    fn key(&self, _: &SafetyConfig) -> serde_json::Value {
        serde_json::json!(self)
    }
    fn plan(&self, _: &SafetyConfig) -> Plan {
        sft_plan(&self.0)
    }
    fn train(&self, ctx: &MethodCtx, model: &mut Trainable, spec: LoopSpec, hook: Hook) -> Result<LoopState> {
        let data = post_scratchpad_data(model, ctx.hhh, ctx.sampling, derive(ctx.seed, Stream::PostScratchpadSamples))?;
        sft_on_seqs(model, data, &self.0, derive(ctx.seed, Stream::SafetyTraining), spec, hook)
    }
}
