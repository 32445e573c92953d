//! Server counters, exposed at `GET /metrics` in the Prometheus text format.

use nuwa_model::batch::KvUsage;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

pub struct Metrics {
    started: Instant,
    requests: AtomicU64,
    cancelled: AtomicU64,
    rejected: AtomicU64,
    tokens: AtomicU64,
    queue: AtomicI64,
    batch: AtomicU64,
    steps: AtomicU64,
    /// Sum of rows over decode steps, for the mean batch size.
    rows: AtomicU64,
    /// Microseconds, summed.
    step_us: AtomicU64,
    ttft_us: AtomicU64,
    ttft_count: AtomicU64,
    queue_wait_us: AtomicU64,
    queue_wait_count: AtomicU64,
    /// Tokens through the model (prompt chunks and decoded tokens).
    step_tokens: AtomicU64,
    inter_token_us: AtomicU64,
    inter_token_count: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_prompt_tokens: AtomicU64,
    /// The paged key/value pool, as of the last step.
    kv: std::sync::Mutex<Option<KvUsage>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            requests: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            queue: AtomicI64::new(0),
            batch: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            step_us: AtomicU64::new(0),
            ttft_us: AtomicU64::new(0),
            ttft_count: AtomicU64::new(0),
            queue_wait_us: AtomicU64::new(0),
            queue_wait_count: AtomicU64::new(0),
            step_tokens: AtomicU64::new(0),
            inter_token_us: AtomicU64::new(0),
            inter_token_count: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            cached_prompt_tokens: AtomicU64::new(0),
            kv: std::sync::Mutex::new(None),
        }
    }
}

impl Metrics {
    pub fn queued(&self, delta: i64) {
        self.queue.fetch_add(delta, Ordering::Relaxed);
    }
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }
    pub fn cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }
    pub fn token(&self) {
        self.tokens.fetch_add(1, Ordering::Relaxed);
    }
    pub fn set_batch(&self, rows: usize) {
        self.batch.store(rows as u64, Ordering::Relaxed);
    }
    /// One forward pass: `rows` sequences, `tokens` tokens through the model.
    pub fn step(&self, rows: usize, tokens: usize, seconds: f64) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.step_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.step_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }
    pub fn first_token(&self, seconds: f64) {
        self.ttft_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.ttft_count.fetch_add(1, Ordering::Relaxed);
    }
    /// Seconds between two tokens of one sequence, as its client sees them.
    pub fn inter_token(&self, seconds: f64) {
        self.inter_token_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.inter_token_count.fetch_add(1, Ordering::Relaxed);
    }
    /// An admitted prompt's length and how much of it the prefix cache held.
    pub fn prompt(&self, tokens: usize, cached: usize) {
        self.prompt_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        self.cached_prompt_tokens
            .fetch_add(cached as u64, Ordering::Relaxed);
    }
    pub fn set_kv(&self, usage: KvUsage) {
        if let Ok(mut kv) = self.kv.lock() {
            *kv = Some(usage);
        }
    }
    /// Seconds a request waited before its prefill began.
    pub fn queue_wait(&self, seconds: f64) {
        self.queue_wait_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.queue_wait_count.fetch_add(1, Ordering::Relaxed);
    }
    pub fn batch_size(&self) -> u64 {
        self.batch.load(Ordering::Relaxed)
    }

    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let uptime = self.started.elapsed().as_secs_f64().max(1e-9);
        let steps = g(&self.steps).max(1) as f64;
        let ttft_n = g(&self.ttft_count).max(1) as f64;
        let wait_n = g(&self.queue_wait_count).max(1) as f64;
        let kv = self.kv.lock().ok().and_then(|k| *k);
        let (blocks, used, block_size) = kv.map_or((0, 0, 0), |k| (k.blocks, k.used, k.block_size));
        let prefix = kv.map(|k| k.prefix).unwrap_or_default();
        let lines = [
            (
                "nuwa_requests_total",
                "counter",
                "Requests admitted",
                g(&self.requests) as f64,
            ),
            (
                "nuwa_requests_rejected_total",
                "counter",
                "Requests refused (queue full or invalid)",
                g(&self.rejected) as f64,
            ),
            (
                "nuwa_requests_cancelled_total",
                "counter",
                "Requests whose client went away",
                g(&self.cancelled) as f64,
            ),
            (
                "nuwa_generated_tokens_total",
                "counter",
                "Tokens generated",
                g(&self.tokens) as f64,
            ),
            (
                "nuwa_tokens_per_second",
                "gauge",
                "Generated tokens per second since start",
                g(&self.tokens) as f64 / uptime,
            ),
            (
                "nuwa_queue_depth",
                "gauge",
                "Requests waiting for a batch slot",
                self.queue.load(Ordering::Relaxed).max(0) as f64,
            ),
            (
                "nuwa_batch_size",
                "gauge",
                "Sequences in the running batch",
                g(&self.batch) as f64,
            ),
            (
                "nuwa_batch_size_mean",
                "gauge",
                "Mean sequences per forward pass",
                g(&self.rows) as f64 / steps,
            ),
            (
                "nuwa_decode_step_seconds_mean",
                "gauge",
                "Mean seconds per forward pass",
                g(&self.step_us) as f64 / 1e6 / steps,
            ),
            (
                "nuwa_time_to_first_token_seconds_mean",
                "gauge",
                "Mean seconds from a request's arrival (queueing included) to its first token",
                g(&self.ttft_us) as f64 / 1e6 / ttft_n,
            ),
            (
                "nuwa_queue_time_seconds_mean",
                "gauge",
                "Mean seconds a request waited for a batch slot before its prefill",
                g(&self.queue_wait_us) as f64 / 1e6 / wait_n,
            ),
            (
                "nuwa_inter_token_latency_seconds_mean",
                "gauge",
                "Mean seconds between two tokens of one sequence",
                g(&self.inter_token_us) as f64 / 1e6 / g(&self.inter_token_count).max(1) as f64,
            ),
            (
                "nuwa_step_tokens_mean",
                "gauge",
                "Mean tokens per forward pass (decoded tokens and prompt chunks)",
                g(&self.step_tokens) as f64 / steps,
            ),
            (
                "nuwa_kv_blocks_total",
                "gauge",
                "Blocks in the paged key/value cache",
                blocks as f64,
            ),
            (
                "nuwa_kv_blocks_used",
                "gauge",
                "Blocks held by running sequences",
                used as f64,
            ),
            (
                "nuwa_kv_blocks_free",
                "gauge",
                "Blocks not held by a running sequence (cached prefixes included)",
                (blocks - used) as f64,
            ),
            (
                "nuwa_kv_block_size",
                "gauge",
                "Positions per key/value block",
                block_size as f64,
            ),
            (
                "nuwa_prefix_cache_hit_rate",
                "gauge",
                "Prompt blocks found in the prefix cache, of those looked up",
                prefix.hits as f64 / prefix.lookups.max(1) as f64,
            ),
            (
                "nuwa_prompt_tokens_total",
                "counter",
                "Prompt tokens admitted",
                g(&self.prompt_tokens) as f64,
            ),
            (
                "nuwa_prompt_tokens_cached_total",
                "counter",
                "Prompt tokens served from the prefix cache",
                g(&self.cached_prompt_tokens) as f64,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in lines {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        out
    }
}
