//! Expert parallelism: the routed experts of every MoE layer split across the members of an
//! expert-parallel (EP) group, each token sent to the ranks that own its experts and the
//! outputs sent back (Megatron's all-to-all token dispatcher, in host memory so ranks on any
//! backend can take part).
//!
//! The world's ranks form `world / ep` groups of `ep` consecutive ranks; every group holds all
//! experts, split the same way ([`Placement`]: contiguous ranges, sized by each member's speed),
//! and the attention, router and shared experts are replicated (data-parallel). Within a
//! layer, rank `r`:
//! 1. routes its own tokens, and all ranks share their tokens-per-expert counts (one gather);
//! 2. sends each (token, expert) row to the expert's owner in its group — rows sorted by
//!    expert are already sorted by owner, the ranges being contiguous ([`exchange`], an
//!    all-to-all(v));
//! 3. runs its experts on what it received, grouped by expert;
//! 4. sends the outputs back the way they came (the same exchange, counts reversed), where they
//!    are weighted and summed into their tokens as in one process.
//!
//! Split by width or with shared boundaries ([`Placement`]), step 2 sends rows to more than one
//! member, or splits a shared expert's rows between its two holders.
//!
//! The exchange is an autodiff op whose backward is the reverse exchange, so gradients cross
//! ranks inside one `backward()` call. Every rank's exchanges lie on one chain (layer after
//! layer), so backward meets them in the same order on every rank, as the collectives need.

use crate::moe::Experts;
use burn::tensor::{Int, Tensor, TensorData};
use nuwa_core::Collective;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How the routed experts are split over the members of an EP group, member after member.
///
/// By experts (`columns` is `None`): member `m` owns experts `counts[..m].sum() ..
/// counts[..=m].sum()`, whole, and runs the rows routed to them.
///
/// By width (`columns` is `Some`): every member holds every expert (`counts[m]` is all of
/// them), but only `columns[m]` of each expert's FFN columns (gate and up's outputs, down's
/// inputs: SwiGLU is column by column, so the down products of the column slices sum to the
/// whole). Every member runs every row of its group on its columns and the members' partial
/// outputs are summed — Megatron's expert tensor parallelism. Each member's work follows its
/// share of the columns whatever the router does; the price is every row sent to every
/// member (an all-gather and a reduce-scatter instead of an all-to-all).
///
/// By experts with shared boundaries (`shared` is `Some`): as by experts, but the ranges of
/// neighbouring members overlap — the last `shared.experts[m]` experts of member `m` are the
/// first of member `m + 1` — and the rows routed to a shared expert are split between its two
/// holders afresh in every micro-batch, from the counts every rank gathers before the
/// exchange, so that each member's rows follow `shared.weights` whatever the router does.
/// Each row still goes to one member (no duplicated work, as split by width has); the price
/// is the shared experts held twice and their gradients summed between their holders.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    pub counts: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<Shared>,
}

/// How an expert-parallel group splits the routed experts among its ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertSplit {
    /// Each rank owns whole experts and runs the rows routed to them: one all-to-all each
    /// way, but a rank's expert work follows where the router sends tokens.
    #[default]
    Experts,
    /// Each rank holds a share of every expert's FFN columns and runs every row of its group
    /// on them: its expert work follows its share whatever the router does (ranks of unequal
    /// speed stay balanced), at the price of every row sent to every rank of the group.
    Width,
    /// Whole experts, but neighbouring ranks of a group share a few, whose rows they split
    /// afresh in every micro-batch in proportion to their speeds: each row to one rank, and
    /// balanced whatever the router does, at the price of the shared experts held twice.
    Shared,
}

impl std::str::FromStr for ExpertSplit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "experts" => Ok(Self::Experts),
            "width" => Ok(Self::Width),
            "shared" => Ok(Self::Shared),
            other => Err(format!(
                "`{other}`: expected `experts`, `width` or `shared`"
            )),
        }
    }
}

impl ExpertSplit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Experts => "experts",
            Self::Width => "width",
            Self::Shared => "shared",
        }
    }
}

impl std::fmt::Display for ExpertSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Experts each pair of neighbouring members shares under [`ExpertSplit::Shared`]: a quarter of
/// an equal member's experts, 1 to 4 — enough rows to even out where the router's loads
/// drift from one micro-batch to the next, few enough that the copies cost little memory.
pub fn shared_per_boundary(experts: usize, members: usize) -> usize {
    (experts / (2 * members.max(1))).clamp(1, 4)
}

/// The experts neighbouring members share, and the rows each member should run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shared {
    /// Experts member `m` shares with member `m + 1` (one entry per neighbouring pair).
    pub experts: Vec<usize>,
    /// Each member's relative share of its group's expert rows (its expert speed, in parts
    /// of the members' sum).
    pub weights: Vec<u32>,
}

impl Shared {
    /// Member `m`'s share of its group's expert rows (its weight over the members' sum).
    pub fn share(&self, m: usize) -> f64 {
        let sum: u32 = self.weights.iter().sum();
        self.weights.get(m).copied().unwrap_or(0) as f64 / sum.max(1) as f64
    }
}

/// Where a member's part of a whole stacked expert tensor (or of its flat optimiser moments)
/// lies: `count` runs of `len` values, run `i` starting at `offset + i * stride` (row-major).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runs {
    pub offset: usize,
    pub len: usize,
    pub stride: usize,
    pub count: usize,
}

impl Runs {
    /// The element ranges of the whole tensor, in the part's order.
    pub fn ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        (0..self.count).map(|i| {
            let start = self.offset + i * self.stride;
            start..start + self.len
        })
    }

    /// The part's values, taken from the whole tensor's.
    pub fn take(&self, whole: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.len * self.count);
        for r in self.ranges() {
            out.extend_from_slice(&whole[r]);
        }
        out
    }

    /// Writes the part's values into the whole tensor's.
    pub fn put(&self, part: &[f32], whole: &mut [f32]) {
        for (r, chunk) in self.ranges().zip(part.chunks(self.len.max(1))) {
            whole[r].copy_from_slice(chunk);
        }
    }
}

/// Whether a routed-expert tensor name (parameter or moment) is a down projection
/// `[experts, width, hidden]` (else gate or up, `[experts, hidden, width]`).
fn is_down(name: &str) -> bool {
    let param = name
        .strip_suffix(".exp_avg_sq")
        .or_else(|| name.strip_suffix(".exp_avg"))
        .unwrap_or(name);
    param.ends_with("down_proj")
}

impl Placement {
    /// `experts` split as equally as they go (the first members take the remainder).
    pub fn equal(experts: usize, members: usize) -> Self {
        Self::proportional(experts, &vec![1.0; members])
    }

    /// `experts` split in proportion to `speeds` (tokens per second each member's experts can
    /// process), every member owning at least one.
    pub fn proportional(experts: usize, speeds: &[f64]) -> Self {
        Self {
            counts: at_least_one_each(experts, speeds, &[]),
            columns: None,
            shared: None,
        }
    }

    /// [`Placement::proportional`] with no member owning more experts than `caps` (what its
    /// memory holds); the caps must hold every expert.
    pub fn proportional_within(experts: usize, speeds: &[f64], caps: &[Option<usize>]) -> Self {
        Self {
            counts: at_least_one_each(experts, speeds, caps),
            columns: None,
            shared: None,
        }
    }

