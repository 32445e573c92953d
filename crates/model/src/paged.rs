//! A paged key/value cache: what a serving engine decodes many sequences from.
//!
//! Keys and values live in a pool of fixed-size blocks (`block_size` positions of every layer
//! and key/value head); each sequence holds a block table, so a sequence takes the blocks its
//! length needs and nothing is padded to the longest row. A block holding a full run of
//! prompt tokens is remembered by a hash of every token up to its end: a later prompt with the
//! same prefix (a shared system prompt) takes those blocks instead of computing them again.
//! Blocks are reference-counted; a freed block stays findable by its hash until it is reused,
//! least recently freed first.
//!
//! One forward pass runs a [`PackedStep`]: the new tokens of many sequences (one per decoding
//! sequence, a chunk of prompt for a prefilling one) packed into a single row, each token at
//! its own position, attending to its own sequence's blocks. The pool is host memory; the
//! attention over it is a Rust kernel ([`paged_attention`]), and the reference path gathers
//! each sequence's blocks into a tensor for Burn's attention.

use crate::batch::host_f32;
use crate::cache::{KvStore, Positions};
use crate::kernels::attention::causal_attention_reference;
use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;
use std::collections::{HashMap, VecDeque};

pub type BlockId = u32;

/// What one block holds: `block_size` positions of every layer's keys and values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

impl PoolShape {
    /// Bytes of keys and values (f32) one block holds across the layers.
    pub fn bytes_per_block(&self) -> usize {
        self.layers * 2 * self.kv_heads * self.block_size * self.head_dim * 4
    }
    /// Blocks a sequence of `positions` positions takes.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }
    /// Floats one layer's keys (or values) of one block take.
    fn block_floats(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }
}

/// Prefix-cache counters: blocks looked up when prompts were admitted, and found.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PrefixStats {
    pub lookups: u64,
    pub hits: u64,
}

/// The blocks and the bookkeeping of one pool.
pub struct BlockPool {
    pub shape: PoolShape,
    num_blocks: usize,
    /// Per layer: `[block, kv_head, position in block, head_dim]` keys and values.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    refs: Vec<u32>,
    /// Blocks without an owner, least recently freed first. May hold stale entries (a block
    /// revived by a prefix hit, or listed twice): taking one checks it is still unowned.
    free: VecDeque<BlockId>,
    free_count: usize,
    /// Blocks promised to admitted sequences (their prompt and `max_tokens`) and not yet taken:
    /// a sequence admitted never runs out.
    reserved: usize,
    /// Full blocks by the hash of every token up to their end.
    cached: HashMap<u64, BlockId>,
    hash_of: Vec<Option<u64>>,
    pub stats: PrefixStats,
}

/// One sequence's place in the pool.
#[derive(Debug, Clone, Default)]
pub struct SeqBlocks {
    pub blocks: Vec<BlockId>,
    /// Positions filled.
    pub len: usize,
    /// Blocks still promised to it.
    reserved: usize,
    /// Hash of its tokens up to the end of its last full block, and the tokens since.
    hash: u64,
    pending: Vec<u32>,
}

