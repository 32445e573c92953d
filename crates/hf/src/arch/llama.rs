//! Meta's Llama: separate q/k/v projections (`self_attn.{q,k,v}_proj`), no experts.

use super::{ling_2_features, Architecture, Fields};
use nuwa_model::ModelConfig;
use serde_json::{json, Value};

pub struct Llama;

/// The Llama family's name for a decoder-layer parameter (shared by qwen2, qwen3_moe and
/// mixtral): `self_attn.o_proj` for nuwa's `attention.dense`, `q_norm`/`k_norm` for its query
/// and key norms; q/k/v themselves are split in `names.rs`.
pub(super) fn llama_layer_name(rest: &str) -> String {
    rest.replacen("attention.dense.", "self_attn.o_proj.", 1)
        .replacen("attention.query_layernorm.", "self_attn.q_norm.", 1)
        .replacen("attention.key_layernorm.", "self_attn.k_norm.", 1)
}

/// What no Llama-family checkpoint holds: Ling's shared experts, NormHead and query/key norms
/// (qwen3_moe excepted, which says so itself).
pub(super) fn llama_family_cannot_hold(cfg: &ModelConfig, qk_norm: bool) -> Vec<&'static str> {
    let problems = [
        (cfg.num_shared_experts > 0, "shared experts"),
        (cfg.norm_head, "norm_head"),
        (cfg.use_qk_norm != qk_norm, "query/key norms (use_qk_norm)"),
    ];
    let mut bad: Vec<&'static str> = problems.iter().filter(|p| p.0).map(|p| p.1).collect();
    bad.extend(ling_2_features(cfg));
    bad
}

impl Architecture for Llama {
    fn model_type(&self) -> &'static str {
        "llama"
    }

    fn class_name(&self) -> &'static str {
        "LlamaForCausalLM"
    }

    fn read_config(&self, f: &mut Fields, cfg: &mut ModelConfig) {
        // `attention_bias` biases q, k, v and o; `mlp_bias` every MLP projection.
        let attention_bias = f.bool_or("attention_bias", false);
        cfg.use_qkv_bias = attention_bias;
        cfg.use_bias = attention_bias;
        cfg.mlp_bias = f.bool_or("mlp_bias", false);
    }

    fn cannot_hold(&self, cfg: &ModelConfig) -> Vec<&'static str> {
        let mut bad = llama_family_cannot_hold(cfg, false);
        if cfg.is_moe() {
            bad.push("experts");
        }
        if cfg.use_qkv_bias != cfg.use_bias {
            bad.push("q/k/v biases without output biases");
        }
        bad
    }

    fn write_config(&self, cfg: &ModelConfig, set: &mut dyn FnMut(&str, Value)) {
        set("attention_bias", json!(cfg.use_qkv_bias));
        set("mlp_bias", json!(cfg.mlp_bias));
        set("rope_scaling", Value::Null);
    }

    fn layer_name(&self, rest: &str) -> String {
        llama_layer_name(rest)
    }

    fn harmless_keys(&self) -> &'static [&'static str] {
        // Tensor-parallel slicing of the pretraining run: the same math.
        &["pretraining_tp"]
    }
}
