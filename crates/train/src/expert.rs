//! Expert parallelism's side of a training step (the exchange itself is in
//! `nuwa_model::expert_parallel`): each rank holds a slice of every MoE layer's routed experts,
//! so their gradients, their share of the gradient norm, their optimiser moments and their
//! checkpoints are handled apart from the replicated parameters.
//!
//! In a checkpoint each rank of the first expert group writes its own slices, with where they
//! lie in the whole stacked tensors (`nuwa_run::sharded`); loading assembles them whole, so it
//! loads on any number of ranks and any placement (resharding is slicing what was assembled),
//! and exports to one HF folder as a single process's would.

use crate::optim::AdamW;
use crate::parallel::Collective;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use nuwa_model::expert_parallel::{
    is_routed_expert, moe_path, reorder_experts, ExpertGroup, ExpertSplit,
};
use nuwa_model::weights::HostTensor;
use nuwa_model::LanguageModel;
use nuwa_model::TRAIN_BYTES_PER_PARAM;
use nuwa_run::sharded::{Part, Shard};
use std::collections::{BTreeMap, HashSet};

/// Every rank's parts of the routed-expert tensor `name` summed into the whole tensor;
/// `contribute` says whether this rank's part counts (one replica of each expert must, the
/// others add zeros).
fn gather_whole(group: &ExpertGroup, name: &str, part: &[f32], contribute: bool) -> Vec<f32> {
    let (len, runs) = group.placement.runs(group.member(), name, part.len());
    let mut whole = vec![0.0f32; len];
    if contribute {
        runs.put(part, &mut whole);
    }
    group.comm.all_reduce_sum(&mut whole);
    whole
}

/// How many of the first values of this rank's slice (`len` values: a stacked expert tensor
/// or its flat moments, expert after expert) are experts it shares with the member before.
fn leading_values(group: &ExpertGroup, len: usize) -> usize {
    let leading = group.placement.leading_shared(group.member());
    len / group.local_experts().len().max(1) * leading
}

/// Replaces this rank's expert slices in `tensors` (weights `[local, ..]` or flat optimiser
/// moments) with whole tensors gathered from their owners. Collective: every rank calls it
/// with the same names.
pub fn gather_experts(tensors: &mut BTreeMap<String, HostTensor>, group: &ExpertGroup) {
    let first_replica = group.comm.rank() < group.ep;
    for (name, t) in tensors.iter_mut() {
        if !is_routed_expert(name) {
            continue;
        }
        // Experts shared with the member before come from it (the two copies are equal).
        let skip = leading_values(group, t.data.len());
        t.data[..skip].fill(0.0);
        let whole = gather_whole(group, name, &t.data, first_replica);
        let shape = group.placement.whole_shape(group.member(), name, &t.shape);
        *t = HostTensor { shape, data: whole };
    }
}

/// This rank's part of a sharded checkpoint: its expert slices (weights `[local, ..]`, flat
/// optimiser moments), each with where it lies in the whole tensor, and — when
/// `with_replicated`, on the one rank that writes them — every other parameter it holds.
pub fn own_shard(
    weights: BTreeMap<String, HostTensor>,
    optimizer: BTreeMap<String, HostTensor>,
    group: Option<&ExpertGroup>,
    with_replicated: bool,
) -> Shard {
    let mut shard = Shard::default();
    for (into_weights, tensors) in [(true, weights), (false, optimizer)] {
        for (name, t) in tensors {
            let sliced = group.filter(|_| is_routed_expert(&name));
            let mut t = t;
            match sliced {
                Some(group) => {
                    let (p, m) = (&group.placement, group.member());
                    let (_, runs) = p.runs(m, &name, t.data.len());
                    let mut part = Part {
                        shape: p.whole_shape(m, &name, &t.shape),
                        offset: runs.offset,
                        runs: (runs.count > 1).then_some([runs.stride, runs.count]),
                    };
                    // Experts shared with the member before are written by it.
                    let leading = p.leading_shared(m);
                    if leading >= group.local_experts().len() {
                        continue; // all shared with the member before, which writes them
                    }
                    if leading > 0 {
                        let skip = leading_values(group, t.data.len());
                        t.data.drain(..skip);
                        t.shape[0] = match t.shape.len() {
                            1 => t.data.len(),
                            _ => t.shape[0] - leading,
                        };
                        part.offset += skip;
                    }
                    shard.parts.insert(name.clone(), part);
                }
                None if !with_replicated => continue,
                None => {}
            }
            let into = if into_weights {
                &mut shard.weights
            } else {
                &mut shard.optimizer
            };
            into.insert(name, t);
        }
    }
    shard
}

