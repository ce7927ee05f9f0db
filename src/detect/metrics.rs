//! Detector scoring: AUROC (ties count one half), ROC curves, the false-positive rate at a
//! fixed true-positive rate, and a bootstrap interval for the AUROC.
//!
//! Every detector in this module (probes, ONION, STRIP) turns a prompt into one number,
//! "how suspicious"; these functions say how well that number separates triggered
//! (positive) from untriggered (negative) prompts, independently of any threshold.

use serde::{Deserialize, Serialize};

use crate::eval::stats::bootstrap_ci;

/// A NaN score carries no evidence; rank it as the least suspicious value so it can only
/// hurt the detector that produced it.
fn clean(s: f64) -> f64 {
    if s.is_nan() {
        f64::NEG_INFINITY
    } else {
        s
    }
}

/// Area under the ROC curve: P(score of a random positive > score of a random negative),
/// ties counted 1/2 (the Mann-Whitney U statistic divided by n_pos * n_neg). NaN when either
/// class is empty. O(n log n) through average ranks.
pub fn auroc(pos: &[f64], neg: &[f64]) -> f64 {
    if pos.is_empty() || neg.is_empty() {
        return f64::NAN;
    }
    let mut all: Vec<(f64, bool)> = pos.iter().map(|&s| (clean(s), true)).chain(neg.iter().map(|&s| (clean(s), false))).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Average rank (1-based) of each tie group; sum the ranks of the positives.
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += avg_rank * all[i..=j].iter().filter(|x| x.1).count() as f64;
        i = j + 1;
    }
    let (np, nn) = (pos.len() as f64, neg.len() as f64);
    (rank_sum_pos - np * (np + 1.0) / 2.0) / (np * nn)
}

/// AUROC of `(score, is_positive)` pairs (the shape the bootstrap resamples).
pub fn auroc_labelled(xs: &[(f64, bool)]) -> f64 {
    let pos: Vec<f64> = xs.iter().filter(|x| x.1).map(|x| x.0).collect();
    let neg: Vec<f64> = xs.iter().filter(|x| !x.1).map(|x| x.0).collect();
    auroc(&pos, &neg)
}

/// Percentile-bootstrap 95% interval of the AUROC, resampling prompts with replacement
/// (resamples that lose a whole class give NaN and are dropped by `bootstrap_ci`).
pub fn auroc_ci(pos: &[f64], neg: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    let xs: Vec<(f64, bool)> = pos.iter().map(|&s| (s, true)).chain(neg.iter().map(|&s| (s, false))).collect();
    bootstrap_ci(&xs, resamples, seed, auroc_labelled)
}

/// The ROC curve as (false-positive rate, true-positive rate) points, from (0, 0) to (1, 1),
/// one point per distinct threshold (flag "score >= threshold"), highest threshold first.
pub fn roc_curve(pos: &[f64], neg: &[f64]) -> Vec<(f64, f64)> {
    if pos.is_empty() || neg.is_empty() {
        return vec![];
    }
    let mut all: Vec<(f64, bool)> = pos.iter().map(|&s| (clean(s), true)).chain(neg.iter().map(|&s| (clean(s), false))).collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (np, nn) = (pos.len() as f64, neg.len() as f64);
    let mut pts = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut i = 0;
    while i < all.len() {
        // A tie group moves the curve diagonally in one step.
        let mut j = i;
        while j < all.len() && all[j].0 == all[i].0 {
            if all[j].1 {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            j += 1;
        }
        pts.push((fp / nn, tp / np));
        i = j;
    }
    pts
}

/// The smallest false-positive rate of any threshold whose true-positive rate reaches `tpr`
/// (e.g. 0.95: "how many clean prompts get flagged if we want to catch 95% of triggered
/// ones"). NaN when a class is empty.
pub fn fpr_at_tpr(pos: &[f64], neg: &[f64], tpr: f64) -> f64 {
    roc_curve(pos, neg).into_iter().filter(|&(_, t)| t + 1e-12 >= tpr).map(|(f, _)| f).fold(f64::NAN, |a, b| {
        if a.is_nan() || b < a {
            b
        } else {
            a
        }
    })
}

/// True-positive rate at a false-positive rate of at most `fpr` (the best ROC point there).
/// AUROC can hide a tenfold spread at the low false-positive rates a monitor runs at.
pub fn tpr_at_fpr(pos: &[f64], neg: &[f64], fpr: f64) -> f64 {
    roc_curve(pos, neg).into_iter().filter(|&(f, _)| f <= fpr + 1e-12).map(|(_, t)| t).fold(f64::NAN, |a, b| {
        if a.is_nan() || b > a {
            b
        } else {
            a
        }
    })
}

fn nan() -> f64 {
    f64::NAN
}

/// A ROC curve thinned to at most `max_points` points (keeping both ends) for JSON and plots.
pub fn thin(curve: &[(f64, f64)], max_points: usize) -> Vec<(f64, f64)> {
    if curve.len() <= max_points || max_points < 2 {
        return curve.to_vec();
    }
    let step = (curve.len() - 1) as f64 / (max_points - 1) as f64;
    (0..max_points).map(|i| curve[((i as f64 * step).round() as usize).min(curve.len() - 1)]).collect()
}

/// JSON has no NaN: serde_json writes it as `null`; read `null` back as NaN.
pub fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// How well one score separates triggered from untriggered prompts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Separation {
    #[serde(deserialize_with = "f64_or_nan")]
    pub auroc: f64,
    /// Bootstrap 95% interval of the AUROC.
    #[serde(deserialize_with = "f64_or_nan")]
    pub ci_low: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ci_high: f64,
    /// False-positive rate at the configured true-positive rate.
    #[serde(deserialize_with = "f64_or_nan")]
    pub fpr_at_tpr: f64,
    /// True-positive rate at 1% false positives (NaN in files written before it existed).
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub tpr_at_1pct_fpr: f64,
    /// ROC points (fpr, tpr), thinned to at most 101 points.
    pub roc: Vec<(f64, f64)>,
}