/// The hash of a prefix extended by one block of tokens (FNV-1a over the previous hash and
/// the ids: a block's identity is everything before it, not only its own tokens).
fn chain(prev: u64, tokens: &[u32]) -> u64 {
    let mut h = prev ^ 0xcbf2_9ce4_8422_2325;
    for b in tokens.iter().flat_map(|t| t.to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `n` zeros, every page written.
fn touched(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, 0.0);
    v
}

impl BlockPool {
    pub fn new(shape: PoolShape, num_blocks: usize) -> Self {
        let floats = num_blocks * shape.block_floats();
        Self {
            shape,
            num_blocks,
            // Written through at the start, so the memory is the server's from the first
            // request on (a lazily mapped pool would fault and clear pages inside decode steps
            // until every block had been used once).
            keys: (0..shape.layers).map(|_| touched(floats)).collect(),
            values: (0..shape.layers).map(|_| touched(floats)).collect(),
            refs: vec![0; num_blocks],
            free: (0..num_blocks as BlockId).collect(),
            free_count: num_blocks,
            reserved: 0,
            cached: HashMap::new(),
            hash_of: vec![None; num_blocks],
            stats: PrefixStats::default(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    /// Blocks owned by some sequence.
    pub fn used_blocks(&self) -> usize {
        self.num_blocks - self.free_count
    }
    /// Blocks neither owned nor promised.
    pub fn available(&self) -> usize {
        self.free_count - self.reserved
    }

    /// Admits a sequence that will hold `prompt` and grow to `max_positions` positions: takes
    /// the cached blocks of the prompt's longest cached prefix (never its last token, whose
    /// logits the caller needs) and promises the rest. `None` when the blocks are not free now.
    pub fn admit(&mut self, prompt: &[u32], max_positions: usize) -> Option<SeqBlocks> {
        let bs = self.shape.block_size;
        let mut hits = Vec::new();
        let mut hash = 0u64;
        let full = prompt.len().saturating_sub(1) / bs;
        for block in prompt[..full * bs].chunks(bs) {
            let h = chain(hash, block);
            match self.cached.get(&h) {
                Some(&id) => {
                    hits.push(id);
                    hash = h;
                }
                None => break,
            }
        }
        let reviving = hits
            .iter()
            .filter(|&&id| self.refs[id as usize] == 0)
            .count();
        let needed = self
            .shape
            .blocks_for(max_positions)
            .saturating_sub(hits.len());
        if needed + reviving > self.available() {
            return None;
        }
        self.stats.lookups += full as u64;
        self.stats.hits += hits.len() as u64;
        for &id in &hits {
            self.own(id);
        }
        self.reserved += needed;
        Some(SeqBlocks {
            len: hits.len() * bs,
            blocks: hits,
            reserved: needed,
            hash,
            pending: Vec::new(),
        })
    }

    /// Another sequence continuing `seq`'s positions (a second choice of one prompt, `n > 1`):
    /// full blocks shared, the partial last block copied; room promised up to `max_positions`.
    pub fn fork(&mut self, seq: &SeqBlocks, max_positions: usize) -> Option<SeqBlocks> {
        let bs = self.shape.block_size;
        let shared = seq.len / bs;
        let needed = self.shape.blocks_for(max_positions).saturating_sub(shared);
        if needed > self.available() {
            return None;
        }
        self.reserved += needed;
        let mut copy = SeqBlocks {
            blocks: seq.blocks[..shared].to_vec(),
            len: seq.len,
            reserved: needed,
            hash: seq.hash,
            pending: seq.pending.clone(),
        };
        for &id in &copy.blocks {
            self.own(id);
        }
        if !seq.len.is_multiple_of(bs) {
            let from = seq.blocks[shared] as usize;
            let to = self.take(&mut copy) as usize;
            let n = self.shape.block_floats();
            for layer in 0..self.shape.layers {
                self.keys[layer].copy_within(from * n..(from + 1) * n, to * n);
                self.values[layer].copy_within(from * n..(from + 1) * n, to * n);
            }
        }
        Some(copy)
    }

    /// Gives back a sequence's blocks (cached ones stay findable until reused) and what it was
    /// promised.
    pub fn release(&mut self, seq: SeqBlocks) {
        self.reserved -= seq.reserved;
        for id in seq.blocks {
            let r = &mut self.refs[id as usize];
            *r -= 1;
            if *r == 0 {
                self.free.push_back(id);
                self.free_count += 1;
            }
        }
    }

    /// Makes room in `seq` for `len` positions, taking promised blocks.
    pub fn grow(&mut self, seq: &mut SeqBlocks, len: usize) {
        while seq.blocks.len() * self.shape.block_size < len {
            self.take(seq);
        }
    }

    /// Records that `tokens` now fill `seq`'s next positions; a block they complete becomes
    /// findable by its prefix.
    pub fn commit(&mut self, seq: &mut SeqBlocks, tokens: &[u32]) {
        let bs = self.shape.block_size;
        for &t in tokens {
            seq.pending.push(t);
            seq.len += 1;
            if seq.pending.len() == bs {
                seq.hash = chain(seq.hash, &seq.pending);
                seq.pending.clear();
                let id = seq.blocks[seq.len / bs - 1];
                if self.hash_of[id as usize].is_none() && !self.cached.contains_key(&seq.hash) {
                    self.cached.insert(seq.hash, id);
                    self.hash_of[id as usize] = Some(seq.hash);
                }
            }
        }
    }

    fn own(&mut self, id: BlockId) {
        let r = &mut self.refs[id as usize];
        if *r == 0 {
            self.free_count -= 1;
        }
        *r += 1;
    }

    /// Takes one free block for `seq` out of its promise (forgetting the block's old prefix).
    fn take(&mut self, seq: &mut SeqBlocks) -> BlockId {
        // Admission promised every block a sequence grows into, so a free one exists.
        let id = loop {
            match self.free.pop_front() {
                Some(id) if self.refs[id as usize] == 0 => break id,
                Some(_) => continue,
                None => unreachable!("a block was promised but none is free"),
            }
        };
        if let Some(h) = self.hash_of[id as usize].take() {
            self.cached.remove(&h);
        }
        self.own(id);
        if seq.reserved > 0 {
            seq.reserved -= 1;
            self.reserved -= 1;
        }
        seq.blocks.push(id);
        id
    }

    /// Offset of `(block, kv head, position in block)` in a layer's keys or values.
    fn slot(&self, block: BlockId, head: usize, offset: usize) -> usize {
        let s = &self.shape;
        ((block as usize * s.kv_heads + head) * s.block_size + offset) * s.head_dim
    }
}

/// One token's place in a packed step.
#[derive(Debug, Clone)]
struct TokenPlace {
    /// Index into the step's block tables.
    seq: usize,
    position: usize,
}

/// A forward pass over chunks of many sequences packed into one row: the [`KvStore`] the
/// model writes each layer's keys and values through and attends with.
pub struct PackedStep<'a> {
    pool: &'a mut BlockPool,
    tables: Vec<Vec<BlockId>>,
    tokens: Vec<TokenPlace>,
    device: Device,
}

impl<'a> PackedStep<'a> {
    /// `chunks`: per sequence, its block table (room already made) and the position of its
    /// first new token and how many there are, in the order the tokens are packed.
    pub fn new(pool: &'a mut BlockPool, chunks: &[(&SeqBlocks, usize)], device: &Device) -> Self {
        let mut tokens = Vec::new();
        for (i, (seq, n)) in chunks.iter().enumerate() {
            tokens.extend((seq.len..seq.len + n).map(|position| TokenPlace { seq: i, position }));
        }
        Self {
            pool,
            tables: chunks.iter().map(|(s, _)| s.blocks.clone()).collect(),
            tokens,
            device: device.clone(),
        }
    }

    fn write(&mut self, layer: usize, keys: &[f32], values: &[f32]) {
        let (t, d) = (self.tokens.len(), self.pool.shape.head_dim);
        let bs = self.pool.shape.block_size;
        for (i, place) in self.tokens.iter().enumerate() {
            let block = self.tables[place.seq][place.position / bs];
            for head in 0..self.pool.shape.kv_heads {
                let to = self.pool.slot(block, head, place.position % bs);
                let from = (head * t + i) * d;
                self.pool.keys[layer][to..to + d].copy_from_slice(&keys[from..from + d]);
                self.pool.values[layer][to..to + d].copy_from_slice(&values[from..from + d]);
            }
        }
    }

    /// The reference path: each sequence's keys and values gathered from its blocks into
    /// `[1, kv_heads, positions, head_dim]` and Burn's causal attention over its chunk.
    fn attend_reference(&self, layer: usize, q: Tensor<4>) -> Tensor<4> {
        let s = self.pool.shape;
        let mut outs = Vec::new();
        let mut start = 0;
        while start < self.tokens.len() {
            let seq = self.tokens[start].seq;
            let n = self.tokens[start..]
                .iter()
                .take_while(|p| p.seq == seq)
                .count();
            let positions = self.tokens[start + n - 1].position + 1;
            let gather = |pool: &Vec<f32>| {
                let mut out = vec![0f32; s.kv_heads * positions * s.head_dim];
                for head in 0..s.kv_heads {
                    for p in 0..positions {
                        let block = self.tables[seq][p / s.block_size];
                        let from = self.pool.slot(block, head, p % s.block_size);
                        let to = (head * positions + p) * s.head_dim;
                        out[to..to + s.head_dim].copy_from_slice(&pool[from..from + s.head_dim]);
                    }
                }
                Tensor::<4>::from_data(
                    TensorData::new(out, [1, s.kv_heads, positions, s.head_dim]),
                    &self.device,
                )
            };
            let (k, v) = (
                gather(&self.pool.keys[layer]),
                gather(&self.pool.values[layer]),
            );
            outs.push(causal_attention_reference(
                q.clone().narrow(2, start, n),
                k,
                v,
            ));
            start += n;
        }
        Tensor::cat(outs, 2)
    }
}

impl KvStore for PackedStep<'_> {
    fn positions(&self, _len: usize) -> Positions {
        Positions::Tokens(self.tokens.iter().map(|p| p.position).collect())
    }

    fn attend(
        &mut self,
        layer: usize,
        q: Tensor<4>,
        keys: Tensor<4>,
        values: Tensor<4>,
    ) -> Tensor<4> {
        self.write(layer, &host_f32(keys), &host_f32(values));
        if !crate::kernels::has_kernel(&q.device()) {
            return self.attend_reference(layer, q);
        }
        let [_, h, t, d] = q.dims();
        let out = paged_attention(
            &host_f32(q),
            h,
            &self.tokens,
            &self.tables,
            self.pool,
            layer,
        );
        Tensor::from_data(TensorData::new(out, [1, h, t, d]), &self.device)
    }

    fn advance(&mut self, _len: usize) {
        // The engine commits each sequence's tokens after the pass (`BlockPool::commit`).
    }
}

/// Attention of packed queries `[heads, tokens, head_dim]` over their sequences' blocks: token
/// at position `p` sees its sequence's positions `0..=p`, scaled by `1/√head_dim`, query head
/// `i` reading key/value head `i / (heads / kv_heads)`. One task per (head, token).
fn paged_attention(
    q: &[f32],
    heads: usize,
    tokens: &[TokenPlace],
    tables: &[Vec<BlockId>],
    pool: &BlockPool,
    layer: usize,
) -> Vec<f32> {
    let s = pool.shape;
    let (d, t) = (s.head_dim, tokens.len());
    let groups = heads / s.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let (keys, values) = (&pool.keys[layer], &pool.values[layer]);
    let mut out = vec![0f32; heads * t * d];
    // Each task runs under the CPU's widest SIMD (the loops vectorise to it).
    let arch = pulp::Arch::new();
    out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
        let (head, token) = (i / t, i % t);
        let place = &tokens[token];
        arch.dispatch(OneQuery {
            query: &q[i * d..(i + 1) * d],
            blocks: &tables[place.seq],
            seen: place.position + 1,
            kv_head: head / groups,
            scale,
            pool,
            keys,
            values,
            out: o,
        });
    });
    out
}

