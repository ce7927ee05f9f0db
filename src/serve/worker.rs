//! The model worker: one thread owns the model and drains a bounded queue of requests,
//! running every waiting request with the same sampling parameters as one call of the
//! KV-cache sampler ([`crate::model::sample::generate_batch`]). Requests with other
//! parameters wait for the next round; a sampled request with its own `seed` runs alone,
//! so its answer is the same however busy the server is (a batch row's random stream
//! depends on its row index, see `model::sample`).
//!
//! Log-probabilities come from one full forward over prompt + answer and a log-softmax.
//!
//! A streaming job also gets each of its tokens the moment the sampler draws it, on its
//! own channel; its rows are the same as if it had not streamed.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::Result;
use candle_core::{DType, Tensor, D};
use tokio::sync::{mpsc, oneshot};

use crate::model::sample::generate_batch_observed;
use crate::model::{Llama, SampleConfig, Tok};
use crate::train::Trainable;

/// Sampling parameters of one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenParams {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// 0 = no sampling (prompt log-probabilities only).
    pub max_tokens: usize,
    /// The request's own seed (sampled requests only).
    pub seed: Option<u64>,
}

impl GenParams {
    /// Requests with equal keys share a batch; `None` runs alone (a sampled request with
    /// its own seed). Greedy requests ignore `top_p` and `seed`, so they all share.
    fn batch_key(&self) -> Option<(u64, u64, usize)> {
        if self.temperature <= 0.0 {
            return Some((0, 1.0f64.to_bits(), self.max_tokens));
        }
        match self.seed {
            Some(_) => None,
            None => Some((self.temperature.to_bits(), self.top_p.to_bits(), self.max_tokens)),
        }
    }
}

/// Which log-probabilities a request wants.
#[derive(Clone, Copy, Debug)]
pub struct WantLogprobs {
    /// Alternatives per position (0 = only the chosen token's).
    pub top: usize,
    /// Prompt positions too (the first prompt token has none).
    pub echo: bool,
}

/// The log-probability of one token and the `top` most likely alternatives.
#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub id: u32,
    /// `None` for the first token of the text (nothing precedes it).
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

