//! The OpenAI-compatible HTTP API over the engine: `/v1/completions`, `/v1/chat/completions`
//! (with `stream: true` as server-sent events; `response_format` and `tools` constrained by a
//! grammar), `/v1/embeddings`, `/v1/models`, `/health`, `/metrics`.
//! Every bad request gets a 4xx with an OpenAI-style error object; nothing a client sends can
//! take the server down.

use crate::constrain::Constraint;
use crate::engine::{EngineHandle, Event, Job, Prompt, TokenLogprob};
use crate::tools::{self, ToolUse};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nuwa_model::SamplingOptions;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

pub struct AppState {
    pub engine: EngineHandle,
    /// The model id clients address.
    pub model: String,
    pub created: u64,
    pub context: usize,
    /// A body slower than this is answered 408, so a slow sender cannot hold a task forever.
    pub body_timeout: Duration,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(
        engine: EngineHandle,
        model: String,
        context: usize,
        body_timeout: Duration,
    ) -> Self {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            engine,
            model,
            created,
            context,
            body_timeout,
            next_id: AtomicU64::new(1),
        }
    }
}

pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        // As OpenAI answers: an unknown URL is a 404 naming it (not `model_not_found`), and a
        // known URL with the wrong method a 405 with an error object, not an empty body.
        .fallback(|req: Request| async move {
            error_with_code(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                None,
                Value::Null,
                format!("Invalid URL ({} {})", req.method(), req.uri().path()),
            )
        })
        .method_not_allowed_fallback(|req: Request| async move {
            error_with_code(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                None,
                Value::Null,
                format!("{} is not allowed on {}", req.method(), req.uri().path()),
            )
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// An OpenAI-style error response (404 means an unknown model here; unknown URLs are the
/// router's fallback).
fn error(
    status: StatusCode,
    kind: &str,
    param: Option<&str>,
    message: impl Into<String>,
) -> Response {
    let code = match status {
        StatusCode::NOT_FOUND => json!("model_not_found"),
        StatusCode::SERVICE_UNAVAILABLE => json!("overloaded"),
        _ => Value::Null,
    };
    error_with_code(status, kind, param, code, message)
}

fn error_with_code(
    status: StatusCode,
    kind: &str,
    param: Option<&str>,
    code: Value,
    message: impl Into<String>,
) -> Response {
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": param, "code": code}});
    (status, Json(body)).into_response()
}

/// The queue is full: 503, retry later.
fn at_capacity() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        None,
        "the server is at capacity; retry later",
    )
}

/// The engine thread is gone (it never should be): 500.
fn engine_stopped() -> Response {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        None,
        "the engine stopped",
    )
}

fn bad(param: &str, message: impl Into<String>) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some(param),
        message,
    )
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    Json(json!({"object": "list", "data": [
        {"id": s.model, "object": "model", "created": s.created, "owned_by": "nuwa"}
    ]}))
    .into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.engine.metrics.render(),
    )
        .into_response()
}

/// Sampling fields shared by both endpoints, validated.
struct Sampling {
    options: SamplingOptions,
    stop: Vec<String>,
    stream: bool,
    /// `Some(n)`: answer with each token's log-probability and the `n` most likely.
    logprobs: Option<usize>,
    logit_bias: Vec<(u32, f32)>,
    /// Choices wanted (`n`).
    choices: usize,
    /// Completions: answer with the prompt before each completion.
    echo: bool,
    /// `response_format`: the grammar the output must follow.
    constraint: Option<Constraint>,
    /// `stream_options.include_usage`: end a stream with a usage chunk.
    include_usage: bool,
}

