//! The decoder: one Llama-form transformer, readable top to bottom.
//!
//! RMSNorm, rotary position embeddings (HF's non-interleaved "rotate_half" layout), SwiGLU
//! MLP, grouped-query attention, optional tied embeddings and optional q/k/v biases (Qwen2).
//! Tensor names and the `config.json` schema are Hugging Face's, so a checkpoint we write
//! loads in `transformers.LlamaForCausalLM` and an HF checkpoint of this shape loads here.
//!
//! Every op on the training path is one that candle can differentiate. candle's fused
//! `rms_norm`, `softmax_last_dim`, `rope` and `sdpa` kernels have no backward pass and
//! silently drop gradients (DESIGN.md, "Known traps"). Two paths compute the same thing:
//! - the fused path (CPU, f32, the default there): our own kernels in `kernels.rs`, each a
//!   custom op with an analytic backward (RMSNorm, rotary, causal attention, SwiGLU), and
//!   a plain-vector KV-cache path for sampling;
//! - the composite path (other devices and dtypes, or `set_fused(false)`): norms, rotary
//!   and softmax written as differentiable candle compositions.
//!
//! `tests/kernels.rs` checks that both agree (values, gradients, a short loss curve) and
//! `tests/model.rs` that every weight learns.
//!
//! Shapes: B = batch, T = new tokens, S = keys (cache + new), D = hidden, H = heads,
//! K = kv heads, E = head dim, V = vocab.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};

use super::decode::{self, RawKv};
use super::kernels::{self, RopeTables};
use serde::{Deserialize, Serialize};

/// Model hyper-parameters; field names follow HF `LlamaConfig` so `config.json` round-trips.
///
/// Deserializing reads any Llama-family `config.json` through [`super::hf::HfConfig`]
/// (Llama, SmolLM, Qwen2, Mistral; extra keys ignored, unsupported variants refused with
/// a message), so our own configs and Hugging Face's load the same way.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "super::hf::HfConfig")]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// Qwen2-style biases on q/k/v projections.
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Reject configs that would crash or exhaust memory later, with a message a user can act on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let c = self;
        if c.vocab_size == 0 || c.hidden_size == 0 || c.num_hidden_layers == 0 || c.num_attention_heads == 0 {
            return Err("vocab_size, hidden_size, num_hidden_layers and num_attention_heads must be > 0".into());
        }
        if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(format!("hidden_size {} is not divisible by num_attention_heads {}", c.hidden_size, c.num_attention_heads));
        }
        if !c.head_dim().is_multiple_of(2) {
            return Err(format!("head dim {} must be even for rotary embeddings", c.head_dim()));
        }
        let kv = c.kv_heads();
        if kv == 0 || !c.num_attention_heads.is_multiple_of(kv) {
            return Err(format!("num_attention_heads {} is not a multiple of num_key_value_heads {kv}", c.num_attention_heads));
        }
        if c.max_position_embeddings == 0 || c.max_position_embeddings > 1 << 20 {
            return Err(format!("max_position_embeddings {} is out of range", c.max_position_embeddings));
        }
        let params = self.num_parameters() as f64;
        if params > 20e9 {
            return Err(format!("model would have {params:.3e} parameters; refusing (limit 2e10)"));
        }
        Ok(())
    }

    /// Parameter count (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let (d, f, v, l) = (self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers);
        let kvd = self.kv_heads() * self.head_dim();
        let bias = if self.attention_bias { d + 2 * kvd } else { 0 };
        let per_layer = d * d + 2 * d * kvd + d * d + 3 * d * f + 2 * d + bias;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        v * d + l * per_layer + d + head
    }

    /// The `config.json` we write: our fields plus the HF keys `transformers` needs to load it.
    /// With q/k/v biases the model is a Qwen2 (HF Llama's `attention_bias` would also put a
    /// bias on o_proj), so it is written as one.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            let (arch, kind) = if self.attention_bias { ("Qwen2ForCausalLM", "qwen2") } else { ("LlamaForCausalLM", "llama") };
            o.insert("num_key_value_heads".into(), self.kv_heads().into());
            o.insert("architectures".into(), serde_json::json!([arch]));
            o.insert("model_type".into(), kind.into());
            if self.attention_bias {
                o.insert("use_sliding_window".into(), false.into());
            }
            o.insert("hidden_act".into(), "silu".into());
            o.insert("torch_dtype".into(), "float32".into());
            o.insert("mlp_bias".into(), false.into());
        }
        v
    }
}

