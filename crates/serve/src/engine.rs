//! The engine: one thread owns the model and runs continuous batching. Requests wait in a
//! bounded queue; between decode steps, waiting requests are prefilled and join the batch and
//! finished (or abandoned) ones leave it. Each request gets its tokens back on its own channel,
//! so a slow reader never holds up the batch.

use crate::metrics::Metrics;
use nuwa_data::TextStream;
use nuwa_hf::{InferenceModel, Message};
use nuwa_model::batch::DecodeBatch;
use nuwa_model::generate::pick_token;
use nuwa_model::{token_logprobs, SamplingOptions, TokenLogprobs};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// What to generate from.
pub enum Prompt {
    Text(String),
    Chat(Vec<Message>),
    /// Token ids, as OpenAI's completions API accepts them (checked against the vocabulary).
    Tokens(Vec<u32>),
}

pub struct Job {
    pub prompt: Prompt,
    pub options: SamplingOptions,
    pub stop: Vec<String>,
    /// Log-probabilities wanted: `Some(n)` with the `n` most likely alternatives per token.
    pub logprobs: Option<usize>,
    pub events: UnboundedSender<Event>,
    /// When the request arrived: time to first token and queue time count from here.
    pub received: Instant,
    /// Added to these tokens' logits before sampling (OpenAI's `logit_bias`); log-probabilities
    /// stay those of the model.
    pub logit_bias: Vec<(u32, f32)>,
}

/// `logits` with the job's biases added (the same slice when there are none).
fn biased<'a>(logits: &'a [f32], bias: &[(u32, f32)]) -> std::borrow::Cow<'a, [f32]> {
    if bias.is_empty() {
        return std::borrow::Cow::Borrowed(logits);
    }
    let mut l = logits.to_vec();
    for &(token, b) in bias {
        if let Some(v) = l.get_mut(token as usize) {
            *v += b;
        }
    }
    std::borrow::Cow::Owned(l)
}

/// One generated token's log-probability (raw logits, before temperature/top-k/top-p) and
/// the most likely tokens at its position, as clients see them.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// (token, bytes, log-probability), most likely first.
    pub top: Vec<(String, Vec<u8>, f32)>,
}

