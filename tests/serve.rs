//! The OpenAI-compatible server, driven over loopback HTTP: answers equal to single-sequence
//! greedy decoding (batched or not), 32 parallel streams, bad requests, overload, client
//! disconnects, a bounded load test, and (where installed) the official `openai` package.

mod common;

use burn::tensor::Device;
use nuwa_hf::{InferenceModel, ModelSource};
use nuwa_model::SamplingOptions;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama")
}

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fixture loaded in this process (to compute what the server should answer).
fn fixture_model() -> InferenceModel {
    InferenceModel::load(&ModelSource::Hf(fixture()), &Device::default()).unwrap()
}

fn server(extra: &[&str]) -> Server {
    server_of(&fixture(), extra)
}

fn server_of(model: &Path, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nuwa"))
        .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    Server { child, url }
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    match ureq::post(url).send_json(body.clone()) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

fn post_raw(url: &str, body: &[u8]) -> (u16, Value) {
    match ureq::post(url)
        .set("content-type", "application/json")
        .send_bytes(body)
    {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{e}"),
    }
}

/// The text of an SSE completion stream, and whether it ended with [DONE].
fn stream_text(url: &str, body: &Value) -> (String, bool) {
    let r = ureq::post(url).send_json(body.clone()).unwrap();
    let mut text = String::new();
    let mut done = false;
    for line in BufReader::new(r.into_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        let c = &v["choices"][0];
        text.push_str(
            c["text"]
                .as_str()
                .or(c["delta"]["content"].as_str())
                .unwrap_or(""),
        );
    }
    (text, done)
}

/// What one sequence decodes alone, greedily (the library, no server, no batching).
fn alone(prompt: &str, max_tokens: usize) -> String {
    alone_of(&fixture(), prompt, max_tokens)
}

fn alone_of(model: &Path, prompt: &str, max_tokens: usize) -> String {
    let device = Device::default();
    let m = InferenceModel::load(&ModelSource::Hf(model.to_path_buf()), &device).unwrap();
    let ids = m.encode(prompt).unwrap();
    let opts = SamplingOptions {
        max_tokens,
        temperature: 0.0,
        ..Default::default()
    };
    m.tokenizer
        .decode(&m.generate(&ids, &opts, &device, |_| {}))
}

fn prompt(i: usize) -> String {
    (0..1 + i % 7)
        .map(|j| format!("w{}", (i * 13 + j * 5) % 80))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn completions_chat_and_streams_answer_like_single_sequence_greedy() {
    let s = server(&[]);
    let want = alone("w5 w6 w7", 10);
    let (code, r) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"model": "llama", "prompt": "w5 w6 w7", "max_tokens": 10, "temperature": 0}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], want);
    assert_eq!(r["usage"]["completion_tokens"], 10);
    assert_eq!(r["usage"]["prompt_tokens"], 3);
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    let (text, done) = stream_text(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "w5 w6 w7", "max_tokens": 10, "temperature": 0, "stream": true}),
    );
    assert!(done);
    assert_eq!(text, want);
    // A stop string ends the text before it.
    let cut = want.split(' ').nth(2).unwrap();
    let (_, r) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "w5 w6 w7", "max_tokens": 10, "temperature": 0, "stop": [format!(" {cut}")]}),
    );
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert!(
        want.starts_with(r["choices"][0]["text"].as_str().unwrap()),
        "{r}"
    );
    let (code, r) = post(
        &format!("{}/v1/chat/completions", s.url),
        &json!({"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["usage"]["prompt_tokens"], 7, "the chat template's tokens");
    let models: Value = ureq::get(&format!("{}/v1/models", s.url))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(models["data"][0]["id"], "llama");
    let metrics = ureq::get(&format!("{}/metrics", s.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(metrics.contains("nuwa_requests_total 4"), "{metrics}");
    assert!(metrics.contains("# TYPE nuwa_time_to_first_token_seconds_mean gauge"));
}

#[test]
fn thirty_two_parallel_streams_complete_and_match_unbatched_greedy() {
    let s = server(&[]);
    let url = format!("{}/v1/completions", s.url);
    let handles: Vec<_> = (0..32)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                stream_text(&url, &json!({"prompt": prompt(i), "max_tokens": 12, "temperature": 0, "stream": true}))
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (text, done) = h.join().unwrap();
        assert!(done, "stream {i} did not finish");
        assert_eq!(text, alone(&prompt(i), 12), "stream {i}");
    }
    let metrics = ureq::get(&format!("{}/metrics", s.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let gauge = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.split(' ').nth(1)?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
    };
    let mean = gauge("nuwa_batch_size_mean");
    assert!(mean > 2.0, "requests were not batched: mean batch {mean}");
    // Time to first token counts from arrival, so it includes the time spent queued.
    let (ttft, queued) = (
        gauge("nuwa_time_to_first_token_seconds_mean"),
        gauge("nuwa_queue_time_seconds_mean"),
    );
    assert!(ttft > 0.0 && ttft >= queued, "ttft {ttft}, queued {queued}");
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let s = server(&["--max-body-bytes", "4096"]);
    let url = format!("{}/v1/completions", s.url);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "not valid JSON"),
        (b"[1, 2]".to_vec(), 400, "JSON object"),
        (
            json!({"prompt": "w1", "model": "gpt-4"})
                .to_string()
                .into_bytes(),
            404,
            "does not exist",
        ),
        (
            json!({"max_tokens": 3}).to_string().into_bytes(),
            400,
            "`prompt` is required",
        ),
        (
            json!({"prompt": "w1", "temperature": -1})
                .to_string()
                .into_bytes(),
            400,
            "`temperature`",
        ),
        (
            json!({"prompt": "w1", "max_tokens": 100000})
                .to_string()
                .into_bytes(),
            400,
            "`max_tokens`",
        ),
        (
            json!({"prompt": "w1", "n": 0}).to_string().into_bytes(),
            400,
            "[1, 16]",
        ),
        (
            json!({"prompt": "w1", "top_p": 0}).to_string().into_bytes(),
            400,
            "top_p",
        ),
        (
            json!({"prompt": "w1", "stop": 7}).to_string().into_bytes(),
            400,
            "`stop`",
        ),
        (
            json!({"prompt": vec!["w1"; 120].join(" "), "max_tokens": 20})
                .to_string()
                .into_bytes(),
            400,
            "context is 128 tokens",
        ),
        (
            json!({"prompt": "w1 ".repeat(3000)})
                .to_string()
                .into_bytes(),
            413,
            "too large",
        ),
    ];
    for (body, status, needle) in cases {
        let (code, r) = post_raw(&url, &body);
        assert_eq!(
            code,
            status,
            "{} -> {r}",
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
        let msg = r["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{needle:?} not in {r}");
        assert!(r["error"]["type"].is_string(), "{r}");
    }
    let (code, r) = post(
        &format!("{}/v1/chat/completions", s.url),
        &json!({"messages": [{"role": "user"}]}),
    );
    assert_eq!(code, 400, "{r}");
    let (code, r) = post_raw(&format!("{}/v1/nothing", s.url), b"{}");
    assert_eq!(code, 404);
    assert_eq!(r["error"]["code"], Value::Null, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/nothing"),
        "{r}"
    );
    // The wrong method on a real route: 405 with an error object, not an empty body.
    match ureq::get(&format!("{}/v1/completions", s.url)).call() {
        Err(ureq::Error::Status(405, r)) => {
            let r: Value = r.into_json().unwrap();
            assert!(
                r["error"]["message"].as_str().unwrap().contains("GET"),
                "{r}"
            );
        }
        other => panic!("expected 405, got {other:?}"),
    }
    let health: Value = ureq::get(&format!("{}/health", s.url))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(health["status"], "ok");
    let (code, _) = post(&url, &json!({"prompt": "w1", "max_tokens": 2}));
    assert_eq!(code, 200);
}

/// `n` greedy completions of `prompt(i)` sent at once, each on its own thread; their answers.
fn greedy_at_once(url: &str, n: usize, max_tokens: usize) -> Vec<(u16, Value)> {
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let url = url.to_string();
            std::thread::spawn(move || {
                post(
                    &url,
                    &json!({"prompt": prompt(i), "max_tokens": max_tokens, "temperature": 0}),
                )
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn overload_is_refused_and_a_disconnect_frees_its_slot() {
    let s = server(&[
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--kv-cache-memory",
        "64MiB",
    ]);
    let url = format!("{}/v1/completions", s.url);
    let codes: Vec<u16> = greedy_at_once(&url, 8, 100)
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert!(codes.contains(&503), "{codes:?}");
    assert!(codes.contains(&200), "{codes:?}");
    // A client that leaves mid-stream frees its slots for the next request (the end token is
    // biased away, so the answer cannot finish on its own first).
    let m = fixture_model();
    let no_end: serde_json::Map<String, Value> =
        m.eos.iter().map(|e| (e.to_string(), json!(-100))).collect();
    // Sixteen choices of 120 tokens: long enough that the client is gone well before the end,
    // even on a loaded machine.
    let body = json!({"prompt": "w1", "max_tokens": 120, "n": 16, "stream": true,
                      "logit_bias": no_end})
    .to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // Raw socket: read up to the first event, then close (an HTTP client may read on to
    // reuse the connection).
    let mut conn = half_open(&s.url, request.as_bytes());
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("data:") {
        let mut buf = [0u8; 256];
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the first event");
        seen.extend_from_slice(&buf[..n]);
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = ureq::get(&format!("{}/metrics", s.url))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        if m.contains("nuwa_requests_cancelled_total 1") && m.contains("nuwa_batch_size 0") {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was not freed: {m}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _) = post(&url, &json!({"prompt": "w1", "max_tokens": 2}));
    assert_eq!(code, 200);
}

#[test]
fn a_slow_sender_gets_408_and_the_server_keeps_serving() {
    use std::io::Write;
    let s = server(&["--body-timeout", "1"]);
    let addr = s.url.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Headers promise 100 bytes; only 11 ever come.
    conn.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"prompt\": ",
    )
    .unwrap();
    let started = Instant::now();
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 408", "{}", String::from_utf8_lossy(&head));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "answered after {waited:?}"
    );
    let (code, r) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "w1", "max_tokens": 2}),
    );
    assert_eq!(code, 200, "{r}");
    let out = Command::new(env!("CARGO_BIN_EXE_nuwa"))
        .args([
            "serve",
            "--model",
            fixture().to_str().unwrap(),
            "--body-timeout",
            "0",
        ])
        .output()
        .unwrap();
    common::assert_clean_error(&out, "--body-timeout");
}

#[test]
fn bounded_load_test_reports_throughput_and_latency() {
    let s = server(&[]);
    let url = format!("{}/v1/completions", s.url);
    let started = Instant::now();
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let url = url.clone();
            std::thread::spawn(move || {
                (0..8)
                    .map(|i| {
                        let t0 = Instant::now();
                        let (code, r) = post(&url, &json!({"prompt": prompt(t * 8 + i), "max_tokens": 16, "temperature": 0.7, "seed": i}));
                        assert_eq!(code, 200, "{r}");
                        (t0.elapsed().as_secs_f64(), r["usage"]["completion_tokens"].as_u64().unwrap())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<(f64, u64)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let wall = started.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = results.iter().map(|r| r.0).collect();
    lat.sort_by(f64::total_cmp);
    let tokens: u64 = results.iter().map(|r| r.1).sum();
    let (p50, p99) = (
        lat[lat.len() / 2],
        lat[(lat.len() * 99 / 100).min(lat.len() - 1)],
    );
    println!(
        "load: 64 requests, 8 concurrent: {:.0} tokens/s, p50 {:.1} ms, p99 {:.1} ms",
        tokens as f64 / wall,
        p50 * 1e3,
        p99 * 1e3
    );
    assert_eq!(results.len(), 64);
    assert!(tokens > 0 && p50 > 0.0 && p99 >= p50);
}

#[test]
fn the_official_openai_client_works() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let has_openai = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_openai {
        assert!(
            std::env::var("CI").is_err(),
            "CI must install the openai package (pip install openai)"
        );
        eprintln!("skipped: the openai Python package is not installed");
        return;
    }
    let s = server(&[]);
    let out = Command::new("python3")
        .arg(&script)
        .arg(format!("{}/v1", s.url))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Each generated token's log-probabilities as the library computes them alone (greedy).
fn logprobs_alone(prompt: &str, max_tokens: usize, top: usize) -> Vec<nuwa_model::TokenLogprobs> {
    let device = Device::default();
    let m = InferenceModel::load(&ModelSource::Hf(fixture()), &device).unwrap();
    let ids = m.encode(prompt).unwrap();
    let opts = SamplingOptions {
        max_tokens,
        temperature: 0.0,
        ..Default::default()
    };
    let mut out = Vec::new();
    m.generate_scored(&ids, &opts, &device, |t, logits| {
        out.push(nuwa_model::token_logprobs(logits, t, top));
    });
    out
}

#[test]
fn logprobs_in_completions_chat_and_streams_match_the_model() {
    let s = server(&[]);
    let want = logprobs_alone("w5 w6 w7", 6, 3);
    let close = |a: &Value, b: f32| (a.as_f64().unwrap() as f32 - b).abs() < 1e-4;

    // Legacy completions: parallel lists, `logprobs: N` alternatives.
    let (code, r) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "w5 w6 w7", "max_tokens": 6, "temperature": 0, "logprobs": 3}),
    );
    assert_eq!(code, 200, "{r}");
    let lp = &r["choices"][0]["logprobs"];
    let got = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{lp}");
    for (g, w) in got.iter().zip(&want) {
        assert!(close(g, w.logprob), "{g} vs {}", w.logprob);
        assert!(w.logprob <= 0.0);
    }
    let top0 = lp["top_logprobs"][0].as_object().unwrap();
    assert_eq!(top0.len(), 3, "{lp}");
    let text: String = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect::<Vec<_>>()
        .join("");
    // (This word-level tokenizer's decoder puts the spaces between tokens.)
    let answer: String = r["choices"][0]["text"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(text, answer);

    // Chat: `logprobs: true` with `top_logprobs`, in the answer and in a stream.
    let body = json!({"messages": [{"role": "user", "content": "w5 w6 w7"}], "max_tokens": 4,
                      "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let (code, r) = post(&format!("{}/v1/chat/completions", s.url), &body);
    assert_eq!(code, 200, "{r}");
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty(), "{r}");
    for c in content {
        let top = c["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], c["token"], "{c}");
        assert!(close(
            &top[0]["logprob"],
            c["logprob"].as_f64().unwrap() as f32
        ));
    }
    let mut streamed = Vec::new();
    let stream = ureq::post(&format!("{}/v1/chat/completions", s.url))
        .send_json(
            json!({"messages": [{"role": "user", "content": "w5 w6 w7"}], "max_tokens": 4,
                          "temperature": 0, "logprobs": true, "stream": true}),
        )
        .unwrap();
    for line in BufReader::new(stream.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(v) = line
            .strip_prefix("data: ")
            .and_then(|d| serde_json::from_str::<Value>(d).ok())
        {
            if let Some(list) = v["choices"][0]["logprobs"]["content"].as_array() {
                streamed.extend(list.iter().map(|c| c["logprob"].clone()));
            }
        }
    }
    let whole: Vec<Value> = content.iter().map(|c| c["logprob"].clone()).collect();
    assert_eq!(streamed, whole);

    // Asking wrongly is a 400 naming the field.
    let (code, r) = post(
        &format!("{}/v1/chat/completions", s.url),
        &json!({"messages": [{"role": "user", "content": "w1"}], "top_logprobs": 2}),
    );
    assert_eq!(
        (code, r["error"]["param"].as_str()),
        (400, Some("top_logprobs")),
        "{r}"
    );
    let (code, r) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "w1", "logprobs": 99}),
    );
    assert_eq!(
        (code, r["error"]["param"].as_str()),
        (400, Some("logprobs")),
        "{r}"
    );
}

#[test]
fn a_ling_2_checkpoint_is_served_like_single_sequence_greedy() {
    let v2 = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/bailing_moe_v2");
    let s = server_of(&v2, &[]);
    for (i, p) in ["w5 w6 w7", "w11", "w3 w9 w27 w40"].iter().enumerate() {
        let want = alone_of(&v2, p, 8);
        let (code, r) = post(
            &format!("{}/v1/completions", s.url),
            &json!({"prompt": p, "max_tokens": 8, "temperature": 0}),
        );
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["choices"][0]["text"], want, "prompt {i}");
    }
}

/// Connects and sends `bytes`, leaving the connection open.
fn half_open(url: &str, bytes: &[u8]) -> std::net::TcpStream {
    use std::io::Write;
    let mut conn = std::net::TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    conn.write_all(bytes).unwrap();
    conn
}

/// Seconds until the server closes `conn` (reads to EOF).
fn closed_after(mut conn: std::net::TcpStream) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut got = Vec::new();
    let _ = conn.read_to_end(&mut got);
    (started.elapsed(), got)
}

#[test]
fn slow_or_idle_connections_are_closed_and_over_the_limit_refused() {
    let s = server(&["--header-timeout", "1", "--max-connections", "3"]);
    // One header line, then nothing: closed at the header deadline.
    let (waited, got) = closed_after(half_open(&s.url, b"GET /health HTTP/1.1\r\n"));
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    // A keep-alive connection left idle after its answer is closed the same way.
    let mut conn = half_open(&s.url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut head = [0u8; 15];
    conn.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 OK");
    let (waited, _) = closed_after(conn);
    assert!(waited < Duration::from_secs(5), "idle for {waited:?}");

    // Three idle connections fill the limit: a fourth is told 503 at once and closed.
    let idle: Vec<_> = (0..3).map(|_| half_open(&s.url, b"")).collect();
    std::thread::sleep(Duration::from_millis(300));
    let (waited, got) = closed_after(half_open(&s.url, b""));
    let got = String::from_utf8_lossy(&got).to_string();
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    assert!(got.contains("\"code\":\"overloaded\""), "{got}");
    assert!(waited < Duration::from_secs(2));
    // Once they go, requests are served again.
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    let (code, r) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "w1", "max_tokens": 2}),
    );
    assert_eq!(code, 200, "{r}");
}

