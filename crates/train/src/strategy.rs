//! How the processes of a job share one training step: the seam where parallelism plugs in.
//! [`SingleProcess`] runs the whole batch; [`DataParallel`] gives each rank a share of every
//! micro-batch sized by its measured speed, all-reduces the gradients and watches for hung
//! and straggling ranks. Expert and pipeline parallelism are further implementations.

use crate::expert::Orders;
use crate::optim::AdamW;
use crate::parallel::{
    all_reduce_gradients, gather_hashes, parameter_hash, Balancer, Collective, DistOptions,
    StragglerVerdict, StragglerWatch, Watchdog,
};
use crate::step::{GlobalBatch, LocalStep, Rows};
use anyhow::{bail, Result};
use burn::optim::GradientsParams;
use burn::tensor::Device;
use nuwa_model::expert_parallel::{balanced_order, expert_balance, ExpertGroup, Placement};
use nuwa_model::weights::HostTensor;
use nuwa_model::LanguageModel;
use nuwa_run::sharded::Shard;
use nuwa_run::RunConfig;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

type Tensors = BTreeMap<String, HostTensor>;

/// How a process takes part in writing a checkpoint.
pub enum CheckpointPart {
    /// Every process holds the whole model: rank 0 writes it (in the background).
    Whole {
        weights: Tensors,
        optimizer: Tensors,
    },
    /// The model is split across `comm`'s processes: each writes its shard (`None`: it holds
    /// nothing another process does not write), at once.
    Sharded {
        comm: Arc<dyn nuwa_core::comm::Collective>,
        mine: Option<Shard>,
    },
}

