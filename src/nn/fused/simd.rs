//! Vectorised arithmetic the kernels share: a branch-free e^x, the AVX2 + FMA dispatch, and
//! sums and maxima kept in lanes so that they vectorise and do not depend on the thread count.

#[allow(unused_imports)]
use super::*;

/// e^x for f32 without a branch or a libm call, so that loops over slices vectorise: x = n ln2 + r
/// with |r| <= ln2/2, e^r by Cephes' expf polynomial, 2^n through the exponent bits. Relative
/// error below 1.5e-7 against the exact value (tested). Inputs are clamped to [-87, 88]: results below
/// e^-87 (1.6e-38) are returned as e^-87, where softmax and erf only ever add them to numbers >= 1.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer in f32 arithmetic.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n: adding ROUND + 127 leaves n + 127 in the low mantissa bits, shifted into the exponent.
    // Unlike `n as i32`, whose saturating conversion stops the loop from vectorising.
    e * f32::from_bits((n + (ROUND + 127.0)).to_bits() << 23)
}

/// Runs `kernel` compiled for AVX2 and FMA where the CPU has them (x86-64 builds target the
/// 2003 baseline, SSE2, whose 4-lane vectors halve the speed of the exp and erf loops). The
/// results are bit-identical either way: Rust never contracts a multiply and an add into an
/// FMA, and the features change the width of the vector instructions, not the arithmetic. The
/// kernel must be a closure the compiler can inline, or it runs as compiled for the baseline.
#[inline(always)]
pub fn simd<R>(kernel: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(kernel: impl FnOnce() -> R) -> R {
            kernel()
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features `avx2` is compiled for (checked just above).
            return unsafe { avx2(kernel) };
        }
    }
    kernel()
}

/// Partial sums kept per lane: a single running sum is one chain of dependent adds, which
/// neither vectorises nor overlaps its latency.
pub(super) const LANES: usize = 8;

/// The sums over paired elements of `a` and `b` of the `K` terms `f` returns, accumulated in `T`
/// (f32 for rows of a few hundred values, f64 for BatchNorm's channels of up to 10^5). The lanes
/// are added in a fixed order, so the result does not depend on the thread count either.
#[inline(always)]
pub(super) fn sums<T, const K: usize>(a: &[f32], b: &[f32], f: impl Fn(T, T) -> [T; K]) -> [T; K]
where
    T: Copy + Default + std::ops::AddAssign + std::iter::Sum + From<f32>,
{
    let mut acc = [[T::default(); LANES]; K];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = ca.remainder().iter().zip(cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for l in 0..LANES {
            let terms = f(T::from(xa[l]), T::from(xb[l]));
            for k in 0..K {
                acc[k][l] += terms[k];
            }
        }
    }
    let mut out = acc.map(|lanes| lanes.into_iter().sum::<T>());
    for (&x, &y) in tail {
        let terms = f(T::from(x), T::from(y));
        for k in 0..K {
            out[k] += terms[k];
        }
    }
    out
}

/// The largest element (negative infinity for an empty slice), in lanes like `sums`; the
/// maximum does not depend on the order, so this only changes the speed.
#[inline(always)]
pub(super) fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    tail.iter()
        .chain(&acc)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}
