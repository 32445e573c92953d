//! The training loop: data, model, AdamW, schedule, eval, metrics, checkpoints, resume.

use crate::checkpoint::{self, TrainerState};
use crate::config::RunConfig;
use crate::hardware::cpu_peak_flops;
use crate::metrics::{plot_losses, MetricsLog};
use crate::optim::{grad_norm, AdamW, AdamWConfig};
use crate::parallel::{
    all_reduce_gradients, gather_hashes, parameter_hash, Balancer, Collective, DistOptions,
    SoloCollective, Watchdog,
};
use crate::weights::{assign_weights, HostTensor};
use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use nuwa_data::sampler::splitmix64;
use nuwa_data::{
    eval_batches, Batch, BatchSampler, Dataset, PrepareOptions, Source, Tokenizer, TokenizerSpec,
};
use nuwa_model::{cross_entropy, LanguageModel};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Peak FLOP/s of the device, for MFU; `None` estimates a CPU's.
    pub peak_flops: Option<f64>,
    /// Stop after this step as if interrupted: save a checkpoint and return (the schedule still
    /// spans `train.steps`, so a resume continues the same run).
    pub stop_at: Option<u64>,
    /// Start from these weights (nuwa names, e.g. an imported HF checkpoint) instead of a
    /// seeded initialisation; ignored on resume.
    pub init_weights: Option<BTreeMap<String, HostTensor>>,
    /// Data-parallel training over several processes (`None`: this process alone).
    pub dist: Option<DistOptions>,
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
                })?;
            }
            Dataset::open(&dir)
        }
    }
}

fn batch_tensors(batch: &Batch, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let shape = [batch.batch_size, batch.seq_len];
    let to = |ids: &[u32]| {
        let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        Tensor::<2, Int>::from_data(TensorData::new(v, shape), device)
    };
    (to(&batch.inputs), to(&batch.targets))
}

/// Losses of one forward pass: cross-entropy, and the mean router losses over MoE layers.
struct Losses {
    ce: Tensor<1>,
    load_balance: Option<Tensor<1>>,
    z_loss: Option<Tensor<1>>,
    tokens_per_expert: Vec<Vec<usize>>,
}

/// The ranks sharing one global micro-batch, for the load-balance loss: its expert fractions
/// `f_e` must be the whole batch's, not one rank's, or the loss (nonlinear in the batch) and
/// its gradient would differ from one process's.
struct GlobalBatch<'a> {
    comm: &'a dyn Collective,
    watchdog: &'a Watchdog,
    step: u64,
    /// Top-k assignments in the global micro-batch (tokens × k).
    assignments: usize,
    /// Values each rank contributes: MoE layers × experts.
    counts_len: usize,
}

impl GlobalBatch<'_> {
    /// Every rank's tokens per expert, summed (`local` is this rank's, layer after layer).
    fn sum_counts(&self, local: &[Vec<usize>]) -> Vec<f32> {
        let mut counts: Vec<f32> = local.iter().flatten().map(|&c| c as f32).collect();
        counts.resize(self.counts_len, 0.0); // a rank with no rows has nothing to add
        self.watchdog.enter(self.step);
        self.comm.all_reduce_sum(&mut counts);
        self.watchdog.leave();
        counts
    }
}

fn forward_losses(
    model: &LanguageModel,
    batch: &Batch,
    device: &Device,
    global: Option<&GlobalBatch>,
) -> Losses {
    let (inputs, targets) = batch_tensors(batch, device);
    let out = model.forward(inputs, None);
    let ce = cross_entropy(out.logits, targets);
    let tokens_per_expert: Vec<Vec<usize>> = out
        .router
        .iter()
        .map(|s| s.tokens_per_expert.clone())
        .collect();
    let load_balance: Vec<Tensor<1>> = match global {
        None => out.router.iter().map(|s| s.load_balance.clone()).collect(),
        // E · Σ_e f_e(global) · P_e(this rank): weighted by this rank's token share and summed
        // over ranks, as the gradients are, it is exactly one process's E · Σ_e f_e · P_e.
        Some(g) => {
            let counts = g.sum_counts(&tokens_per_expert);
            let experts = counts.len() / out.router.len().max(1);
            out.router
                .iter()
                .zip(counts.chunks(experts.max(1)))
                .map(|(s, c)| {
                    let f: Vec<f32> = c.iter().map(|&n| n / g.assignments as f32).collect();
                    let f = Tensor::<1>::from_data(TensorData::new(f, [experts]), device);
                    (f * s.mean_prob.clone()).sum() * experts as f32
                })
                .collect()
        }
    };
    let n = out.router.len();
    let mean = |v: Vec<Tensor<1>>| (n > 0).then(|| Tensor::cat(v, 0).sum() / n as f32);
    Losses {
        ce,
        load_balance: mean(load_balance),
        z_loss: mean(out.router.iter().map(|s| s.z_loss.clone()).collect()),
        tokens_per_expert,
    }
}

