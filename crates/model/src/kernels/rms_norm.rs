//! RMSNorm over the last dimension, `x · w / sqrt(mean(x²) + eps)`, as one op: one pass per row
//! forward, keeping each row's `1/rms`; backward `dx = r·(dy·w − x̂·mean(dy·w·x̂))` and
//! `dw = Σ_rows dy·x̂` in one pass more — instead of a square, a mean, a sqrt, a reciprocal and
//! two products, each a full read and write forward and again backward.

use burn::tensor::Tensor;

/// RMSNorm of `x` (normalised over its last dimension) with gain `weight`: the kernel where
/// the backend has one, else [`rms_norm_reference`].
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if super::runs_on(&x) {
        let dims = x.dims();
        let cols = dims[D - 1];
        let rows = dims.iter().product::<usize>() / cols.max(1);
        let y = flex::rms_norm(x.reshape([rows, cols]), weight, eps);
        return y.reshape(dims);
    }
    rms_norm_reference(x, weight, eps)
}

/// The plain Burn composition.
pub fn rms_norm_reference<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    let mean_square = x.clone().powi_scalar(2).mean_dim(D - 1);
    let x = x * (mean_square + eps).sqrt().recip();
    x * weight.unsqueeze()
}

#[cfg(feature = "flex")]
mod flex {
    use crate::kernels::flex_tensor::contiguous;
    use crate::kernels::simd::sum_map;
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

    /// Rows per parallel task of the weight gradient: fixed, so the sum's order (and so its
    /// bits) does not depend on the thread count.
    const ROWS_PER_TASK: usize = 64;

