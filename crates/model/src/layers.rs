//! The decoder's building blocks: RMSNorm, rotary position embedding, causal grouped-query
//! attention and the SwiGLU feed-forward network. The MoE layer lives in `moe.rs`, the
//! key/value stores attention reads and writes in `cache.rs`.

use crate::cache::{KvStore, Positions};
use crate::kernels::attention::{causal_attention, repeat_kv};
use crate::trace;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Initializer, Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::sync::{Arc, Mutex};

/// Standard deviation of the normal initialiser for every weight matrix (GPT-2 / nanoGPT).
pub const INIT_STD: f64 = 0.02;

pub fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        // Placeholder: weights are set by `init::init_weights` or loaded from a checkpoint.
        .with_initializer(Initializer::Zeros)
        .init(device)
}

/// `layer` applied to `x` `[..., d_in]` as one `[rows, d_in] · [d_in, d_out]` product (in bf16
/// where `kernels::bf16_matmul::set_precision` asked for it). Burn's
/// `Linear` keeps a batched product when each batch's rows fill its tiles, which packs the
/// weight again for every batch row, forward and backward; folding the rows costs a reshape.
pub fn forward_rows<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let dims = x.dims();
    let d_in = dims[D - 1];
    let rows = dims[..D - 1].iter().product();
    let mut y =
        crate::kernels::bf16_matmul::weight_product(x.reshape([rows, d_in]), layer.weight.val());
    if let Some(bias) = &layer.bias {
        y = y + bias.val().unsqueeze::<2>();
    }
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
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

    /// Normalised over the last dimension (one fused op where the backend has the kernel).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        crate::kernels::rms_norm::rms_norm(x, self.weight.val(), self.eps)
    }
}

/// Rotary position embedding in the "rotate half" convention used by Llama and bailing_moe:
/// the first and second halves of each head are the two coordinates of each rotated pair.
/// Returns `[len, head_dim]` cos and sin tables for positions `start..start + len`.
pub fn rope_tables(
    theta: f64,
    head_dim: usize,
    start: usize,
    len: usize,
    device: &Device,
) -> (Tensor<2>, Tensor<2>) {
    let mut cos = Vec::with_capacity(len * head_dim);
    let mut sin = Vec::with_capacity(len * head_dim);
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    for pos in start..start + len {
        let angles: Vec<f32> = inv_freq.iter().map(|f| pos as f32 * f).collect();
        cos.extend(angles.iter().chain(&angles).map(|a| a.cos()));
        sin.extend(angles.iter().chain(&angles).map(|a| a.sin()));
    }
    let shape = [len, head_dim];
    (
        Tensor::from_data(TensorData::new(cos, shape), device),
        Tensor::from_data(TensorData::new(sin, shape), device),
    )
}

/// Rotates `x` `[batch, heads, seq, head_dim]` by angles that broadcast to it: `[1, 1, seq,
/// rotary]` for positions shared by every row, `[batch, 1, 1, rotary]` for one position per
/// row. With `rotary < head_dim` (partial RoPE) only the first `rotary` features turn; the rest
/// pass through.
pub fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    crate::kernels::rope::rope(x, cos, sin)
}

/// cos and sin tables of one model, built once per device (and again only if a longer run of
/// positions is asked for) instead of on the host every step.
#[derive(Debug, Clone)]
pub struct Rope {
    theta: f64,
    /// Features of each head that turn (`head_dim`, or less with partial RoPE).
    dim: usize,
    /// Positions the first build covers (the model's context).
    initial_len: usize,
    built: Arc<Mutex<Vec<BuiltTables>>>,
}

