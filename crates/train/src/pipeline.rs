//! Pipeline parallelism: the decoder layers split into `pp` stages, one per rank of each
//! pipeline, run over the step's micro-batches with the 1F1B schedule (Megatron's
//! non-interleaved one: a few forwards to fill the pipe, then one forward and one backward in
//! turn, then the backwards left). A micro-batch is one of the step's `grad_accum` batches, so
//! a pipeline computes exactly what one process computes with the same `--grad-accum`.
//!
//! The world's ranks form `world / pp` pipelines of `pp` consecutive ranks (rank = replica ·
//! pp + stage, so a pipeline sits on one kind of device when a plan lists devices by kind);
//! the ranks of a stage are data-parallel replicas of it (each takes an equal share of every
//! micro-batch, and their gradients are summed), and may split its routed experts in
//! expert-parallel groups: DP × EP × PP in one job.
//!
//! Stages are uneven: before the first step every rank times a decoder layer's forward and
//! backward on a micro-batch, and the layers go to stages by those speeds (a stronger device
//! takes more layers; the last stage also runs the LM head), within each rank's memory.
//!
//! Activations go forward and their gradients back point to point, through host memory; a
//! stage's backward is `sum(out · grad_out)` (plus its share of the router losses), whose
//! gradient with respect to the stage's input is what goes back.

use crate::expert;
use crate::optim::AdamW;
use crate::parallel::{
    all_reduce_gradients, Collective, DistOptions, StragglerVerdict, StragglerWatch,
};
use crate::step::LocalStep;
use crate::strategy::{CheckpointPart, Parallelism, ReducedStep};
use anyhow::{bail, Result};
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use nuwa_data::{Batch, BatchSampler, TokenShard};
use nuwa_model::expert_parallel::ExpertGroup;
use nuwa_model::stage::{Stage, StageInput};
use nuwa_model::weights::HostTensor;
use nuwa_model::{cross_entropy, LanguageModel, ModulePath, RouterStats};
use nuwa_run::{RunConfig, TrainConfig};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

type Tensors = BTreeMap<String, HostTensor>;

/// Layers per stage for `layers` decoder layers over stages of the given speeds: every stage
/// at least one layer, each further layer to the stage that would finish it soonest; the last
/// stage's LM head counts as `head_layers` layers of work; `caps` bound each stage's layers
/// (its memory).
pub fn split_layers(layers: usize, speeds: &[f64], head_layers: f64, caps: &[usize]) -> Vec<usize> {
    let stages = speeds.len();
    let mut counts = vec![1usize; stages];
    let last = stages - 1;
    let time = |s: usize, n: usize| {
        let work = n as f64 + if s == last { head_layers } else { 0.0 };
        work / speeds[s].max(1e-12)
    };
    for _ in stages..layers {
        let best = (0..stages)
            .filter(|&s| counts[s] < caps.get(s).copied().unwrap_or(usize::MAX))
            .min_by(|&a, &b| time(a, counts[a] + 1).total_cmp(&time(b, counts[b] + 1)));
        match best {
            Some(s) => counts[s] += 1,
            None => counts[last] += 1, // no room anywhere: over-fill the last (reported later)
        }
    }
    counts
}

/// Refuses a pipeline layout that cannot run, naming the field.
pub fn check_pipeline_layout(cfg: &RunConfig, pp: usize, ranks: usize) -> Result<()> {
    let m = &cfg.model;
    if !ranks.is_multiple_of(pp) {
        bail!("--pp {pp}: the {ranks} rank(s) do not divide into {pp} pipeline stages");
    }
    if m.num_hidden_layers < pp {
        bail!(
            "--pp {pp}: the model has {} decoder layers, fewer than its {pp} stages (each needs one)",
            m.num_hidden_layers
        );
    }
    if m.tie_word_embeddings {
        bail!("--pp {pp}: tie_word_embeddings is not supported in a pipeline (the first and last stages would share the embeddings)");
    }
    if m.num_nextn_predict_layers > 0 {
        bail!("--pp {pp}: num_nextn_predict_layers (MTP) is not supported in a pipeline");
    }
    let replicas = ranks / pp;
    if cfg.train.batch_size < replicas {
        bail!(
            "--batch-size {}: each of the {replicas} pipeline replicas needs a sequence of every micro-batch",
            cfg.train.batch_size
        );
    }
    Ok(())
}