fn signal(s: &Server, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn sigterm_drains_requests_in_flight_then_exits() {
    // On a loaded machine the signal can come late enough that every stream is done: then
    // nothing was in flight to drain and the scenario is run again (at most three times).
    for _ in 0..3 {
        if sigterm_while_streaming() {
            return;
        }
    }
    panic!("three times every stream had finished before SIGTERM: nothing was in flight to drain");
}

/// One SIGTERM while 48 streams share one decoding slot; false when no stream was still
/// running after the signal (nothing was tested).
fn sigterm_while_streaming() -> bool {
    let mut s = server(&["--max-batch", "1", "--header-timeout", "1"]);
    let url = format!("{}/v1/completions", s.url);
    let streams: Vec<_> = (0..48)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let out = stream_text(
                    &url,
                    &json!({"prompt": prompt(i), "max_tokens": 100, "stream": true}),
                );
                (out, Instant::now())
            })
        })
        .collect();
    // A half-sent request must not hold the shutdown up past its header deadline.
    let _stuck = half_open(&s.url, b"POST /v1/completions HTTP/1.1\r\n");
    std::thread::sleep(Duration::from_millis(100));
    signal(&s, "TERM");
    let signalled = Instant::now();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        std::net::TcpStream::connect(s.url.trim_start_matches("http://")).is_err(),
        "still accepting after SIGTERM"
    );
    let mut finished_after_signal = 0;
    for t in streams {
        let ((text, done), finished) = t.join().unwrap();
        assert!(done, "a stream in flight was cut: {text:?}");
        finished_after_signal += (finished > signalled) as usize;
    }
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(15),
        "exit took {:?}",
        signalled.elapsed()
    );
    finished_after_signal > 0
}

