//! The cost model: memory per device and time per step of one parallel layout on one or more
//! kinds of device.
//!
//! The runtime priced is `nuwa train`'s, so that a plan that fits here fits when it runs.
//!
//! Memory: f32 weights, gradients and AdamW's two moments (16 B/param,
//! `nuwa_model::TRAIN_BYTES_PER_PARAM`) on every device holding a parameter — nuwa shards no
//! optimiser state over data-parallel replicas; the activations autodiff keeps per token and
//! layer (`ModelConfig::activation_bytes_per_token_layer`, the trainer's own estimate) for the
//! micro-batches a 1F1B pipeline keeps in flight, and the head's logits for one micro-batch;
//! plus the MoE dispatch buffers and, for parameters several replicas hold, the gradient
//! all-reduce's host copies (8 B/param). nuwa has no activation recomputation, so no layout uses it.
//!
//! Time: model FLOPs at the device's peak times a calibrated efficiency, plus the pipeline
//! bubble, tensor-parallel all-reduces and expert all-to-alls, plus the data-parallel
//! all-reduce of f32 gradients — none overlapped (nuwa's backward pass is one call, and the
//! all-reduce follows it).

use crate::catalogue::Available;
pub use nuwa_model::expert_parallel::ExpertSplit;
use nuwa_model::ModelConfig;
use serde::Serialize;

/// How a model is laid out over devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub tp: usize,
    pub pp: usize,
    pub ep: usize,
    pub micro_batch: usize,
    /// How an expert group splits the routed experts (with `ep` > 1).
    pub expert_split: ExpertSplit,
}

impl Default for Layout {
    /// One device: no tensor, pipeline or expert parallelism, micro-batches of one.
    fn default() -> Self {
        Self {
            tp: 1,
            pp: 1,
            ep: 1,
            micro_batch: 1,
            expert_split: ExpertSplit::Experts,
        }
    }
}

/// The run being planned.
#[derive(Debug, Clone)]
pub struct Workload {
    pub model: ModelConfig,
    pub seq_len: usize,
    /// Sequences per optimiser step.
    pub global_batch: usize,
    pub tokens: f64,
}

