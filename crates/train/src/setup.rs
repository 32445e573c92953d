//! Setting a run up: the run folder, resume, the data, the checked configuration, and the
//! model, optimiser and sampler — fresh, from given weights, or as the checkpoint left them.

use crate::metrics::MetricsLog;
use crate::optim::{AdamW, AdamWConfig};
use crate::strategy::Parallelism;
use crate::trainer::TrainOptions;
use anyhow::{bail, Context, Result};
use nuwa_data::TokenizerSpec;
use nuwa_data::{eval_batches, Batch, BatchSampler, Dataset, PrepareOptions, Source, Tokenizer};
use nuwa_model::weights::assign_weights;
use nuwa_model::weights::HostTensor;
use nuwa_model::LanguageModel;
use nuwa_run::checkpoint::{self, DataRecord, Loaded};
use nuwa_run::RunConfig;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Everything the loop needs, as of the first step to run.
pub struct Session {
    pub run: PathBuf,
    pub cfg: RunConfig,
    pub data: Dataset,
    pub evals: Vec<Batch>,
    pub model: LanguageModel,
    pub opt: AdamW,
    pub sampler: BatchSampler,
    /// Loss-spike handling's state.
    pub spikes: nuwa_run::SpikeGuard,
    pub start_step: u64,
    pub tokens_seen: u64,
    /// Training FLOPs per token of this model at the run's context (for MFU).
    pub flops_per_token: f64,
    /// Rank 0's metrics file (the other ranks write nothing).
    pub log: Option<MetricsLog>,
    /// Rank 0's checkpoint writer (declared before the lock: dropped, it finishes a write in
    /// flight while the run is still held).
    pub writer: Option<nuwa_run::CheckpointWriter>,
    /// Rank 0's hold on the run folder, for the session's life.
    pub lock: Option<nuwa_run::RunLock>,
}

/// Opens the run's dataset, preparing the built-in corpus into `RUN/data` when none is given.
fn open_dataset(run: &Path, cfg: &RunConfig) -> Result<Dataset> {
    match &cfg.data.dir {
        Some(dir) => Dataset::open(Path::new(dir)),
        None => {
            let dir = run.join("data");
            if !dir.join(nuwa_data::shards::MANIFEST_FILE).exists() {
                nuwa_data::prepare(&PrepareOptions {
                    source: Source::Builtin,
                    tokenizer: TokenizerSpec::Char,
                    out_dir: dir.clone(),
                    val_fraction: 0.1,
                    // The run's own folder; a killed preparation may have left part of it.
                    force: true,
                })?;
            }
            Dataset::open(&dir)
        }
    }
}

/// The run's configuration: the checkpoint's on resume (only `train.steps` may grow), else the
/// given one.
fn base_config(opts: &TrainOptions, resumed: Option<&Loaded>) -> Result<RunConfig> {
    let Some(l) = resumed else {
        return Ok(opts.config.clone());
    };
    let mut c = l.state.config.clone();
    let o = &opts.resume_overrides;
    if let Some(steps) = o.steps {
        if steps < l.state.step {
            bail!(
                "--steps {steps}: {} is already at step {}; pass a larger --steps to train on",
                opts.run_dir.display(),
                l.state.step
            );
        }
        c.train.steps = steps;
    }
    c.train.eval_every = o.eval_every.unwrap_or(c.train.eval_every);
    c.train.checkpoint_every = o.checkpoint_every.unwrap_or(c.train.checkpoint_every);
    Ok(c)
}

/// Refuses to resume on data other than the run trained on (prepared again under it), unless
/// allowed; then says so.
fn check_same_data(resumed: &Loaded, data: &Dataset, allow_change: bool) -> Result<()> {
    let Some(was) = &resumed.state.data else {
        return Ok(());
    };
    let Some(change) = was.changes(&DataRecord::of(data)) else {
        return Ok(());
    };
    if !allow_change {
        bail!(
            "{}: the data changed since {} trained on it ({change}); pass --allow-data-change \
             to resume on the new data",
            data.dir.display(),
            resumed.dir.display()
        );
    }
    eprintln!(
        "note: {}: resuming on changed data ({change}), as --allow-data-change asks",
        data.dir.display()
    );
    Ok(())
}

