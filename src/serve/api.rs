//! The OpenAI API's request and response shapes (the subset `serve` implements) and its
//! error body, `{"error": {"message", "type", "param", "code"}}`.
//!
//! Requests ignore fields they do not know (clients send `user`, `frequency_penalty`, ...),
//! but a known field of the wrong type is a 400 naming it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// An error answered in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, message: message.into() }
    }
    /// 400: the request is wrong (bad JSON, a bad field, too long for the context).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    /// 500: the model failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.status.as_u16()}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS || self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Clients with backoff (the openai package, `eval --endpoint`) wait this long.
            resp.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of lists of token
/// ids (lm-evaluation-harness sends token ids when it tokenizes itself).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// A prompt as given: text, or token ids.
#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

impl PromptInput {
    pub fn into_prompts(self) -> Vec<Prompt> {
        match self {
            PromptInput::Text(s) => vec![Prompt::Text(s)],
            PromptInput::Texts(v) => v.into_iter().map(Prompt::Text).collect(),
            PromptInput::Ids(v) => vec![Prompt::Ids(v)],
            PromptInput::IdLists(v) => v.into_iter().map(Prompt::Ids).collect(),
        }
    }
}

/// `seed`: any 64-bit integer, signed (the API's integer field; what `eval --endpoint`
/// sends) or unsigned; a negative value stands for its two's-complement bits.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(untagged)]
pub enum Seed {
    Signed(i64),
    Unsigned(u64),
}

impl Seed {
    pub fn bits(self) -> u64 {
        match self {
            Seed::Signed(s) => s as u64,
            Seed::Unsigned(u) => u,
        }
    }
}

/// `stop`: one string or a list.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

impl StopInput {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopInput::One(s) => vec![s],
            StopInput::Many(v) => v,
        }
    }
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptInput,
    /// Default 16, as OpenAI's.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<Seed>,
    /// Top log-probabilities per token (0..=20); the chosen token's is always given.
    #[serde(default)]
    pub logprobs: Option<usize>,
    /// Return the prompt (and its token log-probabilities) before the completion.
    #[serde(default)]
    pub echo: bool,
    #[serde(default)]
    pub stop: Option<StopInput>,
    #[serde(default)]
    pub n: Option<usize>,
    /// Send the answer as server-sent events, token by token.
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

/// One chat message. `content` may be a string or a list of `{"type":"text","text":..}` parts.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Value,
}

impl ChatMessage {
    /// The text of the message (text parts joined); `None` when the content has no text.
    pub fn text(&self) -> Option<String> {
        match &self.content {
            Value::String(s) => Some(s.clone()),
            Value::Array(parts) => Some(parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("")),
            Value::Null => Some(String::new()),
            _ => None,
        }
    }
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// The newer name of `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<Seed>,
    #[serde(default)]
    pub stop: Option<StopInput>,
    #[serde(default)]
    pub n: Option<usize>,
    /// Send the answer as server-sent events, token by token.
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Log-probabilities of the answer's tokens (`choices[].logprobs.content`).
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Alternatives per token (0..=20), with `logprobs: true`.
    #[serde(default)]
    pub top_logprobs: Option<usize>,
}

/// `stream_options` of a streamed request.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// End the stream with a chunk that has no choices and the request's `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// One token of a chat answer's `logprobs.content`, or one of its `top_logprobs`.
#[derive(Clone, Debug, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's UTF-8 bytes (a token can end inside a character).
    pub bytes: Vec<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<ChatTokenLogprob>>,
}

/// Legacy completions `logprobs` object.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Logprobs {
    pub tokens: Vec<String>,
    /// `null` for the first prompt token (nothing precedes it).
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<serde_json::Map<String, Value>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}
