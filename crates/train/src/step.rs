//! One optimiser step's work on this process: its rows of every micro-batch, forward and
//! backward, gradients accumulated, losses weighted by this process's share of the tokens.

use crate::parallel::{Collective, Watchdog};
use anyhow::Result;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use nuwa_data::{Batch, BatchSampler, TokenShard};
use nuwa_model::{cross_entropy, LanguageModel};
use nuwa_run::TrainConfig;
use std::time::Instant;

fn batch_tensors(batch: &Batch, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let shape = [batch.batch_size, batch.seq_len];
    let to = |ids: &[u32]| {
        let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        Tensor::<2, Int>::from_data(TensorData::new(v, shape), device)
    };
    (to(&batch.inputs), to(&batch.targets))
}

/// Losses of one forward pass: cross-entropy, and the mean router losses over MoE layers.
pub struct Losses {
    pub ce: Tensor<1>,
    pub load_balance: Option<Tensor<1>>,
    pub z_loss: Option<Tensor<1>>,
    /// The multi-token-prediction layers' cross-entropies, summed over layers.
    pub mtp: Option<Tensor<1>>,
    pub tokens_per_expert: Vec<Vec<usize>>,
}

/// The ranks sharing one global micro-batch, for the load-balance loss: its expert fractions
/// `f_e` must be the whole batch's, not one rank's, or the loss (nonlinear in the batch) and
/// its gradient would differ from one process's.
pub struct GlobalBatch<'a> {
    pub comm: &'a dyn Collective,
    pub watchdog: &'a Watchdog,
    pub step: u64,
    /// Top-k assignments in the global micro-batch (tokens × k).
    pub assignments: usize,
    /// Values each rank contributes: MoE layers × experts.
    pub counts_len: usize,
}

impl GlobalBatch<'_> {
    /// Every rank's tokens per expert, summed (`local` is this rank's, layer after layer).
    pub fn sum_counts(&self, local: &[Vec<usize>]) -> Vec<f32> {
        let mut counts: Vec<f32> = local.iter().flatten().map(|&c| c as f32).collect();
        counts.resize(self.counts_len, 0.0); // a rank with no rows has nothing to add
        self.watchdog.enter(self.step);
        nuwa_core::comm::pace::collective(|| self.comm.all_reduce_sum(&mut counts));
        self.watchdog.leave();
        counts
    }
}

