//! A dump: every tensor one training step computed — forward activations in the order they
//! were computed, the router's choices, every parameter's gradient and every parameter after
//! the optimizer step — with the step's loss. On disk a folder of two files, written
//! atomically: `tensors.safetensors` (f32, keys `KIND/NAME`) and `dump.json` (the order, the
//! source, the step and the loss). Another implementation writes the same format
//! (tests/reference/torch_dump.py) to be compared with `nuwa parity compare`.

use anyhow::{anyhow, bail, Context, Result};
use nuwa_model::weights::{from_safetensors, to_safetensors, HostTensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const FORMAT: &str = "nuwa-parity-dump/1";
const TENSORS: &str = "tensors.safetensors";
const INDEX: &str = "dump.json";

/// What a tensor of a dump is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An activation of the forward pass (a module's output or an op's, see nuwa-model's
    /// `trace.rs` for the names).
    Forward,
    /// The experts each token chose (ids as f32).
    Router,
    /// A parameter's gradient of the step's loss.
    Gradient,
    /// A parameter after the optimizer step.
    Weight,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Forward => "forward",
            Kind::Router => "router",
            Kind::Gradient => "gradient",
            Kind::Weight => "weight",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub kind: Kind,
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryName {
    pub kind: Kind,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DumpIndex {
    pub format: String,
    /// What computed it: a device name (`cpu`, `wgpu:0`), or another implementation.
    pub source: String,
    /// The optimizer step it was taken at (1 = the first).
    pub step: u64,
    /// The step's training loss (cross-entropy plus the weighted router losses).
    pub loss: f64,
    /// The step's batch, so another implementation can compute the same step
    /// (tests/reference/torch_dump.py reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<DumpBatch>,
    pub entries: Vec<EntryName>,
}

/// Token ids of a batch, row after row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DumpBatch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct Dump {
    pub source: String,
    pub step: u64,
    pub loss: f64,
    pub batch: Option<DumpBatch>,
    pub entries: Vec<Entry>,
}

impl Dump {
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tensors: BTreeMap<String, HostTensor> = self
            .entries
            .iter()
            .map(|e| {
                let key = format!("{}/{}", e.kind.as_str(), e.name);
                let t = HostTensor {
                    shape: e.shape.clone(),
                    data: e.values.clone(),
                };
                (key, t)
            })
            .collect();
        let index = DumpIndex {
            format: FORMAT.into(),
            source: self.source.clone(),
            step: self.step,
            loss: self.loss,
            batch: self.batch.clone(),
            entries: self
                .entries
                .iter()
                .map(|e| EntryName {
                    kind: e.kind,
                    name: e.name.clone(),
                })
                .collect(),
        };
        // Tensors first: a dump.json only ever sits beside the tensors it lists.
        nuwa_core::files::atomic_write(&dir.join(TENSORS), &to_safetensors(&tensors)?)?;
        nuwa_core::files::atomic_write(&dir.join(INDEX), &serde_json::to_vec_pretty(&index)?)?;
        Ok(())
    }

    pub fn read(dir: &Path) -> Result<Dump> {
        let index_path = dir.join(INDEX);
        let text = std::fs::read_to_string(&index_path)
            .map_err(|e| anyhow!("{}: cannot read: {e}", index_path.display()))?;
        let index: DumpIndex = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: not a parity dump: {e}", index_path.display()))?;
        if index.format != FORMAT {
            bail!(
                "{}: format `{}` (this nuwa reads `{FORMAT}`)",
                index_path.display(),
                index.format
            );
        }
        let tensors_path = dir.join(TENSORS);
        let bytes = std::fs::read(&tensors_path)
            .map_err(|e| anyhow!("{}: cannot read: {e}", tensors_path.display()))?;
        let mut tensors = from_safetensors(&bytes, &tensors_path.display().to_string())?;
        let mut entries = Vec::with_capacity(index.entries.len());
        for EntryName { kind, name } in index.entries {
            let key = format!("{}/{name}", kind.as_str());
            let t = tensors.remove(&key).ok_or_else(|| {
                anyhow!(
                    "{}: lists `{key}`, which {} does not hold",
                    index_path.display(),
                    tensors_path.display()
                )
            })?;
            entries.push(Entry {
                kind,
                name,
                shape: t.shape,
                values: t.data,
            });
        }
        Ok(Dump {
            source: index.source,
            step: index.step,
            loss: index.loss,
            batch: index.batch,
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_reads_back_as_written_and_a_broken_one_is_named() {
        let dir = std::env::temp_dir().join(format!("nuwa-dump-{}", std::process::id()));
        let dump = Dump {
            source: "cpu".into(),
            step: 1,
            loss: 4.25,
            batch: Some(DumpBatch {
                batch_size: 1,
                seq_len: 2,
                inputs: vec![5, 6],
                targets: vec![6, 7],
            }),
            entries: vec![
                Entry {
                    kind: Kind::Forward,
                    name: "layers.0.attention".into(),
                    shape: vec![1, 2],
                    values: vec![0.5, -1.5],
                },
                Entry {
                    kind: Kind::Gradient,
                    name: "norm.weight".into(),
                    shape: vec![2],
                    values: vec![3.0, 4.0],
                },
            ],
        };
        dump.write(&dir).unwrap();
        let back = Dump::read(&dir).unwrap();
        assert_eq!(back.source, "cpu");
        assert_eq!(back.loss, 4.25);
        assert_eq!(back.batch, dump.batch);
        assert_eq!(back.entries.len(), 2);
        assert_eq!(back.entries[0].name, "layers.0.attention");
        assert_eq!(back.entries[0].values, [0.5, -1.5]);
        assert_eq!(back.entries[1].kind, Kind::Gradient);

        std::fs::write(dir.join(TENSORS), b"garbage").unwrap();
        let err = Dump::read(&dir).unwrap_err().to_string();
        assert!(err.contains(TENSORS), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        let err = Dump::read(&dir).unwrap_err().to_string();
        assert!(
            err.contains("dump.json") && err.contains("cannot read"),
            "{err}"
        );
    }
}
