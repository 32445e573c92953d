//! Training and decoding benchmarks on fixed shapes, matched one for one by the PyTorch
//! reference in `bench/torch_bench.py` (same shapes, fp32, same batch, AdamW, random tokens).

use crate::optim::{AdamW, AdamWConfig};
use anyhow::{bail, Result};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use nuwa_core::rng::splitmix64;
use nuwa_model::{cross_entropy, generate, LanguageModel, ModelConfig, SamplingOptions};
use serde::Serialize;
use std::time::Instant;

/// A benchmark shape: the model and the batch.
#[derive(Debug, Clone)]
pub struct BenchShape {
    pub name: String,
    pub model: ModelConfig,
    pub batch_size: usize,
    pub seq_len: usize,
}

fn dense(vocab: usize, layers: usize, heads: usize, hidden: usize, ctx: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: 4 * hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: heads,
        max_position_embeddings: ctx.max(512),
        norm_head: false,
        ..ModelConfig::preset("tiny-dense").expect("built-in preset")
    }
}

/// The shapes of the performance issue. `C-dense` is the dense model with C's active FFN width
/// (2 routed + 1 shared expert of 256 = 768), to price the MoE routing itself.
pub fn bench_shape(name: &str) -> Result<BenchShape> {
    let b = dense(8192, 6, 6, 384, 256);
    let (model, batch_size, seq_len) = match name {
        "A" => (dense(65, 4, 4, 128, 64), 12, 64),
        "B" | "D" => (b, 8, 256),
        "C" => (
            ModelConfig {
                num_experts: 16,
                num_experts_per_tok: 2,
                num_shared_experts: 1,
                moe_intermediate_size: 256,
                norm_topk_prob: true,
                ..b
            },
            8,
            256,
        ),
        "C-dense" => (
            ModelConfig {
                intermediate_size: 768,
                ..b
            },
            8,
            256,
        ),
        other => bail!("--shape {other}: unknown (expected A, B, C, C-dense or D)"),
    };
    Ok(BenchShape {
        name: name.to_string(),
        model,
        batch_size,
        seq_len,
    })
}

/// Deterministic random token ids in `[0, vocab)`.
pub fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<i64> {
    (0..n)
        .map(|i| (splitmix64(seed ^ splitmix64(i as u64)) % vocab as u64) as i64)
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub shape: String,
    pub kind: String,
    pub tokens_per_s: f64,
    pub median_step_s: f64,
    /// The fastest timed step: the machine's speed with the least interference from whatever
    /// else runs on it (the cost planner calibrates with it).
    pub fastest_step_s: f64,
    pub steps: usize,
    /// Model-FLOPs utilisation against `peak_flops` (absent when the peak is not known).
    pub mfu: Option<f64>,
    pub threads: usize,
    /// Median seconds per phase of a training step: forward (with the loss), backward, optimizer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<[f64; 3]>,
    /// This process's peak resident memory (`VmHWM`, Linux), MiB. Not `getrusage`'s maxrss:
    /// that keeps the high-water mark across `exec`, so a benchmark started from a large
    /// process (a Python that imported torch) would report its parent's memory as its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_mib: Option<f64>,
    /// Decoding only: the prompt and the greedy output, so that another program's decoding of
    /// the same checkpoint can be checked token by token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_ids: Option<Vec<u32>>,
}

/// This process's peak resident memory in MiB, from `/proc/self/status` (Linux only).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn fastest(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// One benchmark shape ready to train: model, optimizer and a fixed batch of random tokens.
/// Several can be stepped in turn, so that their timings share the machine's slow drifts.
pub struct TrainBench {
    /// Always `Some` between steps; the optimizer consumes and returns it.
    model: Option<LanguageModel>,
    opt: AdamW,
    device: Device,
    inputs: Vec<i64>,
    targets: Vec<i64>,
    batch: [usize; 2],
    /// Training FLOPs in one step (model FLOPs, the MFU numerator).
    pub flops_per_step: f64,
}

