//! Parameter names across versions of the checkpoint format.
//!
//! Version 1 (nuwa before stacked experts) named parameters after the Rust module tree,
//! enum variants included: `layers.N.mlp.Dense.…` for a dense FFN, `layers.N.mlp.Moe.…` for a
//! MoE one, and one `layers.N.mlp.Moe.experts.E.{gate,up,down}_proj.weight` per routed
//! expert. Version 2 (now, documented in `model.rs`) names them explicitly:
//! `layers.N.mlp.…`, `layers.N.moe.gate.weight`, `layers.N.moe.shared_experts.…` and stacked
//! `layers.N.moe.experts.{gate,up,down}_proj` of shape `[experts, in, out]`.
//!
//! [`upgrade_names`] converts version-1 tensors (weights, or optimiser moments named
//! `PARAM.exp_avg` / `PARAM.exp_avg_sq`, flattened) to version 2; version-2 names pass through.

use crate::weights::HostTensor;
use anyhow::{bail, Result};
use std::collections::BTreeMap;

/// One routed expert's tensor in version 1: (layer prefix, expert, projection, suffix).
fn v1_expert(name: &str) -> Option<(&str, usize, &str, &str)> {
    let (prefix, rest) = name.split_once(".mlp.Moe.experts.")?;
    let (expert, rest) = rest.split_once('.')?;
    let (proj, suffix) = rest.split_once('.')?;
    Some((prefix, expert.parse().ok()?, proj, suffix))
}

/// Converts version-1 names to version 2, stacking each layer's routed experts in expert
/// order. Fails with one line naming what cannot be converted.
pub fn upgrade_names(
    tensors: BTreeMap<String, HostTensor>,
) -> Result<BTreeMap<String, HostTensor>> {
    let mut out = BTreeMap::new();
    // (stacked name) → experts in order, each (expert index, tensor).
    let mut stacks: BTreeMap<String, Vec<(usize, HostTensor)>> = BTreeMap::new();
    for (name, tensor) in tensors {
        if let Some((prefix, expert, proj, suffix)) = v1_expert(&name) {
            let stacked = match suffix {
                "weight" => format!("{prefix}.moe.experts.{proj}"),
                "weight.exp_avg" => format!("{prefix}.moe.experts.{proj}.exp_avg"),
                "weight.exp_avg_sq" => format!("{prefix}.moe.experts.{proj}.exp_avg_sq"),
                _ => {
                    bail!("tensor {name}: routed experts have no biases since checkpoint format 2")
                }
            };
            stacks.entry(stacked).or_default().push((expert, tensor));
            continue;
        }
        let renamed = name
            .replacen(".mlp.Dense.", ".mlp.", 1)
            .replacen(".mlp.Moe.", ".moe.", 1);
        out.insert(renamed, tensor);
    }
    for (name, mut experts) in stacks {
        experts.sort_by_key(|(e, _)| *e);
        let expected: Vec<usize> = (0..experts.len()).collect();
        if experts.iter().map(|(e, _)| *e).collect::<Vec<_>>() != expected {
            bail!(
                "tensor {name}: the experts are not numbered 0..{}",
                experts.len()
            );
        }
        let shape = experts[0].1.shape.clone();
        if experts.iter().any(|(_, t)| t.shape != shape) {
            bail!("tensor {name}: the experts' shapes differ");
        }
        // Optimiser moments are flat: they stay flat, one expert after another.
        let is_moment = name.ends_with(".exp_avg") || name.ends_with(".exp_avg_sq");
        let stacked_shape = if is_moment {
            vec![experts.len() * shape.iter().product::<usize>()]
        } else {
            [vec![experts.len()], shape].concat()
        };
        let data = experts.into_iter().flat_map(|(_, t)| t.data).collect();
        out.insert(
            name,
            HostTensor {
                shape: stacked_shape,
                data,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], first: f32) -> HostTensor {
        let n = shape.iter().product();
        HostTensor {
            shape: shape.to_vec(),
            data: (0..n).map(|i| first + i as f32).collect(),
        }
    }

    #[test]
    fn version_one_experts_are_stacked_in_expert_order() {
        let mut v1 = BTreeMap::new();
        // Expert 10 sorts before expert 2 as a string: the stack must follow the number.
        for e in [0usize, 1, 2, 10, 3, 4, 5, 6, 7, 8, 9] {
            let first = 100.0 * e as f32;
            v1.insert(
                format!("layers.1.mlp.Moe.experts.{e}.up_proj.weight"),
                t(&[2, 3], first),
            );
            v1.insert(
                format!("layers.1.mlp.Moe.experts.{e}.up_proj.weight.exp_avg"),
                t(&[6], first),
            );
        }
        v1.insert(
            "layers.0.mlp.Dense.gate_proj.weight".into(),
            t(&[2, 4], 0.0),
        );
        v1.insert("layers.1.mlp.Moe.gate.weight".into(), t(&[2, 11], 0.0));
        v1.insert(
            "layers.1.mlp.Moe.shared_experts.down_proj.weight".into(),
            t(&[3, 2], 0.0),
        );
        v1.insert("norm.weight".into(), t(&[2], 0.0));
        let v2 = upgrade_names(v1).unwrap();
        let names: Vec<&str> = v2.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "layers.0.mlp.gate_proj.weight",
                "layers.1.moe.experts.up_proj",
                "layers.1.moe.experts.up_proj.exp_avg",
                "layers.1.moe.gate.weight",
                "layers.1.moe.shared_experts.down_proj.weight",
                "norm.weight",
            ]
        );
        let up = &v2["layers.1.moe.experts.up_proj"];
        assert_eq!(up.shape, [11, 2, 3]);
        assert_eq!(up.data[6 * 2], 200.0, "expert 2 is the third slice");
        assert_eq!(up.data[6 * 10], 1000.0, "expert 10 is the last slice");
        assert_eq!(v2["layers.1.moe.experts.up_proj.exp_avg"].shape, [66]);
        // Version 2 passes through unchanged.
        assert_eq!(upgrade_names(v2.clone()).unwrap(), v2);
    }

    #[test]
    fn expert_biases_are_refused_by_name() {
        let mut v1 = BTreeMap::new();
        v1.insert(
            "layers.1.mlp.Moe.experts.0.up_proj.bias".into(),
            t(&[3], 0.0),
        );
        let err = upgrade_names(v1).unwrap_err().to_string();
        assert!(
            err.contains("layers.1.mlp.Moe.experts.0.up_proj.bias"),
            "{err}"
        );
    }
}