#[test]
fn token_id_prompts_and_content_parts_are_read_as_openai_sends_them() {
    let s = server(&[]);
    let url = format!("{}/v1/completions", s.url);
    let m = fixture_model();
    let ids = m.encode(&prompt(3)).unwrap();
    let want = alone(&prompt(3), 8);
    for body in [
        json!({"prompt": ids, "max_tokens": 8, "temperature": 0}),
        json!({"prompt": [ids], "max_tokens": 8, "temperature": 0}),
    ] {
        let (code, r) = post(&url, &body);
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["choices"][0]["text"], want.as_str(), "{body}");
    }
    let (code, r) = post(&url, &json!({"prompt": [1, 99999999], "max_tokens": 2}));
    assert_eq!(code, 400, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("vocabulary"),
        "{r}"
    );
    let (code, r) = post(&url, &json!({"prompt": [1, -2], "max_tokens": 2}));
    assert_eq!(code, 400, "{r}");

    // Content as a list of text parts reads as the joined text.
    let chat = format!("{}/v1/chat/completions", s.url);
    let whole = post(
        &chat,
        &json!({"messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 6, "temperature": 0}),
    );
    let parts = post(
        &chat,
        &json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "w1 "}, {"type": "text", "text": "w2"}]}],
            "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(whole.0, 200, "{}", whole.1);
    assert_eq!(
        whole.1["choices"][0]["message"]["content"],
        parts.1["choices"][0]["message"]["content"]
    );
    let (code, r) = post(
        &chat,
        &json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]}),
    );
    assert_eq!(code, 400, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("image_url"),
        "{r}"
    );
}

