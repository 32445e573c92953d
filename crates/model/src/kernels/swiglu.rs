//! SwiGLU's activation, `silu(gate) · up`, as one op: one pass over the two inputs forward and
//! one backward (`dgate = dy · up · σ(g)(1 + g(1 − σ(g)))`, `dup = dy · silu(g)`), instead of
//! a sigmoid, two products and their backward ops each reading and writing the whole tensor.

use burn::tensor::activation::silu;
use burn::tensor::Tensor;

/// `silu(gate) · up`: the kernel where the backend has one, else [`swiglu_reference`].
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if super::runs_on(&gate) && gate.dims() == up.dims() {
        return flex::swiglu(gate, up);
    }
    swiglu_reference(gate, up)
}

/// The plain Burn composition.
pub fn swiglu_reference<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    silu(gate) * up
}

#[cfg(feature = "flex")]
mod flex {
    use crate::kernels::flex_tensor::contiguous;
    use crate::kernels::simd::{for_chunks, sigmoid};
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::autodiff::{Autodiff, NodeId};
    use burn::backend::flex::{Flex, FlexTensor};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{backend_extension, Dispatch};
    use burn::tensor::{Shape, Tensor, TensorData};

    #[backend_extension(Flex, Autodiff)]
    pub trait SwigluOps: burn::backend::Backend {
        fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    }

    /// The backward kernel: `(dgate, dup)`.
    pub trait SwigluBackward: burn::backend::Backend {
        fn swiglu_backward(
            gate: FloatTensor<Self>,
            up: FloatTensor<Self>,
            dy: FloatTensor<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>);
    }

    pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
        let out = <Dispatch as SwigluOps>::swiglu(gate.into_dispatch(), up.into_dispatch());
        Tensor::from_dispatch(out)
    }

    fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    impl SwigluOps for Flex {
        fn swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
            let (gate, up) = (contiguous(gate), contiguous(up));
            let shape = gate.layout().shape().clone();
            let (g, u) = (
                gate.as_slice::<f32>().unwrap_or(&[]),
                up.as_slice::<f32>().unwrap_or(&[]),
            );
            let mut out = vec![0.0f32; g.len()];
            for_chunks([&mut out], [g, u], |[out], [g, u]| {
                for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                    *o = g * sigmoid(g) * u;
                }
            });
            tensor(out, shape)
        }
    }

    impl SwigluBackward for Flex {
        fn swiglu_backward(
            gate: FlexTensor,
            up: FlexTensor,
            dy: FlexTensor,
        ) -> (FlexTensor, FlexTensor) {
            let (gate, up, dy) = (contiguous(gate), contiguous(up), contiguous(dy));
            let shape = gate.layout().shape().clone();
            let (g, u, d) = (
                gate.as_slice::<f32>().unwrap_or(&[]),
                up.as_slice::<f32>().unwrap_or(&[]),
                dy.as_slice::<f32>().unwrap_or(&[]),
            );
            let (mut dg, mut du) = (vec![0.0f32; g.len()], vec![0.0f32; g.len()]);
            for_chunks([&mut dg, &mut du], [g, u, d], |[dg, du], [g, u, d]| {
                for k in 0..dg.len() {
                    let s = sigmoid(g[k]);
                    let silu = g[k] * s;
                    dg[k] = d[k] * u[k] * (s + silu * (1.0 - s));
                    du[k] = d[k] * silu;
                }
            });
            (tensor(dg, shape.clone()), tensor(du, shape))
        }
    }

    impl<B: SwigluOps + SwigluBackward, C: CheckpointStrategy> SwigluOps for Autodiff<B, C> {
        fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
            #[derive(Debug)]
            struct SwigluBackwardStep;

            impl<B: SwigluOps + SwigluBackward> Backward<B, 2> for SwigluBackwardStep {
                type State = (NodeId, NodeId);

                fn backward(
                    self,
                    ops: Ops<Self::State, 2>,
                    grads: &mut Gradients,
                    checkpointer: &mut Checkpointer,
                ) {
                    let [node_gate, node_up] = ops.parents;
                    let dy = grads.consume::<B>(&ops.node);
                    let (gate_state, up_state) = ops.state;
                    let gate: FloatTensor<B> = checkpointer.retrieve_node_output(gate_state);
                    let up: FloatTensor<B> = checkpointer.retrieve_node_output(up_state);
                    let (dgate, dup) = B::swiglu_backward(gate, up, dy);
                    if let Some(node) = node_gate {
                        grads.register::<B>(node.id, dgate);
                    }
                    if let Some(node) = node_up {
                        grads.register::<B>(node.id, dup);
                    }
                }
            }

            match SwigluBackwardStep
                .prepare::<C>([gate.node(), up.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let state = (prep.checkpoint(&gate), prep.checkpoint(&up));
                    let out = B::swiglu(gate.into_primitive(), up.into_primitive());
                    prep.finish(state, out)
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(B::swiglu(gate.into_primitive(), up.into_primitive()))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn run(f: fn(Tensor<2>, Tensor<2>) -> Tensor<2>, rows: usize, cols: usize) -> [Vec<f32>; 3] {
        let device = Device::default().autodiff();
        let make = |seed: u64| {
            let v = crate::kernels::test_values(seed, rows * cols, 12.0);
            Tensor::<2>::from_data(TensorData::new(v, [rows, cols]), &device)
        };
        let (g, u, r) = (make(1).require_grad(), make(2).require_grad(), make(3));
        let y = f(g.clone(), u.clone());
        let grads = (y.clone() * r).sum().backward();
        let host = |t: Tensor<2>| t.into_data().iter::<f32>().collect::<Vec<_>>();
        [
            host(y),
            g.grad(&grads).map(host).unwrap_or_default(),
            u.grad(&grads).map(host).unwrap_or_default(),
        ]
    }

    #[test]
    fn the_kernel_matches_the_composition_forward_and_backward() {
        for (rows, cols) in [(1, 1), (3, 17), (64, 1000), (5, 40_000)] {
            let got = run(swiglu, rows, cols);
            let want = run(swiglu_reference, rows, cols);
            for (what, (a, b)) in ["y", "dgate", "dup"].iter().zip(got.iter().zip(&want)) {
                crate::kernels::assert_close(&format!("{what} {rows}x{cols}"), a, b, 2e-6);
            }
        }
    }
}
