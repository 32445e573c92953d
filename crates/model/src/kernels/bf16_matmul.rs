//! Mixed precision for the weight products: `x · w` with both rounded to bf16 and summed in
//! f32 (as PyTorch's bf16 autocast runs `linear` on the CPU), forward and both gradients
//! (`dx = dy · wᵀ`, `dw = xᵀ · dy`, also bf16 × bf16 → f32). Weights, gradients, optimizer
//! state and every other op stay f32: the master weights are never rounded.
//!
//! Off unless [`set_precision`] asks for bf16 (`nuwa train --precision bf16`), and only on
//! CPUs with AVX512-BF16; elsewhere the f32 product runs.

use burn::tensor::Tensor;
use std::sync::atomic::{AtomicBool, Ordering};

static BF16: AtomicBool = AtomicBool::new(false);

/// The precision of the weight products, for the whole process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// Weight products in bf16 × bf16 → f32; everything else f32.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(format!("unknown precision {s:?}: f32 or bf16")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

/// Sets the precision of the weight products. Returns whether it takes effect: bf16 needs a
/// CPU with AVX512-BF16 and the flex backend.
pub fn set_precision(p: Precision) -> bool {
    let on = p == Precision::Bf16 && bf16_available();
    BF16.store(on, Ordering::Relaxed);
    on || p == Precision::F32
}

/// Whether the weight products run in bf16 now (set, and available).
pub fn bf16_enabled() -> bool {
    BF16.load(Ordering::Relaxed)
}

/// Whether this build and CPU can run the bf16 products.
pub fn bf16_available() -> bool {
    #[cfg(all(feature = "flex", target_arch = "x86_64"))]
    return super::bf16_gemm::available();
    #[allow(unreachable_code)]
    false
}

/// `x [rows, in] · w [in, out]`: in bf16 where [`set_precision`] asked for it and `x` is on
/// the flex device, else in f32.
pub fn weight_product(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    #[cfg(all(feature = "flex", target_arch = "x86_64"))]
    if BF16.load(Ordering::Relaxed) && super::runs_on(&x) {
        return flex::bf16_matmul(x, w);
    }
    super::skinny::product(x, w)
}

#[cfg(all(feature = "flex", target_arch = "x86_64"))]
mod flex {
    use crate::kernels::bf16_gemm::{matmul, Mat};
    use crate::kernels::flex_tensor::readable;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::autodiff::{Autodiff, NodeId};
    use burn::backend::flex::{Flex, FlexTensor};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{backend_extension, Dispatch};
    use burn::tensor::{Tensor, TensorData};

    #[backend_extension(Flex, Autodiff)]
    pub trait Bf16MatmulOps: burn::backend::Backend {
        fn bf16_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
    }

    /// The backward kernel: `(dx, dw)`.
    pub trait Bf16MatmulBackward: burn::backend::Backend {
        fn bf16_matmul_backward(
            x: FloatTensor<Self>,
            w: FloatTensor<Self>,
            dy: FloatTensor<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>);
    }

