//! Deterministic batch sampling. A batch is a pure function of (seed, cursor), so saving the
//! cursor in a checkpoint is enough to continue exactly where a run stopped.

use crate::shards::TokenShard;
use anyhow::{bail, Result};
use nuwa_core::rng::splitmix64;
use serde::{Deserialize, Serialize};

/// One batch: `inputs[b][t]` predicts `targets[b][t]`, flattened row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Start offset of every row in the shard: the sample ids of this batch.
    pub offsets: Vec<usize>,
}

impl Batch {
    /// Rows `start..end` of the batch (a data-parallel rank's share).
    pub fn rows(&self, start: usize, end: usize) -> Batch {
        let t = self.seq_len;
        Batch {
            inputs: self.inputs[start * t..end * t].to_vec(),
            targets: self.targets[start * t..end * t].to_vec(),
            batch_size: end - start,
            seq_len: t,
            offsets: self.offsets[start..end].to_vec(),
        }
    }
}

/// Random windows of the training shard, drawn from a counter-based hash of (seed, cursor, row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSampler {
    pub seed: u64,
    /// Batches drawn so far.
    pub cursor: u64,
}

impl BatchSampler {
    pub fn new(seed: u64) -> Self {
        Self { seed, cursor: 0 }
    }

    /// Draws the next batch and advances the cursor.
    pub fn next_batch(
        &mut self,
        shard: &TokenShard,
        batch_size: usize,
        seq_len: usize,
    ) -> Result<Batch> {
        check_fits(shard, seq_len)?;
        let span = (shard.len() - seq_len) as u64;
        let offsets = (0..batch_size)
            .map(|row| {
                let key = splitmix64(self.seed ^ splitmix64(self.cursor ^ splitmix64(row as u64)));
                (key % span) as usize
            })
            .collect();
        self.cursor += 1;
        Ok(read_batch(shard, offsets, seq_len))
    }
}

fn check_fits(shard: &TokenShard, seq_len: usize) -> Result<()> {
    if shard.len() <= seq_len + 1 {
        bail!(
            "{}: {} tokens is too few for sequences of {} (need at least {})",
            shard.path().display(),
            shard.len(),
            seq_len,
            seq_len + 2
        );
    }
    Ok(())
}

fn read_batch(shard: &TokenShard, offsets: Vec<usize>, seq_len: usize) -> Batch {
    let mut inputs = Vec::with_capacity(offsets.len() * seq_len);
    let mut targets = Vec::with_capacity(offsets.len() * seq_len);
    for &start in &offsets {
        let window = shard.window(start, seq_len + 1);
        inputs.extend_from_slice(&window[..seq_len]);
        targets.extend_from_slice(&window[1..]);
    }
    Batch {
        inputs,
        targets,
        batch_size: offsets.len(),
        seq_len,
        offsets,
    }
}

/// The fixed evaluation batches: evenly spaced windows of the validation shard, the same for
/// every run so validation losses are comparable.
pub fn eval_batches(
    shard: &TokenShard,
    batch_size: usize,
    seq_len: usize,
    num_batches: usize,
) -> Result<Vec<Batch>> {
    check_fits(shard, seq_len)?;
    let span = shard.len() - seq_len - 1;
    let total = (batch_size * num_batches).max(1);
    let stride = (span / total).max(1);
    let offsets: Vec<usize> = (0..total).map(|i| (i * stride) % (span + 1)).collect();
    Ok(offsets
        .chunks(batch_size)
        .map(|rows| read_batch(shard, rows.to_vec(), seq_len))
        .collect())
}
