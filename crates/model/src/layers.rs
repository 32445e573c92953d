//! The decoder's building blocks: RMSNorm, rotary position embedding, causal grouped-query
//! attention and the SwiGLU feed-forward network. The MoE layer lives in `moe.rs`.

use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor};

/// Standard deviation of the normal initialiser for every weight matrix (GPT-2 / nanoGPT).
pub const INIT_STD: f64 = 0.02;

pub fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        // Placeholder: weights are set by `init::init_weights` or loaded from a checkpoint.
        .with_initializer(Initializer::Zeros)
        .init(device)
}

/// Root-mean-square layer norm: `x / sqrt(mean(x²) + eps) * weight`.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([size], device)),
            eps,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let mean_square = x.clone().powi_scalar(2).mean_dim(D - 1);
        let x = x * (mean_square + self.eps).sqrt().recip();
        x * self.weight.val().unsqueeze()
    }
}

/// Rotary position embedding in the "rotate half" convention used by Llama and bailing_moe:
/// the first and second halves of each head are the two coordinates of each rotated pair.
pub fn rope_tables(
    theta: f64,
    head_dim: usize,
    start: usize,
    len: usize,
    device: &Device,
) -> (Tensor<2>, Tensor<2>) {
    let mut cos = Vec::with_capacity(len * head_dim);
    let mut sin = Vec::with_capacity(len * head_dim);
    for pos in start..start + len {
        let (c, s) = rope_row(theta, head_dim, pos);
        cos.extend(c);
        sin.extend(s);
    }
    let shape = [len, head_dim];
    (
        Tensor::from_data(burn::tensor::TensorData::new(cos, shape), device),
        Tensor::from_data(burn::tensor::TensorData::new(sin, shape), device),
    )
}

/// cos and sin of one position, for both halves of a head (rotate-half layout).
pub fn rope_row(theta: f64, head_dim: usize, pos: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let angles: Vec<f32> = (0..half)
        .map(|i| pos as f32 * (1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)))
        .collect();
    let cos: Vec<f32> = angles.iter().chain(&angles).map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().chain(&angles).map(|a| a.sin()).collect();
    (cos, sin)
}

/// Rotates `x` `[batch, heads, seq, head_dim]` by the positions' angles; `cos`/`sin` are
/// `[seq, head_dim]`, the same for every row.
pub fn apply_rope(x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
    apply_rope_rows(x, &cos.clone().unsqueeze(), &sin.clone().unsqueeze())
}

/// [`apply_rope`] with angles that broadcast to `x`: `[1, 1, seq, head_dim]` for shared
/// positions, `[batch, 1, 1, head_dim]` for one position per row.
pub fn apply_rope_rows(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [b, h, t, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone().expand([b, h, t, d]) + rotated * sin.clone().expand([b, h, t, d])
}

/// What one decode step of a batch of rows needs besides the tokens: per-row RoPE values, the
/// one-hot slot each row writes its new key/value into, and the mask of filled slots.
pub struct RowState {
    pub cos: Tensor<4>,
    pub sin: Tensor<4>,
    /// `[batch, 1, capacity, 1]`: 1 at each row's current position.
    pub write: Tensor<4>,
    /// `[batch, 1, 1, capacity]`: 0 where a row may attend, a large negative number elsewhere.
    pub mask: Tensor<4>,
}

/// One layer's keys and values of the positions already seen, for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// `[batch, kv_heads, seen, head_dim]` each.
    pub kv: Option<(Tensor<4>, Tensor<4>)>,
}

