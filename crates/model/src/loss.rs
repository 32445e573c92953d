//! Next-token cross-entropy.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

/// Mean cross-entropy of `logits` `[batch, seq, vocab]` against `targets` `[batch, seq]`.
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, t, v] = logits.dims();
    let log_probs = log_softmax(logits.reshape([b * t, v]), 1);
    log_probs
        .gather(1, targets.reshape([b * t, 1]))
        .mean()
        .neg()
}
