//! Checkpoints: `config.json` + `model.safetensors` + `tokenizer.json` + `state.json`
//! (+ `optimizer.safetensors` for a resumable training state), in HF's layout.
//!
//! A checkpoint directory is written whole into a sibling temporary directory, fsynced,
//! then renamed into place, so a crash never leaves a half-written checkpoint behind.
//! Loading checks every tensor name and shape against the config and reports mismatches
//! as input errors (exit code 2) naming the file. The same loader reads Hugging Face
//! Llama-family checkpoint directories (sharded weights, bf16/f16, their tokenizer's own
//! end token): see `model::hf`; and GGUF files, dequantized at load: see `model::gguf`.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::InputError;
use crate::model::{gguf, hf, Llama, LlamaConfig, Tok};
use crate::util::{atomic_write, read_text};

pub const CONFIG: &str = hf::CONFIG;
pub const WEIGHTS: &str = hf::WEIGHTS;
pub const TOKENIZER: &str = hf::TOKENIZER;
pub const STATE: &str = "state.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";
/// Extra trainable tensors that are not part of the HF model (value / reward heads).
pub const EXTRA: &str = "extra.safetensors";

/// A model whose weights are trainable `Var`s, with its tokenizer.
pub struct Trainable {
    pub model: Llama,
    /// Every weight, by HF name, sorted.
    pub vars: Vec<(String, Var)>,
    pub tok: Tok,
    /// LoRA adapters being trained (their targets in `vars` hold the merged weights).
    pub lora: Option<super::lora::Lora>,
}

fn build(cfg: &LlamaConfig, dev: &Device) -> Result<(Llama, VarMap)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let model = Llama::new(cfg, vb)?;
    Ok((model, varmap))
}

fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let sorted: BTreeMap<String, Var> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    sorted.into_iter().collect()
}

/// Deterministic N(0, std) tensor from a seeded ChaCha stream (Box-Muller).
fn seeded_normal(shape: &[usize], std: f64, rng: &mut ChaCha8Rng, dev: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let u1: f64 = rng.random::<f64>().max(1e-12);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        v.push((r * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32);
        if v.len() < n {
            v.push((r * (2.0 * std::f64::consts::PI * u2).sin() * std) as f32);
        }
    }
    Ok(Tensor::from_vec(v, shape, dev)?)
}

impl Trainable {
    /// A freshly initialised model: N(0, 0.02) matrices (output projections scaled by
    /// 1/sqrt(2L), as in GPT-2, so the residual stream does not grow with depth), unit
    /// norm gains, zero biases. Deterministic in `seed`.
    pub fn init(cfg: &LlamaConfig, tok: Tok, seed: u64, dev: &Device) -> Result<Self> {
        cfg.validate().map_err(InputError::invalid)?;
        let (model, varmap) = build(cfg, dev)?;
        let vars = sorted_vars(&varmap);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let out_scale = 1.0 / (2.0 * cfg.num_hidden_layers as f64).sqrt();
        for (name, var) in &vars {
            let t = var.as_tensor();
            let value = if name.ends_with("norm.weight") {
                t.ones_like()?
            } else if name.ends_with(".bias") {
                t.zeros_like()?
            } else {
                let std = if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") { 0.02 * out_scale } else { 0.02 };
                seeded_normal(t.dims(), std, &mut rng, dev)?
            };
            var.set(&value)?;
        }
        Ok(Self { model, vars, tok, lora: None })
    }