/// RMSNorm as a differentiable composition: x * rsqrt(mean(x^2) + eps) * w.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?, eps })
    }
}

impl RmsNorm {
    fn forward_fused(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        if fused && kernels::fused_ok(x) {
            return kernels::rms_norm(x, &self.weight, self.eps);
        }
        self.forward(x)
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // [.., 1]
        let inv = (ms + self.eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv)?.broadcast_mul(&self.weight)
    }
}

/// Precomputed rotary tables, [max_pos, E] each (the half-table repeated twice, HF layout).
#[derive(Clone, Debug)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(cfg: &LlamaConfig, dev: &Device) -> Result<Self> {
        let e = cfg.head_dim();
        let inv: Vec<f32> = (0..e / 2).map(|i| 1.0 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / e as f32)).collect();
        let inv = Tensor::new(inv, dev)?.reshape((1, e / 2))?;
        let pos = Tensor::arange(0u32, cfg.max_position_embeddings as u32, dev)?.to_dtype(DType::F32)?;
        let freqs = pos.reshape((cfg.max_position_embeddings, 1))?.broadcast_mul(&inv)?; // [P, E/2]
        let freqs = Tensor::cat(&[&freqs, &freqs], 1)?; // [P, E]
        Ok(Self { cos: freqs.cos()?, sin: freqs.sin()? })
    }

    /// x: [B, H, T, E] at positions start..start+T.
    fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (_, _, t, e) = x.dims4()?;
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        let x1 = x.narrow(D::Minus1, 0, e / 2)?;
        let x2 = x.narrow(D::Minus1, e / 2, e / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

/// Keys and values of earlier positions, one entry per layer. The composite path keeps
/// tensors ([B, K, S, E], [B, K, S, E]); the fused CPU path keeps preallocated vectors
/// written in place (`RawKv`), so a decode step never re-concatenates the cache. Which
/// one fills is decided by the model on first use; a cache is tied to one model.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    raw: Vec<RawKv>,
    work: decode::Workspace,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self { layers: vec![None; n_layers], raw: vec![RawKv::default(); n_layers], work: Default::default() }
    }
    /// A cache that allocates room for `positions` on first use instead of growing
    /// (growing copies the cache and touches fresh pages; sampling knows its length).
    pub fn with_capacity(n_layers: usize, positions: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            raw: vec![RawKv { hint: positions, ..Default::default() }; n_layers],
            work: Default::default(),
        }
    }
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        if let Some(r) = self.raw.first().filter(|r| r.len > 0) {
            return r.len;
        }
        self.layers.first().and_then(|l| l.as_ref()).map(|(k, _)| k.dim(2).unwrap_or(0)).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
}

/// A projection `y = x·Wᵀ (+ b)` (HF layout: W [out, in]), optionally plus an unmerged
/// low-rank update `s·(x·Aᵀ)·Bᵀ`: LoRA training runs on a view whose adapted matrices are
/// the frozen base W0 with the update kept apart (`Lora::training_view`), so the backward
/// pass forms gradients for A and B only and never the full [out, in] gradient of W.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    low_rank: Option<LowRank>,
}

/// The update `s·B·A` of a LoRA-adapted projection: A [r, in], B [out, r].
#[derive(Clone, Debug)]
pub struct LowRank {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, low_rank: None }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `s·(x·Aᵀ)·Bᵀ` for 2-D x through candle ops (the composite path; the fused path
    /// runs the whole adapted projection as `kernels::lora_linear`).
    fn low_rank_term(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(lr) = &self.low_rank else { return Ok(None) };
        let h = x.matmul(&lr.a.t()?)?; // [N, r]
        Ok(Some((h.matmul(&lr.b.t()?)? * lr.scale)?)) // [N, out]
    }
}

fn linear(inp: usize, out: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let init = candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 };
    let w = vb.get_with_hints((out, inp), "weight", init)?;
    let b = if bias { Some(vb.get_with_hints(out, "bias", candle_nn::Init::Const(0.0))?) } else { None };
    Ok(Linear::new(w, b))
}

