//! Mixture-of-experts FFN with dropless dispatch: every token goes to its top-k experts, no
//! capacity limit, and each expert runs only on the tokens routed to it. The routed experts
//! are stacked tensors (`[experts, hidden, width]` and `[experts, width, hidden]`, as llama.cpp
//! and vLLM store them): the layout a grouped GEMM and expert-parallel slicing both need.

use crate::layers::{linear, SwiGlu};
use crate::trace;
use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear};
use burn::tensor::activation::{log_softmax, sigmoid, silu, softmax};
use burn::tensor::{Device, Distribution, IndexingUpdateOp, Int, Tensor, TensorData};

/// Router statistics of one MoE layer, for the auxiliary losses and the logs.
#[derive(Debug, Clone)]
pub struct RouterStats {
    /// Switch-style load-balance loss: `E · Σ_e f_e · P_e` (1.0 when perfectly balanced).
    pub load_balance: Tensor<1>,
    /// Router z-loss: `mean(logsumexp(logits)²)`.
    pub z_loss: Tensor<1>,
    /// Tokens (top-k assignments) each expert received.
    pub tokens_per_expert: Vec<usize>,
    /// Each expert's router probability averaged over the tokens, `P_e` (differentiable): with
    /// the global `f_e` it rebuilds the load-balance loss of a batch split across ranks.
    pub mean_prob: Tensor<1>,
}

/// The routed experts' SwiGLU weights, one slice per expert (no biases: Ling's, Qwen's and
/// Mixtral's experts have none).
#[derive(Module, Debug)]
pub struct Experts {
    /// `[experts, hidden, width]`.
    pub gate_proj: Param<Tensor<3>>,
    /// `[experts, hidden, width]`.
    pub up_proj: Param<Tensor<3>>,
    /// `[experts, width, hidden]`.
    pub down_proj: Param<Tensor<3>>,
}

impl Experts {
    pub fn new(experts: usize, hidden: usize, width: usize, device: &Device) -> Self {
        // Placeholders: weights are set by `init::init_weights` or loaded from a checkpoint.
        // Lazy, so a 290B-parameter layout can be inspected without allocating it.
        let zeros = |shape: [usize; 3]| Initializer::Zeros.init(shape, device);
        Self {
            gate_proj: zeros([experts, hidden, width]),
            up_proj: zeros([experts, hidden, width]),
            down_proj: zeros([experts, width, hidden]),
        }
    }

