//! The decoder-only language model: embeddings, a stack of pre-norm decoder layers
//! (attention + dense or MoE FFN), a final norm and the LM head. One forward path serves
//! training (no key/value store), `sample` (a contiguous [`KvCache`]) and the batched server
//! (a paged pool, sequences packed into one row): see `cache.rs`.
//!
//! Parameter names (the keys of `model.safetensors`) are the module paths below and are part
//! of the run-folder format (docs/ARCHITECTURE.md): `word_embeddings.weight`,
//! `layers.N.{input_layernorm,post_attention_layernorm}.weight`,
//! `layers.N.attention.{query_key_value,dense}.{weight,bias}`,
//! `layers.N.attention.{query,key}_layernorm.weight`, dense layers'
//! `layers.N.mlp.{gate,up,down}_proj.{weight,bias}`, MoE layers' `layers.N.moe.gate.weight`,
//! `layers.N.moe.experts.{gate,up,down}_proj` (stacked) and
//! `layers.N.moe.shared_experts.{gate,up,down}_proj.{weight,bias}`, `layers.N.moe.expert_bias`
//! (Ling 2.0), `norm.weight`, `lm_head.weight`, and Ling 2.0's multi-token-prediction layers
//! `mtp_layers.K.{enorm,hnorm,eh_proj,final_layernorm}.*` and `mtp_layers.K.decoder.…`. Renaming a field here changes the format: see `names::migrate`.

use crate::cache::{KvCache, KvStore, Positions};
use crate::layers::{linear, Attention, RmsNorm, Rope, SwiGlu, INIT_STD};
use crate::moe::{Moe, RouterStats};
use crate::path::{by_path, ReadParam};
use crate::trace;
use crate::ModelConfig;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, Linear};
use burn::tensor::{Device, Int, Tensor};
use std::collections::BTreeMap;

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub attention: Attention,
    pub post_attention_layernorm: RmsNorm,
    /// The dense SwiGLU FFN (dense layers only).
    pub mlp: Option<SwiGlu>,
    /// The mixture-of-experts FFN (MoE layers only).
    pub moe: Option<Moe>,
    pub dropout: Dropout,
}

impl DecoderLayer {
    fn new(cfg: &ModelConfig, layer: usize, device: &Device) -> Self {
        let is_moe = cfg.layer_is_moe(layer);
        Self {
            input_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, device),
            attention: Attention::new(cfg, device),
            post_attention_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, device),
            mlp: (!is_moe)
                .then(|| SwiGlu::new(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, device)),
            moe: is_moe.then(|| Moe::new(cfg, device)),
            dropout: DropoutConfig::new(cfg.output_dropout).init(),
        }
    }

    /// One layer over a chunk of new tokens; `cos`/`sin` are the chunk's rotary angles.
    pub(crate) fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        index: usize,
        store: Option<&mut dyn KvStore>,
    ) -> (Tensor<3>, Option<RouterStats>) {
        // Taps (see trace.rs) name this layer `layers.N`; an MTP layer's decoder is traced by
        // its output only.
        let _scope = (index != usize::MAX).then(|| trace::scope(|| format!("layers.{index}")));
        let h = trace::tap("input_layernorm", self.input_layernorm.forward(x.clone()));
        let attn = trace::tap(
            "attention",
            self.attention.forward(h, cos, sin, index, store),
        );
        let x = x + self.dropout.forward(attn);
        let normed = trace::tap(
            "post_attention_layernorm",
            self.post_attention_layernorm.forward(x.clone()),
        );
        let (ffn, stats) = match (&self.mlp, &self.moe) {
            (_, Some(moe)) => {
                let (y, stats) = moe.forward(normed);
                (trace::tap("moe", y), Some(stats))
            }
            (Some(mlp), None) => (trace::tap("mlp", mlp.forward(normed)), None),
            (None, None) => (Tensor::zeros(normed.dims(), &normed.device()), None),
        };
        let out = x + self.dropout.forward(ffn);
        (trace::tap("", out), stats)
    }
}

/// A multi-token-prediction layer (Ling 2.0's `BailingMoeV2MTPLayer`): the previous depth's
/// hidden state (normed by `hnorm`) and the embedding of the token k ahead (normed by
/// `enorm`), concatenated `[embedding, hidden]` and projected back by `eh_proj`, go through an
/// MoE decoder layer and a final norm.
#[derive(Module, Debug)]
pub struct MtpLayer {
    pub enorm: RmsNorm,
    pub hnorm: RmsNorm,
    /// `[2 × hidden, hidden]`.
    pub eh_proj: Linear,
    pub decoder: DecoderLayer,
    pub final_layernorm: RmsNorm,
}

