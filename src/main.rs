//! `nuwa`: train, sample and inspect dense and mixture-of-experts language models on any
//! accelerator Burn supports.

mod device;
mod plan;

/// Tensor buffers are large and short-lived; mimalloc keeps freed pages for reuse instead of
/// returning them to the kernel, which otherwise costs a page fault and a page clear per reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use nuwa_data::{PrepareOptions, Source, TokenizerSpec};
use nuwa_hf::{InferenceModel, Message, ModelSource};
use nuwa_model::{ModelConfig, SamplingOptions};
use nuwa_run::{RunConfig, RunFile, TrainConfig};
use nuwa_train::TrainOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "nuwa",
    version,
    about = "Train and serve dense and MoE language models on any accelerator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prepare training data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Train a model (defaults: the tiny MoE on the built-in corpus, then print a sample).
    Train(Box<TrainArgs>),
    /// Generate text from a run or a Hugging Face checkpoint folder.
    Sample(SampleArgs),
    /// Convert a Hugging Face checkpoint folder (bailing_moe, llama, qwen2, qwen3_moe,
    /// mixtral) into a nuwa run folder.
    Import(ImportArgs),
    /// Run `nuwa train --dist mpi` under mpirun and restart it from the last checkpoint when a
    /// rank fails (built with `--features mpi`).
    Launch(LaunchArgs),
    /// Write a run's newest checkpoint as a Hugging Face folder that transformers loads.
    Export(ExportArgs),
    /// Serve a model over an OpenAI-compatible HTTP API with continuous batching.
    Serve(ServeArgs),
    /// Plan a training run: the cheapest (or fastest) mix of accelerators for N tokens.
    Plan(Box<plan::PlanArgs>),
    /// Print a model's parameter counts and training FLOPs per token.
    Inspect(InspectArgs),
    /// Time training steps or decoding on the benchmark shapes (see bench/).
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// train | decode
    what: String,
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
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Tokenize text into train/val shards plus a manifest.
    Prepare(PrepareArgs),
}

#[derive(Args)]
struct PrepareArgs {
    /// Text files or folders; none means the built-in corpus.
    #[arg(long, num_args = 1..)]
    input: Vec<PathBuf>,
    /// byte | char | bpe:N | path/to/tokenizer.json
    #[arg(long, default_value = "char")]
    tokenizer: String,
    /// Output folder.
    #[arg(long, default_value = "data/prepared")]
    out: PathBuf,
    /// Fraction of tokens held out for validation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
}

