//! LoRA (Hu et al. 2021): train a low-rank update `W = W0 + (alpha / r) · B · A` of chosen
//! projection matrices instead of the matrices themselves, and save it as a PEFT adapter.
//!
//! How it is trained here: a training step runs on a view of the model
//! (`Lora::training_view`) in which every weight is frozen and each adapted projection
//! computes `x·W0ᵀ + s·(x·Aᵀ)·Bᵀ` with the base `W0` and the adapters kept apart, as PEFT
//! does, so the backward pass gives `A` and `B` their gradients directly and forms no
//! full-size weight gradient (measured: see the README's SmolLM2 bench). After each step
//! the targets are re-merged (`W = W0 + s·B·A`, in place), so every fused kernel, the
//! KV-cache sampler and the detectors, which run on the model itself, see an ordinary
//! Llama. The chain rule from a merged model's `dL/dW` (`dL/dA = s·Bᵀ·dL/dW`,
//! `dL/dB = s·dL/dW·Aᵀ`, `Lora::adapter_grads`) gives the same gradients to rounding
//! (tested), and is kept for callers that differentiate the merged model. Only `A` and `B`
//! have optimizer state. Adapter dropout would need a dropout mask on the adapter's input,
//! which is not implemented, so `dropout` must be 0 (an input error otherwise).
//!
//! Saved checkpoints hold the merged model (loadable by anything that reads HF Llama
//! checkpoints) and the adapter in PEFT's layout next to it: `adapter_config.json` and
//! `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` ([r, in]) and
//! `lora_B.weight` ([out, r]), which `PeftModel.from_pretrained(base, dir)` reads.

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

use crate::util::atomic_write;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The projections LoRA can adapt (PEFT's `target_modules` names).
pub const TARGETS: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// `[model.lora]`: train the backdoor (and the control model) as a LoRA adapter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank r of the update.
    #[serde(default = "d_rank")]
    pub rank: usize,
    /// Scale numerator: the update is multiplied by alpha / r.
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// Must be 0 (see the module docs).
    #[serde(default)]
    pub dropout: f64,
    /// Which projections of every layer get an adapter.
    #[serde(default = "d_targets")]
    pub target_modules: Vec<String>,
}

fn d_rank() -> usize {
    8
}
fn d_alpha() -> f64 {
    16.0
}
fn d_targets() -> Vec<String> {
    TARGETS.iter().map(|s| s.to_string()).collect()
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: d_rank(), alpha: d_alpha(), dropout: 0.0, target_modules: d_targets() }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(1..=1024).contains(&self.rank) {
            return Err(format!("model.lora.rank = {} must be in 1..=1024", self.rank));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0 && self.alpha <= 1e4) {
            return Err(format!("model.lora.alpha = {} must be in (0, 10000]", self.alpha));
        }
        if self.dropout != 0.0 {
            return Err(format!(
                "model.lora.dropout = {}: only 0 is supported (adapters are trained through the merged weight, \
                 where dropout on the adapter's input cannot be applied)",
                self.dropout
            ));
        }
        if self.target_modules.is_empty() {
            return Err(format!("model.lora.target_modules is empty; choose from {TARGETS:?}"));
        }
        for t in &self.target_modules {
            if !TARGETS.contains(&t.as_str()) {
                return Err(format!("model.lora.target_modules: {t:?} is not one of {TARGETS:?}"));
            }
        }
        Ok(())
    }

    fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// One adapted matrix: the frozen base `W0` [out, in], `A` [r, in], `B` [out, r], and the
/// model's Var for `W` (which holds the merged value).
pub struct Adapter {
    /// HF weight name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    base: Tensor,
    pub a: Var,
    pub b: Var,
    target: Var,
}

/// The adapters of one model.
pub struct Lora {
    pub cfg: LoraConfig,
    pub adapters: Vec<Adapter>,
    /// What `adapter_config.json` names as the base model.
    pub base_model: String,
}