    /// Experts in proportion to `speeds` with `per_boundary` experts shared by each pair of
    /// neighbouring members, around where the proportional split would cut (fewer where the
    /// experts are too few), within `caps`. With none to share (or none within the caps),
    /// the proportional split — still splitting shared rows, of which there are none.
    pub fn shared_within(
        experts: usize,
        speeds: &[f64],
        per_boundary: usize,
        caps: &[Option<usize>],
    ) -> Self {
        let n = speeds.len();
        let total: f64 = speeds.iter().map(|s| s.max(1e-12)).sum();
        let weights: Vec<u32> = speeds
            .iter()
            .map(|s| ((s.max(1e-12) / total * 1000.0).round() as u32).max(1))
            .collect();
        let mut cut = 0.0;
        let cuts: Vec<f64> = speeds[..n.saturating_sub(1)]
            .iter()
            .map(|s| {
                cut += experts as f64 * s.max(1e-12) / total;
                cut
            })
            .collect();
        for k in (1..=per_boundary).rev() {
            let Some(starts) = windows(experts, &cuts, k) else {
                continue;
            };
            let mut counts = Vec::with_capacity(n);
            for m in 0..n {
                let begin = if m == 0 { 0 } else { starts[m - 1] };
                let end = starts.get(m).map_or(experts, |s| s + k);
                counts.push(end - begin);
            }
            let placement = Self {
                counts,
                columns: None,
                shared: Some(Shared {
                    experts: vec![k; n - 1],
                    weights: weights.clone(),
                }),
            };
            if placement.within(caps) {
                return placement;
            }
        }
        Self {
            shared: Some(Shared {
                experts: vec![0; n.saturating_sub(1)],
                weights,
            }),
            ..Self::proportional_within(experts, speeds, caps)
        }
    }

    /// Every expert on every member, each expert's `width` FFN columns split in proportion
    /// to `speeds`, every member holding at least one.
    pub fn by_width(experts: usize, width: usize, speeds: &[f64]) -> Self {
        Self::by_width_within(experts, width, speeds, &[])
    }

    /// [`Placement::by_width`] with no member holding more columns than `caps`.
    pub fn by_width_within(
        experts: usize,
        width: usize,
        speeds: &[f64],
        caps: &[Option<usize>],
    ) -> Self {
        Self {
            counts: vec![experts; speeds.len()],
            columns: Some(at_least_one_each(width, speeds, caps)),
            shared: None,
        }
    }

    /// Whether no member holds more (experts, or columns split by width) than `caps`.
    pub fn within(&self, caps: &[Option<usize>]) -> bool {
        let held = self.columns.as_ref().unwrap_or(&self.counts);
        held.iter()
            .zip(caps)
            .all(|(&h, cap)| cap.is_none_or(|c| h <= c))
    }

    /// The split by width whose members' expert phases should take equally long, from what
    /// the last one took: member `m` held `columns[m]` columns, its expert phase took
    /// `seconds[m]`, and it computes at `speeds[m]` (relative; measured outside the expert
    /// phase). The phase is work on its columns plus work on every row whatever the columns
    /// (regrouping rows, exchanging and summing them): `seconds × speed = a · columns + f`,
    /// fitted over the members. A split in proportion to speed leaves the slower members
    /// `f` to do at their speed; this one gives them fewer columns for it. `None` when the
    /// members held equal columns (nothing to fit) or the fit is not a cost.
    pub fn by_width_fitted(
        experts: usize,
        columns: &[usize],
        seconds: &[f64],
        speeds: &[f64],
        caps: &[Option<usize>],
    ) -> Option<Self> {
        let n = columns.len();
        if n < 2 || seconds.len() != n || speeds.len() != n {
            return None;
        }
        let x: Vec<f64> = columns.iter().map(|&c| c as f64).collect();
        let y: Vec<f64> = seconds.iter().zip(speeds).map(|(s, v)| s * v).collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / n as f64;
        let (mx, my) = (mean(&x), mean(&y));
        let sxx: f64 = x.iter().map(|x| (x - mx).powi(2)).sum();
        let sxy: f64 = x.iter().zip(&y).map(|(x, y)| (x - mx) * (y - my)).sum();
        if sxx < 0.5 {
            return None;
        }
        let a = sxy / sxx;
        let f = (my - a * mx).max(0.0);
        if !(a > 0.0 && a.is_finite() && f.is_finite()) {
            return None;
        }
        // Equal times T: a · c_m + f = T · v_m, with the columns summing to the width.
        let width: usize = columns.iter().sum();
        let time = (a * width as f64 + n as f64 * f) / speeds.iter().sum::<f64>();
        let wanted: Vec<f64> = speeds
            .iter()
            .map(|v| ((time * v - f) / a - 1.0).max(0.0))
            .collect();
        if wanted.iter().all(|&w| w <= 0.0) {
            return None;
        }
        Some(Self {
            counts: vec![experts; n],
            columns: Some(at_least_one_each(width, &wanted, caps)),
            shared: None,
        })
    }

    pub fn experts(&self) -> usize {
        match self.columns {
            Some(_) => self.counts.first().copied().unwrap_or(0),
            None => self.counts.iter().sum::<usize>() - self.shared_experts().iter().sum::<usize>(),
        }
    }

    /// Experts each member shares with the next (none unless shared boundaries).
    pub fn shared_experts(&self) -> &[usize] {
        self.shared.as_ref().map_or(&[], |s| &s.experts)
    }

    /// How many of member `m`'s first experts it shares with member `m - 1` (which writes
    /// them to checkpoints and counts them in the gradient norm).
    pub fn leading_shared(&self, m: usize) -> usize {
        match m {
            0 => 0,
            _ => self.shared_experts().get(m - 1).copied().unwrap_or(0),
        }
    }

    /// The FFN columns member `m` holds of every expert it holds.
    pub fn column_range(&self, m: usize, width: usize) -> Range<usize> {
        match &self.columns {
            Some(c) => {
                let start: usize = c[..m].iter().sum();
                start..start + c[m]
            }
            None => 0..width,
        }
    }

    /// Where member `m`'s part of the routed-expert tensor `name` (weights or flat moments)
    /// lies in the whole one, the part holding `local_len` values; and the whole's length.
    pub fn runs(&self, m: usize, name: &str, local_len: usize) -> (usize, Runs) {
        let experts = self.experts().max(1);
        match &self.columns {
            None => {
                let local = self.range(m);
                let per = local_len / local.len().max(1);
                let runs = Runs {
                    offset: local.start * per,
                    len: local.len() * per,
                    stride: 0,
                    count: 1,
                };
                (experts * per, runs)
            }
            Some(columns) => {
                let width: usize = columns.iter().sum();
                let mine = self.column_range(m, width);
                let rows = local_len / mine.len().max(1); // experts × hidden
                let runs = if is_down(name) {
                    // [experts, width, hidden]: per expert, rows `mine` of `width`.
                    let hidden = rows / experts;
                    Runs {
                        offset: mine.start * hidden,
                        len: mine.len() * hidden,
                        stride: width * hidden,
                        count: experts,
                    }
                } else {
                    // [experts, hidden, width]: per (expert, hidden) row, columns `mine`.
                    Runs {
                        offset: mine.start,
                        len: mine.len(),
                        stride: width,
                        count: rows,
                    }
                };
                (rows * width, runs)
            }
        }
    }

    /// The whole shape of the routed-expert tensor `name` whose member-`m` part has
    /// `local_shape` (flat moments: one dimension).
    pub fn whole_shape(&self, m: usize, name: &str, local_shape: &[usize]) -> Vec<usize> {
        let local_len = local_shape.iter().product();
        let (whole_len, _) = self.runs(m, name, local_len);
        let mut shape = local_shape.to_vec();
        match (shape.len(), &self.columns) {
            (1, _) => shape[0] = whole_len,
            (_, None) => shape[0] = self.experts(),
            (_, Some(columns)) => shape[if is_down(name) { 1 } else { 2 }] = columns.iter().sum(),
        }
        shape
    }

    /// The shape of member `m`'s part of a routed-expert tensor of `whole_shape`.
    pub fn part_shape(&self, m: usize, name: &str, whole_shape: &[usize]) -> Vec<usize> {
        let mut shape = whole_shape.to_vec();
        match (shape.len(), &self.columns) {
            (1, _) => {
                let whole_len = shape[0];
                shape[0] = self.part_len(m, name, whole_len);
            }
            (_, None) => shape[0] = self.range(m).len(),
            (_, Some(columns)) => shape[if is_down(name) { 1 } else { 2 }] = columns[m],
        }
        shape
    }