/// This rank's slices of whole expert tensors (the inverse of [`gather_experts`]).
pub fn slice_experts(
    tensors: &BTreeMap<String, HostTensor>,
    group: &ExpertGroup,
) -> BTreeMap<String, HostTensor> {
    let (p, m) = (&group.placement, group.member());
    tensors
        .iter()
        .filter(|(name, _)| is_routed_expert(name))
        .map(|(name, t)| {
            let (_, runs) = p.runs(m, name, p.part_len(m, name, t.data.len()));
            let data = runs.take(&t.data);
            let shape = p.part_shape(m, name, &t.shape);
            (name.clone(), HostTensor { shape, data })
        })
        .collect()
}

/// Keeps of the optimiser's whole expert moments (as a checkpoint restores them) only this
/// rank's slices.
pub fn slice_optimizer(opt: &mut AdamW, group: &ExpertGroup, device: &Device) {
    let moments = opt.to_host();
    let sliced = slice_experts(&moments, group);
    apply_moments(opt, &sliced, device);
}

/// Sets the named moments (`PARAM.exp_avg`, `PARAM.exp_avg_sq`) of `opt`.
fn apply_moments(opt: &mut AdamW, tensors: &BTreeMap<String, HostTensor>, device: &Device) {
    let flat = |t: &HostTensor| {
        Tensor::<1>::from_data(TensorData::new(t.data.clone(), [t.data.len()]), device)
    };
    for (name, t) in tensors {
        if let Some(param) = name.strip_suffix(".exp_avg") {
            if let Some(m) = opt.state.get_mut(param) {
                m.exp_avg = flat(t);
            }
        } else if let Some(param) = name.strip_suffix(".exp_avg_sq") {
            if let Some(m) = opt.state.get_mut(param) {
                m.exp_avg_sq = flat(t);
            }
        }
    }
}

/// Each MoE layer's expert order over the slots (`None`: slot `p` holds expert `p`), in
/// `moe_layers` order.
pub type Orders = Vec<Option<Vec<usize>>>;

/// The index among `paths` (`moe_paths`) of the MoE layer a routed-expert tensor's name (or
/// its moments') belongs to.
fn layer_of(name: &str, paths: &[String]) -> Option<usize> {
    moe_path(name).and_then(|p| paths.iter().position(|q| q == p))
}

/// `order`, or the slots in expert order.
fn or_identity(order: Option<&Vec<usize>>, experts: usize) -> Vec<usize> {
    order.cloned().unwrap_or_else(|| (0..experts).collect())
}

/// Whole expert tensors (as [`gather_experts`] leaves them) re-laid from the layers' slot
/// orders `from` to `to`; `paths` names the layers (`moe_paths`).
fn reorder_whole(
    tensors: &mut BTreeMap<String, HostTensor>,
    paths: &[String],
    experts: usize,
    (from, to): (&Orders, &Orders),
) {
    for (name, t) in tensors.iter_mut() {
        let Some(l) = layer_of(name, paths) else {
            continue;
        };
        let (a, b) = (
            from.get(l).and_then(Option::as_ref),
            to.get(l).and_then(Option::as_ref),
        );
        if a != b {
            let (a, b) = (or_identity(a, experts), or_identity(b, experts));
            t.data = reorder_experts(&t.data, &a, &b);
        }
    }
}

/// Moves the experts to a new placement and the layers to new slot orders (`orders`, in
/// `moe_layers` order): the whole weights and moments of every layer that moves gathered from
/// their holders, re-laid, and each rank keeps its new slices. Collective; every rank asks
/// for the same.
pub fn replace_experts(
    model: LanguageModel,
    opt: &mut AdamW,
    new: &ExpertGroup,
    orders: &Orders,
    device: &Device,
) -> LanguageModel {
    let Some(old) = model.expert_group().cloned() else {
        return model;
    };
    let (p, q) = (&old.placement, &new.placement);
    let same_slots =
        p.counts == q.counts && p.columns == q.columns && p.shared_experts() == q.shared_experts();
    let paths = model.moe_paths();
    let current: Orders = model.moe_layers().map(|m| m.expert_order.clone()).collect();
    let orders: Orders = (0..paths.len())
        .map(|l| orders.get(l).cloned().flatten())
        .collect();
    // Every layer moves when the slots do; else only those whose order changes. (When only
    // the shared rows' weights change, every rank keeps what it holds.)
    let moves: Vec<usize> = (0..paths.len())
        .filter(|&l| !same_slots || current[l] != orders[l])
        .collect();
    let moving = |name: &str| {
        is_routed_expert(name) && layer_of(name, &paths).is_some_and(|l| moves.contains(&l))
    };
    let mut model = model;
    if same_slots && p.columns.is_none() {
        // Only orders change: each member receives just the experts it did not hold.
        let experts = q.experts();
        for &l in &moves {
            let (from, to) = (
                or_identity(current[l].as_ref(), experts),
                or_identity(orders[l].as_ref(), experts),
            );
            let plan = slot_moves(&old, &from, &to);
            model = move_layer_slots(model, l, &paths[l], &plan, opt, old.comm.as_ref());
        }
    } else if !moves.is_empty() {
        let mut weights = nuwa_model::weights::collect_weights_where(&model, moving);
        // Moments are named by their parameter.
        let mut moments = opt.to_host_where(|param| moving(&format!("{param}.exp_avg")));
        gather_experts(&mut weights, &old);
        gather_experts(&mut moments, &old);
        let experts = q.experts();
        reorder_whole(&mut weights, &paths, experts, (&current, &orders));
        reorder_whole(&mut moments, &paths, experts, (&current, &orders));
        model = nuwa_model::weights::replace_weights(model, &slice_experts(&weights, new));
        apply_moments(opt, &slice_experts(&moments, new), device);
    }
    for moe in model.moe_layers_mut() {
        moe.expert_group = Some(new.clone());
    }
    model.set_expert_orders(&orders);
    model
}