/// A pipeline over stages of data-parallel (and expert-parallel) ranks.
pub struct Pipeline {
    opts: DistOptions,
    world: Arc<dyn Collective>,
    /// The ranks of this rank's stage.
    stage_comm: Arc<dyn Collective>,
    pp: usize,
    /// This rank's stage and its place among the stage's replicas.
    s: usize,
    d: usize,
    replicas: usize,
    stage: Stage,
    stage_layers: Vec<usize>,
    experts_group: Option<ExpertGroup>,
    /// Rows of every micro-batch per replica.
    shares: Vec<usize>,
    /// Router layers in the whole model (the router losses are their mean).
    routers: usize,
    experts: usize,
    top_k: usize,
    hidden: usize,
    device: Device,
    /// The last step's seconds blocked on neighbours, in exchanges, and in the schedule.
    last_p2p: (f64, f64, f64),
    /// This step's test-only slowdown (`--throttle` from `--throttle-from`).
    slowdown: f64,
    /// Each rank's usual compute seconds per step (its work is the same every step: its
    /// layers, its rows), and how many steps in a row it has run slower than that.
    expected: Vec<Option<f64>>,
    watch: StragglerWatch,
    /// The ids of this stage's parameters: gradients are taken for these only (taking one
    /// for another stage's parameter would allocate it).
    owned: Vec<ParamId>,
    /// The ids left out of the stage's all-reduce: other stages' parameters, expert slices.
    not_all_reduced: HashSet<ParamId>,
    /// This stage's routed expert weights, reduced over the expert group's replicas (its
    /// model has every layer, most never allocated: another stage's experts stay untouched).
    stage_experts: HashSet<ParamId>,
}

impl Pipeline {
    pub fn new(opts: DistOptions, device: &Device) -> Self {
        let world = opts.comm.clone();
        Self {
            stage_comm: world.clone(),
            world,
            pp: opts.pp,
            s: 0,
            d: 0,
            replicas: 1,
            stage: Stage::of(&[1], 0),
            stage_layers: Vec::new(),
            experts_group: None,
            shares: Vec::new(),
            routers: 0,
            experts: 0,
            top_k: 0,
            hidden: 0,
            device: device.clone(),
            last_p2p: (0.0, 0.0, 0.0),
            slowdown: 1.0,
            expected: Vec::new(),
            watch: StragglerWatch::new(opts.straggler_factor, opts.straggler_patience),
            owned: Vec::new(),
            not_all_reduced: HashSet::new(),
            stage_experts: HashSet::new(),
            opts,
        }
    }

    /// The world rank of this rank's counterpart in stage `s`.
    fn rank_in_stage(&self, s: usize) -> usize {
        self.d * self.pp + s
    }

    /// Seconds one decoder layer's forward and backward take here on a micro-batch (after one
    /// untimed run), as the device would with its throttle.
    fn time_a_layer(&self, cfg: &RunConfig) -> f64 {
        let t = &cfg.train;
        let stage = Stage {
            layers: 0..1,
            first: false,
            last: false,
        };
        let device = self.device.clone().autodiff();
        let model = LanguageModel::new_stage(&cfg.model, &stage, &device, t.seed);
        let rows = self.shares[self.d].max(1);
        let run = || {
            let values = vec![0.01f32; rows * t.seq_len * self.hidden];
            let x = Tensor::<3>::from_data(
                TensorData::new(values, [rows, t.seq_len, self.hidden]),
                &device,
            )
            .require_grad();
            let started = Instant::now();
            let (y, _) = model.forward_stage(StageInput::Hidden(x), &stage);
            let _ = y.sum().backward();
            started.elapsed().as_secs_f64()
        };
        run();
        let seconds = run().min(run());
        // A device throttled from the first step is timed as it will run.
        #[cfg(feature = "fault-injection")]
        let seconds = match self.opts.faults.throttle_from <= 1 {
            true => seconds * self.opts.faults.throttle.max(1.0),
            false => seconds,
        };
        seconds
    }