pub fn forward_losses(
    model: &LanguageModel,
    batch: &Batch,
    device: &Device,
    global: Option<&GlobalBatch>,
) -> Losses {
    let (inputs, targets) = batch_tensors(batch, device);
    let (out, mtp_logits) = model.forward_train(inputs);
    let len = targets.dims()[1];
    // MTP layer k's position t predicts target t + k (the token k + 1 ahead of the input).
    let mtp = mtp_logits
        .into_iter()
        .enumerate()
        .map(|(i, logits)| cross_entropy(logits, targets.clone().narrow(1, i + 1, len - i - 1)))
        .reduce(|a, b| a + b);
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
        mtp,
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

/// What this process computed in one step, before any reduction across processes.
pub struct LocalStep {
    pub grads: GradientsParams,
    /// Losses weighted by this process's share of the step's tokens (they sum over ranks).
    pub ce: f64,
    pub load_balance: Option<f64>,
    pub z_loss: Option<f64>,
    /// The MTP layers' summed cross-entropy (weighted like the losses above).
    pub mtp_loss: Option<f64>,
    /// Tokens per expert of the last micro-batch, per MoE layer.
    pub tokens_per_expert: Vec<Vec<usize>>,
    /// Tokens per expert over all of this process's micro-batches, per MoE layer.
    pub step_load: Vec<Vec<usize>>,
    pub compute_s: f64,
    /// Rows this process ran over the step's micro-batches.
    pub rows: usize,
}

/// Where this process's rows sit in each global micro-batch of a step.
pub struct Rows {
    /// This process's rows of micro-batch `m`.
    pub micro: Vec<std::ops::Range<usize>>,
    /// More than one process shares the batch.
    pub shared: bool,
}

impl Rows {
    /// The same rows of every one of `micro_batches`.
    pub fn same(rows: std::ops::Range<usize>, micro_batches: usize, shared: bool) -> Self {
        Self {
            micro: vec![rows; micro_batches.max(1)],
            shared,
        }
    }

    /// Rows `[micro-batch][rank]` counts give `rank`.
    pub fn of_rank(counts: &[Vec<usize>], rank: usize) -> Self {
        let micro = counts
            .iter()
            .map(|c| {
                let first: usize = c[..rank].iter().sum();
                first..first + c[rank]
            })
            .collect();
        Self {
            micro,
            shared: counts.first().is_some_and(|c| c.len() > 1),
        }
    }

    /// This process's rows of micro-batch `m`.
    pub fn of(&self, m: usize) -> std::ops::Range<usize> {
        self.micro
            .get(m)
            .or(self.micro.last())
            .cloned()
            .unwrap_or(0..0)
    }

    /// This process's rows over the step.
    pub fn total(&self) -> usize {
        self.micro.iter().map(|r| r.len()).sum()
    }
}

/// Runs `rows` of the next `grad_accum` micro-batches forward and backward. `global` gives the
/// load-balance loss the whole batch's expert fractions when several processes share it.
pub fn local_step<'g>(
    model: &LanguageModel,
    sampler: &mut BatchSampler,
    data: &TokenShard,
    t: &TrainConfig,
    rows: &Rows,
    global: impl Fn() -> Option<GlobalBatch<'g>>,
    device: &Device,
) -> Result<LocalStep> {
    let started = Instant::now();
    let mut accumulator = GradientsAccumulator::<LanguageModel>::new();
    let (mut ce, mut lb, mut z, mut mtp) = (0.0, None::<f64>, None::<f64>, None::<f64>);
    let mut load = Vec::new();
    let mut step_load: Vec<Vec<usize>> = Vec::new();
    for m in 0..t.grad_accum {
        let batch = sampler.next_batch(data, t.batch_size, t.seq_len)?;
        let global = global();
        let mine = rows.of(m);
        // This process's share of the step's tokens in this micro-batch.
        let weight = mine.len() as f64 / t.batch_size as f64 / t.grad_accum as f64;
        if mine.is_empty() {
            if let Some(g) = &global {
                g.sum_counts(&[]); // the other ranks' load-balance losses need this one
            }
            continue;
        }
        let batch = match rows.shared {
            true => batch.rows(mine.start, mine.end),
            false => batch,
        };
        let losses = forward_losses(model, &batch, device, global.as_ref());
        let mut total = losses.ce.clone();
        if let (Some(lb), Some(z)) = (&losses.load_balance, &losses.z_loss) {
            total = total + lb.clone() * t.aux_loss_coef + z.clone() * t.z_loss_coef;
        }
        if let Some(mtp) = &losses.mtp {
            total = total + mtp.clone() * model.mtp_loss_weight;
        }
        let grads = GradientsParams::from_grads((total * weight as f32).backward(), model);
        accumulator.accumulate(model, grads);
        let scalar =
            |t: &Option<Tensor<1>>| t.as_ref().map(|t| t.clone().into_scalar::<f32>() as f64);
        ce += losses.ce.into_scalar::<f32>() as f64 * weight;
        if let Some(v) = scalar(&losses.load_balance) {
            *lb.get_or_insert(0.0) += v * weight;
        }
        if let Some(v) = scalar(&losses.z_loss) {
            *z.get_or_insert(0.0) += v * weight;
        }
        if let Some(v) = scalar(&losses.mtp) {
            *mtp.get_or_insert(0.0) += v * weight;
        }
        if step_load.is_empty() {
            step_load = losses.tokens_per_expert.clone();
        } else {
            for (sum, layer) in step_load.iter_mut().zip(&losses.tokens_per_expert) {
                sum.iter_mut().zip(layer).for_each(|(s, c)| *s += c);
            }
        }
        load = losses.tokens_per_expert;
    }
    Ok(LocalStep {
        grads: accumulator.grads(),
        ce,
        load_balance: lb,
        z_loss: z,
        mtp_loss: mtp,
        tokens_per_expert: load,
        step_load,
        compute_s: started.elapsed().as_secs_f64(),
        rows: rows.total(),
    })
}