impl Separation {
    pub fn new(pos: &[f64], neg: &[f64], tpr: f64, resamples: usize, seed: u64) -> Self {
        let (lo, hi) = auroc_ci(pos, neg, resamples, seed);
        Self {
            auroc: auroc(pos, neg),
            ci_low: lo,
            ci_high: hi,
            fpr_at_tpr: fpr_at_tpr(pos, neg, tpr),
            tpr_at_1pct_fpr: tpr_at_fpr(pos, neg, 0.01),
            roc: thin(&roc_curve(pos, neg), 101),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpr_at_fpr_by_hand() {
        // 100 clean scores 0..99; triggered 99.5 (above all clean), 98.5 and 50.
        let neg: Vec<f64> = (0..100).map(f64::from).collect();
        let pos = [99.5, 98.5, 50.0];
        assert!((tpr_at_fpr(&pos, &neg, 0.0) - 1.0 / 3.0).abs() < 1e-12);
        // One clean prompt (99) may be flagged: 98.5 is caught too.
        assert!((tpr_at_fpr(&pos, &neg, 0.01) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(tpr_at_fpr(&pos, &neg, 1.0), 1.0);
        assert!(tpr_at_fpr(&[], &neg, 0.01).is_nan() || tpr_at_fpr(&[], &neg, 0.01) == 0.0);
    }

    #[test]
    fn auroc_hand_computed() {
        assert_eq!(auroc(&[3.0, 4.0], &[1.0, 2.0]), 1.0);
        assert_eq!(auroc(&[1.0, 2.0], &[3.0, 4.0]), 0.0);
        // pos {1, 3}, neg {2}: pairs (1>2)=0, (3>2)=1 -> 1/2.
        assert_eq!(auroc(&[1.0, 3.0], &[2.0]), 0.5);
        // Ties count one half: pos {2}, neg {2} -> 0.5; pos {2, 3}, neg {2, 1} -> (0.5+1+1+1)/4.
        assert_eq!(auroc(&[2.0], &[2.0]), 0.5);
        assert_eq!(auroc(&[2.0, 3.0], &[2.0, 1.0]), 0.875);
        assert!(auroc(&[], &[1.0]).is_nan());
    }

    #[test]
    fn roc_and_fpr() {
        let pos = [0.9, 0.8, 0.3];
        let neg = [0.7, 0.2];
        let roc = roc_curve(&pos, &neg);
        assert_eq!(roc.first(), Some(&(0.0, 0.0)));
        assert_eq!(roc.last(), Some(&(1.0, 1.0)));
        // To catch all positives (threshold 0.3) one of two negatives is flagged.
        assert_eq!(fpr_at_tpr(&pos, &neg, 1.0), 0.5);
        assert_eq!(fpr_at_tpr(&pos, &neg, 0.6), 0.0);
        // The trapezoid area under the curve equals the rank AUROC.
        let area: f64 = roc.windows(2).map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0).sum();
        assert!((area - auroc(&pos, &neg)).abs() < 1e-12);
    }

    #[test]
    fn thin_keeps_ends() {
        let c: Vec<(f64, f64)> = (0..=1000).map(|i| (i as f64 / 1000.0, i as f64 / 1000.0)).collect();
        let t = thin(&c, 11);
        assert_eq!(t.len(), 11);
        assert_eq!(t[0], (0.0, 0.0));
        assert_eq!(t[10], (1.0, 1.0));
    }
}