    /// Per-stage layer counts: from the plan, or from every rank's measured layer time (a
    /// stage as fast as its slowest replica) within every rank's memory.
    fn plan_stages(&self, cfg: &RunConfig) -> Result<Vec<usize>> {
        let layers = cfg.model.num_hidden_layers;
        if let Some(fixed) = &self.opts.stage_layers {
            if fixed.len() != self.pp || fixed.iter().sum::<usize>() != layers || fixed.contains(&0)
            {
                bail!(
                    "stage layers {fixed:?} (--stage-layers, or the plan's layout.stage_layers) must be {} positive counts summing to the model's {layers} layers",
                    self.pp
                );
            }
            return Ok(fixed.clone());
        }
        let mine = self.time_a_layer(cfg);
        let free = self.opts.memory_of(self.world.rank()).unwrap_or(f64::MAX);
        let all = self.world.all_gather(&[mine, free]);
        let mut speeds = vec![f64::MAX; self.pp];
        let mut memory = vec![f64::MAX; self.pp];
        // The rank whose memory bounds each stage (its smallest), for the error below.
        let mut smallest = vec![0; self.pp];
        for (r, v) in all.chunks(2).enumerate() {
            let s = r % self.pp;
            speeds[s] = speeds[s].min(1.0 / v[0].max(1e-9));
            if v[1] < memory[s] {
                (memory[s], smallest[s]) = (v[1], r);
            }
        }
        let m = &cfg.model;
        // A layer's weights, gradients and AdamW moments, and its activations for the
        // micro-batches 1F1B keeps in flight (the estimate the planner uses too), bound how
        // many a stage's memory holds.
        let seq = cfg.train.seq_len;
        let per_layer = m.counts(seq).total_params as f64 / m.num_hidden_layers as f64
            * nuwa_model::TRAIN_BYTES_PER_PARAM
            + (self.shares[0] * seq) as f64
                * m.activation_bytes_per_token_layer(seq)
                * self.pp as f64;
        // A stage must hold one layer's parameters (f32 weights, gradients and AdamW moments
        // in 80% of its memory, what `memory_gb` bounds; routed experts split over the expert
        // group): else one line now, not a stage that runs out of memory later.
        let ep = self.opts.ep.max(1) as u64;
        let routed = m.routed_expert_params();
        let smallest_layer = (0..layers)
            .map(|l| match m.layer_is_moe(l) {
                true => m.layer_params(l) - routed + routed / ep,
                false => m.layer_params(l),
            })
            .min()
            .unwrap_or(0) as f64
            * nuwa_model::TRAIN_BYTES_PER_PARAM;
        if let Some(s) = (0..self.pp).find(|&s| memory[s] * 0.8 < smallest_layer) {
            bail!(
                "--pp {}: rank {}'s memory ({}) does not hold one decoder layer in 80% of it: \
                 the smallest takes {} with gradients and optimiser state",
                self.pp,
                smallest[s],
                crate::expert::fmt_bytes(memory[s]),
                crate::expert::fmt_bytes(smallest_layer)
            );
        }
        let caps: Vec<usize> = memory
            .iter()
            .map(|&b| ((b * 0.8 / per_layer) as usize).max(1))
            .collect();
        let head = (m.vocab_size as f64 * m.hidden_size as f64)
            / (m.counts(1).total_params as f64 / m.num_hidden_layers as f64).max(1.0);
        Ok(split_layers(layers, &speeds, head, &caps))
    }

    /// This stage's parameters on the host, by name.
    fn stage_weights(&self, model: &LanguageModel) -> BTreeMap<String, HostTensor> {
        struct Own<'a> {
            stage: &'a Stage,
            path: ModulePath,
            out: BTreeMap<String, HostTensor>,
        }
        impl ModuleVisitor for Own<'_> {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.path.enter(name);
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.path.exit();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let name = self.path.current();
                if self.stage.owns(&name) {
                    self.out.insert(name, HostTensor::from_tensor(param.val()));
                }
            }
        }
        let mut v = Own {
            stage: &self.stage,
            path: ModulePath::default(),
            out: BTreeMap::new(),
        };
        model.visit(&mut v);
        v.out
    }

    /// Sends `t` to world rank `to`, returning the seconds it waited.
    fn send(&self, to: usize, t: Tensor<3>) -> f64 {
        let data: Vec<f32> = t.into_data().iter::<f32>().collect();
        let started = Instant::now();
        self.world.send(to, &data);
        started.elapsed().as_secs_f64()
    }
}

/// The ids of the float parameters `stage` holds (in module order), and of those it does not.
fn stage_param_ids(model: &LanguageModel, stage: &Stage) -> (Vec<ParamId>, HashSet<ParamId>) {
    struct Ids<'a> {
        stage: &'a Stage,
        path: ModulePath,
        own: Vec<ParamId>,
        others: HashSet<ParamId>,
    }
    impl ModuleVisitor for Ids<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            match self.stage.owns(&self.path.current()) {
                true => self.own.push(param.id),
                false => drop(self.others.insert(param.id)),
            }
        }
    }
    let mut v = Ids {
        stage,
        path: ModulePath::default(),
        own: Vec::new(),
        others: HashSet::new(),
    };
    model.visit(&mut v);
    (v.own, v.others)
}

/// What a stage keeps of a micro-batch between its forward and its backward.
struct InFlight {
    /// The stage's output (logits on the last stage, hidden states before).
    out: Tensor<3>,
    /// The input hidden states, a leaf whose gradient goes back (not on the first stage).
    input: Option<Tensor<3>>,
    /// The loss this stage adds itself: on the last stage the cross-entropy and router
    /// losses, before it the router losses of its layers, weighted by the micro-batch.
    own_loss: Option<Tensor<1>>,
}

