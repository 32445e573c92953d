//! The architectures nuwa reads and writes, and their `config.json` ↔ [`ModelConfig`].
//!
//! nuwa's own config uses Ling's (`bailing_moe`) field names; the other formats are translated
//! here: the keys every architecture shares in this file, each architecture's own keys, what
//! it refuses and its tensor names in one file of its own behind [`Architecture`]. A new
//! architecture is one new file and one line in [`Arch`].
//!
//! Every key that changes the math is checked; a setting nuwa does not implement (a RoPE
//! scaling, sliding-window attention) is an error naming the key, never silently ignored. A key
//! nuwa neither reads nor knows to be harmless metadata is an error too, listing every such key
//! (a Ling 2.0 `config.json` must not train as a Ling 1 model). Absent keys take the defaults of
//! the architecture's own config class ([`Architecture::default_of`]). Keys that only describe
//! the checkpoint (token ids, dtype, `architectures`, ...) are kept in the original JSON, which
//! export writes back.

mod bailing_moe;
mod bailing_moe_v2;
mod llama;
mod mixtral;
mod qwen2;
mod qwen3_moe;

use anyhow::{bail, Result};
use nuwa_model::ModelConfig;
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::collections::BTreeSet;

/// Keys of any `config.json` that describe the checkpoint or steer transformers' generation
/// and bookkeeping, never the model's math.
const METADATA_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "auto_map",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
    "name_or_path",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "use_cache",
    "initializer_range",
    "output_router_logits",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "tokenizer_class",
    "id2label",
    "label2id",
    "problem_type",
    "is_decoder",
    "is_encoder_decoder",
    "add_cross_attention",
    "torchscript",
    "use_bfloat16",
    "tie_encoder_decoder",
    "pruned_heads",
    "chunk_size_feed_forward",
    "finetuning_task",
    "task_specific_params",
    "_attn_implementation",
    "attn_implementation",
    "router_aux_loss_coef",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "prefix",
    "cross_attention_hidden_size",
    "tf_legacy_loss",
];

/// What nuwa needs to know of one Hugging Face architecture.
pub trait Architecture: Sync {
    /// nuwa's name of the architecture (`model_type` of a run's model config).
    fn model_type(&self) -> &'static str;
    /// `model_type` in its checkpoints' `config.json` (usually the same).
    fn hf_model_type(&self) -> &'static str {
        self.model_type()
    }
    /// The `architectures` entry transformers uses to pick the model class.
    fn class_name(&self) -> &'static str;
    /// Reads the architecture's own keys into `cfg` (the shared shape keys are read already),
    /// recording every problem in `f`.
    fn read_config(&self, f: &mut Fields, cfg: &mut ModelConfig);
    /// What of `cfg` this architecture's checkpoints cannot hold (export refuses them).
    fn cannot_hold(&self, cfg: &ModelConfig) -> Vec<&'static str>;
    /// Writes the architecture's own keys of `cfg`.
    fn write_config(&self, cfg: &ModelConfig, set: &mut dyn FnMut(&str, Value));
    /// The HF name of a parameter of decoder layer N, after `model.layers.N.`, from nuwa's
    /// name after `layers.N.` (with a MoE layer's `moe.` already written `mlp.`).
    fn layer_name(&self, rest: &str) -> String;
    /// The HF name of the token embeddings.
    fn embeddings_name(&self) -> &'static str {
        "model.embed_tokens.weight"
    }
    /// Whether HF keeps q, k and v as nuwa does, in one fused projection.
    fn fused_qkv(&self) -> bool {
        false
    }
    /// The value the architecture's config class gives `key` when `config.json` lacks it
    /// (transformers builds the model from those defaults, so nuwa must too). `None`: nuwa's
    /// fallback for that key applies.
    fn default_of(&self, _key: &str) -> Option<Value> {
        None
    }
    /// This architecture's keys that nuwa does not read because they cannot change what it
    /// computes (besides [`METADATA_KEYS`]).
    fn harmless_keys(&self) -> &'static [&'static str] {
        &[]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Ant Group's Ling: fused `query_key_value`, shared experts, NormHead.
    BailingMoe,
    /// Ling 2.0: sigmoid group-limited router with expert bias, QK-norm, partial RoPE.
    BailingMoeV2,
    Llama,
    /// Llama with q/k/v biases.
    Qwen2,
    /// Per-head q/k RMSNorm, routed experts without shared ones.
    Qwen3Moe,
    /// `block_sparse_moe` with experts `w1` (gate), `w3` (up), `w2` (down).
    Mixtral,
}

