//! How the processes of a job share one training step: the seam where parallelism plugs in.
//! [`SingleProcess`] runs the whole batch; [`DataParallel`] gives each rank a share of every
//! micro-batch sized by its measured speed, all-reduces the gradients and watches for hung
//! and straggling ranks. Expert and pipeline parallelism are further implementations.

use crate::parallel::{
    all_reduce_gradients, gather_hashes, parameter_hash, Balancer, Collective, DistOptions,
    Watchdog,
};
use crate::step::{GlobalBatch, LocalStep, Rows};
use burn::optim::GradientsParams;
use burn::tensor::Device;
use nuwa_model::LanguageModel;
use nuwa_run::RunConfig;
use serde_json::{json, Map, Value};
use std::time::Instant;

/// A step after every process's part is combined (the gradients come beside it).
pub struct ReducedStep {
    /// Losses of the whole global batch.
    pub ce: f64,
    pub load_balance: Option<f64>,
    pub z_loss: Option<f64>,
    /// The MTP layers' summed cross-entropy over the whole batch.
    pub mtp_loss: Option<f64>,
    /// This process's tokens per expert in its last micro-batch, per MoE layer (for the log).
    pub tokens_per_expert: Vec<Vec<usize>>,
    /// Tokens per expert over the whole step and every process, per MoE layer.
    pub expert_load: Vec<Vec<f64>>,
    /// Some process asked to stop (Ctrl-C): all stop after this step, together.
    pub stop: bool,
    /// Fields for the step's metrics record.
    pub metrics: Map<String, Value>,
    /// Messages for the user (stragglers).
    pub notes: Vec<String>,
}

pub trait Parallelism {
    fn rank(&self) -> usize;
    /// Several processes share each step (a Ctrl-C then stops all of them together, at the
    /// end of a step, rather than this one at once).
    fn is_distributed(&self) -> bool;
    /// The run is set up (resumed at `start_step`, with `cfg`): plan the coming steps.
    fn start(&mut self, _cfg: &RunConfig, _start_step: u64) {}
    /// Waits for every process (rank 0 writes shared files first).
    fn barrier(&self);
    /// This process's rows of every micro-batch of the coming step.
    fn rows(&self) -> Rows;
    /// The global micro-batch for the MoE load-balance loss, when the batch is shared.
    fn global_batch(&self, step: u64) -> Option<GlobalBatch<'_>>;
    /// Called as step `step` (1-based) starts.
    fn begin_step(&mut self, _step: u64) {}
    /// Combines this process's part of step `step` (1-based) with the others': the whole
    /// batch's gradients and totals.
    fn reduce(
        &mut self,
        step: u64,
        model: &LanguageModel,
        local: LocalStep,
        stop: bool,
    ) -> (GradientsParams, ReducedStep);
    /// After the optimiser update: anything to record about the new parameters.
    fn after_update(&self, _model: &LanguageModel, _metrics: &mut Map<String, Value>) {}
}

/// One process, the whole batch.
#[derive(Default)]
pub struct SingleProcess {
    batch_size: usize,
}

impl Parallelism for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn is_distributed(&self) -> bool {
        false
    }
    fn barrier(&self) {}
    fn start(&mut self, cfg: &RunConfig, _start_step: u64) {
        self.batch_size = cfg.train.batch_size;
    }
    fn rows(&self) -> Rows {
        Rows {
            first: 0,
            count: self.batch_size,
            shared: false,
        }
    }
    fn global_batch(&self, _step: u64) -> Option<GlobalBatch<'_>> {
        None
    }
    fn reduce(
        &mut self,
        _: u64,
        _: &LanguageModel,
        local: LocalStep,
        stop: bool,
    ) -> (GradientsParams, ReducedStep) {
        let expert_load = local
            .step_load
            .iter()
            .map(|l| l.iter().map(|&c| c as f64).collect())
            .collect();
        let totals = ReducedStep {
            ce: local.ce,
            load_balance: local.load_balance,
            z_loss: local.z_loss,
            mtp_loss: local.mtp_loss,
            tokens_per_expert: local.tokens_per_expert,
            expert_load,
            stop,
            metrics: Map::new(),
            notes: Vec::new(),
        };
        (local.grads, totals)
    }
}

