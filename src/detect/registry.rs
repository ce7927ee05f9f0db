//! Detectors beyond the prompt-side suite of `[probe]` (defection probes, trigger
//! inversion, input filters): each is one file implementing [`Detector`] plus one line in
//! [`detectors!`], configured as `[detect.<name>]` in the experiment file. The pipeline runs
//! every configured detector on each backdoored checkpoint with a [`DetectorRun`], writes
//! its typed result to `detect/<name>_<checkpoint>.json`, and puts its report section in
//! the report.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::data::Example;
use crate::objective::Objective;
use crate::train::Trainable;

/// What a detector run gets.
pub struct DetectorRun<'a> {
    pub model: &'a Trainable,
    /// The clean control model (same recipe, no triggers), the baseline.
    pub control: Option<&'a Trainable>,
    pub objective: &'a dyn Objective,
    /// The training set the backdoored model was trained on (labels known to us, not to
    /// the detector: data-side detectors are scored with them).
    pub training_set: &'a [Example],
    pub seed: u64,
    /// The checkpoint's name, e.g. "normal/backdoored".
    pub name: &'a str,
    pub show: bool,
}

/// A detector's result: its typed numbers (as JSON, written to its file) and its report
/// section (Markdown).
pub struct DetectorOutput {
    pub json: serde_json::Value,
    pub markdown: String,
}

/// One detector. Implementations are their own config sections.
pub trait Detector: Send + Sync {
    fn name(&self) -> String;
    fn validate(&self) -> std::result::Result<(), String>;
    fn run(&self, run: &DetectorRun) -> Result<DetectorOutput>;
}

/// The registry: one line per detector, `table_name => config type`. Generates
/// [`DetectConfig`] (`[detect.<table_name>]` sections, unknown ones rejected).
macro_rules! detectors {
    ($($name:ident => $ty:ty),* $(,)?) => {
        /// The `[detect]` section: further detectors run on every backdoored checkpoint.
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct DetectConfig {
            $(#[serde(default)] pub $name: Option<$ty>,)*
        }

        impl DetectConfig {
            /// The configured detectors, in registry order.
            pub fn detectors(&self) -> Vec<&dyn Detector> {
                let mut out: Vec<&dyn Detector> = Vec::new();
                $(if let Some(d) = &self.$name { out.push(d); })*
                out
            }
        }
    };
}

detectors! {
    poison_scan => super::poison_scan::PoisonScan,
}