impl MtpLayer {
    fn new(cfg: &ModelConfig, depth: usize, device: &Device) -> Self {
        let h = cfg.hidden_size;
        Self {
            enorm: RmsNorm::new(h, cfg.rms_norm_eps, device),
            hnorm: RmsNorm::new(h, cfg.rms_norm_eps, device),
            eh_proj: linear(2 * h, h, false, device),
            decoder: DecoderLayer::new(cfg, cfg.num_hidden_layers + depth, device),
            final_layernorm: RmsNorm::new(h, cfg.rms_norm_eps, device),
        }
    }

    fn forward(
        &self,
        embedded: Tensor<3>,
        hidden: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
    ) -> (Tensor<3>, Option<RouterStats>) {
        let joined = Tensor::cat(
            vec![self.enorm.forward(embedded), self.hnorm.forward(hidden)],
            2,
        );
        let x = crate::layers::forward_rows(&self.eh_proj, joined);
        let (x, stats) = self.decoder.forward(x, cos, sin, usize::MAX, None);
        (self.final_layernorm.forward(x), stats)
    }
}

/// Output of a forward pass.
#[derive(Debug)]
pub struct ForwardOutput {
    /// `[batch, seq, vocab]` (`seq` is 1 when only the last position was asked for).
    pub logits: Tensor<3>,
    /// One entry per MoE layer.
    pub router: Vec<RouterStats>,
}

/// Which positions go through the LM head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logits {
    /// Every position (training, evaluation).
    All,
    /// The last position of each row (decoding: a 4K-token prompt needs one row of logits,
    /// not 4K × vocabulary).
    Last,
    /// These positions of the (single) row: the last token of each sequence of a packed step
    /// whose prompt is complete.
    At(Vec<usize>),
}

