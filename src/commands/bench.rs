//! `nuwa bench`: time training steps or decoding on the benchmark shapes (see bench/).

use crate::device;
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use nuwa_model::kernels::bf16_matmul::{set_precision, Precision};

/// What `nuwa bench` times.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BenchKind {
    /// AdamW training steps.
    Train,
    /// Greedy decoding with the KV cache.
    Decode,
}

#[derive(Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    what: BenchKind,
    /// A, B, C, C-dense (training) or D (decoding)
    #[arg(long, default_value = "A")]
    shape: String,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed steps (training) or decode repeats.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// New tokens per decode.
    #[arg(long, default_value_t = 256)]
    new_tokens: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Decode this Hugging Face checkpoint folder instead of a random model of `--shape` (to
    /// time the very model another program decodes, as bench/llamacpp_compare.py does).
    #[arg(long)]
    hf: Option<std::path::PathBuf>,
    /// Precision of the weight products: f32, or bf16 (bf16 × bf16 → f32, as PyTorch's bf16
    /// autocast; needs AVX512-BF16).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    use nuwa_train::bench::{bench_decode, bench_shape, bench_train, time_decode};
    let device = device::parse_device(&a.device)?;
    let peak = nuwa_core::hardware::peak_flops(&a.device, None)?;
    let shape = bench_shape(&a.shape)?;
    if a.steps == 0 {
        bail!("--steps: must be positive");
    }
    if !set_precision(a.precision) {
        bail!("--precision bf16: this CPU has no AVX512-BF16 (or this build no CPU backend)");
    }
    let result = match a.what {
        BenchKind::Train if a.hf.is_some() => {
            bail!("--hf: only `nuwa bench decode` takes a checkpoint")
        }
        BenchKind::Train => bench_train(&shape, &device, a.warmup, a.steps, peak)?,
        BenchKind::Decode => match &a.hf {
            Some(dir) => {
                let ckpt = nuwa_hf::HfCheckpoint::open(dir)?;
                let model = ckpt.load_model(&device)?;
                let name = dir.display().to_string();
                time_decode(
                    &name,
                    &model,
                    &ckpt.config,
                    &device,
                    a.new_tokens,
                    a.steps,
                    peak,
                )?
            }
            None => bench_decode(&shape, &device, a.new_tokens, a.steps, peak)?,
        },
    };
    if a.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        let mfu = result
            .mfu
            .map_or(String::new(), |m| format!(", MFU {:.2}%", m * 100.0));
        println!(
            "{} {}: {:.0} tokens/s (median step {:.4} s{mfu}, {} threads)",
            result.kind, result.shape, result.tokens_per_s, result.median_step_s, result.threads
        );
    }
    Ok(())
}