/// `cfg` completed (the vocabulary from the data when unset) and checked against the data.
fn check_config(mut cfg: RunConfig, data: &Dataset) -> Result<RunConfig> {
    if cfg.model.vocab_size == 0 {
        cfg.model.vocab_size = data.manifest.vocab_size;
    }
    cfg.model.validate()?;
    cfg.train.validate()?;
    if !nuwa_model::kernels::bf16_matmul::set_precision(cfg.train.precision) {
        bail!(
            "--precision (train.precision) {}: this CPU has no AVX512-BF16 (or this build no \
             CPU backend); use f32",
            cfg.train.precision
        );
    }
    if cfg.model.vocab_size < data.manifest.vocab_size {
        bail!(
            "config field `vocab_size`: {} is smaller than the data's vocabulary ({}, {})",
            cfg.model.vocab_size,
            data.manifest.vocab_size,
            data.dir.display()
        );
    }
    if cfg.train.seq_len > cfg.model.max_position_embeddings {
        bail!(
            "--seq-len (train.seq_len) {}: exceeds the model's max_position_embeddings {}; \
             train on shorter sequences or set a larger max_position_embeddings in a model \
             config",
            cfg.train.seq_len,
            cfg.model.max_position_embeddings
        );
    }
    Ok(cfg)
}

/// Bytes one training process needs, roughly: f32 weights, gradients and AdamW's two moments
/// (16 bytes a parameter), and the activations autodiff keeps for one micro-batch (per token
/// and layer: the layer's inputs and intermediates, the attention scores; per token: the
/// logits and their softmax). An estimate to refuse the impossible, not a budget.
fn training_memory(cfg: &RunConfig) -> (f64, f64) {
    let (m, t) = (&cfg.model, &cfg.train);
    let params = m.counts(t.seq_len).total_params as f64 * nuwa_model::TRAIN_BYTES_PER_PARAM;
    let tokens = (t.batch_size * t.seq_len) as f64;
    let layers = (m.num_hidden_layers + m.num_nextn_predict_layers) as f64;
    let activations = tokens
        * (layers * m.activation_bytes_per_token_layer(t.seq_len)
            + m.head_activation_bytes_per_token());
    (params, activations)
}

/// Refuses, before allocating, a run that cannot fit in the memory the OS says is available,
/// naming what is too big.
fn check_training_fits(cfg: &RunConfig) -> Result<()> {
    let Some(available) = nuwa_core::hardware::available_memory() else {
        return Ok(());
    };
    let (params, activations) = training_memory(cfg);
    let gib = |b: f64| b / (1u64 << 30) as f64;
    if params + activations > available as f64 {
        let culprit = if params >= activations {
            format!(
                "the model ({} parameters: layers, hidden_size, experts)",
                cfg.model.counts(1).total_params
            )
        } else {
            format!(
                "a micro-batch's activations (--batch-size {} × --seq-len {} over {} layers)",
                cfg.train.batch_size, cfg.train.seq_len, cfg.model.num_hidden_layers
            )
        };
        bail!(
            "training needs about {:.1} GiB ({:.1} GiB for weights, gradients and AdamW, {:.1} GiB \
             of activations), mostly for {culprit}, but only {:.1} GiB of memory is available",
            gib(params + activations),
            gib(params),
            gib(activations),
            gib(available as f64)
        );
    }
    Ok(())
}

