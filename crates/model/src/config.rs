//! Model configuration. Field names follow the Hugging Face `config.json` of Ling
//! (`model_type = "bailing_moe"`), so a real checkpoint's config loads without renaming.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Everything needed to build a decoder: dense when `num_experts == 0`, MoE otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense SwiGLU FFN (used by the first `first_k_dense_replace` layers,
    /// or every layer of a dense model).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// Routed experts per MoE layer; 0 makes every layer dense.
    #[serde(default)]
    pub num_experts: usize,
    #[serde(default)]
    pub num_shared_experts: usize,
    #[serde(default)]
    pub num_experts_per_tok: usize,
    #[serde(default = "default_true")]
    pub norm_topk_prob: bool,
    #[serde(default)]
    pub moe_intermediate_size: usize,
    #[serde(default)]
    pub first_k_dense_replace: usize,
    #[serde(default)]
    pub norm_head: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// A bias on the attention output projection (`dense`) only, as Ant's `use_bias` means.
    #[serde(default)]
    pub use_bias: bool,
    /// Biases on every SwiGLU projection, dense and shared experts (Llama's `mlp_bias`; Ling
    /// has none). Routed experts never have biases.
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub use_qkv_bias: bool,
    /// RMSNorm over each query and key head before RoPE (Qwen3, Ling 2.0: `use_qk_norm`).
    #[serde(default)]
    pub use_qk_norm: bool,
    /// Dropout after the token embedding (bailing_moe: `embedding_dropout`).
    #[serde(default)]
    pub embedding_dropout: f64,
    /// Dropout on each attention / FFN output before the residual add (bailing_moe: `output_dropout`).
    #[serde(default)]
    pub output_dropout: f64,
    /// Dropout on the attention probabilities (bailing_moe, llama: `attention_dropout`).
    #[serde(default)]
    pub attention_dropout: f64,
    /// The share of each head's width that RoPE rotates (the first part; Ling 2.0: 0.5).
    #[serde(default = "default_one")]
    pub partial_rotary_factor: f64,
    /// How the router turns logits into expert scores (Ling 1: softmax; Ling 2.0: sigmoid).
    #[serde(default)]
    pub score_function: ScoreFunction,
    /// Group-limited routing (Ling 2.0, DeepSeek-V3): experts fall into `n_group` equal groups,
    /// each token chooses among the experts of its `topk_group` best groups (a group's score:
    /// the sum of its two best routing scores). 1 and 1: no groups.
    #[serde(default = "default_one_usize")]
    pub n_group: usize,
    #[serde(default = "default_one_usize")]
    pub topk_group: usize,
    /// The routed experts' weights are multiplied by this (after renormalisation).
    #[serde(default = "default_one")]
    pub routed_scaling_factor: f64,
    /// A per-expert bias added to the routing scores for the choice of experts only (not their
    /// weights): aux-loss-free balancing. Not a gradient parameter.
    #[serde(default)]
    pub moe_router_enable_expert_bias: bool,
    /// Multi-token-prediction layers (Ling 2.0, DeepSeek-V3): layer k (1-based) predicts the
    /// token k + 1 positions ahead from the previous depth's hidden state and the embedding of
    /// the token k ahead. Trained with the main loss; unused when sampling.
    #[serde(default)]
    pub num_nextn_predict_layers: usize,
    /// Each MTP layer's cross-entropy is added to the loss times this.
    #[serde(default)]
    pub mtp_loss_scaling_factor: f64,
}

/// The router's score of each expert from its logit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreFunction {
    #[default]
    Softmax,
    Sigmoid,
}

fn default_model_type() -> String {
    "bailing_moe".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}
fn default_one_usize() -> usize {
    1
}

/// A configuration that cannot build a model, with the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config field `{field}`: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
    #[error("{path}: {problem}")]
    File { path: String, problem: String },
    #[error(
        "unknown preset `{0}` (known: tiny-moe, tiny-dense, ling-lite, ling-plus, ling-mini-2, \
         ling-flash-2)"
    )]
    UnknownPreset(String),
}

