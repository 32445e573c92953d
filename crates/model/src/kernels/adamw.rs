//! One AdamW update of a parameter as one op: a single pass reading the parameter, its
//! gradient and both moments and writing all three back (in place when nothing else holds
//! them), instead of a dozen elementwise ops each reading and writing the whole tensor.
//! PyTorch's rule with decoupled weight decay:
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `w ← w(1 − lr·λ) − (lr/(1−β₁ᵗ)) · m / (√v/√(1−β₂ᵗ) + ε)`.

use burn::tensor::Tensor;

/// The step's hyper-parameters, bias corrections included.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay λ (0 for vectors).
    pub decay: f64,
    /// Updates taken, this one included (t ≥ 1).
    pub t: i32,
    /// Multiplies the gradient first (global-norm clipping).
    pub grad_scale: f64,
}

/// A flat parameter with its moments.
pub struct AdamWTensors {
    pub param: Tensor<1>,
    pub exp_avg: Tensor<1>,
    pub exp_avg_sq: Tensor<1>,
}

/// Updates `state` with `grad`: the kernel where the backend has one, else
/// [`adamw_reference`].
pub fn adamw(state: AdamWTensors, grad: Tensor<1>, h: AdamWStep) -> AdamWTensors {
    #[cfg(feature = "flex")]
    if super::runs_on(&grad) {
        return flex::adamw(state, grad, h);
    }
    adamw_reference(state, grad, h)
}

/// The plain Burn composition.
pub fn adamw_reference(state: AdamWTensors, grad: Tensor<1>, h: AdamWStep) -> AdamWTensors {
    let g = grad * h.grad_scale;
    let exp_avg = state.exp_avg * h.beta1 + g.clone() * (1.0 - h.beta1);
    let exp_avg_sq = state.exp_avg_sq * h.beta2 + g.powi_scalar(2) * (1.0 - h.beta2);
    let (bias1, bias2) = (1.0 - h.beta1.powi(h.t), 1.0 - h.beta2.powi(h.t));
    let denom = exp_avg_sq.clone().sqrt() / bias2.sqrt() + h.eps;
    let delta = (exp_avg.clone() / denom) * (h.lr / bias1);
    AdamWTensors {
        param: state.param * (1.0 - h.lr * h.decay) - delta,
        exp_avg,
        exp_avg_sq,
    }
}

#[cfg(feature = "flex")]
mod flex {
    use super::{AdamWStep, AdamWTensors};
    use crate::kernels::flex_tensor::contiguous;
    use burn::backend::flex::{Flex, FlexTensor};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{backend_extension, Dispatch, ExtensionType};
    use burn::tensor::Tensor;
    use rayon::prelude::*;

    /// Elements per parallel task.
    const CHUNK: usize = 1 << 14;

    #[derive(ExtensionType)]
    pub struct Moments<B: burn::backend::Backend> {
        pub param: FloatTensor<B>,
        pub exp_avg: FloatTensor<B>,
        pub exp_avg_sq: FloatTensor<B>,
    }

    #[backend_extension(Flex)]
    pub trait AdamWOps: burn::backend::Backend {
        #[allow(clippy::too_many_arguments)]
        fn adamw_step(
            #[extension_type] state: Moments<Self>,
            grad: FloatTensor<Self>,
            lr: f64,
            beta1: f64,
            beta2: f64,
            eps: f64,
            decay: f64,
            t: i32,
            grad_scale: f64,
        ) -> Moments<Self>;
    }

    pub fn adamw(state: AdamWTensors, grad: Tensor<1>, h: AdamWStep) -> AdamWTensors {
        let moments = Moments {
            param: state.param.into_dispatch(),
            exp_avg: state.exp_avg.into_dispatch(),
            exp_avg_sq: state.exp_avg_sq.into_dispatch(),
        };
        let out = <Dispatch as AdamWOps>::adamw_step(
            moments,
            grad.into_dispatch(),
            h.lr,
            h.beta1,
            h.beta2,
            h.eps,
            h.decay,
            h.t,
            h.grad_scale,
        );
        AdamWTensors {
            param: Tensor::from_dispatch(out.param),
            exp_avg: Tensor::from_dispatch(out.exp_avg),
            exp_avg_sq: Tensor::from_dispatch(out.exp_avg_sq),
        }
    }