/// The step's numbers as a stage sees them.
#[derive(Default)]
struct StageTotals {
    ce: f64,
    load_balance: f64,
    z_loss: f64,
    tokens_per_expert: Vec<Vec<usize>>,
    step_load: Vec<Vec<usize>>,
    compute_s: f64,
    p2p_s: f64,
}

impl Pipeline {
    fn shape(&self, rows: usize, seq: usize) -> [usize; 3] {
        [rows, seq, self.hidden]
    }

    fn tokens(&self, batch: &Batch, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
        let shape = [batch.batch_size, batch.seq_len];
        let to = |ids: &[u32]| {
            let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
            Tensor::<2, Int>::from_data(TensorData::new(v, shape), device)
        };
        (to(&batch.inputs), to(&batch.targets))
    }

    /// Router losses of this stage's MoE layers for one micro-batch, the load-balance loss
    /// with the whole micro-batch's expert fractions (every replica's tokens).
    fn router_losses(
        &self,
        router: &[RouterStats],
        t: &TrainConfig,
        global_rows: usize,
        device: &Device,
    ) -> Option<(Tensor<1>, Tensor<1>)> {
        if router.is_empty() {
            return None;
        }
        let mut counts: Vec<f32> = router
            .iter()
            .flat_map(|s| s.tokens_per_expert.iter().map(|&c| c as f32))
            .collect();
        if self.replicas > 1 {
            self.stage_comm.all_reduce_sum(&mut counts);
        }
        let assignments = (global_rows * t.seq_len * self.top_k) as f32;
        let experts = self.experts;
        let lb: Vec<Tensor<1>> = router
            .iter()
            .zip(counts.chunks(experts))
            .map(|(s, c)| {
                let f: Vec<f32> = c.iter().map(|&n| n / assignments).collect();
                let f = Tensor::<1>::from_data(TensorData::new(f, [experts]), device);
                (f * s.mean_prob.clone()).sum() * experts as f32
            })
            .collect();
        let z: Vec<Tensor<1>> = router.iter().map(|s| s.z_loss.clone()).collect();
        let n = self.routers as f32;
        Some((Tensor::cat(lb, 0).sum() / n, Tensor::cat(z, 0).sum() / n))
    }