/// A linear layer applied as one 2-D matrix multiply over all B·T rows. candle's
/// `Linear` on a 3-D input broadcasts the weight into a batched matmul, whose backward
/// materialises a [B, out, in] weight gradient and then sums it; flattening avoids both.
fn lin(l: &Linear, x: &Tensor) -> Result<Tensor> {
    let w = l.weight();
    let dims = x.dims().to_vec();
    let (inp, out) = (dims[dims.len() - 1], w.dim(0)?);
    let rows = x.elem_count() / inp.max(1);
    let x2 = x.reshape((rows, inp))?;
    let y = x2.matmul(&w.t()?)?;
    let y = match l.low_rank_term(&x2)? {
        Some(d) => (y + d)?,
        None => y,
    };
    let y = match l.bias() {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut od = dims;
    if let Some(last) = od.last_mut() {
        *last = out;
    }
    y.reshape(od)
}

/// A linear layer on 2-D x [N, in] through the fused op (one graph node, contiguous
/// weight gradient).
fn flin(l: &Linear, x: &Tensor) -> Result<Tensor> {
    let y = match &l.low_rank {
        Some(lr) => kernels::lora_linear(x, l.weight(), &lr.a, &lr.b, lr.scale)?,
        None => kernels::linear(x, l.weight())?,
    };
    match l.bias() {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

impl Attention {
    /// Fused training/scoring path without a cache, on the 2-D residual stream x [B·T, D]:
    /// q/k/v stay in projection layout [B·T, heads·E], so nothing is transposed or copied
    /// and no reshape nodes enter the autograd graph.
    fn forward_fused(&self, x: &Tensor, b: usize, t: usize, tables: &RopeTables) -> Result<Tensor> {
        let (h, k, e) = (self.n_heads, self.n_kv, self.head_dim);
        let q = kernels::rope_flat(&flin(&self.q_proj, x)?, [b, t, h, e], tables, 0)?;
        let kk = kernels::rope_flat(&flin(&self.k_proj, x)?, [b, t, k, e], tables, 0)?;
        let v = flin(&self.v_proj, x)?;
        let y = kernels::causal_attention_flat(&q, &kk, &v, 1.0 / (e as f32).sqrt(), b, t, h, k, e)?;
        flin(&self.o_proj, &y)
    }

    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (d, e, h, k) = (cfg.hidden_size, cfg.head_dim(), cfg.num_attention_heads, cfg.kv_heads());
        Ok(Self {
            q_proj: linear(d, h * e, cfg.attention_bias, vb.pp("q_proj"))?,
            k_proj: linear(d, k * e, cfg.attention_bias, vb.pp("k_proj"))?,
            v_proj: linear(d, k * e, cfg.attention_bias, vb.pp("v_proj"))?,
            o_proj: linear(h * e, d, false, vb.pp("o_proj"))?,
            n_heads: h,
            n_kv: k,
            head_dim: e,
        })
    }

    /// x: [B, T, D] at positions start..start+T -> [B, T, D]. Appends to `cache` when given.
    fn forward(
        &self,
        x: &Tensor,
        start: usize,
        rot: &Rotary,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, k, e) = (self.n_heads, self.n_kv, self.head_dim);
        let q = lin(&self.q_proj, x)?.reshape((b, t, h, e))?.transpose(1, 2)?.contiguous()?; // [B,H,T,E]
        let kk = lin(&self.k_proj, x)?.reshape((b, t, k, e))?.transpose(1, 2)?.contiguous()?; // [B,K,T,E]
        let v = lin(&self.v_proj, x)?.reshape((b, t, k, e))?.transpose(1, 2)?.contiguous()?; // [B,K,T,E]
        let q = rot.apply(&q, start)?;
        let mut kk = rot.apply(&kk, start)?;
        let mut v = v;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                kk = Tensor::cat(&[pk, &kk], 2)?; // [B,K,S,E]
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((kk.clone(), v.clone()));
        }
        let s = kk.dim(2)?;
        // Grouped-query attention: each kv head serves h/k query heads.
        let (kk, v) = if h != k {
            let rep = h / k;
            let expand = |x: &Tensor| -> Result<Tensor> { x.unsqueeze(2)?.broadcast_as((b, k, rep, s, e))?.reshape((b, h, s, e)) };
            (expand(&kk)?, expand(&v)?)
        } else {
            (kk, v)
        };
        let scale = 1.0 / (e as f64).sqrt();
        let att = (q.matmul(&kk.t()?)? * scale)?; // [B,H,T,S]
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let y = att.matmul(&v.contiguous()?)?; // [B,H,T,E]
        let y = y.transpose(1, 2)?.reshape((b, t, h * e))?;
        lin(&self.o_proj, &y)
    }
}

#[derive(Clone, Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear(d, f, false, vb.pp("gate_proj"))?,
            up_proj: linear(d, f, false, vb.pp("up_proj"))?,
            down_proj: linear(f, d, false, vb.pp("down_proj"))?,
        })
    }
}

