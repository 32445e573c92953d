//! Token shards on disk: `train.bin` / `val.bin` (little-endian u16 or u32 ids) and a
//! `manifest.json` with the vocabulary size, dtype, token counts and SHA-256 of each shard.
//! Training memory-maps the shards and checks them before the first step.

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use nuwa_core::sha256_hex;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT: &str = "nuwa-tokens-v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            Self::U16
        } else {
            Self::U32
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            Self::U16 => 2,
            Self::U32 => 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub tokens: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub vocab_size: usize,
    pub dtype: TokenDtype,
    /// Human-readable description of the tokenizer (`byte`, `char`, `bpe:N`, a file).
    pub tokenizer: String,
    pub train: ShardInfo,
    pub val: ShardInfo,
    /// Where the text came from.
    pub sources: Vec<String>,
}

/// Encodes token ids in the shard dtype.
pub fn encode_tokens(ids: &[u32], dtype: TokenDtype) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.len() * dtype.bytes());
    for &id in ids {
        match dtype {
            TokenDtype::U16 => out.extend_from_slice(&(id as u16).to_le_bytes()),
            TokenDtype::U32 => out.extend_from_slice(&id.to_le_bytes()),
        }
    }
    out
}

/// Writes one shard atomically and returns its manifest entry.
pub fn write_shard(dir: &Path, name: &str, ids: &[u32], dtype: TokenDtype) -> Result<ShardInfo> {
    let bytes = encode_tokens(ids, dtype);
    nuwa_core::atomic_write(&dir.join(name), &bytes)?;
    Ok(ShardInfo {
        file: name.to_string(),
        tokens: ids.len() as u64,
        sha256: sha256_hex(&bytes),
    })
}

/// A memory-mapped, verified token shard.
#[derive(Debug)]
pub struct TokenShard {
    path: PathBuf,
    map: Mmap,
    dtype: TokenDtype,
    len: usize,
}

impl TokenShard {
    /// Maps a shard and checks its size, checksum and that every id is below `vocab_size`.
    pub fn open(
        dir: &Path,
        info: &ShardInfo,
        dtype: TokenDtype,
        vocab_size: usize,
    ) -> Result<Self> {
        let path = dir.join(&info.file);
        let file =
            File::open(&path).with_context(|| format!("{}: cannot open shard", path.display()))?;
        // SAFETY: the shard is only read; nuwa never writes a shard in place (writes are
        // temp-file-and-rename), so the mapping cannot change under us.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot memory-map shard", path.display()))?;
        let expected = info.tokens as usize * dtype.bytes();
        if map.len() != expected {
            bail!(
                "{}: shard is {} bytes but the manifest says {} tokens ({} bytes): truncated or wrong file",
                path.display(),
                map.len(),
                info.tokens,
                expected
            );
        }
        let actual = sha256_hex(&map);
        if actual != info.sha256 {
            bail!(
                "{}: checksum mismatch (manifest {}, file {}): the shard is corrupted",
                path.display(),
                info.sha256,
                actual
            );
        }
        let shard = Self {
            path,
            map,
            dtype,
            len: info.tokens as usize,
        };
        if let Some((pos, id)) = (0..shard.len)
            .map(|i| (i, shard.get(i)))
            .find(|&(_, id)| id as usize >= vocab_size)
        {
            bail!(
                "{}: token id {id} at position {pos} is out of range for vocab_size {vocab_size}",
                shard.path.display()
            );
        }
        Ok(shard)
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, i: usize) -> u32 {
        match self.dtype {
            TokenDtype::U16 => u16::from_le_bytes([self.map[2 * i], self.map[2 * i + 1]]) as u32,
            TokenDtype::U32 => {
                let b = &self.map[4 * i..4 * i + 4];
                u32::from_le_bytes([b[0], b[1], b[2], b[3]])
            }
        }
    }

    /// Copies `len` ids starting at `start`.
    pub fn window(&self, start: usize, len: usize) -> Vec<u32> {
        (start..start + len).map(|i| self.get(i)).collect()
    }
}

/// A prepared dataset: its manifest and both shards, verified.
#[derive(Debug)]
pub struct Dataset {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub train: TokenShard,
    pub val: TokenShard,
}

impl Dataset {
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path).with_context(|| {
            format!(
                "{}: cannot read manifest (run `nuwa data prepare` first)",
                manifest_path.display()
            )
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: garbled manifest: {e}", manifest_path.display()))?;
        if manifest.format != FORMAT {
            bail!(
                "{}: unknown format {:?} (expected {FORMAT})",
                manifest_path.display(),
                manifest.format
            );
        }
        if manifest.dtype != TokenDtype::for_vocab(manifest.vocab_size)
            && manifest.dtype == TokenDtype::U16
        {
            bail!(
                "{}: dtype u16 cannot hold vocab_size {}",
                manifest_path.display(),
                manifest.vocab_size
            );
        }
        let train = TokenShard::open(dir, &manifest.train, manifest.dtype, manifest.vocab_size)?;
        let val = TokenShard::open(dir, &manifest.val, manifest.dtype, manifest.vocab_size)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            train,
            val,
        })
    }
}
