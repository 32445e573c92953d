//! The architectures nuwa reads and writes, and their `config.json` ↔ [`ModelConfig`].
//!
//! nuwa's own config uses Ling's (`bailing_moe`) field names; the other formats are translated
//! here. Every key that changes the math is checked; a setting nuwa does not implement (a RoPE
//! scaling, sliding-window attention, biases on only some projections) is an error naming the
//! key, never silently ignored. Keys that only describe the checkpoint (token ids, dtype,
//! `architectures`, ...) are kept in the original JSON, which export writes back.

use anyhow::{bail, Result};
use nuwa_model::ModelConfig;
use serde_json::{json, Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Ant Group's Ling: fused `query_key_value`, shared experts, NormHead.
    BailingMoe,
    Llama,
    /// Llama with q/k/v biases.
    Qwen2,
    /// Per-head q/k RMSNorm, routed experts without shared ones.
    Qwen3Moe,
    /// `block_sparse_moe` with experts `w1` (gate), `w3` (up), `w2` (down).
    Mixtral,
}

impl Arch {
    pub const ALL: [Arch; 5] = [
        Arch::BailingMoe,
        Arch::Llama,
        Arch::Qwen2,
        Arch::Qwen3Moe,
        Arch::Mixtral,
    ];

    pub fn model_type(self) -> &'static str {
        match self {
            Arch::BailingMoe => "bailing_moe",
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Mixtral => "mixtral",
        }
    }

    /// The `architectures` entry transformers uses to pick the model class.
    pub fn class_name(self) -> &'static str {
        match self {
            Arch::BailingMoe => "BailingMoeForCausalLM",
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3Moe => "Qwen3MoeForCausalLM",
            Arch::Mixtral => "MixtralForCausalLM",
        }
    }

    pub fn from_model_type(model_type: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.model_type() == model_type)
    }

    /// The architecture of a nuwa config (`model_type`; nuwa's own models are `bailing_moe`).
    pub fn of(cfg: &ModelConfig) -> Result<Arch> {
        Arch::from_model_type(&cfg.model_type).ok_or_else(|| unsupported(&cfg.model_type))
    }
}

fn unsupported(model_type: &str) -> anyhow::Error {
    let known: Vec<&str> = Arch::ALL.iter().map(|a| a.model_type()).collect();
    anyhow::anyhow!(
        "model_type `{model_type}` is not supported (supported: {})",
        known.join(", ")
    )
}

/// Reads fields of a `config.json`, collecting every problem instead of stopping at the first.
struct Fields<'a> {
    json: &'a Map<String, Value>,
    problems: Vec<String>,
}

impl Fields<'_> {
    fn value(&self, key: &str) -> Option<Value> {
        self.json.get(key).filter(|v| !v.is_null()).cloned()
    }

    fn usize_or(&mut self, key: &str, default: Option<usize>) -> usize {
        match self.value(key) {
            Some(v) => match v.as_u64() {
                Some(n) => n as usize,
                None => {
                    self.problems
                        .push(format!("`{key}`: expected a non-negative integer, got {v}"));
                    0
                }
            },
            None => default.unwrap_or_else(|| {
                self.problems.push(format!("`{key}` is missing"));
                0
            }),
        }
    }

    fn usize(&mut self, key: &str) -> usize {
        self.usize_or(key, None)
    }

    fn f64_or(&mut self, key: &str, default: f64) -> f64 {
        match self.value(key) {
            Some(v) => v.as_f64().unwrap_or_else(|| {
                self.problems
                    .push(format!("`{key}`: expected a number, got {v}"));
                default
            }),
            None => default,
        }
    }

    fn bool_or(&mut self, key: &str, default: bool) -> bool {
        match self.value(key) {
            Some(v) => v.as_bool().unwrap_or_else(|| {
                self.problems
                    .push(format!("`{key}`: expected true or false, got {v}"));
                default
            }),
            None => default,
        }
    }

    fn require(&mut self, ok: bool, problem: impl Into<String>) {
        if !ok {
            self.problems.push(problem.into());
        }
    }
}

/// RoPE base from `rope_theta` or transformers 5's `rope_parameters`; only plain RoPE is
/// implemented, so any scaling is an error.
fn rope(f: &mut Fields, default_theta: f64) -> f64 {
    let params = f.value("rope_parameters");
    let scaling = f.value("rope_scaling");
    for (key, section) in [("rope_parameters", &params), ("rope_scaling", &scaling)] {
        if let Some(kind) = section
            .as_ref()
            .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
            .and_then(Value::as_str)
        {
            f.require(
                kind == "default",
                format!("`{key}`: rope type `{kind}` is not supported (only plain RoPE)"),
            );
        }
    }
    match params.as_ref().and_then(|p| p.get("rope_theta")) {
        Some(theta) if f.value("rope_theta").is_none() => theta.as_f64().unwrap_or(default_theta),
        _ => f.f64_or("rope_theta", default_theta),
    }
}

