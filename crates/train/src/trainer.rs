//! The training loop: set the run up, then one step at a time — this process's part, the
//! combination across processes, the optimiser update, metrics, evaluation, checkpoints.

use crate::metrics::plot_losses;
use crate::optim::AdamW;
use crate::parallel::DistOptions;
use crate::pipeline::Pipeline;
use crate::setup::{open_session, Session};
use crate::step::{evaluate, local_step};
use crate::strategy::{CheckpointPart, DataParallel, Parallelism, ReducedStep, SingleProcess};
use anyhow::{bail, Result};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use nuwa_core::rng::splitmix64;
use nuwa_data::Batch;
use nuwa_model::weights::HostTensor;
use nuwa_model::LanguageModel;
use nuwa_run::checkpoint::{self, DataRecord, Snapshot, TrainerState};
use nuwa_run::{RunConfig, Verdict};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub struct TrainOptions {
    pub run_dir: PathBuf,
    pub config: RunConfig,
    /// Continue from the run's newest checkpoint (its config wins, except `train.steps`).
    pub resume: bool,
    /// A plain device; autodiff is enabled on it for training.
    pub device: Device,
    pub show_progress: bool,
    /// Set (e.g. by Ctrl-C) to save a checkpoint and stop after the current step.
    pub stop: Arc<AtomicBool>,
    /// Peak FLOP/s of the device, for MFU (`nuwa_core::hardware::peak_flops`); `None`: not
    /// known, and MFU is not reported.
    pub peak_flops: Option<f64>,
    /// Stop after this step as if interrupted: save a checkpoint and return (the schedule still
    /// spans `train.steps`, so a resume continues the same run).
    pub stop_at: Option<u64>,
    /// Start from these weights (nuwa names, e.g. an imported HF checkpoint) instead of a
    /// seeded initialisation; ignored on resume.
    pub init_weights: Option<BTreeMap<String, HostTensor>>,
    /// Data-parallel training over several processes (`None`: this process alone).
    pub dist: Option<DistOptions>,
    /// What a resume may change (the rest of the run's configuration is its own).
    pub resume_overrides: ResumeOverrides,
    /// Resume even though the data's checksums differ from those the run trained on.
    pub allow_data_change: bool,
    /// Write each checkpoint before the next step instead of in the background.
    pub sync_checkpoints: bool,
    /// Runs before every optimiser step (`nuwa train --dump-tensors`, `--parity-every`).
    pub step_hook: Option<Box<dyn StepHook>>,
}

/// What a step is about to compute with, for a [`StepHook`].
pub struct StepView<'a> {
    /// 1-based.
    pub step: u64,
    pub model: &'a LanguageModel,
    pub model_config: &'a nuwa_model::ModelConfig,
    pub opt: &'a AdamW,
    /// The step's first micro-batch (this process's rows of it).
    pub batch: &'a Batch,
    pub train: &'a nuwa_run::TrainConfig,
    /// The step's learning rate.
    pub lr: f64,
    /// The training device (with autodiff).
    pub device: &'a Device,
}

/// Work done beside the training, before each step, on copies of what the step uses (the
/// model and optimizer are shared, never changed: the run trains exactly as without it).
/// What it returns goes into the step's metrics.jsonl line.
pub trait StepHook {
    fn before_step(&mut self, view: &StepView) -> Result<Map<String, Value>>;
}

/// Runs the hook on the batch step `done` will draw first.
fn run_hook(
    hook: &mut (dyn StepHook + 'static),
    s: &Session,
    strategy: &dyn Parallelism,
    done: u64,
    lr: f64,
    device: &Device,
) -> Result<Map<String, Value>> {
    let t = &s.cfg.train;
    let (rows, shared) = {
        let rows = strategy.rows();
        (rows.of(0), rows.shared)
    };
    if rows.is_empty() {
        return Ok(Map::new());
    }
    let mut peek = s.sampler; // a copy: the step itself draws from the real one
    let mut batch = peek.next_batch(&s.data.train, t.batch_size, t.seq_len)?;
    if shared {
        batch = batch.rows(rows.start, rows.end);
    }
    hook.before_step(&StepView {
        step: done,
        model: &s.model,
        model_config: &s.cfg.model,
        opt: &s.opt,
        batch: &batch,
        train: t,
        lr,
        device,
    })
}

/// The settings `--resume` may change; `None` keeps the run's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResumeOverrides {
    /// Train to this step (the learning-rate schedule then spans it).
    pub steps: Option<u64>,
    pub eval_every: Option<u64>,
    pub checkpoint_every: Option<u64>,
}

