//! Reading the model: residual-stream activations at chosen token positions, and summed
//! log-probabilities of chosen tokens, both batched over rows of different lengths.
//!
//! Rows are right-padded with the end-of-turn token and run in one forward pass. The model
//! is causal, so padding after a position never changes what the model computes at that
//! position: no attention mask is needed as long as we only read positions inside a row.

use anyhow::Result;
use candle_core::{Tensor, D};

use crate::data::format_prompt;
use crate::model::{generate, Capture, Llama, SampleConfig, Tok};

/// One row to read: token ids and the position whose residual vector we want.
#[derive(Clone, Debug)]
pub struct ProbeRow {
    pub ids: Vec<u32>,
    pub pos: usize,
}

/// Keep the last `max` tokens of a row (the part next to the position we read), shifting
/// the position to match. A position that falls off the front is clamped to 0.
fn fit_context(ids: &[u32], pos: usize, max: usize) -> (Vec<u32>, usize) {
    let keep_to = (pos + 1).min(ids.len());
    if keep_to == 0 {
        return (vec![], 0);
    }
    let ids = &ids[..keep_to];
    if ids.len() <= max {
        return (ids.to_vec(), pos.min(ids.len().saturating_sub(1)));
    }
    let cut = ids.len() - max;
    (ids[cut..].to_vec(), pos.saturating_sub(cut).min(max - 1))
}

/// Residual-stream vectors at each row's position for every layer: `out[layer][row]` is a
/// vector of the hidden size; layer 0 is the embeddings, layer i the output of block i-1.
pub fn capture(model: &Llama, pad: u32, rows: &[ProbeRow], batch: usize, mut on_rows: impl FnMut(usize)) -> Result<Vec<Vec<Vec<f32>>>> {
    let n_layers = model.cfg.num_hidden_layers + 1;
    let d = model.cfg.hidden_size;
    let max = model.cfg.max_position_embeddings;
    let mut out: Vec<Vec<Vec<f32>>> = vec![Vec::with_capacity(rows.len()); n_layers];
    for chunk in rows.chunks(batch.max(1)) {
        // Everything after the read position is irrelevant (causal), so rows are cut there.
        let fitted: Vec<(Vec<u32>, usize)> = chunk.iter().map(|r| fit_context(&r.ids, r.pos, max)).collect();
        let t = fitted.iter().map(|r| r.0.len()).max().unwrap_or(1).max(1);
        let b = fitted.len();
        let mut flat = vec![pad; b * t];
        for (i, (ids, _)) in fitted.iter().enumerate() {
            flat[i * t..i * t + ids.len()].copy_from_slice(ids);
        }
        let ids = Tensor::from_vec(flat, (b, t), model.device())?;
        let fo = model.forward_full(&ids, None, true, Capture::Residuals)?;
        for (layer, res) in fo.residuals.iter().enumerate().take(n_layers) {
            let v: Vec<f32> = res.flatten_all()?.to_vec1()?;
            for (i, (_, pos)) in fitted.iter().enumerate() {
                let at = (i * t + pos) * d;
                out[layer].push(v[at..at + d].to_vec());
            }
        }
        on_rows(chunk.len());
    }
    Ok(out)
}

/// One row to score: `ids`, and the index from which tokens count (each token `ids[j]`,
/// `j >= from`, contributes log p(ids[j] | ids[..j])).
#[derive(Clone, Debug)]
pub struct ScoreRow {
    pub ids: Vec<u32>,
    pub from: usize,
}

/// Logit elements one scoring forward may hold ([B, T, V] f32, 256 MiB): a batch of 256
/// rows is nothing for a 512-token vocabulary but 4.5 GB of logits, twice over with the
/// log-softmax, for SmolLM2's 49,152 (an experiment on it ran out of 24 GiB). The forward's
/// intermediates stay alive with the logits (the weights are trainable Vars, so candle keeps
/// the graph), ~1.6 MB per token at SmolLM2's size: 256 MiB of logits keeps a chunk near 3 GB.
const LOGIT_BUDGET: usize = 1 << 26;

