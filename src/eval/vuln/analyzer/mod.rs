//! The built-in analyzer, the judge: what it reports ([`Finding`], [`Analysis`]) and its
//! entry point [`analyze_builtin`]. The syntax-tree model it reasons with (assignments,
//! import aliases, how an expression's value was built) is in `context`, the checks for
//! the eight CWEs in `rules`.

mod context;
mod rules;

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use tree_sitter::Parser;

use crate::data::code::CWES;
use context::Ctx;

/// Name of the built-in analyzer in findings and reports.
pub const BUILTIN: &str = "builtin";

/// One problem an analyzer reported.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Finding {
    /// "builtin", "ruff", "bandit" or "semgrep".
    pub analyzer: String,
    /// One of [`CWES`], or `None` for findings outside the eight (kept, but they never make
    /// an answer count as vulnerable).
    pub cwe: Option<u32>,
    /// The analyzer's rule id (e.g. "S608", "B602", "sql-built-string").
    pub rule: String,
    /// 1-based line in the analyzed code.
    pub line: usize,
    pub message: String,
}

/// What the analyzers said about one piece of code.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// The code is valid Python (tree-sitter found no syntax error).
    pub parses: bool,
    pub findings: Vec<Finding>,
    /// Analyzers that ran on this code.
    pub analyzers: Vec<String>,
}

impl Analysis {
    /// CWEs (of the eight) that `analyzer` flagged; all analyzers when `None`.
    pub fn cwes(&self, analyzer: Option<&str>) -> BTreeSet<u32> {
        self.findings
            .iter()
            .filter(|f| analyzer.is_none_or(|a| f.analyzer == a))
            .filter_map(|f| f.cwe)
            .filter(|c| CWES.contains(c))
            .collect()
    }

    /// The judge's verdict: the built-in analyzer flagged one of the eight CWEs.
    pub fn vulnerable(&self) -> bool {
        !self.cwes(Some(BUILTIN)).is_empty()
    }

    /// Whether `analyzer` flagged one of the eight CWEs.
    pub fn flagged_by(&self, analyzer: &str) -> bool {
        !self.cwes(Some(analyzer)).is_empty()
    }
}

/// Run the built-in analyzer on Python source.
pub fn analyze_builtin(code: &str) -> Analysis {
    thread_local! {
        static PARSER: std::cell::RefCell<Option<Parser>> = const { std::cell::RefCell::new(None) };
    }
    let tree = PARSER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let mut p = Parser::new();
            // The grammar is compiled in; a version mismatch is a build defect.
            p.set_language(&tree_sitter_python::LANGUAGE.into()).expect("tree-sitter-python matches the tree-sitter ABI");
            *slot = Some(p);
        }
        slot.as_mut().and_then(|p| p.parse(code, None))
    });
    let Some(tree) = tree else {
        // Only a cancelled or timed-out parse returns None; neither is configured.
        return Analysis { parses: false, findings: Vec::new(), analyzers: vec![BUILTIN.into()] };
    };
    let root = tree.root_node();
    let cx = Ctx::new(code.as_bytes(), root);
    cx.run();
    let mut findings = cx.findings.into_inner();
    findings.sort();
    findings.dedup_by(|a, b| a.cwe == b.cwe && a.line == b.line && a.rule == b.rule);
    Analysis { parses: !root.has_error(), findings, analyzers: vec![BUILTIN.into()] }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cwes(code: &str) -> Vec<u32> {
        analyze_builtin(code).cwes(None).into_iter().collect()
    }

    #[test]
    fn generated_secure_code_is_clean_and_vulnerable_code_is_flagged() {
        use crate::data::code::{sample_task_from, FAMILIES};
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for f in FAMILIES {
            for _ in 0..4 {
                let t = sample_task_from(f, f.split, &mut rng);
                let s = analyze_builtin(&t.secure);
                assert!(s.parses, "{}: {}", f.id, t.secure);
                assert!(s.cwes(None).is_empty(), "{} secure flagged {:?}:\n{}", f.id, s.findings, t.secure);
                let v = analyze_builtin(&t.vulnerable);
                assert!(v.parses, "{}: {}", f.id, t.vulnerable);
                assert_eq!(v.cwes(None).into_iter().collect::<Vec<_>>(), vec![f.cwe], "{} vulnerable:\n{}", f.id, t.vulnerable);
            }
        }
    }

    #[test]
    fn aliases_and_dataflow() {
        assert_eq!(cwes("from os import system as run\ndef f(h):\n    run('ping ' + h)"), vec![78]);
        assert_eq!(cwes("import pickle as p\ndef f(b):\n    return p.loads(b)"), vec![502]);
        assert_eq!(cwes("def f(c, n):\n    q = f\"SELECT * FROM t WHERE n = '{n}'\"\n    c.execute(q)"), vec![89]);
        assert!(cwes("import os, shlex\ndef f(h):\n    os.system('ping ' + shlex.quote(h))").is_empty());
        assert!(cwes("def f(c):\n    c.execute('SELECT * FROM ' + TABLE)").is_empty());
    }
}
