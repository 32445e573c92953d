//! Inference products `x [m, k] · w [k, n]` (activations by a weight). Decoding a batch makes
//! many such products with few rows (one per sequence); measured on the serving model's
//! shapes, Burn's flex `matmul` runs them at ~45 GF/s, and `gemm` (which packs the weight on
//! every call) at ~107 at 32 rows. Here, for up to [`SKINNY_ROWS`] rows and a weight stored
//! row by row, each task owns a strip of 64 output columns: it streams the strip of the weight
//! once from memory and keeps a 4-row × 64-column tile of the output in registers while it
//! walks `k`, so the weight is read once and every load feeds four FMAs. Taller products go to
//! `gemm` with the transposed problem (`wᵀ · xᵀ`, the long side as gemm's `m`). Inference only:
//! no backward.

use burn::tensor::Tensor;

/// The product on the kernel where the backend has it (flex, not under autodiff), else Burn's.
pub fn product(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    #[cfg(feature = "flex")]
    {
        let ([m, k], n) = (x.dims(), w.dims()[1]);
        // Tiny products stay on Burn's path: a parallel call costs more than they do.
        if m > 1 && m * k * n >= 1 << 18 && super::runs_on(&x) && !x.device().is_autodiff() {
            return flex::product(x, w);
        }
    }
    x.matmul(w)
}

/// Rows up to which the strip kernel runs (above, `gemm`).
pub const SKINNY_ROWS: usize = 64;

/// Vectors per row of a register tile (a strip is this many SIMD vectors wide), and rows per
/// tile: 4 × 4 accumulators plus 4 weight vectors and a broadcast fit the 32 AVX-512 registers
/// (and nearly the 16 of AVX2).
#[cfg(feature = "flex")]
const VECS: usize = 4;
#[cfg(feature = "flex")]
const TILE: usize = 4;

/// One task: `out [m, n] = x · w` over one strip of output columns. `x` is read at
/// `x[i * xr + kk * xc]`, `w` row-major with row stride `ldw`, `out` has row stride `ldo`.
#[cfg(feature = "flex")]
struct Strip<'a> {
    x: &'a [f32],
    xr: usize,
    xc: usize,
    m: usize,
    k: usize,
    w: &'a [f32],
    ldw: usize,
    j0: usize,
    out: *mut f32,
    ldo: usize,
}

#[cfg(feature = "flex")]
impl pulp::WithSimd for Strip<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let mut m0 = 0;
        while m0 + TILE <= self.m {
            self.tile::<S, TILE>(simd, m0);
            m0 += TILE;
        }
        while m0 + 2 <= self.m {
            self.tile::<S, 2>(simd, m0);
            m0 += 2;
        }
        while m0 < self.m {
            self.tile::<S, 1>(simd, m0);
            m0 += 1;
        }
    }
}