    /// One micro-batch's forward on this stage.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        model: &LanguageModel,
        batch: &Batch,
        input: Option<Vec<f32>>,
        weight: f32,
        t: &TrainConfig,
        device: &Device,
        totals: &mut StageTotals,
    ) -> InFlight {
        let started = Instant::now();
        let rows = batch.batch_size;
        let (tokens, targets) = self.tokens(batch, device);
        let (stage_input, leaf) = match input {
            None => (StageInput::Tokens(tokens), None),
            Some(values) => {
                let x = Tensor::<3>::from_data(
                    TensorData::new(values, self.shape(rows, batch.seq_len)),
                    device,
                )
                .require_grad();
                (StageInput::Hidden(x.clone()), Some(x))
            }
        };
        let (out, router) = model.forward_stage(stage_input, &self.stage);
        let global_rows = t.batch_size;
        let mut own: Option<Tensor<1>> = None;
        if let Some((lb, z)) = self.router_losses(&router, t, global_rows, device) {
            totals.load_balance += lb.clone().into_scalar::<f32>() as f64 * weight as f64;
            totals.z_loss += z.clone().into_scalar::<f32>() as f64 * weight as f64;
            own = Some(lb * t.aux_loss_coef + z * t.z_loss_coef);
        }
        let loads: Vec<Vec<usize>> = router.iter().map(|s| s.tokens_per_expert.clone()).collect();
        if totals.step_load.is_empty() {
            totals.step_load = loads.clone();
        } else {
            for (sum, layer) in totals.step_load.iter_mut().zip(&loads) {
                sum.iter_mut().zip(layer).for_each(|(s, c)| *s += c);
            }
        }
        totals.tokens_per_expert = loads;
        if self.stage.last {
            let ce = cross_entropy(out.clone(), targets);
            totals.ce += ce.clone().into_scalar::<f32>() as f64 * weight as f64;
            own = Some(match own {
                Some(aux) => ce + aux,
                None => ce,
            });
        }
        self.slow_down(started);
        totals.compute_s += started.elapsed().as_secs_f64();
        InFlight {
            out,
            input: leaf,
            own_loss: own.map(|l| l * weight),
        }
    }

    /// One micro-batch's backward on this stage: returns the gradient of its input (none on
    /// the first stage).
    fn backward(
        &self,
        model: &LanguageModel,
        flight: InFlight,
        grad_out: Option<Vec<f32>>,
        acc: &mut GradientsAccumulator<LanguageModel>,
        totals: &mut StageTotals,
    ) -> Option<Vec<f32>> {
        let started = Instant::now();
        let device = flight.out.device();
        let mut root: Option<Tensor<1>> = flight.own_loss;
        if let Some(g) = grad_out {
            let g = Tensor::<3>::from_data(TensorData::new(g, flight.out.dims()), &device);
            let through = (flight.out * g).sum();
            root = Some(match root {
                Some(r) => r + through,
                None => through,
            });
        }
        let root = root.unwrap_or_else(|| Tensor::zeros([1], &device));
        let grads = root.backward();
        let dx = flight.input.as_ref().and_then(|x| x.grad(&grads));
        let mut grads = grads;
        let own = GradientsParams::from_params(&mut grads, model, &self.owned);
        acc.accumulate(model, own);
        self.slow_down(started);
        totals.compute_s += started.elapsed().as_secs_f64();
        dx.map(|g| g.into_data().iter::<f32>().collect())
    }

    /// A throttled device (test-only fault injection) takes `throttle`× as long.
    #[allow(unused_variables)]
    fn slow_down(&self, started: Instant) {
        if self.slowdown > 1.0 {
            std::thread::sleep(started.elapsed().mul_f64(self.slowdown - 1.0));
        }
    }

    /// The 1F1B schedule over this step's micro-batches.
    fn run_schedule(
        &self,
        model: &LanguageModel,
        batches: &[Batch],
        t: &TrainConfig,
        device: &Device,
    ) -> (GradientsParams, StageTotals) {
        let mut totals = StageTotals::default();
        let mut acc = GradientsAccumulator::<LanguageModel>::new();
        let m = batches.len();
        let (first, last) = (self.stage.first, self.stage.last);
        let prev = (!first).then(|| self.rank_in_stage(self.s - 1));
        let next = (!last).then(|| self.rank_in_stage(self.s + 1));
        let size = |j: usize| batches[j].batch_size * batches[j].seq_len * self.hidden;
        let weight = |j: usize| (batches[j].batch_size as f64 / (t.batch_size * m) as f64) as f32;
        let warmup = (self.pp - self.s - 1).min(m);
        let remaining = m - warmup;
        let mut flights = std::collections::VecDeque::new();
        let mut p2p = 0.0;
        let recv = |from: Option<usize>, len: usize, p2p: &mut f64| {
            from.map(|r| {
                let started = Instant::now();
                let v = self.world.recv(r, len);
                *p2p += started.elapsed().as_secs_f64();
                v
            })
        };
        for (j, batch) in batches.iter().enumerate().take(warmup) {
            let x = recv(prev, size(j), &mut p2p);
            let f = self.forward(model, batch, x, weight(j), t, device, &mut totals);
            if let Some(to) = next {
                p2p += self.send(to, f.out.clone().detach());
            }
            flights.push_back(f);
        }
        let mut x = if remaining > 0 {
            recv(prev, size(warmup), &mut p2p)
        } else {
            None
        };
        for i in 0..remaining {
            let j = warmup + i;
            let f = self.forward(
                model,
                &batches[j],
                x.take(),
                weight(j),
                t,
                device,
                &mut totals,
            );
            // Send this output on and take the gradient of the oldest micro-batch back.
            let g = next.map(|to| {
                let data: Vec<f32> = f.out.clone().detach().into_data().iter::<f32>().collect();
                let started = Instant::now();
                let g = self.world.send_recv(to, &data, to, size(i));
                p2p += started.elapsed().as_secs_f64();
                g
            });
            flights.push_back(f);
            let oldest = flights
                .pop_front()
                .unwrap_or_else(|| unreachable!("a forward is in flight"));
            let dx = self
                .backward(model, oldest, g, &mut acc, &mut totals)
                .unwrap_or_default();
            if let Some(to) = prev {
                let started = Instant::now();
                if i + 1 == remaining {
                    self.world.send(to, &dx);
                } else {
                    x = Some(self.world.send_recv(to, &dx, to, size(j + 1)));
                }
                p2p += started.elapsed().as_secs_f64();
            }
        }
        for i in remaining..m {
            let g = recv(next, size(i), &mut p2p);
            let oldest = flights
                .pop_front()
                .unwrap_or_else(|| unreachable!("a forward is in flight"));
            let dx = self.backward(model, oldest, g, &mut acc, &mut totals);
            if let (Some(to), Some(d)) = (prev, dx) {
                let started = Instant::now();
                self.world.send(to, &d);
                p2p += started.elapsed().as_secs_f64();
            }
        }
        totals.p2p_s = p2p;
        (acc.grads(), totals)
    }
}