/// Data parallelism over unequal ranks (see `parallel.rs` for the pieces).
pub struct DataParallel {
    opts: DistOptions,
    balancer: Balancer,
    watchdog: Watchdog,
    slow_steps: Vec<u32>,
    batch_size: usize,
    /// Top-k assignments and MoE layers × experts per global micro-batch (MoE only).
    moe: Option<(usize, usize)>,
    /// Routed experts per MoE layer.
    experts: usize,
    mtp_layers: usize,
    start_step: u64,
    device: Device,
}

impl DataParallel {
    pub fn new(opts: DistOptions, device: &Device) -> Self {
        let (rank, ranks) = (opts.comm.rank(), opts.comm.size());
        Self {
            // Planned for the run's batch in `start`.
            balancer: Balancer::new(ranks, ranks, &[]),
            watchdog: Watchdog::start(rank, opts.collective_timeout),
            slow_steps: vec![0; ranks],
            batch_size: 0,
            moe: None,
            experts: 0,
            mtp_layers: 0,
            start_step: 0,
            device: device.clone(),
            opts,
        }
    }

    /// Every rank's tokens per expert over the step, summed, per MoE layer (a rank with no
    /// rows adds zeros).
    fn global_load(&self, local: &[Vec<usize>]) -> Vec<Vec<f64>> {
        let Some((_, counts_len)) = self.moe else {
            let as_f64 = |l: &Vec<usize>| l.iter().map(|&c| c as f64).collect();
            return local.iter().map(as_f64).collect();
        };
        let mut counts: Vec<f32> = local.iter().flatten().map(|&c| c as f32).collect();
        counts.resize(counts_len, 0.0);
        self.comm().all_reduce_sum(&mut counts);
        counts
            .chunks(self.experts.max(1))
            .map(|c| c.iter().map(|&x| x as f64).collect())
            .collect()
    }

    fn comm(&self) -> &dyn Collective {
        self.opts.comm.as_ref()
    }

    /// Flags ranks slower than predicted; returns which ran slow now, the stragglers (slow for
    /// `straggler_patience` steps) and a note for each newly reported one.
    fn stragglers(&mut self, step: u64, computes: &[f64]) -> (Vec<bool>, Vec<usize>, Vec<String>) {
        let d = &self.opts;
        let (mut slow_now, mut stragglers, mut notes) = (Vec::new(), Vec::new(), Vec::new());
        for (r, &compute) in computes.iter().enumerate() {
            let predicted = self.balancer.predict(r, self.balancer.shares[r]);
            let slow = predicted.is_some_and(|p| compute > d.straggler_factor * p);
            slow_now.push(slow);
            self.slow_steps[r] = if slow { self.slow_steps[r] + 1 } else { 0 };
            if self.slow_steps[r] >= d.straggler_patience {
                stragglers.push(r);
                if self.slow_steps[r] == d.straggler_patience {
                    notes.push(format!(
                        "straggler: rank {r} ran {:.1}x slower than predicted for {} steps (step {step})",
                        compute / predicted.unwrap_or(compute),
                        self.slow_steps[r],
                    ));
                }
            }
        }
        (slow_now, stragglers, notes)
    }
}

impl Parallelism for DataParallel {
    fn rank(&self) -> usize {
        self.comm().rank()
    }

    fn is_distributed(&self) -> bool {
        true
    }

    fn barrier(&self) {
        self.comm().barrier();
    }

    fn start(&mut self, cfg: &RunConfig, start_step: u64) {
        let t = &cfg.train;
        let ranks = self.comm().size();
        let moe_layers = (0..cfg.model.num_hidden_layers)
            .filter(|&l| cfg.model.layer_is_moe(l))
            .count()
            + cfg.model.num_nextn_predict_layers;
        self.experts = cfg.model.num_experts;
        self.mtp_layers = cfg.model.num_nextn_predict_layers;
        self.moe = (ranks > 1 && cfg.model.is_moe()).then(|| {
            (
                t.batch_size * t.seq_len * cfg.model.num_experts_per_tok,
                moe_layers * cfg.model.num_experts,
            )
        });
        self.balancer = Balancer::new(t.batch_size, ranks, &self.opts.max_seqs);
        self.batch_size = t.batch_size;
        self.start_step = start_step;
    }