    pub fn len(&self) -> usize {
        self.gate_proj.lazy_shape()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every expert on its own tokens: `tokens[e]` are the rows of `x` `[tokens, hidden]` routed
    /// to expert `e`. Returns one output row per (expert, token) pair, expert after expert.
    ///
    /// With the grouped-matmul kernel (`kernels::grouped`), each stacked weight is one op
    /// forward and backward. Without it, the experts run as one batched matmul over groups
    /// padded to the largest (padding rows read a zero row and are dropped after), so each
    /// stacked weight still receives its gradient from one op; slicing a weight per expert
    /// instead costs a zero-filled full-size gradient per expert in backward.
    pub fn forward_routed(&self, x: Tensor<2>, tokens: &[Vec<i64>]) -> Tensor<2> {
        let device = x.device();
        if crate::kernels::has_kernel(&device) {
            return self.forward_grouped(x, tokens);
        }
        self.forward_padded(x, tokens)
    }

    /// The routed experts as three grouped matmuls over the tokens sorted by expert once
    /// (gate, up, down): no padding, no per-expert ops.
    fn forward_grouped(&self, x: Tensor<2>, tokens: &[Vec<i64>]) -> Tensor<2> {
        let device = x.device();
        let counts: Vec<usize> = tokens.iter().map(Vec::len).collect();
        let sorted = x.select(0, int_tensor(&tokens.concat(), &device));
        self.grouped(sorted, &counts)
    }

    /// Every expert on rows already grouped by expert: the first `counts[0]` rows of `x` go to
    /// expert 0, the next `counts[1]` to expert 1, and so on. Returns the outputs in the same
    /// order. (Expert parallelism regroups the rows it receives on the host, as it copies them
    /// out of the exchange, so they need no sort here.)
    pub fn forward_sorted(&self, x: Tensor<2>, counts: &[usize]) -> Tensor<2> {
        if crate::kernels::has_kernel(&x.device()) {
            return self.grouped(x, counts);
        }
        let mut tokens = Vec::with_capacity(counts.len());
        let mut row = 0i64;
        for &c in counts {
            tokens.push((row..row + c as i64).collect::<Vec<_>>());
            row += c as i64;
        }
        self.forward_padded(x, &tokens)
    }

    /// The three grouped matmuls (gate, up, down) over rows grouped by expert.
    fn grouped(&self, sorted: Tensor<2>, counts: &[usize]) -> Tensor<2> {
        use crate::kernels::grouped::grouped_matmul;
        let offsets = crate::kernels::grouped::offsets_of(counts);
        let gate = grouped_matmul(sorted.clone(), self.gate_proj.val(), &offsets, false);
        let up = grouped_matmul(sorted, self.up_proj.val(), &offsets, false);
        let hidden = crate::kernels::swiglu::swiglu(gate, up);
        grouped_matmul(hidden, self.down_proj.val(), &offsets, false)
    }

    /// The reference path (backends without the grouped kernel): one batched matmul over
    /// groups padded to the largest, or one expert at a time when padding would more than
    /// double the work.
    fn forward_padded(&self, x: Tensor<2>, tokens: &[Vec<i64>]) -> Tensor<2> {
        let [n, hidden] = x.dims();
        let device = x.device();
        let total: usize = tokens.iter().map(Vec::len).sum();
        let capacity = tokens.iter().map(Vec::len).max().unwrap_or(0);
        let experts = tokens.len();
        if experts * capacity > 2 * total {
            let outputs: Vec<Tensor<2>> = (0..experts)
                .filter(|&e| !tokens[e].is_empty())
                .map(|e| self.forward(e, x.clone().select(0, int_tensor(&tokens[e], &device))))
                .collect();
            return Tensor::cat(outputs, 0);
        }
        // Row `n` of the extended input is zeros: what padding slots read.
        let mut padded = Vec::with_capacity(experts * capacity);
        let mut kept = Vec::with_capacity(total);
        for (e, rows) in tokens.iter().enumerate() {
            padded.extend(rows);
            padded.resize((e + 1) * capacity, n as i64);
            kept.extend((0..rows.len()).map(|j| (e * capacity + j) as i64));
        }
        let x = Tensor::cat(vec![x, Tensor::zeros([1, hidden], &device)], 0);
        let groups = x
            .select(0, int_tensor(&padded, &device))
            .reshape([experts, capacity, hidden]);
        let gate = silu(groups.clone().matmul(self.gate_proj.val()));
        let y = (gate * groups.matmul(self.up_proj.val())).matmul(self.down_proj.val());
        y.reshape([experts * capacity, hidden])
            .select(0, int_tensor(&kept, &device))
    }

    /// Expert `e` applied to `x` `[tokens, hidden]`.
    pub fn forward(&self, e: usize, x: Tensor<2>) -> Tensor<2> {
        let slice = |w: &Param<Tensor<3>>| {
            let [_, rows, cols] = w.val().dims();
            w.val().narrow(0, e, 1).reshape([rows, cols])
        };
        let gate = silu(x.clone().matmul(slice(&self.gate_proj)));
        (gate * x.matmul(slice(&self.up_proj))).matmul(slice(&self.down_proj))
    }
}

#[derive(Module, Debug)]
pub struct Moe {
    /// Router: hidden → one logit per routed expert.
    pub gate: Linear,
    /// Added to the routing scores to choose experts, not to weigh them (aux-loss-free
    /// balancing); moved by the trainer against each expert's load, never by a gradient.
    pub expert_bias: Option<Param<Tensor<1>>>,
    pub experts: Experts,
    /// All shared experts as one SwiGLU of width `moe_intermediate_size × num_shared_experts`.
    pub shared_experts: Option<SwiGlu>,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    /// Sigmoid scores (Ling 2.0) instead of a softmax (Ling 1).
    pub sigmoid: bool,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f64,
    /// Stochastic routing warm-up (Ling's recipe): in training, the router logits are mixed
    /// `mix · logits + (1 − mix) · noise`; 1 means no noise. Set by the trainer every step.
    #[module(skip)]
    pub routing_mix: f64,
    /// Expert parallelism: `experts` holds this rank's share, the rest live on other ranks.
    #[module(skip)]
    pub expert_group: Option<crate::expert_parallel::ExpertGroup>,
    /// Under expert parallelism, the expert each slot of the stacked expert tensors holds
    /// (`expert_parallel::balanced_order`: this layer's own order); `None`: slot `p` holds
    /// expert `p`.
    #[module(skip)]
    pub expert_order: Option<Vec<usize>>,
}

impl Moe {
    pub fn new(cfg: &crate::ModelConfig, device: &Device) -> Self {
        let h = cfg.hidden_size;
        let w = cfg.moe_intermediate_size;
        let expert_bias = cfg.moe_router_enable_expert_bias.then(|| {
            let zeros: Param<Tensor<1>> = Initializer::Zeros.init([cfg.num_experts], device);
            zeros.set_require_grad(false)
        });
        Self {
            gate: linear(h, cfg.num_experts, false, device),
            expert_bias,
            experts: Experts::new(cfg.num_experts, h, w, device),
            shared_experts: (cfg.num_shared_experts > 0)
                .then(|| SwiGlu::new(h, w * cfg.num_shared_experts, cfg.mlp_bias, device)),
            top_k: cfg.num_experts_per_tok,
            norm_topk_prob: cfg.norm_topk_prob,
            sigmoid: cfg.score_function == crate::ScoreFunction::Sigmoid,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            routed_scaling_factor: cfg.routed_scaling_factor,
            routing_mix: 1.0,
            expert_group: None,
            expert_order: None,
        }
    }