impl TrainBench {
    pub fn new(shape: &BenchShape, device: &Device) -> Result<Self> {
        let cfg = &shape.model;
        cfg.validate()?;
        let ad = device.clone().autodiff();
        let model = LanguageModel::new(cfg, &ad, 0);
        let opt = AdamW::new(AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        });
        let (b, t) = (shape.batch_size, shape.seq_len);
        let ids = random_tokens(b * (t + 1), cfg.vocab_size, 1);
        let rows: Vec<&[i64]> = ids.chunks(t + 1).collect();
        Ok(Self {
            model: Some(model),
            opt,
            device: ad,
            inputs: rows.iter().flat_map(|r| r[..t].iter().copied()).collect(),
            targets: rows.iter().flat_map(|r| r[1..].iter().copied()).collect(),
            batch: [b, t],
            flops_per_step: (b * t) as f64 * cfg.counts(t).train_flops_per_token,
        })
    }

    /// One AdamW step; seconds spent in forward (with the loss), backward and the optimizer.
    pub fn step(&mut self) -> Result<[f64; 3]> {
        let Some(model) = self.model.take() else {
            bail!("a previous benchmark step failed");
        };
        let started = Instant::now();
        let ad = &self.device;
        let x = Tensor::<2, Int>::from_data(TensorData::new(self.inputs.clone(), self.batch), ad);
        let y = Tensor::<2, Int>::from_data(TensorData::new(self.targets.clone(), self.batch), ad);
        let out = model.forward(x, None);
        let mut loss = cross_entropy(out.logits, y);
        if !out.router.is_empty() {
            let n = out.router.len() as f32;
            let lb = Tensor::cat(
                out.router.iter().map(|s| s.load_balance.clone()).collect(),
                0,
            )
            .sum()
                / n;
            loss = loss + lb * 0.01;
        }
        // The CPU backend runs eagerly, so these marks split the step into its phases; on a
        // GPU they only mark when the work was queued.
        let forward_done = started.elapsed().as_secs_f64();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let backward_done = started.elapsed().as_secs_f64();
        self.model = Some(self.opt.step(model, grads, 1e-4, 1.0));
        let _: f32 = loss.into_scalar();
        let total = started.elapsed().as_secs_f64();
        Ok([
            forward_done,
            backward_done - forward_done,
            total - backward_done,
        ])
    }
}

/// Times `steps` AdamW training steps after `warmup` untimed ones; the median is reported.
pub fn bench_train(
    shape: &BenchShape,
    device: &Device,
    warmup: usize,
    steps: usize,
    peak_flops: Option<f64>,
) -> Result<BenchResult> {
    let mut bench = TrainBench::new(shape, device)?;
    let mut times = Vec::new();
    let mut phases: [Vec<f64>; 3] = Default::default();
    for i in 0..warmup + steps {
        let p = bench.step()?;
        if i >= warmup {
            times.push(p.iter().sum());
            for (all, one) in phases.iter_mut().zip(p) {
                all.push(one);
            }
        }
    }
    let phases = phases.map(median);
    let fastest_step_s = fastest(&times);
    let step = median(times);
    let (b, t) = (shape.batch_size, shape.seq_len);
    let tokens_per_s = (b * t) as f64 / step;
    Ok(BenchResult {
        peak_rss_mib: peak_rss_mib(),
        shape: shape.name.clone(),
        kind: "train".into(),
        tokens_per_s,
        median_step_s: step,
        fastest_step_s,
        steps,
        mfu: peak_flops.map(|p| bench.flops_per_step / step / p),
        threads: threads(),
        phases: Some(phases),
        prompt_ids: None,
        output_ids: None,
    })
}

/// Greedy decoding of `new_tokens` after a 16-token prompt, batch 1, with the KV cache.
pub fn bench_decode(
    shape: &BenchShape,
    device: &Device,
    new_tokens: usize,
    repeats: usize,
    peak_flops: Option<f64>,
) -> Result<BenchResult> {
    let model = LanguageModel::new(&shape.model, device, 0);
    time_decode(
        &shape.name,
        &model,
        &shape.model,
        device,
        new_tokens,
        repeats,
        peak_flops,
    )
}

/// Greedy decoding of `new_tokens` after a 16-token prompt, batch 1, with the KV cache, on a
/// given model (`nuwa bench decode --hf DIR` times a checkpoint another program also runs).
pub fn time_decode(
    name: &str,
    model: &LanguageModel,
    cfg: &ModelConfig,
    device: &Device,
    new_tokens: usize,
    repeats: usize,
    peak_flops: Option<f64>,
) -> Result<BenchResult> {
    let prompt: Vec<u32> = random_tokens(16, cfg.vocab_size, 2)
        .iter()
        .map(|&i| i as u32)
        .collect();
    let opts = SamplingOptions {
        max_tokens: new_tokens,
        temperature: 0.0,
        ..Default::default()
    };
    let mut times = Vec::new();
    let mut output = Vec::new();
    for i in 0..repeats + 1 {
        let started = Instant::now();
        let out = generate(model, &prompt, &opts, device, |_| {});
        output = out.clone();
        if i > 0 {
            times.push(started.elapsed().as_secs_f64() / out.len().max(1) as f64);
        }
    }
    let fastest_step_s = fastest(&times);
    let per_token = median(times);
    Ok(BenchResult {
        peak_rss_mib: peak_rss_mib(),
        shape: name.to_string(),
        kind: "decode".into(),
        tokens_per_s: 1.0 / per_token,
        median_step_s: per_token,
        fastest_step_s,
        steps: new_tokens,
        // Decoding is bandwidth-bound; 2 FLOPs per active parameter per token.
        mfu: peak_flops.map(|p| 2.0 * cfg.counts(1).active_params as f64 / per_token / p),
        threads: threads(),
        phases: None,
        prompt_ids: Some(prompt),
        output_ids: Some(output),
    })
}
