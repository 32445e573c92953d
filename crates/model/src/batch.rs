//! Decoding many sequences at once, each at its own position: the batch a serving engine runs
//! one step at a time, with sequences joining (after a prefill of their own) and leaving
//! between steps. Every row keeps its keys and values in a cache padded to a shared length
//! ([`RowCaches`]), so rows of any length share one batched forward pass — the model's one
//! forward path, with this store in place of a contiguous cache. That length follows the
//! longest row (grown in blocks of `GROW` positions, up to the model's context) rather than
//! being the whole context from the start: each step's cache update and attention cost what
//! the rows use.

use crate::cache::{Attend, KvCache, KvStore, Positions};
use crate::model::{LanguageModel, Logits};
use burn::tensor::{Device, Int, Tensor, TensorData};

/// Masked-out attention score: large enough to vanish in the softmax, finite so nothing NaNs.
const MASKED: f32 = -1e30;

/// The caches grow by this many positions at a time (fewer re-allocations than one by one).
const GROW: usize = 64;

/// Per-row key/value caches padded to a shared length: a [`KvStore`] for one new token per row.
pub struct RowCaches {
    /// Per layer: keys and values of every row, `[rows, kv_heads, allocated, head_dim]`.
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    /// Positions filled in each row.
    lengths: Vec<usize>,
    /// Positions every row's cache holds now (filled or padding).
    allocated: usize,
    /// This step's one-hot write slots `[rows, 1, allocated, 1]` and mask `[rows, 1, 1, allocated]`.
    step: Option<(Tensor<4>, Tensor<4>)>,
    device: Device,
}

impl RowCaches {
    fn new(num_layers: usize, device: &Device) -> Self {
        Self {
            layers: vec![None; num_layers],
            lengths: Vec::new(),
            allocated: 0,
            step: None,
            device: device.clone(),
        }
    }

    /// Grows every row's cache (with zero padding) to `target` positions.
    fn grow_to(&mut self, target: usize) {
        if target <= self.allocated {
            return;
        }
        let extra = target - self.allocated;
        for slot in &mut self.layers {
            if let Some((k, v)) = slot.take() {
                *slot = Some((pad(k, extra, &self.device), pad(v, extra, &self.device)));
            }
        }
        self.allocated = target;
    }

    /// Builds this step's write slots and mask (once per step, shared by every layer): each
    /// row writes at its length and attends to every filled position up to it.
    fn prepare_step(&mut self) -> (Tensor<4>, Tensor<4>) {
        let (b, cap) = (self.lengths.len(), self.allocated);
        let (mut write, mut mask) = (vec![0f32; b * cap], vec![MASKED; b * cap]);
        for (r, &pos) in self.lengths.iter().enumerate() {
            write[r * cap + pos] = 1.0;
            mask[r * cap..r * cap + pos + 1].fill(0.0);
        }
        let t = |v: Vec<f32>, shape: [usize; 4]| {
            Tensor::<4>::from_data(TensorData::new(v, shape), &self.device)
        };
        let step = (t(write, [b, 1, cap, 1]), t(mask, [b, 1, 1, cap]));
        self.step = Some(step.clone());
        step
    }
}

fn pad(x: Tensor<4>, extra: usize, device: &Device) -> Tensor<4> {
    if extra == 0 {
        return x;
    }
    let [b, kvh, _, d] = x.dims();
    Tensor::cat(vec![x, Tensor::zeros([b, kvh, extra, d], device)], 2)
}

impl KvStore for RowCaches {
    fn positions(&self, _len: usize) -> Positions {
        Positions::Rows(self.lengths.clone())
    }

    fn store(&mut self, layer: usize, keys: Tensor<4>, values: Tensor<4>) -> Attend {
        let [b, kvh, _, d] = keys.dims();
        let shape = [b, kvh, self.allocated, d];
        let (write, mask) = match self.step.clone() {
            Some(step) => step,
            None => self.prepare_step(),
        };
        let write = write.expand(shape);
        let keep = write.clone().neg() + 1.0;
        let (old_k, old_v) = self.layers[layer].take().unwrap_or_else(|| {
            (
                Tensor::zeros(shape, &self.device),
                Tensor::zeros(shape, &self.device),
            )
        });
        let keys = old_k * keep.clone() + keys.expand(shape) * write.clone();
        let values = old_v * keep + values.expand(shape) * write;
        self.layers[layer] = Some((keys.clone(), values.clone()));
        Attend {
            keys,
            values,
            mask: Some(mask),
        }
    }