    /// How many of a whole tensor's `whole_len` values member `m` holds.
    pub fn part_len(&self, m: usize, _name: &str, whole_len: usize) -> usize {
        match &self.columns {
            None => whole_len / self.experts().max(1) * self.range(m).len(),
            Some(columns) => whole_len / columns.iter().sum::<usize>().max(1) * columns[m],
        }
    }

    pub fn members(&self) -> usize {
        self.counts.len()
    }

    /// The experts member `m` owns.
    pub fn range(&self, m: usize) -> Range<usize> {
        if self.columns.is_some() {
            return 0..self.experts();
        }
        let shared = self.shared_experts();
        let start: usize = (0..m)
            .map(|i| self.counts[i] - shared.get(i).copied().unwrap_or(0))
            .sum();
        start..start + self.counts[m]
    }

    /// The member that owns `expert` (of two sharing it, the first).
    pub fn owner(&self, expert: usize) -> usize {
        (0..self.members())
            .find(|&m| expert < self.range(m).end)
            .unwrap_or(self.members().saturating_sub(1))
    }

    /// Which member runs which rows of a micro-batch, by experts: `rows(s, e)` rows of
    /// member `s` are routed to expert `e`. A whole expert's rows go to its owner; a shared
    /// one's are split between its two holders so that, member after member, each runs as
    /// near its weight's share of all the rows as the shared rows allow. The rows of a shared
    /// window are taken expert after expert, source after source, and the first ones go to
    /// the lower member: each source's rows stay in expert order with their destinations in
    /// member order, as the exchange sends them.
    pub fn split_rows(&self, sources: usize, rows: impl Fn(usize, usize) -> usize) -> RowSplit {
        let experts = self.experts();
        let owners: Vec<usize> = (0..experts).map(|e| self.owner(e)).collect();
        let mut parts = Vec::with_capacity(sources * experts);
        for s in 0..sources {
            for (e, &owner) in owners.iter().enumerate() {
                parts.push([(owner, rows(s, e)), (owner, 0)]);
            }
        }
        let mut split = RowSplit { experts, parts };
        let Some(shared) = &self.shared else {
            return split;
        };
        let per_expert: Vec<usize> = (0..experts)
            .map(|e| (0..sources).map(|s| rows(s, e)).sum())
            .collect();
        let total: usize = per_expert.iter().sum();
        let weight_sum: f64 = shared.weights.iter().map(|&w| w as f64).sum();
        // Rows of the window below a member that it runs.
        let mut carried = 0;
        for (m, &k) in shared.experts.iter().enumerate() {
            let range = self.range(m);
            let window = range.end - k..range.end;
            let whole = range.start + self.leading_shared(m)..window.start;
            let load = carried + whole.map(|e| per_expert[e]).sum::<usize>();
            let in_window: usize = window.clone().map(|e| per_expert[e]).sum();
            let target = total as f64 * shared.weights[m] as f64 / weight_sum.max(1.0);
            let keep = ((target - load as f64).round().max(0.0) as usize).min(in_window);
            carried = in_window - keep;
            let mut before = 0;
            for e in window {
                for s in 0..sources {
                    let n = rows(s, e);
                    let low = keep.saturating_sub(before).min(n);
                    split.parts[s * experts + e] = [(m, low), (m + 1, n - low)];
                    before += n;
                }
            }
        }
        split
    }
}

/// Which member runs which rows: [`Placement::split_rows`].
#[derive(Debug, Clone)]
pub struct RowSplit {
    experts: usize,
    /// Per (source, expert): up to two (member, rows) parts, the lower member's first.
    parts: Vec<[(usize, usize); 2]>,
}

impl RowSplit {
    /// Rows of source member `s` routed to expert `e` that member `m` runs.
    pub fn rows(&self, s: usize, e: usize, m: usize) -> usize {
        self.parts[s * self.experts + e]
            .iter()
            .filter(|(to, _)| *to == m)
            .map(|(_, rows)| rows)
            .sum()
    }
}

/// Where the shared windows of `k` experts start, one around each of `cuts` (fractional expert
/// positions, increasing), in order and not overlapping; `None` if they do not fit.
fn windows(experts: usize, cuts: &[f64], k: usize) -> Option<Vec<usize>> {
    let mut starts = Vec::with_capacity(cuts.len());
    let mut free = 0; // the first expert no window holds yet
    for (i, cut) in cuts.iter().enumerate() {
        // Room for this window and those after it.
        let last = experts.checked_sub(k * (cuts.len() - i))?;
        if free > last {
            return None;
        }
        let wanted = (cut - k as f64 / 2.0).round().max(0.0) as usize;
        let start = wanted.clamp(free, last);
        starts.push(start);
        free = start + k;
    }
    Some(starts)
}

/// `total` units (experts, or columns) split in proportion to `weights`, every member taking
/// at least one and at most its cap.
fn at_least_one_each(total: usize, weights: &[f64], caps: &[Option<usize>]) -> Vec<usize> {
    let spare = total.saturating_sub(weights.len());
    let above_one: Vec<Option<usize>> = caps
        .iter()
        .map(|c| c.map(|c| c.saturating_sub(1)))
        .collect();
    let mut counts = nuwa_core::proportional_shares(spare, weights, &above_one);
    counts.iter_mut().for_each(|c| *c += 1);
    counts
}

/// This rank's place in expert parallelism, shared by every MoE layer of its model.
#[derive(Clone)]
pub struct ExpertGroup {
    pub comm: Arc<dyn Collective>,
    /// Ranks per EP group.
    pub ep: usize,
    pub placement: Placement,
    /// Most experts (or, split by width, columns) each member's memory holds (`None`:
    /// unbounded): every placement of the group stays within them.
    pub member_caps: Vec<Option<usize>>,
    /// Nanoseconds spent inside exchanges (forward and backward) since the last
    /// [`ExpertGroup::take_exchange_seconds`].
    exchange_ns: Arc<AtomicU64>,
    /// (token, expert) rows this rank's experts ran forward since the last
    /// [`ExpertGroup::take_expert_rows`]: its share of the experts' work.
    expert_rows: Arc<AtomicU64>,
    /// Nanoseconds of compute between the exchanges that bracket the experts (forward and
    /// backward) since the last [`ExpertGroup::take_expert_seconds`]: the expert phase, which
    /// must balance across ranks on its own, as the rest of the layer must.
    expert_ns: Arc<AtomicU64>,
}

impl std::fmt::Debug for ExpertGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertGroup")
            .field("rank", &self.comm.rank())
            .field("ep", &self.ep)
            .field("placement", &self.placement)
            .finish()
    }
}