impl Pipeline {
    /// Flags ranks whose compute ran over `straggler_factor` × their usual (a pipeline
    /// rank's work is the same every step, so its own recent steps predict it). Slow steps
    /// do not move the usual.
    fn stragglers(&mut self, step: u64, computes: &[f64]) -> StragglerVerdict {
        self.expected.resize(computes.len(), None);
        let pp = self.pp;
        let name = |r: usize| format!("rank {r} (stage {})", r % pp);
        let verdict = self
            .watch
            .observe(step, computes, &self.expected, name, "usual");
        for (r, &compute) in computes.iter().enumerate() {
            // The first step (warm-up) is no measure of the usual.
            let first = step == 1 || self.expected[r].is_none() && compute <= 0.0;
            if !verdict.slow_now[r] && !first {
                let usual = self.expected[r].map_or(compute, |e| 0.5 * e + 0.5 * compute);
                self.expected[r] = Some(usual);
            }
        }
        verdict
    }
}

impl Parallelism for Pipeline {
    fn rank(&self) -> usize {
        self.world.rank()
    }

    #[allow(unused_variables)]
    fn begin_step(&mut self, step: u64) {
        #[cfg(feature = "fault-injection")]
        {
            let f = &self.opts.faults;
            f.begin_step(step, self.world.rank());
            let slow = f.throttle > 1.0 && step >= f.throttle_from;
            self.slowdown = if slow { f.throttle } else { 1.0 };
        }
    }
    fn is_distributed(&self) -> bool {
        true
    }
    fn barrier(&self) {
        self.world.barrier();
    }

    fn start(&mut self, cfg: &RunConfig, _start_step: u64) -> Result<()> {
        let ranks = self.world.size();
        check_pipeline_layout(cfg, self.pp, ranks)?;
        self.replicas = ranks / self.pp;
        let rank = self.world.rank();
        (self.s, self.d) = (rank % self.pp, rank / self.pp);
        self.stage_comm = self.world.split(self.s);
        self.shares =
            nuwa_core::proportional_shares(cfg.train.batch_size, &vec![1.0; self.replicas], &[]);
        let m = &cfg.model;
        self.hidden = m.hidden_size;
        self.experts = m.num_experts;
        self.top_k = m.num_experts_per_tok;
        self.routers = (0..m.num_hidden_layers)
            .filter(|&l| m.layer_is_moe(l))
            .count();
        self.stage_layers = self.plan_stages(cfg)?;
        self.stage = Stage::of(&self.stage_layers, self.s);
        self.experts_group = expert::group_for(
            &self.stage_comm,
            self.opts.ep,
            self.opts.placement.as_ref(),
            self.opts.ep_split,
            self.opts.memory_of(self.world.rank()),
            Some(&self.stage),
            cfg,
        )?;
        Ok(())
    }

    fn stage(&self) -> Option<Stage> {
        Some(self.stage.clone())
    }

    fn prepare(&mut self, model: LanguageModel, opt: &mut AdamW, device: &Device) -> LanguageModel {
        // A resumed optimiser holds every parameter's moments: keep this stage's.
        let stage = self.stage.clone();
        opt.state.retain(|name, _| stage.owns(name));
        let (owned, mut skip) = stage_param_ids(&model, &self.stage);
        if self.experts_group.is_some() {
            skip.extend(model.expert_param_ids());
        }
        let model = expert::keep_share(model, opt, self.experts_group.as_ref(), device);
        self.stage_experts = model.expert_param_ids();
        self.stage_experts.retain(|id| owned.contains(id));
        (self.owned, self.not_all_reduced) = (owned, skip);
        model
    }

    fn expert_group(&self) -> Option<ExpertGroup> {
        self.experts_group.clone()
    }

    fn shards_model(&self) -> bool {
        true
    }

    fn rows(&self) -> crate::step::Rows {
        let first = self.shares[..self.d].iter().sum();
        // Every micro-batch of the schedule split alike.
        crate::step::Rows::same(first..first + self.shares[self.d], 1, self.replicas > 1)
    }