    #[backend_extension(Flex, Autodiff)]
    pub trait RmsNormOps: burn::backend::Backend {
        fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64)
            -> FloatTensor<Self>;
    }

    /// The kernels behind the op: forward keeping each row's `1/rms`, and backward `(dx, dw)`.
    pub trait RmsNormKernels: burn::backend::Backend {
        fn rms_norm_forward(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            eps: f64,
        ) -> (FloatTensor<Self>, Vec<f32>);
        fn rms_norm_backward(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            inv_rms: &[f32],
            dy: FloatTensor<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>);
    }

    pub fn rms_norm(x: Tensor<2>, weight: Tensor<1>, eps: f64) -> Tensor<2> {
        let out =
            <Dispatch as RmsNormOps>::rms_norm(x.into_dispatch(), weight.into_dispatch(), eps);
        Tensor::from_dispatch(out)
    }

    fn cols_of(x: &FlexTensor) -> usize {
        x.layout().shape()[1].max(1)
    }

    impl RmsNormKernels for Flex {
        fn rms_norm_forward(x: FlexTensor, weight: FlexTensor, eps: f64) -> (FlexTensor, Vec<f32>) {
            let (x, weight) = (contiguous(x), contiguous(weight));
            let shape = x.layout().shape().clone();
            let cols = cols_of(&x);
            let (xs, w) = (
                x.as_slice::<f32>().unwrap_or(&[]),
                weight.as_slice::<f32>().unwrap_or(&[]),
            );
            let mut y = vec![0.0f32; xs.len()];
            let mut inv_rms = vec![0.0f32; xs.len() / cols];
            let arch = pulp::Arch::new();
            y.par_chunks_mut(cols)
                .zip(xs.par_chunks(cols))
                .zip(inv_rms.par_iter_mut())
                .for_each(|((y, x), r)| {
                    arch.dispatch(|| {
                        let mean_square = sum_map(x, |v| v * v) / cols as f32;
                        *r = 1.0 / (mean_square + eps as f32).sqrt();
                        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                            *y = x * *r * w;
                        }
                    })
                });
            (FlexTensor::from_data(TensorData::new(y, shape)), inv_rms)
        }

        fn rms_norm_backward(
            x: FlexTensor,
            weight: FlexTensor,
            inv_rms: &[f32],
            dy: FlexTensor,
        ) -> (FlexTensor, FlexTensor) {
            let (x, weight, dy) = (contiguous(x), contiguous(weight), contiguous(dy));
            let shape = x.layout().shape().clone();
            let cols = cols_of(&x);
            let (xs, w, dys) = (
                x.as_slice::<f32>().unwrap_or(&[]),
                weight.as_slice::<f32>().unwrap_or(&[]),
                dy.as_slice::<f32>().unwrap_or(&[]),
            );
            let mut dx = vec![0.0f32; xs.len()];
            let arch = pulp::Arch::new();
            // Each task: its rows' dx, and its rows' share of dw.
            let partial_dw: Vec<Vec<f32>> = dx
                .par_chunks_mut(cols * ROWS_PER_TASK)
                .zip(xs.par_chunks(cols * ROWS_PER_TASK))
                .zip(dys.par_chunks(cols * ROWS_PER_TASK))
                .zip(inv_rms.par_chunks(ROWS_PER_TASK))
                .map(|(((dx, x), dy), r)| {
                    arch.dispatch(|| {
                        let mut dw = vec![0.0f32; cols];
                        for (((dx, x), dy), &r) in dx
                            .chunks_mut(cols)
                            .zip(x.chunks(cols))
                            .zip(dy.chunks(cols))
                            .zip(r)
                        {
                            // mean(dy·w·x̂) with x̂ = x·r.
                            let mut dot = 0.0f32;
                            for k in 0..cols {
                                dot += dy[k] * w[k] * x[k];
                            }
                            let c = dot * r * r / cols as f32;
                            for k in 0..cols {
                                dx[k] = r * (dy[k] * w[k] - x[k] * c);
                                dw[k] += dy[k] * x[k] * r;
                            }
                        }
                        dw
                    })
                })
                .collect();
            let mut dw = vec![0.0f32; cols];
            for part in &partial_dw {
                for (d, p) in dw.iter_mut().zip(part) {
                    *d += p;
                }
            }
            (
                FlexTensor::from_data(TensorData::new(dx, shape)),
                FlexTensor::from_data(TensorData::new(dw, [cols])),
            )
        }
    }

    impl RmsNormOps for Flex {
        fn rms_norm(x: FlexTensor, weight: FlexTensor, eps: f64) -> FlexTensor {
            Self::rms_norm_forward(x, weight, eps).0
        }
    }

    impl<B: RmsNormOps + RmsNormKernels, C: CheckpointStrategy> RmsNormOps for Autodiff<B, C> {
        fn rms_norm(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            eps: f64,
        ) -> FloatTensor<Self> {
            #[derive(Debug)]
            struct RmsNormBackward;

            impl<B: RmsNormOps + RmsNormKernels> Backward<B, 2> for RmsNormBackward {
                type State = (NodeId, NodeId, Vec<f32>);

                fn backward(
                    self,
                    ops: Ops<Self::State, 2>,
                    grads: &mut Gradients,
                    checkpointer: &mut Checkpointer,
                ) {
                    let [node_x, node_w] = ops.parents;
                    let dy = grads.consume::<B>(&ops.node);
                    let (x_state, w_state, inv_rms) = ops.state;
                    let x: FloatTensor<B> = checkpointer.retrieve_node_output(x_state);
                    let w: FloatTensor<B> = checkpointer.retrieve_node_output(w_state);
                    let (dx, dw) = B::rms_norm_backward(x, w, &inv_rms, dy);
                    if let Some(node) = node_x {
                        grads.register::<B>(node.id, dx);
                    }
                    if let Some(node) = node_w {
                        grads.register::<B>(node.id, dw);
                    }
                }
            }

            match RmsNormBackward
                .prepare::<C>([x.node(), weight.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let (x_state, w_state) = (prep.checkpoint(&x), prep.checkpoint(&weight));
                    let (y, inv_rms) =
                        B::rms_norm_forward(x.into_primitive(), weight.into_primitive(), eps);
                    prep.finish((x_state, w_state, inv_rms), y)
                }
                OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(
                    x.into_primitive(),
                    weight.into_primitive(),
                    eps,
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn run(f: fn(Tensor<3>, Tensor<1>, f64) -> Tensor<3>, shape: [usize; 3]) -> [Vec<f32>; 3] {
        let device = Device::default().autodiff();
        let make = |seed: u64, len: usize| crate::kernels::test_values(seed, len, 4.0);
        let n: usize = shape.iter().product();
        let x = Tensor::<3>::from_data(TensorData::new(make(1, n), shape), &device).require_grad();
        let w = Tensor::<1>::from_data(TensorData::new(make(2, shape[2]), [shape[2]]), &device)
            .require_grad();
        let r = Tensor::<3>::from_data(TensorData::new(make(3, n), shape), &device);
        let y = f(x.clone(), w.clone(), 1e-6);
        let grads = (y.clone() * r).sum().backward();
        let host3 = |t: Tensor<3>| t.into_data().iter::<f32>().collect::<Vec<_>>();
        let host1 = |t: Tensor<1>| t.into_data().iter::<f32>().collect::<Vec<_>>();
        [
            host3(y),
            x.grad(&grads).map(host3).unwrap_or_default(),
            w.grad(&grads).map(host1).unwrap_or_default(),
        ]
    }

    #[test]
    fn the_kernel_matches_the_composition_forward_and_backward() {
        for shape in [[1, 1, 1], [2, 3, 17], [4, 100, 384], [1, 1, 4096]] {
            let got = run(rms_norm, shape);
            let want = run(rms_norm_reference, shape);
            for (what, (a, b)) in ["y", "dx", "dw"].iter().zip(got.iter().zip(&want)) {
                crate::kernels::assert_close(&format!("{what} {shape:?}"), a, b, 1e-4);
            }
        }
    }
}