/// A step after every process's part is combined (the gradients come beside it).
pub struct ReducedStep {
    /// Losses of the whole global batch.
    pub ce: f64,
    pub load_balance: Option<f64>,
    pub z_loss: Option<f64>,
    /// The MTP layers' summed cross-entropy over the whole batch.
    pub mtp_loss: Option<f64>,
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
    fn start(&mut self, _cfg: &RunConfig, _start_step: u64) -> Result<()> {
        Ok(())
    }
    /// The model (and optimiser) as set up whole: keep this process's part of it. `device`
    /// is the plain device (the optimiser's state lives there).
    fn prepare(
        &mut self,
        model: LanguageModel,
        _opt: &mut AdamW,
        _device: &Device,
    ) -> LanguageModel {
        model
    }
    /// Each process holds a different part of the model: every process evaluates and takes
    /// part in gathering each checkpoint.
    fn shards_model(&self) -> bool {
        false
    }
    /// The whole model's gradient norm.
    fn grad_norm(&self, model: &LanguageModel, grads: &GradientsParams) -> f64 {
        crate::optim::grad_norm(model, grads)
    }
    /// How this process takes part in a checkpoint of `weights` and `optimizer` (its own, on
    /// the host): the whole model from rank 0, or a shard from every process that owns a
    /// part (collective when [`Parallelism::shards_model`]).
    fn checkpoint_part(&self, weights: Tensors, optimizer: Tensors) -> CheckpointPart {
        CheckpointPart::Whole { weights, optimizer }
    }
    /// The part of the model this process holds, when it holds a pipeline stage (set by
    /// `start`): only its parameters are allocated.
    fn stage(&self) -> Option<nuwa_model::stage::Stage> {
        None
    }
    /// The expert-parallel group this process is in (set by `start`): it holds only its
    /// share of the routed experts.
    fn expert_group(&self) -> Option<ExpertGroup> {
        None
    }
    /// This process's parameters on the host, by name (a checkpoint's part).
    fn host_weights(&self, model: &LanguageModel) -> BTreeMap<String, HostTensor> {
        nuwa_model::weights::collect_weights(model)
    }
    /// Runs this process's part of a step itself (a pipeline's schedule) instead of the
    /// trainer's data-parallel one.
    fn run_step(
        &mut self,
        _model: &LanguageModel,
        _sampler: &mut nuwa_data::BatchSampler,
        _data: &nuwa_data::TokenShard,
        _t: &nuwa_run::TrainConfig,
        _device: &Device,
    ) -> Option<Result<LocalStep>> {
        None
    }
    /// The validation loss computed across processes (`None`: the trainer's own).
    fn evaluate(
        &self,
        _model: &LanguageModel,
        _batches: &[nuwa_data::Batch],
        _device: &Device,
    ) -> Option<f64> {
        None
    }
    /// After the update: re-place work between processes if the last measurements asked for
    /// it (collective).
    fn after_step(
        &mut self,
        model: LanguageModel,
        _opt: &mut AdamW,
        _device: &Device,
    ) -> LanguageModel {
        model
    }
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
    fn start(&mut self, cfg: &RunConfig, _start_step: u64) -> Result<()> {
        self.batch_size = cfg.train.batch_size;
        Ok(())
    }
    fn rows(&self) -> Rows {
        Rows::same(0..self.batch_size, 1, false)
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
    watch: StragglerWatch,
    /// Each rank's rows of every micro-batch of a step, `[micro-batch][rank]`.
    row_counts: Vec<Vec<usize>>,
    batch_size: usize,
    /// Top-k assignments and MoE layers × experts per global micro-batch (MoE only).
    moe: Option<(usize, usize)>,
    /// Routed experts per MoE layer.
    experts: usize,
    /// Experts per token, and tokens per sequence.
    top_k: usize,
    seq_len: usize,
    /// Micro-batches per step (`--grad-accum`).
    micro_batches: usize,
    mtp_layers: usize,
    start_step: u64,
    device: Device,
    /// Expert parallelism, when the layout has it (`ep` > 1 and a MoE model).
    experts_group: Option<ExpertGroup>,
    /// A new placement measured at the last step, applied after its update.
    pending_placement: Option<Placement>,
    /// Shared boundaries: each MoE layer's expert order over the slots, and new ones asked
    /// for by the last step's loads, applied after its update; the layers' paths.
    expert_orders: Orders,
    pending_orders: Option<Orders>,
    moe_paths: Vec<String>,
    /// Training FLOPs per token outside the routed experts, and per routed (token, expert)
    /// row: what turns a rank's rows and expert rows into its work, for its speed.
    flops_dense: f64,
    flops_expert_row: f64,
    /// Split by width: each rank's speed outside the expert phase (sequences per second,
    /// smoothed) and its expert phases' seconds summed over the steps since the columns last
    /// moved, with their count — what rows and columns are placed by.
    dense_speeds: Vec<Option<f64>>,
    expert_seconds: (Vec<f64>, usize),
}

impl DataParallel {
    pub fn new(opts: DistOptions, device: &Device) -> Self {
        let (rank, ranks) = (opts.comm.rank(), opts.comm.size());
        Self {
            // Planned for the run's batch in `start`.
            balancer: Balancer::new(ranks, ranks, &[]),
            watchdog: Watchdog::start(rank, opts.collective_timeout),
            watch: StragglerWatch::new(opts.straggler_factor, opts.straggler_patience),
            row_counts: Vec::new(),
            batch_size: 0,
            moe: None,
            experts: 0,
            top_k: 0,
            seq_len: 0,
            micro_batches: 1,
            mtp_layers: 0,
            start_step: 0,
            device: device.clone(),
            experts_group: None,
            pending_placement: None,
            expert_orders: Vec::new(),
            pending_orders: None,
            moe_paths: Vec::new(),
            flops_dense: 0.0,
            flops_expert_row: 0.0,
            dense_speeds: Vec::new(),
            expert_seconds: (Vec::new(), 0),
            opts,
        }
    }

