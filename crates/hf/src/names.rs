//! Where each nuwa parameter lives in a Hugging Face checkpoint.
//!
//! nuwa names parameters by module path (`layers.0.attention.query_key_value.weight`) and keeps
//! linear weights as `[in, out]`; HF keeps them as `[out, in]`. Llama-family checkpoints store
//! q, k and v separately; nuwa runs them as one fused projection (Ling's `query_key_value`), so
//! those three HF tensors are stacked (import) or split (export) along the output dimension.
//! nuwa stacks each layer's routed experts into one `[experts, in, out]` tensor per
//! projection; HF keeps one `[out, in]` tensor per expert.

use crate::arch::Arch;
use nuwa_model::weights::HostTensor;
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
    /// Stacked experts: nuwa's tensor is the parts one after another along a new first
    /// dimension, each transposed on its own (otherwise the parts are concatenated along HF's
    /// first dimension and the whole transposed).
    pub stacked: bool,
}

impl TensorMap {
    /// nuwa's tensor data from the HF parts' data, given in `parts` order.
    pub fn join(&self, parts: Vec<Vec<f32>>) -> Vec<f32> {
        let flip = |data: &[f32], (rows, cols): (usize, usize)| transpose(data, rows, cols);
        match (self.stacked, self.transpose) {
            (true, true) => self
                .parts
                .iter()
                .zip(&parts)
                .flat_map(|((_, shape), data)| flip(data, (shape[0], shape[1])))
                .collect(),
            (false, true) => flip(&parts.concat(), (self.shape[1], self.shape[0])),
            (_, false) => parts.concat(),
        }
    }

    /// The HF parts, by name, from nuwa's tensor data.
    pub fn split(&self, data: &[f32]) -> Vec<(String, HostTensor)> {
        let whole = match (self.stacked, self.transpose) {
            (false, true) => transpose(data, self.shape[0], self.shape[1]),
            _ => data.to_vec(),
        };
        let mut offset = 0;
        let mut out = Vec::with_capacity(self.parts.len());
        for (name, shape) in &self.parts {
            let n: usize = shape.iter().product();
            let chunk = &whole[offset..offset + n];
            offset += n;
            let data = if self.stacked && self.transpose {
                // nuwa's slice is `[in, out]`, HF's `[out, in]`.
                transpose(chunk, shape[1], shape[0])
            } else {
                chunk.to_vec()
            };
            let shape = shape.clone();
            out.push((name.clone(), HostTensor { shape, data }));
        }
        out
    }
}

/// `[rows, cols]` row-major → `[cols, rows]`.
pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// The full mapping for a model of `arch` with config `cfg`.
pub fn tensor_maps(arch: Arch, cfg: &ModelConfig) -> Vec<TensorMap> {
    LanguageModel::parameter_shapes(cfg)
        .into_iter()
        .map(|(internal, shape)| map_one(arch, cfg, internal, shape))
        .collect()
}

/// Tensors the architecture's own code builds that hold nothing, and so have no nuwa
/// parameter: Ling's shared-expert MLP when `num_shared_experts = 0` is still built, zero
/// wide (`BailingMoeSparseMoeBlock` tests `num_shared_experts is not None`). Export writes
/// them so the folder loads in Ant's code without missing keys; import accepts them.
pub fn empty_tensors(arch: Arch, cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    if arch != Arch::BailingMoe || cfg.num_shared_experts > 0 {
        return Vec::new();
    }
    let h = cfg.hidden_size;
    (0..cfg.num_hidden_layers)
        .filter(|&i| cfg.layer_is_moe(i))
        .flat_map(|i| {
            let p = format!("model.layers.{i}.mlp.shared_experts.");
            [
                (format!("{p}gate_proj.weight"), vec![0, h]),
                (format!("{p}up_proj.weight"), vec![0, h]),
                (format!("{p}down_proj.weight"), vec![h, 0]),
            ]
        })
        .collect()
}

fn map_one(arch: Arch, cfg: &ModelConfig, internal: String, shape: Vec<usize>) -> TensorMap {
    let stacked = internal.contains(".moe.experts.");
    let is_linear = (shape.len() == 2 && internal != "word_embeddings.weight") || stacked;
    let hf_shape = |s: &[usize]| -> Vec<usize> {
        if is_linear {
            vec![s[1], s[0]]
        } else {
            s.to_vec()
        }
    };
    let single = |name: String| vec![(name, hf_shape(&shape))];
    // MTP layer K is HF's decoder layer `num_hidden_layers + K`, its decoder's parts at the
    // layer's top level beside `enorm`, `hnorm`, `eh_proj` and `final_layernorm`.
    let path = match internal.strip_prefix("mtp_layers.") {
        Some(rest) => {
            let (k, rest) = rest.split_once('.').unwrap_or((rest, ""));
            let index = cfg.num_hidden_layers + k.parse::<usize>().unwrap_or(0);
            let rest = rest.strip_prefix("decoder.").unwrap_or(rest);
            format!("layers.{index}.{rest}")
        }
        None => internal.clone(),
    };
    let parts = match path.strip_prefix("layers.") {
        None => single(global_name(arch, &path)),
        Some(rest) => {
            let (layer, rest) = rest.split_once('.').unwrap_or((rest, ""));
            let prefix = format!("model.layers.{layer}.");
            let split_qkv =
                !arch.spec().fused_qkv() && rest.starts_with("attention.query_key_value.");
            if stacked {
                // `[experts, in, out]` ← one `[out, in]` tensor per expert.
                (0..shape[0])
                    .map(|e| {
                        let proj = rest.rsplit('.').next().unwrap_or_default();
                        let one = format!("moe.experts.{e}.{proj}.weight");
                        (
                            format!("{prefix}{}", layer_name(arch, &one)),
                            vec![shape[2], shape[1]],
                        )
                    })
                    .collect()
            } else if split_qkv {
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
        stacked,
    }
}

fn global_name(arch: Arch, internal: &str) -> String {
    match internal {
        "word_embeddings.weight" => arch.spec().embeddings_name().into(),
        "norm.weight" => "model.norm.weight".into(),
        other => other.to_string(), // lm_head.weight
    }
}

/// The HF name of a parameter inside decoder layer N (after `model.layers.N.`).
fn layer_name(arch: Arch, rest: &str) -> String {
    // A MoE layer's FFN is `moe` in nuwa, `mlp` in HF like a dense one.
    arch.spec().layer_name(&rest.replacen("moe.", "mlp.", 1))
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
        let up = find(&maps, "layers.0.moe.experts.up_proj");
        assert_eq!(
            up.parts[3].0,
            "model.layers.0.block_sparse_moe.experts.3.w3.weight"
        );
        let gate = find(&maps, "layers.0.moe.gate.weight");
        assert_eq!(
            gate.parts[0].0,
            "model.layers.0.block_sparse_moe.gate.weight"
        );
    }

    #[test]
    fn bailing_names_are_nuwas_own() {
        let cfg = ModelConfig::preset("tiny-moe").unwrap();
        let maps = tensor_maps(Arch::BailingMoe, &cfg);
        let shared = find(&maps, "layers.1.moe.shared_experts.down_proj.weight");
        assert_eq!(
            shared.parts[0].0,
            "model.layers.1.mlp.shared_experts.down_proj.weight"
        );
        let dense = find(&maps, "layers.0.mlp.gate_proj.weight");
        assert_eq!(dense.parts[0].0, "model.layers.0.mlp.gate_proj.weight");
        assert_eq!(
            find(&maps, "word_embeddings.weight").parts[0].0,
            "model.word_embeddings.weight"
        );
    }
}