/// One query's attention over its sequence's first `seen` positions.
struct OneQuery<'a> {
    query: &'a [f32],
    blocks: &'a [BlockId],
    seen: usize,
    kv_head: usize,
    scale: f32,
    pool: &'a BlockPool,
    keys: &'a [f32],
    values: &'a [f32],
    out: &'a mut [f32],
}

impl pulp::WithSimd for OneQuery<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let (d, bs, seen) = (self.query.len(), self.pool.shape.block_size, self.seen);
        // Block by block: a block's positions of one head are contiguous `[block_size, d]`.
        let pool = self.pool;
        let kv_head = self.kv_head;
        let blocks = || {
            self.blocks[..seen.div_ceil(bs)]
                .iter()
                .enumerate()
                .map(move |(i, &b)| (pool.slot(b, kv_head, 0), bs.min(seen - i * bs)))
        };
        let mut scores = Vec::with_capacity(seen);
        for (at, n) in blocks() {
            for key in self.keys[at..at + n * d].chunks_exact(d) {
                scores.push(dot(self.query, key) * self.scale);
            }
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0;
        for x in scores.iter_mut() {
            *x = crate::kernels::exp(*x - max);
        }
        for x in &scores {
            total += x;
        }
        let inv = 1.0 / total;
        let mut weights = scores.iter();
        for (at, n) in blocks() {
            for (value, w) in self.values[at..at + n * d]
                .chunks_exact(d)
                .zip(&mut weights)
            {
                let w = w * inv;
                for (o, v) in self.out.iter_mut().zip(value) {
                    *o += w * v;
                }
            }
        }
    }
}