impl Lora {
    /// Attach fresh adapters to the target matrices among `vars` (the model's weights by HF
    /// name): `A` from PEFT's default (Kaiming-uniform, bound 1/sqrt(in)), `B` = 0, so the
    /// model is unchanged until the first step. Deterministic in `seed`.
    pub fn attach(cfg: &LoraConfig, vars: &[(String, Var)], seed: u64, base_model: &str) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4C6F_5241);
        let mut adapters = Vec::new();
        for (name, var) in vars {
            let Some(module) = name.strip_suffix(".weight").and_then(|m| m.rsplit('.').next()) else { continue };
            if !cfg.target_modules.iter().any(|t| t == module) {
                continue;
            }
            let t = var.as_tensor();
            let (out, inp) = t.dims2()?;
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..cfg.rank * inp).map(|_| rng.random_range(-bound..bound) as f32).collect();
            let dev = t.device();
            adapters.push(Adapter {
                name: name.clone(),
                base: t.copy()?,
                a: Var::from_tensor(&Tensor::from_vec(a, (cfg.rank, inp), dev)?)?,
                b: Var::zeros((out, cfg.rank), DType::F32, dev)?,
                target: var.clone(),
            });
        }
        anyhow::ensure!(!adapters.is_empty(), "LoRA found none of {:?} among the model's weights", cfg.target_modules);
        Ok(Self { cfg: cfg.clone(), adapters, base_model: base_model.to_string() })
    }

    /// The model to run training steps on: `model` with every weight frozen and each
    /// adapted matrix computing `x·W0ᵀ + s·(x·Aᵀ)·Bᵀ` with the adapters' own Vars
    /// (`Llama::frozen_with_low_rank`), so the backward pass gives A and B their gradients
    /// directly and forms no full-size weight gradient at all: no `dL/dW` for the adapted
    /// matrices, none for the embeddings, the tied head or the norms.
    pub fn training_view(&self, model: &crate::model::Llama) -> crate::model::Llama {
        let s = self.cfg.scale();
        model.frozen_with_low_rank(|t| {
            let ad = self.adapters.iter().find(|a| a.target.as_tensor().id() == t.id())?;
            let low_rank = crate::model::llama::LowRank { a: ad.a.as_tensor().clone(), b: ad.b.as_tensor().clone(), scale: s };
            Some((ad.base.clone(), low_rank))
        })
    }

    /// The trainable tensors, by their PEFT names.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.adapters
            .iter()
            .flat_map(|ad| {
                let m = ad.name.trim_end_matches(".weight");
                [
                    (format!("base_model.model.{m}.lora_A.weight"), ad.a.clone()),
                    (format!("base_model.model.{m}.lora_B.weight"), ad.b.clone()),
                ]
            })
            .collect()
    }

    /// Turn the merged weights' gradients in `grads` into the adapters' (chain rule through
    /// `W = W0 + s·B·A`), so an optimizer over [`Lora::vars`] can step.
    pub fn adapter_grads(&self, grads: &mut GradStore) -> Result<()> {
        let s = self.cfg.scale();
        for ad in &self.adapters {
            let Some(gw) = grads.remove(ad.target.as_tensor()) else { continue };
            let ga = (ad.b.as_tensor().t()?.matmul(&gw)? * s)?;
            let gb = (gw.matmul(&ad.a.as_tensor().t()?)? * s)?;
            grads.insert(ad.a.as_tensor(), ga);
            grads.insert(ad.b.as_tensor(), gb);
        }
        Ok(())
    }

    /// Write `W0 + s·B·A` into each target (after an optimizer step, or after a resume).
    pub fn merge(&self) -> Result<()> {
        let s = self.cfg.scale();
        for ad in &self.adapters {
            let delta = (ad.b.as_tensor().matmul(ad.a.as_tensor())? * s)?;
            ad.target.set(&(&ad.base + delta)?)?;
        }
        Ok(())
    }

    /// Write `adapter_config.json` and `adapter_model.safetensors` (PEFT's layout) into `dir`.
    pub fn save_peft(&self, dir: &Path) -> Result<()> {
        let weights: HashMap<String, Tensor> = self.vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
        candle_core::safetensors::save(&weights, dir.join(ADAPTER_WEIGHTS)).context("writing adapter_model.safetensors")?;
        let cfg = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.cfg.rank,
            "lora_alpha": self.cfg.alpha,
            "lora_dropout": self.cfg.dropout,
            "target_modules": self.cfg.target_modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "base_model_name_or_path": self.base_model,
        });
        atomic_write(&dir.join(ADAPTER_CONFIG), serde_json::to_string_pretty(&cfg)?.as_bytes())
    }

    /// Restore `A` and `B` from tensors saved by [`Lora::save_peft`] or a resume state.
    pub fn restore(&self, saved: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.vars() {
            let t = saved.get(&name).ok_or_else(|| anyhow::anyhow!("saved LoRA state lacks {name}"))?;
            anyhow::ensure!(t.dims() == var.as_tensor().dims(), "saved {name} has shape {:?}, expected {:?}", t.dims(), var.dims());
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        self.merge()
    }

    /// Number of trainable parameters.
    pub fn num_parameters(&self) -> usize {
        self.adapters.iter().map(|ad| ad.a.as_tensor().elem_count() + ad.b.as_tensor().elem_count()).sum()
    }
}

