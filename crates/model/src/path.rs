//! The dotted path of the parameter a module traversal is at (`layers.0.attention.dense.weight`):
//! the one naming scheme for checkpoints, optimiser state and initialisation streams.

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