    pub fn bf16_matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
        let out = <Dispatch as Bf16MatmulOps>::bf16_matmul(x.into_dispatch(), w.into_dispatch());
        Tensor::from_dispatch(out)
    }

    /// `t` as a matrix read in place.
    fn mat(t: &FlexTensor) -> Mat<'_> {
        let (shape, strides) = (t.layout().shape(), t.layout().strides());
        Mat {
            data: t
                .storage::<f32>()
                .get(t.layout().start_offset()..)
                .unwrap_or(&[]),
            rows: shape[0],
            cols: shape[1],
            row_stride: strides[0] as usize,
            col_stride: strides[1] as usize,
        }
    }

    fn product(a: Mat, b: Mat) -> FlexTensor {
        let mut c = vec![0.0f32; a.rows * b.cols];
        matmul(&mut c, a, b, false);
        FlexTensor::from_data(TensorData::new(c, [a.rows, b.cols]))
    }

    impl Bf16MatmulOps for Flex {
        fn bf16_matmul(x: FlexTensor, w: FlexTensor) -> FlexTensor {
            let (x, w) = (readable(x), readable(w));
            product(mat(&x), mat(&w))
        }
    }

    impl Bf16MatmulBackward for Flex {
        fn bf16_matmul_backward(
            x: FlexTensor,
            w: FlexTensor,
            dy: FlexTensor,
        ) -> (FlexTensor, FlexTensor) {
            let (x, w, dy) = (readable(x), readable(w), readable(dy));
            (
                product(mat(&dy), mat(&w).t()),
                product(mat(&x).t(), mat(&dy)),
            )
        }
    }

    impl<B: Bf16MatmulOps + Bf16MatmulBackward, C: CheckpointStrategy> Bf16MatmulOps
        for Autodiff<B, C>
    {
        fn bf16_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
            #[derive(Debug)]
            struct Bf16MatmulBackwardStep;

            impl<B: Bf16MatmulOps + Bf16MatmulBackward> Backward<B, 2> for Bf16MatmulBackwardStep {
                type State = (NodeId, NodeId);

                fn backward(
                    self,
                    ops: Ops<Self::State, 2>,
                    grads: &mut Gradients,
                    checkpointer: &mut Checkpointer,
                ) {
                    let [node_x, node_w] = ops.parents;
                    let dy = grads.consume::<B>(&ops.node);
                    let x: FloatTensor<B> = checkpointer.retrieve_node_output(ops.state.0);
                    let w: FloatTensor<B> = checkpointer.retrieve_node_output(ops.state.1);
                    let (dx, dw) = B::bf16_matmul_backward(x, w, dy);
                    if let Some(node) = node_x {
                        grads.register::<B>(node.id, dx);
                    }
                    if let Some(node) = node_w {
                        grads.register::<B>(node.id, dw);
                    }
                }
            }

            match Bf16MatmulBackwardStep
                .prepare::<C>([x.node(), w.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let state = (prep.checkpoint(&x), prep.checkpoint(&w));
                    let y = B::bf16_matmul(x.into_primitive(), w.into_primitive());
                    prep.finish(state, y)
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(B::bf16_matmul(x.into_primitive(), w.into_primitive()))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    /// Output and both gradients of `x · w` under a fixed projection.
    fn run(bf16: bool, m: usize, k: usize, n: usize) -> [Vec<f32>; 3] {
        let device = Device::default().autodiff();
        let make = |seed: u64, shape: [usize; 2]| {
            let v = crate::kernels::test_values(seed, shape[0] * shape[1], 2.0);
            Tensor::<2>::from_data(TensorData::new(v, shape), &device)
        };
        let (x, w) = (
            make(1, [m, k]).require_grad(),
            make(2, [k, n]).require_grad(),
        );
        // The weight read transposed too, as tied embeddings are.
        let w_t = make(3, [n, k]).require_grad();
        // The kernel called directly: the process-wide switch stays off for other tests.
        let product = |a: Tensor<2>, b: Tensor<2>| {
            #[cfg(all(feature = "flex", target_arch = "x86_64"))]
            if bf16 {
                return flex::bf16_matmul(a, b);
            }
            a.matmul(b)
        };
        let y = product(x.clone(), w.clone()) + product(x.clone(), w_t.clone().transpose());
        let grads = (y.clone() * make(4, [m, n])).sum().backward();
        let host = |t: Tensor<2>| t.into_data().iter::<f32>().collect::<Vec<_>>();
        let grad = |t: &Tensor<2>| t.grad(&grads).map(host).unwrap_or_default();
        [host(y), grad(&x), grad(&w)]
    }

    #[test]
    fn bf16_products_stay_within_bf16_rounding_of_f32_forward_and_backward() {
        if !bf16_available() {
            eprintln!("no AVX512-BF16 here: the f32 product runs, nothing to compare");
            return;
        }
        for (m, k, n) in [(1, 1, 1), (9, 31, 50), (70, 128, 65)] {
            let (got, want) = (run(true, m, k, n), run(false, m, k, n));
            for (what, (a, b)) in ["y", "dx", "dw"].iter().zip(got.iter().zip(&want)) {
                assert_eq!(a.len(), b.len(), "{what}");
                // Each input rounded to 8 bits of mantissa: relative error ≤ 2⁻⁸ per factor,
                // summed over k terms of both signs; scaled by the sum of |terms|' size.
                let scale = (k as f32).sqrt() * 2.0;
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 0.02 * scale,
                        "{what} {m}x{k}x{n}: {x} vs {y}"
                    );
                }
                let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
                assert!(
                    same < a.len() || a.len() < 4,
                    "{what}: bf16 changed nothing"
                );
            }
        }
    }
}
