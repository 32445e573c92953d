//! AdamW with decoupled weight decay (PyTorch's update rule), no decay on vectors (norm gains
//! and biases), global-norm gradient clipping, and state keyed by parameter path so it
//! checkpoints and resumes exactly.

use anyhow::{anyhow, Result};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
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
        let mut out = BTreeMap::new();
        for (name, m) in &self.state {
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
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let name = self.path.current();
        let updated = self.opt.update(
            &name,
            tensor.inner(),
            grad.inner() * self.grad_scale,
            self.lr,
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
    ) -> Tensor<D> {
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let shape = param.shape();
        let numel = shape.num_elements();
        let flat_grad = grad.reshape([numel]);
        let moments = self.state.remove(name).unwrap_or_else(|| Moments {
            exp_avg: Tensor::zeros([numel], &flat_grad.device()),
            exp_avg_sq: Tensor::zeros([numel], &flat_grad.device()),
        });
        let exp_avg = moments.exp_avg * beta1 + flat_grad.clone() * (1.0 - beta1);
        let exp_avg_sq = moments.exp_avg_sq * beta2 + flat_grad.powi_scalar(2) * (1.0 - beta2);
        let t = self.step as i32;
        let bias1 = 1.0 - beta1.powi(t);
        let bias2 = 1.0 - beta2.powi(t);
        // Vectors (norm gains, biases) are not decayed.
        let decay = if D >= 2 { weight_decay } else { 0.0 };
        let denom = exp_avg_sq.clone().sqrt() / bias2.sqrt() + eps;
        let delta = (exp_avg.clone() / denom) * (lr / bias1);
        let param = param.reshape([numel]) * (1.0 - lr * decay) - delta;
        self.state.insert(
            name.to_string(),
            Moments {
                exp_avg,
                exp_avg_sq,
            },
        );
        param.reshape(shape)
    }
}
