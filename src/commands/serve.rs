//! `nuwa serve`: an OpenAI-compatible HTTP server over a run or an HF folder.

use crate::args::{byte_size, positive_seconds};
use crate::device;
use anyhow::{bail, Result};
use clap::Args;
use nuwa_hf::{InferenceModel, ModelSource};
use std::path::PathBuf;

#[derive(Args)]
pub struct ServeArgs {
    /// A run folder to serve (its newest checkpoint).
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    run: Option<PathBuf>,
    /// A Hugging Face checkpoint folder to serve.
    #[arg(long, value_name = "HF_DIR")]
    model: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The model id clients use (default: the folder's name).
    #[arg(long)]
    name: Option<String>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Memory of the paged key/value cache (e.g. 2GiB, 512MiB): admission waits for free
    /// blocks. Default: enough for --max-batch sequences of the full context, at most 4 GiB.
    #[arg(long, value_parser = byte_size)]
    kv_cache_memory: Option<u64>,
    /// Most tokens one forward pass takes: every decoding sequence's next token, then prompt
    /// chunks in what is left (a long prompt is prefilled over several steps).
    #[arg(long, default_value_t = 512)]
    max_step_tokens: usize,
    /// Most requests waiting for a slot; more get 503.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Seconds a client may take to send its request body (then 408).
    #[arg(long, default_value_t = 30.0, value_parser = positive_seconds)]
    body_timeout: f64,
    /// Seconds a client may take to send a request's headers (then the connection closes).
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    header_timeout: f64,
    /// Most connections open at once; one more is answered 503 and closed.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// After SIGTERM or SIGINT, seconds requests in flight get to finish before the server
    /// closes them and exits.
    #[arg(long, default_value_t = 30.0, value_parser = positive_seconds)]
    drain_timeout: f64,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let device = device::parse_device(&a.device)?;
    let source = match (a.run, a.model) {
        (Some(run), _) => ModelSource::Run(run),
        (None, Some(dir)) => ModelSource::Hf(dir),
        (None, None) => bail!("pass --run RUN_DIR or --model HF_DIR"),
    };
    if a.max_batch == 0 || a.max_queue == 0 || a.max_connections == 0 || a.max_step_tokens == 0 {
        bail!("--max-batch, --max-queue, --max-connections and --max-step-tokens must be positive");
    }
    let model = InferenceModel::load(&source, &device)?;
    let shape = nuwa_model::batch::PagedBatch::shape(&model.model);
    let per_block = shape.bytes_per_block();
    let kv_cache_bytes = match a.kv_cache_memory {
        Some(bytes) => usize::try_from(bytes).unwrap_or(usize::MAX),
        None => (a.max_batch * shape.blocks_for(model.model.max_positions) * per_block)
            .min(4 << 30)
            .min(nuwa_core::hardware::available_memory().map_or(usize::MAX, |m| m as usize / 2))
            .max(per_block),
    };
    if kv_cache_bytes < per_block {
        bail!(
            "--kv-cache-memory: {kv_cache_bytes} bytes is less than one key/value block ({per_block} bytes: \
             {} positions of this model)",
            shape.block_size
        );
    }
    if let Some(available) = nuwa_core::hardware::available_memory() {
        if kv_cache_bytes as u64 > available {
            bail!(
                "--kv-cache-memory: {:.1} GiB is more than this machine's available memory ({:.1} GiB)",
                kv_cache_bytes as f64 / (1u64 << 30) as f64,
                available as f64 / (1u64 << 30) as f64
            );
        }
    }
    eprintln!(
        "key/value cache: {} blocks of {} positions ({:.0} MiB)",
        kv_cache_bytes / per_block,
        shape.block_size,
        (kv_cache_bytes / per_block * per_block) as f64 / (1u64 << 20) as f64
    );
    nuwa_serve::serve(
        model,
        device,
        nuwa_serve::ServeConfig {
            host: a.host,
            port: a.port,
            model_name: a.name.unwrap_or_else(|| source.name()),
            max_batch: a.max_batch,
            max_queue: a.max_queue,
            kv_cache_bytes,
            max_step_tokens: a.max_step_tokens,
            max_body_bytes: a.max_body_bytes,
            body_timeout: std::time::Duration::from_secs_f64(a.body_timeout),
            header_timeout: std::time::Duration::from_secs_f64(a.header_timeout),
            max_connections: a.max_connections,
            drain_timeout: std::time::Duration::from_secs_f64(a.drain_timeout),
        },
    )
}