    /// Aux-loss-free balancing (DeepSeek-V3's rule, as Megatron's `moe_router_bias_update_rate`
    /// applies it): each expert's bias moves by `rate` toward balance — up when the expert got
    /// fewer than the mean of `load` (tokens per expert over a step), down when more, not at
    /// all when exactly the mean. Returns the new biases; `None` without an expert bias.
    pub fn update_expert_bias(&mut self, load: &[f64], rate: f64) -> Option<Vec<f32>> {
        let bias = self.expert_bias.take()?;
        let mean = load.iter().sum::<f64>() / load.len().max(1) as f64;
        let current: Vec<f32> = bias.val().into_data().iter::<f32>().collect();
        let updated: Vec<f32> = current
            .iter()
            .zip(load)
            .map(|(&b, &l)| {
                let sign = if l < mean {
                    1.0
                } else if l > mean {
                    -1.0
                } else {
                    0.0
                };
                b + (rate * sign) as f32
            })
            .collect();
        let n = updated.len();
        let values = updated.clone();
        self.expert_bias = Some(bias.map(|t| crate::init::host_tensor_like(values, [n], &t)));
        Some(updated)
    }

    /// `x`: `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<3>) -> (Tensor<3>, RouterStats) {
        let [b, t, hidden] = x.dims();
        let x = x.reshape([b * t, hidden]);
        let (out, stats) = self.forward_tokens(x);
        (out.reshape([b, t, hidden]), stats)
    }