impl ExpertGroup {
    /// `comm`'s ranks in groups of `ep`; `placement` has one entry per member.
    pub fn new(comm: Arc<dyn Collective>, ep: usize, placement: Placement) -> Self {
        Self {
            comm,
            ep,
            placement,
            member_caps: Vec::new(),
            exchange_ns: Arc::new(AtomicU64::new(0)),
            expert_rows: Arc::new(AtomicU64::new(0)),
            expert_ns: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The group with each member's most experts (or columns) its memory holds.
    pub fn with_member_caps(self, member_caps: Vec<Option<usize>>) -> Self {
        Self {
            member_caps,
            ..self
        }
    }

    /// This rank's position in its group.
    pub fn member(&self) -> usize {
        self.comm.rank() % self.ep
    }

    /// The world rank of member 0 of this rank's group.
    fn first(&self) -> usize {
        self.comm.rank() / self.ep * self.ep
    }

    /// How many groups hold each expert (the data-parallel degree of the experts).
    pub fn replicas(&self) -> usize {
        self.comm.size() / self.ep
    }

    /// The experts this rank owns.
    pub fn local_experts(&self) -> Range<usize> {
        self.placement.range(self.member())
    }

    /// Seconds spent in exchanges since the last call (waiting for peers included).
    pub fn take_exchange_seconds(&self) -> f64 {
        self.exchange_ns.swap(0, Ordering::Relaxed) as f64 * 1e-9
    }

    /// Seconds of this rank's compute in the expert phases since the last call.
    pub fn take_expert_seconds(&self) -> f64 {
        self.expert_ns.swap(0, Ordering::Relaxed) as f64 * 1e-9
    }

    /// Rows this rank's experts ran since the last call.
    pub fn take_expert_rows(&self) -> u64 {
        self.expert_rows.swap(0, Ordering::Relaxed)
    }

    /// Rows of `[n, hidden]` per world rank, the same exchange for every column.
    /// `after_experts`: the compute before it (forward) is the experts' (the combine).
    fn route_of(
        &self,
        kind: Kind,
        send_rows: Vec<usize>,
        recv_rows: Vec<usize>,
        after_experts: bool,
    ) -> Route {
        Route {
            comm: self.comm.clone(),
            kind,
            send_rows,
            recv_rows,
            clock: self.exchange_ns.clone(),
            after_experts,
            expert_clock: self.expert_ns.clone(),
            before: None,
            after: None,
        }
    }

    /// Rows through `route` to the experts and back: the received rows, which arrive member
    /// after member (`arrived(m, e)` rows of member `m` for expert `e` of `experts`), are
    /// regrouped expert after expert on the host as they leave the exchange, the experts run
    /// on them, and their outputs are put back in arrival order as they enter the exchange
    /// back (`back`). With no rows there is nothing to compute, but the (empty) rows stay on
    /// the graph, so backward exchanges too.
    fn through_experts(
        &self,
        experts: &Experts,
        sent: Tensor<2>,
        (route, back): (Route, Route),
        arrived: impl Fn(usize, usize) -> usize,
    ) -> Tensor<2> {
        let (moves, per_expert) = regroup_by_expert(self.ep, experts.len(), arrived);
        let moves: Arc<[Move]> = moves.into();
        let received = exchange(
            sent,
            Route {
                after: Some(moves.clone()),
                ..route
            },
        );
        let outputs = match per_expert.iter().sum::<usize>() {
            0 => received,
            _ => experts.forward_sorted(received, &per_expert),
        };
        let back = Route {
            before: Some(inverse(&moves).into()),
            ..back
        };
        exchange(outputs, back)
    }

    /// The routed experts on this rank's tokens, wherever the experts live: `tokens[e]` are the
    /// rows of `x` `[tokens, hidden]` routed to (global) expert `e`. Returns one output row per
    /// (expert, token) pair, expert after expert — what `Experts::forward_routed` returns in
    /// one process. `experts` holds this rank's experts only.
    pub fn forward_routed(
        &self,
        experts: &Experts,
        x: Tensor<2>,
        tokens: &[Vec<i64>],
    ) -> Tensor<2> {
        let device = x.device();
        let (world, num_experts) = (self.comm.size(), tokens.len());
        // Every rank's tokens per expert: what each sends and receives follows from it.
        let mine: Vec<f64> = tokens.iter().map(|t| t.len() as f64).collect();
        let counts: Vec<usize> = nuwa_core::comm::pace::collective(|| self.comm.all_gather(&mine))
            .iter()
            .map(|&c| c as usize)
            .collect();
        if self.placement.columns.is_some() {
            return self.forward_by_width(experts, x, tokens, &counts);
        }
        let (first, me) = (self.first(), self.member());
        let split = self
            .placement
            .split_rows(self.ep, |s, e| counts[(first + s) * num_experts + e]);
        let local = self.local_experts();
        let (mut send_rows, mut recv_rows) = (vec![0; world], vec![0; world]);
        for m in 0..self.ep {
            send_rows[first + m] = (0..num_experts).map(|e| split.rows(me, e, m)).sum();
            recv_rows[first + m] = local.clone().map(|e| split.rows(m, e, me)).sum();
        }
        // Received rows come source after source, each source's expert after expert; the
        // experts want them expert after expert.
        let received: usize = recv_rows.iter().sum();
        self.expert_rows
            .fetch_add(received as u64, Ordering::Relaxed);
        let sent = x.select(0, int_tensor(&tokens.concat(), &device));
        let routes = (
            self.route_of(Kind::Exchange, send_rows.clone(), recv_rows.clone(), false),
            self.route_of(Kind::Exchange, recv_rows, send_rows, true),
        );
        let local_first = local.start;
        self.through_experts(experts, sent, routes, |m, j| {
            split.rows(m, local_first + j, me)
        })
    }
}

impl ExpertGroup {
    /// [`ExpertGroup::forward_routed`] when the experts are split by width: every member of
    /// the group gets every member's rows (an all-gather: this rank's rows sent to each), runs
    /// them all on its columns of every expert, and sends each member its partial outputs back,
    /// where the members' partials are summed (a reduce-scatter). Backward is the same the
    /// other way round (the exchanges reverse; the sum's gradient goes to every partial, the
    /// copies' gradients sum). `counts[r * experts + e]`: rank `r`'s rows routed to `e`.
    fn forward_by_width(
        &self,
        experts: &Experts,
        x: Tensor<2>,
        tokens: &[Vec<i64>],
        counts: &[usize],
    ) -> Tensor<2> {
        let device = x.device();
        let (world, num_experts, first) = (self.comm.size(), tokens.len(), self.first());
        let rows_of = |rank: usize| -> usize {
            counts[rank * num_experts..(rank + 1) * num_experts]
                .iter()
                .sum()
        };
        let mine = rows_of(self.comm.rank());
        let (mut send_rows, mut recv_rows) = (vec![0; world], vec![0; world]);
        for member in 0..self.ep {
            send_rows[first + member] = mine;
            recv_rows[first + member] = rows_of(first + member);
        }
        // Its work in whole-expert rows: every row, on its share of the columns.
        let columns = self.placement.columns.as_deref().unwrap_or(&[]);
        let (share, width) = (columns[self.member()], columns.iter().sum::<usize>().max(1));
        let rows: usize = recv_rows.iter().sum();
        let work = rows as u64 * share as u64 / width as u64;
        self.expert_rows.fetch_add(work, Ordering::Relaxed);
        let sent = x.select(0, int_tensor(&tokens.concat(), &device));
        // Every member's partial outputs for this rank's rows come back summed.
        let routes = (
            self.route_of(Kind::Gather, send_rows.clone(), recv_rows.clone(), false),
            self.route_of(Kind::ScatterSum, recv_rows, send_rows, true),
        );
        self.through_experts(experts, sent, routes, |m, e| {
            counts[(first + m) * num_experts + e]
        })
    }
}

/// A host copy of `rows` consecutive rows from row `from` to row `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Move {
    from: usize,
    to: usize,
    rows: usize,
}

/// The moves that regroup rows arriving member after member, each member's expert after
/// expert (`arrived(m, e)` rows), expert after expert, each expert's member after member;
/// and the rows each expert then has. The moves are in the order of their destinations.
fn regroup_by_expert(
    members: usize,
    experts: usize,
    arrived: impl Fn(usize, usize) -> usize,
) -> (Vec<Move>, Vec<usize>) {
    let mut arrival_start = vec![0; members * experts];
    let mut row = 0;
    for m in 0..members {
        for e in 0..experts {
            arrival_start[m * experts + e] = row;
            row += arrived(m, e);
        }
    }
    let (mut moves, mut per_expert, mut to) = (Vec::new(), vec![0; experts], 0);
    for (e, total) in per_expert.iter_mut().enumerate() {
        for m in 0..members {
            let rows = arrived(m, e);
            if rows > 0 {
                let from = arrival_start[m * experts + e];
                moves.push(Move { from, to, rows });
            }
            to += rows;
            *total += rows;
        }
    }
    (moves, per_expert)
}

/// The moves that undo `moves`, in the order of their destinations.
fn inverse(moves: &[Move]) -> Vec<Move> {
    let mut back: Vec<Move> = moves
        .iter()
        .map(|m| Move {
            from: m.to,
            to: m.from,
            rows: m.rows,
        })
        .collect();
    back.sort_by_key(|m| m.to);
    back
}

/// `values` (rows of `cols`) reordered by `moves`, which cover every row once, in the order
/// of their destinations.
fn apply_moves(moves: &[Move], values: &[f32], cols: usize) -> Vec<f32> {
    apply_moves_from(moves, &[values], cols)
}

/// As [`apply_moves`] over the rows of `blocks` one after the other (a move's rows lie in
/// one block).
fn apply_moves_from(moves: &[Move], blocks: &[&[f32]], cols: usize) -> Vec<f32> {
    let mut starts = Vec::with_capacity(blocks.len());
    let mut total = 0;
    for b in blocks {
        starts.push(total);
        total += b.len() / cols.max(1);
    }
    let mut out = Vec::with_capacity(total * cols);
    for m in moves {
        debug_assert_eq!(out.len(), m.to * cols);
        // The last block starting at or before the move's first row (empty ones skipped).
        let b = starts.partition_point(|&s| s <= m.from) - 1;
        let at = m.from - starts[b];
        out.extend_from_slice(&blocks[b][at * cols..(at + m.rows) * cols]);
    }
    debug_assert_eq!(out.len(), total * cols);
    out
}

fn int_tensor(values: &[i64], device: &burn::tensor::Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

/// What a [`Route`] does with the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An all-to-all(v): `send_rows[r]` of this rank's rows go to rank `r`.
    Exchange,
    /// An all-gather within the group: all of this rank's rows go to every rank `r` with
    /// `send_rows[r]` > 0. Its adjoint is `ScatterSum`.
    Gather,
    /// A reduce-scatter within the group: `send_rows[r]` rows go to rank `r`, which sums
    /// what every rank sent it (`recv_rows[r]` rows from each, all the same). Its adjoint is
    /// `Gather`.
    ScatterSum,
}

/// One exchange of rows: `send_rows[r]` rows go to rank `r`, `recv_rows[r]` come from it.
#[derive(Clone)]
pub struct Route {
    comm: Arc<dyn Collective>,
    kind: Kind,
    send_rows: Vec<usize>,
    recv_rows: Vec<usize>,
    clock: Arc<AtomicU64>,
    /// The compute before this exchange is the experts' (the forward combine, and the
    /// backward of the dispatch): it is added to `expert_clock`.
    after_experts: bool,
    expert_clock: Arc<AtomicU64>,
    /// Rows reordered on the host before they are sent.
    before: Option<Arc<[Move]>>,
    /// Rows reordered on the host after they are received (and, for `ScatterSum`, summed).
    after: Option<Arc<[Move]>>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("kind", &self.kind)
            .field("send_rows", &self.send_rows)
            .field("recv_rows", &self.recv_rows)
            .finish()
    }
}