    fn global_batch(&self, _step: u64) -> Option<crate::step::GlobalBatch<'_>> {
        None
    }

    fn run_step(
        &mut self,
        model: &LanguageModel,
        sampler: &mut BatchSampler,
        data: &TokenShard,
        t: &TrainConfig,
        device: &Device,
    ) -> Option<Result<LocalStep>> {
        let started = Instant::now();
        let rows = self.rows();
        let mut batches = Vec::with_capacity(t.grad_accum);
        for _ in 0..t.grad_accum {
            let batch = match sampler.next_batch(data, t.batch_size, t.seq_len) {
                Ok(b) => b,
                Err(e) => return Some(Err(e)),
            };
            let mine = rows.of(0);
            batches.push(match rows.shared {
                true => batch.rows(mine.start, mine.end),
                false => batch,
            });
        }
        let (grads, totals) = self.run_schedule(model, &batches, t, device);
        let a2a = self
            .experts_group
            .as_ref()
            .map_or(0.0, |g| g.take_exchange_seconds());
        let local = LocalStep {
            grads,
            ce: totals.ce,
            load_balance: (self.routers > 0).then_some(totals.load_balance),
            z_loss: (self.routers > 0).then_some(totals.z_loss),
            mtp_loss: None,
            tokens_per_expert: totals.tokens_per_expert,
            step_load: totals.step_load,
            compute_s: totals.compute_s,
            rows: rows.of(0).len() * t.grad_accum,
        };
        self.last_p2p = (totals.p2p_s, a2a, started.elapsed().as_secs_f64());
        Some(Ok(local))
    }

    fn reduce(
        &mut self,
        step: u64,
        model: &LanguageModel,
        local: LocalStep,
        stop: bool,
    ) -> (GradientsParams, ReducedStep) {
        #[cfg(feature = "fault-injection")]
        self.opts.faults.after_compute(step, self.world.rank());
        let skip = &self.not_all_reduced;
        let started = Instant::now();
        let (mut grads, _) = all_reduce_gradients(
            model,
            local.grads,
            self.stage_comm.as_ref(),
            skip,
            &self.device,
        );
        if let Some(group) = &self.experts_group {
            let ids = &self.stage_experts;
            expert::reduce_expert_grads(model, &mut grads, group, ids, &self.device);
        }
        let comm_s = started.elapsed().as_secs_f64();
        let (p2p_s, a2a_s, schedule_s) = self.last_p2p;
        let mine = [
            local.ce,
            local.load_balance.unwrap_or(0.0),
            local.z_loss.unwrap_or(0.0),
            local.compute_s,
            p2p_s,
            comm_s,
            local.rows as f64,
            stop as u8 as f64,
            a2a_s,
            schedule_s,
            nuwa_core::hardware::peak_rss_bytes().unwrap_or(0) as f64,
            nuwa_core::hardware::rss_before_model().unwrap_or(0) as f64,
        ];
        let all = self.world.all_gather(&mine);
        let col = |i: usize| -> Vec<f64> { all.chunks(mine.len()).map(|c| c[i]).collect() };
        // Tokens per expert of every MoE layer, each from the stage that holds it.
        let expert_load = self.global_load(model, &local.step_load);
        let ranks: Vec<Value> = (0..self.world.size())
            .map(|r| {
                let (compute, p2p, schedule) = (col(3)[r], col(4)[r], col(9)[r]);
                json!({"rank": r, "device": self.opts.devices.get(r),
                       "stage": r % self.pp, "seqs": col(6)[r],
                       "compute_s": compute, "p2p_s": p2p, "comm_s": col(5)[r],
                       "a2a_s": col(8)[r], "peak_rss_bytes": col(10)[r],
                       "rss_before_model_bytes": col(11)[r],
                       "bubble": ((schedule - compute) / schedule.max(1e-9)).max(0.0)})
            })
            .collect();
        let StragglerVerdict {
            stragglers, notes, ..
        } = self.stragglers(step, &col(3));
        let mut metrics = json!({
            "ranks": ranks, "stragglers": stragglers, "compute_s": local.compute_s, "p2p_s": p2p_s,
            "comm_s": comm_s, "stage_layers": self.stage_layers,
        });
        if let Some(group) = &self.experts_group {
            metrics["a2a_s"] = json!(a2a_s);
            metrics["expert_placement"] = json!(group.placement.counts);
            if let Some(columns) = &group.placement.columns {
                metrics["expert_columns"] = json!(columns);
            }
            if let Some(shared) = &group.placement.shared {
                metrics["expert_shared"] = json!(shared.experts);
            }
        }
        let is_moe = self.routers > 0;
        let totals = ReducedStep {
            ce: col(0).iter().sum(),
            load_balance: is_moe.then(|| col(1).iter().sum()),
            z_loss: is_moe.then(|| col(2).iter().sum()),
            mtp_loss: None,
            expert_load,
            stop: col(7).iter().any(|&f| f > 0.0),
            metrics: metrics.as_object().cloned().unwrap_or_default(),
            notes,
        };
        (grads, totals)
    }

    fn grad_norm(&self, model: &LanguageModel, grads: &GradientsParams) -> f64 {
        let leading = self
            .experts_group
            .as_ref()
            .map_or(0, |g| g.placement.leading_shared(g.member()));
        let (dense, experts) = expert::squared_norms(model, grads, leading);
        // Replicated parameters once per stage (replica 0's); every expert once per group.
        let dense = if self.d == 0 { dense } else { 0.0 };
        let expert_copies = match &self.experts_group {
            Some(g) => g.replicas() as f64,
            None => self.replicas as f64,
        };
        let all = self.world.all_gather(&[dense, experts / expert_copies]);
        all.iter().sum::<f64>().sqrt()
    }

    fn host_weights(&self, model: &LanguageModel) -> BTreeMap<String, HostTensor> {
        self.stage_weights(model)
    }

    fn checkpoint_part(&self, weights: Tensors, optimizer: Tensors) -> CheckpointPart {
        // Replica 0 of every stage writes the stage; with expert groups, the first group of
        // each stage writes its experts.
        let writers = self.experts_group.as_ref().map_or(1, |g| g.ep);
        CheckpointPart::Sharded {
            comm: self.world.clone(),
            mine: (self.d < writers).then(|| {
                expert::own_shard(weights, optimizer, self.experts_group.as_ref(), self.d == 0)
            }),
        }
    }

    fn evaluate(&self, model: &LanguageModel, batches: &[Batch], device: &Device) -> Option<f64> {
        let autodiff = device.clone().autodiff();
        let mut total = 0.0;
        for batch in batches {
            let (prev, next) = (
                (!self.stage.first).then(|| self.rank_in_stage(self.s - 1)),
                (!self.stage.last).then(|| self.rank_in_stage(self.s + 1)),
            );
            // Every replica runs them (its expert exchanges need all of the stage); the
            // last stage's replica 0 counts the loss.
            let size = batch.batch_size * batch.seq_len * self.hidden;
            let input = prev.map(|r| self.world.recv(r, size));
            let (tokens, targets) = self.tokens(batch, &autodiff);
            let stage_input = match input {
                None => StageInput::Tokens(tokens),
                Some(v) => StageInput::Hidden(Tensor::from_data(
                    TensorData::new(v, self.shape(batch.batch_size, batch.seq_len)),
                    &autodiff,
                )),
            };
            let (out, _) = model.forward_stage(stage_input, &self.stage);
            let done = match next {
                Some(to) => {
                    self.send(to, out.clone().detach());
                    out.sum()
                }
                None => {
                    let ce = cross_entropy(out, targets);
                    total += ce.clone().into_scalar::<f32>() as f64;
                    ce
                }
            };
            // The parameters are tracked, so the pass left an autodiff graph: a backward
            // consumes it (its gradients are dropped) rather than leaving it held.
            drop(done.backward());
        }
        let last_replica0 = self.stage.last && self.d == 0;
        let mine = if last_replica0 { total } else { 0.0 };
        let sum: f64 = self.world.all_gather(&[mine]).iter().sum();
        Some(sum / batches.len().max(1) as f64)
    }
}