#[derive(Debug, Clone)]
struct BuiltTables {
    device: Device,
    autodiff: bool,
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl Rope {
    pub fn new(theta: f64, dim: usize, initial_len: usize) -> Self {
        Self {
            theta,
            dim,
            initial_len,
            built: Arc::default(),
        }
    }

    /// How many devices the tables have been built for.
    pub fn devices_built(&self) -> usize {
        self.built.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// `[positions, head_dim]` tables covering at least `needed` positions on `device`.
    fn tables(&self, needed: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        let autodiff = device.is_autodiff();
        let found = built
            .iter()
            .position(|b| b.autodiff == autodiff && &b.device == device);
        if let Some(i) = found {
            if built[i].cos.dims()[0] >= needed {
                return (built[i].cos.clone(), built[i].sin.clone());
            }
            built.remove(i);
        }
        let len = needed.max(self.initial_len);
        let (cos, sin) = rope_tables(self.theta, self.dim, 0, len, device);
        built.push(BuiltTables {
            device: device.clone(),
            autodiff,
            cos: cos.clone(),
            sin: sin.clone(),
        });
        (cos, sin)
    }

    /// cos and sin for a chunk of `len` tokens per row at `positions`, shaped to broadcast
    /// over `[batch, heads, len, head_dim]`.
    pub fn angles(
        &self,
        positions: &Positions,
        len: usize,
        device: &Device,
    ) -> (Tensor<4>, Tensor<4>) {
        let d = self.dim;
        match positions {
            Positions::Span(start) => {
                let (cos, sin) = self.tables(start + len, device);
                let take = |t: Tensor<2>| t.narrow(0, *start, len).reshape([1, 1, len, d]);
                (take(cos), take(sin))
            }
            Positions::Tokens(each) => {
                let needed = each.iter().max().map_or(0, |p| p + 1);
                let (cos, sin) = self.tables(needed, device);
                let ids: Vec<i64> = each.iter().map(|&p| p as i64).collect();
                let index = Tensor::<1, Int>::from_data(TensorData::new(ids, [each.len()]), device);
                let take = |t: Tensor<2>| t.select(0, index.clone()).reshape([1, 1, each.len(), d]);
                (take(cos), take(sin))
            }
        }
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
    /// Dropout on the attention probabilities (training only; Ant's `attention_dropout`).
    pub dropout: Dropout,
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
            dropout: DropoutConfig::new(cfg.attention_dropout).init(),
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
        }
    }

    /// `x`: `[batch, len, hidden]`, new tokens at the positions `cos`/`sin` were made for
    /// (see [`Rope::angles`]). With a store, this chunk's keys and values go into it as layer
    /// `layer`'s and the chunk attends to everything the store holds; without, to itself.
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        layer: usize,
        store: Option<&mut dyn KvStore>,
    ) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let qkv = forward_rows(&self.query_key_value, x);
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
        let q = trace::tap(
            "attention.query",
            apply_rope(norm(heads(0, h), &self.query_layernorm), cos, sin),
        );
        let k = trace::tap(
            "attention.key",
            apply_rope(norm(heads(h, kvh), &self.key_layernorm), cos, sin),
        );
        let v = trace::tap("attention.value", heads(h + kvh, kvh));
        let out = match store {
            Some(store) => store.attend(layer, q, k, v),
            None => self.self_attention(q, k, v),
        };
        let out = trace::tap("attention.core", out);
        forward_rows(&self.dense, out.swap_dims(1, 2).reshape([b, t, h * d]))
    }

    /// A whole sequence attending to itself, causally; with attention dropout in training the
    /// scores are built explicitly (the fused op has no dropout).
    fn self_attention(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
        let dropout = self.dropout.prob > 0.0 && q.device().is_autodiff();
        if !dropout {
            return causal_attention(q, k, v);
        }
        let [b, h, t, d] = q.dims();
        let groups = h / self.num_kv_heads;
        let (keys, values) = (repeat_kv(k, groups), repeat_kv(v, groups));
        let mask = causal_mask(t, &q.device());
        let scores = q.matmul(keys.swap_dims(2, 3)) / (d as f64).sqrt() + mask.expand([b, h, t, t]);
        self.dropout.forward(softmax(scores, 3)).matmul(values)
    }
}

/// An additive causal mask `[1, 1, len, len]`: query `i` sees keys `0..=i`.
fn causal_mask(len: usize, device: &Device) -> Tensor<4> {
    let values: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::<2>::from_data(TensorData::new(values, [len, len]), device).reshape([1, 1, len, len])
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
        let gate = forward_rows(&self.gate_proj, x.clone());
        let up = forward_rows(&self.up_proj, x);
        forward_rows(&self.down_proj, crate::kernels::swiglu::swiglu(gate, up))
    }
}
