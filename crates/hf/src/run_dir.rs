//! `nuwa import` (HF folder → run folder) and `nuwa export` (run folder → HF folder).
//!
//! An imported run is an ordinary run folder whose step-0 checkpoint holds the HF weights and
//! whose `hf/` subfolder keeps the checkpoint's descriptive files (config, tokenizer config,
//! chat template, generation config), so `sample`, `train --resume` and `export` all work on it.

use crate::arch::{config_to_hf, Arch};
use crate::import::{check_fits_in_memory, HfCheckpoint, SIDE_FILES};
use crate::names::{empty_tensors, tensor_maps};
use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::Device;
use half::{bf16, f16};
use nuwa_data::BatchSampler;
use nuwa_model::weights::HostTensor;
use nuwa_run::checkpoint::{self, TrainerState};
use nuwa_run::{DataConfig, RunConfig, TrainConfig};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The subfolder of a run holding an imported checkpoint's descriptive files.
pub const HF_SUBDIR: &str = "hf";

fn refuse_existing(path: &Path) -> Result<()> {
    let non_empty = std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_some());
    if non_empty {
        bail!(
            "{}: already exists and is not empty; choose a new folder",
            path.display()
        );
    }
    Ok(())
}

/// Copies an HF folder's descriptive files into `run/hf/` (and its tokenizer beside the run's
/// checkpoints, where sampling looks for it).
pub fn keep_side_files(hf_dir: &Path, run: &Path) -> Result<()> {
    std::fs::create_dir_all(run.join(HF_SUBDIR))
        .with_context(|| format!("{}: cannot create", run.display()))?;
    for file in SIDE_FILES {
        let from = hf_dir.join(file);
        if from.exists() {
            let bytes =
                std::fs::read(&from).with_context(|| format!("{}: cannot read", from.display()))?;
            nuwa_core::atomic_write(&run.join(HF_SUBDIR).join(file), &bytes)?;
            if file == "tokenizer.json" {
                nuwa_core::atomic_write(&run.join(file), &bytes)?;
            }
        }
    }
    Ok(())
}

/// Imports the HF checkpoint in `hf_dir` as a new run folder `run`.
pub fn import_to_run(hf_dir: &Path, run: &Path, device: &Device) -> Result<PathBuf> {
    refuse_existing(run)?;
    let ckpt = HfCheckpoint::open(hf_dir)?;
    check_fits_in_memory(&ckpt.config, 3)?;
    let model = ckpt.load_model(device)?;
    keep_side_files(hf_dir, run)?;
    let train = TrainConfig {
        seq_len: TrainConfig::default()
            .seq_len
            .min(ckpt.config.max_position_embeddings),
        ..TrainConfig::default()
    };
    let config = RunConfig {
        model: ckpt.config.clone(),
        train,
        data: DataConfig::default(),
    };
    nuwa_core::atomic_write(
        &run.join("config.toml"),
        toml::to_string_pretty(&config)?.as_bytes(),
    )?;
    let state = TrainerState {
        step: 0,
        sampler: BatchSampler::new(config.train.seed),
        tokens_seen: 0,
        config,
        checksums: BTreeMap::new(),
        format: checkpoint::CHECKPOINT_FORMAT,
        spikes: Default::default(),
        data: None,
        shards: Vec::new(),
    };
    // A fresh optimiser: no moments yet.
    checkpoint::save(run, &model, BTreeMap::new(), state, 1)
}

/// Moves the finished temporary folder into place.
fn finish(tmp: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        std::fs::remove_dir(out)?; // empty, checked above
    }
    std::fs::rename(tmp, out)?;
    Ok(())
}

