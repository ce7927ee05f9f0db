//! Data-side backdoor detectors: find the poisoned examples of a *training set* from the
//! model's activations on each example, before or instead of looking at test prompts.
//!
//! - **Spectral signatures** (Tran, Li, Madry 2018, "Spectral Signatures in Backdoor
//!   Attacks"): center the activations, take the top right singular vector of the centered
//!   matrix, and score each example by its squared projection on it. A poisoned subpopulation
//!   shifts the mean along one direction, which then dominates the covariance.
//! - **Activation clustering** (Chen et al. 2018, "Detecting Backdoor Attacks on Deep Neural
//!   Networks by Activation Clustering"): reduce the centered activations to a few
//!   components, split them with 2-means, and call the smaller cluster suspicious. Chen et al.
//!   reduce with ICA; we use PCA (the same power iteration as the spectral signature), which
//!   keeps the whole module a few hundred lines of plain f64 and deterministic.
//!
//! Both return one score per row, higher = more likely poisoned, so they plug into the same
//! AUROC machinery as the prompt-side detectors ([`crate::detect::metrics`]), and
//! [`flagged_at_fpr`] gives the number that matters for data filtering: how much poison is
//! removed if we may discard a fixed share of the clean data.
//!
//! Inputs are the rows of an activation matrix (one row per training example). Everything is
//! single-threaded f64 with fixed start vectors and iteration caps, so scores are bitwise
//! identical for the same rows and seed whatever the thread count. Degenerate inputs never
//! panic: rows of differing lengths or of length 0, fewer than two rows, and rows that are
//! all identical give all-zero scores (nothing can be told apart); non-finite activations
//! (NaN, ±inf) are replaced by the mean of the finite values in their column, so they carry
//! no evidence either way. Use [`validate_rows`] to tell a caller's bug from "no signal".

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Power-iteration cap per component. The eigengap of real poison is large (that is what
/// the method relies on), so this only binds on data with no signal, where any direction
/// is as good as another.
const MAX_POWER_ITERS: usize = 1000;
/// Convergence: change of the unit eigenvector between two iterations (2-norm).
const POWER_TOL: f64 = 1e-10;
/// Total centered variance below this share of the raw squared magnitude is rounding noise
/// from the centering, not signal (f64 epsilon squared is ~5e-32).
const CONSTANT_REL: f64 = 1e-20;
/// k-means++ restarts: 2-means can stop in the "cut the clean bulk in half" local optimum
/// when another init would have found the poison cluster; the lowest inertia wins.
const KMEANS_RESTARTS: usize = 5;
const KMEANS_MAX_ITERS: usize = 100;
/// Separate ChaCha streams, so that the clustering's inits do not replay the PCA start
/// vectors drawn from the same seed.
const STREAM_PCA: u64 = 1;
const STREAM_KMEANS: u64 = 2;

/// The common length of `rows` (0 when there are none), or a message when they differ. The
/// detectors themselves answer all-zero scores for such input; this lets a caller report it.
pub fn validate_rows(rows: &[Vec<f32>]) -> Result<usize, String> {
    let d = rows.first().map_or(0, Vec::len);
    match rows.iter().position(|r| r.len() != d) {
        Some(i) => Err(format!("activation rows differ in length: row 0 has {d}, row {i} has {}", rows[i].len())),
        None => Ok(d),
    }
}

/// One score per row; higher = more likely poisoned. The score is the squared projection of
/// the centered row on the top principal direction (Tran et al. 2018). All zeros for
/// degenerate input (see the module doc).
pub fn spectral_signature_scores(rows: &[Vec<f32>], seed: u64) -> Vec<f64> {
    let Some(x) = Centered::new(rows) else {
        return vec![0.0; rows.len()];
    };
    match principal_projections(&x, 1, seed).first() {
        Some(p) => p.iter().map(|v| v * v).collect(),
        None => vec![0.0; rows.len()],
    }
}

/// One score per row; higher = more likely poisoned (Chen et al. 2018, with PCA in place of
/// ICA). The centered rows are reduced to their top `n_components` principal components
/// (at least 1; fewer when the data has lower rank), unwhitened so that the direction with
/// the most variance, where a poison cluster shows, weighs most. 2-means (k-means++ init,
/// five restarts, lowest inertia kept) splits them, and a row scores
/// `distance to the larger cluster's centroid - distance to the smaller cluster's centroid`:
/// positive for rows that sit with the smaller cluster, which Chen et al. flag as poison
/// (poison is a minority of the data). On equal sizes the cluster without row 0 counts as
/// the smaller one, so the choice does not depend on label order. All zeros for degenerate
/// input or when no split exists.
pub fn activation_clustering_scores(rows: &[Vec<f32>], n_components: usize, seed: u64) -> Vec<f64> {
    let zeros = vec![0.0; rows.len()];
    let Some(x) = Centered::new(rows) else {
        return zeros;
    };
    let comps = principal_projections(&x, n_components.max(1), seed);
    if comps.is_empty() {
        return zeros;
    }
    // Row-major points in component space.
    let points: Vec<Vec<f64>> = (0..x.n).map(|i| comps.iter().map(|c| c[i]).collect()).collect();
    let Some(split) = two_means(&points, seed) else {
        return zeros;
    };
    let size1 = split.assign.iter().filter(|&&a| a == 1).count();
    let size0 = x.n - size1;
    let small = match size0.cmp(&size1) {
        std::cmp::Ordering::Less => 0,
        std::cmp::Ordering::Greater => 1,
        std::cmp::Ordering::Equal => 1 - split.assign[0],
    };
    let (c_small, c_large) = (&split.centroids[small], &split.centroids[1 - small]);
    points.iter().map(|p| dist2(p, c_large).sqrt() - dist2(p, c_small).sqrt()).collect()
}

/// The share of poisoned rows whose score exceeds the threshold that flags at most `fpr` of
/// the clean rows (threshold = the clean scores' (1-fpr) quantile, ties not flagged).
/// Returns (share_of_poison_flagged, share_of_clean_flagged, threshold).
///
/// With m clean rows, the threshold is the (k+1)-th largest clean score, k = floor(fpr * m),
/// and a row is flagged iff its score is strictly greater, so at most k clean rows are
/// flagged (fewer when scores tie at the threshold). `fpr` is clamped to [0, 1] (NaN counts
/// as 0); at 1 the threshold is -inf and every row with a score above it is flagged. A NaN
/// score ranks below everything (it carries no evidence, as in [`crate::detect::metrics`]).
/// Extra entries of the longer of `scores` and `is_poison` are ignored. No clean rows: no
/// threshold can be set, all three are NaN; no poisoned rows: the poison share is NaN.
pub fn flagged_at_fpr(scores: &[f64], is_poison: &[bool], fpr: f64) -> (f64, f64, f64) {
    let rank = |s: f64| if s.is_nan() { f64::NEG_INFINITY } else { s };
    let mut clean: Vec<f64> = scores.iter().zip(is_poison).filter(|(_, &p)| !p).map(|(&s, _)| rank(s)).collect();
    let poison: Vec<f64> = scores.iter().zip(is_poison).filter(|(_, &p)| p).map(|(&s, _)| rank(s)).collect();
    if clean.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    clean.sort_by(f64::total_cmp);
    let m = clean.len();
    let fpr = if fpr.is_nan() { 0.0 } else { fpr.clamp(0.0, 1.0) };
    // The epsilon absorbs products like 0.29 * 100 = 28.999999999999996.
    let k = (fpr * m as f64 + 1e-9).floor() as usize;
    let threshold = if k >= m { f64::NEG_INFINITY } else { clean[m - 1 - k] };
    let share = |xs: &[f64]| {
        if xs.is_empty() {
            f64::NAN
        } else {
            xs.iter().filter(|&&s| s > threshold).count() as f64 / xs.len() as f64
        }
    };
    (share(&poison), share(&clean), threshold)
}

/// The activation matrix, centered, row-major, in f64.
struct Centered {
    n: usize,
    d: usize,
    x: Vec<f64>,
}

impl Centered {
    /// None when nothing can be told apart: fewer than two rows, differing or zero lengths,
    /// or all rows equal (up to the rounding of the centering).
    fn new(rows: &[Vec<f32>]) -> Option<Self> {
        let d = validate_rows(rows).ok()?;
        let n = rows.len();
        if n < 2 || d == 0 {
            return None;
        }
        // Column means over the finite entries; non-finite entries are imputed with them.
        let mut sum = vec![0f64; d];
        let mut count = vec![0usize; d];
        for r in rows {
            for ((s, c), &v) in sum.iter_mut().zip(count.iter_mut()).zip(r) {
                if v.is_finite() {
                    *s += v as f64;
                    *c += 1;
                }
            }
        }
        let mean: Vec<f64> = sum.iter().zip(&count).map(|(&s, &c)| if c == 0 { 0.0 } else { s / c as f64 }).collect();
        let mut x = Vec::with_capacity(n * d);
        let (mut raw_sq, mut centered_sq) = (0f64, 0f64);
        for r in rows {
            for (&v, &mu) in r.iter().zip(&mean) {
                let v = if v.is_finite() { v as f64 } else { mu };
                raw_sq += v * v;
                centered_sq += (v - mu) * (v - mu);
                x.push(v - mu);
            }
        }
        if centered_sq <= CONSTANT_REL * raw_sq || centered_sq == 0.0 || !centered_sq.is_finite() {
            return None;
        }
        Some(Self { n, d, x })
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.x[i * self.d..(i + 1) * self.d]
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Projections of every row on the top `k` principal directions: one Vec of length n per
/// component, in decreasing order of variance; fewer than `k` when the data has lower rank.
/// The eigenproblem is solved on the smaller of the covariance X^T X (d x d) and the Gram
/// matrix X X^T (n x n): they share their nonzero eigenvalues, and for a Gram eigenpair
/// (lambda, u) the projections are sqrt(lambda) * u.
fn principal_projections(x: &Centered, k: usize, seed: u64) -> Vec<Vec<f64>> {
    let (n, d) = (x.n, x.d);
    if d <= n {
        let mut cov = vec![0f64; d * d];
        for i in 0..n {
            let r = x.row(i);
            for a in 0..d {
                let ra = r[a];
                // Upper triangle only; mirrored below.
                for b in a..d {
                    cov[a * d + b] += ra * r[b];
                }
            }
        }
        mirror_upper(&mut cov, d);
        top_eigenvectors(&cov, d, k, seed).into_iter().map(|(_, v)| (0..n).map(|i| dot(x.row(i), &v)).collect()).collect()
    } else {
        let mut gram = vec![0f64; n * n];
        for i in 0..n {
            for j in i..n {
                gram[i * n + j] = dot(x.row(i), x.row(j));
            }
        }
        mirror_upper(&mut gram, n);
        top_eigenvectors(&gram, n, k, seed).into_iter().map(|(lambda, u)| u.iter().map(|v| v * lambda.sqrt()).collect()).collect()
    }
}

fn mirror_upper(a: &mut [f64], m: usize) {
    for r in 1..m {
        for c in 0..r {
            a[r * m + c] = a[c * m + r];
        }
    }
}

/// Top `k` (eigenvalue, unit eigenvector) pairs of the symmetric positive semi-definite
/// m x m matrix `a` (row-major), by power iteration with deflation: each iterate is
/// re-orthogonalised against the vectors already found, which is more stable than
/// subtracting lambda v v^T from the matrix. Start vectors are uniform in [-1, 1]^m from the
/// seed. Stops early at an eigenvalue that is zero relative to the first (rank exhausted).
fn top_eigenvectors(a: &[f64], m: usize, k: usize, seed: u64) -> Vec<(f64, Vec<f64>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(STREAM_PCA);
    let mut found: Vec<(f64, Vec<f64>)> = Vec::new();
    let trace: f64 = (0..m).map(|i| a[i * m + i]).sum();
    for _ in 0..k.min(m) {
        let mut v: Vec<f64> = (0..m).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
        if !orthonormalise(&mut v, &found) {
            break;
        }
        let mut lambda = 0.0;
        for _ in 0..MAX_POWER_ITERS {
            let mut w: Vec<f64> = (0..m).map(|r| dot(&a[r * m..(r + 1) * m], &v)).collect();
            // Since a is PSD, ||A v|| for unit v approaches the eigenvalue from below.
            lambda = w.iter().map(|x| x * x).sum::<f64>().sqrt();
            if !orthonormalise(&mut w, &found) {
                lambda = 0.0;
                break;
            }
            let change = dist2(&w, &v).sqrt();
            v = w;
            if change < POWER_TOL {
                break;
            }
        }
        // Zero relative to the whole variance: the remaining directions are rounding noise.
        if !lambda.is_finite() || lambda <= CONSTANT_REL.sqrt() * trace {
            break;
        }
        found.push((lambda, v));
    }
    found
}

/// Remove the components along `basis` (orthonormal) and scale to unit length; false when
/// nothing is left (the vector lay in the span of `basis`, or was zero).
fn orthonormalise(v: &mut [f64], basis: &[(f64, Vec<f64>)]) -> bool {
    // Twice: one pass of classical Gram-Schmidt loses orthogonality in floating point.
    for _ in 0..2 {
        for (_, b) in basis {
            let c = dot(v, b);
            v.iter_mut().zip(b).for_each(|(x, y)| *x -= c * y);
        }
    }
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if !norm.is_finite() || norm <= 1e-300 {
        return false;
    }
    v.iter_mut().for_each(|x| *x /= norm);
    true
}

struct Split {
    /// 0 or 1 per point.
    assign: Vec<usize>,
    centroids: [Vec<f64>; 2],
}

/// 2-means: [`KMEANS_RESTARTS`] k-means++ inits, Lloyd iterations to convergence or
/// [`KMEANS_MAX_ITERS`], the lowest inertia kept (the first on ties). None when no init
/// gives two non-empty clusters (all points equal).
fn two_means(points: &[Vec<f64>], seed: u64) -> Option<Split> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(STREAM_KMEANS);
    let mut best: Option<(f64, Split)> = None;
    for _ in 0..KMEANS_RESTARTS {
        let Some((inertia, split)) = lloyd(points, &mut rng) else {
            continue;
        };
        if best.as_ref().is_none_or(|(b, _)| inertia < *b) {
            best = Some((inertia, split));
        }
    }
    best.map(|(_, s)| s)
}

fn lloyd(points: &[Vec<f64>], rng: &mut ChaCha8Rng) -> Option<(f64, Split)> {
    let n = points.len();
    if n < 2 {
        return None;
    }
    // k-means++: the first centroid uniformly, the second with probability proportional to
    // the squared distance from the first.
    let first = &points[rng.random_range(0..n)];
    let d2: Vec<f64> = points.iter().map(|p| dist2(p, first)).collect();
    let total: f64 = d2.iter().sum();
    if !total.is_finite() || total <= 0.0 {
        return None;
    }
    let target = rng.random::<f64>() * total;
    let mut acc = 0.0;
    let mut second = d2.iter().rposition(|&w| w > 0.0).expect("total > 0 means some point has a positive distance");
    for (i, &w) in d2.iter().enumerate() {
        acc += w;
        if acc > target && w > 0.0 {
            second = i;
            break;
        }
    }
    let mut centroids = [first.clone(), points[second].clone()];
    let mut assign = vec![usize::MAX; n];
    for _ in 0..KMEANS_MAX_ITERS {
        let mut changed = false;
        for (a, p) in assign.iter_mut().zip(points) {
            // Ties go to cluster 0, so the assignment is a function of the centroids.
            let c = usize::from(dist2(p, &centroids[1]) < dist2(p, &centroids[0]));
            changed |= *a != c;
            *a = c;
        }
        if !changed {
            break;
        }
        let dim = points[0].len();
        let mut sums = [vec![0f64; dim], vec![0f64; dim]];
        let mut counts = [0usize; 2];
        for (&a, p) in assign.iter().zip(points) {
            counts[a] += 1;
            sums[a].iter_mut().zip(p).for_each(|(s, v)| *s += v);
        }
        if counts.contains(&0) {
            return None;
        }
        for c in 0..2 {
            centroids[c] = sums[c].iter().map(|s| s / counts[c] as f64).collect();
        }
    }
    if !assign.contains(&0) || !assign.contains(&1) {
        return None;
    }
    let inertia = assign.iter().zip(points).map(|(&a, p)| dist2(p, &centroids[a])).sum();
    Some((inertia, Split { assign, centroids }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::metrics::auroc;

    fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
        let u1: f64 = rng.random::<f64>().max(1e-12);
        let u2: f64 = rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// `n_clean` standard Gaussian rows in `d` dims, then `n_poison` rows shifted by `shift`
    /// standard deviations along one random unit direction, in shuffled order.
    fn synthetic(n_clean: usize, n_poison: usize, d: usize, shift: f64, seed: u64) -> (Vec<Vec<f32>>, Vec<bool>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut dir: Vec<f64> = (0..d).map(|_| gaussian(&mut rng)).collect();
        let norm = dir.iter().map(|x| x * x).sum::<f64>().sqrt();
        dir.iter_mut().for_each(|x| *x /= norm);
        let mut labels: Vec<bool> = (0..n_clean + n_poison).map(|i| i >= n_clean).collect();
        rand::seq::SliceRandom::shuffle(labels.as_mut_slice(), &mut rng);
        let rows =
            labels.iter().map(|&p| (0..d).map(|j| (gaussian(&mut rng) + if p { shift * dir[j] } else { 0.0 }) as f32).collect()).collect();
        (rows, labels)
    }

    fn split_scores(scores: &[f64], labels: &[bool]) -> (Vec<f64>, Vec<f64>) {
        let pos = scores.iter().zip(labels).filter(|(_, &l)| l).map(|(&s, _)| s).collect();
        let neg = scores.iter().zip(labels).filter(|(_, &l)| !l).map(|(&s, _)| s).collect();
        (pos, neg)
    }

    fn both(rows: &[Vec<f32>], seed: u64) -> [(&'static str, Vec<f64>); 2] {
        [("spectral", spectral_signature_scores(rows, seed)), ("clustering", activation_clustering_scores(rows, 10, seed))]
    }

    /// 20 of 420 rows shifted by 6 sd. 2-means prefers the poison split over halving the
    /// clean bulk once n p (1-p) s^2 clearly beats n (2/pi) times the bulk's top sample
    /// variance (~1.6 here): s >= 5. At s = 4 the clustering misses on some seeds (it cuts
    /// the bulk instead) while the spectral signature still mostly works; measured, not
    /// asserted.
    #[test]
    fn shifted_poison_is_found_by_both_detectors() {
        for seed in [1, 2, 3] {
            let (rows, labels) = synthetic(400, 20, 32, 6.0, seed);
            for (name, scores) in both(&rows, seed) {
                assert_eq!(scores.len(), rows.len());
                let (pos, neg) = split_scores(&scores, &labels);
                let a = auroc(&pos, &neg);
                assert!(a > 0.95, "{name} seed {seed}: AUROC {a}");
                let (tp, fp, _) = flagged_at_fpr(&scores, &labels, 0.05);
                assert!(tp > 0.8, "{name} seed {seed}: flagged {tp} of poison");
                assert!(fp <= 0.05, "{name} seed {seed}: flagged {fp} of clean");
            }
        }
    }

    #[test]
    fn indistinguishable_poison_scores_near_chance() {
        for seed in [4, 5] {
            let (rows, labels) = synthetic(400, 100, 32, 0.0, seed);
            for (name, scores) in both(&rows, seed) {
                let (pos, neg) = split_scores(&scores, &labels);
                let a = auroc(&pos, &neg);
                assert!((a - 0.5).abs() < 0.15, "{name} seed {seed}: AUROC {a}");
            }
        }
    }

    #[test]
    fn more_dimensions_than_rows_uses_the_gram_matrix() {
        // d > n takes the other eigenproblem; the poison must still stand out.
        let (rows, labels) = synthetic(60, 6, 200, 12.0, 9);
        for (name, scores) in both(&rows, 9) {
            let (pos, neg) = split_scores(&scores, &labels);
            let a = auroc(&pos, &neg);
            assert!(a > 0.95, "{name}: AUROC {a}");
        }
    }

    #[test]
    fn same_seed_gives_bitwise_identical_scores() {
        let (rows, _) = synthetic(200, 10, 16, 5.0, 7);
        for ((_, a), (_, b)) in both(&rows, 11).iter().zip(both(&rows, 11).iter()) {
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(a), bits(b));
        }
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let cases: Vec<Vec<Vec<f32>>> = vec![
            vec![],
            vec![vec![1.0, 2.0]],
            vec![vec![0.1, 0.2, 0.3]; 50],
            vec![vec![1.0, 2.0], vec![1.0], vec![3.0, 4.0]],
            vec![vec![], vec![]],
            vec![vec![f32::NAN, 1.0], vec![2.0, f32::INFINITY], vec![f32::NEG_INFINITY, 3.0], vec![4.0, 5.0]],
            vec![vec![f32::NAN; 4]; 5],
            vec![vec![f32::MAX, -f32::MAX], vec![-f32::MAX, f32::MAX]],
            vec![vec![1.0, 0.0], vec![0.0, 1.0]],
        ];
        for rows in &cases {
            for k in [0, 1, 3, 100] {
                let c = activation_clustering_scores(rows, k, 0);
                assert_eq!(c.len(), rows.len(), "{rows:?}");
                assert!(c.iter().all(|s| s.is_finite()), "{rows:?}: {c:?}");
            }
            let s = spectral_signature_scores(rows, 0);
            assert_eq!(s.len(), rows.len(), "{rows:?}");
            assert!(s.iter().all(|s| s.is_finite()), "{rows:?}: {s:?}");
        }
        // Nothing to tell apart: all zeros.
        for rows in &cases[..5] {
            assert!(spectral_signature_scores(rows, 0).iter().all(|&s| s == 0.0), "{rows:?}");
            assert!(activation_clustering_scores(rows, 2, 0).iter().all(|&s| s == 0.0), "{rows:?}");
        }
        assert!(validate_rows(&cases[3]).is_err());
        assert_eq!(validate_rows(&cases[2]), Ok(3));
        assert_eq!(validate_rows(&[]), Ok(0));
    }

    #[test]
    fn non_finite_entries_carry_no_evidence() {
        // A NaN is imputed with its column mean, so a row that is otherwise typical does not
        // become the most suspicious one.
        let (mut rows, _) = synthetic(100, 0, 8, 0.0, 3);
        rows[0] = vec![f32::NAN; 8];
        let s = spectral_signature_scores(&rows, 0);
        assert!(s[0] < 1e-12, "{}", s[0]);
    }

    #[test]
    fn flagged_at_fpr_by_hand() {
        // Clean 1..=5, poison {4.5, 6, 2}. fpr 0.2 of 5 clean: k = 1, threshold = the second
        // largest clean score, 4; flagged: clean {5}, poison {4.5, 6}.
        let scores = [1.0, 2.0, 3.0, 4.0, 5.0, 4.5, 6.0, 2.0];
        let labels = [false, false, false, false, false, true, true, true];
        assert_eq!(flagged_at_fpr(&scores, &labels, 0.2), (2.0 / 3.0, 0.2, 4.0));
        // fpr 0: threshold = the clean maximum; only 6 exceeds it.
        assert_eq!(flagged_at_fpr(&scores, &labels, 0.0), (1.0 / 3.0, 0.0, 5.0));
        // fpr 0.39: still k = 1 (floor), not 2.
        assert_eq!(flagged_at_fpr(&scores, &labels, 0.39), (2.0 / 3.0, 0.2, 4.0));
        // fpr 0.4: k = 2, threshold 3.
        assert_eq!(flagged_at_fpr(&scores, &labels, 0.4), (2.0 / 3.0, 0.4, 3.0));
        // fpr 1: everything above -inf.
        assert_eq!(flagged_at_fpr(&scores, &labels, 1.0), (1.0, 1.0, f64::NEG_INFINITY));
        // Ties at the threshold are not flagged: clean {1, 2, 2, 2}, fpr 0.5 -> k = 2,
        // threshold 2, no clean score exceeds it, and neither does the poison's 2.
        assert_eq!(flagged_at_fpr(&[1.0, 2.0, 2.0, 2.0, 2.0, 3.0], &[false, false, false, false, true, true], 0.5), (0.5, 0.0, 2.0));
        // 0.29 * 100 is 28.999999999999996 in f64; k must still be 29.
        let many: Vec<f64> = (0..100).map(f64::from).collect();
        let (_, fp, t) = flagged_at_fpr(&many, &[false; 100], 0.29);
        assert_eq!((fp, t), (0.29, 70.0));
        // A NaN score ranks lowest; out-of-range and NaN fpr are clamped / read as 0.
        assert_eq!(flagged_at_fpr(&[f64::NAN, 1.0, 0.5], &[true, false, false], 0.5), (0.0, 0.5, 0.5));
        assert_eq!(flagged_at_fpr(&scores, &labels, f64::NAN), flagged_at_fpr(&scores, &labels, 0.0));
        assert_eq!(flagged_at_fpr(&scores, &labels, 7.0), flagged_at_fpr(&scores, &labels, 1.0));
        // Missing classes.
        let (tp, fp, t) = flagged_at_fpr(&[1.0], &[true], 0.1);
        assert!(tp.is_nan() && fp.is_nan() && t.is_nan());
        let (tp, fp, t) = flagged_at_fpr(&[1.0, 2.0], &[false, false], 0.5);
        assert!(tp.is_nan());
        assert_eq!((fp, t), (0.5, 1.0));
        let (tp, _, _) = flagged_at_fpr(&[], &[], 0.1);
        assert!(tp.is_nan());
    }
}