#[cfg(feature = "flex")]
impl Strip<'_> {
    /// Columns one strip covers on this SIMD width.
    fn width<S: pulp::Simd>() -> usize {
        VECS * S::F32_LANES
    }

    /// Rows `m0..m0 + R` of the strip: the tile's accumulators stay in registers while `k` is
    /// walked, each weight vector loaded once and used by every row.
    #[inline(always)]
    fn tile<S: pulp::Simd, const R: usize>(&self, simd: S, m0: usize) {
        let width = Self::width::<S>();
        let mut acc = [[simd.splat_f32s(0.0); VECS]; R];
        // The strip's columns of every weight row, and the tile's rows of `x`, checked once:
        // the loop below reads them through pointers.
        assert!(self.k == 0 || (self.k - 1) * self.ldw + self.j0 + width <= self.w.len());
        assert!(self.k == 0 || (m0 + R - 1) * self.xr + (self.k - 1) * self.xc < self.x.len());
        let w = self.w.as_ptr();
        let x = self.x.as_ptr();
        for kk in 0..self.k {
            // SAFETY: in bounds by the asserts above; unaligned reads of whole vectors.
            let b: [S::f32s; VECS] = std::array::from_fn(|v| unsafe {
                std::ptr::read_unaligned(
                    w.add(kk * self.ldw + self.j0 + v * S::F32_LANES) as *const S::f32s
                )
            });
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: in bounds by the asserts above.
                let a = simd.splat_f32s(unsafe { *x.add((m0 + i) * self.xr + kk * self.xc) });
                for v in 0..VECS {
                    acc[v] = simd.mul_add_f32s(a, b[v], acc[v]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: this task alone writes columns `j0..j0 + width` of `out`'s rows, which
            // are inside `out` (`ldo` apart).
            let dst = unsafe {
                std::slice::from_raw_parts_mut(self.out.add((m0 + i) * self.ldo + self.j0), width)
            };
            let (dst, _) = S::as_mut_simd_f32s(dst);
            dst[..VECS].copy_from_slice(acc);
        }
    }
}

/// Columns `j0..n` (those past the last full strip), plainly.
#[cfg(feature = "flex")]
#[allow(clippy::too_many_arguments)]
fn rest(
    x: &[f32],
    (xr, xc): (usize, usize),
    m: usize,
    k: usize,
    w: &[f32],
    ldw: usize,
    j0: usize,
    n: usize,
    out: &mut [f32],
) {
    for i in 0..m {
        for j in j0..n {
            let mut s = 0.0;
            for kk in 0..k {
                s += x[i * xr + kk * xc] * w[kk * ldw + j];
            }
            out[i * n + j] = s;
        }
    }
}

#[cfg(feature = "flex")]
mod flex {
    use super::{rest, Strip, SKINNY_ROWS};
    use crate::kernels::flex_tensor::readable;
    use burn::backend::flex::{Flex, FlexTensor};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{backend_extension, Dispatch};
    use burn::tensor::{Tensor, TensorData};
    use rayon::prelude::*;

    #[backend_extension(Flex)]
    pub trait SkinnyOps: burn::backend::Backend {
        fn skinny_product(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
    }

    pub fn product(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
        let out = <Dispatch as SkinnyOps>::skinny_product(x.into_dispatch(), w.into_dispatch());
        Tensor::from_dispatch(out)
    }

    impl SkinnyOps for Flex {
        fn skinny_product(x: FlexTensor, w: FlexTensor) -> FlexTensor {
            let (x, w) = (readable(x), readable(w));
            let (xs, ws) = (x.layout().strides(), w.layout().strides());
            let (m, k) = (x.layout().shape()[0], x.layout().shape()[1]);
            let n = w.layout().shape()[1];
            let xd = &x.storage::<f32>()[x.layout().start_offset()..];
            let wd = &w.storage::<f32>()[w.layout().start_offset()..];
            let mut out = vec![0f32; m * n];
            if m <= SKINNY_ROWS && ws[1] == 1 && xs.iter().all(|&s| s >= 0) {
                let (xr, xc, ldw) = (xs[0] as usize, xs[1] as usize, ws[0] as usize);
                struct Out(*mut f32);
                // SAFETY: each task writes only its own strip of columns of `out`.
                unsafe impl Sync for Out {}
                let base = Out(out.as_mut_ptr());
                let arch = pulp::Arch::new();
                struct Width;
                impl pulp::WithSimd for Width {
                    type Output = usize;
                    fn with_simd<S: pulp::Simd>(self, _: S) -> usize {
                        Strip::width::<S>()
                    }
                }
                let width = arch.dispatch(Width);
                let full = n / width;
                (0..full).into_par_iter().for_each(|s| {
                    let out = &base;
                    arch.dispatch(Strip {
                        x: xd,
                        xr,
                        xc,
                        m,
                        k,
                        w: wd,
                        ldw,
                        j0: s * width,
                        out: out.0,
                        ldo: n,
                    });
                });
                rest(xd, (xr, xc), m, k, wd, ldw, full * width, n, &mut out);
                return FlexTensor::from_data(TensorData::new(out, [m, n]));
            }
            let threads = rayon::current_num_threads();
            // Row-major `out [m, n]` is column-major `outᵀ [n, m]`: gemm computes
            // `outᵀ = wᵀ · xᵀ` with `n` as its long side, where its kernels tile best.
            // SAFETY: every pointer and stride describes memory of the shapes given (the
            // layouts' own strides, checked non-negative), and `out` is exclusively ours.
            unsafe {
                gemm::gemm(
                    n,
                    m,
                    k,
                    out.as_mut_ptr(),
                    n as isize,
                    1,
                    false,
                    wd.as_ptr(),
                    ws[0],
                    ws[1],
                    xd.as_ptr(),
                    xs[0],
                    xs[1],
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                );
            }
            FlexTensor::from_data(TensorData::new(out, [m, n]))
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor};

    /// The kernel equals Burn's product, for a plain weight and for a transposed view of one
    /// (a tied LM head reads the embedding transposed).
    #[test]
    fn equals_burns_matmul() {
        let device = Device::default();
        for rows in [1, 2, 5, 33, 300] {
            let x = Tensor::<2>::random([rows, 24], Distribution::Default, &device);
            let w = Tensor::<2>::random([24, 400], Distribution::Default, &device);
            let wt = Tensor::<2>::random([400, 24], Distribution::Default, &device).transpose();
            for w in [w, wt] {
                let want = x.clone().matmul(w.clone());
                let got = super::product(x.clone(), w);
                let diff = (got - want).abs().max().into_scalar::<f32>();
                assert!(diff < 1e-5, "rows {rows}: {diff}");
            }
        }
    }
}