impl Arch {
    pub const ALL: [Arch; 6] = [
        Arch::BailingMoe,
        Arch::BailingMoeV2,
        Arch::Llama,
        Arch::Qwen2,
        Arch::Qwen3Moe,
        Arch::Mixtral,
    ];

    /// What this architecture reads, writes and refuses.
    pub fn spec(self) -> &'static dyn Architecture {
        match self {
            Arch::BailingMoe => &bailing_moe::BailingMoe,
            Arch::BailingMoeV2 => &bailing_moe_v2::BailingMoeV2,
            Arch::Llama => &llama::Llama,
            Arch::Qwen2 => &qwen2::Qwen2,
            Arch::Qwen3Moe => &qwen3_moe::Qwen3Moe,
            Arch::Mixtral => &mixtral::Mixtral,
        }
    }

    pub fn model_type(self) -> &'static str {
        self.spec().model_type()
    }

    /// The `architectures` entry transformers uses to pick the model class.
    pub fn class_name(self) -> &'static str {
        self.spec().class_name()
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

/// Reads fields of a `config.json`, collecting every problem instead of stopping at the first
/// and remembering which keys were read.
pub struct Fields<'a> {
    json: &'a Map<String, Value>,
    arch: &'a dyn Architecture,
    read: RefCell<BTreeSet<String>>,
    problems: Vec<String>,
}

impl Fields<'_> {
    /// The key's value, or the architecture's default when it is absent or null.
    pub fn value(&self, key: &str) -> Option<Value> {
        self.read.borrow_mut().insert(key.to_string());
        self.json
            .get(key)
            .filter(|v| !v.is_null())
            .cloned()
            .or_else(|| self.arch.default_of(key))
    }

    /// Whether `config.json` itself sets the key.
    pub fn is_set(&self, key: &str) -> bool {
        self.read.borrow_mut().insert(key.to_string());
        self.json.get(key).is_some_and(|v| !v.is_null())
    }

    /// Keys set in the file that were neither read nor are known to be harmless.
    fn unknown_keys(&self) -> Vec<String> {
        let read = self.read.borrow();
        self.json
            .iter()
            .filter(|(k, v)| !v.is_null() && !read.contains(k.as_str()))
            .map(|(k, _)| k.clone())
            .filter(|k| {
                !METADATA_KEYS.contains(&k.as_str())
                    && !self.arch.harmless_keys().contains(&k.as_str())
            })
            .collect()
    }

    pub fn usize_or(&mut self, key: &str, default: Option<usize>) -> usize {
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

    pub fn usize(&mut self, key: &str) -> usize {
        self.usize_or(key, None)
    }

    pub fn f64_or(&mut self, key: &str, default: f64) -> f64 {
        match self.value(key) {
            Some(v) => v.as_f64().unwrap_or_else(|| {
                self.problems
                    .push(format!("`{key}`: expected a number, got {v}"));
                default
            }),
            None => default,
        }
    }

    pub fn bool_or(&mut self, key: &str, default: bool) -> bool {
        match self.value(key) {
            Some(v) => v.as_bool().unwrap_or_else(|| {
                self.problems
                    .push(format!("`{key}`: expected true or false, got {v}"));
                default
            }),
            None => default,
        }
    }

    pub fn require(&mut self, ok: bool, problem: impl Into<String>) {
        if !ok {
            self.problems.push(problem.into());
        }
    }
}

/// What only Ling 2.0 (`bailing_moe_v2`) can hold, for the other architectures' `cannot_hold`.
fn ling_2_features(cfg: &ModelConfig) -> Vec<&'static str> {
    let features = [
        (
            cfg.num_nextn_predict_layers > 0,
            "multi-token-prediction layers",
        ),
        (
            cfg.score_function != nuwa_model::ScoreFunction::Softmax,
            "a sigmoid router",
        ),
        (cfg.moe_router_enable_expert_bias, "an expert bias"),
        (cfg.n_group > 1, "group-limited routing"),
        (cfg.routed_scaling_factor != 1.0, "routed_scaling_factor"),
        (cfg.partial_rotary_factor != 1.0, "partial RoPE"),
    ];
    features.iter().filter(|f| f.0).map(|f| f.1).collect()
}