#[test]
fn logit_bias_steers_sampling_and_unsupported_fields_are_refused() {
    let s = server(&[]);
    let url = format!("{}/v1/completions", s.url);
    let m = fixture_model();
    let ids = m.encode(&prompt(2)).unwrap();
    let greedy = |bias: Value| -> String {
        let (code, r) = post(
            &url,
            &json!({"prompt": ids, "max_tokens": 4, "temperature": 0, "logit_bias": bias}),
        );
        assert_eq!(code, 200, "{r}");
        r["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let plain = greedy(Value::Null);
    assert_eq!(plain, alone(&prompt(2), 4));
    // +100 on one token makes it the only greedy choice.
    let forced = m.encode("w7").unwrap()[0];
    assert_eq!(
        greedy(json!({forced.to_string(): 100})),
        m.tokenizer.decode(&[forced; 4])
    );
    // −100 on the greedy first token makes the answer start otherwise.
    let first = m.encode(&plain).unwrap()[0];
    assert!(!greedy(json!({first.to_string(): -100})).starts_with(&m.tokenizer.decode(&[first])));

    for (body, field) in [
        (
            json!({"prompt": "w1", "logit_bias": {"x": 1}}),
            "logit_bias",
        ),
        (
            json!({"prompt": "w1", "logit_bias": {"1": 101}}),
            "logit_bias",
        ),
        (
            json!({"prompt": "w1", "logit_bias": {"99999999": 1}}),
            "vocabulary",
        ),
        (json!({"prompt": "w1", "echo": true, "logprobs": 1}), "echo"),
        (json!({"prompt": [1, 2], "echo": true}), "echo"),
        (json!({"prompt": "w1", "n": 17}), "n"),
        (json!({"prompt": "w1", "best_of": 2}), "best_of"),
    ] {
        let (code, r) = post(&url, &body);
        assert_eq!(code, 400, "{body}: {r}");
        let text = r["error"].to_string();
        assert!(text.contains(field), "{body}: {r}");
    }
}

/// A tiny model over bytes (so any JSON can be written), briefly trained on JSON lines, with a
/// ChatML template and a 1K context: what the grammar tests serve.
fn byte_model(dir: &Path) -> PathBuf {
    let nuwa = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_nuwa"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let text: String = (0..2000)
        .map(|i| format!("{}\n", json!({"name": format!("w{i}"), "age": i % 90})))
        .collect();
    let txt = dir.join("lines.txt");
    std::fs::write(&txt, text).unwrap();
    let p = |x: &str| dir.join(x).to_str().unwrap().to_string();
    nuwa(&[
        "data",
        "prepare",
        "--input",
        &p("lines.txt"),
        "--tokenizer",
        "byte",
        "--out",
        &p("data"),
    ]);
    nuwa(&[
        "train",
        "--preset",
        "tiny-dense",
        "--data",
        &p("data"),
        "--steps",
        "20",
        "--seq-len",
        "64",
        "--batch-size",
        "8",
        "--run-dir",
        &p("run"),
        "--quiet",
        "--sample-tokens",
        "0",
    ]);
    nuwa(&["export", &p("run"), "--out", &p("hf")]);
    let hf = dir.join("hf");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    config["max_position_embeddings"] = json!(1024);
    std::fs::write(hf.join("config.json"), config.to_string()).unwrap();
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    std::fs::write(
        hf.join("tokenizer_config.json"),
        json!({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template})
            .to_string(),
    )
    .unwrap();
    hf
}

/// The schema of the constrained-output tests, checked by hand (an independent validator).
fn valid_person(text: &str) -> Result<(), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("{e}: {text:?}"))?;
    let o = v.as_object().ok_or(format!("not an object: {text}"))?;
    let name = o["name"].as_str().ok_or(format!("name: {text}"))?;
    let age = o["age"].as_i64().ok_or(format!("age: {text}"))?;
    let keys: Vec<&String> = o.keys().collect();
    if name.chars().count() > 8 || !(0..=120).contains(&age) || keys.len() != 3 {
        return Err(format!("out of schema: {text}"));
    }
    o["ok"].as_bool().ok_or(format!("ok: {text}"))?;
    Ok(())
}