#[derive(Args)]
struct TrainArgs {
    /// A run.toml: `preset = "..."` or a [model] table, plus [train] and [data].
    #[arg(long)]
    config: Option<PathBuf>,
    /// tiny-moe | tiny-dense | ling-lite | ling-plus (default tiny-moe).
    #[arg(long)]
    preset: Option<String>,
    /// A model config file (HF config.json or TOML) instead of a preset.
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// Folder written by `nuwa data prepare` (default: the built-in corpus).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run folder for checkpoints, metrics and plots (default: the next free runs/run-NNN).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue the newest checkpoint in this run folder.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Start from a Hugging Face checkpoint's config and weights (fine-tuning); prepare the
    /// data with its tokenizer: `nuwa data prepare --tokenizer HF_DIR/tokenizer.json`.
    #[arg(long, value_name = "HF_DIR", conflicts_with_all = ["preset", "model_config", "resume"])]
    init_from: Option<PathBuf>,
    /// cpu | cuda:N | rocm:N | vulkan:N | wgpu:N | metal:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The accelerator model behind --device, for MFU: a name (H100, 910B, P800, …; see
    /// nuwa_core::hardware) or its peak dense TFLOP/s. Without it MFU is reported on the CPU only.
    #[arg(long)]
    accelerator: Option<String>,
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    min_lr: Option<f64>,
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// cosine | wsd
    #[arg(long)]
    schedule: Option<String>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    grad_clip: Option<f64>,
    /// Dropout on embeddings and on attention/FFN outputs.
    #[arg(long)]
    dropout: Option<f64>,
    #[arg(long)]
    eval_every: Option<u64>,
    #[arg(long)]
    checkpoint_every: Option<u64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Model width (hidden_size) override.
    #[arg(long)]
    hidden_size: Option<usize>,
    /// Model depth (num_hidden_layers) override.
    #[arg(long)]
    layers: Option<usize>,
    /// Tokens to sample after training (0: none).
    #[arg(long, default_value_t = 200)]
    sample_tokens: usize,
    /// Stop after this step, saving a checkpoint, as if interrupted (resume continues the run).
    #[arg(long)]
    stop_at: Option<u64>,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
    /// Data-parallel over processes: `mpi` (start with mpirun or `nuwa launch`).
    #[arg(long)]
    dist: Option<String>,
    /// Cluster file mapping ranks to devices (see crates/dist/src/cluster.rs).
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// Test-only: per-rank slowdown factors, e.g. `1,2` makes rank 1 twice as slow.
    #[arg(long)]
    throttle: Option<String>,
    /// Re-balance each rank's share of the batch every N steps (0: keep the equal split).
    #[arg(long, default_value_t = 10)]
    rebalance_every: u64,
    /// Seconds a collective may wait before its rank declares a peer hung and exits.
    #[arg(long, default_value_t = 300.0, value_parser = positive_seconds)]
    collective_timeout: f64,
    /// Record every rank's parameter hash after each step in metrics.jsonl.
    #[arg(long)]
    hash_params: bool,
    /// Test-only fault injection: STEP:RANK kills that rank with SIGKILL during that step.
    #[arg(long, hide = true)]
    fault_kill_at: Option<String>,
    /// Test-only fault injection: STEP:RANK makes that rank hang before that step's all-reduce.
    #[arg(long, hide = true)]
    fault_hang_at: Option<String>,
    /// Test-only: apply --throttle from this step on.
    #[arg(long, hide = true, default_value_t = 0)]
    throttle_from: u64,
}

