//! Ant Group's Ling 2.0 (`BailingMoeV2ForCausalLM`: Ling-mini-2.0, Ling-flash-2.0, Ling-1T),
//! following the semantics of inclusionAI/Ling-V2's `modeling_bailing_moe_v2.py`:
//!
//! - the router scores experts with a sigmoid; it chooses them on the scores plus a per-expert
//!   `expert_bias` (a buffer every checkpoint carries, `mlp.gate.expert_bias`), among the
//!   `topk_group` best of `n_group` groups; it weighs them by the unbiased scores, renormalised
//!   when top-k > 1 (always: V2 has no `norm_topk_prob`), times `routed_scaling_factor`;
//! - per-head query/key RMSNorm (`use_qk_norm`), RoPE on the first `partial_rotary_factor` of
//!   each head, an explicit `head_dim`, the first `first_k_dense_replace` layers dense;
//! - no NormHead; `use_bias` on the attention output only, as in Ling 1.
//!
//! Checkpoints call themselves `model_type: "bailing_moe"` and are told apart by their
//! `architectures` entry; nuwa names the model type `bailing_moe_v2` inside a run.
//! Multi-token-prediction layers (`num_nextn_predict_layers`) are HF's decoder layers after
//! the last one (`enorm`, `hnorm`, `eh_proj`, the decoder layer's own tensors and
//! `final_layernorm`); their loss joins training's times `mtp_loss_scaling_factor`.

use super::{write_ling_moe_keys, Architecture, Fields};
use nuwa_model::{ModelConfig, ScoreFunction};
use serde_json::{json, Value};

pub struct BailingMoeV2;

impl Architecture for BailingMoeV2 {
    fn model_type(&self) -> &'static str {
        "bailing_moe_v2"
    }

    fn hf_model_type(&self) -> &'static str {
        "bailing_moe"
    }

    fn class_name(&self) -> &'static str {
        "BailingMoeV2ForCausalLM"
    }

    fn read_config(&self, f: &mut Fields, cfg: &mut ModelConfig) {
        cfg.num_experts = f.usize_or("num_experts", Some(0));
        cfg.num_shared_experts = f.usize_or("num_shared_experts", Some(0));
        cfg.num_experts_per_tok = f.usize_or("num_experts_per_tok", Some(0));
        cfg.moe_intermediate_size = f.usize_or("moe_intermediate_size", Some(0));
        cfg.first_k_dense_replace = f.usize_or("first_k_dense_replace", Some(0));
        cfg.n_group = f.usize_or("n_group", Some(1));
        cfg.topk_group = f.usize_or("topk_group", Some(1));
        cfg.routed_scaling_factor = f.f64_or("routed_scaling_factor", 1.0);
        cfg.partial_rotary_factor = f.f64_or("partial_rotary_factor", 1.0);
        cfg.score_function = ScoreFunction::Sigmoid;
        if let Some(score) = f.value("score_function") {
            f.require(
                score == json!("sigmoid"),
                format!("`score_function` {score}: Ling 2.0's router is sigmoid"),
            );
        }
        // The gate always registers and applies `expert_bias`; the flag only steers training.
        let _ = f.bool_or("moe_router_enable_expert_bias", true);
        cfg.moe_router_enable_expert_bias = true;
        cfg.norm_topk_prob = true;
        cfg.norm_head = false;
        cfg.use_bias = f.bool_or("use_bias", false);
        cfg.mlp_bias = false;
        cfg.use_qkv_bias = f.bool_or("use_qkv_bias", false);
        cfg.use_qk_norm = f.bool_or("use_qk_norm", true);
        cfg.embedding_dropout = f.f64_or("embedding_dropout", 0.0);
        cfg.output_dropout = f.f64_or("output_dropout", 0.0);
        cfg.num_nextn_predict_layers = f.usize_or("num_nextn_predict_layers", Some(0));
        cfg.mtp_loss_scaling_factor = f.f64_or("mtp_loss_scaling_factor", 0.0);
        let sliding = f.bool_or("use_sliding_window", false);
        f.require(
            !sliding,
            "`use_sliding_window`: sliding-window attention is not supported",
        );
    }

    fn cannot_hold(&self, cfg: &ModelConfig) -> Vec<&'static str> {
        let problems = [
            (cfg.mlp_bias, "MLP biases (mlp_bias)"),
            (cfg.norm_head, "norm_head"),
            (
                cfg.score_function != ScoreFunction::Sigmoid,
                "a softmax router",
            ),
            (
                !cfg.moe_router_enable_expert_bias && cfg.is_moe(),
                "a router without expert_bias",
            ),
            (
                !cfg.norm_topk_prob && cfg.num_experts_per_tok > 1,
                "top-k weights without renormalisation",
            ),
        ];
        problems.iter().filter(|p| p.0).map(|p| p.1).collect()
    }

    fn write_config(&self, cfg: &ModelConfig, set: &mut dyn FnMut(&str, Value)) {
        write_ling_moe_keys(cfg, set);
        set("n_group", json!(cfg.n_group));
        set("topk_group", json!(cfg.topk_group));
        set("routed_scaling_factor", json!(cfg.routed_scaling_factor));
        set("partial_rotary_factor", json!(cfg.partial_rotary_factor));
        set("moe_router_enable_expert_bias", json!(true));
        set(
            "num_nextn_predict_layers",
            json!(cfg.num_nextn_predict_layers),
        );
        set(
            "mtp_loss_scaling_factor",
            json!(cfg.mtp_loss_scaling_factor),
        );
        set("use_qk_norm", json!(cfg.use_qk_norm));
    }

    fn layer_name(&self, rest: &str) -> String {
        rest.replacen("mlp.expert_bias", "mlp.gate.expert_bias", 1)
    }

    fn embeddings_name(&self) -> &'static str {
        "model.word_embeddings.weight"
    }

    fn fused_qkv(&self) -> bool {
        true
    }

    fn default_of(&self, key: &str) -> Option<Value> {
        // `BailingMoeV2Config.__init__`'s defaults.
        Some(match key {
            "vocab_size" => json!(157184),
            "hidden_size" => json!(2048),
            "intermediate_size" => json!(5120),
            "num_hidden_layers" => json!(20),
            "num_attention_heads" => json!(16),
            "num_key_value_heads" => json!(4),
            "hidden_act" => json!("silu"),
            "use_qkv_bias" => json!(false),
            "use_bias" => json!(false),
            "rms_norm_eps" => json!(1e-6),
            "tie_word_embeddings" => json!(false),
            "embedding_dropout" => json!(0.0),
            "attention_dropout" => json!(0.0),
            "output_dropout" => json!(0.0),
            "max_position_embeddings" => json!(32768),
            "rope_theta" => json!(600000.0),
            "num_experts" => json!(256),
            "num_shared_experts" => json!(1),
            "num_experts_per_tok" => json!(8),
            "n_group" => json!(8),
            "topk_group" => json!(4),
            "moe_intermediate_size" => json!(512),
            "first_k_dense_replace" => json!(1),
            "head_dim" => json!(128),
            "use_qk_norm" => json!(true),
            "num_nextn_predict_layers" => json!(0),
            "mtp_loss_scaling_factor" => json!(0.0),
            "routed_scaling_factor" => json!(1.0),
            _ => return None,
        })
    }

    fn harmless_keys(&self) -> &'static [&'static str] {
        // Read by nothing in V2's modelling code (norm_head, norm_topk_prob), or only by
        // sliding-window attention, which `use_sliding_window` refuses.
        &[
            "sliding_window",
            "max_window_layers",
            "norm_head",
            "norm_topk_prob",
        ]
    }
}
