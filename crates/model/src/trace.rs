//! Named activations recorded during a forward pass, for `nuwa parity` and
//! `nuwa train --dump-tensors`: module by module and, inside attention and the router, op by
//! op, in the order they were computed — so two backends (or nuwa and another implementation)
//! can be compared where they first part.
//!
//! Recording is per thread and off unless [`Recorder::start`] turned it on; a tap then costs
//! one thread-local check. Names are the module paths of `model.rs` (`layers.1.attention`)
//! plus an op suffix (`layers.1.attention.query`); see [`tap`] for the list.
//!
//! A recorder may carry a [`Perturbation`]: the tapped tensor of that name comes back changed,
//! so everything after it is computed from the changed value, as it would be after a faulty
//! kernel. Only tests use it, to prove the comparison finds the op that was changed.

use burn::tensor::{Int, Tensor, TensorData};
use std::cell::RefCell;

/// One recorded tensor.
#[derive(Debug, Clone)]
pub struct Tapped {
    pub name: String,
    pub shape: Vec<usize>,
    /// Values as f32 (router choices are small integers, exact in f32).
    pub values: Vec<f32>,
}

/// Adds `delta` to every element of the tensor tapped as `name` (tests only).
#[derive(Debug, Clone)]
pub struct Perturbation {
    pub name: String,
    pub delta: f32,
}

#[derive(Default)]
struct State {
    scope: Vec<String>,
    taps: Vec<Tapped>,
    perturb: Option<Perturbation>,
    /// Record only the router's choices (cheap enough for every step of a run).
    router_only: bool,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Records the taps of this thread from `start` until `finish`.
pub struct Recorder;

impl Recorder {
    pub fn start(perturb: Option<Perturbation>) -> Recorder {
        STATE.with(|s| {
            *s.borrow_mut() = Some(State {
                perturb,
                ..State::default()
            })
        });
        Recorder
    }

    /// Records only the router's choices ([`tap_ids`]): a few integers per token.
    pub fn start_router_only() -> Recorder {
        STATE.with(|s| {
            *s.borrow_mut() = Some(State {
                router_only: true,
                ..State::default()
            })
        });
        Recorder
    }

    /// The tensors tapped since `start`, in order; recording stops.
    pub fn finish(self) -> Vec<Tapped> {
        STATE.with(|s| s.borrow_mut().take().map(|st| st.taps).unwrap_or_default())
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        STATE.with(|s| s.borrow_mut().take());
    }
}

/// Whether this thread is recording.
pub fn active() -> bool {
    STATE.with(|s| s.borrow().is_some())
}

/// Names taps inside it `prefix.…` until the guard drops (a decoder layer: `layers.3`).
pub struct Scope(bool);

pub fn scope(prefix: impl FnOnce() -> String) -> Scope {
    let on = STATE.with(|s| match s.borrow_mut().as_mut() {
        Some(st) => {
            st.scope.push(prefix());
            true
        }
        None => false,
    });
    Scope(on)
}

impl Drop for Scope {
    fn drop(&mut self) {
        if self.0 {
            STATE.with(|s| {
                if let Some(st) = s.borrow_mut().as_mut() {
                    st.scope.pop();
                }
            });
        }
    }
}

fn full_name(st: &State, name: &str) -> String {
    if st.scope.is_empty() {
        name.to_string()
    } else if name.is_empty() {
        st.scope.join(".")
    } else {
        format!("{}.{name}", st.scope.join("."))
    }
}

/// Records `t` as `name` (inside the current scope; `""` names the scope itself) and returns
/// it, perturbed if the recorder says so. The taps, in forward order: `word_embeddings`;
/// per layer `layers.N.input_layernorm`, `.attention.query` / `.key` (after QK-norm and RoPE),
/// `.attention.value`, `.attention.core` (softmax(QKᵀ)V), `.attention` (after `dense`),
/// `.post_attention_layernorm`, then `.mlp`, or `.moe.gate` (router logits),
/// `.moe.experts_chosen` (the chosen expert ids) and `.moe`, and `layers.N` (the layer's
/// output); `norm`; `lm_head` (logits).
pub fn tap<const D: usize>(name: &str, t: Tensor<D>) -> Tensor<D> {
    let Some((full, delta)) = STATE.with(|s| {
        s.borrow().as_ref().filter(|st| !st.router_only).map(|st| {
            let full = full_name(st, name);
            let delta = st
                .perturb
                .as_ref()
                .filter(|p| p.name == full)
                .map(|p| p.delta);
            (full, delta)
        })
    }) else {
        return t;
    };
    let t = match delta {
        Some(delta) => t + delta,
        None => t,
    };
    record(full, t.dims().to_vec(), t.clone().into_data());
    t
}

/// Records integer ids (the router's choices) as `name`.
pub fn tap_ids(name: &str, ids: &[i64], shape: Vec<usize>) {
    if !active() {
        return;
    }
    let full = STATE.with(|s| s.borrow().as_ref().map(|st| full_name(st, name)));
    if let Some(full) = full {
        let data = TensorData::new(ids.to_vec(), shape.clone());
        record(full, shape, data);
    }
}

/// Records an integer tensor.
pub fn tap_int<const D: usize>(name: &str, t: &Tensor<D, Int>) {
    if active() {
        let ids: Vec<i64> = t.clone().into_data().iter::<i64>().collect();
        tap_ids(name, &ids, t.dims().to_vec());
    }
}

fn record(name: String, shape: Vec<usize>, data: TensorData) {
    let values = data.iter::<f32>().collect();
    STATE.with(|s| {
        if let Some(st) = s.borrow_mut().as_mut() {
            st.taps.push(Tapped {
                name,
                shape,
                values,
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn taps_are_named_by_scope_recorded_in_order_and_perturbed_by_name() {
        let device = Device::default();
        let x = Tensor::<1>::from_floats([1.0, 2.0], &device);
        // Not recording: the tensor passes through untouched and nothing is kept.
        let y = tap("free", x.clone());
        assert_eq!(y.into_data().iter::<f32>().collect::<Vec<_>>(), [1.0, 2.0]);

        let rec = Recorder::start(Some(Perturbation {
            name: "layers.1.mlp".into(),
            delta: 0.5,
        }));
        tap("word_embeddings", x.clone());
        {
            let _layer = scope(|| "layers.1".into());
            let out = tap("mlp", x.clone());
            assert_eq!(
                out.into_data().iter::<f32>().collect::<Vec<_>>(),
                [1.5, 2.5]
            );
            tap_ids("moe.experts_chosen", &[3, 0], vec![1, 2]);
            tap("", x.clone());
        }
        tap("norm", x);
        let taps = rec.finish();
        let names: Vec<&str> = taps.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "word_embeddings",
                "layers.1.mlp",
                "layers.1.moe.experts_chosen",
                "layers.1",
                "norm"
            ]
        );
        assert_eq!(taps[1].values, [1.5, 2.5]);
        assert_eq!(taps[2].values, [3.0, 0.0]);
        assert_eq!(taps[2].shape, [1, 2]);
        assert!(!active());
    }
}
