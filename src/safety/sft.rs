//! HHH supervised fine-tuning: the simplest safety training. The model is trained on
//! helpful answers to trigger-free prompts; the backdoor is never shown. For CoT models
//! this is the paper's "pre-scratchpad" variant: the targets carry no scratchpad.

use anyhow::Result;

use crate::config::TrainConfig;
use crate::data::Example;
use crate::train::sft::{step_loss, tokenize};
use crate::train::trainer::{run, LoopSpec, LoopState};
use crate::train::Trainable;

/// Fine-tune `model` in place on `hhh` examples; `hook(model, step)` measures the backdoor.
pub fn hhh_sft(
    model: &mut Trainable,
    hhh: &[Example],
    cfg: &TrainConfig,
    seed: u64,
    mut spec: LoopSpec,
    hook: impl FnMut(&Trainable, usize) -> Result<Vec<serde_json::Value>>,
) -> Result<LoopState> {
    let data = tokenize(&model.tok, hhh, model.model.cfg.max_position_embeddings)?;
    let pad = model.tok.eos_id;
    spec.steps = cfg.steps;
    spec.optim = cfg.optim();
    spec.hook_every = if cfg.eval_every > 0 { cfg.eval_every } else { cfg.steps.max(1) };
    run(model, &spec, |m, step| step_loss(m, &data, cfg.batch_size, step, seed, pad), hook)
}