    /// Load a checkpoint directory, validating names and shapes against its config: ours,
    /// or any Hugging Face Llama-family checkpoint (`config.json`, `model.safetensors` or
    /// sharded safetensors with `model.safetensors.index.json`, `tokenizer.json`, and
    /// `tokenizer_config.json` for the end token; see `model::hf`).
    ///
    /// A GGUF file (llama.cpp's format), or a directory holding one and no `config.json`,
    /// loads too, dequantized to f32 (see `model::gguf`).
    pub fn load(dir: &Path, dev: &Device) -> Result<Self> {
        if let Some(file) = gguf::gguf_path(dir) {
            return Self::load_gguf(&file, dev);
        }
        if dir.is_file() {
            return Err(InputError::file(dir, "not a checkpoint directory, nor a GGUF file").into());
        }
        if !dir.is_dir() {
            let what = if dir.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) { "GGUF file" } else { "checkpoint directory" };
            return Err(InputError::file(dir, format!("{what} not found")).into());
        }
        let cfg = load_config(&dir.join(CONFIG))?;
        // `state.json` marks our own checkpoints, whose end token is always <|endoftext|>.
        let tok = hf::load_tokenizer(dir, &cfg, dir.join(STATE).exists())?;
        if tok.vocab_size() > cfg.vocab_size {
            return Err(InputError::file(
                &dir.join(TOKENIZER),
                format!("tokenizer has {} tokens but config vocab_size is {}", tok.vocab_size(), cfg.vocab_size),
            )
            .into());
        }
        let (model, varmap) = build(&cfg, dev)?;
        let vars = sorted_vars(&varmap);
        hf::load_weights_into(dir, &vars, cfg.tie_word_embeddings, dev)?;
        Ok(Self { model, vars, tok, lora: None })
    }

    /// [`Trainable::load`], then merge the PEFT LoRA adapter in `adapter` (if any) into the
    /// weights (see [`super::lora::merge_peft_adapter`]); a note on stderr says what merged.
    pub fn load_adapted(path: &Path, adapter: Option<&Path>, dev: &Device) -> Result<Self> {
        let m = Self::load(path, dev)?;
        if let Some(dir) = adapter {
            let merged = super::lora::merge_peft_adapter(dir, &m.vars)?;
            eprintln!(
                "merged LoRA adapter {} (r = {}, alpha = {}) into {} weight(s) of {}",
                dir.display(),
                merged.rank,
                merged.alpha,
                merged.modules.len(),
                path.display()
            );
        }
        Ok(m)
    }

    /// Load a GGUF file: config and tokenizer from its metadata, weights dequantized to f32
    /// with llama.cpp's Q/K row permutation undone. Everything is checked against the file
    /// before the model is allocated.
    pub fn load_gguf(path: &Path, dev: &Device) -> Result<Self> {
        let g = gguf::Gguf::open(path)?;
        let cfg = g.config()?;
        let tok = g.tokenizer()?;
        if tok.vocab_size() > cfg.vocab_size {
            return Err(InputError::file(
                path,
                format!("tokenizer has {} tokens but the vocabulary size is {}", tok.vocab_size(), cfg.vocab_size),
            )
            .into());
        }
        let (model, varmap) = build(&cfg, dev)?;
        let vars = sorted_vars(&varmap);
        g.load_weights_into(&cfg, &vars, dev)?;
        Ok(Self { model, vars, tok, lora: None })
    }

    /// Current weights by name (shares storage with the Vars; cheap).
    pub fn weights(&self) -> HashMap<String, Tensor> {
        self.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
    }

    /// Attach fresh LoRA adapters (see `train::lora`): training then updates only them.
    pub fn attach_lora(&mut self, cfg: &super::lora::LoraConfig, seed: u64, base_model: &str) -> Result<()> {
        self.lora = Some(super::lora::Lora::attach(cfg, &self.vars, seed, base_model)?);
        Ok(())
    }

    /// The model with its adapters merged for good: later training is full fine-tuning.
    pub fn without_lora(mut self) -> Self {
        self.lora = None;
        self
    }

    /// A deep copy with its own Vars (e.g. a frozen reference policy), without adapters.
    pub fn deep_clone(&self) -> Result<Self> {
        let (model, varmap) = build(&self.model.cfg, self.model.device())?;
        let vars = sorted_vars(&varmap);
        for ((name, dst), (src_name, src)) in vars.iter().zip(&self.vars) {
            debug_assert_eq!(name, src_name);
            dst.set(&src.as_tensor().copy()?)?;
        }
        Ok(Self { model, vars, tok: self.tok.clone(), lora: None })
    }

    /// Write the checkpoint atomically (see module docs). `optimizer` adds resumable state.
    pub fn save(&self, dir: &Path, state: &serde_json::Value, optimizer: Option<&super::optim::AdamW>) -> Result<()> {
        self.save_with(dir, state, optimizer, None)
    }

    /// `save` plus extra named tensors (heads outside the HF model) in `extra.safetensors`.
    pub fn save_with(
        &self,
        dir: &Path,
        state: &serde_json::Value,
        optimizer: Option<&super::optim::AdamW>,
        extra: Option<&HashMap<String, Tensor>>,
    ) -> Result<()> {
        // The whole directory, its swap included, finishes before a signal's exit.
        let _writing = crate::util::begin_write();
        let tmp = sibling(dir, "tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
        }
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let cfg = self.model.cfg.to_hf_json();
        atomic_write(&tmp.join(CONFIG), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
        atomic_write(&tmp.join(TOKENIZER), self.tok.to_json()?.as_bytes())?;
        if let Some(tc) = self.tok.hf_config() {
            // A Hugging Face tokenizer's end token and chat template live here.
            atomic_write(&tmp.join(hf::TOKENIZER_CONFIG), tc.as_bytes())?;
        }
        atomic_write(&tmp.join(STATE), serde_json::to_string_pretty(state)?.as_bytes())?;
        candle_core::safetensors::save(&self.weights(), tmp.join(WEIGHTS)).context("writing model.safetensors")?;
        if let Some(opt) = optimizer {
            opt.save(&tmp.join(OPTIMIZER))?;
        }
        if let Some(extra) = extra {
            candle_core::safetensors::save(extra, tmp.join(EXTRA)).context("writing extra.safetensors")?;
        }
        if let Some(lora) = &self.lora {
            lora.save_peft(&tmp)?;
        }
        for f in [WEIGHTS, OPTIMIZER, EXTRA, super::lora::ADAPTER_WEIGHTS] {
            if let Ok(file) = fs::File::open(tmp.join(f)) {
                file.sync_all().ok();
            }
        }
        replace_dir(&tmp, dir)
    }
}

