//! Where attention keeps the keys and values of positions it has already seen, so a forward
//! pass runs only the new tokens. One attention implementation serves every use through the
//! [`KvStore`] trait:
//! - training: no store at all (every position is new, causal attention);
//! - `sample` and prefill: [`KvCache`], one contiguous run of positions shared by every row;
//! - the batched server: [`crate::paged::PackedStep`], sequences packed into one row, each
//!   token reading its own sequence's blocks of a paged pool.

use crate::kernels::attention::causal_attention;
use burn::tensor::Tensor;

/// Which positions a chunk of new tokens occupies, for the rotary embedding.
#[derive(Debug, Clone, PartialEq)]
pub enum Positions {
    /// Every row continues the same run: the chunk is `start..start + len`.
    Span(usize),
    /// One row of tokens from many sequences, each token at its own position (the paged
    /// server's packed step).
    Tokens(Vec<usize>),
}

/// A key/value store for one forward pass over every layer.
pub trait KvStore {
    /// Positions of a chunk of `len` new tokens per row.
    fn positions(&self, len: usize) -> Positions;
    /// Stores layer `layer`'s keys and values of the chunk (`[batch, kv_heads, len, head_dim]`,
    /// after RoPE) and returns the chunk's attention output `[batch, heads, len, head_dim]`:
    /// its queries `q` over everything the store holds that each may see.
    fn attend(
        &mut self,
        layer: usize,
        q: Tensor<4>,
        keys: Tensor<4>,
        values: Tensor<4>,
    ) -> Tensor<4>;
    /// Every layer has stored the chunk: its `len` positions now count as seen.
    fn advance(&mut self, len: usize);
}

/// One contiguous run of positions per layer, shared by every row: what `sample` and a
/// prefill use.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer: `[batch, kv_heads, seen, head_dim]` keys and values.
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    seen: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            seen: 0,
        }
    }
    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.seen
    }
    pub fn is_empty(&self) -> bool {
        self.seen == 0
    }
    /// Each layer's keys and values, in layer order (absent for a cache never filled).
    pub fn into_layers(self) -> Vec<Option<(Tensor<4>, Tensor<4>)>> {
        self.layers
    }
}

impl KvStore for KvCache {
    fn positions(&self, _len: usize) -> Positions {
        Positions::Span(self.seen)
    }

    fn attend(
        &mut self,
        layer: usize,
        q: Tensor<4>,
        keys: Tensor<4>,
        values: Tensor<4>,
    ) -> Tensor<4> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let (keys, values) = match self.layers[layer].take() {
            Some((k, v)) => (
                Tensor::cat(vec![k, keys], 2),
                Tensor::cat(vec![v, values], 2),
            ),
            None => (keys, values),
        };
        self.layers[layer] = Some((keys.clone(), values.clone()));
        // The chunk is the last `len` of the run: causal with that offset.
        causal_attention(q, keys, values)
    }

    fn advance(&mut self, len: usize) {
        self.seen += len;
    }
}
