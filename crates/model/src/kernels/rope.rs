//! Rotary position embedding ("rotate half", as Llama and bailing_moe) as one op: one pass
//! forward, `y = x·cos + rotate_half(x)·sin`, and one backward, `dx = dy·cos −
//! rotate_half(dy·sin)`. The composition narrows, negates, concatenates, multiplies and adds —
//! five tensors the size of `x` each way — and, with partial RoPE, concatenates once more.

use burn::tensor::Tensor;

/// Rotates `x` `[batch, heads, seq, head_dim]` by angles `cos`, `sin` `[1 or batch, 1, 1 or
/// seq, rotary]` (`rotary ≤ head_dim`, even): the first `rotary` features of each head turn,
/// the rest pass through. The kernel where the backend has one, else [`rope_reference`].
pub fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if super::runs_on(&x) && flex::shapes_fit(&x.dims(), &cos.dims(), &sin.dims()) {
        return flex::rope(x, cos.clone(), sin.clone());
    }
    rope_reference(x, cos, sin)
}

/// The plain Burn composition.
pub fn rope_reference(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [b, h, t, head_dim] = x.dims();
    let d = cos.dims()[3];
    if d < head_dim {
        let rotated = rope_reference(x.clone().narrow(3, 0, d), cos, sin);
        return Tensor::cat(vec![rotated, x.narrow(3, d, head_dim - d)], 3);
    }
    let half = d / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone().expand([b, h, t, d]) + rotated * sin.clone().expand([b, h, t, d])
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::autodiff::Autodiff;
    use burn::backend::flex::{Flex, FlexTensor};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{backend_extension, Dispatch};
    use burn::tensor::{Tensor, TensorData};
    use rayon::prelude::*;

    /// Rows (of one head at one position) per parallel task.
    const ROWS: usize = 256;

    #[backend_extension(Flex, Autodiff)]
    pub trait RopeOps: burn::backend::Backend {
        fn rope(
            x: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
        ) -> FloatTensor<Self>;
    }

    /// The backward kernel: the rotation by the opposite angles.
    pub trait RopeBackward: burn::backend::Backend {
        fn rope_backward(
            dy: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
        ) -> FloatTensor<Self>;
    }

    pub fn rope(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
        let out = <Dispatch as RopeOps>::rope(
            x.into_dispatch(),
            cos.detach().into_dispatch(),
            sin.detach().into_dispatch(),
        );
        Tensor::from_dispatch(out)
    }

    /// Whether the kernel takes these shapes (the composition handles, or refuses, the rest).
    pub fn shapes_fit(x: &[usize; 4], cos: &[usize; 4], sin: &[usize; 4]) -> bool {
        cos == sin
            && (cos[0] == 1 || cos[0] == x[0])
            && cos[1] == 1
            && (cos[2] == 1 || cos[2] == x[2])
            && cos[3].is_multiple_of(2)
            && cos[3] <= x[3]
    }

    /// One row of `x` (features of one head at one position) rotated into `y`; `sign` −1
    /// rotates backwards (the gradient).
    #[inline(always)]
    fn rotate_row(x: &[f32], cos: &[f32], sin: &[f32], sign: f32, y: &mut [f32]) {
        let half = cos.len() / 2;
        let (x1, rest) = x.split_at(half);
        let (x2, pass) = rest.split_at(half);
        let (y1, rest) = y.split_at_mut(half);
        let (y2, y_pass) = rest.split_at_mut(half);
        let (c1, c2) = cos.split_at(half);
        let (s1, s2) = sin.split_at(half);
        // Forward: y1 = x1·c1 − x2·s1, y2 = x2·c2 + x1·s2. Backward (sign −1, the transpose):
        // dx1 = dy1·c1 + dy2·s2, dx2 = dy2·c2 − dy1·s1.
        if sign > 0.0 {
            for i in 0..half {
                y1[i] = x1[i] * c1[i] - x2[i] * s1[i];
                y2[i] = x2[i] * c2[i] + x1[i] * s2[i];
            }
        } else {
            for i in 0..half {
                y1[i] = x1[i] * c1[i] + x2[i] * s2[i];
                y2[i] = x2[i] * c2[i] - x1[i] * s1[i];
            }
        }
        y_pass.copy_from_slice(&pass[..y_pass.len()]);
    }

    /// `x` rotated row by row; the result is contiguous `[batch, heads, seq, head_dim]`.
    fn rotate(x: FlexTensor, cos: FlexTensor, sin: FlexTensor, sign: f32) -> FlexTensor {
        let shape = x.layout().shape().clone();
        let [b, h, t, hd] = [shape[0], shape[1], shape[2], shape[3]];
        let angles = cos.layout().shape().clone();
        let (per_batch, per_position, d) = (angles[0] > 1, angles[2] > 1, angles[3]);
        let (x, cos, sin) = (x.to_contiguous(), cos.to_contiguous(), sin.to_contiguous());
        // Contiguous, but possibly a window of a larger buffer (angles from a longer table).
        let (xs, cs, ss) = (
            x.as_slice::<f32>().unwrap_or(&[]),
            cos.as_slice::<f32>().unwrap_or(&[]),
            sin.as_slice::<f32>().unwrap_or(&[]),
        );
        let mut y = vec![0.0f32; b * h * t * hd];
        let arch = pulp::Arch::new();
        y.par_chunks_mut(ROWS * hd.max(1))
            .enumerate()
            .for_each(|(task, ys)| {
                arch.dispatch(|| {
                    for (i, y) in ys.chunks_exact_mut(hd).enumerate() {
                        let row = task * ROWS + i;
                        let (bi, pos) = (row / (h * t), row % t);
                        let at = (if per_batch { bi * angles[2] } else { 0 }
                            + if per_position { pos } else { 0 })
                            * d;
                        let x = &xs[row * hd..(row + 1) * hd];
                        rotate_row(x, &cs[at..at + d], &ss[at..at + d], sign, y);
                    }
                })
            });
        FlexTensor::from_data(TensorData::new(y, [b, h, t, hd]))
    }

    impl RopeOps for Flex {
        fn rope(x: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> FlexTensor {
            rotate(x, cos, sin, 1.0)
        }
    }

    impl RopeBackward for Flex {
        fn rope_backward(dy: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> FlexTensor {
            rotate(dy, cos, sin, -1.0)
        }
    }

    impl<B: RopeOps + RopeBackward, C: CheckpointStrategy> RopeOps for Autodiff<B, C> {
        fn rope(
            x: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            #[derive(Debug)]
            struct RopeBackwardStep;

            impl<B: RopeOps + RopeBackward> Backward<B, 1> for RopeBackwardStep {
                /// The angles (constants: no gradient flows to them).
                type State = (FloatTensor<B>, FloatTensor<B>);

                fn backward(
                    self,
                    ops: Ops<Self::State, 1>,
                    grads: &mut Gradients,
                    _checkpointer: &mut Checkpointer,
                ) {
                    let [node_x] = ops.parents;
                    let dy = grads.consume::<B>(&ops.node);
                    let (cos, sin) = ops.state;
                    if let Some(node) = node_x {
                        grads.register::<B>(node.id, B::rope_backward(dy, cos, sin));
                    }
                }
            }

            let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
            match RopeBackwardStep
                .prepare::<C>([x.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let y = B::rope(x.into_primitive(), cos.clone(), sin.clone());
                    prep.finish((cos, sin), y)
                }
                OpsKind::UnTracked(prep) => prep.finish(B::rope(x.into_primitive(), cos, sin)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn run(
        f: fn(Tensor<4>, &Tensor<4>, &Tensor<4>) -> Tensor<4>,
        x: [usize; 4],
        angles: [usize; 4],
    ) -> [Vec<f32>; 2] {
        let device = Device::default().autodiff();
        let make = |seed: u64, shape: [usize; 4], scale: f32| {
            let v = crate::kernels::test_values(seed, shape.iter().product(), scale);
            Tensor::<4>::from_data(TensorData::new(v, shape), &device)
        };
        let x_t = make(1, x, 4.0).require_grad();
        // The angles as a window of a longer table, as `Rope::angles` hands them out.
        let window = |seed: u64| {
            let mut longer = angles;
            longer[2] += 3;
            make(seed, longer, 2.0).narrow(2, 2, angles[2])
        };
        let (cos, sin) = (window(2), window(3));
        let y = f(x_t.clone(), &cos, &sin);
        let grads = (y.clone() * make(4, x, 2.0)).sum().backward();
        let host = |t: Tensor<4>| t.into_data().iter::<f32>().collect::<Vec<_>>();
        [host(y), x_t.grad(&grads).map(host).unwrap_or_default()]
    }

    #[test]
    fn the_kernel_matches_the_composition_forward_and_backward() {
        #[cfg(feature = "flex")]
        assert!(
            crate::kernels::has_kernel(&Device::default()),
            "the kernel is not in use"
        );
        // Angles per position, per batch row (decoding), partial rotation, one position.
        for (x, angles) in [
            ([2, 3, 5, 8], [1, 1, 5, 8]),
            ([3, 2, 1, 16], [3, 1, 1, 16]),
            ([2, 2, 300, 12], [1, 1, 300, 6]),
            ([1, 1, 1, 2], [1, 1, 1, 2]),
        ] {
            let got = run(rope, x, angles);
            let want = run(rope_reference, x, angles);
            for (what, (a, w)) in ["y", "dx"].iter().zip(got.iter().zip(&want)) {
                crate::kernels::assert_close(&format!("{what} {x:?}"), a, w, 1e-6);
            }
        }
    }
}
