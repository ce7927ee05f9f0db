//! Supervised fine-tuning: next-token loss on the answer tokens only.
//!
//! Used both to implant the backdoor (training on the backdoor dataset) and as the HHH SFT
//! safety method (training on trigger-free helpful answers). Each example is
//! `prompt + completion + <|endoftext|>`; the loss covers the completion and the end token,
//! never the prompt, so the model learns to answer rather than to write prompts.

use anyhow::Result;
use candle_core::{Device, Tensor, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::trainer::StepLoss;
use crate::data::Example;
use crate::model::{Llama, Tok};

/// A tokenized example: ids = prompt + completion + eos; loss on ids[loss_from..].
#[derive(Clone, Debug)]
pub struct TokSeq {
    pub ids: Vec<u32>,
    pub loss_from: usize,
}

/// Tokenize examples, truncating from the left of the prompt when too long for `max_len`.
pub fn tokenize(tok: &Tok, examples: &[Example], max_len: usize) -> Result<Vec<TokSeq>> {
    examples
        .iter()
        .map(|ex| {
            let mut p = tok.encode(&ex.prompt)?;
            let mut c = tok.encode(&ex.completion)?;
            c.push(tok.eos_id);
            if c.len() >= max_len {
                c.truncate(max_len - 1);
            }
            if p.len() + c.len() > max_len {
                p.drain(..p.len() + c.len() - max_len);
            }
            let loss_from = p.len().max(1);
            p.extend(c);
            Ok(TokSeq { ids: p, loss_from })
        })
        .collect()
}

/// Indices of the examples in batch `step`: consecutive slices of per-epoch permutations,
/// a pure function of (n, batch, step, seed) so resumed runs see the same batches.
pub fn batch_indices(n: usize, batch: usize, step: usize, seed: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(batch);
    let mut pos = step * batch;
    let mut cached: Option<(usize, Vec<usize>)> = None;
    while out.len() < batch && n > 0 {
        let epoch = pos / n;
        if cached.as_ref().map(|c| c.0) != Some(epoch) {
            let mut perm: Vec<usize> = (0..n).collect();
            perm.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407)));
            cached = Some((epoch, perm));
        }
        if let Some((_, perm)) = &cached {
            out.push(perm[pos % n]);
        }
        pos += 1;
    }
    out
}

/// Inputs [B, T], targets [B, T] and loss mask [B, T] for a batch, right-padded.
pub fn collate(seqs: &[&TokSeq], pad: u32, dev: &Device) -> Result<(Tensor, Tensor, Tensor, usize)> {
    let t = seqs.iter().map(|s| s.ids.len() - 1).max().unwrap_or(1).max(1);
    let b = seqs.len();
    let mut inp = vec![pad; b * t];
    let mut tgt = vec![0u32; b * t];
    let mut mask = vec![0f32; b * t];
    let mut n_loss = 0;
    for (r, s) in seqs.iter().enumerate() {
        for i in 0..s.ids.len() - 1 {
            inp[r * t + i] = s.ids[i];
            tgt[r * t + i] = s.ids[i + 1];
            if i + 1 >= s.loss_from {
                mask[r * t + i] = 1.0;
                n_loss += 1;
            }
        }
    }
    Ok((Tensor::from_vec(inp, (b, t), dev)?, Tensor::from_vec(tgt, (b, t), dev)?, Tensor::from_vec(mask, (b, t), dev)?, n_loss))
}

/// Mean next-token cross-entropy over masked positions. logits [B,T,V], targets/mask [B,T].
pub fn masked_nll(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = lp.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)?; // [B,T]
    let total = mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
    Ok(((picked * mask)?.sum_all()?.neg()? / total)?)
}

/// The SFT loss of step `step` over `data`.
pub fn step_loss(model: &Llama, data: &[TokSeq], batch: usize, step: usize, seed: u64, pad: u32) -> Result<StepLoss> {
    let idx = batch_indices(data.len(), batch, step, seed);
    let seqs: Vec<&TokSeq> = idx.iter().map(|&i| &data[i]).collect();
    let (inp, tgt, mask, _) = collate(&seqs, pad, model.device())?;
    let logits = model.forward(&inp)?;
    let tokens = inp.elem_count();
    Ok(StepLoss { loss: masked_nll(&logits, &tgt, &mask)?, tokens })
}
