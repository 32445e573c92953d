//! Enumerates plans (one or two device kinds, their counts, one parallel layout), prices them,
//! checks the constraints and ranks the feasible ones.

use crate::catalogue::Available;
use crate::cost::{memory, step_time, ExpertSplit, Layout, Part, Workload};
use nuwa_core::proportional_shares;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    Cost,
    Time,
}

#[derive(Debug, Clone)]
pub struct Constraints {
    pub deadline_days: Option<f64>,
    pub budget: Option<f64>,
    /// Least fraction of the plan's devices that must be domestic.
    pub domestic_share: Option<f64>,
}

/// Memory kept free for the framework, fragmentation and workspace.
pub const MEMORY_RESERVE: f64 = 0.10;
/// Throughput lost to balancing when replicas of different speeds share a step.
pub const MIXED_BALANCE_EFFICIENCY: f64 = 0.95;

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub parts: Vec<Part>,
    pub layout: Layout,
    pub step_seconds: f64,
    pub days: f64,
    pub total_cost: f64,
    pub cost_per_trillion: f64,
    pub mfu: f64,
    /// Smallest fraction of memory left free on any device.
    pub memory_headroom: f64,
    pub domestic_share: f64,
    pub devices: usize,
    /// Constraints this plan breaks, with by how much (empty when feasible).
    pub violations: Vec<String>,
}

impl Plan {
    pub fn describe(&self) -> String {
        self.parts
            .iter()
            .map(|p| format!("{}×{}", p.count, p.device))
            .collect::<Vec<_>>()
            .join(" + ")
    }

    /// The part whose devices' memory is fullest.
    pub fn fullest_part(&self) -> Option<&Part> {
        let fill = |p: &&Part| p.memory.total / p.memory.capacity;
        self.parts.iter().max_by(|a, b| fill(a).total_cmp(&fill(b)))
    }

    pub fn layout_text(&self) -> String {
        let l = &self.layout;
        let split = match l.expert_split {
            ExpertSplit::Width if l.ep > 1 => "/width",
            ExpertSplit::Shared if l.ep > 1 => "/shared",
            _ => "",
        };
        format!(
            "tp{} pp{} ep{}{} mb{}",
            l.tp, l.pp, l.ep, split, l.micro_batch,
        )
    }
}

fn powers_of_two_up_to(max: usize) -> Vec<usize> {
    std::iter::successors(Some(1usize), |x| x.checked_mul(2))
        .take_while(|&x| x <= max)
        .collect()
}

/// Device counts to try for one kind: multiples of the layout's group size, doubling, and the
/// whole inventory.
fn counts(group: usize, available: usize) -> Vec<usize> {
    let mut out: Vec<usize> = powers_of_two_up_to(available / group.max(1))
        .into_iter()
        .map(|k| k * group)
        .collect();
    let all = available / group * group;
    if all > 0 && !out.contains(&all) {
        out.push(all);
    }
    out
}

fn layouts(w: &Workload, per_node: usize) -> Vec<Layout> {
    let cfg = &w.model;
    let mut out = Vec::new();
    // Only layouts `nuwa train` runs: pipeline and expert parallelism over data parallelism;
    // tensor parallelism is not implemented yet, so tp stays 1.
    let _ = per_node;
    for tp in [1] {
        // Heads split over tensor-parallel ranks; KV heads split too, or are replicated when
        // there are fewer of them than ranks.
        let kv = cfg.num_key_value_heads;
        let kv_ok = kv.is_multiple_of(tp) || (tp > kv && tp.is_multiple_of(kv));
        if !cfg.num_attention_heads.is_multiple_of(tp) || !kv_ok {
            continue;
        }
        for pp in powers_of_two_up_to(16) {
            if !cfg.num_hidden_layers.is_multiple_of(pp) {
                continue;
            }
            let eps = if cfg.is_moe() {
                powers_of_two_up_to(cfg.num_experts.min(64))
                    .into_iter()
                    .filter(|e| cfg.num_experts.is_multiple_of(*e))
                    .collect()
            } else {
                vec![1]
            };
            for &ep in &eps {
                // No activation recomputation: nuwa train has none.
                for micro_batch in [1, 2, 4] {
                    out.push(Layout {
                        tp,
                        pp,
                        ep,
                        micro_batch,
                        expert_split: ExpertSplit::Experts,
                    });
                }
            }
        }
    }
    out
}

