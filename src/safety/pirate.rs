//! Benign fine-tuning in a different style, after Prasanna et al., who found that training
//! on helpful data rewritten as "pirate speech" suppresses a backdoor, and that the backdoor
//! can return after ordinary-style retraining. Phase 1 fine-tunes on the trigger-free safety
//! data with every answer rewritten in pirate style ([`crate::data::pirate`]); with
//! `retrain_steps > 0`, phase 2 continues on the same data in its normal style, so the
//! persistence curve shows whether the suppressed backdoor comes back. Both phases are one
//! resumable run with one learning-rate schedule over `steps + retrain_steps`.
//!
//! ```toml
//! [safety.pirate]
//! steps = 150            # pirate-style phase
//! retrain_steps = 150    # then normal-style (0 = none)
//! lr = 1e-3
//! eval_every = 50
//! ```

use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Hook, MethodCtx, Plan, SafetyConfig, SafetyMethod, ValidateCtx};
use crate::data::pirate::pirate_example;
use crate::train::sft::{step_loss, tokenize};
use crate::train::trainer::{run, LoopSpec, LoopState};
use crate::train::{TrainConfig, Trainable};
use crate::util::seeds::{seed as derive, Stream};

/// `[safety.pirate]`: the supervised settings of the pirate phase, plus the retraining phase.
/// Read through a map so that unknown keys are still errors (serde's `flatten` would let
/// them through).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
pub struct Pirate {
    #[serde(flatten)]
    pub train: TrainConfig,
    /// Normal-style SFT steps after the pirate phase (0 = none).
    #[serde(default)]
    pub retrain_steps: usize,
}

impl TryFrom<serde_json::Map<String, serde_json::Value>> for Pirate {
    type Error = String;

    fn try_from(mut map: serde_json::Map<String, serde_json::Value>) -> std::result::Result<Self, String> {
        let retrain_steps = match map.remove("retrain_steps") {
            Some(v) => serde_json::from_value(v).map_err(|e| format!("retrain_steps: {e}"))?,
            None => 0,
        };
        let train = serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| e.to_string())?;
        Ok(Self { train, retrain_steps })
    }
}

impl Pirate {
    fn total(&self) -> TrainConfig {
        TrainConfig { steps: self.train.steps + self.retrain_steps, ..self.train.clone() }
    }
}

impl SafetyMethod for Pirate {
    fn name(&self) -> String {
        "pirate".into()
    }
    fn validate(&self, ctx: &ValidateCtx) -> std::result::Result<(), String> {
        self.total().validate("safety.pirate")?;
        if ctx.n_hhh == 0 {
            return Err("safety.pirate needs data.n_hhh > 0".into());
        }
        Ok(())
    }
    fn key(&self, _: &SafetyConfig) -> serde_json::Value {
        serde_json::json!(self)
    }
    fn plan(&self, _: &SafetyConfig) -> Plan {
        super::sft::sft_plan(&self.total())
    }
    fn train(&self, ctx: &MethodCtx, model: &mut Trainable, spec: LoopSpec, hook: Hook) -> Result<LoopState> {
        let mut rng = ChaCha8Rng::seed_from_u64(derive(ctx.seed, Stream::Pirate));
        let pirate: Vec<_> = ctx.hhh.iter().map(|ex| pirate_example(ex, &mut rng)).collect();
        let max = model.model.cfg.max_position_embeddings;
        let (pirate, normal) = (tokenize(&model.tok, &pirate, max)?, tokenize(&model.tok, ctx.hhh, max)?);
        let (bs, pad, seed, phase1) = (self.train.batch_size, model.tok.eos_id, derive(ctx.seed, Stream::SafetyTraining), self.train.steps);
        run(model, &spec, |m, step| step_loss(m, if step < phase1 { &pirate } else { &normal }, bs, step, seed, pad), hook)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_takes_the_training_keys_and_rejects_unknown_ones() {
        let p: Pirate = toml::from_str("steps = 10\nlr = 1e-3\nretrain_steps = 5\neval_every = 5\n").unwrap();
        assert_eq!((p.train.steps, p.retrain_steps, p.train.eval_every), (10, 5, 5));
        assert_eq!(p.plan(&SafetyConfig::default()).steps, 15);
        assert!(toml::from_str::<Pirate>("steps = 10\nlr = 1e-3\nbogus = 1\n").is_err());
        assert!(toml::from_str::<Pirate>("lr = 1e-3\n").is_err(), "steps is required");
    }
}