    /// The placement the measured speeds ask for, when it differs from the current one (each
    /// member's speed is the mean of its replicas').
    fn measured_placement(&self) -> Option<Placement> {
        let group = self.experts_group.as_ref()?;
        if self.opts.placement.is_some() || self.opts.rebalance_every == 0 {
            return None; // fixed by the plan, or the naive baseline
        }
        // Each member's mean over its replicas.
        let per_member = |values: &[f64]| {
            let mut member = vec![0.0; group.ep];
            for (r, v) in values.iter().enumerate() {
                member[r % group.ep] += v / group.replicas() as f64;
            }
            member
        };
        let experts = group.placement.experts();
        let placement = match &group.placement.columns {
            Some(columns) => {
                // Columns by the speed outside the expert phase and what the phase took.
                let speeds = self.dense_speeds.iter().map(|s| s.unwrap_or(0.0));
                let member = per_member(&speeds.collect::<Vec<_>>());
                if member.iter().any(|&s| s <= 0.0) {
                    return None;
                }
                let (sums, steps) = &self.expert_seconds;
                let mean: Vec<f64> = sums.iter().map(|s| s / (*steps).max(1) as f64).collect();
                let seconds = per_member(&mean);
                let caps = &group.member_caps;
                match Placement::by_width_fitted(experts, columns, &seconds, &member, caps) {
                    Some(fitted) => damped(columns, fitted, caps)?,
                    None => {
                        Placement::by_width_within(experts, columns.iter().sum(), &member, caps)
                    }
                }
            }
            None => {
                let speeds = self.balancer.speeds.iter().map(|s| s.unwrap_or(0.0));
                let member = per_member(&speeds.collect::<Vec<_>>());
                if member.iter().any(|&s| s <= 0.0) {
                    return None;
                }
                match &group.placement.shared {
                    Some(shared) => {
                        let k = shared.experts.iter().copied().max().unwrap_or(0);
                        let fresh =
                            Placement::shared_within(experts, &member, k, &group.member_caps);
                        kept_windows(&group.placement, fresh, &member)
                    }
                    None => Placement::proportional_within(experts, &member, &group.member_caps),
                }
            }
        };
        (placement != group.placement).then_some(placement)
    }

    /// Shared boundaries: new expert orders for the layers whose last-step `load` (tokens per
    /// expert, every MoE layer's) the current order balances worse than 97% across the
    /// members' weights, when a layer's own order ([`balanced_order`]) does at least 2 points
    /// better. `None` when no layer should move. (A move sends each member the experts it
    /// lacked, weights and moments; a router that keeps its loads even never pays it.)
    fn measured_orders(&self, load: &[Vec<f64>]) -> Option<Orders> {
        let group = self.experts_group.as_ref()?;
        if self.opts.placement.is_some() || self.opts.rebalance_every == 0 {
            return None;
        }
        let placement = self.pending_placement.as_ref().unwrap_or(&group.placement);
        placement.shared.as_ref()?;
        let experts = placement.experts();
        if load.len() != self.moe_paths.len() || load.iter().any(|l| l.len() != experts) {
            return None;
        }
        let mut orders = self.expert_orders.clone();
        orders.resize(load.len(), None);
        let mut moved = false;
        for (order, load) in orders.iter_mut().zip(load) {
            let current = order.clone().unwrap_or_else(|| (0..experts).collect());
            let now = expert_balance(load, &current, placement);
            if now >= 0.97 {
                continue;
            }
            let better = balanced_order(load, placement);
            if expert_balance(load, &better, placement) > now + 0.02 {
                let identity = better.iter().enumerate().all(|(slot, &e)| slot == e);
                *order = (!identity).then_some(better);
                moved = true;
            }
        }
        moved.then_some(orders)
    }

    fn split_by_width(&self) -> bool {
        self.experts_group
            .as_ref()
            .is_some_and(|g| g.placement.columns.is_some())
    }

