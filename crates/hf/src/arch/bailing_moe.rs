//! Ant Group's Ling (`bailing_moe`): nuwa's own layout — fused `query_key_value`, shared
//! experts, NormHead — so its names and keys are nuwa's.

use super::{Architecture, Fields};
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
        cfg.num_experts = f.usize_or("num_experts", Some(0));
        cfg.num_shared_experts = f.usize_or("num_shared_experts", Some(0));
        cfg.num_experts_per_tok = f.usize_or("num_experts_per_tok", Some(0));
        cfg.moe_intermediate_size = f.usize_or("moe_intermediate_size", Some(0));
        cfg.first_k_dense_replace = f.usize_or("first_k_dense_replace", Some(0));
        cfg.norm_topk_prob = f.bool_or("norm_topk_prob", true);
        cfg.norm_head = f.bool_or("norm_head", false);
        cfg.use_bias = f.bool_or("use_bias", false);
        cfg.use_qkv_bias = f.bool_or("use_qkv_bias", false);
        cfg.use_qk_norm = f.bool_or("use_qk_norm", false);
        cfg.embedding_dropout = f.f64_or("embedding_dropout", 0.0);
        cfg.output_dropout = f.f64_or("output_dropout", 0.0);
    }

    fn cannot_hold(&self, _cfg: &ModelConfig) -> Vec<&'static str> {
        Vec::new()
    }

    fn write_config(&self, cfg: &ModelConfig, set: &mut dyn FnMut(&str, Value)) {
        set("num_experts", json!(cfg.num_experts));
        set("num_shared_experts", json!(cfg.num_shared_experts));
        set("num_experts_per_tok", json!(cfg.num_experts_per_tok));
        set("moe_intermediate_size", json!(cfg.moe_intermediate_size));
        set("first_k_dense_replace", json!(cfg.first_k_dense_replace));
        set("norm_topk_prob", json!(cfg.norm_topk_prob));
        set("norm_head", json!(cfg.norm_head));
        set("use_bias", json!(cfg.use_bias));
        set("use_qkv_bias", json!(cfg.use_qkv_bias));
        set("use_qk_norm", json!(cfg.use_qk_norm));
        set("embedding_dropout", json!(cfg.embedding_dropout));
        set("output_dropout", json!(cfg.output_dropout));
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
}
