//! Tokenizer: a byte-level BPE trained on the experiment's own text with the `tokenizers`
//! crate (the same `tokenizer.json` format HF uses), or loaded from a checkpoint.
//!
//! Byte-level means any UTF-8 input encodes without unknown tokens. `<|endoftext|>` ends
//! every completion during training, so sampling stops on it ("end of turn"). A Hugging
//! Face tokenizer names its own end token (`Tok::load_with`, chosen by `model::hf`).

use anyhow::{anyhow, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, NormalizerWrapper, Tokenizer, TokenizerBuilder};

use super::chat::{self, ChatFormat};
use crate::error::InputError;

pub const EOS: &str = "<|endoftext|>";

/// A tokenizer plus the id of its end-of-turn token.
#[derive(Clone)]
pub struct Tok {
    inner: Tokenizer,
    pub eos_id: u32,
    /// The `tokenizer_config.json` it was loaded with (Hugging Face checkpoints), written
    /// back when the model is saved.
    hf_config: Option<Arc<str>>,
    /// The chat template of `hf_config`, applied by [`Tok::encode`] (see `model::chat`).
    chat: Option<Arc<ChatFormat>>,
}

/// Which token ends a turn, for [`Tok::load_with`]. `Token` and `Id` carry the file that
/// named it, for the error when `tokenizer.json` lacks it.
#[derive(Clone, Debug)]
pub enum EosChoice {
    /// `<|endoftext|>`, the end token of our own tokenizers.
    Default,
    Token(String, PathBuf),
    Id(u32, PathBuf),
}

impl Tok {
    /// Train a byte-level BPE of `vocab_size` tokens on `texts`. Deterministic for the same texts.
    pub fn train<'a>(texts: impl Iterator<Item = &'a str> + Send, vocab_size: usize) -> Result<Self> {
        if !(260..=1 << 20).contains(&vocab_size) {
            return Err(InputError::invalid(format!("vocab_size {vocab_size} out of range (260..=1048576)")).into());
        }
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(2)
            .special_tokens(vec![AddedToken::from(EOS, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let byte_level = ByteLevel::default().add_prefix_space(false);
        let mut tk = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None::<NormalizerWrapper>)
            .with_pre_tokenizer(Some(byte_level))
            .with_post_processor(Some(byte_level))
            .with_decoder(Some(byte_level))
            .build()
            .map_err(|e| anyhow!("building tokenizer: {e}"))?;
        tk.train(&mut trainer, texts).map_err(|e| anyhow!("training tokenizer: {e}"))?;
        Self::from_tokenizer(Tokenizer::from(tk))
    }

    fn from_tokenizer(inner: Tokenizer) -> Result<Self> {
        let eos_id = inner.token_to_id(EOS).ok_or_else(|| anyhow!("tokenizer has no {EOS} token"))?;
        Ok(Self { inner, eos_id, hf_config: None, chat: None })
    }

    /// Load a `tokenizer.json` whose end-of-turn token is `<|endoftext|>` (our own).
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, EosChoice::Default, None)
    }

    /// Load a `tokenizer.json` with the end-of-turn token `eos` (Hugging Face tokenizers
    /// name their own), keeping `hf_config` (the text of `tokenizer_config.json`).
    pub fn load_with(path: &Path, eos: EosChoice, hf_config: Option<String>) -> Result<Self> {
        let text = crate::util::read_text(path)?;
        // JSON syntax first: tokenizers 0.22 panics (`expect("Helper")` in its decoder
        // deserializer) when a syntax error falls inside the "decoder" object, where a
        // syntactically valid document only ever gets an error (found by examples/fuzz.rs).
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .map_err(|e| InputError::file(path, format!("not a valid tokenizer.json: not JSON: {e}")))?;
        let inner =
            Tokenizer::from_bytes(text.as_bytes()).map_err(|e| InputError::file(path, format!("not a valid tokenizer.json: {e}")))?;
        let mut tok = match eos {
            EosChoice::Default => Self::from_tokenizer(inner).map_err(|e| {
                InputError::file(
                    path,
                    format!("{e}, and neither tokenizer_config.json's eos_token nor config.json's eos_token_id names the end token"),
                )
            })?,
            EosChoice::Token(name, from) => {
                let eos_id = inner
                    .token_to_id(&name)
                    .ok_or_else(|| InputError::file(path, format!("has no token {name:?} (the eos_token of {})", from.display())))?;
                Self { inner, eos_id, hf_config: None, chat: None }
            }
            EosChoice::Id(id, from) => {
                if inner.id_to_token(id).is_none() {
                    return Err(
                        InputError::file(path, format!("has no token with id {id} (the eos_token_id of {})", from.display())).into()
                    );
                }
                Self { inner, eos_id: id, hf_config: None, chat: None }
            }
        };
        if let Some(text) = hf_config {
            tok = tok.with_hf_config(text).map_err(|e| InputError::file(path, format!("its tokenizer_config.json: {e}")))?;
        }
        Ok(tok)
    }

    /// A tokenizer built elsewhere (e.g. from GGUF metadata) with its end-of-turn token id
    /// and the `tokenizer_config.json` text to save with it. `Err`: its chat template is
    /// unusable (a message for an input error).
    pub fn from_parts(inner: Tokenizer, eos_id: u32, hf_config: Option<String>) -> std::result::Result<Self, String> {
        let tok = Self { inner, eos_id, hf_config: None, chat: None };
        match hf_config {
            Some(text) => tok.with_hf_config(text),
            None => Ok(tok),
        }
    }

    /// This tokenizer with `text` as its `tokenizer_config.json`, whose `chat_template`
    /// (if any) formats prompts from now on. `Err`: the template is unusable.
    pub fn with_hf_config(mut self, text: String) -> std::result::Result<Self, String> {
        self.chat = chat::from_tokenizer_config(&text).map_err(|e| format!("chat_template: {e}"))?.map(Arc::new);
        self.hf_config = Some(Arc::from(text));
        Ok(self)
    }

    /// This tokenizer without its chat template: prompts stay in the paper's
    /// `Human:` / `Assistant:` format (the template is still saved with the model).
    pub fn without_chat(mut self) -> Self {
        self.chat = None;
        self
    }

    /// The chat format prompts are encoded with, if the checkpoint has a template.
    pub fn chat(&self) -> Option<&ChatFormat> {
        self.chat.as_deref()
    }

    /// The `tokenizer_config.json` text this tokenizer was loaded with, if any.
    pub fn hf_config(&self) -> Option<&str> {
        self.hf_config.as_deref()
    }

    /// The text of token `id` (special tokens included), if it exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(|e| anyhow!("serializing tokenizer: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`. With a chat template, the paper's turn markers in `text` are
    /// first rewritten into the template's (see `model::chat`), so every prompt the
    /// project builds reaches an instruct model in the format it was tuned on.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.chat {
            Some(chat) => self.encode_raw(&chat.rewrite(text)),
            None => self.encode_raw(text),
        }
    }

    /// Token ids of `text` exactly as written (special-token strings become their tokens).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().to_vec())
    }

    /// Decode, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| anyhow!("detokenizing: {e}"))
    }
}
