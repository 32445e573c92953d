//! Reading an HF checkpoint folder into nuwa: the model, its weights, tokenizer and chat template.

use crate::arch::{config_from_hf, Arch};
use crate::names::{empty_tensors, tensor_maps, TensorMap};
use crate::safetensors_dir::{is_supported_dtype, SafetensorsDir};
use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::Device;
use nuwa_data::Tokenizer;
use nuwa_model::weights::{assign_weights, HostTensor};
use nuwa_model::{LanguageModel, ModelConfig};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Files besides the weights that describe a checkpoint; kept with an imported run (in `hf/`)
/// and written back on export.
pub const SIDE_FILES: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// An HF checkpoint folder, opened: config translated, weight headers checked.
pub struct HfCheckpoint {
    pub dir: PathBuf,
    pub arch: Arch,
    pub config: ModelConfig,
    /// The original `config.json`.
    pub hf_config: Value,
    weights: SafetensorsDir,
}

impl HfCheckpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: not a folder", dir.display());
        }
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let hf_config: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
        let (arch, config) = config_from_hf(&hf_config, &path.display().to_string())?;
        let weights = SafetensorsDir::open(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            arch,
            config,
            hf_config,
            weights,
        })
    }

    /// Every problem between the files and what the config needs: missing, unexpected and
    /// mis-shaped tensors and unsupported dtypes, all of them.
    fn check(&self, maps: &[TensorMap]) -> Vec<String> {
        let mut problems = Vec::new();
        let mut used = BTreeSet::new();
        for (name, shape) in maps.iter().flat_map(|m| &m.parts) {
            match self.weights.tensors.get(name) {
                None => problems.push(format!("missing tensor {name} (shape {shape:?})")),
                Some(entry) => {
                    used.insert(name.as_str());
                    if &entry.shape != shape {
                        problems.push(format!(
                            "tensor {name} has shape {:?}, the config implies {shape:?}",
                            entry.shape
                        ));
                    }
                    if !is_supported_dtype(entry.dtype) {
                        problems.push(format!(
                            "tensor {name} has dtype {:?} (supported: F32, F16, BF16)",
                            entry.dtype
                        ));
                    }
                }
            }
        }
        let empty = empty_tensors(self.arch, &self.config);
        for (name, shape) in &empty {
            if let Some(entry) = self.weights.tensors.get(name) {
                used.insert(name.as_str());
                if &entry.shape != shape {
                    problems.push(format!(
                        "tensor {name} has shape {:?}, the config implies {shape:?} (no shared experts)",
                        entry.shape
                    ));
                }
            }
        }
        for name in self.weights.tensors.keys() {
            // A tied head may still be saved; old checkpoints carry RoPE's inverse frequencies.
            let tolerated = (self.config.tie_word_embeddings && name == "lm_head.weight")
                || name.ends_with("rotary_emb.inv_freq");
            if !used.contains(name.as_str()) && !tolerated {
                problems.push(format!("unexpected tensor {name}"));
            }
        }
        problems
    }

    /// Reads every weight into nuwa's names and layout (f32).
    pub fn load_weights(&self) -> Result<BTreeMap<String, HostTensor>> {
        let maps = tensor_maps(self.arch, &self.config);
        let problems = self.check(&maps);
        if !problems.is_empty() {
            bail!(
                "{}: {} problem(s) with the weights for {}: {}",
                self.dir.display(),
                problems.len(),
                self.arch.model_type(),
                problems.join("; ")
            );
        }
        let mut out = BTreeMap::new();
        for m in maps {
            let parts = m
                .parts
                .iter()
                .map(|(name, _)| self.weights.read_f32(name))
                .collect::<Result<Vec<_>>>()?;
            let data = m.join(parts);
            out.insert(
                m.internal.clone(),
                HostTensor {
                    shape: m.shape.clone(),
                    data,
                },
            );
        }
        Ok(out)
    }

    /// The model with the checkpoint's weights, on `device`.
    pub fn load_model(&self, device: &Device) -> Result<LanguageModel> {
        check_fits_in_memory(&self.config, 2)?;
        let weights = self.load_weights()?;
        assign_weights(
            LanguageModel::uninitialised(&self.config, device),
            &weights,
            &self.dir.display().to_string(),
        )
    }

    /// The checkpoint's own tokenizer (`tokenizer.json`).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::load(&self.dir)
    }
}

/// Refuses, before reading anything, a model whose f32 weights (times `copies` in flight)
/// would not fit in the memory the OS says is available.
pub fn check_fits_in_memory(cfg: &ModelConfig, copies: u64) -> Result<()> {
    let need = cfg.counts(1).total_params * 4 * copies;
    if let Some(available) = nuwa_core::hardware::available_memory() {
        if need > available {
            bail!(
                "the model needs about {:.1} GiB in f32 ({} parameters) but only {:.1} GiB of \
                 memory is available",
                need as f64 / (1u64 << 30) as f64,
                cfg.counts(1).total_params,
                available as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn transpose_swaps_axes() {
        let t = crate::names::transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3);
        assert_eq!(t, [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }
}