/// Translates a Hugging Face `config.json` (`what` names the file in errors).
pub fn config_from_hf(json: &Value, what: &str) -> Result<(Arch, ModelConfig)> {
    let Some(map) = json.as_object() else {
        bail!("{what}: expected a JSON object");
    };
    let model_type = map.get("model_type").and_then(Value::as_str).unwrap_or("");
    if model_type.is_empty() {
        bail!("{what}: `model_type` is missing");
    }
    let arch = Arch::from_model_type(model_type)
        .ok_or_else(|| anyhow::anyhow!("{what}: {}", unsupported(model_type)))?;
    let mut f = Fields {
        json: map,
        problems: Vec::new(),
    };
    let act = f
        .value("hidden_act")
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "silu".into());
    f.require(
        act == "silu",
        format!("`hidden_act`: `{act}` is not supported (SwiGLU needs silu)"),
    );
    let heads = f.usize("num_attention_heads");
    let hidden = f.usize("hidden_size");
    let mut cfg = ModelConfig {
        model_type: arch.model_type().to_string(),
        vocab_size: f.usize("vocab_size"),
        hidden_size: hidden,
        intermediate_size: f.usize_or("intermediate_size", Some(0)),
        num_hidden_layers: f.usize("num_hidden_layers"),
        num_attention_heads: heads,
        num_key_value_heads: f.usize_or("num_key_value_heads", Some(heads)),
        head_dim: f.value("head_dim").map(|_| f.usize("head_dim")),
        rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6),
        rope_theta: rope(&mut f, 10_000.0),
        max_position_embeddings: f.usize_or("max_position_embeddings", Some(2048)),
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false),
        ..ModelConfig::preset("tiny-dense").expect("built-in preset")
    };
    cfg.num_experts = 0;
    match arch {
        Arch::BailingMoe => {
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
        Arch::Llama => {
            let attention_bias = f.bool_or("attention_bias", false);
            let mlp_bias = f.bool_or("mlp_bias", false);
            f.require(
                attention_bias == mlp_bias,
                format!(
                    "`attention_bias` = {attention_bias} with `mlp_bias` = {mlp_bias} is not \
                     supported (nuwa biases the attention output and the MLP together)"
                ),
            );
            cfg.use_qkv_bias = attention_bias;
            cfg.use_bias = attention_bias;
        }
        Arch::Qwen2 => {
            let sliding = f.bool_or("use_sliding_window", false);
            f.require(
                !sliding,
                "`use_sliding_window`: sliding-window attention is not supported",
            );
            cfg.use_qkv_bias = true;
        }
        Arch::Qwen3Moe => {
            f.require(
                !f.json
                    .get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
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
            cfg.first_k_dense_replace = qwen3_dense_prefix(&mut f, cfg.num_hidden_layers);
        }
        Arch::Mixtral => {
            cfg.num_experts = f.usize_or("num_local_experts", Some(8));
            cfg.num_experts_per_tok = f.usize_or("num_experts_per_tok", Some(2));
            // Mixtral's experts are as wide as its `intermediate_size`, and every layer is MoE.
            cfg.moe_intermediate_size = cfg.intermediate_size;
            cfg.norm_topk_prob = true;
        }
    }
    if let Some(window) = f.value("sliding_window").and_then(|v| v.as_u64()) {
        // A window at least as long as the context is plain causal attention.
        let window = window as usize;
        if arch == Arch::Mixtral && window < cfg.max_position_embeddings {
            f.problems.push(format!(
                "`sliding_window` {window} < max_position_embeddings {}: sliding-window \
                 attention is not supported",
                cfg.max_position_embeddings
            ));
        }
    }
    if !f.problems.is_empty() {
        bail!(
            "{what}: {} problem(s): {}",
            f.problems.len(),
            f.problems.join("; ")
        );
    }
    cfg.validate().map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    Ok((arch, cfg))
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

/// Writes `cfg` as a `config.json` of its architecture. `original` (the imported checkpoint's
/// config, when there is one) keeps every descriptive key; the shape keys come from `cfg`.
pub fn config_to_hf(arch: Arch, cfg: &ModelConfig, original: Option<&Value>) -> Result<Value> {
    if arch != Arch::BailingMoe {
        let problems = [
            (cfg.num_shared_experts > 0, "shared experts"),
            (cfg.norm_head, "norm_head"),
            (
                cfg.use_qk_norm != (arch == Arch::Qwen3Moe),
                "query/key norms (use_qk_norm)",
            ),
            (
                cfg.is_moe() && matches!(arch, Arch::Llama | Arch::Qwen2),
                "experts",
            ),
            (
                arch == Arch::Mixtral && cfg.first_k_dense_replace > 0,
                "dense layers",
            ),
            (
                arch == Arch::Mixtral && cfg.moe_intermediate_size != cfg.intermediate_size,
                "expert width different from intermediate_size",
            ),
            (
                arch == Arch::Qwen2 && (!cfg.use_qkv_bias || cfg.use_bias),
                "biases other than q/k/v",
            ),
            (
                arch == Arch::Llama && cfg.use_qkv_bias != cfg.use_bias,
                "q/k/v biases without output biases",
            ),
            (
                arch == Arch::Qwen3Moe && (cfg.use_bias || cfg.use_qkv_bias),
                "biases",
            ),
        ];
        let bad: Vec<&str> = problems.iter().filter(|p| p.0).map(|p| p.1).collect();
        if !bad.is_empty() {
            bail!(
                "this model cannot be written as {}: it has {}",
                arch.model_type(),
                bad.join(", ")
            );
        }
    }
    let mut out = original
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let has_rope_parameters = out.contains_key("rope_parameters");
    let mut set = |k: &str, v: Value| {
        out.insert(k.to_string(), v);
    };
    set("model_type", json!(arch.model_type()));
    set("architectures", json!([arch.class_name()]));
    set("vocab_size", json!(cfg.vocab_size));
    set("hidden_size", json!(cfg.hidden_size));
    set("intermediate_size", json!(cfg.intermediate_size));
    set("num_hidden_layers", json!(cfg.num_hidden_layers));
    set("num_attention_heads", json!(cfg.num_attention_heads));
    set("num_key_value_heads", json!(cfg.num_key_value_heads));
    set("head_dim", json!(cfg.head_dim()));
    set("rms_norm_eps", json!(cfg.rms_norm_eps));
    set(
        "max_position_embeddings",
        json!(cfg.max_position_embeddings),
    );
    set("tie_word_embeddings", json!(cfg.tie_word_embeddings));
    set("hidden_act", json!("silu"));
    if has_rope_parameters {
        set(
            "rope_parameters",
            json!({"rope_type": "default", "rope_theta": cfg.rope_theta}),
        );
    } else {
        set("rope_theta", json!(cfg.rope_theta));
    }
    out.entry("torch_dtype".to_string())
        .or_insert(json!("float32"));
    let mut set = |k: &str, v: Value| {
        out.insert(k.to_string(), v);
    };
    match arch {
        Arch::BailingMoe => {
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
        Arch::Llama => {
            set("attention_bias", json!(cfg.use_qkv_bias));
            set("mlp_bias", json!(cfg.use_bias));
            set("rope_scaling", Value::Null);
        }
        Arch::Qwen2 => {
            set("use_sliding_window", json!(false));
        }
        Arch::Qwen3Moe => {
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
        Arch::Mixtral => {
            set("num_local_experts", json!(cfg.num_experts));
            set("num_experts_per_tok", json!(cfg.num_experts_per_tok));
        }
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_listed() {
        let cfg = json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "num_attention_heads": "four", "hidden_act": "gelu",
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0}
        });
        let err = config_from_hf(&cfg, "config.json").unwrap_err().to_string();
        for needle in ["num_attention_heads", "num_hidden_layers", "gelu", "llama3"] {
            assert!(err.contains(needle), "{needle} not in: {err}");
        }
    }

    #[test]
    fn unknown_model_type_is_named() {
        let err = config_from_hf(&json!({"model_type": "gpt2"}), "c.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("gpt2") && err.contains("qwen3_moe"), "{err}");
    }

    #[test]
    fn transformers_5_keys_are_read() {
        // transformers 5 writes `rope_parameters` and qwen3_moe's `num_local_experts`.
        let cfg = json!({
            "model_type": "qwen3_moe", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_local_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 4,
            "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}, "head_dim": 8
        });
        let (_, c) = config_from_hf(&cfg, "c").unwrap();
        assert_eq!((c.num_experts, c.rope_theta, c.head_dim()), (4, 5e5, 8));
        assert!(c.use_qk_norm && c.is_moe());
    }

    #[test]
    fn qwen3_dense_layers_must_come_first() {
        let mut cfg = json!({
            "model_type": "qwen3_moe", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
            "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 4,
            "mlp_only_layers": [0]
        });
        let (_, c) = config_from_hf(&cfg, "c").unwrap();
        assert_eq!(c.first_k_dense_replace, 1);
        cfg["mlp_only_layers"] = json!([1]);
        assert!(config_from_hf(&cfg, "c").is_err());
    }
}