impl Route {
    /// The same exchange the other way: what was received goes back where it came from.
    /// (The backward of the combine starts the experts' backward; that of the dispatch ends it.)
    fn reversed(&self) -> Self {
        let kind = match self.kind {
            Kind::Exchange => Kind::Exchange,
            Kind::Gather => Kind::ScatterSum,
            Kind::ScatterSum => Kind::Gather,
        };
        // Reordering after the exchange is undone before the way back, and the other way.
        let undo = |moves: &Option<Arc<[Move]>>| moves.as_deref().map(|m| inverse(m).into());
        Self {
            kind,
            send_rows: self.recv_rows.clone(),
            recv_rows: self.send_rows.clone(),
            after_experts: !self.after_experts,
            before: undo(&self.after),
            after: undo(&self.before),
            ..self.clone()
        }
    }

    /// Exchanges host rows of `cols` values. This rank's own block never goes through the
    /// communicator: it is read where it lies, and only the other ranks' blocks are received,
    /// into a buffer kept from one exchange to the next (no fresh pages, no zeroing).
    fn run(&self, values: &[f32], cols: usize) -> Vec<f32> {
        let reordered;
        let values = match &self.before {
            Some(moves) => {
                reordered = apply_moves(moves, values, cols);
                &reordered[..]
            }
            None => values,
        };
        let me = self.comm.rank();
        let elements = |rows: &[usize]| rows.iter().map(|r| r * cols).collect::<Vec<_>>();
        let (mut send, mut recv) = (elements(&self.send_rows), elements(&self.recv_rows));
        // Where each rank's block starts in `values` (all of it, for an all-gather).
        let send_at: Vec<usize> = match self.kind {
            Kind::Gather => vec![0; send.len()],
            Kind::Exchange | Kind::ScatterSum => nuwa_core::comm::starts(&send),
        };
        let own = &values[send_at[me]..send_at[me] + send[me].min(values.len())];
        let own_recv = std::mem::take(&mut recv[me]);
        send[me] = 0;
        RECEIVED.with(|buf| {
            let mut received = buf.borrow_mut();
            received.resize(recv.iter().sum(), 0.0);
            let ((), compute_before) = nuwa_core::comm::pace::collective_after(|| {
                let started = Instant::now();
                match self.kind {
                    Kind::Gather => self.comm.all_gather_v(values, &send, &recv, &mut received),
                    Kind::Exchange | Kind::ScatterSum => {
                        self.comm
                            .all_to_all_v(values, (&send, &send_at), &recv, &mut received)
                    }
                }
                self.clock
                    .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            });
            if self.after_experts {
                let ns = (compute_before * 1e9) as u64;
                self.expert_clock.fetch_add(ns, Ordering::Relaxed);
            }
            // Every rank's block, rank after rank: this rank's own, the others' received.
            recv[me] = own_recv;
            let mut rest = &received[..];
            let blocks: Vec<&[f32]> = (0..recv.len())
                .map(|r| match r == me {
                    true => &own[..own_recv],
                    false => {
                        let (block, tail) = rest.split_at(recv[r]);
                        rest = tail;
                        block
                    }
                })
                .collect();
            match (self.kind, &self.after) {
                (Kind::ScatterSum, after) => {
                    let sum = sum_blocks(&blocks, self.received() * cols);
                    match after {
                        Some(moves) => apply_moves(moves, &sum, cols),
                        None => sum,
                    }
                }
                (_, Some(moves)) => apply_moves_from(moves, &blocks, cols),
                (_, None) => blocks.concat(),
            }
        })
    }

    /// Rows this rank ends with.
    fn received(&self) -> usize {
        match self.kind {
            Kind::ScatterSum => self.recv_rows.iter().copied().max().unwrap_or(0),
            Kind::Exchange | Kind::Gather => self.recv_rows.iter().sum(),
        }
    }
}