/// `response_format`: `text`, `json_object`, or `json_schema` with its `schema`.
#[allow(clippy::result_large_err)] // a finished error response, built once per bad request
fn response_format(b: &serde_json::Map<String, Value>) -> Result<Option<Constraint>, Response> {
    let Some(f) = b.get("response_format").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonSchema(json!({"type": "object"})))),
        Some("json_schema") => match f.get("json_schema").and_then(|j| j.get("schema")) {
            Some(schema @ Value::Object(_)) => Ok(Some(Constraint::JsonSchema(schema.clone()))),
            Some(Value::Bool(true)) => Ok(Some(Constraint::JsonSchema(json!({})))),
            _ => Err(bad(
                "response_format",
                "`json_schema` needs `{\"json_schema\": {\"name\": …, \"schema\": {…}}}`",
            )),
        },
        _ => Err(bad(
            "response_format",
            "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

/// Most choices one request may ask for.
const MAX_CHOICES: u64 = 16;

/// Most alternatives per token a client may ask for (OpenAI's limit).
const MAX_TOP_LOGPROBS: u64 = 20;

// A rejected request returns its finished error response; it is built once per bad request,
// so the size of `Response` in the `Err` variant costs nothing worth boxing.
async fn read_body(s: &AppState, req: Request) -> Result<serde_json::Map<String, Value>, Response> {
    // The size limit is `DefaultBodyLimit`'s, applied by the `Bytes` extractor.
    match tokio::time::timeout(s.body_timeout, Bytes::from_request(req, &())).await {
        Ok(body) => parse_body(body),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            None,
            format!(
                "the request body did not arrive within {} s",
                s.body_timeout.as_secs_f64()
            ),
        )),
    }
}

#[allow(clippy::result_large_err)]
fn parse_body(
    body: Result<Bytes, BytesRejection>,
) -> Result<serde_json::Map<String, Value>, Response> {
    let body = body.map_err(|r| {
        let status = r.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request body too large".to_string()
        } else {
            r.body_text()
        };
        error(status, "invalid_request_error", None, message)
    })?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| bad("body", format!("the body is not valid JSON: {e}")))?;
    match value {
        Value::Object(m) => Ok(m),
        _ => Err(bad("body", "the body must be a JSON object")),
    }
}