#[derive(Args)]
struct SampleArgs {
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
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct LaunchArgs {
    /// Ranks (processes) to start.
    #[arg(long)]
    np: usize,
    /// Fewest ranks a restart may use.
    #[arg(long, default_value_t = 1)]
    min_np: usize,
    #[arg(long, default_value_t = 3)]
    max_restarts: usize,
    /// Restart on as many ranks as before (the failed device came back).
    #[arg(long)]
    keep_size: bool,
    /// Extra mpirun arguments, e.g. `--mpirun-arg=-x --mpirun-arg=RAYON_NUM_THREADS=1`.
    #[arg(long = "mpirun-arg", allow_hyphen_values = true)]
    mpirun_args: Vec<String>,
    /// `nuwa train` arguments (after `--`); must include --run-dir DIR.
    #[arg(last = true, required = true)]
    train_args: Vec<String>,
}

#[derive(Args)]
struct ServeArgs {
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
}

#[derive(Args)]
struct ImportArgs {
    /// The Hugging Face folder: config.json, *.safetensors (or shards + index), tokenizer.json.
    hf_dir: PathBuf,
    /// The run folder to create (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct ExportArgs {
    /// The run folder (its newest checkpoint is exported).
    run_dir: PathBuf,
    /// The Hugging Face folder to create (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    /// f32 (exact) | bf16 | f16
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Largest safetensors file before the weights are sharded: 5GB, 500MB, 2000000.
    #[arg(long, default_value = "5GB", value_parser = byte_size)]
    max_shard_size: u64,
}

#[derive(Args)]
struct InspectArgs {
    #[arg(long, default_value = "tiny-moe")]
    preset: String,
    /// A model config file instead of a preset.
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// Context length for the attention FLOPs.
    #[arg(long, default_value_t = 4096)]
    context: usize,
}

/// A clap parser for a size in bytes: a plain number or one with KB, MB or GB (powers of 1000,
/// as `save_pretrained`'s `max_shard_size` reads them).
fn byte_size(v: &str) -> Result<u64, String> {
    let units = [("B", 1.0), ("KB", 1e3), ("MB", 1e6), ("GB", 1e9)];
    nuwa_core::parse_with_unit(v, &units, "5GB, 500MB, 2000000")
        .map(|bytes| bytes.ceil() as u64)
        .map_err(|e| e.to_string())
}

/// A clap parser for a duration in seconds: finite and above zero.
fn positive_seconds(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(s) if s > 0.0 && s.is_finite() && s < 1e9 => Ok(s),
        _ => Err(format!("`{v}` is not a positive number of seconds")),
    }
}

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // Never hand freed memory back to the OS: a training step frees and reallocates the same
    // large buffers every step, and each purge costs page faults and page clearing later
    // (measured: shape B trains ~1.4× faster with purging off).
    // SAFETY: called once, before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Data(DataCommand::Prepare(a)) => prepare(a),
        Command::Train(a) => train(*a),
        Command::Sample(a) => sample(a),
        Command::Import(a) => import(a),
        Command::Launch(a) => launch(a),
        Command::Export(a) => export(a),
        Command::Inspect(a) => inspect(a),
        Command::Plan(a) => plan::run(*a),
        Command::Serve(a) => serve(a),
        Command::Bench(a) => bench(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn prepare(a: PrepareArgs) -> Result<()> {
    let source = if a.input.is_empty() {
        Source::Builtin
    } else {
        Source::Paths(a.input)
    };
    let manifest = nuwa_data::prepare(&PrepareOptions {
        source,
        tokenizer: a.tokenizer.parse::<TokenizerSpec>()?,
        out_dir: a.out.clone(),
        val_fraction: a.val_fraction,
    })?;
    println!(
        "wrote {}: vocab {}, {} train + {} val tokens ({:?})",
        a.out.display(),
        manifest.vocab_size,
        manifest.train.tokens,
        manifest.val.tokens,
        manifest.dtype
    );
    Ok(())
}

/// Builds the run configuration: defaults, then `--config`, then the command-line overrides.
fn run_config(a: &TrainArgs) -> Result<RunConfig> {
    let file: Option<RunFile> = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            Some(toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?)
        }
        None => None,
    };
    let preset = a
        .preset
        .clone()
        .or_else(|| file.as_ref().and_then(|f| f.preset.clone()));
    let mut model = if let Some(path) = &a.model_config {
        model_config_file(path)?
    } else if let Some(table) = file.as_ref().and_then(|f| f.model.clone()) {
        let what = a
            .config
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        table
            .try_into::<ModelConfig>()
            .map_err(|e| anyhow!("{what}: [model]: {e}"))?
    } else {
        // A preset's vocabulary follows the data (0 = take it from the manifest).
        ModelConfig {
            vocab_size: 0,
            ..ModelConfig::preset(preset.as_deref().unwrap_or("tiny-moe"))?
        }
    };
    if let Some(h) = a.hidden_size {
        model.hidden_size = h;
        model.intermediate_size = 3 * h;
        if model.is_moe() {
            model.moe_intermediate_size = h;
        }
    }
    if let Some(l) = a.layers {
        model.num_hidden_layers = l;
    }
    if let Some(p) = a.dropout {
        model.embedding_dropout = p;
        model.output_dropout = p;
    }
    let mut train = file
        .as_ref()
        .and_then(|f| f.train.clone())
        .unwrap_or_default();
    let mut data = file
        .as_ref()
        .and_then(|f| f.data.clone())
        .unwrap_or_default();
    apply_overrides(&mut train, a)?;
    if let Some(d) = &a.data {
        // Absolute, so a resume from another folder still finds the data.
        let d = std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
        data.dir = Some(d.display().to_string());
    }
    if train.seq_len > model.max_position_embeddings {
        model.max_position_embeddings = train.seq_len;
    }
    Ok(RunConfig { model, train, data })
}