/// The keys Ling 1 and Ling 2.0 write alike: experts, biases, dropouts.
fn write_ling_moe_keys(cfg: &ModelConfig, set: &mut dyn FnMut(&str, Value)) {
    set("num_experts", json!(cfg.num_experts));
    set("num_shared_experts", json!(cfg.num_shared_experts));
    set("num_experts_per_tok", json!(cfg.num_experts_per_tok));
    set("moe_intermediate_size", json!(cfg.moe_intermediate_size));
    set("first_k_dense_replace", json!(cfg.first_k_dense_replace));
    set("use_bias", json!(cfg.use_bias));
    set("use_qkv_bias", json!(cfg.use_qkv_bias));
    set("embedding_dropout", json!(cfg.embedding_dropout));
    set("output_dropout", json!(cfg.output_dropout));
    set("attention_dropout", json!(cfg.attention_dropout));
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
        Some(theta) if !f.is_set("rope_theta") => theta.as_f64().unwrap_or(default_theta),
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
    // Ling 2.0 checkpoints say `bailing_moe` too; their class tells them apart.
    let class = map
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str);
    let arch = match class {
        Some(c) if c == Arch::BailingMoeV2.class_name() => Arch::BailingMoeV2,
        _ => arch,
    };
    let mut f = Fields {
        json: map,
        arch: arch.spec(),
        read: RefCell::new(BTreeSet::new()),
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
        attention_dropout: f.f64_or("attention_dropout", 0.0),
        rope_theta: rope(&mut f, 10_000.0),
        max_position_embeddings: f.usize_or("max_position_embeddings", Some(2048)),
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false),
        ..ModelConfig::preset("tiny-dense").expect("built-in preset")
    };
    cfg.num_experts = 0;
    arch.spec().read_config(&mut f, &mut cfg);
    let unknown = f.unknown_keys();
    if !unknown.is_empty() {
        f.problems.push(format!(
            "{} unknown key(s) nuwa does not implement for {}: {} (they would change the \
             model; nuwa refuses rather than compute a different one)",
            unknown.len(),
            arch.model_type(),
            unknown.join(", ")
        ));
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

/// Writes `cfg` as a `config.json` of its architecture. `original` (the imported checkpoint's
/// config, when there is one) keeps every descriptive key; the shape keys come from `cfg`.
pub fn config_to_hf(arch: Arch, cfg: &ModelConfig, original: Option<&Value>) -> Result<Value> {
    let bad = arch.spec().cannot_hold(cfg);
    if !bad.is_empty() {
        bail!(
            "this model cannot be written as {}: it has {}",
            arch.model_type(),
            bad.join(", ")
        );
    }
    let mut out = original
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let has_rope_parameters = out.contains_key("rope_parameters");
    let mut set = |k: &str, v: Value| {
        out.insert(k.to_string(), v);
    };
    set("model_type", json!(arch.spec().hf_model_type()));
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
    arch.spec().write_config(cfg, &mut set);
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

    fn ling(extra: Value) -> Value {
        let mut cfg = json!({
            "model_type": "bailing_moe", "architectures": ["BailingMoeForCausalLM"],
            "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
            "transformers_version": "4.51.3", "torch_dtype": "bfloat16", "pad_token_id": 0
        });
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        cfg
    }

    #[test]
    fn a_ling_2_config_is_not_read_as_ling_1() {
        let v2 = ling(json!({
            "score_function": "sigmoid", "n_group": 2, "topk_group": 1,
            "routed_scaling_factor": 2.5, "partial_rotary_factor": 0.5,
            "num_nextn_predict_layers": 1, "moe_router_enable_expert_bias": true
        }));
        let err = config_from_hf(&v2, "config.json").unwrap_err().to_string();
        for key in [
            "score_function",
            "n_group",
            "topk_group",
            "routed_scaling_factor",
            "partial_rotary_factor",
            "num_nextn_predict_layers",
            "moe_router_enable_expert_bias",
        ] {
            assert!(err.contains(key), "{key} not in: {err}");
        }
        assert!(err.contains("7 unknown key(s)"), "{err}");
        // Metadata and keys that cannot change the model pass.
        assert!(config_from_hf(
            &ling(json!({"use_cache": false, "sliding_window": 4096})),
            "c"
        )
        .is_ok());
    }

    #[test]
    fn absent_ling_keys_take_ants_defaults() {
        let (_, c) = config_from_hf(&ling(json!({})), "c").unwrap();
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert!(c.use_bias && !c.mlp_bias && !c.norm_head && c.norm_topk_prob);
        assert_eq!(
            (c.embedding_dropout, c.output_dropout, c.attention_dropout),
            (0.1, 0.1, 0.1)
        );
        assert_eq!(
            (c.rope_theta, c.max_position_embeddings),
            (10_000.0, 16_384)
        );
        let mut no_kv = ling(json!({}));
        no_kv.as_object_mut().unwrap().remove("num_key_value_heads");
        let err = config_from_hf(&no_kv, "c").unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
    }
}