#[derive(Module, Debug)]
pub struct LanguageModel {
    pub word_embeddings: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// Absent when the head is tied to the embeddings.
    pub lm_head: Option<Linear>,
    /// Multi-token-prediction layers (training only).
    pub mtp_layers: Vec<MtpLayer>,
    /// The MTP cross-entropies' weight in the training loss (`mtp_loss_scaling_factor`).
    pub mtp_loss_weight: f64,
    pub embedding_dropout: Dropout,
    pub norm_head: bool,
    pub head_dim: usize,
    pub max_positions: usize,
    /// cos/sin tables, built once per device.
    #[module(skip)]
    pub rope: Rope,
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
            mtp_layers: (1..=cfg.num_nextn_predict_layers)
                .map(|depth| MtpLayer::new(cfg, depth, device))
                .collect(),
            mtp_loss_weight: cfg.mtp_loss_scaling_factor,
            embedding_dropout: DropoutConfig::new(cfg.embedding_dropout).init(),
            norm_head: cfg.norm_head,
            head_dim: cfg.head_dim(),
            max_positions: cfg.max_position_embeddings,
            rope: Rope::new(
                cfg.rope_theta,
                cfg.rotary_dim(),
                cfg.max_position_embeddings,
            ),
        }
    }

    /// `tokens`: `[batch, seq]`; logits at every position. With a cache, `tokens` continue the
    /// cached positions.
    pub fn forward(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> ForwardOutput {
        self.forward_with(tokens, cache.map(|c| c as &mut dyn KvStore), Logits::All)
    }

    /// The one forward pass: `tokens` `[batch, len]` are new positions of the rows `store`
    /// holds (or a whole sequence without a store); `logits` says which positions go through
    /// the LM head.
    pub fn forward_with(
        &self,
        tokens: Tensor<2, Int>,
        store: Option<&mut dyn KvStore>,
        logits: Logits,
    ) -> ForwardOutput {
        let (hidden, router) = self.trunk(tokens, store);
        let [_, len, _] = hidden.dims();
        let x = match logits {
            Logits::All => hidden,
            Logits::Last => hidden.narrow(1, len - 1, 1),
            Logits::At(at) => {
                let ids: Vec<i64> = at.iter().map(|&p| p as i64).collect();
                let index = Tensor::<1, Int>::from_data(
                    burn::tensor::TensorData::new(ids, [at.len()]),
                    &hidden.device(),
                );
                hidden.select(1, index)
            }
        };
        ForwardOutput {
            logits: trace::tap("lm_head", self.head(x)),
            router,
        }
    }

    /// The final hidden states `[batch, len, hidden]` (after the last norm, what the LM head
    /// reads) of whole sequences: what `/v1/embeddings` pools.
    pub fn hidden_states(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.trunk(tokens, None).0
    }

    /// Embeddings, decoder layers and the final norm: the hidden states the LM head reads.
    fn trunk(
        &self,
        tokens: Tensor<2, Int>,
        mut store: Option<&mut dyn KvStore>,
    ) -> (Tensor<3>, Vec<RouterStats>) {
        let device = tokens.device();
        let [_, len] = tokens.dims();
        let positions = store
            .as_ref()
            .map_or(Positions::Span(0), |s| s.positions(len));
        let (cos, sin) = self.rope.angles(&positions, len, &device);
        let mut x = trace::tap(
            "word_embeddings",
            self.embedding_dropout
                .forward(self.word_embeddings.forward(tokens)),
        );
        let mut router = Vec::new();
        for (index, layer) in self.layers.iter().enumerate() {
            let layer_store = store.as_mut().map(|s| &mut **s as &mut dyn KvStore);
            let (y, stats) = layer.forward(x, &cos, &sin, index, layer_store);
            x = y;
            router.extend(stats);
        }
        if let Some(store) = store {
            store.advance(len);
        }
        (trace::tap("norm", self.norm.forward(x)), router)
    }

    /// Training's forward pass: the logits at every position and, per MTP layer k (1-based),
    /// logits at positions `0..len - k` predicting the token k + 1 ahead (position t reads the
    /// embedding of token t + k; Ling 2.0's rolled inputs, whose last k positions have no
    /// target). The MTP layers' router statistics follow the main ones.
    pub fn forward_train(&self, tokens: Tensor<2, Int>) -> (ForwardOutput, Vec<Tensor<3>>) {
        let device = tokens.device();
        let [b, len] = tokens.dims();
        let (mut hidden, mut router) = self.trunk(tokens.clone(), None);
        let logits = trace::tap("lm_head", self.head(hidden.clone()));
        let (cos, sin) = self.rope.angles(&Positions::Span(0), len, &device);
        let mut mtp_logits = Vec::with_capacity(self.mtp_layers.len());
        for (i, mtp) in self.mtp_layers.iter().enumerate() {
            let k = i + 1;
            if k >= len {
                break;
            }
            // Token t + k at position t; the last k positions read token 0 (no target there).
            let ahead = Tensor::cat(
                vec![
                    tokens.clone().narrow(1, k, len - k),
                    Tensor::zeros([b, k], &device),
                ],
                1,
            );
            let embedded = self
                .embedding_dropout
                .forward(self.word_embeddings.forward(ahead));
            let (h, stats) = mtp.forward(embedded, hidden, &cos, &sin);
            router.extend(stats);
            mtp_logits.push(self.head(h.clone().narrow(1, 0, len - k)));
            hidden = h;
        }
        (ForwardOutput { logits, router }, mtp_logits)
    }

    /// The LM head weight as `[hidden, vocab]`. With `norm_head` (Ling's NormHead, as Ant's
    /// `modeling_bailing_moe.py` computes it): HF's `lm_head.weight` `[vocab, hidden]` divided
    /// by its L2 norm over dim 0, i.e. each hidden index's vector across the whole vocabulary
    /// has unit norm (here: each row of `[hidden, vocab]`). Ant adds 1e-7 to the norm and
    /// detaches it in training, so the gradient flows through the numerator only.
    fn head_weight(&self) -> Tensor<2> {
        let w = match &self.lm_head {
            Some(head) => head.weight.val(),
            None => self.word_embeddings.weight.val().transpose(),
        };
        if self.norm_head {
            let norm = w.clone().powi_scalar(2).sum_dim(1).sqrt().detach() + 1e-7;
            w / norm
        } else {
            w
        }
    }

    pub fn head(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, h] = x.dims();
        let w = self.head_weight();
        let vocab = w.dims()[1];
        crate::kernels::bf16_matmul::weight_product(x.reshape([b * t, h]), w).reshape([b, t, vocab])
    }

    /// Every parameter's path and shape for `cfg`, without allocating the weights (burn
    /// initialises parameters lazily), so a 290B-parameter layout can be checked on a laptop.
    pub fn parameter_shapes(cfg: &ModelConfig) -> BTreeMap<String, Vec<usize>> {
        by_path(&Self::uninitialised(cfg, &Device::default()), LazyShape)
    }

    /// Moves every MoE layer's expert bias against its load (`load[i]`: tokens per expert of
    /// the i-th MoE layer over a step, MTP layers last, as the router statistics come; see [`Moe::update_expert_bias`]). Returns each updated
    /// layer's largest |bias|.
    pub fn update_expert_bias(&mut self, load: &[Vec<f64>], rate: f64) -> Vec<f32> {
        let mtp = self.mtp_layers.iter_mut().map(|m| &mut m.decoder);
        let moes = self
            .layers
            .iter_mut()
            .chain(mtp)
            .filter_map(|l| l.moe.as_mut());
        moes.zip(load)
            .filter_map(|(moe, load)| moe.update_expert_bias(load, rate))
            .map(|b| b.iter().fold(0.0f32, |m, x| m.max(x.abs())))
            .collect()
    }

    /// Sets every router's stochastic-warm-up mix (1: no noise; see `Moe::routing_mix`).
    pub fn set_routing_mix(&mut self, mix: f64) {
        let mtp = self.mtp_layers.iter_mut().map(|m| &mut m.decoder);
        for moe in self
            .layers
            .iter_mut()
            .chain(mtp)
            .filter_map(|l| l.moe.as_mut())
        {
            moe.routing_mix = mix.clamp(0.0, 1.0);
        }
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