/// A model config file: a Hugging Face `config.json` of any supported architecture, or TOML
/// with nuwa's (bailing_moe) field names.
fn model_config_file(path: &Path) -> Result<ModelConfig> {
    if path.extension().is_some_and(|e| e == "json") {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
        if json.get("model_type").is_some() {
            return Ok(nuwa_hf::arch::config_from_hf(&json, &path.display().to_string())?.1);
        }
    }
    Ok(ModelConfig::from_file(path)?)
}

fn apply_overrides(t: &mut TrainConfig, a: &TrainArgs) -> Result<()> {
    macro_rules! set {
        ($($field:ident),*) => { $( if let Some(v) = a.$field { t.$field = v; } )* };
    }
    set!(
        steps,
        batch_size,
        seq_len,
        grad_accum,
        lr,
        min_lr,
        warmup_steps,
        weight_decay,
        grad_clip,
        eval_every,
        checkpoint_every,
        seed
    );
    if let Some(lr) = a.lr {
        if a.min_lr.is_none() {
            t.min_lr = lr / 10.0;
        }
    }
    if let Some(s) = &a.schedule {
        t.schedule = match s.as_str() {
            "cosine" => nuwa_run::Schedule::Cosine,
            "wsd" => nuwa_run::Schedule::Wsd,
            other => bail!("--schedule {other}: expected cosine or wsd"),
        };
    }
    Ok(())
}

/// The first `runs/run-NNN` that does not exist yet.
fn next_run_dir() -> PathBuf {
    (1..)
        .map(|n| PathBuf::from(format!("runs/run-{n:03}")))
        .find(|p| !p.exists())
        .unwrap_or_else(|| PathBuf::from("runs/run"))
}

/// The communicator and this rank's settings for `--dist`.
fn dist_options(a: &TrainArgs) -> Result<Option<nuwa_train::parallel::DistOptions>> {
    let Some(kind) = &a.dist else {
        return Ok(None);
    };
    if kind != "mpi" {
        bail!("--dist {kind}: expected mpi");
    }
    let cluster = match &a.cluster {
        Some(p) => nuwa_dist::ClusterFile::load(p)?,
        None => nuwa_dist::ClusterFile::default(),
    };
    let throttles = match &a.throttle {
        Some(s) => nuwa_dist::cluster::parse_throttles(s)?,
        None => Vec::new(),
    };
    let step_rank = |flag: &str, v: &Option<String>| -> Result<Option<(u64, usize)>> {
        v.as_ref()
            .map(|s| {
                s.split_once(':')
                    .and_then(|(x, y)| Some((x.parse().ok()?, y.parse().ok()?)))
                    .ok_or_else(|| anyhow!("{flag} {s}: expected STEP:RANK"))
            })
            .transpose()
    };
    let kill_at = step_rank("--fault-kill-at", &a.fault_kill_at)?;
    let hang_at = step_rank("--fault-hang-at", &a.fault_hang_at)?;
    let comm = mpi_comm()?;
    let (rank, ranks) = (comm.rank(), comm.size());
    let throttle = throttles
        .get(rank)
        .copied()
        .or(cluster.rank.get(rank).and_then(|r| r.throttle))
        .unwrap_or(1.0);
    let injected = throttle != 1.0 || kill_at.is_some() || hang_at.is_some();
    if injected && !cfg!(feature = "fault-injection") {
        bail!(
            "--throttle / --fault-kill-at / --fault-hang-at (or a cluster file's `throttle`) are \
             test-only fault injection: rebuild with `--features fault-injection`"
        );
    }
    Ok(Some(nuwa_train::parallel::DistOptions {
        max_seqs: (0..ranks)
            .map(|r| a.cluster.as_ref().and(cluster.spec(r).max_seqs))
            .collect(),
        comm,
        rebalance_every: a.rebalance_every,
        straggler_factor: 1.5,
        straggler_patience: 3,
        collective_timeout: std::time::Duration::from_secs_f64(a.collective_timeout),
        #[cfg(feature = "fault-injection")]
        faults: nuwa_train::faults::Faults {
            kill_at,
            hang_at,
            throttle,
            throttle_from: a.throttle_from,
        },
        hash_params: a.hash_params,
    }))
}

