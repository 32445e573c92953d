//! `nuwa train`: resolve the run configuration, start the trainer (alone or as one rank
//! of a data-parallel job), then print a sample.

use crate::args::positive_seconds;
use crate::commands::sample::sample_run;
use crate::device;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use nuwa_config::{resolve_run, ModelChoice, ModelOverrides, TrainOverrides};
use nuwa_hf::ModelSource;
use nuwa_model::{ModelConfig, SamplingOptions};
use nuwa_run::{RunConfig, Schedule};
use nuwa_train::{ResumeOverrides, TrainOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args)]
pub struct TrainArgs {
    /// A run.toml: `preset = "..."` or a [model] table, plus [train] and [data].
    #[arg(long)]
    config: Option<PathBuf>,
    /// tiny-moe | tiny-dense | ling-lite | ling-plus | ling-mini-2 | ling-flash-2 (default tiny-moe).
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
    #[arg(long, value_enum)]
    schedule: Option<ScheduleArg>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    grad_clip: Option<f64>,
    /// Precision of the weight products: f32, or bf16 (bf16 × bf16 → f32 on CPUs with
    /// AVX512-BF16, as PyTorch's bf16 autocast; weights and optimizer state stay f32).
    #[arg(long)]
    precision: Option<nuwa_model::kernels::bf16_matmul::Precision>,
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
    /// With --resume: go on although the data's checksums differ from those the run trained on
    /// (it was prepared again).
    #[arg(long)]
    allow_data_change: bool,
    /// Write each checkpoint before the next step instead of in the background.
    #[arg(long)]
    sync_checkpoints: bool,
    /// Dump every tensor of these steps (forward activations, router choices, gradients,
    /// weights after the step) for `nuwa parity compare`, e.g. `1,100`.
    #[arg(long, value_delimiter = ',')]
    dump_tensors: Vec<u64>,
    /// Where --dump-tensors writes (default: RUN/dumps); one folder per step.
    #[arg(long, requires = "dump_tensors")]
    dump_dir: Option<PathBuf>,
    /// Every N steps, recompute the step's first micro-batch on --parity-device too and record
    /// the divergence in metrics.jsonl (parity_ok, parity_loss_rel, parity_forward_max, …).
    #[arg(long, default_value_t = 0)]
    parity_every: u64,
    /// The second device for --parity-every: cpu-reference (this CPU with every op on its
    /// plain composition), ndarray, wgpu:N, …
    #[arg(long, default_value = "cpu-reference")]
    parity_device: String,
    /// Data-parallel over processes (start with mpirun or `nuwa launch`).
    #[arg(long, value_enum)]
    dist: Option<DistKind>,
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
    /// Expert parallelism: ranks per expert-parallel group (each group holds every routed
    /// expert once, split among its ranks; attention and shared experts stay data-parallel).
    /// The world's ranks must divide into groups of this size.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    ep: u64,
    /// How --ep splits the routed experts: `experts` (each rank owns whole experts, as many
    /// as its speed earns, and runs the rows routed to them), `width` (each rank holds every
    /// expert's FFN columns in proportion to its speed and runs every row of its group on
    /// them: balanced whatever the router does, at the price of every row sent to every rank)
    /// or `shared` (whole experts, neighbouring ranks sharing a few whose rows they split in
    /// every micro-batch by speed: balanced, each row sent to one rank, the shared experts
    /// held twice).
    /// Nothing to split without --ep. Default: the plan's `layout.expert_split`, else
    /// `experts`.
    #[arg(long, value_parser = |s: &str| s.parse::<nuwa_plan::ExpertSplit>())]
    ep_split: Option<nuwa_plan::ExpertSplit>,
    /// Pipeline parallelism: stages, each a run of decoder layers sized by its ranks' measured
    /// speed, over the step's `--grad-accum` micro-batches with the 1F1B schedule. The world's
    /// ranks must divide into this many stages (the ranks of a stage are data-parallel).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pp: u64,
    /// Decoder layers per pipeline stage, e.g. `3,1` (default: sized by each stage's measured
    /// speed and memory).
    #[arg(long, value_delimiter = ',')]
    stage_layers: Option<Vec<usize>>,
    /// Run a plan file from `nuwa plan --out`: its model, batch, layout (pp, ep, stage layers,
    /// expert placement) and each rank's device.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Set by `nuwa launch --plan`, which passes the plan's model, batch and layout as flags
    /// (re-shaped when it restarts on fewer ranks): the plan each rank takes its device from,
    /// and its fixed stage layers and expert placement while the job keeps the plan's layout.
    #[arg(long, hide = true)]
    launched_plan: Option<PathBuf>,
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

/// The run configuration: `--config`, `--preset` or `--model-config`, then the flags.
fn run_config(a: &TrainArgs) -> Result<RunConfig> {
    let choice = ModelChoice {
        run_file: a.config.clone(),
        preset: a.preset.clone(),
        model_config: a.model_config.clone(),
    };
    let model = ModelOverrides {
        hidden_size: a.hidden_size,
        layers: a.layers,
        dropout: a.dropout,
    };
    let train = TrainOverrides {
        steps: a.steps,
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        grad_accum: a.grad_accum,
        lr: a.lr,
        min_lr: a.min_lr,
        warmup_steps: a.warmup_steps,
        schedule: a.schedule.map(ScheduleArg::schedule),
        weight_decay: a.weight_decay,
        grad_clip: a.grad_clip,
        eval_every: a.eval_every,
        checkpoint_every: a.checkpoint_every,
        seed: a.seed,
        precision: a.precision,
    };
    resolve_run(&choice, &model, &train, a.data.as_deref())
}

/// `--schedule`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ScheduleArg {
    /// Linear warmup then cosine decay to min_lr.
    Cosine,
    /// Warmup, stable, then linear decay over the last decay_fraction.
    Wsd,
}

