//! A pipeline stage's part of the model: a contiguous run of decoder layers, with the token
//! embeddings on the first stage and the final norm and LM head on the last. A stage holds
//! only its own parameters — the others are never allocated (Burn's parameters are lazy) —
//! and initialises them exactly as the whole model would (each parameter's values depend only
//! on the seed and its path), so a pipeline starts from the same weights as one process.

use crate::layers::INIT_STD;
use crate::{LanguageModel, ModelConfig, Positions, RouterStats};
use burn::tensor::{Device, Int, Tensor};
use std::ops::Range;

/// Which part of the model a pipeline stage runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub layers: Range<usize>,
    /// Holds the token embeddings (the first stage).
    pub first: bool,
    /// Holds the final norm and the LM head (the last stage).
    pub last: bool,
}

impl Stage {
    /// Stage `s` of stages holding `layers[i]` decoder layers each, in order.
    pub fn of(layers: &[usize], s: usize) -> Self {
        let start: usize = layers[..s].iter().sum();
        Self {
            layers: start..start + layers[s],
            first: s == 0,
            last: s + 1 == layers.len(),
        }
    }

    /// Whether the parameter at `path` belongs to this stage.
    pub fn owns(&self, path: &str) -> bool {
        if let Some(rest) = path.strip_prefix("layers.") {
            let index = rest.split('.').next().and_then(|i| i.parse::<usize>().ok());
            return index.is_some_and(|i| self.layers.contains(&i));
        }
        if path.starts_with("word_embeddings.") {
            return self.first;
        }
        // The final norm, the LM head (and MTP layers, which a pipeline refuses).
        self.last
    }
}

/// What a stage's forward pass starts from.
pub enum StageInput {
    /// The first stage: token ids `[batch, len]`.
    Tokens(Tensor<2, Int>),
    /// Any other: the previous stage's hidden states `[batch, len, hidden]`.
    Hidden(Tensor<3>),
}

impl LanguageModel {
    /// The parameters of `stage` initialised from `seed` as [`LanguageModel::new`] would, the
    /// rest of the model unallocated.
    pub fn new_stage(cfg: &ModelConfig, stage: &Stage, device: &Device, seed: u64) -> Self {
        crate::init::init_weights_where(Self::uninitialised(cfg, device), seed, INIT_STD, &|p| {
            stage.owns(p)
        })
    }

    /// The parameters this process holds — `stage`'s (all without one) with only `group`'s
    /// share of the routed experts (all without one) — initialised from `seed` with the values
    /// [`LanguageModel::new`] gives them; nothing else is allocated.
    pub fn new_part(
        cfg: &ModelConfig,
        device: &Device,
        seed: u64,
        stage: Option<&Stage>,
        group: Option<&crate::expert_parallel::ExpertGroup>,
    ) -> Self {
        let mut model = Self::uninitialised(cfg, device);
        let experts = group.map(|g| (&g.placement, g.member()));
        if let Some(g) = group {
            let local = g.local_experts().len();
            let (h, w) = (cfg.hidden_size, cfg.moe_intermediate_size);
            let w = g.placement.column_range(g.member(), w).len();
            for moe in model.moe_layers_mut() {
                moe.experts = crate::moe::Experts::new(local, h, w, device);
                moe.expert_group = Some(g.clone());
            }
        }
        let keep = |p: &str| stage.is_none_or(|s| s.owns(p));
        crate::init::init_weights_sharded(model, seed, INIT_STD, &keep, experts)
    }

    /// Training's forward pass through one stage: the stage's layers on the tokens
    /// (embedded) or the previous stage's hidden states; on the last stage, then the final
    /// norm and the LM head (logits `[batch, len, vocab]`), else the hidden states.
    pub fn forward_stage(&self, input: StageInput, stage: &Stage) -> (Tensor<3>, Vec<RouterStats>) {
        let mut x = match input {
            StageInput::Tokens(tokens) => self
                .embedding_dropout
                .forward(self.word_embeddings.forward(tokens)),
            StageInput::Hidden(h) => h,
        };
        let [_, len, _] = x.dims();
        let (cos, sin) = self.rope.angles(&Positions::Span(0), len, &x.device());
        let mut router = Vec::new();
        for index in stage.layers.clone() {
            let (y, stats) = self.layers[index].forward(x, &cos, &sin, index, None);
            x = y;
            router.extend(stats);
        }
        if stage.last {
            x = self.head(self.norm.forward(x));
        }
        (x, router)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_own_their_layers_and_the_ends() {
        let (first, last) = (Stage::of(&[3, 1], 0), Stage::of(&[3, 1], 1));
        assert_eq!((first.layers.clone(), last.layers.clone()), (0..3, 3..4));
        assert!(first.owns("word_embeddings.weight") && !last.owns("word_embeddings.weight"));
        assert!(first.owns("layers.2.attention.dense.weight"));
        assert!(!first.owns("layers.3.attention.dense.weight"));
        assert!(last.owns("layers.3.moe.experts.gate_proj") && last.owns("lm_head.weight"));
        assert!(!first.owns("norm.weight"));
    }
}
