//! The weights of an HF folder: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Files are memory-mapped and only headers are parsed up front,
//! so names, dtypes and shapes are checked before any weight is read, and each tensor is
//! converted to f32 straight from the mapping (never read twice).

use anyhow::{anyhow, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

/// Where a tensor is: which shard, its dtype, shape and byte range in the data section.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    shard: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    range: (usize, usize),
}

pub struct SafetensorsDir {
    shards: Vec<Shard>,
    pub tensors: BTreeMap<String, TensorEntry>,
}

impl SafetensorsDir {
    /// Opens the weights in `dir`, checking every file's header; all problems are reported.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        let (files, weight_map) = if index.exists() {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("{}: cannot read", index.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow!("{}: not valid JSON: {e}", index.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{}: no `weight_map` object", index.display()))?;
            let mut weight_map = BTreeMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    anyhow!("{}: weight_map[{name}] is not a file name", index.display())
                })?;
                weight_map.insert(name.clone(), file.to_string());
            }
            let mut files: Vec<String> = weight_map.values().cloned().collect();
            files.sort();
            files.dedup();
            (files, Some(weight_map))
        } else if dir.join(SINGLE_FILE).exists() {
            (vec![SINGLE_FILE.to_string()], None)
        } else {
            anyhow::bail!(
                "{}: no weights (expected {SINGLE_FILE} or {INDEX_FILE})",
                dir.display()
            );
        };

        let mut problems = Vec::new();
        let mut shards = Vec::new();
        for file in &files {
            match open_shard(&dir.join(file)) {
                Ok(shard) => shards.push(shard),
                Err(e) => problems.push(format!("{e:#}")),
            }
        }
        let mut tensors = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = shard.path.file_name().unwrap_or_default().to_string_lossy();
            for (name, info) in shard.metadata.tensors() {
                if let Some(map) = &weight_map {
                    if map.get(&name).map(String::as_str) != Some(&*file) {
                        problems.push(format!(
                            "{}: holds {name}, which {INDEX_FILE} does not place there",
                            shard.path.display()
                        ));
                    }
                }
                tensors.insert(
                    name,
                    TensorEntry {
                        shard: i,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        range: info.data_offsets,
                    },
                );
            }
        }
        if let Some(map) = &weight_map {
            let opened: Vec<String> = shards
                .iter()
                .map(|s| {
                    s.path
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into()
                })
                .collect();
            for (name, file) in map {
                if opened.contains(file) && !tensors.contains_key(name) {
                    problems.push(format!(
                        "{INDEX_FILE} places {name} in {file}, which does not hold it"
                    ));
                }
            }
        }
        if !problems.is_empty() {
            anyhow::bail!(
                "{}: {} problem(s) with the weight files: {}",
                dir.display(),
                problems.len(),
                problems.join("; ")
            );
        }
        Ok(Self { shards, tensors })
    }

    /// A tensor converted to f32 (from f32, f16 or bf16).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("tensor {name} is not in the checkpoint"))?;
        let shard = &self.shards[entry.shard];
        let bytes = &shard.map[shard.data_start + entry.range.0..shard.data_start + entry.range.1];
        let le2 = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
        Ok(match entry.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_bits(le2(b)).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_bits(le2(b)).to_f32())
                .collect(),
            other => anyhow::bail!(
                "{}: tensor {name} has dtype {other:?} (supported: F32, F16, BF16)",
                shard.path.display()
            ),
        })
    }
}

pub fn is_supported_dtype(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    // SAFETY: the mapping is read-only and lives as long as the shard; a checkpoint being
    // rewritten underneath a running import is outside what any loader can guard against.
    let map =
        unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
        let why = match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => format!(
                "truncated: the header describes more data than the file's {} bytes",
                map.len()
            ),
            other => format!("not a valid safetensors file ({other})"),
        };
        anyhow!("{}: {why}", path.display())
    })?;
    Ok(Shard {
        path: path.to_path_buf(),
        data_start: 8 + header_len,
        map,
        metadata,
    })
}