    /// Split by width: folds in a step's time outside and inside the expert phase.
    fn observe_phases(&mut self, seqs: &[f64], computes: &[f64], expert_s: &[f64]) {
        self.dense_speeds.resize(seqs.len(), None);
        for (r, speed) in self.dense_speeds.iter_mut().enumerate() {
            let outside = computes[r] - expert_s[r];
            if seqs[r] > 0.0 && outside > 0.0 {
                let now = seqs[r] / outside;
                *speed = Some(speed.map_or(now, |old| 0.5 * old + 0.5 * now));
            }
        }
        let (sums, steps) = &mut self.expert_seconds;
        sums.resize(expert_s.len(), 0.0);
        sums.iter_mut().zip(expert_s).for_each(|(s, e)| *s += e);
        *steps += 1;
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

    /// Each rank's most rows of a step: its memory bound per micro-batch, every micro-batch.
    fn caps(&self) -> Vec<Option<usize>> {
        let caps = self.opts.max_seqs.iter();
        caps.map(|c| c.map(|c| c * self.micro_batches)).collect()
    }

    /// Flags ranks slower than the balancer predicted for their share.
    fn stragglers(&mut self, step: u64, computes: &[f64]) -> StragglerVerdict {
        let expected: Vec<Option<f64>> = (0..computes.len())
            .map(|r| self.balancer.predict(r, self.balancer.shares[r]))
            .collect();
        let name = |r: usize| format!("rank {r}");
        self.watch
            .observe(step, computes, &expected, name, "predicted")
    }

    /// Lays out each rank's rows of every micro-batch from the balancer's shares; called
    /// whenever they change.
    fn plan_rows(&mut self) {
        let shares = &self.balancer.shares;
        // Ranks laid end to end over the step's rows run fewer, fuller micro-batches, but
        // one may then take a whole micro-batch: only where each may (its memory bound is a
        // whole micro-batch), and not under expert parallelism, whose exchanges need every
        // rank in every micro-batch.
        let whole = |c: &Option<usize>| c.is_none_or(|c| c >= self.batch_size);
        let counts = if self.experts_group.is_none() && self.opts.max_seqs.iter().all(whole) {
            nuwa_core::packed_micro_batch_shares(shares, self.batch_size, self.micro_batches)
        } else {
            let min_each = self.experts_group.is_some() as usize;
            nuwa_core::micro_batch_shares(shares, self.batch_size, self.micro_batches, min_each)
        };
        self.row_counts = counts;
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

    fn start(&mut self, cfg: &RunConfig, start_step: u64) -> Result<()> {
        let t = &cfg.train;
        let ranks = self.comm().size();
        let moe_layers = (0..cfg.model.num_hidden_layers)
            .filter(|&l| cfg.model.layer_is_moe(l))
            .count()
            + cfg.model.num_nextn_predict_layers;
        self.experts = cfg.model.num_experts;
        self.top_k = cfg.model.num_experts_per_tok;
        self.seq_len = t.seq_len;
        self.micro_batches = t.grad_accum.max(1);
        self.mtp_layers = cfg.model.num_nextn_predict_layers;
        self.moe = (ranks > 1 && cfg.model.is_moe()).then(|| {
            (
                t.batch_size * t.seq_len * cfg.model.num_experts_per_tok,
                moe_layers * cfg.model.num_experts,
            )
        });
        // The balancer splits the step's rows (every micro-batch's), so its split is as fine
        // as one row of the step; `rows` spreads each rank's over the micro-batches.
        self.balancer = Balancer::new(t.batch_size * self.micro_batches, ranks, &self.caps());
        self.batch_size = t.batch_size;
        self.start_step = start_step;
        self.experts_group = crate::expert::group_for(
            &self.opts.comm,
            self.opts.ep,
            self.opts.placement.as_ref(),
            self.opts.ep_split,
            self.opts.memory_of(self.rank()),
            None,
            cfg,
        )?;
        if self.experts_group.is_some() {
            let (m, t) = (&cfg.model, &cfg.train);
            // Forward and backward (×3) of three h×w products (×2 FLOPs a multiply-add).
            self.flops_expert_row = 18.0 * (m.hidden_size * m.moe_intermediate_size) as f64;
            let total = m.counts(t.seq_len).train_flops_per_token;
            let routed = self.flops_expert_row * m.num_experts_per_tok as f64;
            self.flops_dense = (total - routed).max(total * 0.1);
        }
        self.plan_rows();
        Ok(())
    }

    fn prepare(&mut self, model: LanguageModel, opt: &mut AdamW, device: &Device) -> LanguageModel {
        self.moe_paths = model.moe_paths();
        crate::expert::keep_share(model, opt, self.experts_group.as_ref(), device)
    }

    fn expert_group(&self) -> Option<ExpertGroup> {
        self.experts_group.clone()
    }

    fn shards_model(&self) -> bool {
        self.experts_group.is_some()
    }

    fn grad_norm(&self, model: &LanguageModel, grads: &GradientsParams) -> f64 {
        match &self.experts_group {
            Some(group) => crate::expert::grad_norm(model, grads, group),
            None => crate::optim::grad_norm(model, grads),
        }
    }

    fn checkpoint_part(&self, weights: Tensors, optimizer: Tensors) -> CheckpointPart {
        let Some(group) = &self.experts_group else {
            return CheckpointPart::Whole { weights, optimizer };
        };
        // The first expert group writes the experts, its first rank the rest too.
        let writes = group.comm.rank() < group.ep;
        let with_replicated = self.opts.comm.rank() == 0;
        // Layers in their own expert orders are written in expert order (collective).
        let (paths, orders) = (&self.moe_paths, &self.expert_orders);
        let weights = crate::expert::in_expert_order(weights, group, paths, orders);
        let optimizer = crate::expert::in_expert_order(optimizer, group, paths, orders);
        CheckpointPart::Sharded {
            comm: self.opts.comm.clone(),
            mine: writes.then(|| {
                crate::expert::own_shard(weights, optimizer, Some(group), with_replicated)
            }),
        }
    }

    fn after_step(
        &mut self,
        model: LanguageModel,
        opt: &mut AdamW,
        device: &Device,
    ) -> LanguageModel {
        let (placement, orders) = (self.pending_placement.take(), self.pending_orders.take());
        let Some(old) = &self.experts_group else {
            return model;
        };
        if placement.is_none() && orders.is_none() {
            return model;
        }
        let group = match placement {
            Some(new) => {
                // The phases measured so far were of the old columns.
                self.expert_seconds = (Vec::new(), 0);
                ExpertGroup::new(self.opts.comm.clone(), old.ep, new)
                    .with_member_caps(old.member_caps.clone())
            }
            None => old.clone(),
        };
        let orders = orders.unwrap_or_else(|| self.expert_orders.clone());
        let model = crate::expert::replace_experts(model, opt, &group, &orders, device);
        self.experts_group = Some(group);
        self.expert_orders = orders;
        model
    }

    fn rows(&self) -> Rows {
        Rows::of_rank(&self.row_counts, self.rank())
    }

    fn global_batch(&self, step: u64) -> Option<GlobalBatch<'_>> {
        self.moe.map(|(assignments, counts_len)| GlobalBatch {
            comm: self.comm(),
            watchdog: &self.watchdog,
            step,
            assignments,
            counts_len,
            among: None,
        })
    }

    #[allow(unused_variables)]
    fn begin_step(&mut self, step: u64) {
        nuwa_core::comm::pace::start_step();
        if let Some(group) = &self.experts_group {
            // Evaluation between steps ran experts too; count only the step's.
            group.take_expert_rows();
            group.take_exchange_seconds();
            group.take_expert_seconds();
        }
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
        // Time in exchanges (expert parallelism) is waiting and moving rows, not this rank's
        // compute: it is reported apart, and speeds are measured without it.
        let (a2a_s, expert_rows, expert_s) =
            self.experts_group.as_ref().map_or((0.0, 0, 0.0), |g| {
                let exchanges = g.take_exchange_seconds();
                (exchanges, g.take_expert_rows(), g.take_expert_seconds())
            });
        // This rank's work in sequences' worth: its rows, and under expert parallelism the
        // expert rows it ran for every rank (in place of its own tokens' expert work).
        let work = match self.experts_group {
            Some(_) => {
                let tokens = (local.rows * self.seq_len) as f64;
                let flops = tokens * self.flops_dense + expert_rows as f64 * self.flops_expert_row;
                let per_seq = self.seq_len as f64
                    * (self.flops_dense + self.flops_expert_row * self.top_k as f64);
                flops / per_seq
            }
            None => local.rows as f64,
        };
        // A throttled rank's last stretch of compute, then its compute without the time it
        // waited in collectives inside the step (exchanges, the router losses' counts).
        let (slept, waited) = nuwa_core::comm::pace::end_step();
        local.compute_s = (local.compute_s + slept - waited).max(0.0);
        #[cfg(feature = "fault-injection")]
        self.opts.faults.after_compute(step, self.rank());
        // Time spent waiting for the slowest rank, then the all-reduce itself.
        self.watchdog.enter(step);
        let waited = Instant::now();
        self.comm().barrier();
        let wait_s = waited.elapsed().as_secs_f64();
        let skip = match &self.experts_group {
            Some(_) => model.expert_param_ids(),
            None => Default::default(),
        };
        let (mut grads, mut comm_s) =
            all_reduce_gradients(model, local.grads, self.comm(), &skip, &self.device);
        if let Some(group) = &self.experts_group {
            let started = Instant::now();
            let ids = model.expert_param_ids();
            crate::expert::reduce_expert_grads(model, &mut grads, group, &ids, &self.device);
            comm_s += started.elapsed().as_secs_f64();
        }
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
            a2a_s,
            work,
            nuwa_core::hardware::peak_rss_bytes().unwrap_or(0) as f64,
            expert_rows as f64,
            expert_s,
            nuwa_core::hardware::rss_before_model().unwrap_or(0) as f64,
        ];
        let all = self.comm().all_gather(&mine);
        let expert_load = self.global_load(&local.step_load);
        self.watchdog.leave();
        let col = |i: usize| -> Vec<f64> { all.chunks(mine.len()).map(|c| c[i]).collect() };
        let (computes, waits, comms, seqs) = (col(3), col(4), col(5), col(6));
        let (a2a, work, rss, rss_before) = (col(9), col(10), col(11), col(14));
        let StragglerVerdict {
            slow_now,
            stragglers,
            notes,
        } = self.stragglers(step, &computes);
        // A process's first step is warm-up (first allocations, page faults) and says
        // little about its speed: the profile is the second step, planned on at once.
        let (expert_rows, expert_s) = (col(12), col(13));
        let by_width = self.split_by_width();
        if step > self.start_step + 1 {
            self.balancer.observe(&work, &computes, &slow_now);
            if by_width {
                self.observe_phases(&seqs, &computes, &expert_s);
            }
        }
        // `rebalance_every` 0 keeps the equal split (the naive baseline). Split by width,
        // the step after the first re-placement is profiled again: the first one with
        // unequal columns, which tells the work on every row from the work on columns.
        let every = self.opts.rebalance_every;
        let due = step == self.start_step + 2
            || (by_width && step == self.start_step + 4)
            || step.is_multiple_of(every.max(1));
        if every > 0 && due {
            let caps = self.caps();
            let total = self.batch_size * self.micro_batches;
            self.balancer.rebalance(total, &caps);
            if by_width {
                // Rows by the speed outside the expert phase: all the work rows bring.
                let known: Vec<f64> = self.dense_speeds.iter().flatten().copied().collect();
                if known.len() == computes.len() {
                    self.balancer.shares = nuwa_core::proportional_shares(total, &known, &caps);
                }
            }
            if self.experts_group.is_some() {
                // Every rank takes part in every exchange, so each needs a row of each
                // micro-batch.
                at_least(&mut self.balancer.shares, self.micro_batches);
                self.pending_placement = self.measured_placement();
            }
            self.plan_rows();
        }
        if step > self.start_step + 1 {
            self.pending_orders = self.measured_orders(&expert_load);
        }
        let ranks: Vec<Value> = (0..computes.len())
            .map(|r| {
                let mut rank = json!({"rank": r, "device": self.opts.devices.get(r),
                       "seqs": seqs[r], "compute_s": computes[r],
                       "wait_s": waits[r], "comm_s": comms[r], "a2a_s": a2a[r],
                       "peak_rss_bytes": rss[r], "rss_before_model_bytes": rss_before[r]});
                if self.experts_group.is_some() {
                    // The expert phase: rows this rank's experts ran, and its compute
                    // between the exchanges around them.
                    rank["expert_rows"] = json!(expert_rows[r]);
                    rank["expert_s"] = json!(expert_s[r]);
                }
                rank
            })
            .collect();
        let mut metrics = json!({
            "ranks": ranks, "stragglers": stragglers, "compute_s": local.compute_s,
            "wait_s": wait_s, "comm_s": comm_s,
        });
        if let Some(group) = &self.experts_group {
            metrics["a2a_s"] = json!(a2a_s);
            metrics["expert_placement"] = json!(group.placement.counts);
            if let Some(columns) = &group.placement.columns {
                metrics["expert_columns"] = json!(columns);
            }
            if let Some(shared) = &group.placement.shared {
                metrics["expert_shared"] = json!(shared.experts);
                // Layers whose experts move to a new order after this step's update.
                let now = |l: usize| self.expert_orders.get(l).cloned().flatten();
                let moving = self.pending_orders.as_ref().map_or(0, |new| {
                    (0..new.len()).filter(|&l| new[l] != now(l)).count()
                });
                metrics["expert_reordered"] = json!(moving);
                // Layers in an order of their own after this step's update.
                let orders = self.pending_orders.as_ref().unwrap_or(&self.expert_orders);
                metrics["expert_own_orders"] = json!(orders.iter().flatten().count());
            }
        }
        // A rank with no rows this step has no router losses of its own, yet the batch does.
        let is_moe = self.moe.is_some() || local.load_balance.is_some();
        let totals = ReducedStep {
            ce: col(0).iter().sum(),
            load_balance: is_moe.then(|| col(1).iter().sum()),
            z_loss: is_moe.then(|| col(2).iter().sum()),
            mtp_loss: (self.mtp_layers > 0).then(|| col(8).iter().sum()),
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

/// Refuses an expert-parallel layout that cannot run, naming what does not divide.
pub fn check_expert_layout(ep: usize, ranks: usize, experts: usize, batch: usize) -> Result<()> {
    if !ranks.is_multiple_of(ep) {
        bail!("--ep {ep}: the {ranks} rank(s) do not divide into expert-parallel groups of {ep}");
    }
    if experts < ep {
        bail!("--ep {ep}: the model has {experts} routed experts, fewer than the group's {ep} ranks (each must own one)");
    }
    if batch < ranks {
        bail!("--batch-size {batch}: expert parallelism needs at least one sequence per rank ({ranks} ranks)");
    }
    Ok(())
}

/// Split by width: where the columns move from `current` towards the `fitted` split. The
/// phase times they are fitted to are noisy by a few percent from step to step, and moving
/// on every wobble swings the columns back and forth (and moves weights and moments each
/// time): a move of at most 1 column in 200 is not made (`None`), one under 1 in 20 goes half
/// way; a larger one (a device whose speed changed) goes all the way.
fn damped(current: &[usize], fitted: Placement, caps: &[Option<usize>]) -> Option<Placement> {
    let target = fitted.columns.as_deref()?;
    let width: usize = current.iter().sum();
    let moved = current
        .iter()
        .zip(target)
        .map(|(&c, &t)| c.abs_diff(t))
        .max()
        .unwrap_or(0);
    if moved <= (width / 200).max(1) {
        return None;
    }
    if moved * 20 >= width {
        return Some(fitted);
    }
    let halfway: Vec<f64> = current
        .iter()
        .zip(target)
        .map(|(&c, &t)| (c + t) as f64 / 2.0)
        .collect();
    Some(Placement::by_width_within(
        fitted.experts(),
        width,
        &halfway,
        caps,
    ))
}

/// Shared boundaries: the `current` slots with `fresh`'s weights when every member's
/// proportional cut (its speeds' share of the experts, member after member) still lies within
/// or at the edge of the current window at that boundary — the shared rows absorb the
/// difference. Speeds measured near a window's edge would otherwise move its slots back and
/// forth, each move gathering every layer's experts.
fn kept_windows(current: &Placement, fresh: Placement, speeds: &[f64]) -> Placement {
    let (Some(now), Some(new)) = (&current.shared, &fresh.shared) else {
        return fresh;
    };
    if current.counts == fresh.counts || now.experts != new.experts {
        return fresh;
    }
    let total: f64 = speeds.iter().map(|s| s.max(1e-12)).sum();
    let experts = current.experts() as f64;
    let mut cut = 0.0;
    let inside = (0..now.experts.len()).all(|m| {
        cut += experts * speeds[m].max(1e-12) / total;
        let end = current.range(m).end as f64;
        (end - now.experts[m] as f64..=end).contains(&cut)
    });
    match inside {
        true => Placement {
            shared: Some(new.clone()),
            ..current.clone()
        },
        false => fresh,
    }
}

/// Moves one row from the largest shares to any empty one.
fn at_least(shares: &mut [usize], least: usize) {
    while let Some(short) = shares.iter().position(|&s| s < least) {
        let Some(largest) = (0..shares.len()).max_by_key(|&r| shares[r]) else {
            return;
        };
        if shares[largest] <= least {
            return;
        }
        shares[largest] -= 1;
        shares[short] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_window_slots_stay_while_the_speeds_cut_lies_within_them() {
        // Slots 0..6 and 4..8, experts 4 and 5 shared: member 0 at twice member 1's speed.
        let current = Placement::shared_within(8, &[2.0, 1.0], 2, &[]);
        assert_eq!(current.counts, [6, 4]);
        // 2.2 : 1 asks for [7, 3] afresh, but its cut (5.5 experts) lies in the window: the
        // slots stay, the rows follow the new speeds.
        let speeds = [2.2, 1.0];
        let fresh = Placement::shared_within(8, &speeds, 2, &[]);
        assert_eq!(fresh.counts, [7, 3]);
        let kept = kept_windows(&current, fresh.clone(), &speeds);
        assert_eq!(kept.counts, [6, 4]);
        assert_eq!(kept.shared, fresh.shared, "the new weights");
        // 4 : 1 cuts at 6.4, past the window's edge: the slots move.
        let speeds = [4.0, 1.0];
        let fresh = Placement::shared_within(8, &speeds, 2, &[]);
        assert_eq!(kept_windows(&current, fresh.clone(), &speeds), fresh);
    }

    #[test]
    fn fitted_columns_move_half_way_on_small_moves_and_not_at_all_on_tiny_ones() {
        let fitted = |c: &[usize]| Placement {
            counts: vec![8; c.len()],
            columns: Some(c.to_vec()),
            shared: None,
        };
        let columns = |p: Option<Placement>| p.and_then(|p| p.columns);
        // 1 column of 256: a wobble, not moved.
        assert_eq!(damped(&[185, 71], fitted(&[186, 70]), &[]), None);
        // 8 of 256 (3%): half way.
        let half = columns(damped(&[185, 71], fitted(&[193, 63]), &[]));
        assert_eq!(half, Some(vec![189, 67]));
        // 43 of 256 (a speed that changed): all the way.
        let full = columns(damped(&[128, 128], fitted(&[171, 85]), &[]));
        assert_eq!(full, Some(vec![171, 85]));
        // Within the members' caps.
        let capped = columns(damped(&[185, 71], fitted(&[193, 63]), &[Some(187), None]));
        assert_eq!(capped, Some(vec![187, 69]));
    }
}