impl ScheduleArg {
    fn schedule(self) -> Schedule {
        match self {
            ScheduleArg::Cosine => Schedule::Cosine,
            ScheduleArg::Wsd => Schedule::Wsd,
        }
    }
}

/// `--dist`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DistKind {
    /// Data parallel over MPI (start with mpirun or `nuwa launch`).
    Mpi,
}

/// The first free `runs/run-NNN`, claimed by creating it (two runs started together get two
/// folders).
pub fn next_run_dir() -> PathBuf {
    let _ = std::fs::create_dir_all("runs");
    (1..100_000)
        .map(|n| PathBuf::from(format!("runs/run-{n:03}")))
        .find(|p| std::fs::create_dir(p).is_ok())
        .unwrap_or_else(|| PathBuf::from("runs/run"))
}

/// Under `--resume`: the flags a resume may change, after refusing (in one line, naming each)
/// any other flag whose value differs from the run's own.
fn resume_overrides(a: &TrainArgs, run: &std::path::Path) -> Result<ResumeOverrides> {
    nuwa_run::checkpoint::refuse_checkpoint_dir(run, "--resume ")?;
    let had = nuwa_run::checkpoint::latest_state(run)?.config;
    let wanted = run_config(a)?;
    let (w, h) = (&wanted.train, &had.train);
    let mut changed = Vec::new();
    let mut check = |given: bool, flag: &str, same: bool, was: String| {
        if given && !same {
            changed.push(format!("{flag} (the run has {was})"));
        }
    };
    // The `[train]` flags: given and different from the run's value.
    macro_rules! train_flags {
        ($($field:ident => $flag:literal),*) => {
            $( check(a.$field.is_some(), $flag, w.$field == h.$field, format!("{:?}", h.$field)); )*
        };
    }
    train_flags!(lr => "--lr", min_lr => "--min-lr", batch_size => "--batch-size",
        seq_len => "--seq-len", grad_accum => "--grad-accum", warmup_steps => "--warmup-steps",
        schedule => "--schedule", weight_decay => "--weight-decay", grad_clip => "--grad-clip",
        seed => "--seed", precision => "--precision");
    check(
        a.data.is_some(),
        "--data",
        wanted.data.dir == had.data.dir,
        had.data
            .dir
            .clone()
            .unwrap_or_else(|| "the built-in corpus".into()),
    );
    let model_flags = a.preset.is_some()
        || a.config.is_some()
        || a.model_config.is_some()
        || a.hidden_size.is_some()
        || a.layers.is_some()
        || a.dropout.is_some();
    let mut model = wanted.model.clone();
    if model.vocab_size == 0 {
        model.vocab_size = had.model.vocab_size; // a preset's vocabulary follows the data
    }
    check(
        model_flags,
        "the model flags (--preset/--config/--model-config/--hidden-size/--layers/--dropout)",
        model == had.model,
        "another model".into(),
    );
    if !changed.is_empty() {
        bail!(
            "--resume {}: cannot change {}; a run keeps its configuration (only --steps, \
             --eval-every and --checkpoint-every may change on resume)",
            run.display(),
            changed.join(", ")
        );
    }
    Ok(ResumeOverrides {
        steps: a.steps,
        eval_every: a.eval_every,
        checkpoint_every: a.checkpoint_every,
    })
}

