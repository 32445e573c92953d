//! `nuwa serve`: an OpenAI-compatible HTTP server with continuous batching over any backend.

pub mod connections;
pub mod constrain;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod tools;

use anyhow::{Context, Result};
use nuwa_hf::InferenceModel;
use std::sync::Arc;

pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// The model id clients use.
    pub model_name: String,
    pub max_batch: usize,
    pub max_queue: usize,
    /// Bytes of the paged key/value cache.
    pub kv_cache_bytes: usize,
    /// Most tokens one forward pass takes.
    pub max_step_tokens: usize,
    pub max_body_bytes: usize,
    /// How long a client may take to send its request body once the headers are in.
    pub body_timeout: std::time::Duration,
    /// How long a client may take to send a request's headers (and how long an idle
    /// keep-alive connection is kept waiting for the next request).
    pub header_timeout: std::time::Duration,
    /// Most connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// After SIGTERM or SIGINT: how long requests in flight may take to finish.
    pub drain_timeout: std::time::Duration,
}

/// Serves until SIGTERM or SIGINT, then drains (see [`connections`]). Prints
/// `listening on http://ADDR` once the socket is bound.
pub fn serve(model: InferenceModel, device: burn::tensor::Device, cfg: ServeConfig) -> Result<()> {
    let context = model.model.max_positions;
    let engine = engine::start(
        model,
        device,
        engine::EngineConfig {
            max_batch: cfg.max_batch.max(1),
            max_queue: cfg.max_queue.max(1),
            kv_cache_bytes: cfg.kv_cache_bytes,
            max_step_tokens: cfg.max_step_tokens.max(1),
        },
    );
    let state = Arc::new(http::AppState::new(
        engine,
        cfg.model_name.clone(),
        context,
        cfg.body_timeout,
    ));
    let app = http::router(state, cfg.max_body_bytes);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("--host/--port: cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        println!("listening on http://{local} (model `{}`)", cfg.model_name);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        connections::serve(listener, app, &cfg).await
    })
}