/// How expert groups split the experts when replicas come `replicas` per kind, kind after kind
/// (ranks are laid out so): groups are `ep` consecutive replicas, and one that spans two
/// kinds has ranks of unequal speed. Split by experts, their expert work follows where the
/// router sends tokens (benchmarked here from initialisation, one rank at half speed: 83% of
/// the ranks' summed throughput); with shared boundaries, each micro-batch's rows of the
/// shared experts follow the ranks' speeds and each layer lays its busiest experts there
/// (89% at hidden 256 and 512, 90–91% in steady state); split by width, every row goes to
/// every rank (78% and 89%). So mixed groups share their boundaries and the rest are split by
/// experts, which holds each expert once.
fn expert_split_for(replicas: &[usize], ep: usize) -> ExpertSplit {
    let mut boundary = 0;
    for r in &replicas[..replicas.len().saturating_sub(1)] {
        boundary += r;
        if ep > 1 && !boundary.is_multiple_of(ep) {
            return ExpertSplit::Shared;
        }
    }
    ExpertSplit::Experts
}

/// Prices one candidate: `kinds` with their counts, all on `layout`.
fn evaluate(
    w: &Workload,
    kinds: &[(&Available, usize, f64)],
    layout: Layout,
    c: &Constraints,
) -> Option<Plan> {
    let group = layout.tp * layout.pp;
    let replicas: Vec<usize> = kinds.iter().map(|(_, n, _)| n / group).collect();
    let dp: usize = replicas.iter().sum();
    if dp == 0 || !dp.is_multiple_of(layout.ep) || w.global_batch < dp * layout.micro_batch {
        return None;
    }
    let layout = Layout {
        expert_split: expert_split_for(&replicas, layout.ep),
        ..layout
    };
    // Throughput-balanced split of the global batch across replicas (by per-sequence speed).
    let dp_bw = kinds
        .iter()
        .map(|(d, _, _)| d.inter_node_bytes_s)
        .fold(f64::INFINITY, f64::min);
    let speeds: Vec<f64> = kinds
        .iter()
        .map(|(d, _, eff)| {
            let one = step_time(w, d, &layout, *eff, layout.micro_batch, dp, dp_bw);
            layout.micro_batch as f64
                / (one.compute + one.bubble + one.tensor_parallel + one.expert_all_to_all)
        })
        .collect();
    let kind_speeds: Vec<f64> = speeds
        .iter()
        .zip(&replicas)
        .map(|(s, r)| s * *r as f64)
        .collect();
    // The same split the data-parallel trainer makes from measured speeds.
    let shares = proportional_shares(w.global_batch, &kind_speeds, &[]);
    let mut parts = Vec::new();
    let mut step_seconds: f64 = 0.0;
    let mut headroom = f64::INFINITY;
    for (((d, n, eff), r), &share) in kinds.iter().zip(&replicas).zip(&shares) {
        let per_replica = share.div_ceil((*r).max(1));
        if per_replica < layout.micro_batch {
            return None;
        }
        let mem = memory(w, d, &layout, dp);
        headroom = headroom.min(1.0 - mem.total / mem.capacity);
        let st = step_time(w, d, &layout, *eff, per_replica, dp, dp_bw);
        step_seconds = step_seconds.max(st.total);
        parts.push(Part {
            device: d.name.clone(),
            count: *n,
            replicas: *r,
            sequences: share,
            memory: mem,
            step: st,
        });
    }
    if kinds.len() > 1 {
        step_seconds /= MIXED_BALANCE_EFFICIENCY;
    }
    let steps = w.tokens / (w.global_batch * w.seq_len) as f64;
    let seconds = steps * step_seconds;
    let hours = seconds / 3600.0;
    let price_per_hour: f64 = kinds
        .iter()
        .map(|(d, n, _)| d.price_per_hour * *n as f64)
        .sum();
    let total_cost = hours * price_per_hour;
    let devices: usize = kinds.iter().map(|(_, n, _)| n).sum();
    let domestic: usize = kinds
        .iter()
        .filter(|(d, _, _)| d.domestic)
        .map(|(_, n, _)| n)
        .sum();
    let peak: f64 = kinds.iter().map(|(d, n, _)| d.peak_flops * *n as f64).sum();
    let tokens_per_s = (w.global_batch * w.seq_len) as f64 / step_seconds;
    let mut plan = Plan {
        parts,
        layout,
        step_seconds,
        days: hours / 24.0,
        total_cost,
        cost_per_trillion: total_cost / w.tokens * 1e12,
        mfu: tokens_per_s * w.flops_per_token() / peak,
        memory_headroom: headroom,
        domestic_share: domestic as f64 / devices as f64,
        devices,
        violations: Vec::new(),
    };
    plan.violations = violations(&plan, c);
    Some(plan)
}

