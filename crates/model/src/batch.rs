//! Decoding many sequences at once, each at its own position: the batch a serving engine runs
//! one step at a time. Sequences are admitted against a paged key/value pool
//! ([`crate::paged`]), and each step is one forward pass over a chunk of every sequence that
//! has work — one token of a decoding sequence, a piece of a prompt being prefilled — packed
//! into one row, so a long prompt shares steps with the decoding ones instead of stalling them.

use crate::model::{LanguageModel, Logits};
use crate::paged::{BlockPool, PackedStep, PoolShape, PrefixStats, SeqBlocks};
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::collections::HashMap;

pub type SeqId = u64;

/// One sequence's share of a step: tokens that continue it, and whether the logits after its
/// last one are wanted (a decoding sequence, or the chunk that completes a prompt).
pub struct Chunk<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
    pub logits: bool,
}

/// Pool occupancy and prefix-cache counters, for metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvUsage {
    /// Blocks in the pool, and in use by some sequence.
    pub blocks: usize,
    pub used: usize,
    pub block_size: usize,
    pub prefix: PrefixStats,
}

pub struct PagedBatch {
    pool: BlockPool,
    seqs: HashMap<SeqId, SeqBlocks>,
    next_id: SeqId,
    device: Device,
    /// The most positions a sequence may hold: the model's context.
    pub capacity: usize,
}

/// Positions per block.
pub const BLOCK_SIZE: usize = 16;

impl PagedBatch {
    /// A pool of as many blocks as `memory_bytes` holds (at least one).
    pub fn new(model: &LanguageModel, device: &Device, memory_bytes: usize) -> Self {
        let shape = Self::shape(model);
        let blocks = (memory_bytes / shape.bytes_per_block()).max(1);
        Self {
            pool: BlockPool::new(shape, blocks),
            seqs: HashMap::new(),
            next_id: 0,
            device: device.clone(),
            capacity: model.max_positions,
        }
    }

    pub fn shape(model: &LanguageModel) -> PoolShape {
        let (kv_heads, head_dim) = model.layers.first().map_or((1, model.head_dim), |l| {
            (l.attention.num_kv_heads, l.attention.head_dim)
        });
        PoolShape {
            layers: model.num_layers(),
            kv_heads,
            head_dim,
            block_size: BLOCK_SIZE,
        }
    }

    /// Blocks `copies` sequences of `positions` positions take (at most: before any prefix is
    /// shared).
    pub fn blocks_for(&self, positions: usize, copies: usize) -> usize {
        self.pool.shape.blocks_for(positions) * copies
    }

    /// Blocks neither in use nor promised.
    pub fn available_blocks(&self) -> usize {
        self.pool.available()
    }

    /// Admits a sequence for `prompt` that may grow to `max_positions`: its id and how many of
    /// the prompt's positions are already computed (a cached prefix). `None` while the blocks
    /// it needs are not free.
    pub fn admit(&mut self, prompt: &[u32], max_positions: usize) -> Option<(SeqId, usize)> {
        let seq = self.pool.admit(prompt, max_positions)?;
        let cached = seq.len;
        Some((self.insert(seq), cached))
    }

    /// A copy of `seq` sharing its blocks (another choice of the same prompt).
    pub fn fork(&mut self, seq: SeqId, max_positions: usize) -> Option<SeqId> {
        let copy = self.pool.fork(self.seqs.get(&seq)?, max_positions)?;
        Some(self.insert(copy))
    }

    fn insert(&mut self, seq: SeqBlocks) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, seq);
        id
    }

    /// Positions `seq` holds.
    pub fn len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.len)
    }

    pub fn release(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.pool.release(s);
        }
    }

    pub fn usage(&self) -> KvUsage {
        KvUsage {
            blocks: self.pool.num_blocks(),
            used: self.pool.used_blocks(),
            block_size: self.pool.shape.block_size,
            prefix: self.pool.stats,
        }
    }

    /// One forward pass over `chunks` (each sequence at most once, each admitted with room for
    /// them); returns the logits of the chunks that asked for them, in order.
    pub fn run(&mut self, model: &LanguageModel, chunks: &[Chunk]) -> Vec<Vec<f32>> {
        // A chunk of a sequence not (or no longer) admitted is dropped whole, tokens and all.
        let chunks: Vec<&Chunk> = chunks
            .iter()
            .filter(|c| self.seqs.contains_key(&c.seq))
            .collect();
        let mut at = Vec::new();
        let mut ids = Vec::new();
        for c in &chunks {
            if let Some(seq) = self.seqs.get_mut(&c.seq) {
                let len = seq.len + c.tokens.len();
                self.pool.grow(seq, len);
            }
            ids.extend_from_slice(c.tokens);
            if c.logits {
                at.push(ids.len() - 1);
            }
        }
        if ids.is_empty() {
            return Vec::new();
        }
        let placed: Vec<(&SeqBlocks, usize)> = chunks
            .iter()
            .filter_map(|c| Some((self.seqs.get(&c.seq)?, c.tokens.len())))
            .collect();
        let mut step = PackedStep::new(&mut self.pool, &placed, &self.device);
        let tokens = token_rows(&ids, 1, &self.device);
        // A step of prompt chunks only still projects one (discarded) row: the head of none
        // is not a shape every backend takes.
        let wanted = at.len();
        let at = if at.is_empty() {
            vec![ids.len() - 1]
        } else {
            at
        };
        let logits = model
            .forward_with(tokens, Some(&mut step), Logits::At(at))
            .logits;
        for c in &chunks {
            if let Some(seq) = self.seqs.get_mut(&c.seq) {
                self.pool.commit(seq, c.tokens);
            }
        }
        let mut rows = host_rows(logits);
        rows.truncate(wanted);
        rows
    }
}

/// The rows of a `[1, n, vocab]` logits tensor, on the host.
fn host_rows(logits: Tensor<3>) -> Vec<Vec<f32>> {
    let [_, _, v] = logits.dims();
    let flat = host_f32(logits);
    flat.chunks(v.max(1)).map(<[f32]>::to_vec).collect()
}

/// A tensor's values on the host as f32: the buffer itself when it is f32 (a copy of one
/// allocation), else converted element by element.
pub fn host_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    if t.dtype() != burn::tensor::DType::F32 {
        return t.into_data().iter::<f32>().collect();
    }
    t.into_data().try_into_vec::<f32>().unwrap_or_default()
}

/// `ids` as an `[rows, ids / rows]` token tensor.
pub fn token_rows(ids: &[u32], rows: usize, device: &Device) -> Tensor<2, Int> {
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let len = ids.len() / rows.max(1);
    Tensor::from_data(TensorData::new(data, [rows, len]), device)
}
