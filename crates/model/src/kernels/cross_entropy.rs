//! Mean next-token cross-entropy of logits `[rows, vocab]` as one op: forward, per row, one
//! pass for the maximum and one for `Σ exp` (the loss is `logsumexp − logit[target]`, and the
//! logsumexp is kept); backward, one pass writing `(softmax − onehot) · dloss / rows`. The
//! composition (log-softmax, gather, mean) reads and writes the whole logits tensor several
//! times each way and recomputes `exp` in backward.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

/// Mean of `−log softmax(logits)[target]` over the rows: the kernel where the backend has
/// one, else [`cross_entropy_reference`].
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    #[cfg(feature = "flex")]
    if super::runs_on(&logits) {
        return flex::cross_entropy(logits, targets);
    }
    cross_entropy_reference(logits, targets)
}

/// The plain Burn composition.
pub fn cross_entropy_reference(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let n = targets.dims()[0];
    log_softmax(logits, 1)
        .gather(1, targets.reshape([n, 1]))
        .mean()
        .neg()
}

#[cfg(feature = "flex")]
mod flex {
    use crate::kernels::flex_tensor::contiguous;
    use crate::kernels::simd::{exp, max, sum_map};
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::autodiff::{Autodiff, NodeId};
    use burn::backend::flex::{Flex, FlexTensor};
    use burn::backend::tensor::{FloatTensor, IntTensor};
    use burn::backend::{backend_extension, DType, Dispatch};
    use burn::tensor::{Int, Tensor, TensorData};
    use rayon::prelude::*;

    #[backend_extension(Flex, Autodiff)]
    pub trait CrossEntropyOps: burn::backend::Backend {
        fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self>;
    }

    /// The kernels behind the op: forward with each row's logsumexp, and backward from it.
    pub trait CrossEntropyKernels: burn::backend::Backend {
        fn cross_entropy_forward(
            logits: FloatTensor<Self>,
            targets: IntTensor<Self>,
        ) -> (FloatTensor<Self>, Vec<f32>);
        fn cross_entropy_backward(
            logits: FloatTensor<Self>,
            targets: IntTensor<Self>,
            logsumexp: &[f32],
            dloss: FloatTensor<Self>,
        ) -> FloatTensor<Self>;
    }

    pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
        let out = <Dispatch as CrossEntropyOps>::cross_entropy(
            logits.into_dispatch(),
            targets.into_dispatch(),
        );
        Tensor::from_dispatch(out)
    }

    /// Target ids as `usize`, whatever integer type the backend keeps them in.
    fn target_ids(t: FlexTensor) -> Vec<usize> {
        let t = contiguous(t);
        match t.dtype() {
            DType::I32 => t
                .as_slice::<i32>()
                .unwrap_or(&[])
                .iter()
                .map(|&v| v as usize)
                .collect(),
            _ => t
                .as_slice::<i64>()
                .unwrap_or(&[])
                .iter()
                .map(|&v| v as usize)
                .collect(),
        }
    }

    fn rows_of(logits: &FlexTensor) -> (usize, usize) {
        let shape = logits.layout().shape();
        (shape[0], shape[1])
    }

    impl CrossEntropyKernels for Flex {
        fn cross_entropy_forward(
            logits: FlexTensor,
            targets: FlexTensor,
        ) -> (FlexTensor, Vec<f32>) {
            let logits = contiguous(logits);
            let (rows, vocab) = rows_of(&logits);
            let (x, ids) = (logits.as_slice::<f32>().unwrap_or(&[]), target_ids(targets));
            let arch = pulp::Arch::new();
            let per_row: Vec<(f32, f32)> = x
                .par_chunks(vocab.max(1))
                .zip(ids.par_iter())
                .map(|(row, &target)| {
                    arch.dispatch(|| {
                        let m = max(row);
                        let lse = m + sum_map(row, |v| exp(v - m)).ln();
                        (lse, lse - row.get(target).copied().unwrap_or(f32::NAN))
                    })
                })
                .collect();
            let loss = per_row.iter().map(|r| r.1 as f64).sum::<f64>() / rows.max(1) as f64;
            let lse = per_row.into_iter().map(|r| r.0).collect();
            (
                FlexTensor::from_data(TensorData::new(vec![loss as f32], [1])),
                lse,
            )
        }

        fn cross_entropy_backward(
            logits: FlexTensor,
            targets: FlexTensor,
            logsumexp: &[f32],
            dloss: FlexTensor,
        ) -> FlexTensor {
            let logits = contiguous(logits);
            let (rows, vocab) = rows_of(&logits);
            let (x, ids) = (logits.as_slice::<f32>().unwrap_or(&[]), target_ids(targets));
            let dloss = contiguous(dloss);
            let scale = dloss
                .as_slice::<f32>()
                .and_then(|d| d.first().copied())
                .unwrap_or(0.0)
                / rows.max(1) as f32;
            let mut dx = vec![0.0f32; rows * vocab];
            let arch = pulp::Arch::new();
            dx.par_chunks_mut(vocab.max(1))
                .zip(x.par_chunks(vocab.max(1)))
                .zip(ids.par_iter().zip(logsumexp.par_iter()))
                .for_each(|((d, row), (&target, &lse))| {
                    arch.dispatch(|| {
                        for (d, &v) in d.iter_mut().zip(row) {
                            *d = exp(v - lse) * scale;
                        }
                    });
                    if let Some(d) = d.get_mut(target) {
                        *d -= scale;
                    }
                });
            FlexTensor::from_data(TensorData::new(dx, [rows, vocab]))
        }
    }

    impl CrossEntropyOps for Flex {
        fn cross_entropy(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
            Self::cross_entropy_forward(logits, targets).0
        }
    }

    impl<B: CrossEntropyOps + CrossEntropyKernels, C: CheckpointStrategy> CrossEntropyOps
        for Autodiff<B, C>
    {
        fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
            #[derive(Debug)]
            struct CrossEntropyBackward;

            impl<B: CrossEntropyOps + CrossEntropyKernels> Backward<B, 1> for CrossEntropyBackward {
                type State = (NodeId, IntTensor<B>, Vec<f32>);

                fn backward(
                    self,
                    ops: Ops<Self::State, 1>,
                    grads: &mut Gradients,
                    checkpointer: &mut Checkpointer,
                ) {
                    let [node_logits] = ops.parents;
                    let dloss = grads.consume::<B>(&ops.node);
                    let (logits_state, targets, lse) = ops.state;
                    let logits: FloatTensor<B> = checkpointer.retrieve_node_output(logits_state);
                    if let Some(node) = node_logits {
                        let dx = B::cross_entropy_backward(logits, targets, &lse, dloss);
                        grads.register::<B>(node.id, dx);
                    }
                }
            }

            match CrossEntropyBackward
                .prepare::<C>([logits.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let logits_state = prep.checkpoint(&logits);
                    let (loss, lse) =
                        B::cross_entropy_forward(logits.into_primitive(), targets.clone());
                    prep.finish((logits_state, targets, lse), loss)
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(B::cross_entropy(logits.into_primitive(), targets))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn run(
        f: fn(Tensor<2>, Tensor<1, Int>) -> Tensor<1>,
        rows: usize,
        vocab: usize,
    ) -> (f32, Vec<f32>) {
        let device = Device::default().autodiff();
        let v = crate::kernels::test_values(11, rows * vocab, 20.0);
        let logits =
            Tensor::<2>::from_data(TensorData::new(v, [rows, vocab]), &device).require_grad();
        let ids: Vec<i64> = (0..rows).map(|r| ((r * 7 + 3) % vocab) as i64).collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(ids, [rows]), &device);
        let loss = f(logits.clone(), targets);
        let grads = (loss.clone() * 3.0).sum().backward();
        let dx = logits
            .grad(&grads)
            .map(|g| g.into_data().iter::<f32>().collect())
            .unwrap_or_default();
        (
            loss.into_data().iter::<f32>().next().unwrap_or(f32::NAN),
            dx,
        )
    }

    #[test]
    fn the_kernel_matches_the_composition_forward_and_backward() {
        for (rows, vocab) in [(1, 1), (1, 2), (7, 65), (33, 1000), (4, 8192)] {
            let (got_loss, got_dx) = run(cross_entropy, rows, vocab);
            let (want_loss, want_dx) = run(cross_entropy_reference, rows, vocab);
            assert!(
                (got_loss - want_loss).abs() <= 1e-5 * (1.0 + want_loss.abs()),
                "{rows}x{vocab}: {got_loss} vs {want_loss}"
            );
            assert_eq!(got_dx.len(), want_dx.len());
            for (a, b) in got_dx.iter().zip(&want_dx) {
                assert!(
                    (a - b).abs() <= 1e-6 + 1e-5 * b.abs(),
                    "{rows}x{vocab}: {a} vs {b}"
                );
            }
        }
    }
}