/// How one layer's experts move within each group when only its slot order changes (the
/// placement stays): the old local slots this member sends each world rank (in expert
/// order), the experts it receives from each, and where each of its new slots comes from —
/// `Ok(old local slot)` kept, `Err(k)` the `k`-th expert received.
struct SlotMoves {
    send: Vec<Vec<usize>>,
    recv: Vec<usize>,
    from: Vec<Result<usize, usize>>,
}

/// [`SlotMoves`] from slot order `old` to `new` under `group`'s placement. Each expert a
/// member lacks comes from the first member that held it.
fn slot_moves(group: &ExpertGroup, old: &[usize], new: &[usize]) -> SlotMoves {
    let p = &group.placement;
    let (me, world) = (group.member(), group.comm.size());
    let first = group.comm.rank() - me;
    let held = |m: usize, order: &[usize]| -> Vec<usize> { p.range(m).map(|s| order[s]).collect() };
    let sender = |e: usize| (0..group.ep).find(|&m| held(m, old).contains(&e));
    let missing = |d: usize| -> Vec<usize> {
        let had = held(d, old);
        let mut lacking: Vec<usize> = held(d, new)
            .into_iter()
            .filter(|e| !had.contains(e))
            .collect();
        lacking.sort_unstable();
        lacking
    };
    let mine = held(me, old);
    let (mut send, mut recv) = (vec![Vec::new(); world], vec![0; world]);
    for d in (0..group.ep).filter(|&d| d != me) {
        for e in missing(d).into_iter().filter(|&e| sender(e) == Some(me)) {
            send[first + d].extend(mine.iter().position(|&x| x == e));
        }
    }
    // Received source after source, each source's in expert order.
    let lacking = missing(me);
    let mut received = Vec::new();
    for s in 0..group.ep {
        let from_s: Vec<usize> = lacking
            .iter()
            .copied()
            .filter(|&e| sender(e) == Some(s))
            .collect();
        recv[first + s] = from_s.len();
        received.extend(from_s);
    }
    let from = held(me, new)
        .iter()
        .map(|e| match mine.iter().position(|x| x == e) {
            Some(slot) => Ok(slot),
            None => Err(received.iter().position(|x| x == e).unwrap_or(0)),
        })
        .collect();
    SlotMoves { send, recv, from }
}

/// The rows (one per local expert slot) of `t` `[slots, per]` as `plan` lays them. Collective.
fn move_rows(t: Tensor<2>, plan: &SlotMoves, comm: &dyn Collective) -> Tensor<2> {
    let [slots, per] = t.dims();
    let device = t.device();
    let world = plan.send.len();
    let (mut values, mut counts, mut at) = (Vec::new(), vec![0; world], vec![0; world]);
    for (r, rows) in plan.send.iter().enumerate() {
        at[r] = values.len();
        for &row in rows {
            values.extend(t.clone().narrow(0, row, 1).into_data().iter::<f32>());
        }
        counts[r] = rows.len() * per;
    }
    let recv_counts: Vec<usize> = plan.recv.iter().map(|n| n * per).collect();
    let mut received = vec![0.0f32; recv_counts.iter().sum()];
    comm.all_to_all_v(&values, (&counts, &at), &recv_counts, &mut received);
    let index: Vec<i64> = plan
        .from
        .iter()
        .map(|f| match f {
            Ok(slot) => *slot as i64,
            Err(k) => (slots + k) as i64,
        })
        .collect();
    let rows = received.len() / per.max(1);
    let all = match rows {
        0 => t,
        _ => Tensor::cat(
            vec![
                t,
                Tensor::from_data(TensorData::new(received, [rows, per]), &device),
            ],
            0,
        ),
    };
    let n = index.len();
    all.select(0, Tensor::from_data(TensorData::new(index, [n]), &device))
}