impl Pipeline {
    /// Every MoE layer's tokens per expert over the step, summed over the replicas of the
    /// stage that holds it (zeros from the others), in the model's layer order.
    fn global_load(&self, model: &LanguageModel, local: &[Vec<usize>]) -> Vec<Vec<f64>> {
        let moe_layers: Vec<usize> = (0..model.layers.len())
            .filter(|&l| model.layers[l].moe.is_some())
            .collect();
        if moe_layers.is_empty() {
            return Vec::new();
        }
        let e = self.experts;
        let mut counts = vec![0.0f32; moe_layers.len() * e];
        let mut mine = local.iter();
        for (slot, &l) in moe_layers.iter().enumerate() {
            if self.stage.layers.contains(&l) {
                if let Some(c) = mine.next() {
                    for (x, &n) in counts[slot * e..(slot + 1) * e].iter_mut().zip(c) {
                        *x = n as f32;
                    }
                }
            }
        }
        self.world.all_reduce_sum(&mut counts);
        counts
            .chunks(e)
            .map(|c| c.iter().map(|&x| x as f64).collect())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faster_stages_take_more_layers() {
        assert_eq!(split_layers(4, &[1.0, 1.0], 0.0, &[]), [2, 2]);
        assert_eq!(split_layers(8, &[3.0, 1.0], 0.0, &[]), [6, 2]);
        // The head's work on the last stage moves a layer off it.
        assert_eq!(split_layers(4, &[1.0, 1.0], 1.0, &[]), [3, 1]);
        // Memory bounds a stage however fast it is.
        assert_eq!(split_layers(8, &[3.0, 1.0], 0.0, &[4, 8]), [4, 4]);
        assert_eq!(split_layers(3, &[1.0, 1.0, 1.0], 5.0, &[]), [1, 1, 1]);
    }
}