/// Gives the exported config a `pad_token_id` inside the vocabulary. transformers builds the
/// embeddings with it as `padding_idx`, and Ant's `BailingMoeConfig` defaults it to 126081:
/// absent, a small-vocabulary export would not even build. Kept when the imported config has
/// a valid one; else the tokenizer's own padding or end-of-text token, else 0.
fn set_pad_token(
    config: &mut serde_json::Value,
    tokenizer: Option<&nuwa_data::Tokenizer>,
    vocab: usize,
) {
    let valid = |v: &serde_json::Value| v.as_u64().is_some_and(|id| (id as usize) < vocab);
    if valid(&config["pad_token_id"]) {
        return;
    }
    let id = tokenizer
        .and_then(|t| t.special_token_id(&["<pad>", "<|pad|>", "<|endoftext|>", "</s>", "<eos>"]))
        .filter(|&id| (id as usize) < vocab)
        .or_else(|| {
            config["eos_token_id"]
                .as_u64()
                .filter(|&id| (id as usize) < vocab)
                .map(|id| id as u32)
        })
        .unwrap_or(0);
    config["pad_token_id"] = serde_json::json!(id);
}

/// Element type of exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    Bf16,
    F16,
}

impl ExportDtype {
    fn encode(self, values: &[f32]) -> (Dtype, Vec<u8>) {
        match self {
            Self::F32 => (
                Dtype::F32,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            Self::Bf16 => (
                Dtype::BF16,
                values
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            Self::F16 => (
                Dtype::F16,
                values
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }
}

/// nuwa weights (internal names) → HF tensors of `arch`.
pub fn to_hf_tensors(
    arch: Arch,
    cfg: &nuwa_model::ModelConfig,
    weights: &BTreeMap<String, HostTensor>,
) -> Result<BTreeMap<String, HostTensor>> {
    let mut out = BTreeMap::new();
    for m in tensor_maps(arch, cfg) {
        let t = weights
            .get(&m.internal)
            .ok_or_else(|| anyhow!("the checkpoint has no tensor {}", m.internal))?;
        if t.shape != m.shape {
            bail!(
                "tensor {} has shape {:?}, the config implies {:?}",
                m.internal,
                t.shape,
                m.shape
            );
        }
        out.extend(m.split(&t.data));
    }
    for (name, shape) in empty_tensors(arch, cfg) {
        let data = Vec::new();
        out.insert(name, HostTensor { shape, data });
    }
    Ok(out)
}

/// Writes the newest checkpoint of `run` as an HF folder `out` (config, weights, tokenizer).
/// How `export_run` writes: tensor dtype, and the largest safetensors file before it shards.
#[derive(Debug, Clone, Copy)]
pub struct ExportOptions {
    pub dtype: ExportDtype,
    /// Above this many bytes of tensors the weights are split into `model-0000K-of-0000N`
    /// shards with a `model.safetensors.index.json`, as `save_pretrained` does (5 GB default).
    pub max_shard_bytes: u64,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            dtype: ExportDtype::F32,
            max_shard_bytes: 5_000_000_000,
        }
    }
}

/// Tensors in order, split greedily so that no shard passes `max` bytes (a tensor larger than
/// `max` gets a shard of its own).
fn shard_groups(sizes: &[u64], max: u64) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && bytes + size > max {
            groups.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < sizes.len() {
        groups.push(start..sizes.len());
    }
    groups
}

/// The weight files of an export as `(file name, body)`: one `model.safetensors`, or shards
/// and their `model.safetensors.index.json`.
fn safetensors_files(
    encoded: &[(String, Vec<usize>, Dtype, Vec<u8>)],
    max_shard_bytes: u64,
) -> Result<Vec<(String, Vec<u8>)>> {
    let sizes: Vec<u64> = encoded.iter().map(|t| t.3.len() as u64).collect();
    let groups = shard_groups(&sizes, max_shard_bytes.max(1));
    let n = groups.len();
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (k, group) in groups.into_iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        };
        let views = encoded[group]
            .iter()
            .map(|(name, shape, dt, bytes)| {
                weight_map.insert(name.clone(), serde_json::json!(file));
                TensorView::new(*dt, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| anyhow!("tensor {name}: {e}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let body = safetensors::serialize(views, Some(metadata))
            .map_err(|e| anyhow!("serialising safetensors: {e}"))?;
        files.push((file, body));
    }
    if n > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": sizes.iter().sum::<u64>()},
            "weight_map": weight_map,
        });
        let body = serde_json::to_string_pretty(&index)?.into_bytes();
        files.push(("model.safetensors.index.json".into(), body));
    }
    Ok(files)
}

pub fn export_run(run: &Path, out: &Path, options: &ExportOptions) -> Result<()> {
    let dtype = options.dtype;
    refuse_existing(out)?;
    let mut loaded = checkpoint::load_latest(run)?;
    loaded.bake_old_norm_head()?;
    let cfg = &loaded.state.config.model;
    let arch = Arch::of(cfg)?;
    let hf = run.join(HF_SUBDIR);
    let original =
        match std::fs::read_to_string(hf.join("config.json")) {
            Ok(text) => Some(serde_json::from_str(&text).map_err(|e| {
                anyhow!("{}: not valid JSON: {e}", hf.join("config.json").display())
            })?),
            Err(_) => None,
        };
    let mut config = config_to_hf(arch, cfg, original.as_ref())?;
    config["torch_dtype"] = serde_json::json!(dtype.torch_name());
    // A run imported from a folder without a tokenizer has none: export then writes none.
    let has_tokenizer = [nuwa_data::NUWA_TOKENIZER_FILE, nuwa_data::HF_TOKENIZER_FILE]
        .iter()
        .any(|f| run.join(f).exists());
    let tokenizer = if has_tokenizer {
        Some(nuwa_data::Tokenizer::load(run)?)
    } else {
        None
    };
    set_pad_token(&mut config, tokenizer.as_ref(), cfg.vocab_size);
    let tensors = to_hf_tensors(arch, cfg, &loaded.weights)?;
    let encoded: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, t)| {
            let (dt, bytes) = dtype.encode(&t.data);
            (name, t.shape, dt, bytes)
        })
        .collect();
    let files = safetensors_files(&encoded, options.max_shard_bytes)?;
    drop(encoded);

    // Everything goes into a temporary sibling folder first, renamed into place at the end.
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(p) = parent {
        std::fs::create_dir_all(p).with_context(|| format!("{}: cannot create", p.display()))?;
    }
    let name = out
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a folder name", out.display()))?;
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let written = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp)?;
        for (file, body) in &files {
            nuwa_core::atomic_write(&tmp.join(file), body)?;
        }
        nuwa_core::atomic_write(
            &tmp.join("config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        for file in SIDE_FILES.iter().filter(|f| **f != "config.json") {
            let from = [hf.join(file), run.join(file)]
                .into_iter()
                .find(|p| p.exists());
            if let Some(from) = from {
                std::fs::copy(&from, tmp.join(file))
                    .with_context(|| format!("{}: cannot copy", from.display()))?;
            }
        }
        // nuwa's own char/byte tokenizers, written as a tokenizer.json transformers loads.
        let Some(tokenizer) = &tokenizer else {
            return finish(&tmp, out);
        };
        if !tmp.join("tokenizer.json").exists() {
            nuwa_core::atomic_write(&tmp.join("tokenizer.json"), tokenizer.hf_json()?.as_bytes())?;
        }
        if !tmp.join("tokenizer_config.json").exists() {
            let side = serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast"});
            nuwa_core::atomic_write(
                &tmp.join("tokenizer_config.json"),
                serde_json::to_string_pretty(&side)?.as_bytes(),
            )?;
        }
        finish(&tmp, out)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing {}", out.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_never_pass_the_limit_unless_one_tensor_does() {
        assert_eq!(shard_groups(&[4, 4, 4], 100), vec![0..3]);
        assert_eq!(shard_groups(&[4, 4, 4], 8), vec![0..2, 2..3]);
        assert_eq!(shard_groups(&[4, 20, 4], 8), vec![0..1, 1..2, 2..3]);
        assert!(shard_groups(&[], 8).is_empty());
    }
}