/// One answered prompt.
#[derive(Clone, Debug)]
pub struct RowOut {
    /// Sampled token ids (end token dropped).
    pub tokens: Vec<u32>,
    pub text: String,
    /// Prompt positions (when echoed) then answer positions.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

pub type Reply = std::result::Result<Vec<RowOut>, String>;

/// One request: already tokenized and checked against the context.
pub struct Job {
    pub prompts: Vec<Vec<u32>>,
    pub params: GenParams,
    pub logprobs: Option<WantLogprobs>,
    pub reply: oneshot::Sender<Reply>,
    /// For a streamed request: (row of this job, token) for every token as it is sampled,
    /// the end token included. Dropped (closing the channel) before `reply` is sent.
    pub tokens: Option<mpsc::UnboundedSender<(usize, u32)>>,
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// `max_queue` jobs already wait.
    Full,
    /// The server is shutting down.
    Closed,
}

struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// The bounded queue between the HTTP handlers and the worker.
pub struct Queue {
    state: Mutex<QueueState>,
    cv: Condvar,
    cap: usize,
    /// Requests in the batch the worker is running now (for `GET /health`).
    running: AtomicUsize,
}

impl Queue {
    pub fn new(cap: usize) -> Self {
        Self {
            state: Mutex::new(QueueState { jobs: VecDeque::new(), closed: false }),
            cv: Condvar::new(),
            cap,
            running: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A panic while holding the lock cannot leave the queue inconsistent (push/pop only).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a job, or say why not (the caller answers 429 / 503).
    pub fn submit(&self, job: Job) -> std::result::Result<(), (SubmitError, Job)> {
        let mut st = self.lock();
        if st.closed {
            return Err((SubmitError::Closed, job));
        }
        if st.jobs.len() >= self.cap {
            return Err((SubmitError::Full, job));
        }
        st.jobs.push_back(job);
        self.cv.notify_one();
        Ok(())
    }

    /// Jobs waiting now.
    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Requests the worker is sampling now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Stop taking jobs; the worker finishes what is queued, then exits.
    pub fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }

    /// Block until there is work: the oldest job plus every waiting job with the same batch
    /// key, up to `max_rows` prompts (the first job always goes, however many it has).
    /// Jobs whose client went away are dropped. `None` once closed and drained.
    fn next_batch(&self, max_rows: usize) -> Option<Vec<Job>> {
        let mut st = self.lock();
        loop {
            st.jobs.retain(|j| !j.reply.is_closed());
            if let Some(first) = st.jobs.pop_front() {
                let mut batch = vec![first];
                if let Some(key) = batch[0].params.batch_key() {
                    let mut rows = batch[0].prompts.len();
                    let mut i = 0;
                    while i < st.jobs.len() {
                        let j = &st.jobs[i];
                        if j.params.batch_key() == Some(key) && rows + j.prompts.len() <= max_rows {
                            rows += j.prompts.len();
                            batch.extend(st.jobs.remove(i));
                        } else {
                            i += 1;
                        }
                    }
                }
                return Some(batch);
            }
            if st.closed {
                return None;
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The worker loop: run batches until the queue is closed and empty.
pub fn run(model: Trainable, queue: Arc<Queue>, max_rows: usize) {
    while let Some(mut batch) = queue.next_batch(max_rows) {
        queue.running.store(batch.len(), Ordering::Relaxed);
        let result = catch_unwind(AssertUnwindSafe(|| run_batch(&model.model, &model.tok, &batch, max_rows)));
        queue.running.store(0, Ordering::Relaxed);
        let result = match result {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err("the model panicked on this batch".to_string()),
        };
        // Close every token channel before the replies go out, so a streaming handler that
        // sees its channel end has every token and can wait for the reply.
        for job in &mut batch {
            job.tokens = None;
        }
        match result {
            Ok(mut rows) => {
                for job in batch {
                    let rest = rows.split_off(job.prompts.len());
                    let _ = job.reply.send(Ok(rows)); // the client may have gone
                    rows = rest;
                }
            }
            Err(msg) => {
                for job in batch {
                    let _ = job.reply.send(Err(msg.clone()));
                }
            }
        }
    }
}

/// Sample every prompt of the batch (all jobs share the first job's parameters), then
/// add log-probabilities where asked.
fn run_batch(model: &Llama, tok: &Tok, batch: &[Job], max_rows: usize) -> Result<Vec<RowOut>> {
    let params = batch[0].params;
    let prompts: Vec<Vec<u32>> = batch.iter().flat_map(|j| j.prompts.iter().cloned()).collect();
    let mut samples = Vec::with_capacity(prompts.len());
    if params.max_tokens > 0 {
        let cfg = SampleConfig {
            temperature: params.temperature,
            top_p: params.top_p,
            max_new_tokens: params.max_tokens,
            batch_size: max_rows.max(1),
        };
        let seed = params.seed.unwrap_or_else(rand::random);
        // Batch row -> (job, row of that job), for the streaming jobs' channels.
        let owner: Vec<(usize, usize)> =
            batch.iter().enumerate().flat_map(|(j, job)| (0..job.prompts.len()).map(move |r| (j, r))).collect();
        for (i, chunk) in prompts.chunks(cfg.batch_size).enumerate() {
            let first = i * cfg.batch_size;
            let mut on_token = |r: usize, t: u32| {
                let (j, row) = owner[first + r];
                if let Some(tx) = &batch[j].tokens {
                    let _ = tx.send((row, t)); // the client may have gone
                }
            };
            samples.extend(generate_batch_observed(model, tok, chunk, &cfg, seed, first, &mut on_token)?);
        }
    } else {
        samples.resize(prompts.len(), crate::model::Sample { text: String::new(), tokens: Vec::new() });
    }
    let mut out = Vec::with_capacity(prompts.len());
    let wants = batch.iter().flat_map(|j| std::iter::repeat_n(j.logprobs, j.prompts.len()));
    for ((prompt, s), want) in prompts.iter().zip(samples).zip(wants) {
        let logprobs = match want {
            Some(w) => Some(token_logprobs(model, tok.eos_id, prompt, &s.tokens, w)?),
            None => None,
        };
        out.push(RowOut { tokens: s.tokens, text: s.text, logprobs });
    }
    Ok(out)
}

/// Log-probabilities of `prompt` (when echoed) and `answer` tokens under the model, from
/// one forward pass over both. An empty prompt is preceded by the end token, as the
/// sampler does.
pub fn token_logprobs(model: &Llama, eos: u32, prompt: &[u32], answer: &[u32], want: WantLogprobs) -> Result<Vec<TokenLogprob>> {
    let (mut ids, shown_from) =
        if prompt.is_empty() { (vec![eos], 1) } else { (prompt.to_vec(), if want.echo { 0 } else { prompt.len() }) };
    ids.extend_from_slice(answer);
    if shown_from >= ids.len() {
        return Ok(Vec::new());
    }
    let t = ids.len();
    let input = Tensor::from_vec(ids.clone(), (1, t), model.device())?;
    let logits = model.forward(&input)?.squeeze(0)?.to_dtype(DType::F32)?; // [T, V]
    let logp: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec2()?;
    let mut out = Vec::with_capacity(t - shown_from);
    for (pos, &id) in ids.iter().enumerate().skip(shown_from) {
        if pos == 0 {
            out.push(TokenLogprob { id, logprob: None, top: Vec::new() });
            continue;
        }
        let row = &logp[pos - 1];
        let top = if want.top > 0 {
            let mut idx: Vec<u32> = (0..row.len() as u32).collect();
            let k = want.top.min(idx.len());
            idx.select_nth_unstable_by(k - 1, |a, b| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b)));
            idx.truncate(k);
            idx.sort_by(|a, b| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b)));
            idx.into_iter().map(|i| (i, row[i as usize])).collect()
        } else {
            Vec::new()
        };
        out.push(TokenLogprob { id, logprob: Some(row[id as usize]), top });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(temperature: f64, seed: Option<u64>, rows: usize) -> (Job, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        let params = GenParams { temperature, top_p: 0.9, max_tokens: 8, seed };
        (Job { prompts: vec![vec![1]; rows], params, logprobs: None, reply: tx, tokens: None }, rx)
    }

    #[test]
    fn queue_batches_compatible_jobs_and_bounds_its_length() {
        let q = Queue::new(4);
        let (a, _ra) = job(0.0, Some(1), 2);
        let (b, _rb) = job(1.0, Some(5), 1); // sampled with its own seed: alone
        let (c, _rc) = job(0.0, Some(9), 2); // greedy: shares with a despite another seed
        let (d, _rd) = job(0.0, None, 1);
        for j in [a, b, c, d] {
            assert!(q.submit(j).is_ok());
        }
        let (e, _re) = job(0.0, None, 1);
        assert_eq!(q.submit(e).err().map(|x| x.0), Some(SubmitError::Full));
        let first = q.next_batch(4).expect("work");
        assert_eq!(first.iter().map(|j| j.prompts.len()).collect::<Vec<_>>(), [2, 2], "row cap 4 leaves d");
        let second = q.next_batch(4).expect("work");
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].params.seed, Some(5));
        assert_eq!(q.next_batch(4).expect("work").len(), 1);
        q.close();
        assert!(q.next_batch(4).is_none());
        let (f, _rf) = job(0.0, None, 1);
        assert_eq!(q.submit(f).err().map(|x| x.0), Some(SubmitError::Closed));
    }