    /// `x`: `[tokens, hidden]`.
    pub fn forward_tokens(&self, x: Tensor<2>) -> (Tensor<2>, RouterStats) {
        let [n, hidden] = x.dims();
        // Every routed expert, wherever it lives (this rank may hold only some).
        let num_experts = self.gate.weight.val().dims()[1];
        let device = x.device();

        let logits = trace::tap("moe.gate", self.warm_up(self.gate.forward(x.clone())));
        let by_scores = self.sigmoid || self.n_group > 1 || self.expert_bias.is_some();
        let (probs, top_w, assignments) = if by_scores {
            self.route_by_scores(logits.clone())
        } else {
            let probs = softmax(logits.clone(), 1);
            let (mut top_w, top_i) = probs.clone().topk_with_indices(self.top_k, 1);
            // As Ant's gate: renormalised only when more than one expert is chosen (with one,
            // the weight stays the router probability and the router keeps its gradient).
            if self.norm_topk_prob && self.top_k > 1 {
                top_w = top_w.clone() / top_w.sum_dim(1);
            }
            let assignments: Vec<i64> = top_i.into_data().iter::<i64>().collect();
            (probs, top_w, assignments)
        };

        trace::tap_ids("moe.experts_chosen", &assignments, vec![n, self.top_k]);

        // Group the (token, slot) assignments by expert on the host: this is the one sync
        // per MoE layer, and what lets each expert see only its own tokens.
        let mut tokens: Vec<Vec<i64>> = vec![Vec::new(); num_experts];
        let mut slots: Vec<Vec<i64>> = vec![Vec::new(); num_experts];
        for (slot, &expert) in assignments.iter().enumerate() {
            tokens[expert as usize].push((slot / self.top_k) as i64);
            slots[expert as usize].push(slot as i64);
        }

        let tokens_per_expert: Vec<usize> = tokens.iter().map(Vec::len).collect();
        // Under expert parallelism the layer's experts may lie in an order of their own: its
        // rows then go slot after slot.
        if let (Some(_), Some(order)) = (&self.expert_group, &self.expert_order) {
            let take = |lists: &mut Vec<Vec<i64>>| -> Vec<Vec<i64>> {
                order
                    .iter()
                    .map(|&e| std::mem::take(&mut lists[e]))
                    .collect()
            };
            (tokens, slots) = (take(&mut tokens), take(&mut slots));
        }

        // Outputs come expert (slot) after expert; each is weighted by its slot's router
        // weight and added into its token's row.
        let (all_tokens, all_slots) = (tokens.concat(), slots.concat());
        let weight = top_w
            .reshape([n * self.top_k])
            .select(0, int_tensor(&all_slots, &device))
            .reshape([all_slots.len(), 1]);
        let y = match &self.expert_group {
            Some(group) => group.forward_routed(&self.experts, x.clone(), &tokens),
            None => self.experts.forward_routed(x.clone(), &tokens),
        } * weight;
        let routed = Tensor::zeros([n, hidden], &device).select_assign(
            0,
            int_tensor(&all_tokens, &device),
            y,
            IndexingUpdateOp::Add,
        );
        let out = match &self.shared_experts {
            Some(shared) => routed + shared.forward(x),
            None => routed,
        };

        let stats = self.router_stats(logits, probs, &tokens_per_expert);
        (out, stats)
    }

    /// Stochastic routing warm-up: while `routing_mix` < 1, in training, the logits are mixed
    /// with random logits drawn from a normal with each expert's mean and standard deviation
    /// over this batch's tokens (Ling TR: the logits' statistics; the batch's own, so a resumed
    /// run draws the same). Noise is seeded per step like dropout.
    fn warm_up(&self, logits: Tensor<2>) -> Tensor<2> {
        if self.routing_mix >= 1.0 || !logits.device().is_autodiff() {
            return logits;
        }
        let still = logits.clone().detach();
        let mean = still.clone().mean_dim(0);
        let std = (still.clone() - mean.clone())
            .powi_scalar(2)
            .mean_dim(0)
            .sqrt();
        let noise = still.random_like(Distribution::Normal(0.0, 1.0)) * std + mean;
        logits * self.routing_mix + noise * (1.0 - self.routing_mix)
    }