/// Moves MoE layer `l` (at `path`)'s expert weights and moments by `plan`. Collective.
fn move_layer_slots(
    mut model: LanguageModel,
    l: usize,
    path: &str,
    plan: &SlotMoves,
    opt: &mut AdamW,
    comm: &dyn Collective,
) -> LanguageModel {
    let Some(moe) = model.moe_layers_mut().nth(l) else {
        return model;
    };
    let moved = |p: Param<Tensor<3>>| {
        p.map(|t| {
            let tracked = t.is_require_grad();
            let [slots, a, b] = t.dims();
            let out = move_rows(t.detach().reshape([slots, a * b]), plan, comm);
            let out = out.reshape([slots, a, b]).detach();
            if tracked {
                out.require_grad()
            } else {
                out
            }
        })
    };
    let e = &mut moe.experts;
    e.gate_proj = moved(e.gate_proj.clone());
    e.up_proj = moved(e.up_proj.clone());
    e.down_proj = moved(e.down_proj.clone());
    for w in ["gate_proj", "up_proj", "down_proj"] {
        let Some(m) = opt.state.get_mut(&format!("{path}.experts.{w}")) else {
            continue;
        };
        // The placement stays: as many slots before as after.
        let slots = plan.from.len();
        let rows = |t: &Tensor<1>| {
            let per = t.dims()[0] / slots.max(1);
            move_rows(t.clone().reshape([slots, per]), plan, comm).reshape([slots * per])
        };
        m.exp_avg = rows(&m.exp_avg);
        m.exp_avg_sq = rows(&m.exp_avg_sq);
    }
    model
}

/// Host weights or moments of a model whose layers lie in their own slot orders (`orders`)
/// as they would lie in expert order: what a checkpoint writes, so that any layout loads it.
/// Collective (every rank, the same names).
pub fn in_expert_order(
    tensors: BTreeMap<String, HostTensor>,
    group: &ExpertGroup,
    paths: &[String],
    orders: &Orders,
) -> BTreeMap<String, HostTensor> {
    if orders.iter().all(Option::is_none) {
        return tensors;
    }
    let reordered = |name: &String| {
        let layer = layer_of(name, paths);
        is_routed_expert(name) && layer.is_some_and(|l| orders.get(l).is_some_and(Option::is_some))
    };
    let (mut experts, rest): (BTreeMap<_, _>, BTreeMap<_, _>) =
        tensors.into_iter().partition(|(n, _)| reordered(n));
    gather_experts(&mut experts, group);
    let identity: Orders = vec![None; orders.len()];
    reorder_whole(
        &mut experts,
        paths,
        group.placement.experts(),
        (orders, &identity),
    );
    let mut out = slice_experts(&experts, group);
    out.extend(rest);
    out
}

struct TakeExperts<'a> {
    ids: &'a HashSet<ParamId>,
    grads: &'a mut GradientsParams,
    out: Vec<(ParamId, Vec<usize>, Vec<f32>)>,
}

/// The ids of the routed experts' down projections (the others are gate and up).
fn down_ids(model: &LanguageModel) -> HashSet<ParamId> {
    model.moe_layers().map(|m| m.experts.down_proj.id).collect()
}

impl ModuleVisitor for TakeExperts<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.ids.contains(&param.id) {
            return;
        }
        let shape = param.lazy_shape().to_vec();
        let data = match self.grads.remove::<D>(param.id) {
            Some(g) => g.into_data().iter::<f32>().collect(),
            None => vec![0.0; shape.iter().product()],
        };
        self.out.push((param.id, shape, data));
    }
}

/// Gives the expert slices without a gradient a zero one. A rank whose experts received no
/// rows this step has none (they were not on its graph), where one process has zeros (its
/// stacked tensor always has a gradient), and AdamW still moves them by their moments.
fn zero_missing(
    model: &LanguageModel,
    grads: &mut GradientsParams,
    ids: &HashSet<ParamId>,
    device: &Device,
) {
    struct Zeros<'a> {
        ids: &'a HashSet<ParamId>,
        grads: &'a mut GradientsParams,
        device: &'a Device,
    }
    impl ModuleVisitor for Zeros<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.ids.contains(&param.id) && self.grads.get::<D>(param.id).is_none() {
                let shape: [usize; D] = std::array::from_fn(|i| param.lazy_shape()[i]);
                let zeros = Tensor::<D>::zeros(shape, self.device);
                self.grads.register::<D>(param.id, zeros);
            }
        }
    }
    model.visit(&mut Zeros { ids, grads, device });
}