thread_local! {
    /// What the last exchange received from the other ranks, kept for the next one.
    static RECEIVED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The element-wise sum of the non-empty `blocks` (each `len` values).
fn sum_blocks(blocks: &[&[f32]], len: usize) -> Vec<f32> {
    let mut full = blocks.iter().filter(|b| !b.is_empty());
    let mut sum = full.next().map_or_else(Vec::new, |b| b.to_vec());
    for block in full {
        sum.iter_mut().zip(*block).for_each(|(a, b)| *a += b);
    }
    debug_assert!(sum.is_empty() || sum.len() == len);
    sum
}

/// The exchange as a tensor op: `x` `[Σ send_rows, cols]` → `[Σ recv_rows, cols]`.
pub fn exchange(x: Tensor<2>, route: Route) -> Tensor<2> {
    ops::exchange(x, route)
}

// burn-ndarray is deprecated upstream, but it is still a backend a rank may run on.
#[allow(deprecated)]
mod ops {
    use super::Route;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::autodiff::Autodiff;
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{backend_extension, Backend, Dispatch, TensorMetadata};
    use burn::tensor::{Tensor, TensorData};

    // Every backend this crate can be built with: the exchange is a host round trip, the same
    // for all of them, so ranks on different backends meet in one group.
    #[backend_extension(
        Flex: cfg(feature = "flex"),
        NdArray: cfg(feature = "ndarray"),
        Cube: cfg(feature = "cube"),
        Autodiff
    )]
    pub trait ExchangeOps: Backend {
        fn exchange_rows(x: FloatTensor<Self>, route: Route) -> FloatTensor<Self>;
    }

    pub fn exchange(x: Tensor<2>, route: Route) -> Tensor<2> {
        Tensor::from_dispatch(<Dispatch as ExchangeOps>::exchange_rows(
            x.into_dispatch(),
            route,
        ))
    }

    /// Through host memory, so any backend can take part.
    fn host_exchange<B: Backend>(x: FloatTensor<B>, route: &Route) -> FloatTensor<B> {
        let device = x.device();
        let cols = x.shape().dims::<2>()[1];
        // `into_vec` takes the buffer as it is when it holds f32 (no copy on the CPU).
        let data = burn::tensor::try_read_sync(B::float_into_data(x))
            .and_then(Result::ok)
            .map(|d| match d.dtype() {
                burn::tensor::DType::F32 => d.try_into_vec::<f32>().unwrap_or_default(),
                _ => d.iter::<f32>().collect(),
            })
            .unwrap_or_default();
        let out = route.run(&data, cols);
        B::float_from_data(TensorData::new(out, [route.received(), cols]), &device)
    }

    #[cfg(feature = "flex")]
    impl ExchangeOps for burn::backend::flex::Flex {
        fn exchange_rows(x: FloatTensor<Self>, route: Route) -> FloatTensor<Self> {
            host_exchange::<Self>(x, &route)
        }
    }

    #[cfg(feature = "ndarray")]
    impl ExchangeOps for burn::backend::NdArray {
        fn exchange_rows(x: FloatTensor<Self>, route: Route) -> FloatTensor<Self> {
            host_exchange::<Self>(x, &route)
        }
    }

    #[cfg(feature = "cube")]
    impl ExchangeOps for burn::backend::Cube {
        fn exchange_rows(x: FloatTensor<Self>, route: Route) -> FloatTensor<Self> {
            host_exchange::<Self>(x, &route)
        }
    }

    impl<B: ExchangeOps, C: CheckpointStrategy> ExchangeOps for Autodiff<B, C> {
        fn exchange_rows(x: FloatTensor<Self>, route: Route) -> FloatTensor<Self> {
            #[derive(Debug)]
            struct ExchangeBackward;

            impl<B: ExchangeOps> Backward<B, 1> for ExchangeBackward {
                type State = Route;

                fn backward(
                    self,
                    ops: Ops<Self::State, 1>,
                    grads: &mut Gradients,
                    _: &mut Checkpointer,
                ) {
                    let [node] = ops.parents;
                    let dy = grads.consume::<B>(&ops.node);
                    // The exchange is a permutation of rows across ranks: its adjoint sends
                    // each row's gradient back where the row came from.
                    let dx = B::exchange_rows(dy, ops.state.reversed());
                    if let Some(node) = node {
                        grads.register::<B>(node.id, dx);
                    }
                }
            }

            match ExchangeBackward
                .prepare::<C>([x.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let out = B::exchange_rows(x.into_primitive(), route.clone());
                    prep.finish(route, out)
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(B::exchange_rows(x.into_primitive(), route))
                }
            }
        }
    }
}

/// Whether `name` (a parameter path, or an optimiser-state name built on one) is a routed
/// expert weight, stacked `[experts, ..]`: the tensors expert parallelism splits.
pub fn is_routed_expert(name: &str) -> bool {
    let param = name
        .strip_suffix(".exp_avg_sq")
        .or_else(|| name.strip_suffix(".exp_avg"))
        .unwrap_or(name);
    ["gate_proj", "up_proj", "down_proj"]
        .iter()
        .any(|w| param.ends_with(&format!(".moe.experts.{w}")))
}

impl crate::LanguageModel {
    /// Every MoE layer, the decoder's first and the MTP layers' after.
    pub fn moe_layers_mut(&mut self) -> impl Iterator<Item = &mut crate::moe::Moe> {
        let mtp = self.mtp_layers.iter_mut().map(|m| &mut m.decoder);
        self.layers
            .iter_mut()
            .chain(mtp)
            .filter_map(|l| l.moe.as_mut())
    }

    pub fn moe_layers(&self) -> impl Iterator<Item = &crate::moe::Moe> {
        let mtp = self.mtp_layers.iter().map(|m| &m.decoder);
        self.layers.iter().chain(mtp).filter_map(|l| l.moe.as_ref())
    }

    /// Keeps of every MoE layer only the experts (or, split by width, the columns of every
    /// expert) `group` gives this rank, and sends its tokens to their owners from now on. The
    /// model must hold every expert whole.
    pub fn shard_experts(mut self, group: &ExpertGroup) -> Self {
        let local = group.local_experts();
        let width = self
            .moe_layers()
            .next()
            .map_or(0, |m| m.experts.gate_proj.lazy_shape()[2]);
        let columns = group.placement.column_range(group.member(), width);
        for moe in self.moe_layers_mut() {
            let narrow = |p: burn::module::Param<Tensor<3>>, width_dim: usize| {
                p.map(|t| {
                    let tracked = t.is_require_grad();
                    let part = t
                        .narrow(0, local.start, local.len())
                        .narrow(width_dim, columns.start, columns.len())
                        .detach();
                    if tracked {
                        part.require_grad()
                    } else {
                        part
                    }
                })
            };
            let e = &mut moe.experts;
            let (g, u, d) = (e.gate_proj.clone(), e.up_proj.clone(), e.down_proj.clone());
            e.gate_proj = narrow(g, 2);
            e.up_proj = narrow(u, 2);
            e.down_proj = narrow(d, 1);
            moe.expert_group = Some(group.clone());
        }
        self
    }

    /// The ids of the routed expert weights (which expert parallelism does not all-reduce).
    pub fn expert_param_ids(&self) -> std::collections::HashSet<burn::module::ParamId> {
        self.moe_layers()
            .flat_map(|m| {
                let e = &m.experts;
                [e.gate_proj.id, e.up_proj.id, e.down_proj.id]
            })
            .collect()
    }

    /// The expert-parallel group the model runs in, if any.
    pub fn expert_group(&self) -> Option<&ExpertGroup> {
        self.moe_layers().find_map(|m| m.expert_group.as_ref())
    }

    /// The parameter path of every MoE layer (`layers.3.moe`), in [`Self::moe_layers`]'s order.
    pub fn moe_paths(&self) -> Vec<String> {
        let decoder = self.layers.iter().enumerate();
        let decoder =
            decoder.filter_map(|(i, l)| l.moe.as_ref().map(|_| format!("layers.{i}.moe")));
        let mtp = self.mtp_layers.iter().enumerate();
        let mtp = mtp.filter_map(|(j, l)| {
            l.decoder
                .moe
                .as_ref()
                .map(|_| format!("mtp_layers.{j}.decoder.moe"))
        });
        decoder.chain(mtp).collect()
    }

    /// Each MoE layer's expert order over the slots ([`balanced_order`]), in
    /// [`Self::moe_layers`]'s order; `None` where slot `p` holds expert `p`.
    pub fn set_expert_orders(&mut self, orders: &[Option<Vec<usize>>]) {
        for (moe, order) in self.moe_layers_mut().zip(orders) {
            moe.expert_order = order.clone();
        }
    }
}

