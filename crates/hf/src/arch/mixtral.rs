//! Mistral's Mixtral: every layer MoE, `block_sparse_moe` with experts `w1` (gate), `w3` (up)
//! and `w2` (down) as wide as `intermediate_size`.

use super::llama::{llama_family_cannot_hold, llama_layer_name};
use super::{Architecture, Fields};
use nuwa_model::ModelConfig;
use serde_json::{json, Value};

pub struct Mixtral;

impl Architecture for Mixtral {
    fn model_type(&self) -> &'static str {
        "mixtral"
    }

    fn class_name(&self) -> &'static str {
        "MixtralForCausalLM"
    }

    fn read_config(&self, f: &mut Fields, cfg: &mut ModelConfig) {
        cfg.num_experts = f.usize_or("num_local_experts", Some(8));
        cfg.num_experts_per_tok = f.usize_or("num_experts_per_tok", Some(2));
        // Mixtral's experts are as wide as its `intermediate_size`, and every layer is MoE.
        cfg.moe_intermediate_size = cfg.intermediate_size;
        cfg.norm_topk_prob = true;
        f.require(
            cfg.num_experts_per_tok != 1,
            "`num_experts_per_tok` = 1 is not supported for mixtral (it renormalises a single \
             expert's weight to 1; nuwa follows Ling, which does not)",
        );
        let jitter = f.f64_or("router_jitter_noise", 0.0);
        f.require(
            jitter == 0.0,
            format!("`router_jitter_noise` {jitter}: router jitter is not supported"),
        );
        if let Some(window) = f.value("sliding_window").and_then(|v| v.as_u64()) {
            // A window at least as long as the context is plain causal attention.
            let window = window as usize;
            f.require(
                window >= cfg.max_position_embeddings,
                format!(
                    "`sliding_window` {window} < max_position_embeddings {}: sliding-window \
                     attention is not supported",
                    cfg.max_position_embeddings
                ),
            );
        }
    }

    fn cannot_hold(&self, cfg: &ModelConfig) -> Vec<&'static str> {
        let mut bad = llama_family_cannot_hold(cfg, false);
        if cfg.first_k_dense_replace > 0 {
            bad.push("dense layers");
        }
        if cfg.num_experts_per_tok == 1 {
            bad.push("a single expert per token (mixtral would weigh it 1)");
        }
        if cfg.use_bias || cfg.use_qkv_bias || cfg.mlp_bias {
            bad.push("biases");
        }
        if cfg.moe_intermediate_size != cfg.intermediate_size {
            bad.push("expert width different from intermediate_size");
        }
        bad
    }

    fn write_config(&self, cfg: &ModelConfig, set: &mut dyn FnMut(&str, Value)) {
        set("num_local_experts", json!(cfg.num_experts));
        set("num_experts_per_tok", json!(cfg.num_experts_per_tok));
    }

    fn layer_name(&self, rest: &str) -> String {
        let rest = llama_layer_name(rest);
        match rest.strip_prefix("mlp.") {
            Some(moe) => {
                let moe = moe
                    .replacen(".gate_proj.", ".w1.", 1)
                    .replacen(".up_proj.", ".w3.", 1)
                    .replacen(".down_proj.", ".w2.", 1);
                format!("block_sparse_moe.{moe}")
            }
            None => rest,
        }
    }
}
