//! AdamW with decoupled weight decay (PyTorch's update rule), no decay on vectors (norm gains
//! and biases), global-norm gradient clipping, and state keyed by parameter path so it
//! checkpoints and resumes exactly.

use anyhow::{anyhow, Result};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use nuwa_model::kernels::adamw::{adamw, AdamWStep, AdamWTensors};
use nuwa_model::weights::HostTensor;
use nuwa_model::ModulePath;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// First and second moments of one parameter, flattened.
#[derive(Debug, Clone)]
pub struct Moments {
    pub exp_avg: Tensor<1>,
    pub exp_avg_sq: Tensor<1>,
}

#[derive(Debug, Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates taken so far (for bias correction).
    pub step: u64,
    /// Keyed by the parameter's module path, e.g. `layers.0.attention.dense.weight`.
    pub state: BTreeMap<String, Moments>,
}

impl AdamW {
    /// The moments by name (`PARAM.exp_avg`, `PARAM.exp_avg_sq`), for a checkpoint.
    pub fn to_host(&self) -> BTreeMap<String, HostTensor> {
        self.to_host_where(|_| true)
    }

    /// The moments of the parameters whose name `keep` accepts.
    pub fn to_host_where(&self, keep: impl Fn(&str) -> bool) -> BTreeMap<String, HostTensor> {
        let mut out = BTreeMap::new();
        for (name, m) in self.state.iter().filter(|(name, _)| keep(name)) {
            let avg = HostTensor::from_tensor(m.exp_avg.clone());
            let sq = HostTensor::from_tensor(m.exp_avg_sq.clone());
            out.insert(format!("{name}.exp_avg"), avg);
            out.insert(format!("{name}.exp_avg_sq"), sq);
        }
        out
    }

    /// Rebuilds the moments from a checkpoint's tensors, as after `step` updates.
    pub fn restore(
        &mut self,
        step: u64,
        tensors: &BTreeMap<String, HostTensor>,
        device: &Device,
    ) -> Result<()> {
        self.step = step;
        self.state.clear();
        let to_tensor = |t: &HostTensor| {
            Tensor::<1>::from_data(TensorData::new(t.data.clone(), [t.data.len()]), device)
        };
        for (key, avg) in tensors {
            let Some(name) = key.strip_suffix(".exp_avg") else {
                continue;
            };
            let sq = tensors
                .get(&format!("{name}.exp_avg_sq"))
                .ok_or_else(|| anyhow!("optimizer state: {name}.exp_avg_sq is missing"))?;
            let moments = Moments {
                exp_avg: to_tensor(avg),
                exp_avg_sq: to_tensor(sq),
            };
            self.state.insert(name.to_string(), moments);
        }
        Ok(())
    }
}

struct GradNorm<'a> {
    grads: &'a GradientsParams,
    squares: Vec<Tensor<1>>,
}

impl ModuleVisitor for GradNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.squares.push(g.powi_scalar(2).sum());
        }
    }
}

/// The global L2 norm of all gradients (one host sync).
pub fn grad_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    let mut v = GradNorm {
        grads,
        squares: Vec::new(),
    };
    model.visit(&mut v);
    if v.squares.is_empty() {
        return 0.0;
    }
    let total: f32 = Tensor::cat(v.squares, 0).sum().into_scalar();
    (total as f64).sqrt()
}

struct Update<'a> {
    opt: &'a mut AdamW,
    grads: GradientsParams,
    lr: f64,
    grad_scale: f64,
    path: ModulePath,
}