impl Workload {
    pub fn flops_per_token(&self) -> f64 {
        self.model.counts(self.seq_len).train_flops_per_token
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub weights_and_grads: f64,
    pub optimizer: f64,
    pub activations: f64,
    pub moe_buffers: f64,
    /// The data-parallel gradient all-reduce's host copy of the replicated gradients and the
    /// gradients rebuilt from it.
    pub gradient_all_reduce: f64,
    pub total: f64,
    pub capacity: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepTime {
    pub compute: f64,
    pub bubble: f64,
    pub tensor_parallel: f64,
    pub expert_all_to_all: f64,
    pub data_parallel_exposed: f64,
    pub total: f64,
}

/// One device kind's part of a plan.
#[derive(Debug, Clone, Serialize)]
pub struct Part {
    pub device: String,
    pub count: usize,
    pub replicas: usize,
    /// Sequences per step this kind's replicas take, in total.
    pub sequences: usize,
    pub memory: Memory,
    pub step: StepTime,
}

/// Parameters held per device: (dense, expert).
fn params_per_device(cfg: &ModelConfig, l: &Layout) -> (f64, f64) {
    let counts = cfg.counts(1);
    let expert_total = if cfg.is_moe() {
        let layers = (0..cfg.num_hidden_layers)
            .filter(|&i| cfg.layer_is_moe(i))
            .count();
        (layers as u64 * cfg.routed_expert_params()) as f64
    } else {
        0.0
    };
    let dense = counts.total_params as f64 - expert_total;
    let shard = (l.tp * l.pp) as f64;
    let mut experts = expert_total / shard / l.ep as f64;
    if l.expert_split == ExpertSplit::Shared && l.ep > 1 && cfg.num_experts > 0 {
        // A middle member also holds the experts it shares with each neighbour.
        let k = nuwa_model::expert_parallel::shared_per_boundary(cfg.num_experts, l.ep);
        let neighbours = if l.ep > 2 { 2 } else { 1 };
        experts += (k * neighbours) as f64 * expert_total / shard / cfg.num_experts as f64;
    }
    (dense / shard, experts)
}

pub fn memory(w: &Workload, d: &Available, l: &Layout, dp: usize) -> Memory {
    let cfg = &w.model;
    let (dense, expert) = params_per_device(cfg, l);
    // Of the 16 B a parameter: the f32 weight and gradient, then AdamW's two moments.
    let weights_and_grads = 8.0 * (dense + expert);
    let optimizer = (nuwa_model::TRAIN_BYTES_PER_PARAM - 8.0) * (dense + expert);
    let (s, b, h) = (
        w.seq_len as f64,
        l.micro_batch as f64,
        cfg.hidden_size as f64,
    );
    let tokens = s * b;
    let per_layer = tokens * cfg.activation_bytes_per_token_layer(w.seq_len) / l.tp as f64;
    let layers = (cfg.num_hidden_layers / l.pp) as f64;
    let micro = (w.global_batch / dp / l.micro_batch).max(1);
    let in_flight = l.pp.min(micro) as f64;
    // The last stage's: its layers' and the head's (the largest stage is priced).
    let activations =
        per_layer * layers * in_flight + tokens * cfg.head_activation_bytes_per_token();
    let moe_buffers = if cfg.is_moe() {
        4.0 * s * b * cfg.num_experts_per_tok as f64 * h * 2.0
    } else {
        0.0
    };
    // A parameter held by several replicas has its gradient summed through host memory:
    // copied out flat and rebuilt (`all_reduce_gradients`), 8 B more while both live.
    let expert_replicas = dp / l.ep.max(1);
    let replicated = match (dp > 1, expert_replicas > 1) {
        (false, _) => 0.0,
        (true, false) => dense,
        (true, true) => dense + expert,
    };
    let gradient_all_reduce = 8.0 * replicated;
    let total = weights_and_grads + optimizer + activations + moe_buffers + gradient_all_reduce;
    Memory {
        weights_and_grads,
        optimizer,
        activations,
        moe_buffers,
        gradient_all_reduce,
        total,
        capacity: d.memory_bytes,
    }
}

/// Time for one replica (tp·pp devices) to process `sequences` of the step, and its
/// exposed share of the data-parallel all-reduce over `dp` replicas linked at `dp_bw`.
pub fn step_time(
    w: &Workload,
    d: &Available,
    l: &Layout,
    efficiency: f64,
    sequences: usize,
    dp: usize,
    dp_bw: f64,
) -> StepTime {
    let cfg = &w.model;
    let tokens = (sequences * w.seq_len) as f64;
    let devices = (l.tp * l.pp) as f64;
    let compute = tokens * w.flops_per_token() / (devices * d.peak_flops * efficiency);
    let micro = (sequences / l.micro_batch).max(1) as f64;
    let bubble = compute * (l.pp as f64 - 1.0) / micro;
    let (s, b, h) = (
        w.seq_len as f64,
        l.micro_batch as f64,
        cfg.hidden_size as f64,
    );
    let layers_per_stage = (cfg.num_hidden_layers / l.pp) as f64;
    let tensor_parallel = if l.tp > 1 {
        let bytes = 4.0 * 2.0 * (l.tp as f64 - 1.0) / l.tp as f64 * s * b * h * 2.0;
        bytes / d.intra_node_bytes_s * layers_per_stage * micro
    } else {
        0.0
    };
    let moe_layers_per_stage = (0..cfg.num_hidden_layers)
        .filter(|&i| cfg.layer_is_moe(i))
        .count() as f64
        / l.pp as f64;
    let expert_all_to_all = if cfg.is_moe() && l.ep > 1 {
        let bw = if l.ep * l.tp <= d.per_node {
            d.intra_node_bytes_s
        } else {
            d.inter_node_bytes_s
        };
        // Each way, a rank's (token, expert) rows go to the owners of their experts: the
        // other ranks' share of them. Split by width, every row goes to every other rank.
        let sent_to_others = match l.expert_split {
            ExpertSplit::Experts | ExpertSplit::Shared => (l.ep as f64 - 1.0) / l.ep as f64,
            ExpertSplit::Width => l.ep as f64 - 1.0,
        };
        let bytes = 4.0 * s * b * cfg.num_experts_per_tok as f64 * h * 2.0 * sent_to_others;
        bytes / bw * moe_layers_per_stage * micro
    } else {
        0.0
    };
    let (dense, expert) = params_per_device(cfg, l);
    let data_parallel_exposed = if dp > 1 {
        // A ring all-reduce of f32 gradients, after the backward pass.
        let bytes = 4.0 * (dense + expert) * 2.0 * (dp as f64 - 1.0) / dp as f64;
        bytes / dp_bw
    } else {
        0.0
    };
    let total = compute + bubble + tensor_parallel + expert_all_to_all + data_parallel_exposed;
    StepTime {
        compute,
        bubble,
        tensor_parallel,
        expert_all_to_all,
        data_parallel_exposed,
        total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Available {
        Available {
            name: "X".into(),
            count: 64,
            peak_flops: 1e15,
            memory_bytes: 80e9,
            price_per_hour: 1.0,
            domestic: true,
            intra_node_bytes_s: 900e9,
            inter_node_bytes_s: 50e9,
            per_node: 8,
            assumed: vec![],
        }
    }

    #[test]
    fn compute_time_is_flops_over_peak_times_efficiency() {
        let w = Workload {
            model: ModelConfig::preset("tiny-dense").unwrap(),
            seq_len: 64,
            global_batch: 8,
            tokens: 1e6,
        };
        let l = Layout {
            micro_batch: 8,
            ..Layout::default()
        };
        let t = step_time(&w, &device(), &l, 0.5, 8, 1, 50e9);
        let want = 8.0 * 64.0 * w.flops_per_token() / (1e15 * 0.5);
        assert!((t.total - want).abs() / want < 1e-12);
    }

    #[test]
    fn a_split_by_width_sends_every_row_to_every_other_rank() {
        let w = Workload {
            model: ModelConfig::preset("tiny-moe").unwrap(),
            seq_len: 64,
            global_batch: 8,
            tokens: 1e6,
        };
        let by = |ep, expert_split| {
            let l = Layout {
                ep,
                micro_batch: 4,
                expert_split,
                ..Layout::default()
            };
            step_time(&w, &device(), &l, 0.5, 4, 4, 50e9).expert_all_to_all
        };
        for ep in [2, 4] {
            let (experts, width) = (by(ep, ExpertSplit::Experts), by(ep, ExpertSplit::Width));
            assert!(experts > 0.0);
            // (ep - 1) / ep of the rows leave a rank by experts; ep - 1 copies by width.
            assert!((width / experts - ep as f64).abs() < 1e-9, "ep {ep}");
        }
        assert_eq!(by(1, ExpertSplit::Width), 0.0);
    }

    #[test]
    fn sharding_divides_the_weights() {
        let w = Workload {
            model: ModelConfig::preset("ling-lite").unwrap(),
            seq_len: 4096,
            global_batch: 512,
            tokens: 1e12,
        };
        let base = Layout::default();
        let one = memory(&w, &device(), &base, 8);
        let four = memory(&w, &device(), &Layout { pp: 4, ..base }, 8);
        assert!((one.weights_and_grads / four.weights_and_grads - 4.0).abs() < 1e-9);
        // 16.8B params × 8 B = 134 GB of f32 weights and gradients on one device, and as
        // much again of AdamW moments (not sharded over the 8 replicas: nuwa does not).
        assert!(
            (one.weights_and_grads / 1e9 - 134.4).abs() < 1.0,
            "{}",
            one.weights_and_grads
        );
        assert_eq!(one.optimizer, one.weights_and_grads);
    }
}