/// `response_format: json_schema` output always parses and validates (100 seeded samples, as
/// 10 requests of `n = 10`); `json_object` gives an object; a bad schema is a 400 naming the
/// field; forced tool calls parse into `tool_calls` with arguments valid for the function.
#[test]
fn constrained_outputs_and_tool_calls_always_parse() {
    let dir = std::env::temp_dir().join(format!("nuwa-serve-grammar-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let hf = byte_model(&dir);
    let s = server_of(&hf, &[]);
    let url = format!("{}/v1/completions", s.url);
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"], "additionalProperties": false});
    let mut seen = std::collections::HashSet::new();
    for seed in 0..10 {
        let (code, r) = post(
            &url,
            &json!({"prompt": "{", "max_tokens": 80, "n": 10, "seed": seed, "temperature": 1.0,
                    "response_format": {"type": "json_schema",
                                        "json_schema": {"name": "person", "schema": schema}}}),
        );
        assert_eq!(code, 200, "{r}");
        let choices = r["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 10);
        for c in choices {
            let text = c["text"].as_str().unwrap();
            assert_eq!(c["finish_reason"], "stop", "{text}");
            valid_person(text).unwrap();
            seen.insert(text.to_string());
        }
    }
    assert!(
        seen.len() > 10,
        "samples should differ: {} distinct",
        seen.len()
    );

    let (code, r) = post(
        &url,
        &json!({"prompt": "x", "max_tokens": 60, "response_format": {"type": "json_object"}}),
    );
    assert_eq!(code, 200, "{r}");
    let text = r["choices"][0]["text"].as_str().unwrap();
    if r["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(text).unwrap().is_object(),
            "{text}"
        );
    } else {
        assert!(text.starts_with('{'), "{text}");
    }
    let (code, r) = post(
        &url,
        &json!({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}}),
    );
    assert_eq!(code, 400, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("response_format"),
        "{r}"
    );

    let chat = format!("{}/v1/chat/completions", s.url);
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
            "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"], "additionalProperties": false}}}]);
    for (choice, names) in [
        (json!("required"), vec!["get_weather", "add"]),
        (
            json!({"type": "function", "function": {"name": "add"}}),
            vec!["add"],
        ),
    ] {
        for seed in 0..5 {
            let (code, r) = post(
                &chat,
                &json!({"messages": [{"role": "user", "content": "What is 2 + 3?"}],
                        "tools": tools, "tool_choice": choice, "max_tokens": 80, "seed": seed}),
            );
            assert_eq!(code, 200, "{r}");
            assert_eq!(r["choices"][0]["finish_reason"], "tool_calls", "{r}");
            let call = &r["choices"][0]["message"]["tool_calls"][0];
            let name = call["function"]["name"].as_str().unwrap();
            assert!(names.contains(&name), "{r}");
            let args: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            match name {
                // Integers of any size (JSON's, not i64's).
                "add" => {
                    let raw = call["function"]["arguments"].as_str().unwrap();
                    assert!(args["a"].is_number() && args["b"].is_number(), "{raw}");
                    assert!(!raw.contains(['.', 'e', 'E']), "integers only: {raw}");
                }
                _ => assert!(
                    args["city"].as_str().unwrap().chars().count() <= 10,
                    "{args}"
                ),
            }
            assert!(call["id"].as_str().unwrap().starts_with("call_"));
        }
    }
    // A conversation that carries a call and its result back is accepted.
    let (code, r) = post(
        &chat,
        &json!({"messages": [
            {"role": "user", "content": "2 + 3?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "add", "arguments": "{\"a\":2,\"b\":3}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "5"}],
                "tools": tools, "max_tokens": 5}),
    );
    assert_eq!(code, 200, "{r}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `n` choices at temperature 0 all equal the single answer; embeddings are the mean-pooled
/// last hidden state (same input, same vector; base64 the same floats); a repeated long prompt
/// reports cached tokens and answers exactly as without the cache.
#[test]
fn n_choices_embeddings_and_prefix_cache() {
    let s = server(&[]);
    let url = format!("{}/v1/completions", s.url);
    let one = |body: Value| post(&url, &body).1;
    let single = one(json!({"prompt": "w1 w2", "max_tokens": 8, "temperature": 0.0}));
    let many = one(json!({"prompt": "w1 w2", "max_tokens": 8, "temperature": 0.0, "n": 3}));
    let texts: Vec<&Value> = many["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["text"])
        .collect();
    assert_eq!(texts, vec![&single["choices"][0]["text"]; 3]);
    assert_eq!(many["usage"]["completion_tokens"], 24);

    let long: String = (0..60).map(|i| format!("w{} ", (i * 7) % 80)).collect();
    let first = one(json!({"prompt": long, "max_tokens": 6, "temperature": 0.0}));
    let second = one(json!({"prompt": long, "max_tokens": 6, "temperature": 0.0}));
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 48, "{second}");
    assert_eq!(first["choices"][0]["text"], second["choices"][0]["text"]);

    let emb = format!("{}/v1/embeddings", s.url);
    let (code, r) = post(&emb, &json!({"input": ["w1 w2", "w3", "w1 w2"]}));
    assert_eq!(code, 200, "{r}");
    let vec_of = |v: &Value| -> Vec<f32> {
        v["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let data = r["data"].as_array().unwrap();
    let (a, b, c) = (vec_of(&data[0]), vec_of(&data[1]), vec_of(&data[2]));
    let m = fixture_model();
    assert_eq!(a.len(), m.config.hidden_size);
    assert_eq!(a, c);
    assert_ne!(a, b);
    // Against the model: the mean over positions of its final hidden states.
    let ids = m.encode("w1 w2").unwrap();
    let hidden = m
        .model
        .hidden_states(nuwa_model::batch::token_rows(&ids, 1, &Device::default()))
        .mean_dim(1);
    let want: Vec<f32> = hidden.into_data().iter::<f32>().collect();
    let diff = a
        .iter()
        .zip(&want)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-5, "{diff}");
    assert_eq!(
        r["usage"]["prompt_tokens"],
        (2 * ids.len() + m.encode("w3").unwrap().len()) as u64
    );
    let (_, r64) = post(
        &emb,
        &json!({"input": "w1 w2", "encoding_format": "base64"}),
    );
    let text = r64["data"][0]["embedding"].as_str().unwrap();
    let decoded = decode_base64(text);
    let floats: Vec<f32> = decoded
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(floats, a);
    let (code, r) = post(&emb, &json!({"input": 3}));
    assert_eq!(
        (code, r["error"]["param"].as_str()),
        (400, Some("input")),
        "{r}"
    );
}

fn decode_base64(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let mut out = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        let n = chunk
            .iter()
            .take_while(|&&c| c != b'=')
            .enumerate()
            .fold(0u32, |n, (i, &c)| n | (value(c) as u32) << (18 - 6 * i));
        let bytes = chunk.iter().filter(|&&c| c != b'=').count() - 1;
        out.extend((0..bytes).map(|i| (n >> (16 - 8 * i)) as u8));
    }
    out
}

/// Streamed completion log-probabilities equal what `nuwa sample --logprobs` prints for the
/// same prompt and greedy decoding; `stream_options.include_usage` ends the stream with the
/// token counts.
#[test]
fn streamed_logprobs_equal_nuwa_sample() {
    let out = Command::new(env!("CARGO_BIN_EXE_nuwa"))
        .args([
            "sample",
            "--init-from",
            fixture().to_str().unwrap(),
            "--prompt",
            "w5 w6 w7",
        ])
        .args(["--max-tokens", "6", "--temperature", "0", "--logprobs", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!cli.is_empty());
    let s = server(&[]);
    let stream = ureq::post(&format!("{}/v1/completions", s.url))
        .send_json(
            json!({"prompt": "w5 w6 w7", "max_tokens": 6, "temperature": 0,
                          "logprobs": 2, "stream": true,
                          "stream_options": {"include_usage": true}}),
        )
        .unwrap();
    let (mut tokens, mut logprobs, mut tops) = (Vec::new(), Vec::new(), Vec::new());
    let mut usage = Value::Null;
    for line in BufReader::new(stream.into_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        if chunk["choices"].as_array().unwrap().is_empty() {
            usage = chunk["usage"].clone();
            continue;
        }
        assert!(usage.is_null(), "the usage chunk comes last");
        let lp = &chunk["choices"][0]["logprobs"];
        if lp.is_null() {
            continue;
        }
        tokens.extend(lp["tokens"].as_array().unwrap().iter().cloned());
        logprobs.extend(
            lp["token_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap()),
        );
        tops.extend(lp["top_logprobs"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(tokens.len(), cli.len());
    assert_eq!(usage["completion_tokens"], cli.len() as u64, "{usage}");
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + cli.len() as u64
    );
    for (i, line) in cli.iter().enumerate() {
        assert_eq!(tokens[i], line["token"], "token {i}");
        assert!(
            (logprobs[i] - line["logprob"].as_f64().unwrap()).abs() < 1e-5,
            "token {i}"
        );
        for alt in line["top_logprobs"].as_array().unwrap() {
            let got = tops[i][alt["token"].as_str().unwrap()].as_f64().unwrap();
            assert!(
                (got - alt["logprob"].as_f64().unwrap()).abs() < 1e-5,
                "token {i}"
            );
        }
    }
}

/// The key/value budget: a pool of a few blocks admits requests as blocks free up (both of two
/// requests that cannot run together are answered), refuses one that could never fit with a
/// 400 naming the cache, and a budget too large for the machine or smaller than a block stops
/// the server with one line.
#[test]
fn the_kv_cache_budget_admits_by_blocks_and_bad_budgets_are_refused() {
    let block = {
        let m = fixture_model();
        nuwa_model::batch::PagedBatch::shape(&m.model).bytes_per_block()
    };
    // Four blocks: 64 positions.
    let s = server(&["--kv-cache-memory", &(4 * block).to_string()]);
    let url = format!("{}/v1/completions", s.url);
    let (code, r) = post(&url, &json!({"prompt": "w1 w2", "max_tokens": 100}));
    assert_eq!(code, 400, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("kv-cache-memory"),
        "{r}"
    );
    // Each needs 3 of the 4 blocks: they run one after the other, and both complete.
    for (code, r) in greedy_at_once(&url, 2, 40) {
        assert_eq!(code, 200, "{r}");
    }
    for (budget, needle) in [
        ("900000GB", "available memory"),
        ("16", "one key/value block"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_nuwa"))
            .args([
                "serve",
                "--model",
                fixture().to_str().unwrap(),
                "--port",
                "0",
            ])
            .args(["--kv-cache-memory", budget])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--kv-cache-memory") && err.contains(needle),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
