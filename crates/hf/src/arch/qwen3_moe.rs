//! Alibaba's Qwen3-MoE: per-head q/k RMSNorm, routed experts without shared ones.

use super::llama::{llama_family_cannot_hold, llama_layer_name};
use super::{Architecture, Fields};
use nuwa_model::ModelConfig;
use serde_json::{json, Value};

pub struct Qwen3Moe;

impl Architecture for Qwen3Moe {
    fn model_type(&self) -> &'static str {
        "qwen3_moe"
    }

    fn class_name(&self) -> &'static str {
        "Qwen3MoeForCausalLM"
    }

    fn read_config(&self, f: &mut Fields, cfg: &mut ModelConfig) {
        let attention_bias = f.bool_or("attention_bias", false);
        f.require(
            !attention_bias,
            "`attention_bias`: biased projections are not supported for qwen3_moe",
        );
        cfg.use_qk_norm = true;
        // transformers 5 writes `num_local_experts`; earlier versions `num_experts`.
        cfg.num_experts = match f.value("num_experts") {
            Some(_) => f.usize("num_experts"),
            None => f.usize_or("num_local_experts", Some(0)),
        };
        cfg.num_experts_per_tok = f.usize_or("num_experts_per_tok", Some(0));
        cfg.moe_intermediate_size = f.usize_or("moe_intermediate_size", Some(0));
        cfg.norm_topk_prob = f.bool_or("norm_topk_prob", false);
        cfg.first_k_dense_replace = qwen3_dense_prefix(f, cfg.num_hidden_layers);
        f.require(
            !(cfg.norm_topk_prob && cfg.num_experts_per_tok == 1),
            "`norm_topk_prob` with `num_experts_per_tok` = 1 is not supported (qwen3_moe \
             renormalises a single expert's weight to 1; nuwa follows Ling, which does not)",
        );
        let sliding = f.bool_or("use_sliding_window", false);
        f.require(
            !sliding,
            "`use_sliding_window`: sliding-window attention is not supported",
        );
    }

    fn cannot_hold(&self, cfg: &ModelConfig) -> Vec<&'static str> {
        let mut bad = llama_family_cannot_hold(cfg, true);
        if cfg.use_bias || cfg.use_qkv_bias || cfg.mlp_bias {
            bad.push("biases");
        }
        if cfg.norm_topk_prob && cfg.num_experts_per_tok == 1 {
            bad.push("norm_topk_prob with a single expert per token");
        }
        bad
    }

    fn write_config(&self, cfg: &ModelConfig, set: &mut dyn FnMut(&str, Value)) {
        set("num_experts", json!(cfg.num_experts));
        set("num_experts_per_tok", json!(cfg.num_experts_per_tok));
        set("moe_intermediate_size", json!(cfg.moe_intermediate_size));
        set("norm_topk_prob", json!(cfg.norm_topk_prob));
        set("decoder_sparse_step", json!(1));
        set(
            "mlp_only_layers",
            json!((0..cfg.first_k_dense_replace).collect::<Vec<_>>()),
        );
        set("attention_bias", json!(false));
    }

    fn layer_name(&self, rest: &str) -> String {
        llama_layer_name(rest)
    }

    fn harmless_keys(&self) -> &'static [&'static str] {
        // Only read by sliding-window attention, which `use_sliding_window` refuses.
        &["sliding_window", "max_window_layers"]
    }
}

/// qwen3_moe places MoE layers by `decoder_sparse_step` and `mlp_only_layers`; nuwa supports
/// the layouts where the dense layers come first (the published models: all MoE).
fn qwen3_dense_prefix(f: &mut Fields, layers: usize) -> usize {
    let step = f.usize_or("decoder_sparse_step", Some(1)).max(1);
    let mlp_only: Vec<u64> = f
        .value("mlp_only_layers")
        .and_then(|v| {
            v.as_array()
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
        })
        .unwrap_or_default();
    let is_moe = |i: usize| !mlp_only.contains(&(i as u64)) && (i + 1).is_multiple_of(step);
    let first_moe = (0..layers).find(|&i| is_moe(i)).unwrap_or(layers);
    if (first_moe..layers).any(|i| !is_moe(i)) {
        f.problems.push(format!(
            "`decoder_sparse_step` {step} / `mlp_only_layers` {mlp_only:?}: dense layers after \
             the first MoE layer are not supported"
        ));
    }
    first_moe
}