/// Opens or resumes the run of `opts`; rank 0 writes the run's side files.
pub fn open_session(opts: &TrainOptions, strategy: &mut dyn Parallelism) -> Result<Session> {
    let is_main = strategy.rank() == 0;
    let run = opts.run_dir.clone();
    checkpoint::refuse_checkpoint_dir(&run, "")?;
    std::fs::create_dir_all(&run)
        .with_context(|| format!("{}: cannot create run folder", run.display()))?;
    // One writer per run folder (rank 0 writes for the job), then what killed saves left.
    let lock = match is_main {
        true => Some(nuwa_run::RunLock::acquire(&run)?),
        false => None,
    };
    if is_main {
        let removed = checkpoint::remove_leftovers(&run);
        if removed > 0 {
            eprintln!("note: removed {removed} unfinished checkpoint folder(s) left by an interrupted save");
        }
    }
    let resumed = if opts.resume {
        let loaded = checkpoint::load_latest(&run)?;
        loaded.check_resumable()?;
        Some(loaded)
    } else {
        if !checkpoint::list_checkpoints(&run).is_empty() {
            bail!("{}: already holds checkpoints; pass --resume to continue it or choose another --run-dir", run.display());
        }
        None
    };
    // Rank 0 prepares the built-in corpus (if needed) before the others open it.
    if !is_main {
        strategy.barrier();
    }
    let cfg = base_config(opts, resumed.as_ref())?;
    let data = open_dataset(&run, &cfg);
    if is_main {
        strategy.barrier();
    }
    let data = data?;
    if let Some(l) = &resumed {
        check_same_data(l, &data, opts.allow_data_change)?;
    }
    let cfg = check_config(cfg, &data)?;
    check_training_fits(&cfg)?;
    if is_main {
        Tokenizer::load(&data.dir)?.save(&run)?;
        nuwa_core::atomic_write(
            &run.join("config.toml"),
            toml::to_string_pretty(&cfg)?.as_bytes(),
        )?;
    }
    let start_at = resumed.as_ref().map_or(0, |l| l.state.step);
    strategy.start(&cfg, start_at)?;
    let t = &cfg.train;
    let device = opts.device.clone().autodiff();
    // A process of a pipeline or expert-parallel job allocates only its own part.
    let (stage, group) = (strategy.stage(), strategy.expert_group());
    nuwa_core::hardware::mark_rss_before_model();
    let mut model = match (&stage, &group) {
        (None, None) => LanguageModel::new(&cfg.model, &device, t.seed),
        _ => LanguageModel::new_part(&cfg.model, &device, t.seed, stage.as_ref(), group.as_ref()),
    };
    // It takes its own tensors of a whole checkpoint (whatever layout wrote it).
    let load = |model: LanguageModel, weights: &BTreeMap<String, HostTensor>, what: &str| {
        let mut own: BTreeMap<String, HostTensor> = weights
            .iter()
            .filter(|(n, _)| stage.as_ref().is_none_or(|s| s.owns(n)))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        if let Some(group) = &group {
            own.extend(crate::expert::slice_experts(&own, group));
        }
        match &stage {
            Some(_) => Ok(nuwa_model::weights::replace_weights(model, &own)),
            None => assign_weights(model, &own, what),
        }
    };
    let mut opt = AdamW::new(AdamWConfig {
        beta1: t.beta1,
        beta2: t.beta2,
        eps: t.eps,
        weight_decay: t.weight_decay,
    });
    let mut sampler = BatchSampler::new(t.seed);
    let mut spikes = nuwa_run::SpikeGuard::default();
    let (mut start_step, mut tokens_seen) = (0, 0);
    if let (Some(weights), None) = (&opts.init_weights, &resumed) {
        model = load(model, weights, "the initial weights")?;
    }
    if let Some(l) = &resumed {
        let what = l.dir.join(checkpoint::MODEL_FILE).display().to_string();
        model = load(model, &l.weights, &what)?;
        // Skipped steps made no optimiser step.
        let updates = l.state.step - l.state.spikes.skipped.min(l.state.step);
        opt.restore(updates, &l.optimizer, &opts.device)?;
        sampler = l.state.sampler;
        spikes = l.state.spikes.clone();
        start_step = l.state.step;
        tokens_seen = l.state.tokens_seen;
    }
    let evals = eval_batches(&data.val, t.batch_size, t.seq_len, t.eval_batches)?;
    let log = if is_main {
        Some(MetricsLog::open(&run)?)
    } else {
        None
    };
    let flops_per_token = cfg.model.counts(t.seq_len).train_flops_per_token;
    let writer = is_main
        .then(|| nuwa_run::CheckpointWriter::new(&run, t.keep_checkpoints, opts.sync_checkpoints));
    Ok(Session {
        writer,
        flops_per_token,
        run,
        cfg,
        data,
        evals,
        model,
        opt,
        sampler,
        spikes,
        start_step,
        tokens_seen,
        log,
        lock,
    })
}