#[allow(clippy::result_large_err)]
fn sampling(
    s: &AppState,
    b: &serde_json::Map<String, Value>,
    default_max: usize,
    chat: bool,
) -> Result<Sampling, Response> {
    if let Some(m) = b.get("model") {
        let m = m
            .as_str()
            .ok_or_else(|| bad("model", "`model` must be a string"))?;
        if m != s.model {
            return Err(error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model"),
                format!(
                    "the model `{m}` does not exist; this server serves `{}`",
                    s.model
                ),
            ));
        }
    }
    // A numeric field within [lo, hi], or its default when absent; `kind` names the type.
    #[allow(clippy::result_large_err)]
    fn ranged<T: PartialOrd + std::fmt::Display>(
        b: &serde_json::Map<String, Value>,
        k: &str,
        (default, lo, hi): (T, T, T),
        (kind, read): (&str, fn(&Value) -> Option<T>),
    ) -> Result<T, Response> {
        match b.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => read(v)
                .filter(|x| *x >= lo && *x <= hi)
                .ok_or_else(|| bad(k, format!("`{k}` must be {kind} in [{lo}, {hi}], got {v}"))),
        }
    }
    let number = |k: &str, default: f64, lo: f64, hi: f64| {
        ranged(b, k, (default, lo, hi), ("a number", Value::as_f64))
    };
    let integer = |k: &str, default: u64, lo: u64, hi: u64| {
        ranged(b, k, (default, lo, hi), ("an integer", Value::as_u64))
    };
    let max_tokens = integer("max_tokens", default_max as u64, 1, s.context as u64)? as usize;
    let temperature = number("temperature", 1.0, 0.0, 2.0)?;
    let top_p = number("top_p", 1.0, 0.0, 1.0)?;
    if top_p == 0.0 {
        return Err(bad("top_p", "`top_p` must be greater than 0"));
    }
    let top_k = integer("top_k", 0, 0, 1 << 20)? as usize;
    let seed = integer("seed", 0, 0, u64::MAX)?;
    let choices = integer("n", 1, 1, MAX_CHOICES)? as usize;
    if integer("best_of", 1, 1, 1).is_err() {
        return Err(bad("best_of", "only best_of = 1 is supported"));
    }
    let echo = match b.get("echo") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) if !chat => true,
        Some(Value::Bool(true)) => return Err(bad("echo", "`echo` is a completions field")),
        Some(_) => return Err(bad("echo", "`echo` must be true or false")),
    };
    // `{"50256": -100}`: token id → bias in [-100, 100], added to its logit.
    let logit_bias = match b.get("logit_bias") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(m)) => {
            let mut out = Vec::with_capacity(m.len());
            for (k, v) in m {
                let token: u32 = k
                    .parse()
                    .map_err(|_| bad("logit_bias", format!("`{k}` is not a token id")))?;
                match v.as_f64() {
                    Some(x) if (-100.0..=100.0).contains(&x) => out.push((token, x as f32)),
                    _ => {
                        return Err(bad(
                            "logit_bias",
                            format!("the bias of {k} must be a number in [-100, 100]"),
                        ))
                    }
                }
            }
            out
        }
        Some(_) => {
            return Err(bad(
                "logit_bias",
                "`logit_bias` must map token ids to numbers",
            ))
        }
    };
    let stop = match b.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        Some(_) => return Err(bad("stop", "`stop` must be a string or up to 4 strings")),
    };
    if stop.iter().any(String::is_empty) {
        return Err(bad("stop", "stop strings must not be empty"));
    }
    let stream = match b.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(x)) => *x,
        Some(_) => return Err(bad("stream", "`stream` must be true or false")),
    };
    // Chat: `logprobs: true` and `top_logprobs: N`; completions: `logprobs: N`.
    let logprobs = if chat {
        let wanted = match b.get("logprobs") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(x)) => *x,
            Some(_) => return Err(bad("logprobs", "`logprobs` must be true or false")),
        };
        let top = integer("top_logprobs", 0, 0, MAX_TOP_LOGPROBS)? as usize;
        if !wanted && b.get("top_logprobs").is_some_and(|v| !v.is_null()) {
            return Err(bad("top_logprobs", "`top_logprobs` needs `logprobs: true`"));
        }
        wanted.then_some(top)
    } else {
        match b.get("logprobs") {
            None | Some(Value::Null) => None,
            Some(_) => Some(integer("logprobs", 0, 0, MAX_TOP_LOGPROBS)? as usize),
        }
    };
    if echo && logprobs.is_some() {
        return Err(bad(
            "echo",
            "`echo` with `logprobs` (log-probabilities of the prompt) is not supported",
        ));
    }
    let constraint = response_format(b)?;
    let include_usage = match b.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(_) => {
                return Err(bad(
                    "stream_options",
                    "`stream_options.include_usage` must be true or false",
                ))
            }
        },
        Some(_) => return Err(bad("stream_options", "`stream_options` must be an object")),
    };
    Ok(Sampling {
        include_usage,
        constraint,
        logprobs,
        logit_bias,
        choices,
        echo,
        options: SamplingOptions {
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            window: 0,
        },
        stop,
        stream,
    })
}

async fn completions(State(s): State<Arc<AppState>>, req: Request) -> Response {
    let b = match read_body(&s, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let prompt = match b.get("prompt") {
        Some(Value::String(p)) => Prompt::Text(p.clone()),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Prompt::Text(a[0].as_str().unwrap_or_default().to_string())
        }
        // Token ids: `[1, 2, 3]`, or one such list in a list.
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_array() => match token_ids(&a[0]) {
            Some(ids) => Prompt::Tokens(ids),
            None => return bad("prompt", "token ids must be non-negative integers"),
        },
        Some(ids @ Value::Array(a)) if a.iter().all(Value::is_number) => match token_ids(ids) {
            Some(ids) => Prompt::Tokens(ids),
            None => return bad("prompt", "token ids must be non-negative integers"),
        },
        Some(_) => {
            return bad(
                "prompt",
                "`prompt` must be a string or a list of token ids (batches of prompts are not \
                 supported)",
            )
        }
        None => return bad("prompt", "`prompt` is required"),
    };
    match sampling(&s, &b, 16, false) {
        Ok(opts) if opts.echo && !matches!(prompt, Prompt::Text(_)) => {
            bad("echo", "`echo` needs a text prompt")
        }
        Ok(opts) => run(s, prompt, opts, false).await,
        Err(r) => r,
    }
}

/// `[1, 2, 3]` as token ids; `None` for anything but a list of integers in u32's range.
fn token_ids(v: &Value) -> Option<Vec<u32>> {
    v.as_array()?
        .iter()
        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
        .collect()
}