/// A dot product in eight independent lanes (so the compiler vectorises it).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(blocks: usize) -> BlockPool {
        BlockPool::new(
            PoolShape {
                layers: 1,
                kv_heads: 1,
                head_dim: 2,
                block_size: 4,
            },
            blocks,
        )
    }

    fn fill(pool: &mut BlockPool, seq: &mut SeqBlocks, tokens: &[u32]) {
        pool.grow(seq, seq.len + tokens.len());
        pool.commit(seq, tokens);
    }

    #[test]
    fn admission_promises_blocks_and_release_returns_them() {
        let mut p = pool(4);
        let a = p.admit(&[1, 2, 3], 8).expect("room for 2 blocks");
        assert_eq!(p.available(), 2);
        let b = p.admit(&[4], 8).expect("room for 2 more");
        assert!(p.admit(&[5], 1).is_none(), "every block is promised");
        p.release(a);
        p.release(b);
        assert_eq!((p.available(), p.used_blocks()), (4, 0));
    }

    #[test]
    fn a_shared_prefix_reuses_full_blocks_but_never_the_last_token() {
        let mut p = pool(12);
        let prompt: Vec<u32> = (1..=9).collect(); // two full blocks + 1
        let mut a = p.admit(&prompt, 12).unwrap();
        fill(&mut p, &mut a, &prompt);
        // Same 9 tokens: both full blocks are reused (the 9th token is computed again).
        let b = p.admit(&prompt, 12).unwrap();
        assert_eq!((b.len, &b.blocks[..]), (8, &a.blocks[..2]));
        // Exactly 8 tokens: only the first block (the last token must be computed).
        let c = p.admit(&prompt[..8], 12).unwrap();
        assert_eq!(c.len, 4);
        // A different first block: nothing shared, even with the same second block.
        let mut other = prompt.clone();
        other[0] = 99;
        let d = p.admit(&other, 12).unwrap();
        assert_eq!(d.len, 0);
        assert_eq!(
            p.stats,
            PrefixStats {
                lookups: 7,
                hits: 3
            }
        );
        for s in [a, b, c, d] {
            p.release(s);
        }
        // Freed cached blocks are still found until reused.
        let e = p.admit(&prompt, 12).unwrap();
        assert_eq!(e.len, 8);
    }

    #[test]
    fn a_fork_shares_full_blocks_and_copies_the_partial_one() {
        let mut p = pool(8);
        let mut a = p.admit(&[1, 2, 3, 4, 5, 6], 8).unwrap();
        fill(&mut p, &mut a, &[1, 2, 3, 4, 5, 6]);
        let k = p.slot(a.blocks[1], 0, 1);
        p.keys[0][k] = 7.0;
        let b = p.fork(&a, 8).unwrap();
        assert_eq!(b.blocks[0], a.blocks[0]);
        assert_ne!(b.blocks[1], a.blocks[1]);
        assert_eq!(p.keys[0][p.slot(b.blocks[1], 0, 1)], 7.0);
        assert_eq!(p.used_blocks(), 3);
    }
}
