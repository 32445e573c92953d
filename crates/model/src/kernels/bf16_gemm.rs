//! `C = A·B` with A and B rounded to bf16 and products summed in f32, on CPUs with
//! AVX512-BF16 (`vdpbf16ps`: 16 lanes, each adding two bf16 products into an f32 — twice the
//! multiply-adds of an f32 FMA per instruction).
//!
//! A and B are packed once per product: A into panels of [`MR`] rows, B into panels of [`NR`]
//! columns, each as bf16 pairs along k (`(x[k], x[k + 1])` in one 32-bit word, the layout
//! `vdpbf16ps` multiplies), zero-padded to whole panels and an even k. Either operand may be
//! read transposed (strides), so the three products of a linear layer — `x·w`, `dy·wᵀ`, `xᵀ·dy`
//! — take the same path. The microkernel keeps an `MR × NR` block of C in 24 registers and
//! walks k two at a time: one broadcast of an A pair per row, one load of B pairs per 16
//! columns. Bands of C rows are spread over rayon's threads, a block of B panels sized for L2
//! at a time.

use rayon::prelude::*;
use std::arch::x86_64::*;

/// Rows of C per microkernel call.
pub const MR: usize = 8;
/// Columns of C per microkernel call (three 16-lane registers).
pub const NR: usize = 48;

/// A matrix read in place: `at(i, j) = data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `[rows, cols]`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }
    /// The transpose, read in place.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
    #[cfg(test)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }
}

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512f")
}

/// f32 to bf16, rounding to nearest even (as `vcvtne2ps2bf16`); NaN stays NaN.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// Pairs along k per packed row or column: k rounded up to even, halved.
fn pairs(k: usize) -> usize {
    k.div_ceil(2)
}

/// Packs `width` lines of `m` (rows of A when `by_row`, columns of B otherwise) starting at
/// `first`, as `[pair][line]` words of bf16 pairs, zero beyond the matrix.
fn pack_panel(m: &Mat, first: usize, width: usize, by_row: bool, out: &mut [u32]) {
    // Element (line, kk) sits at data[line · ls + kk · ks].
    let (k, lines, ls, ks) = if by_row {
        (m.cols, m.rows, m.row_stride, m.col_stride)
    } else {
        (m.rows, m.cols, m.col_stride, m.row_stride)
    };
    let present = lines.saturating_sub(first).min(width);
    let pair = |lo: f32, hi: f32| to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16;
    out.fill(0);
    if ks == 1 {
        // Each line contiguous along k.
        for l in 0..present {
            let at = (first + l) * ls;
            let line = &m.data[at..at + k];
            let mut pairs = line.chunks_exact(2);
            for (p, two) in (&mut pairs).enumerate() {
                out[p * width + l] = pair(two[0], two[1]);
            }
            if let [last] = pairs.remainder() {
                out[(k / 2) * width + l] = pair(*last, 0.0);
            }
        }
    } else if ls == 1 {
        // Each k contiguous along the lines: two k's at a time, interleaved.
        for (p, words) in out.chunks_exact_mut(width).enumerate() {
            let row = |kk: usize| {
                let at = kk * ks + first;
                (kk < k).then(|| &m.data[at..at + present])
            };
            match (row(2 * p), row(2 * p + 1)) {
                (Some(lo), Some(hi)) => {
                    for ((w, &a), &b) in words.iter_mut().zip(lo).zip(hi) {
                        *w = pair(a, b);
                    }
                }
                (Some(lo), None) => {
                    for (w, &a) in words.iter_mut().zip(lo) {
                        *w = pair(a, 0.0);
                    }
                }
                _ => {}
            }
        }
    } else {
        for (p, words) in out.chunks_exact_mut(width).enumerate() {
            for (l, w) in words.iter_mut().take(present).enumerate() {
                let get = |kk: usize| {
                    if kk < k {
                        m.data[(first + l) * ls + kk * ks]
                    } else {
                        0.0
                    }
                };
                *w = pair(get(2 * p), get(2 * p + 1));
            }
        }
    }
}

