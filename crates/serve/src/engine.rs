//! The engine: one thread owns the model and runs continuous batching over a paged key/value
//! cache. Requests wait in a bounded queue and are admitted when the blocks their prompt and
//! `max_tokens` need are free (a prompt's cached prefix costs nothing). Every step is one
//! forward pass over the decoding sequences' next tokens plus as much prompt as the step's
//! token budget leaves (chunked prefill: a long prompt never stalls the others). Finished or
//! abandoned sequences give their blocks back between steps. Each request gets its tokens on
//! its own channel, so a slow reader never holds up the batch.

use crate::constrain::{Constraint, Grammars};
use crate::metrics::Metrics;
use llguidance::Matcher;
use nuwa_data::TextStream;
use nuwa_hf::{InferenceModel, Message};
use nuwa_model::batch::{Chunk, PagedBatch, SeqId};
use nuwa_model::generate::pick_token;
use nuwa_model::{token_logprobs, SamplingOptions, TokenLogprobs};
use rayon::prelude::*;
use std::collections::VecDeque;
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
    /// Choices wanted (`n`): they share the prompt's blocks; choice `i` samples with seed
    /// `seed + i`.
    pub choices: usize,
    /// A grammar the output must follow (`response_format`, forced tool calls).
    pub constraint: Option<Constraint>,
    /// Answer with the prompt's mean-pooled final hidden state instead of generating.
    pub embed: bool,
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
    /// The prompt was accepted: its length in tokens, and how many of them came from the
    /// prefix cache.
    Started {
        prompt_tokens: usize,
        cached_tokens: usize,
    },
    /// New text of choice `index` (may be empty while a stop string might be forming), with
    /// the log-probabilities of the tokens it completes when they were asked for.
    Text {
        index: usize,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        index: usize,
        finish_reason: &'static str,
        completion_tokens: usize,
    },
    /// The request cannot be served: an HTTP status and a message.
    Rejected { status: u16, message: String },
    /// An embedding request's vector and its prompt's length.
    Embedding { vector: Vec<f32>, tokens: usize },
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Most requests waiting for a slot; beyond it requests get 503.
    pub max_queue: usize,
    /// Bytes of the paged key/value pool (`--kv-cache-memory`).
    pub kv_cache_bytes: usize,
    /// Most tokens one forward pass takes: decoding rows first, prompt chunks in what is left.
    pub max_step_tokens: usize,
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

/// A job whose prompt is encoded and checked, waiting for blocks.
struct Waiting {
    job: Job,
    ids: Vec<u32>,
    matcher: Option<Matcher>,
}

/// Where a sequence is: computing its prompt (`done` positions of it so far), or decoding.
enum Phase {
    Prefill { ids: Vec<u32>, done: usize },
    Decode,
}

struct Active {
    job: Arc<JobShared>,
    seq: SeqId,
    /// Which choice of its request this sequence is.
    index: usize,
    phase: Phase,
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
    /// When its last token was handed out (inter-token latency), `None` before the first.
    last_token: Option<Instant>,
    /// The request's grammar, fed every token sampled.
    matcher: Option<Matcher>,
    /// The grammar is complete: the pending token ends the sequence.
    grammar_done: bool,
}

/// What every choice of one request shares.
struct JobShared {
    options: SamplingOptions,
    stop: Vec<String>,
    logprobs: Option<usize>,
    events: UnboundedSender<Event>,
    received: Instant,
    logit_bias: Vec<(u32, f32)>,
    choices: usize,
}

pub fn start(
    model: InferenceModel,
    device: burn::tensor::Device,
    cfg: EngineConfig,
) -> EngineHandle {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(cfg.max_queue.max(1));
    let metrics = Arc::new(Metrics::default());
    let m = metrics.clone();
    // The model thread is one of rayon's workers: the parallel ops it starts (products,
    // attention, sampling) then run with it taking part, instead of putting it to sleep and
    // waking it once per op.
    rayon::spawn(move || run(model, device, cfg, rx, m));
    EngineHandle { queue: tx, metrics }
}