/// The communicator and this rank's settings for `--dist`.
pub fn dist_options(
    a: &TrainArgs,
    plan: Option<&nuwa_plan::PlanFile>,
) -> Result<Option<nuwa_train::parallel::DistOptions>> {
    if a.dist != Some(DistKind::Mpi) {
        return Ok(None);
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
    if let (Some(plan), Some(path)) = (plan, &a.plan) {
        plan.check_ranks(ranks)
            .map_err(|e| anyhow!("--plan {}: {e}", path.display()))?;
    }
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
    // The plan's stage layers and expert placement, while the job has its layout (a launch
    // restarted on fewer ranks re-shapes it, and they are measured instead).
    let fixed = plan.filter(|p| p.layout.ep as u64 == a.ep && p.layout.pp as u64 == a.pp);
    // Every rank's device, for the metrics: the cluster file's, the plan's device names, or
    // this one (every rank has the same arguments).
    let devices = (0..ranks)
        .map(|r| match (&a.cluster, plan) {
            (Some(_), _) => cluster.spec(r).device,
            (None, Some(plan)) => plan.device_of(r).to_string(),
            (None, None) => a.device.clone(),
        })
        .collect();
    Ok(Some(nuwa_train::parallel::DistOptions {
        devices,
        max_seqs: (0..ranks)
            .map(|r| a.cluster.as_ref().and(cluster.spec(r).max_seqs))
            .collect(),
        memory_bytes: (0..ranks)
            .map(|r| {
                a.cluster
                    .as_ref()
                    .and(cluster.spec(r).memory_gb.map(|g| g * 1e9))
            })
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
        ep: a.ep as usize,
        placement: fixed.and_then(|p| p.layout.expert_placement.clone()),
        ep_split: a.ep_split.unwrap_or_default(),
        pp: a.pp as usize,
        stage_layers: a
            .stage_layers
            .clone()
            .or_else(|| fixed.and_then(|p| p.layout.stage_layers.clone())),
    }))
}

#[cfg(feature = "mpi")]
pub fn mpi_comm() -> Result<std::sync::Arc<dyn nuwa_train::parallel::Collective>> {
    Ok(std::sync::Arc::new(
        nuwa_dist::mpi_comm::MpiCollective::init()?,
    ))
}

#[cfg(not(feature = "mpi"))]
pub fn mpi_comm() -> Result<std::sync::Arc<dyn nuwa_train::parallel::Collective>> {
    bail!("--dist mpi: this nuwa was built without MPI; rebuild with `cargo build --release --features mpi` (needs Open MPI)")
}

pub fn train(mut a: TrainArgs) -> Result<()> {
    check_hook_flags(&a)?;
    let plan = match (a.plan.clone(), &a.launched_plan) {
        (Some(path), _) => Some(apply_plan(&mut a, &path)?),
        (None, Some(path)) => Some(nuwa_plan::PlanFile::load(path)?),
        (None, None) => None,
    };
    if (a.ep > 1 || a.pp > 1) && a.dist.is_none() {
        bail!(
            "--ep / --pp split the model over several processes: start them with `nuwa launch \
             --np N -- ...` or `mpirun -np N nuwa train --dist mpi ...`"
        );
    }
    if (a.ep > 1 || a.pp > 1) && (!a.dump_tensors.is_empty() || a.parity_every > 0) {
        bail!("--dump-tensors / --parity-every need the whole model in one process; not with --ep / --pp");
    }
    let placed = plan
        .as_ref()
        .is_some_and(|p| p.layout.expert_placement.is_some());
    if let Some(split) = a
        .ep_split
        .filter(|&s| placed && s != nuwa_plan::ExpertSplit::Experts)
    {
        bail!(
            "--ep-split {split}: the plan's layout.expert_placement counts whole experts per \
             rank, none shared; drop one of the two"
        );
    }
    let dist = dist_options(&a, plan.as_ref())?;
    let rank = dist.as_ref().map_or(0, |d| d.comm.rank());
    let device_name = match (&a.cluster, &dist, &plan) {
        (Some(p), Some(_), _) => nuwa_dist::ClusterFile::load(p)?.spec(rank).device,
        (None, _, Some(plan)) => super::plan_run::device_of(plan, rank),
        _ => a.device.clone(),
    };
    let device = device::parse_device(&device_name)?;
    let mut config = run_config(&a)?;
    if let (Some(plan), Some(path)) = (&plan, &a.plan) {
        plan.check_model(&config.model)
            .map_err(|e| anyhow!("--plan {}: {e}", path.display()))?;
    }
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
    if a.allow_data_change && a.resume.is_none() {
        bail!("--allow-data-change: only with --resume");
    }
    let resume_overrides = match &a.resume {
        Some(dir) => resume_overrides(&a, dir)?,
        None => ResumeOverrides::default(),
    };
    if let Some(d) = &dist {
        let settings = job_settings(&a, &config, &run_dir, d)?;
        nuwa_train::parallel::check_same_settings(d.comm.as_ref(), &settings)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupted: saving a checkpoint after this step (again to quit now; a checkpoint \
             being written is then abandoned, the one before it kept)"
        );
    })
    .context("installing the Ctrl-C handler")?;
    let run_dir_for_hooks = run_dir.clone();
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
        resume_overrides,
        allow_data_change: a.allow_data_change,
        sync_checkpoints: a.sync_checkpoints,
        step_hook: step_hook(&a, &device_name, &run_dir_for_hooks)?,
    });
    // Every rank finalises MPI before it exits, whether the run succeeded or not.
    #[cfg(feature = "mpi")]
    nuwa_dist::mpi_comm::finalize();
    let report = report?;
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
            None,
            &device,
        );
        // Training succeeded; a sample that cannot be drawn is a note, not a failure.
        if let Err(e) = sampled {
            println!("(no sample: {e:#})");
        }
    }
    Ok(())
}