impl ModuleMapper for Update<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        // A parameter without a gradient is left untouched (not even read: a pipeline stage's
        // other layers are never allocated).
        let Some(grad) = self.grads.remove::<D>(param.id) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let name = self.path.current();
        let updated = self.opt.update(
            &name,
            tensor.inner(),
            grad.inner(),
            self.lr,
            self.grad_scale,
        );
        let updated = if require_grad {
            Tensor::from_inner(updated).require_grad()
        } else {
            Tensor::from_inner(updated)
        };
        Param::from_mapped_value(id, updated, mapper)
    }
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            state: BTreeMap::new(),
        }
    }

    /// One AdamW update of every parameter that has a gradient. Gradients are scaled by
    /// `grad_scale` first (for clipping). Returns the updated model.
    pub fn step<M: Module>(
        &mut self,
        model: M,
        grads: GradientsParams,
        lr: f64,
        grad_scale: f64,
    ) -> M {
        self.step += 1;
        let mut update = Update {
            opt: self,
            grads,
            lr,
            grad_scale,
            path: ModulePath::default(),
        };
        model.map(&mut update)
    }

    fn update<const D: usize>(
        &mut self,
        name: &str,
        param: Tensor<D>,
        grad: Tensor<D>,
        lr: f64,
        grad_scale: f64,
    ) -> Tensor<D> {
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let shape = param.shape();
        let numel = shape.num_elements();
        let device = grad.device();
        let moments = self.state.remove(name).unwrap_or_else(|| Moments {
            exp_avg: Tensor::zeros([numel], &device),
            exp_avg_sq: Tensor::zeros([numel], &device),
        });
        let step = AdamWStep {
            lr,
            beta1,
            beta2,
            eps,
            // Vectors (norm gains, biases) are not decayed.
            decay: if D >= 2 { weight_decay } else { 0.0 },
            t: self.step as i32,
            grad_scale,
        };
        let state = AdamWTensors {
            param: param.reshape([numel]),
            exp_avg: moments.exp_avg,
            exp_avg_sq: moments.exp_avg_sq,
        };
        // One fused pass where the backend has the kernel (nuwa_model::kernels::adamw).
        let updated = adamw(state, grad.reshape([numel]), step);
        self.state.insert(
            name.to_string(),
            Moments {
                exp_avg: updated.exp_avg,
                exp_avg_sq: updated.exp_avg_sq,
            },
        );
        updated.param.reshape(shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch.optim.AdamW's single-tensor rule (no amsgrad), in f64 on the host: the
    /// independent reference for the kernel and the composition alike.
    fn torch_adamw(
        p: &mut [f64],
        g: &[f64],
        m: &mut [f64],
        v: &mut [f64],
        t: i32,
        c: AdamWConfig,
        lr: f64,
    ) {
        for k in 0..p.len() {
            p[k] *= 1.0 - lr * c.weight_decay;
            m[k] = c.beta1 * m[k] + (1.0 - c.beta1) * g[k];
            v[k] = c.beta2 * v[k] + (1.0 - c.beta2) * g[k] * g[k];
            let (bias1, bias2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
            let denom = v[k].sqrt() / bias2.sqrt() + c.eps;
            p[k] -= lr / bias1 * m[k] / denom;
        }
    }

    #[test]
    fn updates_follow_torchs_adamw() {
        let device = Device::default();
        let config = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(config);
        let values = |seed: u64| -> Vec<f64> {
            (0..15)
                .map(|i| {
                    (nuwa_core::rng::splitmix64(seed * 31 + i) >> 40) as f64 / 16777216.0 - 0.5
                })
                .collect()
        };
        let mut want = values(1);
        let (mut m, mut v) = (vec![0.0; 15], vec![0.0; 15]);
        let to_tensor = |x: &[f64]| {
            let f: Vec<f32> = x.iter().map(|&x| x as f32).collect();
            Tensor::<2>::from_data(TensorData::new(f, [3, 5]), &device)
        };
        let mut param = to_tensor(&want);
        for t in 1..=4 {
            let g = values(100 + t as u64);
            opt.step += 1;
            // Gradients scaled by 0.5 (clipping) before the update.
            param = opt.update("w", param, to_tensor(&g), 1e-2, 0.5);
            let scaled: Vec<f64> = g.iter().map(|x| (*x as f32 as f64) * 0.5).collect();
            torch_adamw(&mut want, &scaled, &mut m, &mut v, t, config, 1e-2);
        }
        let got: Vec<f32> = param.into_data().iter::<f32>().collect();
        for (a, b) in got.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