fn run(
    model: InferenceModel,
    device: burn::tensor::Device,
    cfg: EngineConfig,
    rx: Receiver<Job>,
    metrics: Arc<Metrics>,
) {
    let mut batch = PagedBatch::new(&model.model, &device, cfg.kv_cache_bytes);
    // Built at the first constrained request (it reads the whole vocabulary).
    let mut grammars: Option<Result<Grammars, String>> = None;
    metrics.set_kv(batch.usage());
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut active: Vec<Active> = Vec::new();
    loop {
        // Take in new jobs; block only when there is nothing to do.
        while waiting.len() < cfg.max_batch.max(1) {
            let job = if active.is_empty() && waiting.is_empty() {
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
            if job.embed {
                embed(&model, &device, job);
                continue;
            }
            if job.constraint.is_some() && grammars.is_none() {
                grammars = Some(Grammars::new(&model).map_err(|e| format!("{e:#}")));
            }
            if let Some(w) = check(&model, &batch, grammars.as_ref(), job) {
                waiting.push_back(w);
            }
        }
        // Admit in arrival order while rows and blocks allow (the first that does not fit
        // waits, and so do those behind it: no request is starved by smaller ones).
        while let Some(w) = waiting.front() {
            let n = w.job.choices;
            let positions = w.ids.len() + w.job.options.max_tokens;
            if w.job.events.is_closed() {
                waiting.pop_front();
                continue;
            }
            if active.len() + n > cfg.max_batch.max(n)
                || batch.blocks_for(positions, n) > batch.available_blocks()
            {
                break;
            }
            let Some(w) = waiting.pop_front() else { break };
            let Some((seq, cached)) = batch.admit(&w.ids, positions) else {
                waiting.push_front(w);
                break;
            };
            active.push(admit(w, seq, cached, &metrics));
        }
        if active.is_empty() {
            continue;
        }
        // Hand out each decoding row's pending token (detokenising and looking for stop
        // strings on every core at once), then retire the finished rows.
        let keep: Vec<bool> = active
            .par_iter_mut()
            .map(|a| match a.phase {
                Phase::Decode => emit(&model, a, &metrics),
                Phase::Prefill { .. } => !a.job.events.is_closed(),
            })
            .collect();
        let mut rows = keep.iter();
        active.retain(|a| {
            let keep = rows.next().copied().unwrap_or(false);
            if !keep {
                batch.release(a.seq);
            }
            keep
        });
        metrics.set_batch(active.len());
        if active.is_empty() {
            metrics.set_kv(batch.usage());
            continue;
        }
        let started = Instant::now();
        let plan = schedule(&active, cfg.max_step_tokens.max(1));
        let chunks: Vec<Chunk> = plan
            .iter()
            .map(|&(row, ref range, logits)| Chunk {
                seq: active[row].seq,
                tokens: match &active[row].phase {
                    Phase::Prefill { ids, .. } => &ids[range.clone()],
                    Phase::Decode => std::slice::from_ref(&active[row].next),
                },
                logits,
            })
            .collect();
        let tokens: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let logits = batch.run(&model.model, &chunks);
        drop(chunks);
        metrics.step(plan.len(), tokens, started.elapsed().as_secs_f64());
        // Each row's new logits (decoding rows, and prompts completed this step).
        let mut logits = logits.into_iter();
        let mut row_logits: Vec<Option<Vec<f32>>> = vec![None; active.len()];
        let mut prefilled = Vec::new();
        for (row, range, wants) in plan {
            let a = &mut active[row];
            if let Phase::Prefill { ids, done } = &mut a.phase {
                *done = range.end;
                if *done < ids.len() {
                    continue;
                }
                a.phase = Phase::Decode;
                prefilled.push(row);
            }
            if wants {
                row_logits[row] = logits.next();
            }
        }
        // Further choices start from the grammar as it was before the first token.
        let snapshots: Vec<Option<Matcher>> = prefilled
            .iter()
            .map(|&row| {
                let a = &active[row];
                let forks = a.job.choices > 1;
                a.matcher
                    .as_ref()
                    .filter(|_| forks)
                    .map(Matcher::deep_clone)
            })
            .collect();
        // Sampling (a pass over the vocabulary per row) runs on every core at once.
        let eos = grammars
            .as_ref()
            .and_then(|g| g.as_ref().ok())
            .map_or(0, |g| g.eos);
        active.par_iter_mut().zip(&row_logits).for_each(|(a, l)| {
            if let Some(l) = l {
                sample(a, l, eos);
            }
        });
        // Further choices of a just-prefilled prompt: its blocks shared, the same first
        // logits, their own seeds. Admission counted their blocks, so the forks fit.
        for (row, snapshot) in prefilled.into_iter().zip(snapshots) {
            let Some(l) = &row_logits[row] else { continue };
            for index in 1..active[row].job.choices {
                let parent = &active[row];
                let positions = batch.len(parent.seq) + parent.job.options.max_tokens;
                let Some(seq) = batch.fork(parent.seq, positions) else {
                    break;
                };
                let mut child = parent.child(seq, index);
                child.matcher = snapshot.as_ref().map(Matcher::deep_clone);
                sample(&mut child, l, eos);
                active.push(child);
            }
        }
        metrics.set_kv(batch.usage());
    }
}

/// This step's work: `(row, token range, logits wanted)` — every decoding row's one token,
/// then prompt chunks, oldest first, in the token budget that is left (at least one chunk,
/// so a step always makes progress).
fn schedule(active: &[Active], budget: usize) -> Vec<(usize, std::ops::Range<usize>, bool)> {
    let mut plan = Vec::new();
    let mut left = budget;
    for (row, a) in active.iter().enumerate() {
        if let Phase::Decode = a.phase {
            plan.push((row, 0..1, true));
            left = left.saturating_sub(1);
        }
    }
    for (row, a) in active.iter().enumerate() {
        if let Phase::Prefill { ids, done } = &a.phase {
            if left == 0 && !plan.is_empty() {
                break;
            }
            let end = ids.len().min(done + left.max(1));
            left = left.saturating_sub(end - done);
            plan.push((row, *done..end, end == ids.len()));
        }
    }
    plan
}

/// Samples a row's next token from its logits (its bias, its grammar, its sampler, its random
/// state). A complete grammar ends the row with `eos`.
fn sample(a: &mut Active, logits: &[f32], eos: u32) {
    let biased = biased(logits, &a.job.logit_bias);
    let allowed = match a.matcher.as_mut() {
        Some(m) if m.is_stopped() => {
            a.next = eos;
            a.grammar_done = true;
            return;
        }
        Some(m) => match crate::constrain::masked(m, &biased) {
            Ok(l) => Some(l),
            Err(_) => {
                a.next = eos;
                a.grammar_done = true;
                return;
            }
        },
        None => None,
    };
    a.next = pick_token(
        allowed.as_deref().unwrap_or(&biased),
        &a.job.options,
        &mut a.rng,
    );
    if let Some(m) = a.matcher.as_mut() {
        if a.next == eos || m.consume_token(a.next).is_err() {
            a.grammar_done = true;
        }
    }
    a.next_logprobs = a.job.logprobs.map(|n| token_logprobs(logits, a.next, n));
}

impl Active {
    /// Choice `index` of the same request, continuing from the same prompt in `seq`.
    fn child(&self, seq: SeqId, index: usize) -> Active {
        Active {
            job: self.job.clone(),
            seq,
            index,
            phase: Phase::Decode,
            generated: 0,
            stream: TextStream::default(),
            text: String::new(),
            sent: 0,
            rng: self.job.options.seed.wrapping_add(index as u64),
            next: 0,
            next_logprobs: None,
            unsent_logprobs: Vec::new(),
            last_token: None,
            matcher: None,
            grammar_done: false,
        }
    }
}

/// Answers an embedding job: the mean over positions of the final hidden states.
fn embed(model: &InferenceModel, device: &burn::tensor::Device, job: Job) {
    let ids = match &job.prompt {
        Prompt::Text(t) => model.encode(t),
        Prompt::Tokens(ids) => Ok(ids.clone()),
        Prompt::Chat(m) => model.encode_chat(m),
    };
    let event = match ids {
        Ok(ids) if ids.is_empty() => Event::Rejected {
            status: 400,
            message: "input: encodes to no tokens".into(),
        },
        Ok(ids) if ids.iter().any(|&t| t as usize >= model.config.vocab_size) => Event::Rejected {
            status: 400,
            message: format!(
                "input: a token id is outside the vocabulary (0..{})",
                model.config.vocab_size
            ),
        },
        Ok(ids) if ids.len() > model.model.max_positions => Event::Rejected {
            status: 400,
            message: format!(
                "input: {} tokens is more than this model's context ({})",
                ids.len(),
                model.model.max_positions
            ),
        },
        Ok(ids) => {
            let tokens = nuwa_model::batch::token_rows(&ids, 1, device);
            let hidden = model.model.hidden_states(tokens).mean_dim(1);
            Event::Embedding {
                vector: hidden.into_data().iter::<f32>().collect(),
                tokens: ids.len(),
            }
        }
        Err(e) => Event::Rejected {
            status: 400,
            message: format!("input: {e:#}"),
        },
    };
    let _ = job.events.send(event);
}

/// Encodes and checks a job; `None` (the client told why) if it cannot be served.
fn check(
    model: &InferenceModel,
    batch: &PagedBatch,
    grammars: Option<&Result<Grammars, String>>,
    job: Job,
) -> Option<Waiting> {
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
    let positions = ids.len() + job.options.max_tokens;
    if positions > batch.capacity {
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
    let usage = batch.usage();
    if batch.blocks_for(positions, job.choices) > usage.blocks {
        reject(
            400,
            format!(
                "the prompt ({} tokens) and max_tokens ({}) for {} choice(s) need more key/value \
                 cache than the server has ({} positions; --kv-cache-memory)",
                ids.len(),
                job.options.max_tokens,
                job.choices,
                usage.blocks * usage.block_size
            ),
        );
        return None;
    }
    let matcher = match (&job.constraint, grammars) {
        (None, _) => None,
        (Some(c), Some(Ok(g))) => match g.matcher(c) {
            Ok(m) => Some(m),
            Err(e) => {
                reject(400, format!("response_format: {e}"));
                return None;
            }
        },
        (Some(_), _) => {
            let why = grammars
                .and_then(|g| g.as_ref().err())
                .cloned()
                .unwrap_or_default();
            reject(
                400,
                format!(
                    "response_format: constrained decoding is not available for this model: {why}"
                ),
            );
            return None;
        }
    };
    Some(Waiting { job, ids, matcher })
}

/// Starts an admitted job's prefill (after the positions its cached prefix already holds).
fn admit(w: Waiting, seq: SeqId, cached: usize, metrics: &Metrics) -> Active {
    let job = w.job;
    let _ = job.events.send(Event::Started {
        prompt_tokens: w.ids.len(),
        cached_tokens: cached,
    });
    metrics.request();
    metrics.queue_wait(job.received.elapsed().as_secs_f64());
    metrics.prompt(w.ids.len(), cached);
    let shared = JobShared {
        options: job.options,
        stop: job.stop,
        logprobs: job.logprobs,
        events: job.events,
        received: job.received,
        logit_bias: job.logit_bias,
        choices: job.choices.max(1),
    };
    Active {
        matcher: w.matcher,
        grammar_done: false,
        rng: shared.options.seed,
        job: Arc::new(shared),
        seq,
        index: 0,
        phase: Phase::Prefill {
            ids: w.ids,
            done: cached,
        },
        generated: 0,
        stream: TextStream::default(),
        text: String::new(),
        sent: 0,
        next: 0,
        next_logprobs: None,
        unsent_logprobs: Vec::new(),
        last_token: None,
    }
}

/// Sends the row's pending token as text; false when the row is finished.
/// Admission promised the blocks of prompt + max_tokens, so a row never runs out of room.
fn emit(model: &InferenceModel, a: &mut Active, metrics: &Metrics) -> bool {
    if a.job.events.is_closed() {
        if a.index == 0 {
            metrics.cancelled();
        }
        return false; // client disconnected: free the slot
    }
    match a.last_token {
        None => metrics.first_token(a.job.received.elapsed().as_secs_f64()),
        Some(t) => metrics.inter_token(t.elapsed().as_secs_f64()),
    }
    a.last_token = Some(Instant::now());
    let is_eos = a.grammar_done || model.eos.contains(&a.next);
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
        let _ = a.job.events.send(Event::Text {
            index: a.index,
            text: text[a.sent..end].to_string(),
            logprobs,
        });
        a.sent = end;
    }
    match finish {
        Some(reason) => {
            let _ = a.job.events.send(Event::Done {
                index: a.index,
                finish_reason: reason,
                completion_tokens: a.generated,
            });
            false
        }
        None => true,
    }
}
