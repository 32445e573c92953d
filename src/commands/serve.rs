//! `nuwa serve`: an OpenAI-compatible HTTP server over a run or an HF folder.

use crate::args::positive_seconds;
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
    /// Most sequences decoded together (bounds the KV cache).
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
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
    if a.max_batch == 0 || a.max_queue == 0 || a.max_connections == 0 {
        bail!("--max-batch, --max-queue and --max-connections must be positive");
    }
    let model = InferenceModel::load(&source, &device)?;
    nuwa_serve::serve(
        model,
        device,
        nuwa_serve::ServeConfig {
            host: a.host,
            port: a.port,
            model_name: a.name.unwrap_or_else(|| source.name()),
            max_batch: a.max_batch,
            max_queue: a.max_queue,
            max_body_bytes: a.max_body_bytes,
            body_timeout: std::time::Duration::from_secs_f64(a.body_timeout),
            header_timeout: std::time::Duration::from_secs_f64(a.header_timeout),
            max_connections: a.max_connections,
            drain_timeout: std::time::Duration::from_secs_f64(a.drain_timeout),
        },
    )
}
