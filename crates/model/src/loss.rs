//! Next-token cross-entropy.

use burn::tensor::{Int, Tensor};

/// Mean cross-entropy of `logits` `[batch, seq, vocab]` against `targets` `[batch, seq]`
/// (one fused op where the backend has the kernel: `kernels::cross_entropy`).
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, t, v] = logits.dims();
    crate::kernels::cross_entropy::cross_entropy(
        logits.reshape([b * t, v]),
        targets.reshape([b * t]),
    )
}