    /// Ling 2.0's router (`BailingMoeV2Gate`): sigmoid scores (or a softmax); experts chosen
    /// on the scores plus the expert bias, among the `topk_group` best of `n_group` groups;
    /// weighted by their unbiased scores, renormalised when top-k > 1, times
    /// `routed_scaling_factor`. Returns the probabilities for the balance statistics (scores
    /// normalised per token), the `[tokens, k]` weights and the chosen experts.
    fn route_by_scores(&self, logits: Tensor<2>) -> (Tensor<2>, Tensor<2>, Vec<i64>) {
        let [n, experts] = logits.dims();
        let device = logits.device();
        let scores = if self.sigmoid {
            sigmoid(logits)
        } else {
            softmax(logits, 1)
        };
        let routing = match &self.expert_bias {
            Some(bias) => scores.clone().detach() + bias.val().unsqueeze_dim(0),
            None => scores.clone().detach(),
        };
        let routing: Vec<f32> = routing.into_data().iter::<f32>().collect();
        let mut chosen = Vec::with_capacity(n * self.top_k);
        for row in routing.chunks(experts) {
            chosen.extend(group_limited_top_k(
                row,
                self.n_group,
                self.topk_group,
                self.top_k,
            ));
        }
        let index =
            Tensor::<2, Int>::from_data(TensorData::new(chosen.clone(), [n, self.top_k]), &device);
        let mut top_w = scores.clone().gather(1, index);
        if self.norm_topk_prob && self.top_k > 1 {
            top_w = top_w.clone() / (top_w.sum_dim(1) + 1e-20);
        }
        let top_w = top_w * self.routed_scaling_factor;
        let probs = if self.sigmoid {
            scores.clone() / scores.sum_dim(1)
        } else {
            scores
        };
        (probs, top_w, chosen)
    }

    fn router_stats(
        &self,
        logits: Tensor<2>,
        probs: Tensor<2>,
        tokens_per_expert: &[usize],
    ) -> RouterStats {
        let [n, num_experts] = probs.dims();
        let assigned = (n * self.top_k) as f32;
        let fraction: Vec<f32> = tokens_per_expert
            .iter()
            .map(|&c| c as f32 / assigned)
            .collect();
        let fraction =
            Tensor::<1>::from_data(TensorData::new(fraction, [num_experts]), &probs.device());
        let mean_prob = probs.mean_dim(0).reshape([num_experts]);
        let load_balance = (fraction * mean_prob.clone()).sum() * num_experts as f32;
        // logsumexp(l) = l - log_softmax(l), for any column; take column 0.
        let lse = (logits.clone() - log_softmax(logits, 1)).narrow(1, 0, 1);
        let z_loss = lse.powi_scalar(2).mean();
        RouterStats {
            load_balance,
            z_loss,
            tokens_per_expert: tokens_per_expert.to_vec(),
            mean_prob,
        }
    }
}

fn int_tensor(values: &[i64], device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

/// The `k` best experts of one token's routing scores, best first (ties: lower index), chosen
/// among the experts of the `topk_group` best of `n_group` equal groups; a group scores the
/// sum of its two best experts.
pub fn group_limited_top_k(
    scores: &[f32],
    n_group: usize,
    topk_group: usize,
    k: usize,
) -> Vec<i64> {
    let by_score = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    let per_group = scores.len() / n_group.max(1);
    let mut candidates: Vec<usize> = if n_group > 1 {
        let group_score = |g: usize| {
            let mut best: Vec<f32> = scores[g * per_group..(g + 1) * per_group].to_vec();
            best.sort_by(|a, b| b.total_cmp(a));
            best[0] + best[1]
        };
        let totals: Vec<f32> = (0..n_group).map(group_score).collect();
        let mut groups: Vec<usize> = (0..n_group).collect();
        groups.sort_by(|a, b| totals[*b].total_cmp(&totals[*a]).then(a.cmp(b)));
        groups.truncate(topk_group);
        groups
            .into_iter()
            .flat_map(|g| g * per_group..(g + 1) * per_group)
            .collect()
    } else {
        (0..scores.len()).collect()
    };
    candidates.sort_by(by_score);
    candidates.into_iter().take(k).map(|e| e as i64).collect()
}
