//! Grouped matmul: the rows of `x` `[tokens, k]`, sorted into consecutive groups, each
//! multiplied by its own matrix of a stacked weight `[groups, k, n]` — every routed expert of an
//! MoE layer in one op, with no padding and no per-expert loop of small ops. Its backward is two
//! more grouped products: `dx = grouped(dy, wᵀ)` and `dw[g] = x_gᵀ · dy_g`.
//!
//! `offsets` has one entry more than there are groups: group `g` is rows
//! `offsets[g]..offsets[g + 1]`. Groups may be empty.

use burn::tensor::Tensor;

/// `y[rows of g] = x[rows of g] · w[g]` (or `· w[g]ᵀ` when `transpose_w`, for `w` stored
/// `[groups, n, k]`). The kernel on backends that have one, else [`grouped_matmul_reference`].
pub fn grouped_matmul(
    x: Tensor<2>,
    w: Tensor<3>,
    offsets: &[usize],
    transpose_w: bool,
) -> Tensor<2> {
    #[cfg(feature = "flex")]
    if super::runs_on(&x) {
        return flex::grouped_matmul(x, w, offsets, transpose_w);
    }
    grouped_matmul_reference(x, w, offsets, transpose_w)
}

/// The plain Burn composition: one matmul per non-empty group, concatenated.
pub fn grouped_matmul_reference(
    x: Tensor<2>,
    w: Tensor<3>,
    offsets: &[usize],
    transpose_w: bool,
) -> Tensor<2> {
    let [_, k, n] = w.dims();
    let n_out = if transpose_w { k } else { n };
    let parts: Vec<Tensor<2>> = offsets
        .windows(2)
        .enumerate()
        .filter(|(_, r)| r[1] > r[0])
        .map(|(g, r)| {
            let w_g = w.clone().narrow(0, g, 1).reshape([k, n]);
            let w_g = if transpose_w { w_g.transpose() } else { w_g };
            x.clone().narrow(0, r[0], r[1] - r[0]).matmul(w_g)
        })
        .collect();
    if parts.is_empty() {
        return Tensor::zeros([0, n_out], &x.device());
    }
    Tensor::cat(parts, 0)
}

/// Host helper for tests: the group offsets of per-group row counts.
pub fn offsets_of(counts: &[usize]) -> Vec<usize> {
    let mut offsets = Vec::with_capacity(counts.len() + 1);
    offsets.push(0);
    for c in counts {
        offsets.push(offsets.last().copied().unwrap_or(0) + c);
    }
    offsets
}

#[cfg(feature = "flex")]
mod flex {
    //! The flex (CPU) kernel: one `gemm` call per group into one output buffer, the groups
    //! spread over rayon's threads (or, with fewer busy groups than threads, each gemm
    //! multi-threaded), and the autodiff backward through the same kernels.

    use crate::kernels::flex_tensor::contiguous;
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
    use std::mem::MaybeUninit;

    /// Grouped matmul as a backend op.
    #[backend_extension(Flex, Autodiff)]
    pub trait GroupedMatmul: burn::backend::Backend {
        fn grouped_matmul(
            x: FloatTensor<Self>,
            w: FloatTensor<Self>,
            offsets: Vec<usize>,
            transpose_w: bool,
        ) -> FloatTensor<Self>;
    }

    /// What the backward needs besides the forward op: `dw[g] = x_gᵀ · dy_g`.
    pub trait GroupedWeightGrad: burn::backend::Backend {
        fn grouped_weight_grad(
            x: FloatTensor<Self>,
            dy: FloatTensor<Self>,
            offsets: Vec<usize>,
        ) -> FloatTensor<Self>;
    }

    pub fn grouped_matmul(
        x: Tensor<2>,
        w: Tensor<3>,
        offsets: &[usize],
        transpose_w: bool,
    ) -> Tensor<2> {
        let out = <Dispatch as GroupedMatmul>::grouped_matmul(
            x.into_dispatch(),
            w.into_dispatch(),
            offsets.to_vec(),
            transpose_w,
        );
        Tensor::from_dispatch(out)
    }

    /// A contiguous f32 view of `t` (copied only when it is not one already).
    fn dims(t: &FlexTensor) -> Vec<usize> {
        t.layout().shape().iter().copied().collect()
    }