#[cfg(feature = "mpi")]
fn mpi_comm() -> Result<Box<dyn nuwa_train::parallel::Collective>> {
    Ok(Box::new(nuwa_dist::mpi_comm::MpiCollective::init()?))
}

#[cfg(not(feature = "mpi"))]
fn mpi_comm() -> Result<Box<dyn nuwa_train::parallel::Collective>> {
    bail!("--dist mpi: this nuwa was built without MPI; rebuild with `cargo build --release --features mpi` (needs Open MPI)")
}

fn launch(a: LaunchArgs) -> Result<()> {
    let restarts = nuwa_dist::launch(&nuwa_dist::LaunchOptions {
        np: a.np,
        min_np: a.min_np,
        max_restarts: a.max_restarts,
        keep_size: a.keep_size,
        exe: std::env::current_exe().context("locating the nuwa executable")?,
        train_args: a.train_args,
        mpirun_args: a.mpirun_args,
    })?;
    println!("launch: the job finished after {restarts} restart(s)");
    Ok(())
}

fn train(a: TrainArgs) -> Result<()> {
    let dist = dist_options(&a)?;
    let rank = dist.as_ref().map_or(0, |d| d.comm.rank());
    let device_name = match (&a.cluster, &dist) {
        (Some(p), Some(_)) => nuwa_dist::ClusterFile::load(p)?.spec(rank).device,
        _ => a.device.clone(),
    };
    let device = device::parse_device(&device_name)?;
    let mut config = run_config(&a)?;
    let init_weights = match &a.init_from {
        Some(dir) => {
            let ckpt = nuwa_hf::HfCheckpoint::open(dir)?;
            config.model = ModelConfig {
                embedding_dropout: config.model.embedding_dropout,
                output_dropout: config.model.output_dropout,
                ..ckpt.config.clone()
            };
            if a.dropout.is_none() {
                config.model.embedding_dropout = ckpt.config.embedding_dropout;
                config.model.output_dropout = ckpt.config.output_dropout;
            }
            Some(ckpt.load_weights()?)
        }
        None => None,
    };
    let (run_dir, resume) = match &a.resume {
        Some(dir) => (dir.clone(), true),
        None => (a.run_dir.clone().unwrap_or_else(next_run_dir), false),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to quit now)");
    })
    .context("installing the Ctrl-C handler")?;
    let report = nuwa_train::train(TrainOptions {
        run_dir,
        config,
        resume,
        device: device.clone(),
        show_progress: !a.quiet && rank == 0,
        stop,
        peak_flops: nuwa_core::hardware::peak_flops(&device_name, a.accelerator.as_deref())?,
        stop_at: a.stop_at,
        init_weights,
        dist,
    })?;
    if rank != 0 {
        return Ok(());
    }
    if let Some(dir) = &a.init_from {
        // Keep the checkpoint's descriptive files (token ids, chat template) with the run, as
        // `nuwa import` does, so sampling and export treat it as that model fine-tuned.
        nuwa_hf::run_dir::keep_side_files(dir, &report.run_dir)?;
    }
    let first = report.steps.first().map(|r| r.loss);
    let last = report.steps.last().map(|r| r.loss);
    if let (Some(f), Some(l)) = (first, last) {
        println!(
            "train loss {f:.4} -> {l:.4} over {} steps",
            report.steps.len()
        );
    }
    if let Some(v) = report.last_val_loss {
        println!("val loss {v:.4}");
    }
    println!(
        "run saved in {} (metrics.jsonl, loss.svg, checkpoints/)",
        report.run_dir.display()
    );
    if a.sample_tokens > 0 && !report.interrupted {
        println!("--- sample ---");
        let sampled = sample_run(
            &ModelSource::Run(report.run_dir.clone()),
            "\n",
            false,
            &SamplingOptions {
                max_tokens: a.sample_tokens,
                ..Default::default()
            },
            &device,
        );
        // Training succeeded; a sample that cannot be drawn is a note, not a failure.
        if let Err(e) = sampled {
            println!("(no sample: {e:#})");
        }
    }
    Ok(())
}