    fn rows(&self) -> Rows {
        let shares = &self.balancer.shares;
        let rank = self.rank();
        Rows {
            first: shares[..rank].iter().sum(),
            count: shares[rank],
            shared: shares.len() > 1,
        }
    }

    fn global_batch(&self, step: u64) -> Option<GlobalBatch<'_>> {
        self.moe.map(|(assignments, counts_len)| GlobalBatch {
            comm: self.comm(),
            watchdog: &self.watchdog,
            step,
            assignments,
            counts_len,
        })
    }

    #[allow(unused_variables)]
    fn begin_step(&mut self, step: u64) {
        #[cfg(feature = "fault-injection")]
        self.opts.faults.begin_step(step, self.rank());
    }

    #[allow(unused_mut)]
    fn reduce(
        &mut self,
        step: u64,
        model: &LanguageModel,
        mut local: LocalStep,
        stop: bool,
    ) -> (GradientsParams, ReducedStep) {
        #[cfg(feature = "fault-injection")]
        {
            local.compute_s = self
                .opts
                .faults
                .after_compute(step, self.rank(), local.compute_s);
        }
        // Time spent waiting for the slowest rank, then the all-reduce itself.
        self.watchdog.enter(step);
        let waited = Instant::now();
        self.comm().barrier();
        let wait_s = waited.elapsed().as_secs_f64();
        let (grads, comm_s) = all_reduce_gradients(model, local.grads, self.comm(), &self.device);
        let mine = [
            local.ce,
            local.load_balance.unwrap_or(0.0),
            local.z_loss.unwrap_or(0.0),
            local.compute_s,
            wait_s,
            comm_s,
            local.rows as f64,
            stop as u8 as f64,
            local.mtp_loss.unwrap_or(0.0),
        ];
        let all = self.comm().all_gather(&mine);
        let expert_load = self.global_load(&local.step_load);
        self.watchdog.leave();
        let col = |i: usize| -> Vec<f64> { all.chunks(mine.len()).map(|c| c[i]).collect() };
        let (computes, waits, comms, seqs) = (col(3), col(4), col(5), col(6));
        let (slow_now, stragglers, notes) = self.stragglers(step, &computes);
        // A process's first step is warm-up (first allocations, page faults) and says
        // little about its speed: the profile is the second step, planned on at once.
        if step > self.start_step + 1 {
            self.balancer.observe(&seqs, &computes, &slow_now);
        }
        // `rebalance_every` 0 keeps the equal split (the naive baseline).
        let every = self.opts.rebalance_every;
        let due = step == self.start_step + 2 || step.is_multiple_of(every.max(1));
        if every > 0 && due {
            self.balancer
                .rebalance(self.batch_size, &self.opts.max_seqs);
        }
        let ranks: Vec<Value> = (0..computes.len())
            .map(|r| {
                json!({"rank": r, "seqs": seqs[r], "compute_s": computes[r],
                       "wait_s": waits[r], "comm_s": comms[r]})
            })
            .collect();
        let metrics = json!({
            "ranks": ranks, "stragglers": stragglers, "compute_s": local.compute_s,
            "wait_s": wait_s, "comm_s": comm_s,
        });
        // A rank with no rows this step has no router losses of its own, yet the batch does.
        let is_moe = self.moe.is_some() || local.load_balance.is_some();
        let totals = ReducedStep {
            ce: col(0).iter().sum(),
            load_balance: is_moe.then(|| col(1).iter().sum()),
            z_loss: is_moe.then(|| col(2).iter().sum()),
            mtp_loss: (self.mtp_layers > 0).then(|| col(8).iter().sum()),
            tokens_per_expert: local.tokens_per_expert,
            expert_load,
            stop: col(7).iter().any(|&f| f > 0.0),
            metrics: metrics.as_object().cloned().unwrap_or_default(),
            notes,
        };
        (grads, totals)
    }

    fn after_update(&self, model: &LanguageModel, metrics: &mut Map<String, Value>) {
        if self.opts.hash_params {
            let hashes = gather_hashes(self.comm(), parameter_hash(model));
            let hex: Vec<String> = hashes.iter().map(|h| format!("{h:016x}")).collect();
            metrics.insert("param_hashes".into(), json!(hex));
        }
    }
}