/// Per-layer expert orders (shared boundaries): a MoE layer's router may send nearly all its
/// tokens to two experts, and which two differs between layers and drifts between steps — no
/// one placement of expert numbers suits every layer. So each layer lays its experts over the
/// placement's slots in its own order, the one its recent loads ask for (DeepSeek's EPLB idea,
/// by load and per layer): its busiest experts in the shared windows, where each micro-batch's
/// rows are split by the members' weights, the rest spread so that no member's own experts
/// hold more than its share. `order[slot]` is the expert the slot holds; the stacked expert
/// tensors of the layer hold the experts in slot order, and the placement splits the slots.
pub fn balanced_order(load: &[f64], placement: &Placement) -> Vec<usize> {
    let experts = load.len();
    let Some(shared) = placement
        .shared
        .as_ref()
        .filter(|_| placement.experts() == experts)
    else {
        return (0..experts).collect();
    };
    let members = placement.members();
    let mut by_load: Vec<usize> = (0..experts).collect();
    by_load.sort_by(|&a, &b| load[b].total_cmp(&load[a]).then(a.cmp(&b)));
    let (windows, own) = slot_kinds(placement);
    let mut order = vec![usize::MAX; experts];
    let mut hottest = by_load.into_iter();
    for slots in &windows {
        for (&slot, e) in slots.iter().zip(hottest.by_ref()) {
            order[slot] = e;
        }
    }
    // The rest, busiest first, each to the member with the most room left under its share.
    let total: f64 = load.iter().sum();
    let mut room: Vec<f64> = (0..members).map(|m| total * shared.share(m)).collect();
    let mut next = vec![0; members];
    for e in hottest {
        let free = (0..members).filter(|&m| next[m] < own[m].len());
        let Some(m) = free.max_by(|&a, &b| room[a].total_cmp(&room[b]).then(b.cmp(&a))) else {
            break;
        };
        order[own[m][next[m]]] = e;
        next[m] += 1;
        room[m] -= load[e];
    }
    order
}

/// The slots of each shared window (member `m` and `m + 1`'s) and of each member's own
/// experts.
fn slot_kinds(placement: &Placement) -> (Vec<Vec<usize>>, Vec<Vec<usize>>) {
    let members = placement.members();
    let shared = placement.shared_experts();
    let mut windows = Vec::with_capacity(members.saturating_sub(1));
    let mut own = Vec::with_capacity(members);
    for m in 0..members {
        let range = placement.range(m);
        let k = shared.get(m).copied().unwrap_or(0);
        let first = range.start + placement.leading_shared(m);
        own.push((first..range.end - k).collect());
        if m + 1 < members {
            windows.push((range.end - k..range.end).collect());
        }
    }
    (windows, own)
}

/// How near the members' expert work comes to their weights' shares when a layer's experts
/// lie in `order` and carry `load` rows: the ideal time over the slowest member's (1:
/// balanced), with each shared window's rows split as [`Placement::split_rows`] splits them.
pub fn expert_balance(load: &[f64], order: &[usize], placement: &Placement) -> f64 {
    let Some(shared) = &placement.shared else {
        return 1.0;
    };
    let rows: Vec<usize> = order.iter().map(|&e| load[e].max(0.0) as usize).collect();
    let split = placement.split_rows(1, |_, slot| rows[slot]);
    let total: usize = rows.iter().sum();
    let slowest = (0..placement.members())
        .map(|m| {
            let work: usize = (0..rows.len()).map(|slot| split.rows(0, slot, m)).sum();
            work as f64 / shared.share(m).max(1e-12)
        })
        .fold(0.0, f64::max);
    match slowest > 0.0 {
        true => total as f64 / slowest,
        false => 1.0,
    }
}

/// Re-lays a whole stacked expert tensor (or its flat moments: expert after expert) from the
/// slot order `from` to the slot order `to`.
pub fn reorder_experts(data: &[f32], from: &[usize], to: &[usize]) -> Vec<f32> {
    let per = data.len() / from.len().max(1);
    let mut slot_of = vec![0; from.len()];
    for (slot, &e) in from.iter().enumerate() {
        slot_of[e] = slot;
    }
    let mut out = Vec::with_capacity(data.len());
    for &e in to {
        let at = slot_of[e] * per;
        out.extend_from_slice(&data[at..at + per]);
    }
    out
}

