//! Decoding many sequences at once, each at its own position: the batch a serving engine runs
//! one step at a time, with sequences joining (after a prefill of their own) and leaving
//! between steps. Every row keeps its keys and values in a cache padded to a shared length, so
//! rows of any length share one batched forward pass. That length follows the longest row
//! (grown in blocks of `GROW` positions, up to the model's context) rather than being the whole
//! context from the start: each step's cache update and attention cost what the rows use.

use crate::layers::{rope_row, RowState};
use crate::model::{Ffn, LanguageModel};
use crate::KvCache;
use burn::tensor::{Device, Int, Tensor, TensorData};

/// Masked-out attention score: large enough to vanish in the softmax, finite so nothing NaNs.
const MASKED: f32 = -1e30;

/// The caches grow by this many positions at a time (fewer re-allocations than one by one).
const GROW: usize = 64;

pub struct DecodeBatch {
    /// Per layer: keys and values of every row, `[rows, kv_heads, allocated, head_dim]`.
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    /// Positions filled in each row.
    pub lengths: Vec<usize>,
    /// The most positions a row may hold: the model's context.
    pub capacity: usize,
    /// Positions every row's cache holds now (filled or padding), at most `capacity`.
    allocated: usize,
    device: Device,
}

fn last_row(logits: Tensor<3>) -> Vec<Vec<f32>> {
    let [b, t, v] = logits.dims();
    let flat: Vec<f32> = logits
        .narrow(1, t - 1, 1)
        .reshape([b * v])
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default();
    flat.chunks(v).map(<[f32]>::to_vec).collect()
}

impl DecodeBatch {
    pub fn new(model: &LanguageModel, device: &Device) -> Self {
        Self {
            layers: vec![None; model.num_layers()],
            lengths: Vec::new(),
            capacity: model.max_positions,
            allocated: 0,
            device: device.clone(),
        }
    }

    /// Grows every row's cache (with zero padding) so that it holds at least `needed`
    /// positions.
    fn reserve(&mut self, needed: usize) {
        if needed <= self.allocated {
            return;
        }
        let grown = needed.div_ceil(GROW) * GROW;
        let target = grown.min(self.capacity).max(needed);
        let extra = target - self.allocated;
        for slot in &mut self.layers {
            if let Some((k, v)) = slot.take() {
                let pad = |x: Tensor<4>| {
                    let [b, kvh, _, d] = x.dims();
                    let zeros = Tensor::zeros([b, kvh, extra, d], &self.device);
                    Tensor::cat(vec![x, zeros], 2)
                };
                *slot = Some((pad(k), pad(v)));
            }
        }
        self.allocated = target;
    }

    pub fn rows(&self) -> usize {
        self.lengths.len()
    }

    /// Runs `prompt` alone and adds it as the last row; returns its next-token logits.
    /// The prompt must be shorter than the capacity.
    pub fn join(&mut self, model: &LanguageModel, prompt: &[u32]) -> Vec<f32> {
        let t = prompt.len();
        let ids: Vec<i64> = prompt.iter().map(|&x| x as i64).collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, t]), &self.device);
        let mut cache = KvCache::new(model.num_layers());
        let logits = model.forward(tokens, Some(&mut cache)).logits;
        self.reserve(t + 1);
        let allocated = self.allocated;
        for (slot, layer) in self.layers.iter_mut().zip(cache.layers) {
            let Some((k, v)) = layer.kv else { continue };
            let [_, kvh, _, d] = k.dims();
            let pad = |x: Tensor<4>| {
                if allocated == t {
                    return x;
                }
                let zeros = Tensor::zeros([1, kvh, allocated - t, d], &self.device);
                Tensor::cat(vec![x, zeros], 2)
            };
            let (k, v) = (pad(k), pad(v));
            *slot = Some(match slot.take() {
                Some((ks, vs)) => (Tensor::cat(vec![ks, k], 0), Tensor::cat(vec![vs, v], 0)),
                None => (k, v),
            });
        }
        self.lengths.push(t);
        last_row(logits).pop().unwrap_or_default()
    }

    /// Keeps the rows where `keep` is true, in order.
    pub fn retain(&mut self, keep: &[bool]) {
        let idx: Vec<i64> = (0..self.rows())
            .filter(|&r| keep.get(r).copied().unwrap_or(false))
            .map(|r| r as i64)
            .collect();
        if idx.len() == self.rows() {
            return;
        }
        self.lengths = idx.iter().map(|&r| self.lengths[r as usize]).collect();
        if idx.is_empty() {
            self.layers.iter_mut().for_each(|l| *l = None);
            self.allocated = 0;
            return;
        }
        let n = idx.len();
        let index = Tensor::<1, Int>::from_data(TensorData::new(idx, [n]), &self.device);
        for slot in &mut self.layers {
            if let Some((k, v)) = slot.take() {
                *slot = Some((k.select(0, index.clone()), v.select(0, index.clone())));
            }
        }
    }

    /// Feeds one token per row; returns each row's next-token logits. Every row must have
    /// room (`lengths[r] < capacity`).
    pub fn step(&mut self, model: &LanguageModel, tokens: &[u32]) -> Vec<Vec<f32>> {
        let b = self.rows();
        let longest = self.lengths.iter().copied().max().unwrap_or(0);
        self.reserve(longest + 1);
        let (cap, d) = (self.allocated, model.head_dim);
        let ids: Vec<i64> = tokens.iter().map(|&x| x as i64).collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, 1]), &self.device);
        let rows = self.row_state(model, b, cap, d);
        let mut x = model.word_embeddings.forward(tokens);
        for (layer, slot) in model.layers.iter().zip(self.layers.iter_mut()) {
            let Some((k, v)) = slot.take() else { continue };
            let h = layer.input_layernorm.forward(x.clone());
            let (attn, k, v) = layer.attention.decode_rows(h, &rows, k, v);
            *slot = Some((k, v));
            x = x + attn;
            let normed = layer.post_attention_layernorm.forward(x.clone());
            let ffn = match &layer.mlp {
                Ffn::Dense(mlp) => mlp.forward(normed),
                Ffn::Moe(moe) => moe.forward(normed).0,
            };
            x = x + ffn;
        }
        let logits = model.head(model.norm.forward(x));
        self.lengths.iter_mut().for_each(|l| *l += 1);
        last_row(logits)
    }

    fn row_state(&self, model: &LanguageModel, b: usize, cap: usize, d: usize) -> RowState {
        let (mut cos, mut sin) = (Vec::with_capacity(b * d), Vec::with_capacity(b * d));
        let (mut write, mut mask) = (vec![0f32; b * cap], vec![MASKED; b * cap]);
        for (r, &pos) in self.lengths.iter().enumerate() {
            let (c, s) = rope_row(model.rope_theta, d, pos);
            cos.extend(c);
            sin.extend(s);
            write[r * cap + pos] = 1.0;
            mask[r * cap..r * cap + pos + 1].fill(0.0);
        }
        let t = |v: Vec<f32>, shape: [usize; 4]| {
            Tensor::<4>::from_data(TensorData::new(v, shape), &self.device)
        };
        RowState {
            cos: t(cos, [b, 1, 1, d]),
            sin: t(sin, [b, 1, 1, d]),
            write: t(write, [b, 1, cap, 1]),
            mask: t(mask, [b, 1, 1, cap]),
        }
    }
}