fn invalid(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        problem: problem.into(),
    }
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// How many leading features of each head RoPE rotates (`int(head_dim × factor)`, as
    /// transformers computes it).
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim() as f64 * self.partial_rotary_factor) as usize
    }

    pub fn is_moe(&self) -> bool {
        self.num_experts > 0
    }

    /// Whether decoder layer `layer` uses the MoE FFN (the first `first_k_dense_replace` are dense).
    pub fn layer_is_moe(&self, layer: usize) -> bool {
        self.is_moe() && layer >= self.first_k_dense_replace
    }

    /// Reads a config from JSON (a Hugging Face `config.json`) or TOML, by extension.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let file_err = |problem: String| ConfigError::File {
            path: path.display().to_string(),
            problem,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let cfg: Self = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| file_err(e.to_string()))?
        } else {
            toml::from_str(&text).map_err(|e| file_err(e.to_string()))?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every shape constraint the model relies on, naming the first field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(invalid(field, "must be positive"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(invalid(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() == 0 {
            return Err(invalid(
                "head_dim",
                format!("{} must be even and positive for RoPE", self.head_dim()),
            ));
        }
        let rotary = self.rotary_dim();
        if !(self.partial_rotary_factor > 0.0 && self.partial_rotary_factor <= 1.0)
            || rotary == 0
            || !rotary.is_multiple_of(2)
        {
            return Err(invalid(
                "partial_rotary_factor",
                format!(
                    "{} of head_dim {} rotates {rotary} features; it must be in (0, 1] and rotate \
                     an even, positive number",
                    self.partial_rotary_factor,
                    self.head_dim()
                ),
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "num_attention_heads {} is not divisible by num_key_value_heads {}",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        self.validate_experts()?;
        if self.num_nextn_predict_layers > 0 && !self.is_moe() {
            return Err(invalid(
                "num_nextn_predict_layers",
                "multi-token-prediction layers are MoE layers: set num_experts",
            ));
        }
        for (field, p) in [
            ("embedding_dropout", self.embedding_dropout),
            ("output_dropout", self.output_dropout),
            ("attention_dropout", self.attention_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(invalid(field, format!("{p} is not in [0, 1)")));
            }
        }
        if self.rms_norm_eps <= 0.0 {
            return Err(invalid("rms_norm_eps", "must be positive"));
        }
        if self.rope_theta <= 0.0 {
            return Err(invalid("rope_theta", "must be positive"));
        }
        Ok(())
    }

    /// The FFN fields: a dense width where a layer is dense, and a routing that can route.
    fn validate_experts(&self) -> Result<(), ConfigError> {
        if !self.is_moe() {
            // Ant's code builds an MoE block whenever `num_experts` is set: zero experts with
            // top-k routing cannot route a token. A dense model sets no MoE field.
            let moe_fields = [
                ("num_experts_per_tok", self.num_experts_per_tok),
                ("num_shared_experts", self.num_shared_experts),
                ("moe_intermediate_size", self.moe_intermediate_size),
            ];
            if let Some((field, value)) = moe_fields.iter().find(|(_, v)| *v > 0) {
                return Err(invalid(
                "num_experts",
                format!(
                    "0 experts with {field} = {value}: an MoE model needs num_experts >=                          num_experts_per_tok; a dense model sets num_experts_per_tok,                          num_shared_experts and moe_intermediate_size to 0"
                ),
            ));
            }
        }
        let has_dense_layer = !self.is_moe() || self.first_k_dense_replace > 0;
        if has_dense_layer && self.intermediate_size == 0 {
            return Err(invalid("intermediate_size", "must be positive"));
        }
        if self.is_moe() {
            if self.num_experts_per_tok == 0 {
                return Err(invalid("num_experts_per_tok", "must be positive for MoE"));
            }
            if self.num_experts_per_tok > self.num_experts {
                return Err(invalid(
                    "num_experts_per_tok",
                    format!(
                        "top-k {} exceeds num_experts {}",
                        self.num_experts_per_tok, self.num_experts
                    ),
                ));
            }
            if self.moe_intermediate_size == 0 {
                return Err(invalid("moe_intermediate_size", "must be positive for MoE"));
            }
            if self.n_group == 0 || !self.num_experts.is_multiple_of(self.n_group) {
                return Err(invalid(
                    "n_group",
                    format!(
                        "{} does not divide num_experts {}",
                        self.n_group, self.num_experts
                    ),
                ));
            }
            let per_group = self.num_experts / self.n_group;
            if self.n_group > 1 && per_group < 2 {
                return Err(invalid("n_group", "each group needs at least 2 experts"));
            }
            if self.topk_group == 0
                || self.topk_group > self.n_group
                || self.topk_group * per_group < self.num_experts_per_tok
            {
                return Err(invalid(
                    "topk_group",
                    format!(
                        "{} of {} groups of {per_group} experts cannot hold top-{}",
                        self.topk_group, self.n_group, self.num_experts_per_tok
                    ),
                ));
            }
            if !(self.routed_scaling_factor.is_finite() && self.routed_scaling_factor > 0.0) {
                return Err(invalid(
                    "routed_scaling_factor",
                    "must be a positive number",
                ));
            }
            if self.first_k_dense_replace > self.num_hidden_layers {
                return Err(invalid(
                    "first_k_dense_replace",
                    format!("exceeds num_hidden_layers {}", self.num_hidden_layers),
                ));
            }
        }
        Ok(())
    }

    /// Built-in shapes: two tiny ones that train in minutes on a laptop CPU, and Ling's real
    /// shapes (from the Ling technical report and its `config.json`) for counting and planning.
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let tiny = ModelConfig {
            model_type: default_model_type(),
            vocab_size: 256,
            hidden_size: 128,
            intermediate_size: 384,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: None,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            max_position_embeddings: 256,
            num_experts: 0,
            num_shared_experts: 0,
            num_experts_per_tok: 0,
            norm_topk_prob: true,
            moe_intermediate_size: 0,
            first_k_dense_replace: 0,
            norm_head: false,
            tie_word_embeddings: false,
            use_bias: false,
            mlp_bias: false,
            use_qkv_bias: false,
            use_qk_norm: false,
            embedding_dropout: 0.0,
            output_dropout: 0.0,
            attention_dropout: 0.0,
            partial_rotary_factor: 1.0,
            score_function: ScoreFunction::Softmax,
            n_group: 1,
            topk_group: 1,
            routed_scaling_factor: 1.0,
            moe_router_enable_expert_bias: false,
            num_nextn_predict_layers: 0,
            mtp_loss_scaling_factor: 0.0,
        };
        let ling = |layers, hidden, heads, kv, experts, topk, shared, moe_width| ModelConfig {
            vocab_size: 126_464,
            hidden_size: hidden,
            intermediate_size: 5632,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            rope_theta: 600_000.0,
            max_position_embeddings: 16_384,
            num_experts: experts,
            num_shared_experts: shared,
            num_experts_per_tok: topk,
            moe_intermediate_size: moe_width,
            norm_head: true,
            ..tiny.clone()
        };
        let ling2 = |layers, hidden, heads, dense_width, moe_width| ModelConfig {
            model_type: "bailing_moe_v2".into(),
            vocab_size: 157_184,
            hidden_size: hidden,
            intermediate_size: dense_width,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: 4,
            head_dim: Some(128),
            rope_theta: 600_000.0,
            max_position_embeddings: 32_768,
            num_experts: 256,
            num_shared_experts: 1,
            num_experts_per_tok: 8,
            moe_intermediate_size: moe_width,
            first_k_dense_replace: 1,
            use_qk_norm: true,
            partial_rotary_factor: 0.5,
            score_function: ScoreFunction::Sigmoid,
            n_group: 8,
            topk_group: 4,
            routed_scaling_factor: 2.5,
            moe_router_enable_expert_bias: true,
            ..tiny.clone()
        };
        let cfg = match name {
            "tiny-dense" => tiny,
            "tiny-moe" => ModelConfig {
                num_experts: 8,
                num_shared_experts: 1,
                num_experts_per_tok: 2,
                moe_intermediate_size: 128,
                first_k_dense_replace: 1,
                norm_head: true,
                ..tiny
            },
            "ling-lite" => ling(28, 2048, 16, 4, 64, 6, 2, 1408),
            "ling-plus" => ling(88, 5376, 56, 8, 64, 4, 1, 3072),
            // Ling 2.0 (inclusionAI/Ling-V2): 256 experts top-8 in 8 groups (4 chosen), one
            // shared, sigmoid router with expert bias scaled 2.5, QK-norm, half RoPE, the first
            // layer dense.
            "ling-mini-2" => ling2(20, 2048, 16, 5120, 512),
            "ling-flash-2" => ling2(32, 4096, 32, 9216, 1024),
            other => return Err(ConfigError::UnknownPreset(other.to_string())),
        };
        Ok(cfg)
    }
}

/// Parameter and FLOP counts of a configuration, computed from shapes alone.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ModelCounts {
    pub total_params: u64,
    pub active_params: u64,
    pub embedding_params: u64,
    /// Training FLOPs per token (forward + backward) at the given context length:
    /// 6 × active non-embedding-lookup params + 12 × layers × heads × head_dim × context.
    pub train_flops_per_token: f64,
}

/// Bytes `nuwa train` keeps per parameter a process holds: the f32 weight, its f32 gradient
/// and AdamW's two f32 moments (no optimiser sharding: every holder keeps all four).
pub const TRAIN_BYTES_PER_PARAM: f64 = 16.0;

impl ModelConfig {
    /// Bytes of activations autodiff keeps per token of a micro-batch and decoder layer, at
    /// `seq_len` (f32): the layer's inputs and intermediates, the attention scores. An
    /// estimate, shared by the trainer's refusal of the impossible and the planner.
    pub fn activation_bytes_per_token_layer(&self, seq_len: usize) -> f64 {
        let width = if self.is_moe() {
            self.moe_intermediate_size * (self.num_experts_per_tok + self.num_shared_experts)
        } else {
            self.intermediate_size
        };
        4.0 * (24.0 * self.hidden_size as f64
            + 8.0 * width as f64
            + 3.0 * (self.num_attention_heads * seq_len) as f64)
    }

    /// Bytes of activations per token at the head (f32): the logits and their softmax.
    pub fn head_activation_bytes_per_token(&self) -> f64 {
        4.0 * 3.0 * self.vocab_size as f64
    }

    fn swiglu_params(&self, width: usize) -> u64 {
        let b = if self.mlp_bias {
            2 * width + self.hidden_size
        } else {
            0
        };
        (3 * self.hidden_size * width + b) as u64
    }

    fn attention_params(&self) -> u64 {
        let (h, d) = (self.hidden_size, self.head_dim());
        let qkv_out = (self.num_attention_heads + 2 * self.num_key_value_heads) * d;
        let qkv_bias = if self.use_qkv_bias { qkv_out } else { 0 };
        let o_bias = if self.use_bias { h } else { 0 };
        let qk_norm = if self.use_qk_norm { 2 * d } else { 0 };
        (h * qkv_out + qkv_bias + self.num_attention_heads * d * h + o_bias + qk_norm) as u64
    }

    fn router_params(&self) -> u64 {
        let bias = self.moe_router_enable_expert_bias as u64;
        (self.hidden_size as u64 + bias) * self.num_experts as u64
    }

    fn shared_expert_params(&self) -> u64 {
        match self.num_shared_experts {
            0 => 0,
            n => self.swiglu_params(self.moe_intermediate_size * n),
        }
    }

    /// Parameters of decoder layer `layer`, its routed experts included.
    pub fn layer_params(&self, layer: usize) -> u64 {
        match self.layer_is_moe(layer) {
            true => self.moe_layer_params(),
            false => {
                let attn = self.attention_params() + 2 * self.hidden_size as u64;
                attn + self.swiglu_params(self.intermediate_size)
            }
        }
    }

    /// Parameters of an MoE decoder layer: attention, two norms, router, shared and routed
    /// experts.
    fn moe_layer_params(&self) -> u64 {
        self.attention_params()
            + 2 * self.hidden_size as u64
            + self.router_params()
            + self.shared_expert_params()
            + self.routed_expert_params()
    }

    /// Parameters of an MoE layer's routed experts, all of them: what expert parallelism
    /// splits over its group.
    pub fn routed_expert_params(&self) -> u64 {
        self.swiglu_params(self.moe_intermediate_size) * self.num_experts as u64
    }

    /// Parameters of one MTP layer: an MoE decoder layer, two norms on the way in, a
    /// projection from 2h and a final norm.
    fn mtp_layer_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        self.moe_layer_params() + 3 * h + 2 * h * h
    }

    /// Parameters a pipeline stage holds: decoder layers `layers`, the token embeddings when
    /// it is the first stage, the final norm, LM head and MTP layers when it is the last.
    pub fn stage_params(&self, layers: std::ops::Range<usize>, first: bool, last: bool) -> u64 {
        let h = self.hidden_size as u64;
        let embed = self.vocab_size as u64 * h;
        let mut total: u64 = layers.map(|l| self.layer_params(l)).sum();
        if first {
            total += embed;
        }
        if last {
            // A tied head is the embedding: a last stage that is not also the first holds a
            // copy of it.
            let head = match self.tie_word_embeddings && first {
                true => 0,
                false => embed,
            };
            total += head + h + self.num_nextn_predict_layers as u64 * self.mtp_layer_params();
        }
        total
    }

    /// Counts total and per-token active parameters and training FLOPs per token.
    pub fn counts(&self, context: usize) -> ModelCounts {
        let h = self.hidden_size as u64;
        let expert = self.swiglu_params(self.moe_intermediate_size);
        let mut total = 0u64;
        let mut active = 0u64;
        for layer in 0..self.num_hidden_layers {
            let params = self.layer_params(layer);
            total += params;
            active += match self.layer_is_moe(layer) {
                true => params - expert * (self.num_experts - self.num_experts_per_tok) as u64,
                false => params,
            };
        }
        // MTP layers count in the total; decoding does not run them.
        total += self.num_nextn_predict_layers as u64 * self.mtp_layer_params();
        let embed = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        total += embed + head + h;
        active += embed + head + h;
        // The embedding lookup costs no matmul FLOPs; the LM head does.
        let matmul_params = active - embed + if self.tie_word_embeddings { embed } else { 0 };
        let attn_flops = 12
            * self.num_hidden_layers as u64
            * (self.num_attention_heads * self.head_dim()) as u64
            * context as u64;
        ModelCounts {
            total_params: total,
            active_params: active,
            embedding_params: embed,
            train_flops_per_token: 6.0 * matmul_params as f64 + attn_flops as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(actual: u64, expected: f64, tol: f64) -> bool {
        ((actual as f64 - expected) / expected).abs() <= tol
    }

    #[test]
    fn ling_counts_match_published_sizes() {
        let lite = ModelConfig::preset("ling-lite").unwrap().counts(4096);
        assert!(within(lite.total_params, 16.8e9, 0.01), "{lite:?}");
        assert!(within(lite.active_params, 2.75e9, 0.01), "{lite:?}");
        let plus = ModelConfig::preset("ling-plus").unwrap().counts(4096);
        assert!(within(plus.total_params, 290e9, 0.01), "{plus:?}");
        assert!(within(plus.active_params, 28.8e9, 0.01), "{plus:?}");
        // Ling 2.0: Ling-mini-2.0 is published as 16.26B total / 1.43B active, Ling-flash-2.0
        // as 6.1B active ("100B" total, a round figure: its shapes count 102.9B).
        let mini = ModelConfig::preset("ling-mini-2").unwrap().counts(4096);
        assert!(within(mini.total_params, 16.26e9, 0.01), "{mini:?}");
        assert!(within(mini.active_params, 1.43e9, 0.01), "{mini:?}");
        let flash = ModelConfig::preset("ling-flash-2").unwrap().counts(4096);
        assert!(within(flash.active_params, 6.1e9, 0.01), "{flash:?}");
        assert!(within(flash.total_params, 100e9, 0.03), "{flash:?}");
    }

    #[test]
    fn group_limited_routing_validates_its_groups() {
        let base = ModelConfig::preset("ling-mini-2").unwrap();
        for (cfg, field) in [
            (
                ModelConfig {
                    n_group: 7,
                    ..base.clone()
                },
                "n_group",
            ),
            (
                ModelConfig {
                    topk_group: 9,
                    ..base.clone()
                },
                "topk_group",
            ),
            (
                ModelConfig {
                    partial_rotary_factor: 0.01,
                    ..base.clone()
                },
                "partial_rotary_factor",
            ),
        ] {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn presets_validate() {
        for name in [
            "tiny-moe",
            "tiny-dense",
            "ling-lite",
            "ling-plus",
            "ling-mini-2",
            "ling-flash-2",
        ] {
            ModelConfig::preset(name).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn bad_shapes_name_the_field() {
        let base = ModelConfig::preset("tiny-moe").unwrap();
        let cases: Vec<(ModelConfig, &str)> = vec![
            (
                ModelConfig {
                    num_attention_heads: 3,
                    ..base.clone()
                },
                "num_attention_heads",
            ),
            (
                ModelConfig {
                    num_key_value_heads: 3,
                    num_attention_heads: 4,
                    ..base.clone()
                },
                "num_key_value_heads",
            ),
            (
                ModelConfig {
                    num_experts_per_tok: 9,
                    ..base.clone()
                },
                "num_experts_per_tok",
            ),
        ];
        for (cfg, field) in cases {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let json = r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"num_key_value_heads":1,"max_position_embeddings":8,"n_embd":3}"#;
        let err = serde_json::from_str::<ModelConfig>(json)
            .unwrap_err()
            .to_string();
        assert!(err.contains("n_embd"), "{err}");
    }
}
