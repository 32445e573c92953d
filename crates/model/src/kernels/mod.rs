//! Fused and grouped ops the model calls in place of plain Burn compositions, through Burn's
//! backend-extension mechanism: an extension trait, a kernel per backend, and a hand-written
//! backward for autodiff. Each op here has a plain composition beside it — the reference path
//! the kernel is tested against — and a backend without a kernel takes that path.
//!
//! `NUWA_KERNELS=reference` switches every op back to its reference path (to compare, or to
//! rule a kernel out when chasing a difference).

pub mod adamw;
pub mod attention;
#[cfg(all(feature = "flex", target_arch = "x86_64"))]
pub mod bf16_gemm;
pub mod bf16_matmul;
pub mod cross_entropy;
#[cfg(feature = "flex")]
mod flex_tensor;
pub mod grouped;
pub mod rms_norm;
pub mod rope;
#[cfg(feature = "flex")]
pub mod simd;
pub mod skinny;
pub mod swiglu;

use std::sync::OnceLock;

/// `e^x` for host loops outside the flex kernels (sampling, paged attention): the vectorisable
/// polynomial of [`simd::exp`] where the CPU kernels are built, else libm's.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    #[cfg(feature = "flex")]
    return simd::exp(x);
    #[cfg(not(feature = "flex"))]
    return x.exp();
}

/// Whether the kernels are in use (not `NUWA_KERNELS=reference`), read once per process.
pub fn kernels_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("NUWA_KERNELS").map_or(true, |v| v != "reference"))
}

/// Whether the kernels run on `t`: f32 (what they are written for) on a device with kernels.
pub fn runs_on<const D: usize>(t: &burn::tensor::Tensor<D>) -> bool {
    t.dtype() == burn::tensor::DType::F32 && has_kernel(&t.device())
}

thread_local! {
    static REFERENCE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every op this thread dispatches on its reference composition, as
/// `NUWA_KERNELS=reference` does for a whole process (`nuwa parity --devices cpu,cpu-reference`
/// compares the two paths in one process).
pub fn with_reference_path<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            REFERENCE_ONLY.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(REFERENCE_ONLY.with(|r| r.replace(true)));
    f()
}

/// Whether the kernels run on `device` (flex, directly or under autodiff, and not switched
/// off); elsewhere every op takes its reference composition.
pub fn has_kernel(device: &burn::tensor::Device) -> bool {
    #[cfg(feature = "flex")]
    if kernels_enabled() && !REFERENCE_ONLY.with(|r| r.get()) && flex_tensor::is_flex(device) {
        return true;
    }
    let _ = device;
    false
}

/// Test inputs: `len` values in `[−scale/2, scale/2)`, a pure function of `seed`. Made on the
/// host because the device RNG is shared by tests running in parallel.
#[cfg(test)]
pub(crate) fn test_values(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let h = nuwa_core::rng::splitmix64(seed.wrapping_mul(1_000_003) + i as u64);
            ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

/// Asserts `got` and `want` hold the same number of values (at least one) and each pair is
/// within `tol · (1 + |want|)`; `what` names the tensor and case in the message.
#[cfg(test)]
pub(crate) fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    assert!(!got.is_empty(), "{what}: no values");
    for (i, (x, y)) in got.iter().zip(want).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}