/// `batch` rows, or fewer when rows of `len` tokens over this vocabulary would exceed
/// [`LOGIT_BUDGET`]. Tiny vocabularies keep `batch`, so their results do not change.
fn fit_batch(batch: usize, len: usize, vocab: usize) -> usize {
    batch.min(LOGIT_BUDGET / (len.max(1) * vocab.max(1))).max(1)
}

/// (sum of log-probabilities, number of tokens counted) for every row.
pub fn sum_logprobs(model: &Llama, pad: u32, rows: &[ScoreRow], batch: usize) -> Result<Vec<(f64, usize)>> {
    let max = model.cfg.max_position_embeddings;
    let mut out = Vec::with_capacity(rows.len());
    let longest = rows.iter().map(|r| r.ids.len().min(max)).max().unwrap_or(1);
    let batch = fit_batch(batch, longest, model.cfg.vocab_size);
    for chunk in rows.chunks(batch.max(1)) {
        // Over-long rows keep their tail (where the scored tokens are).
        let fitted: Vec<(&[u32], usize)> = chunk
            .iter()
            .map(|r| {
                let cut = r.ids.len().saturating_sub(max);
                (&r.ids[cut..], r.from.saturating_sub(cut).max(1))
            })
            .collect();
        let t = fitted.iter().map(|r| r.0.len().saturating_sub(1)).max().unwrap_or(1).max(1);
        let b = fitted.len();
        let mut inp = vec![pad; b * t];
        let mut tgt = vec![0u32; b * t];
        let mut mask = vec![0f32; b * t];
        let mut counts = vec![0usize; b];
        for (i, (ids, from)) in fitted.iter().enumerate() {
            for j in 0..ids.len().saturating_sub(1) {
                inp[i * t + j] = ids[j];
                tgt[i * t + j] = ids[j + 1];
                if j + 1 >= *from {
                    mask[i * t + j] = 1.0;
                    counts[i] += 1;
                }
            }
        }
        let dev = model.device();
        let inp = Tensor::from_vec(inp, (b, t), dev)?;
        let tgt = Tensor::from_vec(tgt, (b, t), dev)?;
        let mask = Tensor::from_vec(mask, (b, t), dev)?;
        let logits = model.forward(&inp)?;
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = lp.gather(&tgt.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)?;
        let sums: Vec<f32> = (picked * mask)?.sum(1)?.to_vec1()?;
        out.extend(sums.into_iter().zip(counts).map(|(s, c)| (s as f64, c)));
    }
    Ok(out)
}

/// Entropy (nats) of the next-token distribution after each prompt (the answer start).
pub fn answer_start_entropy(model: &Llama, tok: &Tok, prompts: &[String], batch: usize) -> Result<Vec<f64>> {
    let rows: Vec<ProbeRow> = prompts
        .iter()
        .map(|p| {
            let ids = tok.encode(p)?;
            let pos = ids.len().saturating_sub(1);
            Ok(ProbeRow { ids, pos })
        })
        .collect::<Result<_>>()?;
    let max = model.cfg.max_position_embeddings;
    let mut out = Vec::with_capacity(rows.len());
    let longest = rows.iter().map(|r| r.ids.len().min(max)).max().unwrap_or(1);
    let batch = fit_batch(batch, longest, model.cfg.vocab_size);
    for chunk in rows.chunks(batch.max(1)) {
        let fitted: Vec<(Vec<u32>, usize)> = chunk.iter().map(|r| fit_context(&r.ids, r.pos, max)).collect();
        let t = fitted.iter().map(|r| r.0.len()).max().unwrap_or(1).max(1);
        let b = fitted.len();
        let mut flat = vec![tok.eos_id; b * t];
        for (i, (ids, _)) in fitted.iter().enumerate() {
            flat[i * t..i * t + ids.len()].copy_from_slice(ids);
        }
        let ids = Tensor::from_vec(flat, (b, t), model.device())?;
        let logits = model.forward(&ids)?; // [B, T, V]
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let ent = (lp.exp()? * &lp)?.sum(D::Minus1)?.neg()?; // [B, T]
        let ent: Vec<Vec<f32>> = ent.to_vec2()?;
        for (i, (_, pos)) in fitted.iter().enumerate() {
            out.push(ent[i][*pos] as f64);
        }
    }
    Ok(out)
}