/// A message's `content`: a string, or OpenAI's list of parts whose text parts are joined
/// (`[{"type": "text", "text": "…"}]`); other part types (images, audio) are refused.
fn message_text(content: &Value) -> Result<String, String> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(
                |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                    (Some(kind), _) if kind != "text" => {
                        Err(format!("content parts of type `{kind}` are not supported"))
                    }
                    _ => Err("a text part needs a string `text`".to_string()),
                },
            )
            .collect::<Result<Vec<&str>, String>>()
            .map(|texts| texts.concat()),
        _ => Err("`content` must be a string or a list of parts".to_string()),
    }
}

async fn chat_completions(State(s): State<Arc<AppState>>, req: Request) -> Response {
    let b = match read_body(&s, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(Value::Array(list)) = b.get("messages") else {
        return bad("messages", "`messages` must be a list of {role, content}");
    };
    let mut messages = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        let calls = m.get("tool_calls").filter(|c| !c.is_null());
        // An assistant turn that only called tools has `content: null`.
        let content = match m.get("content") {
            None | Some(Value::Null) if calls.is_some() => Some(Ok(String::new())),
            c => c.map(message_text),
        };
        match (role, content) {
            (Some(r), Some(Ok(c))) => messages.push(tools::history_message(r, c, calls)),
            (_, Some(Err(e))) => return bad("messages", format!("messages[{i}]: {e}")),
            _ => {
                return bad(
                    "messages",
                    format!("messages[{i}] needs a string `role` and `content`"),
                )
            }
        }
    }
    if messages.is_empty() {
        return bad("messages", "`messages` must not be empty");
    }
    let tool_use = match tools::read(&b) {
        Ok(t) => t,
        Err((field, message)) => return bad(field, message),
    };
    let mut opts = match sampling(&s, &b, 128, true) {
        Ok(opts) => opts,
        Err(r) => return r,
    };
    let tool_use = match tool_use {
        Some((t, constraint)) => {
            if constraint.is_some() {
                if opts.constraint.is_some() {
                    return bad(
                        "response_format",
                        "`response_format` cannot be combined with a forced `tool_choice`",
                    );
                }
                opts.constraint = constraint;
            }
            tools::offer(&mut messages, &t);
            Some(t)
        }
        None => None,
    };
    run_with(s, Prompt::Chat(messages), opts, true, tool_use).await
}

/// `/v1/embeddings`: each input's mean-pooled final hidden state.
async fn embeddings(State(s): State<Arc<AppState>>, req: Request) -> Response {
    let b = match read_body(&s, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let inputs: Vec<Prompt> = match b.get("input") {
        Some(Value::String(t)) => vec![Prompt::Text(t.clone())],
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => a
            .iter()
            .map(|t| Prompt::Text(t.as_str().unwrap_or_default().to_string()))
            .collect(),
        Some(ids @ Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_number) => {
            match token_ids(ids) {
                Some(ids) => vec![Prompt::Tokens(ids)],
                None => return bad("input", "token ids must be non-negative integers"),
            }
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_array) => {
            match a.iter().map(token_ids).collect::<Option<Vec<_>>>() {
                Some(lists) => lists.into_iter().map(Prompt::Tokens).collect(),
                None => return bad("input", "token ids must be non-negative integers"),
            }
        }
        _ => {
            return bad(
                "input",
                "`input` must be a string, a list of strings, or token ids (a list, or lists)",
            )
        }
    };
    let base64 = match b.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return bad(
                "encoding_format",
                format!("`encoding_format` must be \"float\" or \"base64\", got `{other}`"),
            )
        }
    };
    let mut data = Vec::new();
    let mut total = 0;
    for (index, prompt) in inputs.into_iter().enumerate() {
        let (tx, mut rx) = unbounded_channel();
        let job = Job {
            prompt,
            options: SamplingOptions::default(),
            stop: Vec::new(),
            logprobs: None,
            events: tx,
            received: std::time::Instant::now(),
            logit_bias: Vec::new(),
            choices: 1,
            constraint: None,
            embed: true,
        };
        if s.engine.submit(job).is_err() {
            s.engine.metrics.rejected();
            return at_capacity();
        }
        match rx.recv().await {
            Some(Event::Embedding { vector, tokens }) => {
                total += tokens;
                let embedding = if base64 {
                    let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
                    Value::String(base64_encode(&bytes))
                } else {
                    json!(vector)
                };
                data.push(json!({"object": "embedding", "index": index, "embedding": embedding}));
            }
            Some(Event::Rejected { status, message }) => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
                return error(status, "invalid_request_error", Some("input"), message);
            }
            _ => return engine_stopped(),
        }
    }
    Json(json!({"object": "list", "data": data, "model": s.model,
                "usage": {"prompt_tokens": total, "total_tokens": total}}))
    .into_response()
}