    fn advance(&mut self, _len: usize) {
        self.lengths.iter_mut().for_each(|l| *l += 1);
        self.step = None;
    }
}

pub struct DecodeBatch {
    cache: RowCaches,
    /// The most positions a row may hold: the model's context.
    pub capacity: usize,
}

/// Each row's logits of a `[rows, 1, vocab]` tensor, on the host.
fn host_rows(logits: Tensor<3>) -> Vec<Vec<f32>> {
    let [_, _, v] = logits.dims();
    let flat: Vec<f32> = logits.into_data().iter::<f32>().collect();
    flat.chunks(v).map(<[f32]>::to_vec).collect()
}

impl DecodeBatch {
    pub fn new(model: &LanguageModel, device: &Device) -> Self {
        Self {
            cache: RowCaches::new(model.num_layers(), device),
            capacity: model.max_positions,
        }
    }

    /// Positions filled in each row.
    pub fn lengths(&self) -> &[usize] {
        &self.cache.lengths
    }

    /// Grows every row's cache so that it holds at least `needed` positions.
    fn reserve(&mut self, needed: usize) {
        if needed > self.cache.allocated {
            let grown = needed.div_ceil(GROW) * GROW;
            self.cache.grow_to(grown.min(self.capacity).max(needed));
        }
    }

    pub fn rows(&self) -> usize {
        self.cache.lengths.len()
    }

    /// Runs `prompt` alone and adds it as the last row; returns its next-token logits.
    /// The prompt must be shorter than the capacity.
    pub fn join(&mut self, model: &LanguageModel, prompt: &[u32]) -> Vec<f32> {
        let t = prompt.len();
        let device = self.cache.device.clone();
        let mut prefill = KvCache::new(model.num_layers());
        let logits = model
            .forward_with(
                token_rows(prompt, 1, &device),
                Some(&mut prefill),
                Logits::Last,
            )
            .logits;
        self.reserve(t + 1);
        let allocated = self.cache.allocated;
        for (slot, layer) in self.cache.layers.iter_mut().zip(prefill.into_layers()) {
            let Some((k, v)) = layer else { continue };
            let (k, v) = (
                pad(k, allocated - t, &device),
                pad(v, allocated - t, &device),
            );
            *slot = Some(match slot.take() {
                Some((ks, vs)) => (Tensor::cat(vec![ks, k], 0), Tensor::cat(vec![vs, v], 0)),
                None => (k, v),
            });
        }
        self.cache.lengths.push(t);
        host_rows(logits).pop().unwrap_or_default()
    }

    /// Keeps the rows where `keep` is true, in order.
    pub fn retain(&mut self, keep: &[bool]) {
        let cache = &mut self.cache;
        let idx: Vec<i64> = (0..cache.lengths.len())
            .filter(|&r| keep.get(r).copied().unwrap_or(false))
            .map(|r| r as i64)
            .collect();
        if idx.len() == cache.lengths.len() {
            return;
        }
        cache.lengths = idx.iter().map(|&r| cache.lengths[r as usize]).collect();
        if idx.is_empty() {
            cache.layers.iter_mut().for_each(|l| *l = None);
            cache.allocated = 0;
            return;
        }
        let n = idx.len();
        let index = Tensor::<1, Int>::from_data(TensorData::new(idx, [n]), &cache.device);
        for slot in &mut cache.layers {
            if let Some((k, v)) = slot.take() {
                *slot = Some((k.select(0, index.clone()), v.select(0, index.clone())));
            }
        }
    }

    /// Feeds one token per row; returns each row's next-token logits. Every row must have
    /// room (`lengths[r] < capacity`).
    pub fn step(&mut self, model: &LanguageModel, tokens: &[u32]) -> Vec<Vec<f32>> {
        let longest = self.cache.lengths.iter().copied().max().unwrap_or(0);
        self.reserve(longest + 1);
        let tokens = token_rows(tokens, tokens.len(), &self.cache.device);
        let logits = model
            .forward_with(tokens, Some(&mut self.cache), Logits::Last)
            .logits;
        host_rows(logits)
    }
}

/// `ids` as an `[rows, ids / rows]` token tensor.
pub fn token_rows(ids: &[u32], rows: usize, device: &Device) -> Tensor<2, Int> {
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let len = ids.len() / rows.max(1);
    Tensor::from_data(TensorData::new(data, [rows, len]), device)
}