    /// Row-major strides of a `[rows, cols]` matrix, or of its transpose read in place.
    fn strides(cols: usize, transposed: bool) -> (isize, isize) {
        // (column stride, row stride) as gemm takes them.
        if transposed {
            (cols as isize, 1)
        } else {
            (1, cols as isize)
        }
    }

    /// A buffer of `len` floats left unwritten: every product below overwrites its whole
    /// destination, so zero-filling it first (a pass over the expert weights' gradient every
    /// micro-batch) would be wasted.
    fn unwritten(len: usize) -> Vec<MaybeUninit<f32>> {
        let mut buf = Vec::with_capacity(len);
        // SAFETY: `MaybeUninit` needs no initialisation.
        unsafe { buf.set_len(len) };
        buf
    }

    /// The buffer once every value has been written.
    ///
    /// # Safety
    /// Every element of `buf` must have been written.
    unsafe fn written(buf: Vec<MaybeUninit<f32>>) -> Vec<f32> {
        let mut buf = std::mem::ManuallyDrop::new(buf);
        let (ptr, len, cap) = (buf.as_mut_ptr(), buf.len(), buf.capacity());
        // SAFETY: same layout; initialised per the caller's promise; ownership moves over.
        unsafe { Vec::from_raw_parts(ptr as *mut f32, len, cap) }
    }

