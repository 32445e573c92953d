//! Module weights to and from safetensors, by dotted module path. Loading checks every tensor
//! and reports all missing, unexpected and mis-shaped ones together.

use crate::init::host_tensor_like;
use crate::path::{by_path, ReadParam};
use crate::ModulePath;
use anyhow::{anyhow, bail, Result};
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::Tensor;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, BTreeSet};

/// A named f32 tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn from_tensor<const D: usize>(t: Tensor<D>) -> Self {
        let shape = t.dims().to_vec();
        // `iter` converts any element type to f32, so no copy can come back short or empty.
        let data = t.into_data().iter::<f32>().collect();
        Self { shape, data }
    }
}

/// Copies a parameter's values to the host.
struct ToHost;

impl ReadParam for ToHost {
    type Out = HostTensor;
    fn read<const D: usize>(&mut self, param: &Param<Tensor<D>>) -> HostTensor {
        HostTensor::from_tensor(param.val())
    }
}

/// Every float parameter of a module, by path.
pub fn collect_weights<M: Module>(model: &M) -> BTreeMap<String, HostTensor> {
    by_path(model, ToHost)
}

/// The float parameters of a module whose path `keep` accepts, by path.
pub fn collect_weights_where<M: Module>(
    model: &M,
    keep: impl Fn(&str) -> bool,
) -> BTreeMap<String, HostTensor> {
    crate::path::by_path_where(model, ToHost, keep)
}

/// Serialises named tensors as a safetensors file body.
pub fn to_safetensors(tensors: &BTreeMap<String, HostTensor>) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let raw: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), t.shape.clone(), raw)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, raw)| {
            TensorView::new(Dtype::F32, shape.clone(), raw)
                .map(|v| (name.clone(), v))
                .map_err(|e| anyhow!("tensor {name}: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, None).map_err(|e| anyhow!("serialising safetensors: {e}"))
}

/// Parses a safetensors file body into named f32 tensors (`what` names the file in errors).
pub fn from_safetensors(bytes: &[u8], what: &str) -> Result<BTreeMap<String, HostTensor>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow!("{what}: not a valid safetensors file: {e}"))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            bail!(
                "{what}: tensor {name} has dtype {:?}, expected F32",
                view.dtype()
            );
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

struct Assign<'a> {
    path: ModulePath,
    source: &'a BTreeMap<String, HostTensor>,
    seen: BTreeSet<String>,
    problems: Vec<String>,
}

impl ModuleMapper for Assign<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.current();
        let (id, tensor, mapper) = param.consume();
        let Some(host) = self.source.get(&name) else {
            self.problems.push(format!("missing tensor {name}"));
            return Param::from_mapped_value(id, tensor, mapper);
        };
        self.seen.insert(name.clone());
        let expected = tensor.dims().to_vec();
        if host.shape != expected {
            self.problems.push(format!(
                "tensor {name} has shape {:?}, the model expects {expected:?}",
                host.shape
            ));
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let loaded = host_tensor_like(host.data.clone(), host.shape.clone(), &tensor);
        Param::from_mapped_value(id, loaded, mapper)
    }
}

/// Replaces every float parameter of `model` with the tensor of the same path. Fails, listing
/// every problem, if any tensor is missing, unexpected or has the wrong shape.
pub fn assign_weights<M: Module>(
    model: M,
    source: &BTreeMap<String, HostTensor>,
    what: &str,
) -> Result<M> {
    let mut assign = Assign {
        path: ModulePath::default(),
        source,
        seen: BTreeSet::new(),
        problems: Vec::new(),
    };
    let model = model.map(&mut assign);
    let mut problems = assign.problems;
    for name in source.keys() {
        if !assign.seen.contains(name) && !problems.iter().any(|p| p.contains(name.as_str())) {
            problems.push(format!("unexpected tensor {name}"));
        }
    }
    if !problems.is_empty() {
        bail!(
            "{what}: {} problem(s): {}",
            problems.len(),
            problems.join("; ")
        );
    }
    Ok(model)
}

/// Replaces the float parameters of `model` named in `source` (keeping their ids, so optimiser
/// state and gradients still find them), whatever their shape was: how expert parallelism
/// moves experts between ranks. Parameters not named keep their values.
pub fn replace_weights<M: Module>(model: M, source: &BTreeMap<String, HostTensor>) -> M {
    struct Replace<'a> {
        path: ModulePath,
        source: &'a BTreeMap<String, HostTensor>,
    }
    impl ModuleMapper for Replace<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (id, tensor, mapper) = param.consume();
            let value = match self.source.get(&self.path.current()) {
                Some(host) => host_tensor_like(host.data.clone(), host.shape.clone(), &tensor),
                None => tensor,
            };
            Param::from_mapped_value(id, value, mapper)
        }
    }
    model.map(&mut Replace {
        path: ModulePath::default(),
        source,
    })
}