impl TokenLogprob {
    fn new(model: &InferenceModel, lp: &TokenLogprobs) -> Self {
        let text = |id: u32| {
            let bytes = model.tokenizer.token_bytes(id);
            (String::from_utf8_lossy(&bytes).into_owned(), bytes)
        };
        let (token, bytes) = text(lp.token);
        Self {
            token,
            bytes,
            logprob: lp.logprob,
            top: lp
                .top
                .iter()
                .map(|&(id, l)| {
                    let (t, b) = text(id);
                    (t, b, l)
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The prompt was accepted: its length in tokens.
    Started { prompt_tokens: usize },
    /// New text (may be empty while a stop string might be forming), with the log-probabilities
    /// of the tokens it completes when they were asked for.
    Text(String, Vec<TokenLogprob>),
    Done {
        finish_reason: &'static str,
        completion_tokens: usize,
    },
    /// The request cannot be served: an HTTP status and a message.
    Rejected { status: u16, message: String },
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences decoded together (bounds the KV cache: rows × context).
    pub max_batch: usize,
    /// Most requests waiting for a slot; beyond it requests get 503.
    pub max_queue: usize,
}

/// The handle HTTP handlers submit jobs through.
#[derive(Clone)]
pub struct EngineHandle {
    queue: SyncSender<Job>,
    pub metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// Queues a job; `Err` (with the job) when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), Box<Job>> {
        match self.queue.try_send(job) {
            Ok(()) => {
                self.metrics.queued(1);
                Ok(())
            }
            Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => {
                Err(Box::new(job))
            }
        }
    }
}

struct Active {
    job: Job,
    /// Tokens generated so far.
    generated: usize,
    /// Their text, as far as it is decoded, and how many bytes of it were sent.
    stream: TextStream,
    text: String,
    sent: usize,
    rng: u64,
    next: u32,
    /// The pending token's log-probabilities (when asked for).
    next_logprobs: Option<TokenLogprobs>,
    /// Those of tokens whose text is not sent yet.
    unsent_logprobs: Vec<TokenLogprob>,
    /// The request's arrival (time to first token counts from it).
    started: Instant,
    first_token: bool,
}

pub fn start(
    model: InferenceModel,
    device: burn::tensor::Device,
    cfg: EngineConfig,
) -> EngineHandle {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(cfg.max_queue.max(1));
    let metrics = Arc::new(Metrics::default());
    let m = metrics.clone();
    std::thread::spawn(move || run(model, device, cfg, rx, m));
    EngineHandle { queue: tx, metrics }
}

fn run(
    model: InferenceModel,
    device: burn::tensor::Device,
    cfg: EngineConfig,
    rx: Receiver<Job>,
    metrics: Arc<Metrics>,
) {
    let mut batch = DecodeBatch::new(&model.model, &device);
    let mut active: Vec<Active> = Vec::new();
    loop {
        // Admit waiting jobs while there is room; block only when there is nothing to do.
        while active.len() < cfg.max_batch {
            let job = if active.is_empty() {
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => return, // the server is gone
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            };
            metrics.queued(-1);
            if let Some(a) = admit(&model, &mut batch, job, &metrics) {
                active.push(a);
            }
        }
        if active.is_empty() {
            continue;
        }
        // Hand out each row's pending token, then retire the rows that are finished.
        let mut keep = Vec::with_capacity(active.len());
        for a in active.iter_mut() {
            keep.push(emit(&model, a, &metrics));
        }
        let mut row = 0;
        active.retain(|_| {
            row += 1;
            keep[row - 1]
        });
        batch.retain(&keep);
        metrics.set_batch(active.len());
        if active.is_empty() {
            continue;
        }
        let tokens: Vec<u32> = active.iter().map(|a| a.next).collect();
        let started = Instant::now();
        let logits = batch.step(&model.model, &tokens);
        metrics.step(active.len(), started.elapsed().as_secs_f64());
        for (a, l) in active.iter_mut().zip(&logits) {
            a.next = pick_token(&biased(l, &a.job.logit_bias), &a.job.options, &mut a.rng);
            a.next_logprobs = a.job.logprobs.map(|n| token_logprobs(l, a.next, n));
        }
    }
}

/// Encodes and checks a job, prefills it and samples its first token; `None` if rejected.
fn admit(
    model: &InferenceModel,
    batch: &mut DecodeBatch,
    job: Job,
    metrics: &Metrics,
) -> Option<Active> {
    if job.events.is_closed() {
        return None; // the client left while queued
    }
    let encoded = match &job.prompt {
        Prompt::Text(t) => model.encode(t),
        Prompt::Chat(m) => model.encode_chat(m),
        Prompt::Tokens(ids) => match ids.iter().find(|&&t| t as usize >= model.config.vocab_size) {
            Some(bad) => Err(anyhow::anyhow!(
                "prompt: token id {bad} is outside the vocabulary (0..{})",
                model.config.vocab_size
            )),
            None => Ok(ids.clone()),
        },
    };
    let reject = |status: u16, message: String| {
        let _ = job.events.send(Event::Rejected { status, message });
    };
    let ids = match encoded {
        Ok(ids) if ids.is_empty() => {
            reject(400, "the prompt encodes to no tokens".into());
            return None;
        }
        Ok(ids) => ids,
        Err(e) => {
            reject(400, format!("{e:#}"));
            return None;
        }
    };
    if let Some((bad, _)) = job
        .logit_bias
        .iter()
        .find(|(t, _)| *t as usize >= model.config.vocab_size)
    {
        reject(
            400,
            format!(
                "logit_bias: token id {bad} is outside the vocabulary (0..{})",
                model.config.vocab_size
            ),
        );
        return None;
    }
    if ids.len() + job.options.max_tokens > batch.capacity {
        reject(
            400,
            format!(
                "this model's context is {} tokens; the prompt has {} and max_tokens asks for {}",
                batch.capacity,
                ids.len(),
                job.options.max_tokens
            ),
        );
        return None;
    }
    let _ = job.events.send(Event::Started {
        prompt_tokens: ids.len(),
    });
    metrics.request();
    metrics.queue_wait(job.received.elapsed().as_secs_f64());
    let started = job.received;
    let logits = batch.join(&model.model, &ids);
    let mut rng = job.options.seed;
    let next = pick_token(&biased(&logits, &job.logit_bias), &job.options, &mut rng);
    let next_logprobs = job.logprobs.map(|n| token_logprobs(&logits, next, n));
    Some(Active {
        job,
        generated: 0,
        stream: TextStream::default(),
        text: String::new(),
        sent: 0,
        rng,
        next,
        next_logprobs,
        unsent_logprobs: Vec::new(),
        started,
        first_token: true,
    })
}

/// Sends the row's pending token as text; false when the row is finished.
/// Admission checked that prompt + max_tokens fits the context, so a row never overflows.
fn emit(model: &InferenceModel, a: &mut Active, metrics: &Metrics) -> bool {
    if a.job.events.is_closed() {
        metrics.cancelled();
        return false; // client disconnected: free the slot
    }
    if a.first_token {
        metrics.first_token(a.started.elapsed().as_secs_f64());
        a.first_token = false;
    }
    let is_eos = model.eos.contains(&a.next);
    if !is_eos {
        a.generated += 1;
        let piece = a.stream.push(&model.tokenizer, a.next);
        a.text.push_str(&piece);
        if let Some(lp) = a.next_logprobs.take() {
            a.unsent_logprobs.push(TokenLogprob::new(model, &lp));
        }
        metrics.token();
    }
    if is_eos || a.generated >= a.job.options.max_tokens {
        let rest = a.stream.finish(&model.tokenizer);
        a.text.push_str(&rest);
    }
    let text = &a.text;
    // A stop string can only newly appear around the text added since the last send.
    let longest = a.job.stop.iter().map(String::len).max().unwrap_or(0);
    let mut from = a.sent.saturating_sub(longest);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    let stop_at = a
        .job
        .stop
        .iter()
        .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
        .min();
    let finish = if stop_at.is_some() || is_eos {
        Some("stop")
    } else if a.generated >= a.job.options.max_tokens {
        Some("length")
    } else {
        None
    };
    // Send what is certain: up to a stop string, and never a prefix of one that may still
    // complete (the stream already holds back partial characters).
    let end = match (stop_at, finish) {
        (Some(i), _) => i,
        (None, Some(_)) => text.len(),
        (None, None) => {
            let mut e = text.len().saturating_sub(longest.saturating_sub(1));
            while !text.is_char_boundary(e) {
                e -= 1;
            }
            e
        }
    };
    if end > a.sent && text.is_char_boundary(a.sent) {
        let logprobs = std::mem::take(&mut a.unsent_logprobs);
        let _ = a
            .job
            .events
            .send(Event::Text(text[a.sent..end].to_string(), logprobs));
        a.sent = end;
    }
    match finish {
        Some(reason) => {
            let _ = a.job.events.send(Event::Done {
                finish_reason: reason,
                completion_tokens: a.generated,
            });
            false
        }
        None => true,
    }
}
