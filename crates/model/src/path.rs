//! The dotted path of the parameter a module traversal is at (`layers.0.attention.dense.weight`):
//! the one naming scheme for checkpoints, optimiser state and initialisation streams.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use std::collections::BTreeMap;

#[derive(Debug, Default, Clone)]
pub struct ModulePath(Vec<String>);

impl ModulePath {
    /// Call from `enter_module`.
    pub fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    /// Call from `exit_module`.
    pub fn exit(&mut self) {
        self.0.pop();
    }
    pub fn current(&self) -> String {
        self.0.join(".")
    }
}

/// What to read off each float parameter in [`by_path`] (a trait rather than a closure because
/// the parameter's rank is a const generic).
pub trait ReadParam {
    type Out;
    fn read<const D: usize>(&mut self, param: &Param<Tensor<D>>) -> Self::Out;
}

/// `read` applied to every float parameter of `module`, keyed by dotted path.
pub fn by_path<M: Module, R: ReadParam>(module: &M, read: R) -> BTreeMap<String, R::Out> {
    by_path_where(module, read, |_| true)
}

/// `read` applied to the float parameters of `module` whose dotted path `keep` accepts.
pub fn by_path_where<M: Module, R: ReadParam>(
    module: &M,
    read: R,
    keep: impl Fn(&str) -> bool,
) -> BTreeMap<String, R::Out> {
    struct Walk<R: ReadParam, K> {
        path: ModulePath,
        read: R,
        keep: K,
        out: BTreeMap<String, R::Out>,
    }
    impl<R: ReadParam, K: Fn(&str) -> bool> ModuleVisitor for Walk<R, K> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let path = self.path.current();
            if (self.keep)(&path) {
                let value = self.read.read(param);
                self.out.insert(path, value);
            }
        }
    }
    let mut walk = Walk {
        path: ModulePath::default(),
        read,
        keep,
        out: BTreeMap::new(),
    };
    module.visit(&mut walk);
    walk.out
}