/// What every rank of a job must agree on, by name: the resolved run configuration, the
/// layout and the flags that steer the job — not the device (unequal ranks may run on
/// different backends).
fn job_settings(
    a: &TrainArgs,
    config: &RunConfig,
    run_dir: &std::path::Path,
    dist: &nuwa_train::parallel::DistOptions,
) -> Result<Vec<(String, String)>> {
    let flags = serde_json::json!({
        "--run-dir": run_dir,
        "--resume": a.resume.is_some(),
        "--init-from": a.init_from,
        "--stop-at": a.stop_at,
        "--ep": dist.ep,
        "--ep-split": (dist.ep_split != nuwa_plan::ExpertSplit::Experts)
            .then_some(dist.ep_split.as_str()),
        "--pp": dist.pp,
        "--stage-layers": dist.stage_layers,
        "expert placement": dist.placement,
        "--cluster memory_gb": dist.memory_bytes,
        "--cluster max_seqs": dist.max_seqs,
        "--rebalance-every": dist.rebalance_every,
        "--hash-params": dist.hash_params,
        "--throttle": a.throttle,
        "--throttle-from": a.throttle_from,
        "--fault-kill-at": a.fault_kill_at,
        "--fault-hang-at": a.fault_hang_at,
    });
    let mut settings = Vec::new();
    flatten_json("", &serde_json::to_value(config)?, &mut settings);
    flatten_json("", &flags, &mut settings);
    Ok(settings)
}