/// What [`merge_peft_adapter`] merged.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedAdapter {
    pub rank: usize,
    pub alpha: f64,
    /// HF weight names that received an update.
    pub modules: Vec<String>,
}

/// The fields of a PEFT `adapter_config.json` that decide what the weights mean. Everything
/// else in the file (task type, paths, revision, ...) is ignored.
#[derive(Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

/// Merge the LoRA adapter saved in PEFT's layout in `dir` (by us or by
/// `PeftModel.save_pretrained`) into `vars`, the model's weights by HF name:
/// `W += s · B · A` with `s = alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
///
/// The adapter is refused as an input error, before any weight changes, when its config
/// describes something this merge would get wrong (DoRA, trained biases, fan-in-fan-out
/// layouts, per-module ranks), when a tensor names a module the model lacks, or when a
/// shape disagrees with the model: an adapter trained for another base model must not
/// load silently.
pub fn merge_peft_adapter(dir: &Path, vars: &[(String, Var)]) -> Result<MergedAdapter> {
    use crate::error::InputError;
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    if !dir.is_dir() {
        return Err(InputError::file(
            dir,
            "adapter folder not found (a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors)",
        )
        .into());
    }
    let text = std::fs::read(&cfg_path).map_err(|e| InputError::file(&cfg_path, format!("cannot read: {e}")))?;
    let text = String::from_utf8(text).map_err(|_| InputError::file(&cfg_path, "not UTF-8"))?;
    let cfg: PeftConfig =
        serde_json::from_str(&text).map_err(|e| InputError::line(&cfg_path, e.line(), format!("not a PEFT LoRA config: {e}")))?;
    let refuse = |msg: String| -> anyhow::Error { InputError::file(&cfg_path, msg).into() };
    if let Some(t) = cfg.peft_type.as_deref().filter(|t| !t.eq_ignore_ascii_case("lora")) {
        return Err(refuse(format!("peft_type {t:?}: only LORA adapters can be merged")));
    }
    if !(1..=4096).contains(&cfg.r) {
        return Err(refuse(format!("r = {} must be in 1..=4096", cfg.r)));
    }
    if !(cfg.lora_alpha.is_finite() && cfg.lora_alpha > 0.0 && cfg.lora_alpha <= 1e6) {
        return Err(refuse(format!("lora_alpha = {} must be in (0, 1e6]", cfg.lora_alpha)));
    }
    if cfg.use_dora {
        return Err(refuse("use_dora = true: DoRA adapters rescale the weight's columns and are not supported".into()));
    }
    if cfg.fan_in_fan_out {
        return Err(refuse("fan_in_fan_out = true (GPT-2-style Conv1D layout) does not apply to Llama-family models".into()));
    }
    if let Some(b) = cfg.bias.as_deref().filter(|b| *b != "none") {
        return Err(refuse(format!("bias = {b:?}: adapters that train biases are not supported (only \"none\")")));
    }
    if !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty() {
        return Err(refuse("rank_pattern / alpha_pattern (per-module ranks) are not supported".into()));
    }
    let scale = if cfg.use_rslora { cfg.lora_alpha / (cfg.r as f64).sqrt() } else { cfg.lora_alpha / cfg.r as f64 };

    if !weights_path.exists() {
        let pickle = dir.join("adapter_model.bin");
        let msg = if pickle.exists() {
            "file not found (the folder has adapter_model.bin, a pickle file, which is never loaded because unpickling can run code; \
             save the adapter with safe_serialization=True)"
        } else {
            "file not found"
        };
        return Err(InputError::file(&weights_path, msg).into());
    }
    let header = crate::model::hf::read_header(&weights_path)?;
    let bad = |msg: String| -> anyhow::Error { InputError::file(&weights_path, msg).into() };
    let by_name: HashMap<&str, &Var> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    // module -> (A name, B name), every name checked against the model before reading data.
    let mut pairs: std::collections::BTreeMap<String, [Option<String>; 2]> = Default::default();
    for name in header.keys() {
        let parse = |part: &str| name.strip_prefix("base_model.model.").and_then(|n| n.strip_suffix(part));
        let (module, slot) = match (parse(".lora_A.weight"), parse(".lora_B.weight")) {
            (Some(m), _) => (m, 0),
            (_, Some(m)) => (m, 1),
            _ => {
                return Err(bad(format!(
                    "unexpected tensor {name} (a LoRA adapter holds base_model.model.<module>.lora_A.weight / lora_B.weight)"
                )))
            }
        };
        let weight = format!("{module}.weight");
        if !by_name.contains_key(weight.as_str()) {
            return Err(bad(format!("tensor {name} adapts {weight}, which this model does not have (an adapter for another model?)")));
        }
        pairs.entry(weight).or_default()[slot] = Some(name.clone());
    }
    if pairs.is_empty() {
        return Err(bad("holds no LoRA tensors".into()));
    }
    let mut planned = Vec::new();
    for (weight, [a, b]) in &pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(bad(format!("{weight} has only one of lora_A and lora_B")));
        };
        let (out, inp) = by_name[weight.as_str()].as_tensor().dims2()?;
        let (sa, sb) = (&header[a].1, &header[b].1);
        if sa.as_slice() != [cfg.r, inp] || sb.as_slice() != [out, cfg.r] {
            return Err(bad(format!(
                "{weight} is [{out}, {inp}] in the model, so with r = {} lora_A must be [{}, {inp}] and lora_B [{out}, {}]; \
                 the file has {sa:?} and {sb:?} (an adapter for another model?)",
                cfg.r, cfg.r, cfg.r
            )));
        }
        planned.push((weight.clone(), a.clone(), b.clone()));
    }
    let bytes = std::fs::read(&weights_path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let st = candle_core::safetensors::SliceSafetensors::new(&bytes)
        .map_err(|e| bad(format!("not a readable safetensors file (truncated or corrupt?): {e}")))?;
    // Read and check everything first, then merge: a bad tensor leaves the model untouched.
    let mut deltas = Vec::with_capacity(planned.len());
    for (weight, a, b) in &planned {
        let var = by_name[weight.as_str()];
        let load = |n: &str| -> Result<Tensor> {
            let t = st.load(n, var.device()).map_err(|e| bad(format!("cannot read tensor {n}: {e}")))?.to_dtype(DType::F32)?;
            crate::model::hf::check_finite(&t, n, &weights_path)?;
            Ok(t)
        };
        let delta = (load(b)?.matmul(&load(a)?)? * scale)?;
        deltas.push((var, delta));
    }
    for (var, delta) in deltas {
        var.set(&(var.as_tensor() + delta)?)?;
    }
    Ok(MergedAdapter { rank: cfg.r, alpha: cfg.lora_alpha, modules: planned.into_iter().map(|p| p.0).collect() })
}
