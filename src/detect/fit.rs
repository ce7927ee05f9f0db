//! Linear probes on activation vectors: difference of means, logistic regression, and
//! random unit directions (the baseline a probe has to beat).
//!
//! Logistic regression comes from `linfa-logistic` (L-BFGS through `argmin`, pure Rust on
//! `ndarray`, no system BLAS needed). Inputs are standardised with the training set's mean
//! and standard deviation before fitting, and the weights are mapped back, so the returned
//! direction applies to raw activations like the difference-of-means one.

use anyhow::{anyhow, Result};
use linfa::prelude::*;
use linfa_logistic::LogisticRegression;
use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// mean(pos) - mean(neg), elementwise. Empty inputs give an empty direction.
pub fn diff_of_means(pos: &[Vec<f32>], neg: &[Vec<f32>]) -> Vec<f32> {
    let (Some(first), false) = (pos.first(), neg.is_empty()) else {
        return vec![];
    };
    let d = first.len();
    let mean = |xs: &[Vec<f32>]| -> Vec<f64> {
        let mut m = vec![0f64; d];
        for x in xs {
            for (a, b) in m.iter_mut().zip(x) {
                *a += *b as f64;
            }
        }
        m.iter().map(|v| v / xs.len() as f64).collect()
    };
    mean(pos).iter().zip(mean(neg)).map(|(a, b)| (a - b) as f32).collect()
}

/// Projection of each vector on `dir` (plus `bias`): the probe's score.
pub fn project(dir: &[f32], bias: f32, xs: &[Vec<f32>]) -> Vec<f64> {
    xs.iter().map(|x| x.iter().zip(dir).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() + bias as f64).collect()
}

/// `n` directions uniform on the unit sphere of dimension `d` (normalised Gaussians),
/// deterministic in `seed`.
pub fn random_directions(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let v: Vec<f64> = (0..d)
                .map(|_| {
                    // Box-Muller: one standard normal from two uniforms.
                    let u1: f64 = rng.random::<f64>().max(1e-12);
                    let u2: f64 = rng.random::<f64>();
                    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
                })
                .collect();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            v.iter().map(|x| (x / norm) as f32).collect()
        })
        .collect()
}

/// A fitted logistic probe: score = w . x + b (log-odds of the positive class).
#[derive(Clone, Debug)]
pub struct Logistic {
    pub weights: Vec<f32>,
    pub bias: f32,
}

/// Fit an L2-regularised (`alpha`) logistic regression separating `pos` from `neg`.
pub fn fit_logistic(pos: &[Vec<f32>], neg: &[Vec<f32>], alpha: f64, max_iter: u64) -> Result<Logistic> {
    let d = pos.first().or(neg.first()).map(|x| x.len()).ok_or_else(|| anyhow!("logistic probe: no data"))?;
    if pos.is_empty() || neg.is_empty() {
        return Err(anyhow!("logistic probe: need examples of both classes"));
    }
    let n = pos.len() + neg.len();
    let rows: Vec<&Vec<f32>> = pos.iter().chain(neg).collect();
    // Standardise each feature so the L2 penalty treats every dimension alike.
    let mut mu = vec![0f64; d];
    for r in &rows {
        for (m, v) in mu.iter_mut().zip(r.iter()) {
            *m += *v as f64 / n as f64;
        }
    }
    let mut sd = vec![0f64; d];
    for r in &rows {
        for ((s, v), m) in sd.iter_mut().zip(r.iter()).zip(&mu) {
            *s += (*v as f64 - m).powi(2) / n as f64;
        }
    }
    let sd: Vec<f64> = sd.iter().map(|s| s.sqrt().max(1e-6)).collect();
    let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().zip(&mu).zip(&sd).map(|((v, m), s)| (*v as f64 - m) / s)).collect();
    let x = Array2::from_shape_vec((n, d), flat).map_err(|e| anyhow!("logistic probe: {e}"))?;
    let y = Array1::from_iter((0..n).map(|i| i < pos.len()));
    let ds = Dataset::new(x, y);
    let fit = LogisticRegression::default().alpha(alpha).max_iterations(max_iter).fit(&ds).map_err(|e| anyhow!("logistic probe: {e}"))?;
    // linfa calls the first label it sees "positive"; ours is `true` (the first rows), but
    // check rather than rely on row order.
    let sign = if fit.labels().pos.class { 1.0 } else { -1.0 };
    let w: Vec<f64> = fit.params().iter().map(|v| sign * v).collect();
    let b = sign * fit.intercept();
    // Undo the standardisation: w.(x - mu)/sd + b = (w/sd).x + (b - sum w mu / sd).
    let weights: Vec<f32> = w.iter().zip(&sd).map(|(w, s)| (w / s) as f32).collect();
    let bias = b - w.iter().zip(&mu).zip(&sd).map(|((w, m), s)| w * m / s).sum::<f64>();
    Ok(Logistic { weights, bias: bias as f32 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_of_means_is_elementwise() {
        let pos = vec![vec![1.0, 2.0], vec![3.0, 4.0]];
        let neg = vec![vec![0.0, 1.0]];
        assert_eq!(diff_of_means(&pos, &neg), vec![2.0, 2.0]);
        assert!(diff_of_means(&[], &neg).is_empty());
    }

    #[test]
    fn random_directions_are_unit() {
        for v in random_directions(5, 16, 3) {
            let n: f32 = v.iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-4);
        }
        assert_eq!(random_directions(2, 4, 1), random_directions(2, 4, 1));
    }

    #[test]
    fn logistic_points_towards_the_positive_class() {
        let pos: Vec<Vec<f32>> = (0..20).map(|i| vec![2.0 + (i % 3) as f32 * 0.1, 0.5]).collect();
        let neg: Vec<Vec<f32>> = (0..20).map(|i| vec![-2.0 - (i % 3) as f32 * 0.1, 0.5]).collect();
        let m = fit_logistic(&pos, &neg, 0.1, 100).unwrap();
        let sp = project(&m.weights, m.bias, &pos);
        let sn = project(&m.weights, m.bias, &neg);
        assert!(sp.iter().all(|s| *s > 0.0) && sn.iter().all(|s| *s < 0.0), "{sp:?} {sn:?}");
    }
}