    /// One product `dst[m, n] = lhs[m, k] · rhs[k, n]` with the given (column, row) strides,
    /// writing every value of `dst`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_into(
        dst: &mut [MaybeUninit<f32>],
        (m, n, k): (usize, usize, usize),
        lhs: &[f32],
        (lhs_cs, lhs_rs): (isize, isize),
        rhs: &[f32],
        (rhs_cs, rhs_rs): (isize, isize),
        threads: gemm::Parallelism,
    ) {
        debug_assert_eq!(dst.len(), m * n);
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            dst.fill(MaybeUninit::new(0.0));
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::bf16_matmul::bf16_enabled() {
            dst.fill(MaybeUninit::new(0.0));
            // SAFETY: every value was just written.
            let dst = unsafe { &mut *(dst as *mut [MaybeUninit<f32>] as *mut [f32]) };
            use crate::kernels::bf16_gemm::{matmul, Mat};
            let mat = |data, rows, cols, (cs, rs): (isize, isize)| Mat {
                data,
                rows,
                cols,
                row_stride: rs as usize,
                col_stride: cs as usize,
            };
            let (a, b) = (
                mat(lhs, m, k, (lhs_cs, lhs_rs)),
                mat(rhs, k, n, (rhs_cs, rhs_rs)),
            );
            matmul(dst, a, b, false);
            return;
        }
        // SAFETY: `dst` holds m·n values written row-major, never read (`read_dst` false);
        // `lhs` and `rhs` hold the m·k and k·n values the strides address (checked by the
        // callers' slicing).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr() as *mut f32,
                1,
                n as isize,
                false,
                lhs.as_ptr(),
                lhs_cs,
                lhs_rs,
                rhs.as_ptr(),
                rhs_cs,
                rhs_rs,
                0.0,
                1.0,
                false,
                false,
                false,
                threads,
            );
        }
    }

    /// Splits `buf` into consecutive chunks of the given lengths.
    fn split_lengths<T>(mut buf: &mut [T], lengths: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
        let mut out = Vec::new();
        for len in lengths {
            let (head, tail) = buf.split_at_mut(len);
            out.push(head);
            buf = tail;
        }
        out
    }

    /// Runs `work(g, dst_g)` for each group: across threads when enough groups have work,
    /// else one group at a time with a multi-threaded gemm inside.
    fn for_each_group(
        dsts: Vec<&mut [MaybeUninit<f32>]>,
        busy: usize,
        work: impl Fn(usize, &mut [MaybeUninit<f32>], gemm::Parallelism) + Sync,
    ) {
        let threads = rayon::current_num_threads();
        if busy >= threads {
            dsts.into_par_iter()
                .enumerate()
                .for_each(|(g, dst)| work(g, dst, gemm::Parallelism::None));
        } else {
            for (g, dst) in dsts.into_iter().enumerate() {
                work(g, dst, gemm::Parallelism::Rayon(0));
            }
        }
    }

    fn busy_groups(offsets: &[usize]) -> usize {
        offsets.windows(2).filter(|r| r[1] > r[0]).count()
    }

    impl GroupedMatmul for Flex {
        fn grouped_matmul(
            x: FlexTensor,
            w: FlexTensor,
            offsets: Vec<usize>,
            transpose_w: bool,
        ) -> FlexTensor {
            let (x, w) = (contiguous(x), contiguous(w));
            let (xd, wd) = (dims(&x), dims(&w));
            let (rows, k_in) = (xd[0], xd[1]);
            let (groups, a, b) = (wd[0], wd[1], wd[2]);
            let (k, n) = if transpose_w { (b, a) } else { (a, b) };
            assert!(k == k_in && offsets.len() == groups + 1 && offsets[groups] == rows);
            let (xs, ws) = (
                x.as_slice::<f32>().unwrap_or(&[]),
                w.as_slice::<f32>().unwrap_or(&[]),
            );
            // The groups' rows cover every row (offsets run from 0 to `rows`).
            let mut out = unwritten(rows * n);
            let dsts = split_lengths(&mut out, offsets.windows(2).map(|r| (r[1] - r[0]) * n));
            for_each_group(dsts, busy_groups(&offsets), |g, dst, threads| {
                let (start, end) = (offsets[g], offsets[g + 1]);
                gemm_into(
                    dst,
                    (end - start, n, k),
                    &xs[start * k..end * k],
                    strides(k, false),
                    &ws[g * k * n..(g + 1) * k * n],
                    // w[g] is [k, n] row-major, or [n, k] read transposed.
                    if transpose_w {
                        strides(k, true)
                    } else {
                        strides(n, false)
                    },
                    threads,
                );
            });
            // SAFETY: each group's product wrote all of its rows.
            let out = unsafe { written(out) };
            FlexTensor::from_data(TensorData::new(out, [rows, n]))
        }
    }

    impl GroupedWeightGrad for Flex {
        fn grouped_weight_grad(x: FlexTensor, dy: FlexTensor, offsets: Vec<usize>) -> FlexTensor {
            let (x, dy) = (contiguous(x), contiguous(dy));
            let (k, n) = (dims(&x)[1], dims(&dy)[1]);
            let groups = offsets.len() - 1;
            let (xs, dys) = (
                x.as_slice::<f32>().unwrap_or(&[]),
                dy.as_slice::<f32>().unwrap_or(&[]),
            );
            let mut out = unwritten(groups * k * n);
            let dsts = split_lengths(&mut out, (0..groups).map(|_| k * n));
            for_each_group(dsts, busy_groups(&offsets), |g, dst, threads| {
                let (start, end) = (offsets[g], offsets[g + 1]);
                // x_gᵀ is [k, rows] read in place from x_g's [rows, k].
                gemm_into(
                    dst,
                    (k, n, end - start),
                    &xs[start * k..end * k],
                    strides(k, true),
                    &dys[start * n..end * n],
                    strides(n, false),
                    threads,
                );
            });
            // SAFETY: each group's product wrote its whole [k, n] block (zeros for no rows).
            let out = unsafe { written(out) };
            FlexTensor::from_data(TensorData::new(out, [groups, k, n]))
        }
    }

    impl<B: GroupedMatmul + GroupedWeightGrad, C: CheckpointStrategy> GroupedMatmul for Autodiff<B, C> {
        fn grouped_matmul(
            x: FloatTensor<Self>,
            w: FloatTensor<Self>,
            offsets: Vec<usize>,
            transpose_w: bool,
        ) -> FloatTensor<Self> {
            #[derive(Debug)]
            struct GroupedMatmulBackward;

            impl<B: GroupedMatmul + GroupedWeightGrad> Backward<B, 2> for GroupedMatmulBackward {
                type State = (NodeId, NodeId, Vec<usize>, bool);

                fn backward(
                    self,
                    ops: Ops<Self::State, 2>,
                    grads: &mut Gradients,
                    checkpointer: &mut Checkpointer,
                ) {
                    let [node_x, node_w] = ops.parents;
                    let dy = grads.consume::<B>(&ops.node);
                    let (x_state, w_state, offsets, transpose_w) = ops.state;
                    let x: FloatTensor<B> = checkpointer.retrieve_node_output(x_state);
                    let w: FloatTensor<B> = checkpointer.retrieve_node_output(w_state);
                    if let Some(node) = node_w {
                        // dw[g] = x_gᵀ dy_g, or its transpose for w stored [n, k].
                        let dw = if transpose_w {
                            B::grouped_weight_grad(dy.clone(), x.clone(), offsets.clone())
                        } else {
                            B::grouped_weight_grad(x, dy.clone(), offsets.clone())
                        };
                        grads.register::<B>(node.id, dw);
                    }
                    if let Some(node) = node_x {
                        let dx = B::grouped_matmul(dy, w, offsets, !transpose_w);
                        grads.register::<B>(node.id, dx);
                    }
                }
            }

            match GroupedMatmulBackward
                .prepare::<C>([x.node(), w.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let x_state = prep.checkpoint(&x);
                    let w_state = prep.checkpoint(&w);
                    let out = B::grouped_matmul(
                        x.into_primitive(),
                        w.into_primitive(),
                        offsets.clone(),
                        transpose_w,
                    );
                    prep.finish((x_state, w_state, offsets, transpose_w), out)
                }
                OpsKind::UnTracked(prep) => prep.finish(B::grouped_matmul(
                    x.into_primitive(),
                    w.into_primitive(),
                    offsets,
                    transpose_w,
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    /// Output and both gradients of `grouped` on random data, through autodiff.
    fn run(
        grouped: fn(Tensor<2>, Tensor<3>, &[usize], bool) -> Tensor<2>,
        counts: &[usize],
        (k, n): (usize, usize),
        transpose_w: bool,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let device = Device::default().autodiff();
        let rows: usize = counts.iter().sum();
        let seeded = |seed: u64, shape: Vec<usize>| {
            let len: usize = shape.iter().product();
            let values = crate::kernels::test_values(seed, len, 1.0);
            Tensor::<1>::from_data(TensorData::new(values, [len]), &device)
        };
        let x = seeded(1, vec![rows, k]).reshape([rows, k]).require_grad();
        let w_shape = if transpose_w {
            [counts.len(), n, k]
        } else {
            [counts.len(), k, n]
        };
        let w = seeded(2, w_shape.to_vec()).reshape(w_shape).require_grad();
        let r = seeded(3, vec![rows, n]).reshape([rows, n]);
        let y = grouped(x.clone(), w.clone(), &offsets_of(counts), transpose_w);
        let grads = (y.clone() * r).sum().backward();
        let host = |t: Tensor<2>| t.into_data().iter::<f32>().collect::<Vec<_>>();
        let dx = x.grad(&grads).map(host).unwrap_or_default();
        let dw = w
            .grad(&grads)
            .map(|g| g.into_data().iter::<f32>().collect())
            .unwrap_or_default();
        (host(y), dx, dw)
    }

    fn assert_close(what: &str, a: &[f32], b: &[f32]) {
        crate::kernels::assert_close(what, a, b, 1e-5);
    }

    #[test]
    fn the_kernel_matches_the_composition_forward_and_backward() {
        // Odd widths (not multiples of a SIMD register), empty groups, a one-row group.
        for (counts, shape) in [
            (vec![3, 0, 5, 1, 0, 7], (13, 17)),
            (vec![1], (1, 1)),
            (vec![0, 0, 4], (8, 5)),
            (vec![40, 33, 1, 29], (64, 48)),
        ] {
            for transpose_w in [false, true] {
                let got = run(grouped_matmul, &counts, shape, transpose_w);
                let want = run(grouped_matmul_reference, &counts, shape, transpose_w);
                let what = format!("{counts:?} {shape:?} transposed {transpose_w}");
                assert_close(&format!("y {what}"), &got.0, &want.0);
                assert_close(&format!("dx {what}"), &got.1, &want.1);
                assert_close(&format!("dw {what}"), &got.2, &want.2);
                assert!(
                    got.2.iter().any(|v| *v != 0.0),
                    "no weight gradient: {what}"
                );
            }
        }
    }

    #[test]
    fn empty_groups_get_zero_weight_gradients() {
        let (_, _, dw) = run(grouped_matmul, &[0, 3, 0], (4, 2), false);
        assert!(dw[..8].iter().all(|v| *v == 0.0));
        assert!(dw[16..].iter().all(|v| *v == 0.0));
        assert!(dw[8..16].iter().any(|v| *v != 0.0));
    }
}
