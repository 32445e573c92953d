//! Alibaba's Qwen2: Llama with q/k/v biases.

use super::llama::{llama_family_cannot_hold, llama_layer_name};
use super::{Architecture, Fields};
use nuwa_model::ModelConfig;
use serde_json::{json, Value};

pub struct Qwen2;

impl Architecture for Qwen2 {
    fn model_type(&self) -> &'static str {
        "qwen2"
    }

    fn class_name(&self) -> &'static str {
        "Qwen2ForCausalLM"
    }

    fn read_config(&self, f: &mut Fields, cfg: &mut ModelConfig) {
        let sliding = f.bool_or("use_sliding_window", false);
        f.require(
            !sliding,
            "`use_sliding_window`: sliding-window attention is not supported",
        );
        cfg.use_qkv_bias = true;
    }

    fn cannot_hold(&self, cfg: &ModelConfig) -> Vec<&'static str> {
        let mut bad = llama_family_cannot_hold(cfg, false);
        if cfg.is_moe() {
            bad.push("experts");
        }
        if !cfg.use_qkv_bias || cfg.use_bias || cfg.mlp_bias {
            bad.push("biases other than q/k/v");
        }
        bad
    }

    fn write_config(&self, _cfg: &ModelConfig, set: &mut dyn FnMut(&str, Value)) {
        set("use_sliding_window", json!(false));
    }

    fn layer_name(&self, rest: &str) -> String {
        llama_layer_name(rest)
    }

    fn harmless_keys(&self) -> &'static [&'static str] {
        // Only read by sliding-window attention, which `use_sliding_window` refuses.
        &["sliding_window", "max_window_layers"]
    }
}