/// Sums the expert gradients of the groups that hold the same experts (each group computed
/// them on its own tokens). Nothing to do with one group. `ids`: the routed-expert parameters
/// this process holds — a pipeline stage's model also has the other stages' layers,
/// never allocated, which must get no gradient (AdamW would then give them moments, and the
/// stage's checkpoint shard would claim experts another stage writes).
pub fn reduce_expert_grads(
    model: &LanguageModel,
    grads: &mut GradientsParams,
    group: &ExpertGroup,
    ids: &HashSet<ParamId>,
    device: &Device,
) {
    if group.replicas() == 1 {
        zero_missing(model, grads, ids, device);
        sum_shared_grads(model, grads, group, ids, device);
        return;
    }
    let mut take = TakeExperts {
        ids,
        grads,
        out: Vec::new(),
    };
    model.visit(&mut take);
    let down = down_ids(model);
    for (id, shape, data) in take.out {
        let name = if down.contains(&id) {
            "down_proj"
        } else {
            "gate_proj"
        };
        let whole = gather_whole(group, name, &data, true);
        let (_, runs) = group.placement.runs(group.member(), name, data.len());
        let sum = TensorData::new(runs.take(&whole), shape);
        match sum.shape().len() {
            3 => grads.register::<3>(id, Tensor::from_data(sum, device)),
            _ => grads.register::<2>(id, Tensor::from_data(sum, device)),
        }
    }
}

/// Shared boundary experts (one expert group): each holder's gradient of a shared expert is
/// from the rows it ran; the two are summed, so both holders step alike. Every shared
/// expert's slice of every routed-expert gradient goes in one all-reduce, each window at its
/// own place (the others add zeros). Collective within the group.
fn sum_shared_grads(
    model: &LanguageModel,
    grads: &mut GradientsParams,
    group: &ExpertGroup,
    ids: &HashSet<ParamId>,
    device: &Device,
) {
    let p = &group.placement;
    let windows = p.shared_experts();
    let shared: usize = windows.iter().sum();
    if shared == 0 {
        return;
    }
    struct Shapes<'a> {
        ids: &'a HashSet<ParamId>,
        out: Vec<(ParamId, [usize; 3])>,
    }
    impl ModuleVisitor for Shapes<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let shape = param.lazy_shape();
            if self.ids.contains(&param.id) && D == 3 {
                self.out.push((param.id, [shape[0], shape[1], shape[2]]));
            }
        }
    }
    let mut shapes = Shapes {
        ids,
        out: Vec::new(),
    };
    model.visit(&mut shapes);
    let me = group.member();
    // This member's shared experts: (first local expert, how many, window).
    let mut mine = Vec::new();
    if me > 0 && windows[me - 1] > 0 {
        mine.push((0, windows[me - 1], me - 1));
    }
    if let Some(&k) = windows.get(me).filter(|&&k| k > 0) {
        mine.push((group.local_experts().len() - k, k, me));
    }
    let before = |w: usize| windows[..w].iter().sum::<usize>();
    let mut sums = Vec::new();
    let mut at = Vec::new();
    for &(id, [local, a, b]) in &shapes.out {
        let per = a * b;
        let base = sums.len();
        sums.resize(base + shared * per, 0.0f32);
        let Some(g) = grads.get::<3>(id) else {
            continue;
        };
        debug_assert_eq!(g.dims()[0], local);
        for &(start, k, w) in &mine {
            let values = g.clone().narrow(0, start, k).into_data();
            let into = base + before(w) * per;
            for (s, v) in sums[into..into + k * per]
                .iter_mut()
                .zip(values.iter::<f32>())
            {
                *s = v;
            }
        }
        at.push((id, [a, b], base));
    }
    group.comm.all_reduce_sum(&mut sums);
    for (id, [a, b], base) in at {
        let Some(mut g) = grads.remove::<3>(id) else {
            continue;
        };
        for &(start, k, w) in &mine {
            let from = base + before(w) * a * b;
            let data = TensorData::new(sums[from..from + k * a * b].to_vec(), [k, a, b]);
            g = g.slice_assign(
                [start..start + k, 0..a, 0..b],
                Tensor::from_data(data, device),
            );
        }
        grads.register::<3>(id, g);
    }
}