    /// `t` as a tensor this op may write: contiguous from offset 0 and exactly its length
    /// (copied otherwise; `storage_mut` then copies again only if something else holds it).
    fn writable(t: FlexTensor) -> FlexTensor {
        let t = contiguous(t);
        let exact = t.layout().start_offset() == 0
            && t.bytes().len() == t.layout().num_elements() * std::mem::size_of::<f32>();
        if exact {
            t
        } else {
            FlexTensor::from_data(t.into_data())
        }
    }

    impl AdamWOps for Flex {
        fn adamw_step(
            state: Moments<Self>,
            grad: FlexTensor,
            lr: f64,
            beta1: f64,
            beta2: f64,
            eps: f64,
            decay: f64,
            t: i32,
            grad_scale: f64,
        ) -> Moments<Self> {
            let (mut w, mut m, mut v) = (
                writable(state.param),
                writable(state.exp_avg),
                writable(state.exp_avg_sq),
            );
            let grad = contiguous(grad);
            let g = grad.as_slice::<f32>().unwrap_or(&[]);
            let (b1, b2) = (beta1 as f32, beta2 as f32);
            let (one_b1, one_b2) = ((1.0 - beta1) as f32, (1.0 - beta2) as f32);
            let keep = (1.0 - lr * decay) as f32;
            let step = (lr / (1.0 - beta1.powi(t))) as f32;
            let sqrt_bias2 = (1.0 - beta2.powi(t)).sqrt() as f32;
            let (eps, scale) = (eps as f32, grad_scale as f32);
            let arch = pulp::Arch::new();
            w.storage_mut::<f32>()
                .par_chunks_mut(CHUNK)
                .zip(m.storage_mut::<f32>().par_chunks_mut(CHUNK))
                .zip(v.storage_mut::<f32>().par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((w, m), v), g)| {
                    arch.dispatch(|| {
                        for k in 0..w.len() {
                            let g = g[k] * scale;
                            m[k] = m[k] * b1 + g * one_b1;
                            v[k] = v[k] * b2 + g * g * one_b2;
                            let denom = v[k].sqrt() / sqrt_bias2 + eps;
                            w[k] = w[k] * keep - m[k] / denom * step;
                        }
                    })
                });
            Moments {
                param: w,
                exp_avg: m,
                exp_avg_sq: v,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn run(f: fn(AdamWTensors, Tensor<1>, AdamWStep) -> AdamWTensors, decay: f64) -> Vec<f32> {
        let device = Device::default();
        let len = 40_001;
        let tensor = |seed: u64, scale: f32| {
            let v = crate::kernels::test_values(seed, len, scale);
            Tensor::<1>::from_data(TensorData::new(v, [len]), &device)
        };
        let mut state = AdamWTensors {
            param: tensor(1, 2.0),
            exp_avg: Tensor::zeros([len], &device),
            exp_avg_sq: Tensor::zeros([len], &device),
        };
        for t in 1..=3 {
            let h = AdamWStep {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                decay,
                t,
                grad_scale: 0.5,
            };
            state = f(state, tensor(10 + t as u64, 1.0), h);
        }
        let host = |t: Tensor<1>| t.into_data().iter::<f32>().collect::<Vec<_>>();
        [
            host(state.param),
            host(state.exp_avg),
            host(state.exp_avg_sq),
        ]
        .concat()
    }

    #[test]
    fn the_kernel_matches_the_composition_over_three_steps() {
        for decay in [0.0, 0.1] {
            let (got, want) = (run(adamw, decay), run(adamw_reference, decay));
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "decay {decay}: {a} vs {b}"
                );
            }
        }
    }
}
