//! Fused and grouped ops the model calls in place of plain Burn compositions, through Burn's
//! backend-extension mechanism: an extension trait, a kernel per backend, and a hand-written
//! backward for autodiff. Each op here has a plain composition beside it — the reference path
//! the kernel is tested against — and a backend without a kernel takes that path.
//!
//! `NUWA_KERNELS=reference` switches every op back to its reference path (to compare, or to
//! rule a kernel out when chasing a difference).

pub mod cross_entropy;
pub mod grouped;
pub mod rms_norm;
#[cfg(feature = "flex")]
pub mod simd;
pub mod swiglu;

use std::sync::OnceLock;

/// Whether the kernels are in use (not `NUWA_KERNELS=reference`), read once per process.
pub fn kernels_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("NUWA_KERNELS").map_or(true, |v| v != "reference"))
}