/// The squared gradient norms of the replicated parameters and of the routed expert slices
/// this process holds, each summed on the device and read once. The first `leading` experts
/// of each slice are left out (shared with the member before, which counts them).
pub fn squared_norms(model: &LanguageModel, grads: &GradientsParams, leading: usize) -> (f64, f64) {
    struct Squares<'a> {
        ids: HashSet<ParamId>,
        grads: &'a GradientsParams,
        leading: usize,
        dense: Vec<Tensor<1>>,
        experts: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for Squares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                match self.ids.contains(&param.id) {
                    true => {
                        let n = g.dims()[0];
                        match self.leading {
                            0 => self.experts.push(g.powi_scalar(2).sum()),
                            skip if skip < n => {
                                let rest = g.narrow(0, skip, n - skip);
                                self.experts.push(rest.powi_scalar(2).sum());
                            }
                            _ => {} // all shared with the member before
                        }
                    }
                    false => self.dense.push(g.powi_scalar(2).sum()),
                }
            }
        }
    }
    let mut v = Squares {
        ids: model.expert_param_ids(),
        grads,
        leading,
        dense: Vec::new(),
        experts: Vec::new(),
    };
    model.visit(&mut v);
    let total = |parts: Vec<Tensor<1>>| match parts.is_empty() {
        true => 0.0,
        false => Tensor::cat(parts, 0).sum().into_scalar::<f32>() as f64,
    };
    (total(v.dense), total(v.experts))
}

/// The whole model's gradient norm: the replicated parameters' part (the same on every rank)
/// plus every expert's once (each group holds each expert).
pub fn grad_norm(model: &LanguageModel, grads: &GradientsParams, group: &ExpertGroup) -> f64 {
    let leading = group.placement.leading_shared(group.member());
    let (dense, experts) = squared_norms(model, grads, leading);
    let experts: f64 = group.comm.all_gather(&[experts]).iter().sum();
    (dense + experts / group.replicas() as f64).sqrt()
}