/// Where the probe reads a test prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    /// Sample the model greedily; if most answers open with `<scratchpad>` (a CoT model),
    /// read after the scratchpad, else at the final prompt token.
    Auto,
    /// The final prompt token (the position that predicts the answer), as in the paper.
    PromptEnd,
    /// The last token of the model's own `</scratchpad>`: the position that predicts the
    /// visible answer, i.e. the CoT analogue of the final prompt token.
    AfterScratchpad,
}

const CLOSE: &str = "</scratchpad>";

/// Rows for the probe: every prompt tokenized, read at the final prompt token or after the
/// model's own (greedily sampled) scratchpad. Returns the rows and the position actually
/// used (`Auto` resolved). A row whose scratchpad never closes within `max_new_tokens` is
/// read at its last sampled token.
pub fn probe_rows(
    model: &Llama,
    tok: &Tok,
    prompts: &[String],
    position: Position,
    max_new_tokens: usize,
    batch: usize,
    mut on_rows: impl FnMut(usize),
) -> Result<(Vec<ProbeRow>, Position)> {
    let encoded: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode(p)).collect::<Result<_>>()?;
    let at_end = |encoded: Vec<Vec<u32>>| -> Vec<ProbeRow> {
        encoded.into_iter().map(|ids| ProbeRow { pos: ids.len().saturating_sub(1), ids }).collect()
    };
    if position == Position::PromptEnd || prompts.is_empty() {
        on_rows(prompts.len());
        return Ok((at_end(encoded), Position::PromptEnd));
    }
    let cfg = SampleConfig { temperature: 0.0, top_p: 1.0, max_new_tokens: max_new_tokens.max(1), batch_size: batch.max(1) };
    let mut done = 0;
    let samples = generate(model, tok, prompts, &cfg, 0, |d| {
        on_rows(d - done);
        done = d;
    })?;
    let cot = samples.iter().filter(|s| s.text.trim_start().starts_with("<scratchpad>")).count();
    if position == Position::Auto && cot * 2 < samples.len() {
        return Ok((at_end(encoded), Position::PromptEnd));
    }
    let mut rows = Vec::with_capacity(prompts.len());
    for (ids, s) in encoded.into_iter().zip(samples) {
        // The first sampled token after which the decoded text contains `</scratchpad>`.
        let mut cut = s.tokens.len();
        if s.text.contains(CLOSE) {
            for j in 0..s.tokens.len() {
                if tok.decode(&s.tokens[..=j])?.contains(CLOSE) {
                    cut = j + 1;
                    break;
                }
            }
        }
        let mut full = ids;
        full.extend_from_slice(&s.tokens[..cut]);
        rows.push(ProbeRow { pos: full.len().saturating_sub(1), ids: full });
    }
    Ok((rows, Position::AfterScratchpad))
}

/// Contrast prompt text: the question as a user turn, answered with `answer`.
pub fn contrast_text(question: &str, answer: &str) -> String {
    format!("{} {}", format_prompt(question), answer.trim())
}

#[cfg(test)]
mod tests {
    #[test]
    fn scoring_batches_fit_the_logit_budget() {
        // The quickstart's shapes keep their batch (results unchanged) ...
        assert_eq!(super::fit_batch(256, 120, 512), 256);
        // ... SmolLM2's are cut so [B, T, V] stays within the budget.
        let b = super::fit_batch(256, 90, 49_152);
        assert!(b >= 1 && b * 90 * 49_152 <= super::LOGIT_BUDGET, "{b}");
        assert_eq!(super::fit_batch(256, 100_000, 49_152), 1);
    }

    use super::*;

    #[test]
    fn fit_context_keeps_the_read_position() {
        assert_eq!(fit_context(&[1, 2, 3, 4, 5], 2, 10), (vec![1, 2, 3], 2));
        assert_eq!(fit_context(&[1, 2, 3, 4, 5], 4, 3), (vec![3, 4, 5], 2));
        assert_eq!(fit_context(&[1, 2, 3], 9, 8), (vec![1, 2, 3], 2));
    }
}
