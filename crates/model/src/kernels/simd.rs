//! Elementwise math for the CPU kernels, written so the compiler vectorises it: branch-free
//! scalar functions inlined into loops that run under the widest instruction set the CPU has
//! (`pulp`'s runtime dispatch: AVX-512, AVX2+FMA, or baseline), over rayon's threads.

use rayon::prelude::*;

/// Elements per parallel task: large enough to amortise scheduling, small enough to spread.
const CHUNK: usize = 1 << 16;

/// `e^x` to within ~2 ulp for normal results: `2^n · e^r` with `n = round(x / ln 2)` and a
/// degree-6 polynomial for `e^r` on `|r| ≤ ln 2 / 2`. Below −87.3 (results under f32's normal
/// range) it returns 0, so `exp(−∞) = 0` as a softmax mask needs; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2²³ rounds to an integer held in the mantissa's low bits.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.3, 88.7);
    let t = clamped * LOG2_E + ROUND;
    let n = t - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let exponent = (t.to_bits() as i32 - 0x4B40_0000 + 127) << 23;
    let y = p * f32::from_bits(exponent as u32);
    if x < -87.3 {
        0.0
    } else {
        y
    }
}

/// `1 / (1 + e^−x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// One parallel task of [`for_chunks`]: a chunk of each output and of each input.
type Task<'a, const I: usize, const O: usize> = ([&'a mut [f32]; O], [&'a [f32]; I]);

/// Runs `f` on aligned chunks of the outputs and inputs, in parallel, each chunk under the
/// CPU's widest SIMD. Every slice has the length of `out`.
pub fn for_chunks<const I: usize, const O: usize>(
    outs: [&mut [f32]; O],
    ins: [&[f32]; I],
    f: impl Fn([&mut [f32]; O], [&[f32]; I]) + Sync,
) {
    let len = outs.first().map_or(0, |o| o.len());
    debug_assert!(outs.iter().all(|o| o.len() == len) && ins.iter().all(|i| i.len() == len));
    let mut out_chunks: Vec<std::slice::ChunksMut<'_, f32>> =
        outs.into_iter().map(|o| o.chunks_mut(CHUNK)).collect();
    let tasks: Vec<Task<'_, I, O>> = (0..len.div_ceil(CHUNK))
        .map(|c| {
            let outs: [&mut [f32]; O] =
                std::array::from_fn(|k| out_chunks[k].next().unwrap_or_default());
            let start = c * CHUNK;
            let end = (start + CHUNK).min(len);
            (outs, ins.map(|i| &i[start..end]))
        })
        .collect();
    let arch = pulp::Arch::new();
    tasks
        .into_par_iter()
        .for_each(|(outs, ins)| arch.dispatch(|| f(outs, ins)));
}

/// Sum of `f(x)` over `xs`, with 16 independent accumulators so the loop vectorises (a single
/// running sum is a dependency chain the compiler may not reorder).
#[inline(always)]
pub fn sum_map(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for k in 0..16 {
            acc[k] += f(c[k]);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    acc.iter().sum::<f32>() + tail
}

/// Largest of `xs` (−∞ for none), vectorisable.
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for k in 0..16 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    acc.iter().fold(tail, |m, &x| m.max(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_libm_over_the_whole_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(
            worst < 4.0 * f32::EPSILON as f64,
            "worst relative error {worst}"
        );
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn reductions_match_the_plain_loops() {
        let xs: Vec<f32> = (0..1001)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let plain: f32 = xs.iter().map(|&x| x * 2.0).sum();
        assert!((sum_map(&xs, |x| x * 2.0) - plain).abs() < 1e-3);
        assert_eq!(max(&xs), xs.iter().copied().fold(f32::MIN, f32::max));
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }
}