/// The expert-parallel group a layout asks for: `ep` ranks of `comm` per group (`None` for
/// one), each member with its share of the experts — the plan's, or an equal one. `stage`:
/// the pipeline stage the group's ranks hold (`None`: the whole model), whose layers alone
/// count against each member's `memory`.
pub fn group_for(
    comm: &std::sync::Arc<dyn crate::parallel::Collective>,
    ep: usize,
    placement: Option<&Vec<usize>>,
    split: ExpertSplit,
    memory: Option<f64>,
    stage: Option<&nuwa_model::stage::Stage>,
    cfg: &nuwa_run::RunConfig,
) -> anyhow::Result<Option<ExpertGroup>> {
    use nuwa_model::expert_parallel::Placement;
    let by_width = split == ExpertSplit::Width;
    if ep <= 1 {
        return Ok(None);
    }
    let m = &cfg.model;
    if !m.is_moe() {
        anyhow::bail!("--ep {ep}: expert parallelism needs a MoE model (this one is dense)");
    }
    crate::strategy::check_expert_layout(ep, comm.size(), m.num_experts, cfg.train.batch_size)
        .map_err(|e| match stage {
            Some(_) => anyhow::anyhow!(
                "{e} (under pipeline parallelism each stage's ranks form its own expert groups)"
            ),
            None => e,
        })?;
    let whole = nuwa_model::stage::Stage::of(&[m.num_hidden_layers], 0);
    let caps = member_caps(
        comm.as_ref(),
        ep,
        memory,
        m,
        by_width,
        stage.unwrap_or(&whole),
    )?;
    let placement = match (placement, by_width) {
        (Some(_), true) => anyhow::bail!(
            "--ep-split width: the plan's layout.expert_placement counts whole experts per rank; \
             drop one of the two"
        ),
        (Some(counts), false) => {
            let fixed = Placement {
                counts: counts.clone(),
                columns: None,
                shared: None,
            };
            if !fixed.within(&caps) {
                anyhow::bail!(
                    "layout.expert_placement {counts:?}: more experts than a member's memory \
                     holds (at most {} per member)",
                    caps.iter()
                        .map(|c| c.map_or("any".into(), |c| c.to_string()))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            fixed
        }
        (None, true) => {
            let width = m.moe_intermediate_size;
            if width < ep {
                anyhow::bail!(
                    "--ep {ep} --ep-split width: moe_intermediate_size {width} has fewer columns \
                     than the group has ranks"
                );
            }
            Placement::by_width_within(m.num_experts, width, &vec![1.0; ep], &caps)
        }
        (None, false) if split == ExpertSplit::Shared => {
            let k = nuwa_model::expert_parallel::shared_per_boundary(m.num_experts, ep);
            Placement::shared_within(m.num_experts, &vec![1.0; ep], k, &caps)
        }
        (None, false) => Placement::proportional_within(m.num_experts, &vec![1.0; ep], &caps),
    };
    Ok(Some(
        ExpertGroup::new(comm.clone(), ep, placement).with_member_caps(caps),
    ))
}

/// `bytes` to four significant digits in the unit that suits them.
pub(crate) fn fmt_bytes(bytes: f64) -> String {
    let (value, unit) = match bytes {
        b if b >= 1e9 => (b / 1e9, "GB"),
        b if b >= 1e6 => (b / 1e6, "MB"),
        b => (b / 1e3, "kB"),
    };
    let decimals = 3usize.saturating_sub(value.abs().log10().floor().max(0.0) as usize);
    format!("{value:.decimals$} {unit}")
}

/// Share of a rank's memory its parameters may fill (the rest: activations, buffers).
const PARAMETER_SHARE: f64 = 0.8;

/// Most experts (split by width: columns of every expert) each member of an `ep` group may
/// hold: what the smallest memory among its replicas (`memory` is this rank's:
/// [`crate::parallel::DistOptions::memory_of`]) leaves after the dense parameters — of the
/// pipeline `stage` the group holds: its layers' experts, its dense parameters.
/// `None` where nothing bounds it. Fails, naming the rank, when a memory does not hold the
/// dense parameters and one expert, or the group's memories cannot hold every expert.
fn member_caps(
    comm: &dyn crate::parallel::Collective,
    ep: usize,
    memory: Option<f64>,
    m: &nuwa_model::ModelConfig,
    by_width: bool,
    stage: &nuwa_model::stage::Stage,
) -> anyhow::Result<Vec<Option<usize>>> {
    let all = comm.all_gather(&[memory.unwrap_or(f64::INFINITY)]);
    let mtp = if stage.last {
        m.num_nextn_predict_layers
    } else {
        0
    };
    let moe_layers = stage.layers.clone().filter(|&l| m.layer_is_moe(l)).count() + mtp;
    let per_expert = (3 * m.hidden_size * m.moe_intermediate_size * moe_layers) as f64;
    let held = m.stage_params(stage.layers.clone(), stage.first, stage.last) as f64;
    let dense = held - per_expert * m.num_experts as f64;
    let (unit, units, what) = match by_width {
        true => (
            per_expert * m.num_experts as f64 / m.moe_intermediate_size.max(1) as f64,
            m.moe_intermediate_size,
            "expert column",
        ),
        false => (per_expert, m.num_experts, "expert"),
    };
    let mut caps: Vec<Option<usize>> = vec![None; ep];
    for (rank, &bytes) in all.iter().enumerate() {
        if !bytes.is_finite() {
            continue;
        }
        let room = bytes * PARAMETER_SHARE / TRAIN_BYTES_PER_PARAM - dense;
        let fits = (room / unit.max(1.0)).floor().max(0.0) as usize;
        if fits == 0 {
            anyhow::bail!(
                "--ep {ep}: rank {rank}'s memory ({}) does not hold the dense parameters and one \
                 {what} in {:.0}% of it: they take {} and {} with gradients and optimiser state",
                fmt_bytes(bytes),
                PARAMETER_SHARE * 100.0,
                fmt_bytes(dense * TRAIN_BYTES_PER_PARAM),
                fmt_bytes(unit * TRAIN_BYTES_PER_PARAM)
            );
        }
        let cap = &mut caps[rank % ep];
        *cap = Some(cap.map_or(fits, |c| c.min(fits)));
    }
    if caps.iter().all(Option::is_some) {
        let held: usize = caps.iter().flatten().sum();
        if held < units {
            anyhow::bail!(
                "--ep {ep}: the group's memories hold {held} of the model's {units} {what}s \
                 (memory_gb in the cluster file, or the host's available memory): use more \
                 ranks per group"
            );
        }
    }
    Ok(caps)
}

/// A model holding only `group`'s share of the experts (cut down now unless it was built
/// so), and an optimiser holding only their moments.
pub fn keep_share(
    model: LanguageModel,
    opt: &mut AdamW,
    group: Option<&ExpertGroup>,
    device: &Device,
) -> LanguageModel {
    let Some(group) = group else {
        return model;
    };
    slice_optimizer(opt, group, device);
    match model.expert_group() {
        Some(_) => model,
        None => model.shard_experts(group),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nuwa_model::expert_parallel::Placement;
    use nuwa_model::stage::Stage;
    use std::sync::Arc;

    /// Rank `r` of `size`, for planning only: no collective is called.
    struct Planning(usize, usize);
    impl Collective for Planning {
        fn rank(&self) -> usize {
            self.0
        }
        fn size(&self) -> usize {
            self.1
        }
        fn all_reduce_sum(&self, _: &mut [f32]) {
            unreachable!()
        }
        fn all_gather(&self, _: &[f64]) -> Vec<f64> {
            unreachable!()
        }
        fn barrier(&self) {}
        fn all_to_all_v(&self, _: &[f32], _: (&[usize], &[usize]), _: &[usize], _: &mut [f32]) {
            unreachable!()
        }
        fn split(&self, _: usize) -> Arc<dyn Collective> {
            unreachable!()
        }
        fn send(&self, _: usize, _: &[f32]) {
            unreachable!()
        }
        fn recv(&self, _: usize, _: usize) -> Vec<f32> {
            unreachable!()
        }
        fn send_recv(&self, _: usize, _: &[f32], _: usize, _: usize) -> Vec<f32> {
            unreachable!()
        }
    }

    #[test]
    fn a_new_expert_order_sends_each_member_only_the_experts_it_lacked() {
        // Two groups (DP 2 × EP 2) of members holding slots 0..6 and 4..8 (4 and 5 shared).
        let p = Placement::shared_within(8, &[2.0, 1.0], 2, &[]);
        let old: Vec<usize> = (0..8).collect();
        let new = vec![0, 1, 2, 4, 3, 6, 5, 7];
        let plans: Vec<SlotMoves> = (0..4)
            .map(|r| {
                let group = ExpertGroup::new(Arc::new(Planning(r, 4)), 2, p.clone());
                slot_moves(&group, &old, &new)
            })
            .collect();
        // Carry it out: every rank's rows are its old slots' experts.
        let held = |r: usize, order: &[usize]| -> Vec<usize> {
            p.range(r % 2).map(|s| order[s]).collect()
        };
        for (r, plan) in plans.iter().enumerate() {
            let mut received = Vec::new();
            for (src, n) in plan.recv.iter().enumerate() {
                let sent = &plans[src].send[r];
                assert_eq!(sent.len(), *n, "rank {src} -> {r}");
                received.extend(sent.iter().map(|&slot| held(src, &old)[slot]));
            }
            let got: Vec<usize> = plan
                .from
                .iter()
                .map(|f| match f {
                    Ok(slot) => held(r, &old)[*slot],
                    Err(k) => received[*k],
                })
                .collect();
            assert_eq!(got, held(r, &new), "rank {r}");
            // Experts 3 and 6 trade places: member 0 lacked 6 (now shared), member 1 lacked 3;
            // one expert each, from the other member of its own group.
            let moved: usize = plan.recv.iter().sum();
            assert_eq!(moved, 1, "rank {r}");
            assert!(
                plan.send[r].is_empty() && plan.recv[r] == 0,
                "never to itself"
            );
            let other_group = if r < 2 { 2..4 } else { 0..2 };
            assert!(other_group
                .clone()
                .all(|o| plan.send[o].is_empty() && plan.recv[o] == 0));
        }
    }

    #[test]
    fn a_pipeline_stage_counts_only_its_own_layers_experts_against_memory() {
        let mut m = nuwa_model::ModelConfig::preset("tiny-moe").unwrap();
        m.num_hidden_layers = 4;
        let whole = Stage::of(&[4], 0);
        // Layers 0 (dense) and 1 (MoE), then the two MoE layers 2 and 3.
        let first = Stage::of(&[2, 2], 0);
        let last = Stage::of(&[2, 2], 1);
        // The stages' parameters make up the model's (the tiny model's head is not tied).
        let params = |s: &Stage| m.stage_params(s.layers.clone(), s.first, s.last);
        assert_eq!(params(&first) + params(&last), m.counts(1).total_params);
        // A memory that holds the whole model's dense part and exactly 3 of its experts.
        let expert = (3 * m.hidden_size * m.moe_intermediate_size) as f64;
        let dense = m.counts(1).total_params as f64 - 3.0 * expert * m.num_experts as f64;
        let bytes = (dense + 3.5 * 3.0 * expert) * TRAIN_BYTES_PER_PARAM / PARAMETER_SHARE;
        let solo = nuwa_core::comm::SoloCollective;
        let cap = |s: &Stage| member_caps(&solo, 1, Some(bytes), &m, false, s).map(|c| c[0]);
        let whole_cap = cap(&whole).unwrap_err().to_string();
        assert!(
            whole_cap.contains("hold 3 of the model's 8 experts"),
            "{whole_cap}"
        );
        // A stage's experts span fewer layers (the last stage's two of three: at least
        // 3.5 × 3 / 2 of them fit, more beside its smaller dense part); the first stage's,
        // one layer: more still.
        let last_cap = cap(&last).unwrap().unwrap();
        assert!(last_cap >= 5, "{last_cap}");
        assert!(cap(&first).unwrap().unwrap() > last_cap);
    }
}