/// The MoE layer a routed-expert tensor's name (or its moments') belongs to: its path up to
/// `.moe` (`layers.3.moe`).
pub fn moe_path(name: &str) -> Option<&str> {
    name.find(".moe.experts.").map(|at| &name[..at + 4])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fitted_columns_equalise_expert_phases_with_work_on_every_row() {
        // Member 1 runs at half speed; each phase costs 1 per column and 60 whatever the
        // columns. Measured at 128 : 128 the times differ by speed alone: nothing to fit.
        let phase = |c: usize, v: f64| (c as f64 + 60.0) / v;
        let speeds = [2.0, 1.0];
        let equal = [phase(128, 2.0), phase(128, 1.0)];
        assert!(Placement::by_width_fitted(8, &[128, 128], &equal, &speeds, &[]).is_none());
        // In proportion to speed (171 : 85) the slow member's phase is longer...
        let seconds = [phase(171, 2.0), phase(85, 1.0)];
        assert!(seconds[1] > seconds[0] * 1.1);
        let fitted = Placement::by_width_fitted(8, &[171, 85], &seconds, &speeds, &[]).unwrap();
        let c = fitted.columns.clone().unwrap();
        assert_eq!(c.iter().sum::<usize>(), 256);
        assert_eq!(fitted.counts, [8, 8]);
        // ...fitted, they take the same time: (c0 + 60) / 2 = c1 + 60, c0 + c1 = 256.
        let (t0, t1) = (phase(c[0], 2.0), phase(c[1], 1.0));
        assert!((t0 - t1).abs() < 1.5, "{c:?}: {t0} vs {t1}");
        assert_eq!(c, [191, 65]);
    }

    #[test]
    fn rows_arriving_member_after_member_are_regrouped_expert_after_expert_and_back() {
        // Member 0 sends 2 rows for expert 0, none for 1, 1 for 2; member 1 sends 1, 2, 0.
        let arrived = [[2, 0, 1], [1, 2, 0]];
        let (moves, per_expert) = regroup_by_expert(2, 3, |m, e| arrived[m][e]);
        assert_eq!(per_expert, [3, 2, 1]);
        // Row r holds the values [r, r + 0.5] (two columns).
        let rows: Vec<f32> = (0..6).flat_map(|r| [r as f32, r as f32 + 0.5]).collect();
        let grouped = apply_moves(&moves, &rows, 2);
        // Arrival: m0e0 = rows 0, 1; m0e2 = 2; m1e0 = 3; m1e1 = 4, 5.
        let order: Vec<f32> = grouped.chunks(2).map(|r| r[0]).collect();
        assert_eq!(order, [0.0, 1.0, 3.0, 4.0, 5.0, 2.0]);
        assert!(grouped.chunks(2).all(|r| r[1] == r[0] + 0.5));
        assert_eq!(apply_moves(&inverse(&moves), &grouped, 2), rows);
        // The same rows as blocks (this rank's own between received ones, an empty one too).
        let blocks = [&rows[..4], &rows[4..4], &rows[4..6], &rows[6..]];
        assert_eq!(apply_moves_from(&moves, &blocks, 2), grouped);
        let sum = sum_blocks(&[&[1.0, 2.0], &[], &[10.0, 20.0]], 2);
        assert_eq!(sum, [11.0, 22.0]);
    }

    #[test]
    fn placements_cover_every_expert_once() {
        let p = Placement::proportional(8, &[3.0, 1.0]);
        assert_eq!(p.counts, [6, 2]);
        assert_eq!(p.range(1), 6..8);
        assert_eq!((p.owner(5), p.owner(6)), (0, 1));
        let p = Placement::proportional(4, &[100.0, 1.0, 1.0]);
        assert_eq!(p.counts, [2, 1, 1], "every member owns one");
        assert_eq!(Placement::equal(5, 2).counts.iter().sum::<usize>(), 5);
        // A member whose memory holds 2 experts gets no more, however fast.
        let caps = [None, Some(2)];
        let p = Placement::proportional_within(8, &[1.0, 3.0], &caps);
        assert_eq!(p.counts, [6, 2]);
        assert!(p.within(&caps) && !Placement::equal(8, 2).within(&caps));
        let w = Placement::by_width_within(8, 256, &[1.0, 1.0], &[Some(100), None]);
        assert_eq!(w.columns.as_deref(), Some(&[100, 156][..]));
        // Phases as in the fit's own test (fitted 191 : 65), the slow member capped at 40.
        let seconds = [(171.0 + 60.0) / 2.0, 85.0 + 60.0];
        let fitted =
            Placement::by_width_fitted(8, &[171, 85], &seconds, &[2.0, 1.0], &[None, Some(40)]);
        assert_eq!(fitted.and_then(|f| f.columns), Some(vec![216, 40]));
        assert!(is_routed_expert(
            "layers.1.moe.experts.down_proj.exp_avg_sq"
        ));
        assert!(!is_routed_expert(
            "layers.1.moe.shared_experts.down_proj.weight"
        ));
    }

    #[test]
    fn each_layer_lays_its_busiest_experts_in_the_shared_window() {
        // Member 0 twice as fast: slots 0..4 its own, 4 and 5 shared, 6 and 7 member 1's.
        let p = Placement::shared_within(8, &[2.0, 1.0], 2, &[]);
        assert_eq!(p.counts, [6, 4]);
        // A collapsed router: experts 3 and 6 take nearly every row.
        let mut load = vec![10.0; 8];
        (load[3], load[6]) = (1000.0, 900.0);
        let identity: Vec<usize> = (0..8).collect();
        // In expert order member 1 holds expert 6 alone: 900 of 2 000 rows, against its
        // third; it sets the pace.
        let before = expert_balance(&load, &identity, &p);
        assert!(before < 0.8, "{before}");
        let order = balanced_order(&load, &p);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, identity, "a permutation: {order:?}");
        assert_eq!(
            &order[4..6],
            &[3, 6],
            "the busiest in the window: {order:?}"
        );
        let after = expert_balance(&load, &order, &p);
        assert!(after > 0.97, "{after}");
        // The rest by room: member 1's two own slots take no more than its share.
        let own_1: f64 = order[6..].iter().map(|&e| load[e]).sum();
        assert!(own_1 <= 2000.0 / 3.0, "{own_1}");
        // Even loads: every order balances (the window takes up the difference).
        assert!(expert_balance(&[100.0; 8], &identity, &p) > 0.99);
        // Re-laying a stacked tensor (2 values per expert) follows the orders, both ways.
        let whole: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let laid = reorder_experts(&whole, &identity, &order);
        for (slot, &e) in order.iter().enumerate() {
            assert_eq!(laid[slot * 2..slot * 2 + 2], whole[e * 2..e * 2 + 2]);
        }
        assert_eq!(reorder_experts(&laid, &order, &identity), whole);
        assert_eq!(
            moe_path("layers.3.moe.experts.up_proj.exp_avg"),
            Some("layers.3.moe")
        );
        assert_eq!(moe_path("layers.3.moe.gate.weight"), None);
        // Split by experts or by width, there is no window: orders stay as they are.
        assert_eq!(balanced_order(&load, &Placement::equal(8, 2)), identity);
    }

    #[test]
    fn shared_boundaries_split_each_micro_batchs_rows_by_weight() {
        // Member 0 twice as fast: the proportional cut at 5.33 experts, two shared around it.
        let p = Placement::shared_within(8, &[2.0, 1.0], 2, &[]);
        assert_eq!(p.counts, [6, 4]);
        assert_eq!(p.shared.as_ref().map(|s| s.experts.clone()), Some(vec![2]));
        assert_eq!((p.experts(), p.range(0), p.range(1)), (8, 0..6, 4..8));
        assert_eq!((p.owner(5), p.owner(6), p.leading_shared(1)), (0, 1, 2));
        // Member 1's part of a stacked tensor: experts 4..8 of the whole.
        let (whole, runs) = p.runs(1, "layers.1.moe.experts.up_proj", 4 * 10);
        assert_eq!((whole, runs.offset, runs.len), (80, 40, 40));
        // Two sources; expert 1 hot, the shared experts 4 and 5 carrying 60 rows.
        let rows = [[10, 50, 5, 5, 20, 10, 5, 5], [10, 40, 5, 5, 10, 20, 5, 5]];
        let split = p.split_rows(2, |s, e| rows[s][e]);
        let total: usize = rows.iter().flatten().sum();
        let ran = |m: usize| -> usize {
            (0..2)
                .flat_map(|s| (0..8).map(move |e| (s, e)))
                .map(|(s, e)| split.rows(s, e, m))
                .sum()
        };
        assert_eq!(ran(0) + ran(1), total, "every row runs once");
        // Member 0 runs two thirds of the 210 rows (140): its whole experts' 130 and the
        // first 10 of the 60 shared ones.
        assert_eq!(ran(0), 140);
        for (s, source) in rows.iter().enumerate() {
            for (e, &n) in source.iter().enumerate() {
                let (low, high) = (split.rows(s, e, 0), split.rows(s, e, 1));
                assert_eq!(low + high, n);
                assert!(e >= 4 || high == 0, "expert {e} is member 0's alone");
                assert!(e <= 5 || low == 0, "expert {e} is member 1's alone");
            }
            // Each source's rows in expert order go to member 0, then member 1 (as sent).
            let order: Vec<usize> = (0..8)
                .flat_map(|e| {
                    let parts = [(0, split.rows(s, e, 0)), (1, split.rows(s, e, 1))];
                    parts.into_iter().filter(|p| p.1 > 0).map(|p| p.0)
                })
                .collect();
            assert!(
                order.windows(2).all(|w| w[0] <= w[1]),
                "source {s}: {order:?}"
            );
        }
        // Without room for two shared experts within the members' memories, one; without
        // room for any, the proportional split.
        let one = Placement::shared_within(8, &[1.0, 1.0], 2, &[Some(5), Some(4)]);
        assert_eq!(
            (one.counts.clone(), one.shared_experts().to_vec()),
            (vec![5, 4], vec![1])
        );
        let none = Placement::shared_within(8, &[1.0, 1.0], 2, &[Some(4), Some(4)]);
        assert_eq!(
            (none.counts.clone(), none.shared_experts().to_vec()),
            (vec![4, 4], vec![0])
        );
        assert_eq!(none.split_rows(2, |s, e| rows[s][e]).rows(0, 4, 1), 20);
        // Four members, three boundaries.
        let four = Placement::shared_within(16, &[1.0; 4], 2, &[]);
        assert_eq!(four.counts, [5, 6, 6, 5]);
        assert_eq!(four.range(2), 7..13);
    }

    #[test]
    fn a_split_by_width_takes_each_members_columns_of_every_expert() {
        let p = Placement::by_width(2, 4, &[3.0, 1.0]);
        assert_eq!(
            (p.counts.clone(), p.columns.clone()),
            (vec![2, 2], Some(vec![3, 1]))
        );
        assert_eq!((p.experts(), p.range(1)), (2, 0..2));
        // gate `[2 experts, 3 hidden, 4 width]`: member 1 holds column 3 of each of 6 rows.
        let whole: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let gate = "layers.1.moe.experts.gate_proj";
        let (len, runs) = p.runs(1, gate, 6);
        assert_eq!(len, 24);
        assert_eq!(runs.take(&whole), [3.0, 7.0, 11.0, 15.0, 19.0, 23.0]);
        assert_eq!(p.part_shape(1, gate, &[2, 3, 4]), [2, 3, 1]);
        assert_eq!(p.whole_shape(1, gate, &[2, 3, 1]), [2, 3, 4]);
        // down `[2 experts, 4 width, 3 hidden]`: member 0 holds rows 0..3 of each expert.
        let down = "layers.1.moe.experts.down_proj.exp_avg";
        let (len, runs) = p.runs(0, down, 18);
        assert_eq!(len, 24);
        let part = runs.take(&whole);
        let expected: Vec<f32> = (0..9).chain(12..21).map(|v| v as f32).collect();
        assert_eq!(part, expected);
        assert_eq!(p.part_len(0, down, 24), 18);
        // The two members' parts put back tile the whole.
        let mut rebuilt = vec![0.0; 24];
        runs.put(&part, &mut rebuilt);
        p.runs(1, down, 6)
            .1
            .put(&p.runs(1, down, 6).1.take(&whole), &mut rebuilt);
        assert_eq!(rebuilt, whole);
    }
}
