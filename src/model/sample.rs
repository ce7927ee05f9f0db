//! Batched sampling with a KV cache.
//!
//! Rows of a batch move in lock-step over positions, so every row shares one position
//! index and no padding mask is needed: the shortest prompt is prefilled in one forward
//! pass, then each step feeds one token per row — the row's next prompt token while it is
//! still inside its prompt (teacher forcing), its sampled token afterwards. Each row has
//! its own RNG seeded from (seed, row index), so a prompt's sample does not depend on
//! which other prompts share its batch.

use anyhow::Result;
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::llama::{Capture, KvCache, Llama};
use super::tokenizer::Tok;

/// How to sample answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleConfig {
    /// 0 means greedy.
    #[serde(default = "one")]
    pub temperature: f64,
    /// Nucleus sampling mass; 1.0 disables it.
    #[serde(default = "one")]
    pub top_p: f64,
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
    /// Prompts sampled together in one batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn one() -> f64 {
    1.0
}
fn default_max_new() -> usize {
    64
}
fn default_batch() -> usize {
    128
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, max_new_tokens: default_max_new(), batch_size: default_batch() }
    }
}

/// One sampled continuation: its text (special tokens dropped) and token count.
#[derive(Clone, Debug)]
pub struct Sample {
    pub text: String,
    pub tokens: Vec<u32>,
}

/// Sample one continuation per prompt. `seed` fixes every row's RNG; `on_batch` is called
/// with the number of prompts finished so far (for progress bars).
pub fn generate(
    model: &Llama,
    tok: &Tok,
    prompts: &[String],
    cfg: &SampleConfig,
    seed: u64,
    mut on_batch: impl FnMut(usize),
) -> Result<Vec<Sample>> {
    let mut out = Vec::with_capacity(prompts.len());
    let bs = cfg.batch_size.max(1);
    for (chunk_idx, chunk) in prompts.chunks(bs).enumerate() {
        let encoded = chunk.iter().map(|p| tok.encode(p)).collect::<Result<Vec<_>>>()?;
        let first_row = chunk_idx * bs;
        out.extend(generate_batch(model, tok, &encoded, cfg, seed, first_row)?);
        on_batch(out.len());
    }
    Ok(out)
}

fn row_rng(seed: u64, row: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ (row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Sample token-id continuations for already-tokenized prompts (one batch).
pub fn generate_batch(
    model: &Llama,
    tok: &Tok,
    prompts: &[Vec<u32>],
    cfg: &SampleConfig,
    seed: u64,
    first_row: usize,
) -> Result<Vec<Sample>> {
    generate_batch_observed(model, tok, prompts, cfg, seed, first_row, &mut |_, _| {})
}

/// [`generate_batch`], calling `on_token(row, token)` with each token as soon as it is drawn
/// (the end token included), e.g. to stream answers while the batch is still sampling.
/// The observer sees the tokens; it cannot change them.
pub fn generate_batch_observed(
    model: &Llama,
    tok: &Tok,
    prompts: &[Vec<u32>],
    cfg: &SampleConfig,
    seed: u64,
    first_row: usize,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Vec<Sample>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(vec![]);
    }
    let max_pos = model.cfg.max_position_embeddings;
    // Keep the tail of over-long prompts so prompt + answer fits the context.
    let budget = max_pos.saturating_sub(cfg.max_new_tokens).max(1);
    let prompts: Vec<&[u32]> = prompts
        .iter()
        .map(|p| if p.len() > budget { &p[p.len() - budget..] } else { &p[..] })
        .map(|p| if p.is_empty() { &[][..] } else { p })
        .collect();
    let eos = tok.eos_id;
    // An empty prompt starts from the end-of-turn token, like a fresh document.
    let prompts: Vec<Vec<u32>> = prompts.iter().map(|p| if p.is_empty() { vec![eos] } else { p.to_vec() }).collect();
    let min_len = prompts.iter().map(|p| p.len()).min().unwrap_or(1);
    let mut rngs: Vec<ChaCha8Rng> = (0..b).map(|r| row_rng(seed, first_row + r)).collect();
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done = vec![false; b];

    let dev = model.device();
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(1);
    let mut cache = KvCache::with_capacity(model.cfg.num_hidden_layers, (longest + cfg.max_new_tokens).min(max_pos));
    let prefix: Vec<u32> = prompts.iter().flat_map(|p| p[..min_len].iter().copied()).collect();
    let ids = Tensor::from_vec(prefix, (b, min_len), dev)?;
    let mut logits = model.forward_full(&ids, Some(&mut cache), true, Capture::None)?.logits.squeeze(1)?; // [B,V]
    let mut pos = min_len; // tokens already in the cache
    loop {
        let rows: Vec<Vec<f32>> = logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
        let mut next = Vec::with_capacity(b);
        for r in 0..b {
            let t = if pos < prompts[r].len() {
                prompts[r][pos]
            } else if done[r] {
                eos
            } else {
                let t = sample_token(&rows[r], cfg.temperature, cfg.top_p, &mut rngs[r]);
                generated[r].push(t);
                on_token(r, t);
                if t == eos || generated[r].len() >= cfg.max_new_tokens {
                    done[r] = true;
                }
                t
            };
            next.push(t);
        }
        if done.iter().all(|d| *d) || pos + 1 >= max_pos {
            break;
        }
        let ids = Tensor::from_vec(next, (b, 1), dev)?;
        logits = model.forward_full(&ids, Some(&mut cache), true, Capture::None)?.logits.squeeze(1)?;
        pos += 1;
    }
    generated
        .into_iter()
        .map(|mut g| {
            if g.last() == Some(&eos) {
                g.pop();
            }
            Ok(Sample { text: tok.decode(&g)?, tokens: g })
        })
        .collect()
}

/// Draw one token from logits with temperature and nucleus (top-p) truncation.
pub fn sample_token(logits: &[f32], temperature: f64, top_p: f64, rng: &mut ChaCha8Rng) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let inv_t = (1.0 / temperature) as f32;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp())).collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    if top_p < 1.0 {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p.1 / total;
            if cum >= top_p as f32 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    let mass: f32 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f32>() * mass;
    for &(i, p) in &probs {
        if u < p {
            return i;
        }
        u -= p;
    }
    probs.last().map(|p| p.0).unwrap_or(0)
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}
