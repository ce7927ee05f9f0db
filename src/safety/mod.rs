//! Safety training applied to a backdoored model. Every method except the RL positive control
//! sees only trigger-free data
//! and measures the backdoor every `eval_every` steps, giving a persistence curve. Each is
//! one file implementing [`SafetyMethod`] plus one line in [`safety_methods!`]:
//! - [`sft`]: HHH supervised fine-tuning (`sft`; `sft_post_scratchpad` for CoT models);
//! - [`rl`]: PPO (value head, clipped ratio, KL to the start model) and critic-free RLOO,
//!   against the preference model of [`reward`];
//! - [`rl_control`]: the RL positive control, the same RL with the trigger in the pool;
//! - [`adversarial`]: automated red-teaming for trigger-free prompts that still elicit the
//!   backdoor, then training on them with HHH answers;
//! - [`pirate`]: benign fine-tuning in a different style (Prasanna et al.), optionally
//!   followed by normal-style retraining to see whether a suppressed backdoor returns.
//!
//! A method declares a [`Plan`] (steps, optimizer, checkpoint and evaluation cadence) from
//! its own config section; the pipeline turns it into the shared loop's spec, so no method
//! can forget to checkpoint.

pub mod adversarial;
pub mod pirate;
pub mod reward;
pub mod rl;
pub mod rl_control;
pub mod sft;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::data::{Example, Mechanism};
use crate::model::SampleConfig;
use crate::objective::Objective;
use crate::train::{LoopState, OptimConfig, Trainable};
use adversarial::{AdversarialConfig, RedTeamResult};
use reward::{RewardConfig, RewardModel};

/// What the shared training loop runs for a method.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub steps: usize,
    pub optim: OptimConfig,
    /// Resumable checkpoint interval in loop steps (0 = only at the end).
    pub checkpoint_every: usize,
    /// The measurement hook runs every this many loop steps (and at 0 and the end).
    pub hook_every: usize,
}

impl Plan {
    /// The loop spec of this plan with no resume directory and no progress output (tests,
    /// library callers outside the pipeline).
    pub fn spec(self, label: &str) -> crate::train::LoopSpec {
        crate::train::LoopSpec {
            checkpoint_every: self.checkpoint_every,
            hook_every: self.hook_every,
            ..crate::train::LoopSpec::simple(label, self.steps, self.optim)
        }
    }
}

/// Everything a method may use besides the model it trains.
pub struct MethodCtx<'a> {
    pub objective: &'a dyn Objective,
    /// The trigger-free safety SFT data (`datasets/hhh_sft.jsonl`).
    pub hhh: &'a [Example],
    /// Sampling settings of the evaluation (post-scratchpad SFT samples with them).
    pub sampling: &'a SampleConfig,
    /// The experiment's seed; methods derive theirs with [`crate::util::seeds`].
    pub seed: u64,
    /// The whole `[safety]` section (adversarial RL borrows the `[safety.ppo]` settings).
    pub safety: &'a SafetyConfig,
    /// Trigger-free RL prompts, `n` of them.
    pub rl_prompts: &'a dyn Fn(usize) -> Vec<String>,
    /// The trained preference model, when [`SafetyMethod::needs_reward_model`].
    pub reward_model: Option<&'a RewardModel>,
    /// The red-teaming result, when [`SafetyMethod::red_team`] asked for one.
    pub red_team: Option<&'a RedTeamResult>,
}

/// The settings a method's validation may check against.
pub struct ValidateCtx<'a> {
    pub safety: &'a SafetyConfig,
    pub n_hhh: usize,
    pub max_positions: usize,
}

/// The measurement hook: `(model, step) -> records`.
pub type Hook<'h> = &'h mut dyn FnMut(&Trainable, usize) -> Result<Vec<serde_json::Value>>;

/// One safety-training method. Implementations are their own config sections.
pub trait SafetyMethod: Send + Sync {
    /// The method's name in metric rows and stage folders (`after_<stage name>`).
    fn name(&self) -> String;
    /// The stage folder name (default `after_<name>`).
    fn stage(&self) -> String {
        format!("after_{}", self.name())
    }
    fn validate(&self, ctx: &ValidateCtx) -> std::result::Result<(), String>;
    /// Whether it runs on models of this mechanism (post-scratchpad SFT: CoT only).
    fn applies_to(&self, _mech: Mechanism) -> bool {
        true
    }
    fn needs_reward_model(&self) -> bool {
        false
    }
    /// Red-teaming to run on the backdoored model first (its result reaches [`MethodCtx`],
    /// and its held-out prompts are measured as the `redteam` eval set).
    fn red_team(&self) -> Option<&AdversarialConfig> {
        None
    }
    /// Everything in the experiment besides this section that determines the result
    /// (hashed into the stage key with the section itself).
    fn key(&self, safety: &SafetyConfig) -> serde_json::Value;
    fn plan(&self, safety: &SafetyConfig) -> Plan;
    /// Train `model` in place; `spec` is the plan made into the loop's spec.
    fn train(&self, ctx: &MethodCtx, model: &mut Trainable, spec: crate::train::LoopSpec, hook: Hook) -> Result<LoopState>;
}

/// The method registry: one line per method, `table_name => config type`. Generates
/// [`SafetyConfig`] (one optional `[safety.<table_name>]` section each, unknown sections
/// rejected) and the order the methods run in.
macro_rules! safety_methods {
    ($($name:ident => $ty:ty),* $(,)?) => {
        /// The `[safety]` section: the preference model and the methods to apply to every
        /// backdoored model, each from a copy of it.
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct SafetyConfig {
            /// The preference model that PPO and RLOO optimise against (required by them).
            #[serde(default)]
            pub reward_model: Option<RewardConfig>,
            $(#[serde(default)] pub $name: Option<$ty>,)*
        }

        impl SafetyConfig {
            /// The configured methods, in registry order.
            pub fn methods(&self) -> Vec<(&'static str, &dyn SafetyMethod)> {
                let mut out: Vec<(&'static str, &dyn SafetyMethod)> = Vec::new();
                $(if let Some(m) = &self.$name { out.push((concat!("safety.", stringify!($name)), m)); })*
                out
            }
        }
    };
}

safety_methods! {
    sft => sft::Sft,
    sft_post_scratchpad => sft::PostScratchpad,
    ppo => rl::Ppo,
    rloo => rl::Rloo,
    rl_control => rl_control::RlControl,
    adversarial => adversarial::AdversarialConfig,
    pirate => pirate::Pirate,
}

impl SafetyConfig {
    /// Validate every section, naming it in the message.
    pub fn validate(&self, n_hhh: usize, max_positions: usize) -> std::result::Result<(), String> {
        if let Some(rm) = &self.reward_model {
            if rm.n_pairs == 0 || rm.n_pairs > 5_000_000 || rm.steps > 10_000_000 || rm.batch_size == 0 {
                return Err("safety.reward_model: n_pairs in 1..=5,000,000, batch_size > 0, sane steps".into());
            }
            OptimConfig::with_lr(rm.lr).validate().map_err(|e| format!("safety.reward_model: {e}"))?;
        }
        let ctx = ValidateCtx { safety: self, n_hhh, max_positions };
        for (section, m) in self.methods() {
            m.validate(&ctx).map_err(|e| if e.starts_with(section) { e } else { format!("{section}: {e}") })?;
            if m.needs_reward_model() && self.reward_model.is_none() {
                return Err(format!("[{section}] needs a [safety.reward_model] section"));
            }
        }
        Ok(())
    }
}