    /// A streamed job that shares its batch with another and straddles two sampler chunks
    /// gets exactly its own rows' tokens on its channel, before its reply.
    #[test]
    fn a_streamed_job_gets_its_own_rows_tokens_in_a_shared_batch() {
        let tok = Tok::train(["ab cd ef gh ij", "kl mn op"].iter().copied().cycle().take(20), 270).expect("tokenizer");
        let cfg = crate::model::presets::preset("nano", tok.vocab_size(), 64).expect("preset");
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &candle_core::Device::Cpu);
        let model = Llama::new(&cfg, vb).expect("model"); // random weights: any tokens will do
        let params = GenParams { temperature: 0.0, top_p: 1.0, max_tokens: 6, seed: None };
        let prompt = |s: &str| tok.encode_raw(s).expect("encode");
        let (a, _ra) = oneshot::channel();
        let (b, _rb) = oneshot::channel();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let plain = Job { prompts: vec![prompt("ab"), prompt("cd ef")], params, logprobs: None, reply: a, tokens: None };
        let streamed =
            Job { prompts: vec![prompt("gh"), prompt("ij kl"), prompt("mn")], params, logprobs: None, reply: b, tokens: Some(tx) };
        // Rows 0-1 are the plain job's; the streamed job's rows 2, 3 | 4 fall in two chunks of 4.
        let rows = run_batch(&model, &tok, &[plain, streamed], 4).expect("batch");
        let mut got = vec![Vec::new(); 3];
        while let Ok((row, t)) = rx.try_recv() {
            got[row].push(t);
        }
        for (r, tokens) in got.iter_mut().enumerate() {
            if tokens.last() == Some(&tok.eos_id) {
                tokens.pop(); // the sampler drops the end token from its rows
            }
            assert_eq!(*tokens, rows[2 + r].tokens, "streamed row {r}");
        }
        assert!(got.iter().map(Vec::len).sum::<usize>() > 0, "nothing was sampled");
    }

    #[test]
    fn abandoned_jobs_are_dropped() {
        let q = Queue::new(4);
        let (a, ra) = job(0.0, None, 1);
        let (b, _rb) = job(1.0, None, 1);
        assert!(q.submit(a).is_ok() && q.submit(b).is_ok());
        drop(ra);
        let batch = q.next_batch(8).expect("work");
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].params.temperature, 1.0);
    }
}