fn sibling(dir: &Path, tag: &str) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "ckpt".into());
    dir.with_file_name(format!(".{name}.{tag}"))
}

/// Move `src` to `dst`, replacing any existing `dst` (old one moved aside first, then removed).
pub fn replace_dir(src: &Path, dst: &Path) -> Result<()> {
    if dst.exists() {
        let old = sibling(dst, "old");
        if old.exists() {
            fs::remove_dir_all(&old)?;
        }
        fs::rename(dst, &old).with_context(|| format!("moving aside {}", dst.display()))?;
        fs::rename(src, dst).with_context(|| format!("renaming into {}", dst.display()))?;
        fs::remove_dir_all(&old).ok();
    } else {
        if let Some(p) = dst.parent() {
            fs::create_dir_all(p)?;
        }
        fs::rename(src, dst).with_context(|| format!("renaming into {}", dst.display()))?;
    }
    Ok(())
}

/// The config of a checkpoint directory or GGUF file, without loading its weights.
pub fn load_config_of(path: &Path) -> Result<LlamaConfig> {
    match gguf::gguf_path(path) {
        Some(file) => gguf::Gguf::open(&file)?.config(),
        None => load_config(&path.join(CONFIG)),
    }
}

pub fn load_config(path: &Path) -> Result<LlamaConfig> {
    let text = read_text(path)?;
    let cfg: LlamaConfig = serde_json::from_str(&text).map_err(|e| match e.line() {
        0 => InputError::file(path, format!("invalid config: {e}")), // a refused value, not a syntax error
        line => InputError::line(path, line, format!("invalid config: {e}")),
    })?;
    cfg.validate().map_err(|m| InputError::file(path, m))?;
    Ok(cfg)
}

/// Read a safetensors file as f32 tensors; unreadable or truncated files are input errors.
pub fn load_weights(path: &Path, dev: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(InputError::file(path, "file not found").into());
    }
    let map = candle_core::safetensors::load(path, dev)
        .map_err(|e| InputError::file(path, format!("not a readable safetensors file (truncated or corrupt?): {e}")))?;
    map.into_iter().map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?))).collect()
}