/// Every constraint `plan` breaks, one line each.
fn violations(plan: &Plan, c: &Constraints) -> Vec<String> {
    let mut out = Vec::new();
    if plan.memory_headroom < MEMORY_RESERVE {
        let worst = plan
            .fullest_part()
            .map(|p| {
                format!(
                    "memory: {} needs {:.1} GB per device, has {:.1} GB ({:.0}% kept free)",
                    p.device,
                    p.memory.total / 1e9,
                    p.memory.capacity / 1e9,
                    MEMORY_RESERVE * 100.0
                )
            })
            .unwrap_or_default();
        out.push(worst);
    }
    if let Some(days) = c.deadline_days {
        if plan.days > days {
            out.push(format!(
                "deadline: takes {:.1} days, {:.1} over {days} d",
                plan.days,
                plan.days - days
            ));
        }
    }
    if let Some(b) = c.budget {
        let cost = plan.total_cost;
        if cost > b {
            out.push(format!(
                "budget: costs {cost:.3e}, {:.3e} over {b:.3e}",
                cost - b
            ));
        }
    }
    if let Some(share) = c.domestic_share {
        if plan.domestic_share < share {
            out.push(format!(
                "domestic share: {:.0}% of devices, below {:.0}%",
                plan.domestic_share * 100.0,
                share * 100.0
            ));
        }
    }
    out
}

/// All candidate plans, feasible or not.
pub fn enumerate(
    w: &Workload,
    inventory: &[Available],
    efficiency: &dyn Fn(&str) -> f64,
    c: &Constraints,
) -> Vec<Plan> {
    let mut out = Vec::new();
    let per_node = inventory.iter().map(|d| d.per_node).min().unwrap_or(8);
    let layouts = layouts(w, per_node);
    for i in 0..inventory.len() {
        for j in i..inventory.len() {
            let a = &inventory[i];
            for &layout in &layouts {
                let group = layout.tp * layout.pp;
                for na in counts(group, a.count) {
                    if i == j {
                        out.extend(evaluate(w, &[(a, na, efficiency(&a.name))], layout, c));
                        continue;
                    }
                    let b = &inventory[j];
                    for nb in counts(group, b.count) {
                        let kinds = [(a, na, efficiency(&a.name)), (b, nb, efficiency(&b.name))];
                        out.extend(evaluate(w, &kinds, layout, c));
                    }
                }
            }
        }
    }
    out
}

/// Sorts by the objective (ties: the other one).
pub fn rank(plans: &mut [Plan], objective: Objective) {
    plans.sort_by(|a, b| match objective {
        Objective::Cost => a
            .total_cost
            .total_cmp(&b.total_cost)
            .then(a.days.total_cmp(&b.days)),
        Objective::Time => a
            .days
            .total_cmp(&b.days)
            .then(a.total_cost.total_cmp(&b.total_cost)),
    });
}

/// The cost-vs-time Pareto frontier of `plans` (sorted by time).
pub fn frontier(plans: &[Plan]) -> Vec<&Plan> {
    let mut sorted: Vec<&Plan> = plans.iter().collect();
    sorted.sort_by(|a, b| {
        a.days
            .total_cmp(&b.days)
            .then(a.total_cost.total_cmp(&b.total_cost))
    });
    let mut out: Vec<&Plan> = Vec::new();
    for p in sorted {
        if out.last().is_none_or(|last| p.total_cost < last.total_cost) {
            out.push(p);
        }
    }
    out
}