impl Mlp {
    fn forward_fused(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        if fused && kernels::fused_ok(x) && x.rank() == 2 {
            let a = kernels::swiglu(&flin(&self.gate_proj, x)?, &flin(&self.up_proj, x)?)?;
            return flin(&self.down_proj, &a);
        }
        self.forward(x)
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = lin(&self.gate_proj, x)?.silu()?;
        lin(&self.down_proj, &(g * lin(&self.up_proj, x)?)?)
    }
}

#[derive(Clone, Debug)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }
}

/// The whole causal LM. Weight names: `model.embed_tokens.weight`,
/// `model.layers.{i}.{self_attn.{q,k,v,o}_proj,mlp.{gate,up,down}_proj,input_layernorm,post_attention_layernorm}.weight`,
/// `model.norm.weight`, `lm_head.weight` (absent when tied).
#[derive(Clone, Debug)]
pub struct Llama {
    pub cfg: LlamaConfig,
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    tables: RopeTables,
    /// Use the fused CPU kernels when the device and dtype allow (default true).
    fused: bool,
    device: Device,
}

/// What `forward` should hand back besides logits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Capture {
    #[default]
    None,
    /// The residual stream entering every layer plus the final one (L + 1 tensors of [B, T, D]).
    Residuals,
}

/// Logits for the requested positions and, with `Capture::Residuals`, the residual stream.
pub struct ForwardOut {
    /// [B, T, V] (all positions) or [B, 1, V] when only the last position was requested.
    pub logits: Tensor,
    /// residuals[0] = embeddings, residuals[i] = output of layer i-1; each [B, T, D].
    pub residuals: Vec<Tensor>,
}