/// What one optimiser step measured.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

#[derive(Debug, Clone)]
pub struct TrainReport {
    pub run_dir: PathBuf,
    pub steps: Vec<StepRecord>,
    pub last_val_loss: Option<f64>,
    pub interrupted: bool,
    pub config: RunConfig,
}

fn progress_bar(show: bool, steps: u64, start: u64) -> ProgressBar {
    let bar = if show {
        ProgressBar::new(steps)
    } else {
        ProgressBar::hidden()
    };
    let template = "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}";
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(start);
    bar
}

/// Saves the session's state after `step` optimiser steps: copies it to host memory and hands
/// it to rank 0's background writer, or — a model split across processes — every owner writes
/// its shard at once. Returns the seconds the step was held up.
fn save(s: &mut Session, strategy: &dyn Parallelism, step: u64) -> Result<f64> {
    let start = Instant::now();
    let state = TrainerState {
        step,
        sampler: s.sampler,
        tokens_seen: s.tokens_seen,
        config: s.cfg.clone(),
        checksums: Default::default(),
        format: checkpoint::CHECKPOINT_FORMAT,
        spikes: s.spikes.clone(),
        data: Some(DataRecord::of(&s.data)),
        shards: Vec::new(),
    };
    match strategy.checkpoint_part(strategy.host_weights(&s.model), s.opt.to_host()) {
        CheckpointPart::Whole { weights, optimizer } => {
            let snapshot = Snapshot::of(weights, optimizer, state)?;
            if let Some(writer) = s.writer.as_mut() {
                writer.submit(snapshot)?;
            }
        }
        // Every process writes its part now: the save is one collective.
        CheckpointPart::Sharded { comm, mine } => {
            if let Some(writer) = s.writer.as_mut() {
                writer.wait()?;
            }
            let keep = s.cfg.train.keep_checkpoints;
            nuwa_run::sharded::write_sharded(&s.run, comm.as_ref(), mine, state, keep)?;
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

/// A step's re-placement after its update (experts moved to new ranks or slots) is part of
/// its time: `replace_seconds`, and added into `step_seconds` and `tokens_per_s`.
fn count_moves(metrics: &mut Map<String, Value>, seconds: f64) {
    if seconds < 1e-3 {
        return; // nothing moved
    }
    let step_s = metrics.get("step_seconds").and_then(Value::as_f64);
    let rate = metrics.get("tokens_per_s").and_then(Value::as_f64);
    if let (Some(step_s), Some(rate)) = (step_s, rate) {
        let total = step_s + seconds;
        metrics.insert("step_seconds".into(), json!(total));
        metrics.insert("tokens_per_s".into(), json!(rate * step_s / total));
    }
    metrics.insert("replace_seconds".into(), json!(seconds));
}

/// The step's line of `metrics.jsonl`.
fn step_metrics(
    s: &Session,
    done: u64,
    step: &ReducedStep,
    lr: f64,
    norm: f64,
    seconds: f64,
) -> Map<String, Value> {
    let t = &s.cfg.train;
    let tokens = (t.batch_size * t.grad_accum * t.seq_len) as f64;
    let mut record = json!({
        "step": done, "loss": step.ce, "lr": lr, "grad_norm": norm,
        "tokens_per_s": tokens / seconds, "step_seconds": seconds,
        "tokens_seen": s.tokens_seen,
        // Sample ids are positions in the sampler's stream: global batch c, row i is c·B + i.
        "sample_count": t.batch_size * t.grad_accum,
    });
    if let Some(mtp) = step.mtp_loss {
        record["mtp_loss"] = json!(mtp);
    }
    if let Some(lb) = step.load_balance {
        record["load_balance_loss"] = json!(lb);
        record["z_loss"] = json!(step.z_loss.unwrap_or(0.0));
        // The whole step's global batch, per MoE layer (every rank's micro-batches).
        let load: Vec<Vec<u64>> = step
            .expert_load
            .iter()
            .map(|l| l.iter().map(|&c| c.round() as u64).collect())
            .collect();
        record["tokens_per_expert"] = json!(load);
    }
    let mut map = record.as_object().cloned().unwrap_or_default();
    map.extend(step.metrics.clone());
    map
}

/// This process's part of step `done` (1-based) combined with the others': the whole
/// batch's gradients and totals.
fn combined_step(
    s: &mut Session,
    strategy: &mut dyn Parallelism,
    done: u64,
    stop: bool,
    device: &Device,
) -> Result<(GradientsParams, ReducedStep)> {
    let t = &s.cfg.train;
    // Dropout masks depend only on (seed, step): a resumed run draws the same ones.
    device.seed(splitmix64(t.seed ^ splitmix64(done - 1)));
    strategy.begin_step(done);
    let rows = strategy.rows();
    let local = match strategy.run_step(&s.model, &mut s.sampler, &s.data.train, t, device) {
        Some(local) => local?,
        None => {
            let global = || strategy.global_batch(done);
            local_step(
                &s.model,
                &mut s.sampler,
                &s.data.train,
                t,
                &rows,
                global,
                device,
            )?
        }
    };
    Ok(strategy.reduce(done, &s.model, local, stop))
}

/// The AdamW update with gradients clipped to a global norm of `clip` (0: none); returns the
/// updated model and the norm before clipping.
fn update(
    model: LanguageModel,
    opt: &mut AdamW,
    grads: GradientsParams,
    lr: f64,
    (norm, clip): (f64, f64),
) -> Result<(LanguageModel, f64)> {
    if !norm.is_finite() {
        // Applied, it would poison every weight: stop with the last good checkpoint.
        bail!("the gradient norm is {norm}");
    }
    let scale = match clip > 0.0 && norm > clip {
        true => clip / norm,
        false => 1.0,
    };
    Ok((opt.step(model, grads, lr, scale), norm))
}

/// A finished optimiser step: the combined totals, what the caller keeps, the metrics line.
struct Stepped {
    totals: ReducedStep,
    record: StepRecord,
    metrics: Map<String, Value>,
    tokens_per_s: f64,
    mfu: Option<f64>,
}

/// The stochastic routing warm-up's mix at step `done` (1-based), when the run has a warm-up:
/// step 1 routes on noise alone, from step W + 1 on the logits alone.
fn routing_mix(t: &nuwa_run::TrainConfig, done: u64) -> Option<f64> {
    (t.routing_warmup_steps > 0).then(|| (done - 1) as f64 / t.routing_warmup_steps as f64)
}

/// Carries out the loss-spike verdict: no update for a skipped step, else the update at the
/// verdict's learning rate. Returns the session, the learning rate applied and the gradient norm.
fn apply_verdict(
    mut s: Session,
    (grads, norm): (GradientsParams, f64),
    verdict: Verdict,
    lr: f64,
    done: u64,
) -> Result<(Session, f64, f64)> {
    let lr = match verdict {
        Verdict::Skip => return Ok((s, 0.0, norm)),
        Verdict::LowerLr(scale) => lr * scale,
        Verdict::Accept => lr,
    };
    let kept = checkpoint::checkpoints_dir(&s.run);
    let (model, norm) = update(
        s.model,
        &mut s.opt,
        grads,
        lr,
        (norm, s.cfg.train.grad_clip),
    )
    .map_err(|e| {
        e.context(format!(
            "step {done}: stopping without an update (last good checkpoint kept in {})",
            kept.display()
        ))
    })?;
    s.model = model;
    Ok((s, lr, norm))
}

/// Step `done` (1-based) from start to update, timed and measured. The session passes
/// through by value so the optimiser owns the model while it updates it (in place).
fn train_step(
    mut s: Session,
    strategy: &mut dyn Parallelism,
    done: u64,
    stop: bool,
    peak_flops: Option<f64>,
    device: &Device,
    hook: Option<&mut (dyn StepHook + 'static)>,
) -> Result<(Session, Stepped)> {
    let t = s.cfg.train.clone();
    let tokens = (t.batch_size * t.grad_accum * t.seq_len) as f64;
    let (started, lr) = (Instant::now(), t.lr_at(done - 1));
    // Data a loss spike deferred runs in place of fresh data when it is due.
    let retry = s.spikes.due(done);
    let fresh = s.sampler.cursor;
    if let Some(cursor) = retry {
        s.sampler.cursor = cursor;
    }
    let data_cursor = s.sampler.cursor;
    let sample_start = data_cursor * t.batch_size as u64;
    if let Some(mix) = routing_mix(&t, done) {
        s.model.set_routing_mix(mix);
    }
    // Before the step: `combined_step` seeds the device again, so whatever random numbers the
    // hook draws leave the step's own (dropout) unchanged.
    let hooked = match hook {
        Some(hook) => run_hook(hook, &s, strategy, done, lr, device)?,
        None => Map::new(),
    };
    let (grads, totals) = combined_step(&mut s, strategy, done, stop, device)?;
    if retry.is_some() {
        s.sampler.cursor = fresh;
    }
    if !totals.ce.is_finite() {
        bail!(
            "step {done}: loss is {}; stopping without an update (last good checkpoint kept in {})",
            totals.ce,
            checkpoint::checkpoints_dir(&s.run).display()
        );
    }
    let retried = retry.is_some();
    let verdict = s.spikes.judge(
        done,
        totals.ce,
        t.loss_spike_threshold,
        retried,
        data_cursor,
    );
    let norm = strategy.grad_norm(&s.model, &grads);
    let (mut s, lr, norm) = apply_verdict(s, (grads, norm), verdict, lr, done)?;
    // Aux-loss-free balancing: every rank applies the same global load, so biases stay equal.
    let bias_max = match t.expert_bias_update_rate > 0.0 && verdict != Verdict::Skip {
        true => s
            .model
            .update_expert_bias(&totals.expert_load, t.expert_bias_update_rate),
        false => Vec::new(),
    };
    s.tokens_seen += tokens as u64;
    let seconds = started.elapsed().as_secs_f64();
    let mfu = peak_flops.map(|p| tokens / seconds * s.flops_per_token / p);
    let mut metrics = step_metrics(&s, done, &totals, lr, norm, seconds);
    metrics.insert("mfu".into(), json!(mfu));
    metrics.extend(hooked);
    if !bias_max.is_empty() {
        metrics.insert("expert_load".into(), json!(totals.expert_load));
        metrics.insert("expert_bias_max_abs".into(), json!(bias_max));
    }
    metrics.insert("sample_start".into(), json!(sample_start));
    if let Some(mix) = routing_mix(&t, done).filter(|_| done <= t.routing_warmup_steps) {
        metrics.insert("routing_mix".into(), json!(mix));
    }
    if verdict != Verdict::Accept || retried {
        let action = match verdict {
            Verdict::Skip => "skipped",
            Verdict::LowerLr(_) => "lowered_lr",
            Verdict::Accept => "retried",
        };
        metrics.insert(
            "loss_spike".into(),
            json!({"action": action, "loss": totals.ce, "trend": s.spikes.trend,
                   "data_cursor": data_cursor}),
        );
    }
    strategy.after_update(&s.model, &mut metrics);
    let record = StepRecord {
        step: done,
        loss: totals.ce,
        lr,
        grad_norm: norm,
    };
    let tokens_per_s = tokens / seconds;
    Ok((
        s,
        Stepped {
            totals,
            record,
            metrics,
            tokens_per_s,
            mfu,
        },
    ))
}

pub fn train(mut opts: TrainOptions) -> Result<TrainReport> {
    let mut strategy: Box<dyn Parallelism> = match opts.dist.take() {
        Some(d) if d.pp > 1 => Box::new(Pipeline::new(d, &opts.device)),
        Some(d) => Box::new(DataParallel::new(d, &opts.device)),
        None => Box::new(SingleProcess::default()),
    };
    let is_main = strategy.rank() == 0;
    let mut s = open_session(&opts, strategy.as_mut())?;
    let (t, device) = (s.cfg.train.clone(), opts.device.clone().autodiff());
    s.model = strategy.prepare(s.model, &mut s.opt, &opts.device);
    // Every process evaluates and saves when each holds a different part of the model.
    let shared_work = is_main || strategy.shards_model();
    let bar = progress_bar(opts.show_progress && is_main, t.steps, s.start_step);
    let (mut records, mut last_val, mut interrupted) = (Vec::new(), None, false);
    // The newest step with a checkpoint (a resumed run starts at one).
    let mut saved = (s.start_step > 0).then_some(s.start_step);
    for done in s.start_step + 1..=t.steps {
        let stop = opts.stop.load(Ordering::SeqCst);
        if opts.stop_at.is_some_and(|at| done > at) || (stop && !strategy.is_distributed()) {
            interrupted = true;
            break;
        }
        let (next, mut step) = train_step(
            s,
            strategy.as_mut(),
            done,
            stop,
            opts.peak_flops,
            &device,
            opts.step_hook.as_deref_mut(),
        )?;
        s = next;
        let moving = Instant::now();
        s.model = strategy.after_step(s.model, &mut s.opt, &opts.device);
        count_moves(&mut step.metrics, moving.elapsed().as_secs_f64());
        let loss = step.record.loss;
        for note in step.totals.notes.iter().filter(|_| is_main) {
            bar.println(note);
        }
        if shared_work && (done % t.eval_every.max(1) == 0 || done == t.steps) {
            let val = match strategy.evaluate(&s.model, &s.evals, &opts.device) {
                Some(val) => val,
                None => evaluate(&s.model.valid(), &s.evals, &opts.device),
            };
            if !val.is_finite() {
                bail!("step {done}: validation loss is {val}; stopping (no checkpoint of it is written)");
            }
            step.metrics.insert("val_loss".into(), json!(val));
            last_val = Some(val);
            bar.println(format!(
                "step {done:>6}  train loss {loss:.4}  val loss {val:.4}"
            ));
        }
        let checkpoint_due = done % t.checkpoint_every.max(1) == 0 || done == t.steps;
        if shared_work && (checkpoint_due || step.totals.stop) {
            let blocked = save(&mut s, strategy.as_ref(), done)?;
            saved = Some(done);
            step.metrics
                .insert("checkpoint_blocked_seconds".into(), json!(blocked));
        }
        if let Some(writer) = s.writer.as_mut() {
            writer.poll()?;
        }
        if let Some(log) = s.log.as_mut() {
            log.write(&Value::Object(step.metrics))?;
        }
        records.push(step.record);
        let mfu_note = step
            .mfu
            .map_or(String::new(), |m| format!(" | MFU {:.2}%", m * 100.0));
        bar.set_message(format!(
            "loss {loss:.4} | {:.0} tok/s{mfu_note}",
            step.tokens_per_s
        ));
        bar.inc(1);
        // Every rank saw the same gathered stop flag, so all leave the loop together.
        if step.totals.stop {
            interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();
    if interrupted && shared_work {
        let step = records.last().map_or(s.start_step, |r| r.step);
        if saved != Some(step) {
            save(&mut s, strategy.as_ref(), step)?;
        }
    }
    if let Some(writer) = s.writer.as_mut() {
        writer.wait()?;
    }
    if is_main {
        plot_losses(&s.run)?;
    }
    Ok(TrainReport {
        run_dir: s.run,
        steps: records,
        last_val_loss: last_val,
        interrupted,
        config: s.cfg,
    })
}