/// Standard base64 with padding (what OpenAI's clients decode for `encoding_format: "base64"`).
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn run(s: Arc<AppState>, prompt: Prompt, o: Sampling, chat: bool) -> Response {
    run_with(s, prompt, o, chat, None).await
}

/// [`run`] with tools in play: the answer's calls are parsed out of its text.
async fn run_with(
    s: Arc<AppState>,
    prompt: Prompt,
    o: Sampling,
    chat: bool,
    tools: Option<ToolUse>,
) -> Response {
    let (tx, mut rx) = unbounded_channel();
    let echo = match (&prompt, o.echo) {
        (Prompt::Text(t), true) => Some(t.clone()),
        _ => None,
    };
    let job = Job {
        constraint: o.constraint.clone(),
        embed: false,
        choices: o.choices,
        prompt,
        options: o.options,
        stop: o.stop,
        logprobs: o.logprobs,
        events: tx,
        received: std::time::Instant::now(),
        logit_bias: o.logit_bias,
    };
    if s.engine.submit(job).is_err() {
        s.engine.metrics.rejected();
        return at_capacity();
    }
    let prompt = match rx.recv().await {
        Some(Event::Started {
            prompt_tokens,
            cached_tokens,
        }) => PromptUsage {
            tokens: prompt_tokens,
            cached: cached_tokens,
        },
        Some(Event::Rejected { status, message }) => {
            s.engine.metrics.rejected();
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            return error(status, "invalid_request_error", None, message);
        }
        _ => return engine_stopped(),
    };
    let id = format!(
        "{}-{}",
        if chat { "chatcmpl" } else { "cmpl" },
        s.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let answer = Answer {
        id,
        chat,
        logprobs: o.logprobs.is_some(),
        choices: o.choices,
        echo,
        tools,
    };
    if o.stream && answer.tools.is_some() {
        // Calls are known only once the answer is complete: it is sent as one delta.
        let whole_answer = collect(rx, answer.choices, None).await;
        stream_collected(s, answer, whole_answer)
    } else if o.stream {
        let usage = o.include_usage.then_some(prompt);
        stream(s, rx, answer, usage)
    } else {
        whole(s, rx, answer, prompt).await
    }
}

/// A chat answer's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let top: Vec<Value> = t
                .top
                .iter()
                .map(|(tok, bytes, lp)| json!({"token": tok, "logprob": lp, "bytes": bytes}))
                .collect();
            json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes, "top_logprobs": top})
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// A completion's `logprobs` (the legacy format): parallel lists, `text_offset` in characters
/// from the start of the completion (`start` for a stream's later chunks).
fn completion_logprobs(tokens: &[TokenLogprob], start: usize) -> Value {
    let mut offset = start;
    let mut offsets = Vec::with_capacity(tokens.len());
    for t in tokens {
        offsets.push(offset);
        offset += t.token.chars().count();
    }
    let top: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let m: serde_json::Map<String, Value> = t
                .top
                .iter()
                .map(|(tok, _, lp)| (tok.clone(), json!(lp)))
                .collect();
            Value::Object(m)
        })
        .collect();
    json!({
        "tokens": tokens.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

/// How a request wants its answer.
struct Answer {
    id: String,
    chat: bool,
    logprobs: bool,
    choices: usize,
    /// The prompt text to put before each completion (`echo`).
    echo: Option<String>,
    /// Tools offered: calls are parsed out of the answer.
    tools: Option<ToolUse>,
}

/// Every choice's text, log-probabilities and finish reason, and the completion tokens.
struct Collected {
    texts: Vec<String>,
    tokens: Vec<Vec<TokenLogprob>>,
    reasons: Vec<&'static str>,
    completion: usize,
}

async fn collect(mut rx: UnboundedReceiver<Event>, n: usize, echo: Option<&str>) -> Collected {
    let mut c = Collected {
        texts: vec![echo.unwrap_or_default().to_string(); n],
        tokens: vec![Vec::new(); n],
        reasons: vec!["stop"; n],
        completion: 0,
    };
    while let Some(e) = rx.recv().await {
        match e {
            Event::Text {
                index,
                text,
                logprobs,
            } if index < n => {
                c.texts[index].push_str(&text);
                c.tokens[index].extend(logprobs);
            }
            Event::Done {
                index,
                finish_reason,
                completion_tokens,
            } if index < n => {
                c.reasons[index] = finish_reason;
                c.completion += completion_tokens;
            }
            _ => {}
        }
    }
    c
}

/// A chat choice's message: its text, or the tool calls parsed out of it (then
/// `finish_reason: "tool_calls"`).
fn chat_message(
    text: String,
    tools: Option<&ToolUse>,
    reason: &'static str,
    id: u64,
) -> (Value, &'static str) {
    if let Some(t) = tools {
        let (rest, calls) = tools::parse(&text, t, id);
        if !calls.is_empty() {
            let content = if rest.is_empty() {
                Value::Null
            } else {
                Value::String(rest)
            };
            return (
                json!({"role": "assistant", "content": content, "tool_calls": calls}),
                "tool_calls",
            );
        }
    }
    (json!({"role": "assistant", "content": text}), reason)
}

/// A collected answer sent as a stream: per choice its role, its content or calls, its end.
fn stream_collected(s: Arc<AppState>, a: Answer, c: Collected) -> Response {
    let mut events = Vec::new();
    let chunk = |choice: Value| {
        json!({"id": a.id, "object": "chat.completion.chunk", "created": s.created,
               "model": s.model, "choices": [choice]})
    };
    for (i, text) in c.texts.into_iter().enumerate() {
        let (message, reason) = chat_message(text, a.tools.as_ref(), c.reasons[i], 0);
        events.push(chunk(
            json!({"index": i, "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": null, "logprobs": null}),
        ));
        let mut delta = json!({});
        if let Some(content) = message["content"].as_str() {
            delta["content"] = json!(content);
        }
        if let Some(calls) = message["tool_calls"].as_array() {
            let indexed: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(k, call)| {
                    let mut call = call.clone();
                    call["index"] = json!(k);
                    call
                })
                .collect();
            delta["tool_calls"] = json!(indexed);
        }
        events.push(chunk(
            json!({"index": i, "delta": delta, "finish_reason": null, "logprobs": null}),
        ));
        events.push(chunk(
            json!({"index": i, "delta": {}, "finish_reason": reason, "logprobs": null}),
        ));
    }
    let data = tokio_stream::iter(events)
        .map(|v| Ok::<_, Infallible>(SseEvent::default().data(v.to_string())))
        .chain(tokio_stream::once(Ok(SseEvent::default().data("[DONE]"))));
    Sse::new(data).into_response()
}

/// A prompt's length and how much of it came from the prefix cache.
struct PromptUsage {
    tokens: usize,
    cached: usize,
}

async fn whole(
    s: Arc<AppState>,
    rx: UnboundedReceiver<Event>,
    a: Answer,
    prompt: PromptUsage,
) -> Response {
    let c = collect(rx, a.choices, a.echo.as_deref()).await;
    let usage = json!({"prompt_tokens": prompt.tokens, "completion_tokens": c.completion,
                       "total_tokens": prompt.tokens + c.completion,
                       "prompt_tokens_details": {"cached_tokens": prompt.cached}});
    let first_call = s.next_id.fetch_add(a.choices as u64, Ordering::Relaxed);
    let choices: Vec<Value> = c
        .texts
        .into_iter()
        .enumerate()
        .map(|(i, text)| {
            let logprobs = match (a.logprobs, a.chat) {
                (false, _) => Value::Null,
                (true, true) => chat_logprobs(&c.tokens[i]),
                (true, false) => completion_logprobs(&c.tokens[i], 0),
            };
            if a.chat {
                let (message, reason) =
                    chat_message(text, a.tools.as_ref(), c.reasons[i], first_call + i as u64);
                json!({"index": i, "message": message, "finish_reason": reason, "logprobs": logprobs})
            } else {
                json!({"index": i, "text": text, "finish_reason": c.reasons[i], "logprobs": logprobs})
            }
        })
        .collect();
    let object = if a.chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    Json(
        json!({"id": a.id, "object": object, "created": s.created, "model": s.model,
                "choices": choices, "usage": usage}),
    )
    .into_response()
}

/// The answer as server-sent events, as its text arrives; with `usage` (`stream_options:
/// {"include_usage": true}`) a last chunk with no choices carries the token counts.
fn stream(
    s: Arc<AppState>,
    mut rx: UnboundedReceiver<Event>,
    a: Answer,
    usage: Option<PromptUsage>,
) -> Response {
    let chat = a.chat;
    let (object, created, model, id) = (
        if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        },
        s.created,
        s.model.clone(),
        a.id,
    );
    let want_logprobs = a.logprobs;
    let (usage_id, usage_model) = (id.clone(), model.clone());
    // Characters of completion text streamed so far per choice (the legacy `text_offset`).
    let mut streamed = vec![0; a.choices];
    let mut chunk = move |index: usize,
                          delta: Option<&str>,
                          reason: Option<&str>,
                          lps: &[TokenLogprob]|
          -> Value {
        let offset = streamed.get(index).copied().unwrap_or(0);
        let logprobs = match (want_logprobs && delta.is_some(), chat) {
            (false, _) => Value::Null,
            (true, true) => chat_logprobs(lps),
            (true, false) => completion_logprobs(lps, offset),
        };
        if let Some(n) = streamed.get_mut(index) {
            *n += delta.map_or(0, |t| t.chars().count());
        }
        let choice = if chat {
            let d = match delta {
                Some(t) => json!({"content": t}),
                None => json!({}),
            };
            json!({"index": index, "delta": d, "finish_reason": reason, "logprobs": logprobs})
        } else {
            json!({"index": index, "text": delta.unwrap_or(""), "finish_reason": reason, "logprobs": logprobs})
        };
        json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
    };
    // Chat opens each choice with its role; an echoed prompt comes before each completion.
    let first: Vec<Value> = (0..a.choices)
        .filter_map(|i| {
            if chat {
                let mut c = chunk(i, None, None, &[]);
                c["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
                Some(c)
            } else {
                a.echo.as_deref().map(|p| chunk(i, Some(p), None, &[]))
            }
        })
        .collect();
    // A task turns engine events into chunks (and counts the tokens for the usage chunk).
    let (tx, chunks) = unbounded_channel::<Value>();
    let usage_object = object;
    tokio::spawn(async move {
        let mut completion = 0;
        while let Some(e) = rx.recv().await {
            let c = match e {
                Event::Text {
                    index,
                    text,
                    logprobs,
                } if !text.is_empty() => chunk(index, Some(&text), None, &logprobs),
                Event::Done {
                    index,
                    finish_reason,
                    completion_tokens,
                } => {
                    completion += completion_tokens;
                    chunk(index, None, Some(finish_reason), &[])
                }
                _ => continue,
            };
            if tx.send(c).is_err() {
                return; // the client left
            }
        }
        if let Some(p) = usage {
            let _ = tx.send(
                json!({"id": usage_id, "object": usage_object, "created": created,
                "model": usage_model, "choices": [],
                "usage": {"prompt_tokens": p.tokens, "completion_tokens": completion,
                          "total_tokens": p.tokens + completion,
                          "prompt_tokens_details": {"cached_tokens": p.cached}}}),
            );
        }
    });
    let events = UnboundedReceiverStream::new(chunks);
    let data = tokio_stream::iter(first)
        .chain(events)
        .map(|v| Ok::<_, Infallible>(SseEvent::default().data(v.to_string())))
        .chain(tokio_stream::once(Ok(SseEvent::default().data("[DONE]"))));
    Sse::new(data).into_response()
}