impl Llama {
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        kernels::tune_runtime();
        let device = vb.device().clone();
        let vm = vb.pp("model");
        let emb = vm.pp("embed_tokens").get_with_hints(
            (cfg.vocab_size, cfg.hidden_size),
            "weight",
            candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 },
        )?;
        let embed_tokens = Embedding::new(emb.clone(), cfg.hidden_size);
        let layers = (0..cfg.num_hidden_layers).map(|i| Block::new(cfg, vm.pp("layers").pp(i))).collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vm.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(emb, None)
        } else {
            linear(cfg.hidden_size, cfg.vocab_size, false, vb.pp("lm_head"))?
        };
        let tables = RopeTables::new(cfg.head_dim(), cfg.max_position_embeddings, cfg.rope_theta);
        Ok(Self { cfg: cfg.clone(), embed_tokens, layers, norm, lm_head, rotary: Rotary::new(cfg, &device)?, tables, fused: true, device })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The same model with every weight detached from autograd (storage shared, nothing
    /// copied): a backward pass through it computes gradients for its input only. For
    /// callers that differentiate with respect to the input (trigger inversion): with the
    /// weights tracked, every layer's backward also forms the weight gradients, about half
    /// of the backward's arithmetic, which those callers then throw away.
    pub fn frozen(&self) -> Llama {
        self.frozen_with_low_rank(|_| None)
    }

    /// [`Llama::frozen`], where each projection whose weight `adapt` maps to
    /// `Some((W0, update))` computes `x·W0ᵀ + s·(x·Aᵀ)·Bᵀ` instead (W0 frozen; A and B as
    /// given, so they get gradients when they are Vars). LoRA training's view of a model.
    pub fn frozen_with_low_rank(&self, adapt: impl Fn(&Tensor) -> Option<(Tensor, LowRank)>) -> Llama {
        let det = |t: &Tensor| t.detach();
        let lin = |l: &Linear| match adapt(l.weight()) {
            Some((base, low_rank)) => Linear { weight: base.detach(), bias: l.bias().map(det), low_rank: Some(low_rank) },
            None => Linear { weight: det(l.weight()), bias: l.bias().map(det), low_rank: l.low_rank.clone() },
        };
        let norm = |n: &RmsNorm| RmsNorm { weight: det(&n.weight), eps: n.eps };
        let layers = self
            .layers
            .iter()
            .map(|b| Block {
                input_layernorm: norm(&b.input_layernorm),
                self_attn: Attention {
                    q_proj: lin(&b.self_attn.q_proj),
                    k_proj: lin(&b.self_attn.k_proj),
                    v_proj: lin(&b.self_attn.v_proj),
                    o_proj: lin(&b.self_attn.o_proj),
                    ..b.self_attn.clone()
                },
                post_attention_layernorm: norm(&b.post_attention_layernorm),
                mlp: Mlp { gate_proj: lin(&b.mlp.gate_proj), up_proj: lin(&b.mlp.up_proj), down_proj: lin(&b.mlp.down_proj) },
            })
            .collect();
        Llama {
            embed_tokens: Embedding::new(det(self.embed_tokens.embeddings()), self.cfg.hidden_size),
            layers,
            norm: norm(&self.norm),
            lm_head: lin(&self.lm_head),
            ..self.clone()
        }
    }

    /// Choose the fused CPU kernels (true, the default) or the composite candle ops
    /// (false). Both compute the same function; tests compare them, and the composite
    /// path is what runs on other devices and dtypes regardless of this switch.
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on;
    }

    /// Whether the fused path runs for input `x`.
    fn use_fused(&self, x: &Tensor) -> bool {
        self.fused && kernels::fused_ok(x)
    }

    /// Whether every weight is a contiguous CPU f32 tensor (the plain-vector path reads
    /// them in place).
    fn raw_ok(&self, x: &Tensor) -> bool {
        let lin_ok = |l: &Linear| {
            l.low_rank.is_none() && kernels::fused_ok(l.weight()) && l.weight().is_contiguous() && l.bias().is_none_or(kernels::fused_ok)
        };
        self.use_fused(x)
            && lin_ok(&self.lm_head)
            && kernels::fused_ok(&self.norm.weight)
            && self.layers.iter().all(|l| {
                let a = &l.self_attn;
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj].into_iter().all(lin_ok)
            })
    }

    /// The inference forward with a KV cache on plain vectors (`decode.rs`; no
    /// autograd: gradients do not flow through this path, which only sampling uses).
    fn forward_cached_raw(&self, x: &Tensor, cache: &mut KvCache, last_only: bool, capture: Capture) -> Result<ForwardOut> {
        let (b, t, d) = x.dims3()?;
        if cache.raw.len() != self.layers.len() || cache.layers.iter().any(|l| l.is_some()) {
            candle_core::bail!("kv cache was built for a different model or path");
        }
        let xs = kernels::to_vec(x)?;
        // Borrow every weight in place for the duration of the call.
        let mut tensors: Vec<&Tensor> = vec![&self.norm.weight, self.lm_head.weight()];
        for l in &self.layers {
            let (a, p) = (&l.self_attn, &l.mlp);
            tensors.extend([&l.input_layernorm.weight, a.q_proj.weight(), a.k_proj.weight(), a.v_proj.weight(), a.o_proj.weight()]);
            tensors.extend([&l.post_attention_layernorm.weight, p.gate_proj.weight(), p.up_proj.weight(), p.down_proj.weight()]);
            for bias in [a.q_proj.bias(), a.k_proj.bias(), a.v_proj.bias()].into_iter().flatten() {
                tensors.push(bias);
            }
        }
        let views = tensors.iter().map(|t| kernels::view(t)).collect::<Result<Vec<_>>>()?;
        let mut next = views.iter().map(|v| v.s());
        let mut take = || next.next().unwrap_or(&[]);
        let (norm, lm_head) = (take(), take());
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let a = &l.self_attn;
            let (ln1, q, k, v, o, ln2, gate, up, down) = (take(), take(), take(), take(), take(), take(), take(), take(), take());
            let mut bias = |has: bool| if has { Some(take()) } else { None };
            let (q_bias, k_bias, v_bias) =
                (bias(a.q_proj.bias().is_some()), bias(a.k_proj.bias().is_some()), bias(a.v_proj.bias().is_some()));
            layers.push(decode::LayerWeights { ln1, q, k, v, q_bias, k_bias, v_bias, o, ln2, gate, up, down });
        }
        let c = &self.cfg;
        let w = decode::Weights {
            layers,
            norm,
            lm_head,
            eps: c.rms_norm_eps as f32,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: c.head_dim(),
            vocab: c.vocab_size,
        };
        let out = decode::forward(
            &decode::Step {
                weights: &w,
                tables: &self.tables,
                max_pos: c.max_position_embeddings,
                last_only,
                capture: capture == Capture::Residuals,
                isa: super::isa::active(),
            },
            xs,
            b,
            t,
            &mut cache.raw,
            &mut cache.work,
        )?;
        let tt = if last_only { 1 } else { t };
        let residuals = out.residuals.into_iter().map(|r| Tensor::from_vec(r, (b, t, d), &self.device)).collect::<Result<Vec<_>>>()?;
        Ok(ForwardOut { logits: Tensor::from_vec(out.logits, (b, tt, c.vocab_size), &self.device)?, residuals })
    }

    /// Additive causal mask [T, S] for T new tokens after `past` cached ones.
    fn causal_mask(&self, t: usize, past: usize) -> Result<Tensor> {
        let s = past + t;
        let mask: Vec<f32> = (0..t).flat_map(|i| (0..s).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })).collect();
        Tensor::from_vec(mask, (t, s), &self.device)
    }

    /// ids: [B, T] u32 tokens at positions start..start+T (start = cache length when a cache
    /// is given, else 0). `last_only` computes logits for the final position alone (sampling).
    pub fn forward_full(&self, ids: &Tensor, cache: Option<&mut KvCache>, last_only: bool, capture: Capture) -> Result<ForwardOut> {
        let x = self.embed_tokens.forward(ids)?; // [B,T,D]
        self.forward_embeds(&x, cache, last_only, capture)
    }

    /// Token embeddings [B, T, D] for ids [B, T] (the input `forward_embeds` takes).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// The embedding matrix [V, D] (for gradient-guided input search over one-hot tokens).
    pub fn embedding_matrix(&self) -> &Tensor {
        self.embed_tokens.embeddings()
    }

    /// Like `forward_full`, from input embeddings [B, T, D] instead of ids, so callers can
    /// differentiate with respect to the input (trigger inversion).
    pub fn forward_embeds(&self, x: &Tensor, mut cache: Option<&mut KvCache>, last_only: bool, capture: Capture) -> Result<ForwardOut> {
        let (_, t, _) = x.dims3()?;
        let start = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        if start + t > self.cfg.max_position_embeddings {
            candle_core::bail!("sequence of {} tokens exceeds max_position_embeddings {}", start + t, self.cfg.max_position_embeddings);
        }
        if let Some(c) = cache.as_mut() {
            if self.raw_ok(x) && c.layers.iter().all(|l| l.is_none()) {
                return self.forward_cached_raw(x, c, last_only, capture);
            }
        }
        let fused = cache.is_none() && self.use_fused(x);
        if fused {
            return self.forward_fused(x, last_only, capture);
        }
        let mask = if t > 1 { Some(self.causal_mask(t, start)?) } else { None };
        let mut x = x.clone();
        let mut residuals = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            if capture == Capture::Residuals {
                residuals.push(x.clone());
            }
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            let h = layer.self_attn.forward(&layer.input_layernorm.forward(&x)?, start, &self.rotary, mask.as_ref(), slot)?;
            x = (x + h)?;
            x = (&x + layer.mlp.forward(&layer.post_attention_layernorm.forward(&x)?)?)?;
        }
        if capture == Capture::Residuals {
            residuals.push(x.clone());
        }
        let x = if last_only { x.i((.., t - 1..t, ..))? } else { x };
        let logits = lin(&self.lm_head, &self.norm.forward(&x)?)?;
        Ok(ForwardOut { logits, residuals })
    }

    /// The fused training path (no cache): the residual stream is kept 2-D [B·T, D] so
    /// every op is one graph node (candle's backward allocates, zeroes and adds a gradient
    /// buffer per node, so fewer nodes is directly less work).
    fn forward_fused(&self, x: &Tensor, last_only: bool, capture: Capture) -> Result<ForwardOut> {
        let (b, t, d) = x.dims3()?;
        let mut x = x.reshape((b * t, d))?;
        let mut residuals = Vec::new();
        for layer in &self.layers {
            if capture == Capture::Residuals {
                residuals.push(x.reshape((b, t, d))?);
            }
            let h = layer.self_attn.forward_fused(&layer.input_layernorm.forward_fused(&x, true)?, b, t, &self.tables)?;
            x = (x + h)?;
            x = (&x + layer.mlp.forward_fused(&layer.post_attention_layernorm.forward_fused(&x, true)?, true)?)?;
        }
        if capture == Capture::Residuals {
            residuals.push(x.reshape((b, t, d))?);
        }
        let (x, tt) = if last_only { (x.reshape((b, t, d))?.i((.., t - 1, ..))?, 1) } else { (x, t) };
        let logits = flin(&self.lm_head, &self.norm.forward_fused(&x, true)?)?;
        Ok(ForwardOut { logits: logits.reshape((b, tt, self.cfg.vocab_size))?, residuals })
    }

    /// Logits [B, T, V] for a batch of token ids [B, T] (training path, no cache).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.forward_full(ids, None, false, Capture::None)?.logits)
    }
}