impl LayerCache {
    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Causal grouped-query self-attention with a fused QKV projection (bailing_moe layout:
/// `query_key_value` then `dense`).
#[derive(Module, Debug)]
pub struct Attention {
    pub query_key_value: Linear,
    pub dense: Linear,
    /// Per-head RMSNorm of queries and keys before RoPE, when `use_qk_norm`.
    pub query_layernorm: Option<RmsNorm>,
    pub key_layernorm: Option<RmsNorm>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    pub fn new(cfg: &crate::ModelConfig, device: &Device) -> Self {
        let d = cfg.head_dim();
        let qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d;
        Self {
            query_key_value: linear(cfg.hidden_size, qkv, cfg.use_qkv_bias, device),
            dense: linear(
                cfg.num_attention_heads * d,
                cfg.hidden_size,
                cfg.use_bias,
                device,
            ),
            query_layernorm: cfg
                .use_qk_norm
                .then(|| RmsNorm::new(d, cfg.rms_norm_eps, device)),
            key_layernorm: cfg
                .use_qk_norm
                .then(|| RmsNorm::new(d, cfg.rms_norm_eps, device)),
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
        }
    }

    /// `x`: `[batch, seq, hidden]`; `cos`/`sin`: RoPE tables for this chunk's positions.
    /// With a cache, keys and values of earlier positions are reused and this chunk's appended.
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let qkv = self.query_key_value.forward(x);
        let heads = |start: usize, n: usize| {
            qkv.clone()
                .narrow(2, start * d, n * d)
                .reshape([b, t, n, d])
                .swap_dims(1, 2)
        };
        let norm = |x: Tensor<4>, n: &Option<RmsNorm>| match n {
            Some(n) => n.forward(x),
            None => x,
        };
        let q = apply_rope(norm(heads(0, h), &self.query_layernorm), cos, sin);
        let mut k = apply_rope(norm(heads(h, kvh), &self.key_layernorm), cos, sin);
        let mut v = heads(h + kvh, kvh);
        if let Some(cache) = cache {
            if let Some((k_past, v_past)) = cache.kv.take() {
                k = Tensor::cat(vec![k_past, k], 2);
                v = Tensor::cat(vec![v_past, v], 2);
            }
            cache.kv = Some((k.clone(), v.clone()));
        }
        let k = repeat_kv(k, h / kvh);
        let v = repeat_kv(v, h / kvh);
        let options = AttentionModuleOptions {
            is_causal: t > 1,
            ..Default::default()
        };
        let out = attention(q, k, v, None, None, options);
        let out = out.swap_dims(1, 2).reshape([b, t, h * d]);
        self.dense.forward(out)
    }
}

/// Expands `[batch, kv_heads, seq, d]` to `[batch, kv_heads * groups, seq, d]`, head `i`
/// reading kv head `i / groups` (as HF's `repeat_kv`).
impl Attention {
    /// One new token per row, each row at its own position, against padded per-row caches
    /// `[batch, kv_heads, capacity, head_dim]`; returns the output and the updated caches.
    pub fn decode_rows(
        &self,
        x: Tensor<3>,
        rows: &RowState,
        keys: Tensor<4>,
        values: Tensor<4>,
    ) -> (Tensor<3>, Tensor<4>, Tensor<4>) {
        let [b, _, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let capacity = keys.dims()[2];
        let qkv = self.query_key_value.forward(x);
        let heads = |start: usize, n: usize| {
            qkv.clone()
                .narrow(2, start * d, n * d)
                .reshape([b, 1, n, d])
                .swap_dims(1, 2)
        };
        let norm = |x: Tensor<4>, n: &Option<RmsNorm>| match n {
            Some(n) => n.forward(x),
            None => x,
        };
        let q = apply_rope_rows(
            norm(heads(0, h), &self.query_layernorm),
            &rows.cos,
            &rows.sin,
        );
        let k = apply_rope_rows(
            norm(heads(h, kvh), &self.key_layernorm),
            &rows.cos,
            &rows.sin,
        );
        let v = heads(h + kvh, kvh);
        let shape = [b, kvh, capacity, d];
        let write = rows.write.clone().expand(shape);
        let keep = write.clone().neg() + 1.0;
        let keys = keys * keep.clone() + k.expand(shape) * write.clone();
        let values = values * keep + v.expand(shape) * write;
        let scores = q.matmul(repeat_kv(keys.clone(), h / kvh).swap_dims(2, 3)) / (d as f64).sqrt()
            + rows.mask.clone().expand([b, h, 1, capacity]);
        let probs = burn::tensor::activation::softmax(scores, 3);
        let out = probs
            .matmul(repeat_kv(values.clone(), h / kvh))
            .swap_dims(1, 2)
            .reshape([b, 1, h * d]);
        (self.dense.forward(out), keys, values)
    }
}

fn repeat_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [b, kvh, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, groups, t, d])
        .reshape([b, kvh * groups, t, d])
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct SwiGlu {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl SwiGlu {
    pub fn new(hidden: usize, width: usize, bias: bool, device: &Device) -> Self {
        Self {
            gate_proj: linear(hidden, width, bias, device),
            up_proj: linear(hidden, width, bias, device),
            down_proj: linear(width, hidden, bias, device),
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}
