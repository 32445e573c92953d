//! nuwa's data pipeline: tokenizers, the built-in corpus, token shards with a checked
//! manifest, and a deterministic sampler whose cursor lives in the checkpoint.

pub mod corpus;
pub mod prepare;
pub mod sampler;
pub mod shards;
pub mod tokenizer;

pub use prepare::{prepare, PrepareOptions, Source};
pub use sampler::{eval_batches, Batch, BatchSampler};
pub use shards::{Dataset, Manifest, TokenShard};
pub use tokenizer::{TextStream, Tokenizer, TokenizerSpec};

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Writes a file atomically: a temporary file beside it, fsync, rename, fsync the folder.
/// A crash leaves either the old file or the new one, never a torn one.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("{}: write failed", path.display()))
}
