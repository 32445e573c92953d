//! Causal grouped-query attention, `softmax(q·kᵀ/√d + causal mask)·v`, as one op, flash-style.
//!
//! The composition (Burn's `attention` under autodiff) makes the `[batch, heads, seq, seq]`
//! scores, masks, softmaxes and multiplies them in a dozen ops, keeps the probabilities for
//! backward and runs the backward of each op over them again; it also computes the half of the
//! scores the mask then hides, and copies every shared key/value head once per query head.
//!
//! Here each (batch, head) is one task. Its queries go in blocks of [`BLOCK`] rows: a block's
//! scores are made only for the keys its rows can see, softmaxed in place and multiplied by the
//! values; only each row's logsumexp is kept for backward, which makes each block's
//! probabilities again from it (as FlashAttention does). Query heads of one group read their
//! key/value head in place, and backward sums their key/value gradients in one task.
//!
//! Masking follows Burn's `attention` (and transformers'): with `tq` queries and `tk ≥ tq`
//! keys, query `i` sees keys `0..=i + tk − tq` — the last `tq` positions of the sequence.

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::Tensor;

/// Causal attention of `q` `[batch, heads, tq, head_dim]` over `k`, `v`
/// `[batch, kv_heads, tk, head_dim]` (`heads` a multiple of `kv_heads`, `tk ≥ tq`), scaled by
/// `1/√head_dim`: the kernel where the backend has one, else [`causal_attention_reference`].
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if super::runs_on(&q) && flex::shapes_fit(&q.dims(), &k.dims(), &v.dims()) {
        return flex::causal_attention(q, k, v);
    }
    causal_attention_reference(q, k, v)
}

/// The plain Burn composition: key/value heads repeated per group, then Burn's `attention`.
pub fn causal_attention_reference(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let groups = q.dims()[1] / k.dims()[1].max(1);
    let options = AttentionModuleOptions {
        is_causal: q.dims()[2] > 1,
        ..Default::default()
    };
    attention(
        q,
        repeat_kv(k, groups),
        repeat_kv(v, groups),
        None,
        None,
        options,
    )
}

/// Expands `[batch, kv_heads, seq, d]` to `[batch, kv_heads * groups, seq, d]`, head `i`
/// reading kv head `i / groups` (as HF's `repeat_kv`).
pub fn repeat_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [b, kvh, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, groups, t, d])
        .reshape([b, kvh * groups, t, d])
}

/// Query rows per block: the block's scores (`BLOCK × keys`) stay in cache while they are
/// softmaxed and used.
#[cfg(feature = "flex")]
const BLOCK: usize = 64;

#[cfg(feature = "flex")]
mod flex {
    use super::BLOCK;
    use crate::kernels::simd::{exp, max, sum_map};
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::autodiff::{Autodiff, NodeId};
    use burn::backend::flex::{Flex, FlexTensor};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{backend_extension, Dispatch};
    use burn::tensor::{Tensor, TensorData};
    use rayon::prelude::*;

    #[backend_extension(Flex, Autodiff)]
    pub trait CausalAttentionOps: burn::backend::Backend {
        fn causal_attention(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
        ) -> FloatTensor<Self>;
    }

    /// The kernels behind the op: forward with each query row's logsumexp, and backward.
    pub trait CausalAttentionKernels: burn::backend::Backend {
        fn causal_attention_forward(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
        ) -> (FloatTensor<Self>, Vec<f32>);
        /// `(dq, dk, dv)`.
        fn causal_attention_backward(
            inputs: [FloatTensor<Self>; 4],
            logsumexp: &[f32],
            dout: FloatTensor<Self>,
        ) -> [FloatTensor<Self>; 3];
    }

    pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
        let out = <Dispatch as CausalAttentionOps>::causal_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
        );
        Tensor::from_dispatch(out)
    }

    /// Whether the kernel takes these shapes (the composition handles, or refuses, the rest).
    pub fn shapes_fit(q: &[usize; 4], k: &[usize; 4], v: &[usize; 4]) -> bool {
        k == v
            && q[0] == k[0]
            && q[3] == k[3]
            && k[1] > 0
            && q[1].is_multiple_of(k[1])
            && k[2] >= q[2]
            && q[2] > 0
    }

    /// Sizes of one call: batch, query heads, key/value heads, query and key lengths, head dim.
    #[derive(Clone, Copy)]
    struct Dims {
        b: usize,
        h: usize,
        kvh: usize,
        tq: usize,
        tk: usize,
        d: usize,
    }

    impl Dims {
        fn of(q: &FlexTensor, k: &FlexTensor) -> Self {
            let (qs, ks) = (q.layout().shape(), k.layout().shape());
            Self {
                b: qs[0],
                h: qs[1],
                kvh: ks[1],
                tq: qs[2],
                tk: ks[2],
                d: qs[3],
            }
        }
        fn groups(&self) -> usize {
            self.h / self.kvh
        }
        /// Keys visible to query row `i` (all up to its position in the sequence).
        fn visible(&self, i: usize) -> usize {
            (i + 1 + self.tk - self.tq).min(self.tk)
        }
        fn scale(&self) -> f32 {
            1.0 / (self.d as f32).sqrt()
        }
        /// Heads one thread takes at least: enough that waking a thread pays (decoding one
        /// token touches a few thousand values per head, less than a wake-up costs).
        fn heads_per_task(&self) -> usize {
            const WORTH_A_THREAD: usize = 1 << 20;
            let per_head = (self.tq * self.tk * self.d).max(1);
            WORTH_A_THREAD.div_ceil(per_head)
        }
    }

    /// A 4-d tensor read in place: its storage, start and strides, the last dimension
    /// contiguous (a copy is made only when it is not, or a stride is negative).
    struct Strided {
        tensor: FlexTensor,
        start: usize,
        strides: [usize; 3],
    }

    impl Strided {
        fn new(t: FlexTensor) -> Self {
            let ok = |t: &FlexTensor| {
                let s = t.layout().strides();
                s.len() == 4 && s[3] == 1 && s.iter().all(|&x| x >= 0)
            };
            let tensor = if ok(&t) { t } else { t.to_contiguous() };
            let s = tensor.layout().strides();
            let strides = [s[0] as usize, s[1] as usize, s[2] as usize];
            Self {
                start: tensor.layout().start_offset(),
                strides,
                tensor,
            }
        }
        /// Head `head` of batch row `batch`: its values from the first row on, and its row
        /// stride.
        fn head(&self, batch: usize, head: usize) -> (&[f32], usize) {
            let all = self.tensor.storage::<f32>();
            let at = self.start + batch * self.strides[0] + head * self.strides[1];
            (all.get(at..).unwrap_or(&[]), self.strides[2])
        }
    }

    /// A matrix operand: values, (column stride, row stride) in elements.
    type Operand<'a> = (&'a [f32], (isize, isize));

    /// `dst[m, n] (+)= scale · lhs[m, k] · rhs[k, n]`, `dst` row-major with row stride `n`;
    /// accumulates when `accumulate`.
    fn gemm(
        dst: &mut [f32],
        (m, n, k): (usize, usize, usize),
        lhs: Operand,
        rhs: Operand,
        scale: f32,
        accumulate: bool,
    ) {
        assert!(dst.len() >= m * n);
        // SAFETY: `dst` holds the m·n values written, row stride n.
        unsafe {
            gemm_raw(
                (dst.as_mut_ptr(), n),
                (m, n, k),
                lhs,
                rhs,
                scale,
                accumulate,
            )
        }
    }

    /// As [`gemm`], into `dst` rows `dst.1` apart.
    ///
    /// # Safety
    /// `dst.0` must address `m` rows of `n` writable values, `dst.1` apart, that no other
    /// thread touches during the call.
    unsafe fn gemm_raw(
        (dst, dst_rs): (*mut f32, usize),
        (m, n, k): (usize, usize, usize),
        (lhs, lhs_strides): Operand,
        (rhs, rhs_strides): Operand,
        scale: f32,
        accumulate: bool,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !accumulate {
                for r in 0..m {
                    // SAFETY: row r of the destination, as the caller guarantees.
                    unsafe { std::slice::from_raw_parts_mut(dst.add(r * dst_rs), n) }.fill(0.0);
                }
            }
            return;
        }
        // SAFETY: the destination as the caller guarantees; every caller slices `lhs` and
        // `rhs` from the start of a matrix whose m·k and k·n values the strides address inside
        // the slice (the tensors' own layouts, or scratch sized for the block).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst,
                1,
                dst_rs as isize,
                accumulate,
                lhs.as_ptr(),
                lhs_strides.0,
                lhs_strides.1,
                rhs.as_ptr(),
                rhs_strides.0,
                rhs_strides.1,
                1.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }

    /// A pointer the forward's tasks share: each writes the rows of its own head.
    #[derive(Clone, Copy)]
    struct Rows(*mut f32);
    // SAFETY: tasks write disjoint rows (one head each) and the buffer outlives them.
    unsafe impl Send for Rows {}
    unsafe impl Sync for Rows {}

    impl Rows {
        /// The value `offset` places on.
        ///
        /// # Safety
        /// `offset` must stay inside the buffer.
        unsafe fn at(self, offset: usize) -> *mut f32 {
            // SAFETY: as the caller guarantees.
            unsafe { self.0.add(offset) }
        }
    }

    /// Row-major `[.., cols]` with row stride `rs`, read as is or transposed.
    fn rows(rs: usize) -> (isize, isize) {
        (1, rs as isize)
    }
    fn transposed(rs: usize) -> (isize, isize) {
        (rs as isize, 1)
    }

    /// Forward of one query head: its rows of `out` (`d` values each, `out_rs` apart) and each
    /// row's logsumexp.
    fn forward_head(
        dims: Dims,
        (q, q_rs): (&[f32], usize),
        (k, k_rs): (&[f32], usize),
        (v, v_rs): (&[f32], usize),
        (out, out_rs): (Rows, usize),
        lse: &mut [f32],
    ) {
        let Dims { tq, d, .. } = dims;
        let mut scores = vec![0.0f32; BLOCK.min(tq) * dims.tk];
        for start in (0..tq).step_by(BLOCK) {
            let n = BLOCK.min(tq - start);
            let keys = dims.visible(start + n - 1);
            let s = &mut scores[..n * keys];
            let q_block = &q[start * q_rs..];
            gemm(
                s,
                (n, keys, d),
                (q_block, rows(q_rs)),
                (k, transposed(k_rs)),
                dims.scale(),
                false,
            );
            for (r, row) in s.chunks_exact_mut(keys).enumerate() {
                let (seen, hidden) = row.split_at_mut(dims.visible(start + r));
                let m = max(seen);
                seen.iter_mut().for_each(|x| *x = exp(*x - m));
                let sum = sum_map(seen, |x| x);
                seen.iter_mut().for_each(|x| *x /= sum);
                hidden.fill(0.0);
                lse[start + r] = m + sum.ln();
            }
            // SAFETY: rows start..start + n of this head, which only this task writes.
            unsafe {
                let dst = out.at(start * out_rs);
                gemm_raw(
                    (dst, out_rs),
                    (n, d, keys),
                    (s, rows(keys)),
                    (v, rows(v_rs)),
                    1.0,
                    false,
                );
            }
        }
    }

    /// Gradients of one key/value head and its group of query heads, accumulated over the
    /// group into `dk`, `dv` (`[tk, d]`) and written into `dq` (`[groups, tq, d]`).
    #[allow(clippy::too_many_arguments)]
    fn backward_kv_head(
        dims: Dims,
        queries: &[(&[f32], usize)],
        (k, k_rs): (&[f32], usize),
        (v, v_rs): (&[f32], usize),
        outs: &[(&[f32], usize)],
        douts: &[(&[f32], usize)],
        lses: &[f32],
        [dq, dk, dv]: [&mut [f32]; 3],
    ) {
        let Dims { tq, d, .. } = dims;
        let mut p = vec![0.0f32; BLOCK.min(tq) * dims.tk];
        let mut ds = p.clone();
        dk.fill(0.0);
        dv.fill(0.0);
        for (g, &(q, q_rs)) in queries.iter().enumerate() {
            let head = g * tq;
            for start in (0..tq).step_by(BLOCK) {
                let n = BLOCK.min(tq - start);
                let keys = dims.visible(start + n - 1);
                let (p, ds) = (&mut p[..n * keys], &mut ds[..n * keys]);
                let q_block = &q[start * q_rs..];
                let ((o, o_rs), (dout, do_rs)) = (outs[g], douts[g]);
                let (o, dout) = (&o[start * o_rs..], &dout[start * do_rs..]);
                // The block's probabilities, again, from the kept logsumexp.
                gemm(
                    p,
                    (n, keys, d),
                    (q_block, rows(q_rs)),
                    (k, transposed(k_rs)),
                    dims.scale(),
                    false,
                );
                for (r, row) in p.chunks_exact_mut(keys).enumerate() {
                    let (seen, hidden) = row.split_at_mut(dims.visible(start + r));
                    let lse = lses[head + start + r];
                    seen.iter_mut().for_each(|x| *x = exp(*x - lse));
                    hidden.fill(0.0);
                }
                // dv += pᵀ · dout;  dp = dout · vᵀ
                gemm(
                    dv,
                    (keys, d, n),
                    (p, transposed(keys)),
                    (dout, rows(do_rs)),
                    1.0,
                    true,
                );
                gemm(
                    ds,
                    (n, keys, d),
                    (dout, rows(do_rs)),
                    (v, transposed(v_rs)),
                    1.0,
                    false,
                );
                // ds = p ∘ (dp − Σ dout∘out) / √d: the softmax backward, row by row.
                for r in 0..n {
                    let (o_r, do_r) = (&o[r * o_rs..r * o_rs + d], &dout[r * do_rs..r * do_rs + d]);
                    let dot: f32 = o_r.iter().zip(do_r).map(|(a, b)| a * b).sum();
                    let (p_r, ds_r) = (
                        &p[r * keys..(r + 1) * keys],
                        &mut ds[r * keys..(r + 1) * keys],
                    );
                    for (s, &pv) in ds_r.iter_mut().zip(p_r) {
                        *s = pv * (*s - dot) * dims.scale();
                    }
                }
                // dq = ds · k;  dk += dsᵀ · q
                let dq_block = &mut dq[(head + start) * d..];
                gemm(
                    dq_block,
                    (n, d, keys),
                    (ds, rows(keys)),
                    (k, rows(k_rs)),
                    1.0,
                    false,
                );
                gemm(
                    dk,
                    (keys, d, n),
                    (ds, transposed(keys)),
                    (q_block, rows(q_rs)),
                    1.0,
                    true,
                );
            }
        }
    }

    fn tensor(values: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    impl CausalAttentionKernels for Flex {
        fn causal_attention_forward(
            q: FlexTensor,
            k: FlexTensor,
            v: FlexTensor,
        ) -> (FlexTensor, Vec<f32>) {
            let dims = Dims::of(&q, &k);
            let Dims { b, h, tq, d, .. } = dims;
            let (q, k, v) = (Strided::new(q), Strided::new(k), Strided::new(v));
            // Written as [b, tq, h, d] and returned as its [b, h, tq, d] view: the caller's next
            // step (heads back into the hidden size) is then a reshape, not a copy.
            let mut out = vec![0.0f32; b * tq * h * d];
            let mut lse = vec![0.0f32; b * h * tq];
            let (base, out_rs) = (Rows(out.as_mut_ptr()), h * d);
            let arch = pulp::Arch::new();
            lse.par_chunks_mut(tq)
                .with_min_len(dims.heads_per_task())
                .enumerate()
                .for_each(|(bh, lse)| {
                    let (bi, hi) = (bh / h, bh % h);
                    let kv = hi / dims.groups();
                    // SAFETY: the first row of head hi in batch row bi, inside `out`.
                    let head = Rows(unsafe { base.at(bi * tq * out_rs + hi * d) });
                    arch.dispatch(|| {
                        forward_head(
                            dims,
                            q.head(bi, hi),
                            k.head(bi, kv),
                            v.head(bi, kv),
                            (head, out_rs),
                            lse,
                        )
                    });
                });
            (tensor(out, [b, tq, h, d]).transpose(1, 2), lse)
        }

        fn causal_attention_backward(
            [q, k, v, out]: [FlexTensor; 4],
            logsumexp: &[f32],
            dout: FlexTensor,
        ) -> [FlexTensor; 3] {
            let dims = Dims::of(&q, &k);
            let Dims {
                b,
                h,
                kvh,
                tq,
                tk,
                d,
            } = dims;
            let groups = dims.groups();
            let (q, k, v) = (Strided::new(q), Strided::new(k), Strided::new(v));
            let (out, dout) = (Strided::new(out), Strided::new(dout));
            let mut dq = vec![0.0f32; b * h * tq * d];
            let mut dk = vec![0.0f32; b * kvh * tk * d];
            let mut dv = vec![0.0f32; b * kvh * tk * d];
            let per_group = groups * tq * d;
            let arch = pulp::Arch::new();
            dq.par_chunks_mut(per_group)
                .zip(dk.par_chunks_mut(tk * d))
                .zip(dv.par_chunks_mut(tk * d))
                .with_min_len(dims.heads_per_task())
                .enumerate()
                .for_each(|(bk, ((dq, dk), dv))| {
                    let (bi, kv) = (bk / kvh, bk % kvh);
                    let first = bi * h + kv * groups;
                    let queries: Vec<(&[f32], usize)> =
                        (0..groups).map(|g| q.head(bi, kv * groups + g)).collect();
                    let outs: Vec<(&[f32], usize)> =
                        (0..groups).map(|g| out.head(bi, kv * groups + g)).collect();
                    let douts: Vec<(&[f32], usize)> = (0..groups)
                        .map(|g| dout.head(bi, kv * groups + g))
                        .collect();
                    let lses = &logsumexp[first * tq..(first + groups) * tq];
                    arch.dispatch(|| {
                        backward_kv_head(
                            dims,
                            &queries,
                            k.head(bi, kv),
                            v.head(bi, kv),
                            &outs,
                            &douts,
                            lses,
                            [dq, dk, dv],
                        )
                    });
                });
            [
                tensor(dq, [b, h, tq, d]),
                tensor(dk, [b, kvh, tk, d]),
                tensor(dv, [b, kvh, tk, d]),
            ]
        }
    }

    impl CausalAttentionOps for Flex {
        fn causal_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor) -> FlexTensor {
            Self::causal_attention_forward(q, k, v).0
        }
    }

    impl<B: CausalAttentionOps + CausalAttentionKernels, C: CheckpointStrategy> CausalAttentionOps
        for Autodiff<B, C>
    {
        fn causal_attention(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            #[derive(Debug)]
            struct AttentionBackward;

            impl<B: CausalAttentionOps + CausalAttentionKernels> Backward<B, 3> for AttentionBackward {
                /// q, k, v, the output and each query row's logsumexp.
                type State = (NodeId, NodeId, NodeId, FloatTensor<B>, Vec<f32>);

                fn backward(
                    self,
                    ops: Ops<Self::State, 3>,
                    grads: &mut Gradients,
                    checkpointer: &mut Checkpointer,
                ) {
                    let dout = grads.consume::<B>(&ops.node);
                    let (q, k, v, out, lse) = ops.state;
                    let q: FloatTensor<B> = checkpointer.retrieve_node_output(q);
                    let k: FloatTensor<B> = checkpointer.retrieve_node_output(k);
                    let v: FloatTensor<B> = checkpointer.retrieve_node_output(v);
                    let grads_of = B::causal_attention_backward([q, k, v, out], &lse, dout);
                    for (parent, grad) in ops.parents.into_iter().zip(grads_of) {
                        if let Some(node) = parent {
                            grads.register::<B>(node.id, grad);
                        }
                    }
                }
            }

            match AttentionBackward
                .prepare::<C>([q.node(), k.node(), v.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let state = (
                        prep.checkpoint(&q),
                        prep.checkpoint(&k),
                        prep.checkpoint(&v),
                    );
                    let (out, lse) = B::causal_attention_forward(
                        q.into_primitive(),
                        k.into_primitive(),
                        v.into_primitive(),
                    );
                    prep.finish((state.0, state.1, state.2, out.clone(), lse), out)
                }
                OpsKind::UnTracked(prep) => prep.finish(B::causal_attention(
                    q.into_primitive(),
                    k.into_primitive(),
                    v.into_primitive(),
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    type Run = [Vec<f32>; 4];

    /// Output and gradients of q, k, v under a random projection of the output.
    fn run(
        f: fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>,
        q: [usize; 4],
        kv: [usize; 4],
    ) -> Run {
        let device = Device::default().autodiff();
        let make = |seed: u64, shape: [usize; 4]| {
            let v = crate::kernels::test_values(seed, shape.iter().product(), 4.0);
            Tensor::<4>::from_data(TensorData::new(v, shape), &device).require_grad()
        };
        let (q_t, k_t, v_t) = (make(1, q), make(2, kv), make(3, kv));
        let weights = make(4, q).detach();
        let y = f(q_t.clone(), k_t.clone(), v_t.clone());
        let grads = (y.clone() * weights).sum().backward();
        let host = |t: Tensor<4>| t.into_data().iter::<f32>().collect::<Vec<_>>();
        let grad = |t: &Tensor<4>| t.grad(&grads).map(host).unwrap_or_default();
        [host(y), grad(&q_t), grad(&k_t), grad(&v_t)]
    }

    /// As the model calls it: q, k, v heads of one fused projection (v read in place as a
    /// strided view), the output's heads put back side by side before the next product.
    fn run_as_in_the_model(
        f: fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>,
        (b, h, t, d): (usize, usize, usize, usize),
    ) -> [Vec<f32>; 2] {
        let device = Device::default().autodiff();
        let width = 3 * h * d;
        let v = crate::kernels::test_values(7, b * t * width, 4.0);
        let qkv = Tensor::<3>::from_data(TensorData::new(v, [b, t, width]), &device).require_grad();
        let heads = |i: usize| {
            qkv.clone()
                .narrow(2, i * h * d, h * d)
                .reshape([b, t, h, d])
                .swap_dims(1, 2)
        };
        let (q, k) = (heads(0) * 1.0, heads(1) * 1.0);
        let y = f(q, k, heads(2)).swap_dims(1, 2).reshape([b, t, h * d]);
        let weights = Tensor::<3>::from_data(
            TensorData::new(
                crate::kernels::test_values(8, b * t * h * d, 2.0),
                [b, t, h * d],
            ),
            &device,
        );
        let grads = (y.clone() * weights).sum().backward();
        let host = |t: Tensor<3>| t.into_data().iter::<f32>().collect::<Vec<_>>();
        [host(y), qkv.grad(&grads).map(host).unwrap_or_default()]
    }

    #[test]
    fn the_kernel_matches_the_composition_on_the_models_layouts() {
        for shape in [(2, 4, 64, 32), (3, 2, 100, 16)] {
            let got = run_as_in_the_model(causal_attention, shape);
            let want = run_as_in_the_model(causal_attention_reference, shape);
            for (what, (a, w)) in ["out", "dqkv"].iter().zip(got.iter().zip(&want)) {
                crate::kernels::assert_close(&format!("{what} {shape:?}"), a, w, 2e-5);
            }
        }
    }

    #[test]
    fn the_kernel_matches_the_composition_forward_and_backward() {
        #[cfg(feature = "flex")]
        assert!(
            crate::kernels::has_kernel(&Device::default()),
            "the kernel is not in use"
        );
        // (batch, heads, kv heads, tq, tk, head_dim): one row; blocks that do not divide the
        // sequence; grouped-query heads; fewer queries than keys (a chunk after a cache); odd
        // head widths.
        for (b, h, kvh, tq, tk, d) in [
            (1, 1, 1, 1, 1, 1),
            (2, 2, 2, 5, 5, 3),
            (1, 4, 2, 70, 70, 16),
            (2, 6, 3, 130, 130, 17),
            (1, 2, 1, 3, 9, 8),
            (1, 3, 3, 1, 40, 32),
        ] {
            let got = run(causal_attention, [b, h, tq, d], [b, kvh, tk, d]);
            let want = run(causal_attention_reference, [b, h, tq, d], [b, kvh, tk, d]);
            for (what, (a, w)) in ["out", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                let case = format!("{what} {b}x{h}/{kvh}x{tq}/{tk}x{d}");
                crate::kernels::assert_close(&case, a, w, 2e-5);
            }
        }
    }
}