/// `c[m, n] (+)= a[m, k] · b[k, n]` in bf16 × bf16 → f32, `c` row-major with row stride `n`.
/// Call only where [`available`]; `accumulate` adds to `c` instead of overwriting it.
pub fn matmul(c: &mut [f32], a: Mat, b: Mat, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions");
    assert!(c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    let kp = pairs(k);
    let (row_panels, col_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    let mut a_packed = vec![0u32; row_panels * kp * MR];
    let mut b_packed = vec![0u32; col_panels * kp * NR];
    a_packed
        .par_chunks_mut(kp * MR)
        .enumerate()
        .for_each(|(i, out)| pack_panel(&a, i * MR, MR, true, out));
    b_packed
        .par_chunks_mut(kp * NR)
        .enumerate()
        .for_each(|(j, out)| pack_panel(&b, j * NR, NR, false, out));
    // Column panels go in blocks that stay in each core's L2 while every band of MR rows of C
    // (one task each) runs across them.
    const L2_SHARE: usize = 256 * 1024;
    let per_block = (L2_SHARE / (kp * NR * 4)).max(1);
    for (block_index, b_block) in b_packed.chunks(per_block * kp * NR).enumerate() {
        let first_panel = block_index * per_block;
        c[..m * n]
            .par_chunks_mut(MR * n)
            .zip(a_packed.par_chunks(kp * MR))
            .for_each(|(c_band, a_panel)| {
                let rows = c_band.len() / n;
                for (jj, b_panel) in b_block.chunks_exact(kp * NR).enumerate() {
                    let col = (first_panel + jj) * NR;
                    let cols = NR.min(n - col);
                    let mut block = [0.0f32; MR * NR];
                    // SAFETY: `available()` was checked by the caller; the panels hold kp
                    // words per line, as the microkernel reads.
                    unsafe { microkernel(kp, a_panel, b_panel, &mut block) };
                    for r in 0..rows {
                        let dst = &mut c_band[r * n + col..r * n + col + cols];
                        let src = &block[r * NR..r * NR + cols];
                        if accumulate {
                            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                        } else {
                            dst.copy_from_slice(src);
                        }
                    }
                }
            });
    }
}

/// `block[MR][NR] = Σ_p a[p][0..MR] · b[p][0..NR]` over `kp` packed pairs.
#[target_feature(enable = "avx512bf16,avx512f,avx512vl")]
unsafe fn microkernel(kp: usize, a: &[u32], b: &[u32], block: &mut [f32; MR * NR]) {
    debug_assert!(a.len() >= kp * MR && b.len() >= kp * NR);
    let mut acc = [[_mm512_setzero_ps(); 3]; MR];
    let (mut ap, mut bp) = (a.as_ptr(), b.as_ptr());
    for _ in 0..kp {
        // SAFETY: p < kp, inside the panels (checked above).
        unsafe {
            let b0 = _mm512_castsi512_ph_bf16(_mm512_loadu_si512(bp as *const _));
            let b1 = _mm512_castsi512_ph_bf16(_mm512_loadu_si512(bp.add(16) as *const _));
            let b2 = _mm512_castsi512_ph_bf16(_mm512_loadu_si512(bp.add(32) as *const _));
            for (r, row) in acc.iter_mut().enumerate() {
                let a_pair = _mm512_castsi512_ph_bf16(_mm512_set1_epi32(*ap.add(r) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], a_pair, b0);
                row[1] = _mm512_dpbf16_ps(row[1], a_pair, b1);
                row[2] = _mm512_dpbf16_ps(row[2], a_pair, b2);
            }
            ap = ap.add(MR);
            bp = bp.add(NR);
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, reg) in row.iter().enumerate() {
            // SAFETY: 16 floats at r·NR + 16v < MR·NR.
            unsafe { _mm512_storeu_ps(block.as_mut_ptr().add(r * NR + 16 * v), *reg) };
        }
    }
}

/// `_mm512_castsi512_ph`'s bf16 counterpart: the same 512 bits seen as 32 bf16.
#[inline(always)]
unsafe fn _mm512_castsi512_ph_bf16(x: __m512i) -> __m512bh {
    // SAFETY: both are 512 bits of plain data.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(seed: u64, n: usize) -> Vec<f32> {
        crate::kernels::test_values(seed, n, 2.0)
    }

    /// The same product in f64 from the bf16-rounded inputs.
    fn reference(a: &Mat, b: &Mat) -> Vec<f64> {
        let round = |x: f32| f32::from_bits((to_bf16(x) as u32) << 16) as f64;
        let mut c = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                c[i * b.cols + j] = (0..a.cols)
                    .map(|k| round(a.at(i, k)) * round(b.at(k, j)))
                    .sum();
            }
        }
        c
    }

    #[test]
    fn products_match_f64_on_the_rounded_inputs_every_layout_and_edge() {
        if !available() {
            eprintln!("no AVX512-BF16 on this CPU: nothing to test");
            return;
        }
        for (m, k, n) in [
            (1, 1, 1),
            (3, 5, 7),
            (8, 2, 48),
            (17, 33, 50),
            (64, 129, 100),
        ] {
            let (av, bv) = (values(1, m * k), values(2, k * n));
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = if ta {
                    Mat::rows(&av, k, m).t()
                } else {
                    Mat::rows(&av, m, k)
                };
                let b = if tb {
                    Mat::rows(&bv, n, k).t()
                } else {
                    Mat::rows(&bv, k, n)
                };
                let want = reference(&a, &b);
                let mut c = vec![1.0f32; m * n];
                matmul(&mut c, a, b, true);
                for (got, want) in c.iter().zip(&want) {
                    let err = (*got as f64 - 1.0 - want).abs();
                    assert!(
                        err <= 1e-4 * (1.0 + want.abs()),
                        "{m}x{k}x{n} {ta} {tb}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2⁻⁸ is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(f32::from_bits((to_bf16(f32::NAN) as u32) << 16).is_nan());
    }
}
