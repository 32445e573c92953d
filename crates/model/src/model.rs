//! The decoder-only language model: embeddings, a stack of pre-norm decoder layers
//! (attention + dense or MoE FFN), a final norm and the LM head.

use crate::layers::{linear, rope_tables, Attention, LayerCache, RmsNorm, SwiGlu, INIT_STD};
use crate::moe::{Moe, RouterStats};
use crate::path::{by_path, ReadParam};
use crate::ModelConfig;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, Linear};
use burn::tensor::{Device, Int, Tensor};
use std::collections::BTreeMap;

/// The FFN of a decoder layer: dense SwiGLU or mixture of experts.
#[derive(Module, Debug)]
pub enum Ffn {
    Dense(SwiGlu),
    Moe(Moe),
}

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub attention: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Ffn,
    pub dropout: Dropout,
}

impl DecoderLayer {
    fn new(cfg: &ModelConfig, layer: usize, device: &Device) -> Self {
        let mlp = if cfg.layer_is_moe(layer) {
            Ffn::Moe(Moe::new(cfg, device))
        } else {
            Ffn::Dense(SwiGlu::new(
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.use_bias,
                device,
            ))
        };
        Self {
            input_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, device),
            attention: Attention::new(cfg, device),
            post_attention_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, device),
            mlp,
            dropout: DropoutConfig::new(cfg.output_dropout).init(),
        }
    }

    fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        cache: Option<&mut LayerCache>,
    ) -> (Tensor<3>, Option<RouterStats>) {
        let attn = self
            .attention
            .forward(self.input_layernorm.forward(x.clone()), cos, sin, cache);
        let x = x + self.dropout.forward(attn);
        let normed = self.post_attention_layernorm.forward(x.clone());
        let (ffn, stats) = match &self.mlp {
            Ffn::Dense(mlp) => (mlp.forward(normed), None),
            Ffn::Moe(moe) => {
                let (y, stats) = moe.forward(normed);
                (y, Some(stats))
            }
        };
        (x + self.dropout.forward(ffn), stats)
    }
}

/// Output of a forward pass.
#[derive(Debug)]
pub struct ForwardOutput {
    /// `[batch, seq, vocab]`.
    pub logits: Tensor<3>,
    /// One entry per MoE layer.
    pub router: Vec<RouterStats>,
}

/// Per-layer KV cache for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); num_layers],
        }
    }
    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Module, Debug)]
pub struct LanguageModel {
    pub word_embeddings: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// Absent when the head is tied to the embeddings.
    pub lm_head: Option<Linear>,
    pub embedding_dropout: Dropout,
    pub norm_head: bool,
    pub rope_theta: f64,
    pub head_dim: usize,
    pub max_positions: usize,
}

impl LanguageModel {
    /// Builds a model initialised from `seed` (see `init.rs`): the same weights on any backend.
    pub fn new(cfg: &ModelConfig, device: &Device, seed: u64) -> Self {
        crate::init::init_weights(Self::uninitialised(cfg, device), seed, INIT_STD)
    }

    /// Builds the module tree with placeholder weights, to be loaded or initialised.
    pub fn uninitialised(cfg: &ModelConfig, device: &Device) -> Self {
        let word_embeddings = EmbeddingConfig::new(cfg.vocab_size, cfg.hidden_size)
            .with_initializer(Initializer::Zeros)
            .init(device);
        Self {
            word_embeddings,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| DecoderLayer::new(cfg, i, device))
                .collect(),
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, device),
            lm_head: (!cfg.tie_word_embeddings)
                .then(|| linear(cfg.hidden_size, cfg.vocab_size, false, device)),
            embedding_dropout: DropoutConfig::new(cfg.embedding_dropout).init(),
            norm_head: cfg.norm_head,
            rope_theta: cfg.rope_theta,
            head_dim: cfg.head_dim(),
            max_positions: cfg.max_position_embeddings,
        }
    }

    /// `tokens`: `[batch, seq]`. With a cache, `tokens` continue the cached positions.
    pub fn forward(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> ForwardOutput {
        let device = tokens.device();
        let [_, t] = tokens.dims();
        let start = cache.as_ref().map_or(0, |c| c.len());
        let (cos, sin) = rope_tables(self.rope_theta, self.head_dim, start, t, &device);
        let mut x = self
            .embedding_dropout
            .forward(self.word_embeddings.forward(tokens));
        let mut router = Vec::new();
        let mut caches = cache.map(|c| c.layers.iter_mut());
        for layer in &self.layers {
            let layer_cache = caches.as_mut().and_then(|it| it.next());
            let (y, stats) = layer.forward(x, &cos, &sin, layer_cache);
            x = y;
            router.extend(stats);
        }
        let x = self.norm.forward(x);
        ForwardOutput {
            logits: self.head(x),
            router,
        }
    }

    /// The LM head weight as `[hidden, vocab]`, rows L2-normalised per vocab entry when `norm_head`.
    fn head_weight(&self) -> Tensor<2> {
        let w = match &self.lm_head {
            Some(head) => head.weight.val(),
            None => self.word_embeddings.weight.val().transpose(),
        };
        if self.norm_head {
            let norm = w.clone().powi_scalar(2).sum_dim(0).sqrt().clamp_min(1e-7);
            w / norm
        } else {
            w
        }
    }

    pub fn head(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, h] = x.dims();
        let w = self.head_weight();
        let vocab = w.dims()[1];
        x.reshape([b * t, h]).matmul(w).reshape([b, t, vocab])
    }

    /// Every parameter's path and shape for `cfg`, without allocating the weights (burn
    /// initialises parameters lazily), so a 290B-parameter layout can be checked on a laptop.
    pub fn parameter_shapes(cfg: &ModelConfig) -> BTreeMap<String, Vec<usize>> {
        by_path(&Self::uninitialised(cfg, &Device::default()), LazyShape)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn num_params(&self) -> usize {
        Module::num_params(self)
    }
}

/// Reads a parameter's shape without initialising it.
struct LazyShape;

impl ReadParam for LazyShape {
    type Out = Vec<usize>;
    fn read<const D: usize>(&mut self, param: &Param<Tensor<D>>) -> Vec<usize> {
        param.lazy_shape().to_vec()
    }
}
