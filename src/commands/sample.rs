//! `nuwa sample`: generate text from a run or a Hugging Face checkpoint folder.

use crate::device;
use anyhow::{bail, Result};
use clap::Args;
use nuwa_hf::{InferenceModel, Message, ModelSource};
use nuwa_model::SamplingOptions;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct SampleArgs {
    /// The run folder to load (its newest checkpoint).
    #[arg(
        long,
        required_unless_present = "init_from",
        conflicts_with = "init_from"
    )]
    run: Option<PathBuf>,
    /// A Hugging Face checkpoint folder to load instead of a run.
    #[arg(long, value_name = "HF_DIR")]
    init_from: Option<PathBuf>,
    #[arg(long, default_value = "\n")]
    prompt: String,
    /// Send the prompt as a user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Most positions attended to (default: the run's training context).
    #[arg(long, default_value_t = 0)]
    window: usize,
    /// Print each generated token as a JSON line instead of the text: its id, text, bytes,
    /// log-probability under the model (raw logits, before temperature/top-k/top-p) and the
    /// N most likely tokens with theirs (N = 0: the chosen token only).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=1000))]
    logprobs: Option<u16>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn sample_run(
    source: &ModelSource,
    prompt: &str,
    chat: bool,
    opts: &SamplingOptions,
    logprobs: Option<usize>,
    device: &burn::tensor::Device,
) -> Result<()> {
    let m = InferenceModel::load(source, device)?;
    let ids = if chat {
        m.encode_chat(&[Message {
            role: "user".into(),
            content: prompt.to_string(),
        }])?
    } else {
        m.encode(prompt)?
    };
    if ids.is_empty() {
        bail!("--prompt: encodes to no tokens");
    }
    if ids.len() >= m.model.max_positions {
        bail!(
            "--prompt: {} tokens does not fit the context of {}",
            ids.len(),
            m.model.max_positions
        );
    }
    let mut out = std::io::stdout();
    if let Some(top) = logprobs {
        m.generate_scored(&ids, opts, device, |tok, logits| {
            let lp = nuwa_model::token_logprobs(logits, tok, top);
            let entry = |id: u32, logprob: f32| {
                let bytes = m.tokenizer.token_bytes(id);
                serde_json::json!({"id": id, "token": String::from_utf8_lossy(&bytes),
                                   "bytes": bytes, "logprob": logprob})
            };
            let mut line = entry(tok, lp.logprob);
            line["top_logprobs"] = lp.top.iter().map(|&(id, l)| entry(id, l)).collect();
            let _ = writeln!(out, "{line}");
        });
        return Ok(());
    }
    if !chat {
        print!("{prompt}");
    }
    let mut stream = nuwa_data::TextStream::default();
    m.generate(&ids, opts, device, |tok| {
        let _ = write!(out, "{}", stream.push(&m.tokenizer, tok));
        let _ = out.flush();
    });
    let _ = write!(out, "{}", stream.finish(&m.tokenizer));
    println!();
    Ok(())
}

pub fn sample(a: SampleArgs) -> Result<()> {
    if a.temperature < 0.0 || !a.temperature.is_finite() {
        bail!(
            "--temperature {}: must be a non-negative number",
            a.temperature
        );
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p {}: must be in (0, 1]", a.top_p);
    }
    let device = device::parse_device(&a.device)?;
    let prompt = a.prompt.replace("\\n", "\n");
    let source = match (a.run, a.init_from) {
        (Some(run), _) => ModelSource::Run(run),
        (None, Some(dir)) => ModelSource::Hf(dir),
        (None, None) => bail!("pass --run RUN_DIR or --init-from HF_DIR"),
    };
    sample_run(
        &source,
        &prompt,
        a.chat,
        &SamplingOptions {
            max_tokens: a.max_tokens,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
            window: a.window,
        },
        a.logprobs.map(usize::from),
        &device,
    )
}
