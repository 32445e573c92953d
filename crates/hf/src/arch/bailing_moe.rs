//! Ant Group's Ling (`bailing_moe`, `BailingMoeForCausalLM`): nuwa's own layout — fused
//! `query_key_value`, shared experts, NormHead — so its names and keys are nuwa's. The meaning
//! of every key follows Ant's published `configuration_bailing_moe.py` and
//! `modeling_bailing_moe.py` (inclusionAI/Ling):
//!
//! - absent keys take that config class's defaults (`rms_norm_eps` 1e-5, `use_bias` true,
//!   dropouts 0.1, 16 experts top-2, ...), not nuwa's presets;
//! - `use_bias` is a bias on the attention output projection (`dense`) only: Ling's MLPs and
//!   experts have none;
//! - `num_shared_experts = 0` still builds a shared-expert MLP, zero wide (its tensors are
//!   `[0, hidden]`): nuwa reads and writes them, and computes nothing for them;
//! - the router renormalises its top-k weights only when top-k > 1 (`norm_topk_prob`);
//! - NormHead divides `lm_head.weight` by its L2 norm over dim 0 (see `LanguageModel`).

use super::{ling_2_features, write_ling_moe_keys, Architecture, Fields};
use nuwa_model::ModelConfig;
use serde_json::{json, Value};

pub struct BailingMoe;

impl Architecture for BailingMoe {
    fn model_type(&self) -> &'static str {
        "bailing_moe"
    }

    fn class_name(&self) -> &'static str {
        "BailingMoeForCausalLM"
    }

    fn read_config(&self, f: &mut Fields, cfg: &mut ModelConfig) {
        f.require(
            f.is_set("num_key_value_heads"),
            "`num_key_value_heads` is missing (Ant's default, 0, builds no model)",
        );
        cfg.num_experts = f.usize_or("num_experts", Some(0));
        cfg.num_shared_experts = f.usize_or("num_shared_experts", Some(0));
        cfg.num_experts_per_tok = f.usize_or("num_experts_per_tok", Some(0));
        cfg.moe_intermediate_size = f.usize_or("moe_intermediate_size", Some(0));
        cfg.first_k_dense_replace = f.usize_or("first_k_dense_replace", Some(0));
        cfg.norm_topk_prob = f.bool_or("norm_topk_prob", true);
        cfg.norm_head = f.bool_or("norm_head", false);
        cfg.use_bias = f.bool_or("use_bias", false);
        cfg.mlp_bias = false;
        cfg.use_qkv_bias = f.bool_or("use_qkv_bias", false);
        // A Ling 2.0 key: Ling 1's code has no query/key norms and ignores it.
        let qk_norm = f.bool_or("use_qk_norm", false);
        f.require(
            !qk_norm,
            "`use_qk_norm`: BailingMoeForCausalLM (Ling 1) has no query/key norms; \
             Ling 2.0 checkpoints are BailingMoeV2ForCausalLM",
        );
        cfg.use_qk_norm = false;
        cfg.embedding_dropout = f.f64_or("embedding_dropout", 0.0);
        cfg.output_dropout = f.f64_or("output_dropout", 0.0);
        let sliding = f.bool_or("use_sliding_window", false);
        f.require(
            !sliding,
            "`use_sliding_window`: sliding-window attention is not supported",
        );
    }

    fn cannot_hold(&self, cfg: &ModelConfig) -> Vec<&'static str> {
        let problems = [
            (cfg.mlp_bias, "MLP biases (mlp_bias)"),
            (cfg.use_qk_norm, "query/key norms (use_qk_norm)"),
        ];
        let mut bad: Vec<&'static str> = problems.iter().filter(|p| p.0).map(|p| p.1).collect();
        bad.extend(ling_2_features(cfg));
        bad
    }

    fn write_config(&self, cfg: &ModelConfig, set: &mut dyn FnMut(&str, Value)) {
        // Every key is written, so nothing falls back to Ant's defaults.
        write_ling_moe_keys(cfg, set);
        set("norm_topk_prob", json!(cfg.norm_topk_prob));
        set("norm_head", json!(cfg.norm_head));
    }

    fn layer_name(&self, rest: &str) -> String {
        rest.to_string()
    }

    fn embeddings_name(&self) -> &'static str {
        "model.word_embeddings.weight"
    }

    fn fused_qkv(&self) -> bool {
        true
    }

    fn default_of(&self, key: &str) -> Option<Value> {
        // `BailingMoeConfig.__init__`'s defaults.
        Some(match key {
            "vocab_size" => json!(30592),
            "hidden_size" => json!(1024),
            "num_hidden_layers" => json!(24),
            "num_attention_heads" => json!(16),
            "hidden_act" => json!("silu"),
            "use_qkv_bias" => json!(false),
            "use_bias" => json!(true),
            "rms_norm_eps" => json!(1e-5),
            "norm_head" => json!(false),
            "tie_word_embeddings" => json!(false),
            "embedding_dropout" => json!(0.1),
            "attention_dropout" => json!(0.1),
            "output_dropout" => json!(0.1),
            "max_position_embeddings" => json!(16384),
            "rope_theta" => json!(10000.0),
            "num_experts" => json!(16),
            "num_shared_experts" => json!(0),
            "num_experts_per_tok" => json!(2),
            "norm_topk_prob" => json!(true),
            "first_k_dense_replace" => json!(0),
            _ => return None,
        })
    }

    fn harmless_keys(&self) -> &'static [&'static str] {
        // Only read by sliding-window attention, which `use_sliding_window` refuses.
        &["sliding_window", "max_window_layers"]
    }
}
