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
    /// The ranks holding rows of this micro-batch (`None`: every rank).
    pub among: Option<Vec<usize>>,
}

impl GlobalBatch<'_> {
    /// Every rank's tokens per expert, summed (`local` is this rank's, layer after layer).
    pub fn sum_counts(&self, local: &[Vec<usize>]) -> Vec<f32> {
        let mut counts: Vec<f32> = local.iter().flatten().map(|&c| c as f32).collect();
        counts.resize(self.counts_len, 0.0); // a rank with no rows has nothing to add
        self.watchdog.enter(self.step);
        nuwa_core::comm::pace::collective(|| match &self.among {
            Some(among) if among.len() < self.comm.size() => self.sum_among(among, &mut counts),
            _ => self.comm.all_reduce_sum(&mut counts),
        });
        self.watchdog.leave();
        counts
    }

    /// Sums `counts` over the ranks in `among` only (the others hold none of this
    /// micro-batch and are busy with their own): the first gathers, adds, and sends back.
    fn sum_among(&self, among: &[usize], counts: &mut Vec<f32>) {
        let (me, len) = (self.comm.rank(), counts.len());
        let Some((&first, rest)) = among.split_first() else {
            return;
        };
        if me == first {
            for &r in rest {
                let theirs = self.comm.recv(r, len);
                counts.iter_mut().zip(theirs).for_each(|(c, t)| *c += t);
            }
            for &r in rest {
                self.comm.send(r, counts);
            }
        } else if rest.contains(&me) {
            self.comm.send(first, counts);
            *counts = self.comm.recv(first, len);
        }
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
    /// The ranks holding rows of micro-batch `m` (empty: every rank takes part in each).
    pub holders: Vec<Vec<usize>>,
}

impl Rows {
    /// The same rows of every one of `micro_batches`.
    pub fn same(rows: std::ops::Range<usize>, micro_batches: usize, shared: bool) -> Self {
        Self {
            micro: vec![rows; micro_batches.max(1)],
            shared,
            holders: Vec::new(),
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
        let holders = counts
            .iter()
            .map(|c| (0..c.len()).filter(|&r| c[r] > 0).collect())
            .collect();
        Self {
            micro,
            shared: counts.first().is_some_and(|c| c.len() > 1),
            holders,
        }
    }

    /// The ranks this process meets over micro-batch `m` (`None`: every rank).
    pub fn holders_of(&self, m: usize) -> Option<&[usize]> {
        self.holders.get(m).map(|h| h.as_slice())
    }

    /// The micro-batches this process runs, in the order it runs them: those it shares with
    /// other ranks first, in micro-batch order (every rank meets its partners in the same
    /// order, so none waits on a rank busy with a micro-batch of its own), then its own.
    /// With no holders known, every micro-batch in order: every rank meets over each.
    pub fn order(&self, micro_batches: usize) -> Vec<usize> {
        if self.holders.is_empty() {
            return (0..micro_batches).collect();
        }
        let mut order: Vec<usize> = (0..micro_batches)
            .filter(|&m| !self.of(m).is_empty())
            .collect();
        let alone = |m: usize| self.holders_of(m).is_some_and(|h| h.len() == 1);
        order.sort_by_key(|&m| (alone(m), m));
        order
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
    // Every micro-batch is drawn, in order, whether or not this process holds rows of it,
    // so the sampler's position is the same on every rank.
    let mut batches = (0..t.grad_accum)
        .map(|_| sampler.next_batch(data, t.batch_size, t.seq_len).map(Some))
        .collect::<Result<Vec<_>>>()?;
    for m in rows.order(t.grad_accum) {
        let mut global = global();
        if let Some(g) = &mut global {
            g.among = rows.holders_of(m).map(|h| h.to_vec());
        }
        let mine = rows.of(m);
        // This process's share of the step's tokens in this micro-batch.
        let weight = mine.len() as f64 / t.batch_size as f64 / t.grad_accum as f64;
        if mine.is_empty() {
            if let Some(g) = &global {
                g.sum_counts(&[]); // the other ranks' load-balance losses need this one
            }
            continue;
        }
        // `order` names each micro-batch once.
        let Some(batch) = batches[m].take() else {
            continue;
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_micro_batches_run_first_in_order_then_a_ranks_own() {
        // Ranks of 10, 3 and 19 rows end to end over 4 micro-batches of 8.
        let counts = nuwa_core::packed_micro_batch_shares(&[10, 3, 19], 8, 4);
        let rows: Vec<Rows> = (0..3).map(|r| Rows::of_rank(&counts, r)).collect();
        assert_eq!(rows[0].order(4), [1, 0]);
        assert_eq!(rows[1].order(4), [1]);
        assert_eq!(rows[2].order(4), [1, 2, 3]);
        assert_eq!(rows[1].holders_of(1), Some(&[0, 1, 2][..]));
        assert_eq!((rows[1].of(1), rows[2].of(1)), (2..5, 5..8));
        assert_eq!(
            rows.iter().map(Rows::total).collect::<Vec<_>>(),
            [10, 3, 19]
        );
        // Without holders (one process), every micro-batch in order.
        assert_eq!(Rows::same(0..8, 3, false).order(3), [0, 1, 2]);
    }
}