/// `value`'s leaves as (dotted path, JSON text).
fn flatten_json(path: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(fields) => {
            for (name, v) in fields {
                let path = match path {
                    "" => name.clone(),
                    _ => format!("{path}.{name}"),
                };
                flatten_json(&path, v, out);
            }
        }
        leaf => out.push((path.to_string(), leaf.to_string())),
    }
}

/// `--plan FILE`: checks it and takes its model, batch and layout into the flags (a flag
/// that says otherwise is refused).
fn apply_plan(a: &mut TrainArgs, path: &std::path::Path) -> Result<nuwa_plan::PlanFile> {
    {
        use super::plan_run::take;
        let plan = super::plan_run::load_checked(path)?;
        if a.preset.is_none() && a.config.is_none() && a.model_config.is_none() {
            match std::path::Path::new(&plan.model).exists() {
                true => a.model_config = Some(PathBuf::from(&plan.model)),
                false => a.preset = Some(plan.model.clone()),
            }
        }
        take("--seq-len", &mut a.seq_len, plan.seq_len)?;
        take("--batch-size", &mut a.batch_size, plan.batch_size())?;
        take("--grad-accum", &mut a.grad_accum, plan.grad_accum())?;
        let (mut ep, mut pp) = ((a.ep > 1).then_some(a.ep), (a.pp > 1).then_some(a.pp));
        take("--ep", &mut ep, plan.layout.ep as u64)?;
        take("--pp", &mut pp, plan.layout.pp as u64)?;
        (a.ep, a.pp) = (plan.layout.ep as u64, plan.layout.pp as u64);
        if let Some(split) = plan.layout.expert_split {
            take("--ep-split", &mut a.ep_split, split)?;
        }
        if plan.ranks() > 1 && a.dist.is_none() {
            bail!(
                "--plan {}: the plan is for {} ranks: start them with `nuwa launch --plan {} -- ...`",
                path.display(),
                plan.ranks(),
                path.display()
            );
        }
        Ok(plan)
    }
}

/// Refuses bad `--dump-tensors` / `--parity-every` flags before anything is created.
fn check_hook_flags(a: &TrainArgs) -> Result<()> {
    if !a.dump_tensors.is_empty() && a.parity_every > 0 {
        bail!("--dump-tensors and --parity-every: use one at a time");
    }
    if let Some(zero) = a.dump_tensors.iter().find(|&&s| s == 0) {
        bail!("--dump-tensors {zero}: steps count from 1");
    }
    if a.parity_every > 0 {
        parity_device(a)?;
    }
    Ok(())
}

/// `--dump-tensors` / `--parity-every`: work beside the training (one at a time).
fn step_hook(
    a: &TrainArgs,
    device_name: &str,
    run_dir: &std::path::Path,
) -> Result<Option<Box<dyn nuwa_train::StepHook>>> {
    use nuwa_parity::hooks::{DumpHook, ParityHook};
    if !a.dump_tensors.is_empty() {
        return Ok(Some(Box::new(DumpHook {
            steps: a.dump_tensors.iter().copied().collect(),
            dir: a.dump_dir.clone().unwrap_or_else(|| run_dir.join("dumps")),
            source: device_name.to_string(),
        })));
    }
    if a.parity_every > 0 {
        return Ok(Some(Box::new(ParityHook {
            every: a.parity_every,
            here: device_name.to_string(),
            other: parity_device(a)?,
        })));
    }
    Ok(None)
}

fn parity_device(a: &TrainArgs) -> Result<nuwa_parity::Target> {
    super::parity::target(&a.parity_device).map_err(|e| anyhow::anyhow!("--parity-device: {e}"))
}