fn sample_run(
    source: &ModelSource,
    prompt: &str,
    chat: bool,
    opts: &SamplingOptions,
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
    if !chat {
        print!("{prompt}");
    }
    let mut out = std::io::stdout();
    let mut stream = nuwa_data::TextStream::default();
    m.generate(&ids, opts, device, |tok| {
        let _ = write!(out, "{}", stream.push(&m.tokenizer, tok));
        let _ = out.flush();
    });
    let _ = write!(out, "{}", stream.finish(&m.tokenizer));
    println!();
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    let device = device::parse_device(&a.device)?;
    let source = match (a.run, a.model) {
        (Some(run), _) => ModelSource::Run(run),
        (None, Some(dir)) => ModelSource::Hf(dir),
        (None, None) => bail!("pass --run RUN_DIR or --model HF_DIR"),
    };
    if a.max_batch == 0 || a.max_queue == 0 {
        bail!("--max-batch and --max-queue must be positive");
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
        },
    )
}

fn import(a: ImportArgs) -> Result<()> {
    let device = burn::tensor::Device::default();
    let dir = nuwa_hf::import_to_run(&a.hf_dir, &a.out, &device)?;
    println!(
        "imported {} into {} ({})",
        a.hf_dir.display(),
        a.out.display(),
        dir.display()
    );
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    let dtype: nuwa_hf::ExportDtype = a.dtype.parse()?;
    let options = nuwa_hf::ExportOptions {
        dtype,
        max_shard_bytes: a.max_shard_size,
    };
    nuwa_hf::export_run(&a.run_dir, &a.out, &options)?;
    println!("exported {} to {}", a.run_dir.display(), a.out.display());
    Ok(())
}

fn sample(a: SampleArgs) -> Result<()> {
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
        &device,
    )
}

fn bench(a: BenchArgs) -> Result<()> {
    use nuwa_train::bench::{bench_decode, bench_shape, bench_train};
    let device = device::parse_device(&a.device)?;
    let peak = nuwa_core::hardware::peak_flops(&a.device, None)?;
    let shape = bench_shape(&a.shape)?;
    if a.steps == 0 {
        bail!("--steps: must be positive");
    }
    let result = match a.what.as_str() {
        "train" => bench_train(&shape, &device, a.warmup, a.steps, peak)?,
        "decode" => bench_decode(&shape, &device, a.new_tokens, a.steps, peak)?,
        other => bail!("nuwa bench {other}: expected train or decode"),
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

fn inspect(a: InspectArgs) -> Result<()> {
    let (name, cfg) = match &a.model_config {
        Some(p) => (p.display().to_string(), ModelConfig::from_file(p)?),
        None => (a.preset.clone(), ModelConfig::preset(&a.preset)?),
    };
    cfg.validate()?;
    let c = cfg.counts(a.context);
    let b = |n: u64| format!("{:.3}B", n as f64 / 1e9);
    println!(
        "model            {name} ({})",
        if cfg.is_moe() { "MoE" } else { "dense" }
    );
    println!(
        "layers           {} (hidden {}, heads {}/{} kv, head_dim {})",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim()
    );
    if cfg.is_moe() {
        println!(
            "experts          {} routed (top-{}), {} shared, width {}",
            cfg.num_experts,
            cfg.num_experts_per_tok,
            cfg.num_shared_experts,
            cfg.moe_intermediate_size
        );
    }
    println!(
        "total params     {} ({})",
        b(c.total_params),
        c.total_params
    );
    println!(
        "active params    {} ({})",
        b(c.active_params),
        c.active_params
    );
    println!(
        "embedding params {} ({})",
        b(c.embedding_params),
        c.embedding_params
    );
    println!(
        "train FLOPs/token {:.3e} at context {}",
        c.train_flops_per_token, a.context
    );
    Ok(())
}
