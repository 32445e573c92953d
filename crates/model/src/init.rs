//! Weight initialisation on the host from a seeded counter-based RNG, keyed by each parameter's
//! path: the same seed gives bit-identical initial weights on every backend and device, and no
//! dependence on a backend's global RNG or on other threads using it.

use crate::expert_parallel::Placement;
use crate::ModulePath;
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Tensor, TensorData};
use nuwa_core::rng::{splitmix64, SplitMix};

/// FNV-1a of a path, to give each parameter its own stream.
fn hash_path(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `n` samples of N(0, std²) by Box–Muller from the stream `key`.
fn normals(key: u64, n: usize, std: f64) -> Vec<f32> {
    let mut rng = SplitMix(key);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (rng.next_f64(), rng.next_f64());
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

struct Init<'a> {
    seed: u64,
    std: f64,
    path: ModulePath,
    /// Which parameters to initialise; the others are left as they are (unallocated, when
    /// the module was built lazily).
    keep: &'a dyn Fn(&str) -> bool,
    /// The expert placement and this module's member in it: stacked expert weights hold only
    /// the member's part, with the values it has in the whole stack.
    experts: Option<(&'a Placement, usize)>,
}

impl ModuleMapper for Init<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.current();
        if !(self.keep)(&path) {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.dims();
        let numel: usize = shape.iter().product();
        let key = splitmix64(self.seed ^ hash_path(&path));
        let sliced = self
            .experts
            .as_ref()
            .filter(|_| D == 3 && crate::expert_parallel::is_routed_expert(&path));
        let values = if let Some((placement, member)) = sliced {
            // The whole stack's stream, this part of it: the same values as one process's.
            let (whole, runs) = placement.runs(*member, &path, numel);
            runs.take(&normals(key, whole, self.std))
        } else if D >= 2 {
            normals(key, numel, self.std)
        } else if path.ends_with("bias") {
            vec![0.0; numel]
        } else {
            // Norm gains.
            vec![1.0; numel]
        };
        Param::from_mapped_value(id, host_tensor_like(values, shape, &tensor), mapper)
    }
}

/// A tensor holding host `values` of `shape`, on the device of `like` and requiring a gradient
/// when `like` does: what replacing a parameter's value needs.
pub fn host_tensor_like<const D: usize>(
    values: Vec<f32>,
    shape: impl Into<burn::tensor::Shape>,
    like: &Tensor<D>,
) -> Tensor<D> {
    let t = Tensor::<D>::from_data(TensorData::new(values, shape), &like.device());
    if like.is_require_grad() {
        t.require_grad()
    } else {
        t
    }
}

/// Re-initialises every float parameter: matrices N(0, std²), biases 0, norm gains 1.
pub fn init_weights<M: Module>(module: M, seed: u64, std: f64) -> M {
    init_weights_where(module, seed, std, &|_| true)
}

/// Initialises the float parameters whose path `keep` accepts, exactly as [`init_weights`]
/// would (each parameter's values depend only on the seed and its path); the others stay
/// unallocated — how a pipeline stage holds only its own layers.
pub fn init_weights_where<M: Module>(
    module: M,
    seed: u64,
    std: f64,
    keep: &dyn Fn(&str) -> bool,
) -> M {
    init_weights_sharded(module, seed, std, keep, None)
}

/// [`init_weights_where`] for a module whose stacked routed-expert weights hold only member
/// `experts.1`'s part in placement `experts.0`: each value is the one it has in the whole stack.
pub fn init_weights_sharded<M: Module>(
    module: M,
    seed: u64,
    std: f64,
    keep: &dyn Fn(&str) -> bool,
    experts: Option<(&Placement, usize)>,
) -> M {
    module.map(&mut Init {
        seed,
        std,
        path: ModulePath::default(),
        keep,
        experts,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn normals_have_the_right_moments() {
        let v = super::normals(42, 100_000, 0.02);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 3e-4, "{mean}");
        assert!((var.sqrt() - 0.02).abs() < 3e-4, "{}", var.sqrt());
        assert_eq!(v, super::normals(42, 100_000, 0.02));
    }
}