/// Why no plan is feasible: for each constraint, the best any plan does on it.
pub fn explain_infeasible(plans: &[Plan], c: &Constraints) -> String {
    let mut reasons = Vec::new();
    let fits: Vec<&Plan> = plans
        .iter()
        .filter(|p| p.memory_headroom >= MEMORY_RESERVE)
        .collect();
    if fits.is_empty() {
        let best = plans
            .iter()
            .max_by(|a, b| a.memory_headroom.total_cmp(&b.memory_headroom));
        let Some(best) = best else {
            return "no layout divides the model and the batch".to_string();
        };
        // What the fullest device of the best plan holds, in nuwa train's terms.
        let worst = best
            .fullest_part()
            .map(|p| {
                let m = &p.memory;
                let gb = |b: f64| b / 1e9;
                format!(
                    " ({}, {}: {:.0} GB of f32 weights, gradients and AdamW moments, {:.0} GB of \
                     activations, on {:.0} GB)",
                    p.device,
                    best.layout_text(),
                    gb(m.weights_and_grads + m.optimizer + m.gradient_all_reduce),
                    gb(m.activations + m.moe_buffers),
                    gb(m.capacity)
                )
            })
            .unwrap_or_default();
        reasons.push(format!(
            "no layout fits in memory: the best leaves {:.0}% free (need {:.0}%){worst}; add \
             devices with more memory, or train shorter sequences (--seq-len)",
            best.memory_headroom * 100.0,
            MEMORY_RESERVE * 100.0
        ));
    } else {
        if let Some(d) = c.deadline_days {
            let fastest = fits.iter().map(|p| p.days).fold(f64::INFINITY, f64::min);
            if fastest > d {
                reasons.push(format!(
                    "deadline {d} d: the fastest plan that fits takes {fastest:.1} days ({:.1} over)",
                    fastest - d
                ));
            }
        }
        if let Some(b) = c.budget {
            let cheapest = fits
                .iter()
                .map(|p| p.total_cost)
                .fold(f64::INFINITY, f64::min);
            if cheapest > b {
                reasons.push(format!(
                    "budget {b:.3e}: the cheapest plan that fits costs {cheapest:.3e} ({:.3e} over)",
                    cheapest - b
                ));
            }
        }
        if let Some(s) = c.domestic_share {
            let best = fits.iter().map(|p| p.domestic_share).fold(0.0, f64::max);
            if best < s {
                reasons.push(format!(
                    "domestic share {:.0}%: at most {:.0}% of a plan's devices can be domestic \
                     with this inventory",
                    s * 100.0,
                    best * 100.0
                ));
            }
        }
        if reasons.is_empty() {
            reasons.push("the constraints cannot all be met by the same plan".into());
        }
    }
    reasons.join("; ")
}

/// The tempting plans: rejected ones that would beat `best` by `objective` but break a
/// constraint, at most `most`, one per device mix and kind of violation so different reasons
/// show.
pub fn tempting<'a>(
    rejected: &'a [Plan],
    best: &Plan,
    objective: Objective,
    most: usize,
) -> Vec<&'a Plan> {
    let mut seen = std::collections::BTreeSet::new();
    rejected
        .iter()
        .filter(|p| match objective {
            Objective::Cost => p.total_cost < best.total_cost,
            Objective::Time => p.days < best.days,
        })
        .filter(|p| {
            let kind = p
                .violations
                .iter()
                .map(|v| v.split(':').next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join(",");
            seen.insert((p.describe(), kind))
        })
        .take(most)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_groups_spanning_two_kinds_of_device_share_their_boundaries() {
        // Replicas kind after kind; groups of `ep` consecutive replicas.
        assert_eq!(expert_split_for(&[4, 4], 2), ExpertSplit::Experts);
        assert_eq!(expert_split_for(&[1, 1], 2), ExpertSplit::Shared);
        assert_eq!(expert_split_for(&[3, 5], 2), ExpertSplit::Shared);
        assert_eq!(expert_split_for(&[2, 6], 4), ExpertSplit::Shared);
        assert_eq!(expert_split_for(&[4, 4], 4), ExpertSplit::Experts);
        assert_eq!(expert_split_for(&[3, 5], 1), ExpertSplit::Experts);
        assert_eq!(expert_split_for(&[6], 4), ExpertSplit::Experts);
    }
}