/// Mean validation loss over the fixed evaluation batches.
pub fn evaluate(model: &LanguageModel, batches: &[Batch], device: &Device) -> f64 {
    let total: f64 = batches
        .iter()
        .map(|b| {
            forward_losses(model, b, device, None)
                .ce
                .into_scalar::<f32>() as f64
        })
        .sum();
    total / batches.len().max(1) as f64
}

fn scalar(t: &Option<Tensor<1>>) -> Option<f64> {
    t.as_ref().map(|t| t.clone().into_scalar::<f32>() as f64)
}

pub fn train(opts: TrainOptions) -> Result<TrainReport> {
    let comm: &dyn Collective = match &opts.dist {
        Some(d) => d.comm.as_ref(),
        None => &SoloCollective,
    };
    let (rank, ranks) = (comm.rank(), comm.size());
    // Only rank 0 writes: checkpoints, metrics, plots, the config and tokenizer copies.
    let is_main = rank == 0;
    let run = opts.run_dir.clone();
    std::fs::create_dir_all(&run)
        .with_context(|| format!("{}: cannot create run folder", run.display()))?;
    let device = opts.device.clone().autodiff();
    let plain = opts.device.clone();

    let resumed = if opts.resume {
        Some(checkpoint::load_latest(&run)?)
    } else {
        if !checkpoint::list_checkpoints(&run).is_empty() {
            bail!("{}: already holds checkpoints; pass --resume to continue it or choose another --run-dir", run.display());
        }
        None
    };
    let mut cfg = match &resumed {
        Some(l) => {
            let mut c = l.state.config.clone();
            c.train.steps = opts.config.train.steps.max(l.state.step);
            c
        }
        None => opts.config.clone(),
    };

    // Rank 0 prepares the built-in corpus (if needed) before the others open it.
    if !is_main {
        comm.barrier();
    }
    let data = open_dataset(&run, &cfg);
    if is_main {
        comm.barrier();
    }
    let data = data?;
    if cfg.model.vocab_size == 0 {
        cfg.model.vocab_size = data.manifest.vocab_size;
    }
    cfg.model.validate()?;
    cfg.train.validate()?;
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
            "config field `train.seq_len`: {} exceeds max_position_embeddings {}",
            cfg.train.seq_len,
            cfg.model.max_position_embeddings
        );
    }
    if is_main {
        let tokenizer = Tokenizer::load(&data.dir)?;
        tokenizer.save(&run)?;
        nuwa_data::atomic_write(
            &run.join("config.toml"),
            toml::to_string_pretty(&cfg)?.as_bytes(),
        )?;
    }

    let t = &cfg.train;
    let mut model = LanguageModel::new(&cfg.model, &device, t.seed);
    let mut opt = AdamW::new(AdamWConfig {
        beta1: t.beta1,
        beta2: t.beta2,
        eps: t.eps,
        weight_decay: t.weight_decay,
    });
    let mut sampler = BatchSampler::new(t.seed);
    let mut start_step = 0;
    let mut tokens_seen = 0u64;
    if let (Some(weights), None) = (&opts.init_weights, &resumed) {
        model = assign_weights(model, weights, "the initial weights")?;
    }
    if let Some(l) = &resumed {
        model = assign_weights(
            model,
            &l.weights,
            &l.dir.join(checkpoint::MODEL_FILE).display().to_string(),
        )?;
        checkpoint::restore_optimizer(&mut opt, l.state.step, &l.optimizer, &plain)?;
        sampler = l.state.sampler;
        start_step = l.state.step;
        tokens_seen = l.state.tokens_seen;
    }

    let evals = eval_batches(&data.val, t.batch_size, t.seq_len, t.eval_batches)?;
    let mut log = if is_main {
        Some(MetricsLog::open(&run)?)
    } else {
        None
    };
    let caps: Vec<Option<usize>> = opts
        .dist
        .as_ref()
        .map(|d| d.max_seqs.clone())
        .unwrap_or_default();
    let mut balancer = Balancer::new(t.batch_size, ranks, &caps);
    let mut slow_steps = vec![0u32; ranks];
    let watchdog = opts
        .dist
        .as_ref()
        .map(|d| Watchdog::start(rank, d.collective_timeout));
    let counts = cfg.model.counts(t.seq_len);
    let moe_layers = (0..cfg.model.num_hidden_layers)
        .filter(|&l| cfg.model.layer_is_moe(l))
        .count();
    let peak = opts.peak_flops.unwrap_or_else(cpu_peak_flops);
    let tokens_per_step = (t.batch_size * t.grad_accum * t.seq_len) as u64;

    let bar = if opts.show_progress && is_main {
        ProgressBar::new(t.steps)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(start_step);

    let mut records = Vec::new();
    let mut last_val = None;
    let mut interrupted = false;
    let save =
        |model: &LanguageModel, opt: &AdamW, step: u64, sampler: BatchSampler, tokens_seen: u64| {
            let state = TrainerState {
                step,
                sampler,
                tokens_seen,
                config: cfg.clone(),
                checksums: Default::default(),
            };
            checkpoint::save(&run, model, opt, state, cfg.train.keep_checkpoints)
        };

    for step in start_step..t.steps {
        let local_stop = opts.stop.load(Ordering::SeqCst) && opts.dist.is_none();
        if local_stop || opts.stop_at.is_some_and(|s| step >= s) {
            interrupted = true;
            break;
        }
        let started = Instant::now();
        // Dropout masks depend only on (seed, step): a resumed run draws the same ones.
        device.seed(splitmix64(t.seed ^ splitmix64(step)));
        let lr = t.lr_at(step);
        let mut accumulator = GradientsAccumulator::<LanguageModel>::new();
        let (mut ce_sum, mut lb_sum, mut z_sum) = (0.0, None::<f64>, None::<f64>);
        let mut load = Vec::new();
        // This rank's rows of every global micro-batch; each rank's loss is weighted by its
        // share of the tokens, so the summed gradients equal one process's on the whole batch.
        let shares = balancer.shares.clone();
        let (first_row, my_rows) = (shares[..rank].iter().sum::<usize>(), shares[rank]);
        let weight = my_rows as f64 / t.batch_size as f64 / t.grad_accum as f64;
        let sample_start = sampler.cursor * t.batch_size as u64;
        let compute_started = Instant::now();
        for micro in 0..t.grad_accum {
            let batch = sampler.next_batch(&data.train, t.batch_size, t.seq_len)?;
            if let Some((kill_step, kill_rank)) = opts.dist.as_ref().and_then(|d| d.kill_at) {
                if kill_step == step + 1 && kill_rank == rank && micro == 0 {
                    kill_self();
                }
            }
            let global = match (&watchdog, ranks > 1 && cfg.model.is_moe()) {
                (Some(dog), true) => Some(GlobalBatch {
                    comm,
                    watchdog: dog,
                    step: step + 1,
                    assignments: t.batch_size * t.seq_len * cfg.model.num_experts_per_tok,
                    counts_len: moe_layers * cfg.model.num_experts,
                }),
                _ => None,
            };
            if my_rows == 0 {
                if let Some(g) = &global {
                    g.sum_counts(&[]); // the other ranks' load-balance losses need this one
                }
                continue;
            }
            let batch = if ranks > 1 {
                batch.rows(first_row, first_row + my_rows)
            } else {
                batch
            };
            let losses = forward_losses(&model, &batch, &device, global.as_ref());
            let mut total = losses.ce.clone();
            if let (Some(lb), Some(z)) = (&losses.load_balance, &losses.z_loss) {
                total = total + lb.clone() * t.aux_loss_coef + z.clone() * t.z_loss_coef;
            }
            let total = total * weight as f32;
            let grads = GradientsParams::from_grads(total.backward(), &model);
            accumulator.accumulate(&model, grads);
            ce_sum += losses.ce.into_scalar::<f32>() as f64 * weight;
            if let Some(v) = scalar(&losses.load_balance) {
                *lb_sum.get_or_insert(0.0) += v * weight;
            }
            if let Some(v) = scalar(&losses.z_loss) {
                *z_sum.get_or_insert(0.0) += v * weight;
            }
            load = losses.tokens_per_expert;
        }
        let mut compute_s = compute_started.elapsed().as_secs_f64();
        let mut grads = accumulator.grads();
        let (mut wait_s, mut comm_s) = (0.0, 0.0);
        let mut rank_stats = Vec::new();
        let mut stragglers = Vec::new();
        let mut stop_requested = opts.stop.load(Ordering::SeqCst);
        if let (Some(d), Some(dog)) = (&opts.dist, &watchdog) {
            if d.throttle > 1.0 && step + 1 >= d.throttle_from {
                std::thread::sleep(Duration::from_secs_f64((d.throttle - 1.0) * compute_s));
                compute_s = compute_started.elapsed().as_secs_f64();
            }
            if d.hang_at == Some((step + 1, rank)) {
                std::thread::sleep(Duration::from_secs(3600));
            }
            // Time spent waiting for the slowest rank, then the all-reduce itself.
            dog.enter(step + 1);
            let waited = Instant::now();
            comm.barrier();
            wait_s = waited.elapsed().as_secs_f64();
            let (reduced, seconds) = all_reduce_gradients(&model, grads, comm, &plain);
            grads = reduced;
            comm_s = seconds;
            let local = [
                ce_sum,
                lb_sum.unwrap_or(0.0),
                z_sum.unwrap_or(0.0),
                compute_s,
                wait_s,
                comm_s,
                my_rows as f64,
                stop_requested as u8 as f64,
            ];
            let all = comm.all_gather(&local);
            dog.leave();
            let col = |i: usize| -> Vec<f64> { all.chunks(local.len()).map(|c| c[i]).collect() };
            ce_sum = col(0).iter().sum();
            if lb_sum.is_some() {
                lb_sum = Some(col(1).iter().sum());
                z_sum = Some(col(2).iter().sum());
            }
            stop_requested = col(7).iter().any(|&f| f > 0.0);
            let (computes, waits, comms, seqs) = (col(3), col(4), col(5), col(6));
            let mut slow_now = vec![false; ranks];
            for r in 0..ranks {
                let predicted = balancer.predict(r, shares[r]);
                let slow = predicted.is_some_and(|p| computes[r] > d.straggler_factor * p);
                slow_now[r] = slow;
                slow_steps[r] = if slow { slow_steps[r] + 1 } else { 0 };
                if slow_steps[r] >= d.straggler_patience {
                    stragglers.push(r);
                    if slow_steps[r] == d.straggler_patience && is_main {
                        bar.println(format!(
                            "straggler: rank {r} ran {:.1}x slower than predicted for {} steps \
                             (step {})",
                            computes[r] / predicted.unwrap_or(computes[r]),
                            slow_steps[r],
                            step + 1
                        ));
                    }
                }
                rank_stats.push(json!({
                    "rank": r, "seqs": seqs[r], "compute_s": computes[r],
                    "wait_s": waits[r], "comm_s": comms[r],
                }));
            }
            // A process's first step is warm-up (first allocations, page faults) and says
            // little about its speed: the profile is the second step, planned on at once.
            if step > start_step {
                balancer.observe(&seqs, &computes, &slow_now);
            }
            // `rebalance_every` 0 keeps the equal split (the naive baseline).
            let due = step == start_step + 1 || (step + 1) % d.rebalance_every.max(1) == 0;
            if d.rebalance_every > 0 && due {
                balancer.rebalance(t.batch_size, &caps);
            }
        }
        let norm = grad_norm(&model, &grads);
        let scale = if t.grad_clip > 0.0 && norm > t.grad_clip {
            t.grad_clip / norm
        } else {
            1.0
        };
        model = opt.step(model, grads, lr, scale);
        tokens_seen += tokens_per_step;

        let loss = ce_sum;
        if !loss.is_finite() {
            bail!(
                "step {}: loss is {loss}; stopping (last good checkpoint kept in {})",
                step + 1,
                checkpoint::checkpoints_dir(&run).display()
            );
        }
        let seconds = started.elapsed().as_secs_f64();
        let tok_s = tokens_per_step as f64 / seconds;
        let mfu = tok_s * counts.train_flops_per_token / peak;
        let done = step + 1;
        let mut record = json!({
            "step": done, "loss": loss, "lr": lr, "grad_norm": norm,
            "tokens_per_s": tok_s, "mfu": mfu, "step_seconds": seconds, "tokens_seen": tokens_seen,
        });
        if let Some(lb) = lb_sum {
            record["load_balance_loss"] = json!(lb);
            record["z_loss"] = json!(z_sum.unwrap_or(0.0));
            record["tokens_per_expert"] = json!(load);
        }
        // Sample ids are positions in the sampler's stream: global batch c, row i is c·B + i.
        record["sample_start"] = json!(sample_start);
        record["sample_count"] = json!(t.batch_size * t.grad_accum);
        if opts.dist.is_some() {
            record["ranks"] = json!(rank_stats);
            record["stragglers"] = json!(stragglers);
            record["compute_s"] = json!(compute_s);
            record["wait_s"] = json!(wait_s);
            record["comm_s"] = json!(comm_s);
            if opts.dist.as_ref().is_some_and(|d| d.hash_params) {
                let hashes = gather_hashes(comm, parameter_hash(&model));
                record["param_hashes"] = json!(hashes
                    .iter()
                    .map(|h| format!("{h:016x}"))
                    .collect::<Vec<_>>());
            }
        }
        if is_main && (done % t.eval_every.max(1) == 0 || done == t.steps) {
            let val = evaluate(&model.valid(), &evals, &plain);
            record["val_loss"] = json!(val);
            last_val = Some(val);
            bar.println(format!(
                "step {done:>6}  train loss {loss:.4}  val loss {val:.4}"
            ));
        }
        if let Some(log) = log.as_mut() {
            log.write(&record)?;
        }
        records.push(StepRecord {
            step: done,
            loss,
            lr,
            grad_norm: norm,
        });
        bar.set_message(format!(
            "loss {loss:.4} | {:.0} tok/s | MFU {:.2}%",
            tok_s,
            mfu * 100.0
        ));
        bar.inc(1);
        let checkpoint_due =
            done % t.checkpoint_every.max(1) == 0 || done == t.steps || stop_requested;
        if checkpoint_due && is_main {
            save(&model, &opt, done, sampler, tokens_seen)?;
        }
        if stop_requested {
            // Every rank saw the same gathered flag, so all leave the loop together.
            interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();
    if interrupted && is_main {
        let step = records.last().map_or(start_step, |r| r.step);
        if checkpoint::list_checkpoints(&run).last().map(|c| c.0) != Some(step) {
            save(&model, &opt, step, sampler, tokens_seen)?;
        }
    }
    if is_main {
        plot_losses(&run)?;
    }
    Ok(TrainReport {
        run_dir: run,
        steps: records,
        last_val_loss: last_val,
        interrupted,
        config: cfg,
    })
}

/// Loads a trained run for inference on a plain device: its config, tokenizer and newest weights.
pub fn load_for_inference(
    run: &Path,
    device: &Device,
) -> Result<(LanguageModel, Tokenizer, RunConfig)> {
    let loaded = checkpoint::load_latest(run)?;
    let cfg = loaded.state.config.clone();
    let model = LanguageModel::uninitialised(&cfg.model, device);
    let model = assign_weights(
        model,
        &loaded.weights,
        &loaded
            .dir
            .join(checkpoint::MODEL_FILE)
            .display()
            .to_string(),
    )?;
    let tokenizer = Tokenizer::load(run)?;
    Ok((model, tokenizer, cfg))
}

/// Test-only fault injection: this process dies the way `kill -9` kills it.
fn kill_self() {
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid])
        .status();
    // If `kill` is missing, abort is the nearest thing.
    std::process::abort();
}
