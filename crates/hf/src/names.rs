//! Where each nuwa parameter lives in a Hugging Face checkpoint.
//!
//! nuwa names parameters by module path (`layers.0.attention.query_key_value.weight`) and keeps
//! linear weights as `[in, out]`; HF keeps them as `[out, in]`. Llama-family checkpoints store
//! q, k and v separately; nuwa runs them as one fused projection (Ling's `query_key_value`), so
//! those three HF tensors are stacked (import) or split (export) along the output dimension.

use crate::arch::Arch;
use nuwa_model::{LanguageModel, ModelConfig};

/// One nuwa parameter and the HF tensor(s) that hold it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMap {
    /// nuwa's path.
    pub internal: String,
    /// nuwa's shape (`[in, out]` for linear weights).
    pub shape: Vec<usize>,
    /// HF names with their shapes, stacked along dimension 0 in this order.
    pub parts: Vec<(String, Vec<usize>)>,
    /// A linear weight: HF's `[out, in]` is the transpose of nuwa's `[in, out]`.
    pub transpose: bool,
}

/// The full mapping for a model of `arch` with config `cfg`.
pub fn tensor_maps(arch: Arch, cfg: &ModelConfig) -> Vec<TensorMap> {
    LanguageModel::parameter_shapes(cfg)
        .into_iter()
        .map(|(internal, shape)| map_one(arch, cfg, internal, shape))
        .collect()
}

fn map_one(arch: Arch, cfg: &ModelConfig, internal: String, shape: Vec<usize>) -> TensorMap {
    let is_linear = shape.len() == 2 && internal != "word_embeddings.weight";
    let hf_shape = |s: &[usize]| -> Vec<usize> {
        if is_linear {
            vec![s[1], s[0]]
        } else {
            s.to_vec()
        }
    };
    let single = |name: String| vec![(name, hf_shape(&shape))];
    let parts = match internal.strip_prefix("layers.") {
        None => single(global_name(arch, &internal)),
        Some(rest) => {
            let (layer, rest) = rest.split_once('.').unwrap_or((rest, ""));
            let prefix = format!("model.layers.{layer}.");
            let fused_qkv =
                arch != Arch::BailingMoe && rest.starts_with("attention.query_key_value.");
            if fused_qkv {
                let suffix = rest.rsplit('.').next().unwrap_or("weight");
                let d = cfg.head_dim();
                let rows = [
                    cfg.num_attention_heads * d,
                    cfg.num_key_value_heads * d,
                    cfg.num_key_value_heads * d,
                ];
                ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .zip(rows)
                    .map(|(p, r)| {
                        let s = if is_linear {
                            vec![r, shape[0]]
                        } else {
                            vec![r]
                        };
                        (format!("{prefix}self_attn.{p}.{suffix}"), s)
                    })
                    .collect()
            } else {
                single(format!("{prefix}{}", layer_name(arch, rest)))
            }
        }
    };
    TensorMap {
        internal,
        shape,
        parts,
        transpose: is_linear,
    }
}

fn global_name(arch: Arch, internal: &str) -> String {
    match internal {
        "word_embeddings.weight" if arch == Arch::BailingMoe => {
            "model.word_embeddings.weight".into()
        }
        "word_embeddings.weight" => "model.embed_tokens.weight".into(),
        "norm.weight" => "model.norm.weight".into(),
        other => other.to_string(), // lm_head.weight
    }
}

/// The HF name of a parameter inside decoder layer N (after `model.layers.N.`).
fn layer_name(arch: Arch, rest: &str) -> String {
    // nuwa's FFN is an enum; its variant appears in the path and not in HF's.
    let rest = rest
        .replacen("mlp.Dense.", "mlp.", 1)
        .replacen("mlp.Moe.", "mlp.", 1);
    if arch == Arch::BailingMoe {
        return rest;
    }
    let rest = rest
        .replacen("attention.dense.", "self_attn.o_proj.", 1)
        .replacen("attention.query_layernorm.", "self_attn.q_norm.", 1)
        .replacen("attention.key_layernorm.", "self_attn.k_norm.", 1);
    if arch == Arch::Mixtral {
        if let Some(moe) = rest.strip_prefix("mlp.") {
            let moe = moe
                .replacen(".gate_proj.", ".w1.", 1)
                .replacen(".up_proj.", ".w3.", 1)
                .replacen(".down_proj.", ".w2.", 1);
            return format!("block_sparse_moe.{moe}");
        }
    }
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(maps: &'a [TensorMap], internal: &str) -> &'a TensorMap {
        maps.iter()
            .find(|m| m.internal == internal)
            .unwrap_or_else(|| panic!("{internal} not mapped"))
    }

    #[test]
    fn llama_qkv_is_split_and_transposed() {
        let mut cfg = ModelConfig::preset("tiny-dense").unwrap();
        cfg.model_type = "llama".into();
        let maps = tensor_maps(Arch::Llama, &cfg);
        let qkv = find(&maps, "layers.1.attention.query_key_value.weight");
        assert!(qkv.transpose);
        let names: Vec<&str> = qkv.parts.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "model.layers.1.self_attn.q_proj.weight",
                "model.layers.1.self_attn.k_proj.weight",
                "model.layers.1.self_attn.v_proj.weight"
            ]
        );
        // 4 heads of 32, 2 kv heads: q is 128 rows, k and v 64, each over hidden 128.
        assert_eq!(qkv.parts[0].1, [128, 128]);
        assert_eq!(qkv.parts[1].1, [64, 128]);
        let emb = find(&maps, "word_embeddings.weight");
        assert_eq!(emb.parts[0].0, "model.embed_tokens.weight");
        assert!(!emb.transpose);
    }

    #[test]
    fn mixtral_experts_use_w1_w3_w2() {
        let mut cfg = ModelConfig::preset("tiny-moe").unwrap();
        cfg.first_k_dense_replace = 0;
        cfg.num_shared_experts = 0;
        let maps = tensor_maps(Arch::Mixtral, &cfg);
        let up = find(&maps, "layers.0.mlp.Moe.experts.3.up_proj.weight");
        assert_eq!(
            up.parts[0].0,
            "model.layers.0.block_sparse_moe.experts.3.w3.weight"
        );
        let gate = find(&maps, "layers.0.mlp.Moe.gate.weight");
        assert_eq!(
            gate.parts[0].0,
            "model.layers.0.block_sparse_moe.gate.weight"
        );
    }

    #[test]
    fn bailing_names_are_nuwas_own() {
        let cfg = ModelConfig::preset("tiny-moe").unwrap();
        let maps = tensor_maps(Arch::BailingMoe, &cfg);
        let shared = find(&maps, "layers.1.mlp.Moe.shared_experts.down_proj.weight");
        assert_eq!(
            shared.parts[0].0,
            "model.layers.1.mlp.shared_experts.down_proj.weight"
        );
        let dense = find(&maps, "layers.0.mlp.Dense.gate_proj.weight");
        assert_eq!(dense.parts[0].0, "model.layers.0.mlp.gate_proj.weight");
        assert_eq!(
            find(&maps, "word_embeddings.weight").parts[0].0,
            "model.word_embeddings.weight"
        );
    }
}
