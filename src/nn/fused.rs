//! Fused CPU kernels, with hand-written backward, for the three ops that dominate a ViT step on the
//! CPU once the matmuls are fast: softmax, LayerNorm and GELU. Composed from candle ops they are
//! chains of single-threaded elementwise passes, each allocating a tensor (measured with candle
//! 0.11: softmax backward took 152 ms against torch's 2 ms for ViT-Tiny attention at 224 px).
//! Here each is one pass over rows, split across rayon's pool.
//!
//! The wrappers in `ops` use these for f32 tensors on the CPU and the composed ops everywhere else
//! (CUDA, half precision), so every device computes the same function. Work is cut into chunks of
//! a fixed number of rows and partial sums are reduced in chunk order: results do not depend on
//! the number of threads, and reruns stay bit-identical.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// About this many elements per parallel task: large enough to amortise scheduling.
const CHUNK_ELEMS: usize = 16 * 1024;

fn rows_per_chunk(d: usize) -> usize {
    (CHUNK_ELEMS / d.max(1)).max(1)
}

/// The f32 data of a contiguous tensor's storage.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &'static str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{op}: only f32 is fused"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The gradients of (x, weight, bias) from a backward kernel that writes all three into one
/// output, end to end (one kernel call instead of three); `x` is `None` where the kernel skipped
/// the input's gradient. The weight and bias gradients are copied out: as views they would keep
/// the whole buffer, the size of the activation, alive until the optimiser step, because the
/// backward pass stores a node's first gradient as it is.
fn unpack_grads(
    packed: &Tensor,
    x: Option<&Tensor>,
    w: &Tensor,
    b: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let n = x.map_or(0, |x| x.elem_count());
    let nw = w.elem_count();
    let dx = match x {
        Some(x) => Some(packed.narrow(0, 0, n)?.reshape(x.shape())?),
        None => None,
    };
    let dw = packed
        .narrow(0, n, nw)?
        .reshape(w.shape())?
        .force_contiguous()?;
    let db = packed
        .narrow(0, n + nw, b.elem_count())?
        .reshape(b.shape())?
        .force_contiguous()?;
    Ok((dx, Some(dw), Some(db)))
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

// -------------------------------------------------------------------------------------- exp

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

/// A buffer of `n` values left unzeroed, for an output or scratch that its kernel overwrites
/// whole before anything reads it, as candle's own `CpuDevice::alloc_uninit` does. Since freed
/// blocks stay in the heap (`cli::keep_freed_memory`), `vec![0.0; n]` can no longer take fresh
/// zero pages: it memsets, 5% of a ResNet-18 step's samples, nearly all of it on buffers
/// written again at once. Without it: ResNet-18 step median ratio 0.91 in 10 alternated pairs
/// (a noisy 0.76-1.32), MAE-64 0.95 in 4; the weights trained are bit-identical.
///
/// Clippy's `uninit_vec` (deny by default) is allowed here, in this one function: kernels
/// write through `&mut [f32]` slices of the buffer before anything reads it, and whether such a
/// slice may point at memory not yet written is what the Rust reference still calls a subject
/// of debate; candle-core relies on the same. Typing every kernel's output as
/// `[MaybeUninit<f32>]` would settle it by the letter, at the price of every kernel's signature.
///
/// # Safety
///
/// Every element must be written before it is read, and the buffer must not leave the op (as
/// a tensor) before then.
#[allow(clippy::uninit_vec)]
unsafe fn unzeroed(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is n; the caller writes every element before reading it.
    unsafe { v.set_len(n) };
    v
}

/// `out = f(a)` chunk by chunk: chunks of `step` elements in parallel, each through `simd`
/// (`step` a multiple of the row length keeps rows whole). `f` must write every element of its
/// output chunk before reading any: the output starts unzeroed. `f` must be `#[inline(always)]`.
#[inline(always)]
fn map_chunks(a: &[f32], step: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) -> Vec<f32> {
    // SAFETY: `f` writes each chunk whole before reading it (this function's contract, kept
    // by every caller in this file).
    let mut out = unsafe { unzeroed(a.len()) };
    out.par_chunks_mut(step)
        .zip(a.par_chunks(step))
        .for_each(|(o, a)| {
            simd(
                #[inline(always)]
                || f(o, a),
            )
        });
    out
}

/// `out = f(a, b)` chunk by chunk, as `map_chunks` (and with its contract).
#[inline(always)]
fn map_chunks2(
    (a, b): (&[f32], &[f32]),
    step: usize,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) -> Vec<f32> {
    // SAFETY: as in `map_chunks`.
    let mut out = unsafe { unzeroed(a.len()) };
    out.par_chunks_mut(step)
        .zip(a.par_chunks(step).zip(b.par_chunks(step)))
        .for_each(|(o, (a, b))| {
            simd(
                #[inline(always)]
                || f(o, a, b),
            )
        });
    out
}

// ------------------------------------------------------------------------------------- sums

/// Partial sums kept per lane: a single running sum is one chain of dependent adds, which
/// neither vectorises nor overlaps its latency.
const LANES: usize = 8;

/// The sums over paired elements of `a` and `b` of the `K` terms `f` returns, accumulated in `T`
/// (f32 for rows of a few hundred values, f64 for BatchNorm's channels of up to 10^5). The lanes
/// are added in a fixed order, so the result does not depend on the thread count either.
#[inline(always)]
fn sums<T, const K: usize>(a: &[f32], b: &[f32], f: impl Fn(T, T) -> [T; K]) -> [T; K]
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
fn max_of(x: &[f32]) -> f32 {
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

// ---------------------------------------------------------------------------------- softmax

/// Softmax over the last dimension.
pub struct SoftmaxLast;

impl CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "pretext-softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let d = last_dim(l);
        let y = map_chunks(
            x,
            rows_per_chunk(d) * d,
            #[inline(always)]
            |y, x| {
                y.copy_from_slice(x);
                softmax_rows(y, d);
            },
        );
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxLastBwd)?))
    }
}

/// dx = y * (g - sum(g * y)) per row.
struct SoftmaxLastBwd;

impl CustomOp2 for SoftmaxLastBwd {
    fn name(&self) -> &'static str {
        "pretext-softmax-last-bwd"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (slice(ys, yl, self.name())?, slice(gs, gl, self.name())?);
        let d = last_dim(yl);
        let dx = map_chunks2(
            (y, g),
            rows_per_chunk(d) * d,
            #[inline(always)]
            |dx, y, g| {
                for ((dx, y), g) in dx.chunks_mut(d).zip(y.chunks(d)).zip(g.chunks(d)) {
                    let [dot] = sums(y, g, |y: f32, g| [y * g]);
                    for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                        *dx = y * (g - dot);
                    }
                }
            },
        );
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }
}

// -------------------------------------------------------------------------------- LayerNorm

/// LayerNorm over the last dimension of `x` with `weight` and `bias` (both `[d]`), biased variance
/// as torch computes it.
pub struct LayerNormLast {
    pub eps: f32,
}

#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let [sum] = sums(x, x, |v: f32, _| [v]);
    let mean = sum / d;
    let [ss] = sums(x, x, |v: f32, _| [(v - mean) * (v - mean)]);
    (mean, 1.0 / (ss / d + eps).sqrt())
}

impl CustomOp3 for LayerNormLast {
    fn name(&self) -> &'static str {
        "pretext-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, self.name())?;
        let (w, b) = (slice(ws, wl, self.name())?, slice(bs, bl, self.name())?);
        let d = last_dim(xl);
        if w.len() != d || b.len() != d {
            candle_core::bail!(
                "{}: weight/bias of {} for rows of {d}",
                self.name(),
                w.len()
            );
        }
        let eps = self.eps;
        let y = map_chunks(
            x,
            rows_per_chunk(d) * d,
            #[inline(always)]
            |y, x| {
                for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                    let (mean, rstd) = moments(x, eps);
                    // Zipped rather than indexed: with `w[i]` the bounds checks reload the
                    // captured slices' lengths every element and the loop stays scalar.
                    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                        *y = (x - mean) * rstd * w + b;
                    }
                }
            },
        );
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(
            &w.contiguous()?,
            &g.contiguous()?,
            &LayerNormLastBwd { eps: self.eps },
        )?;
        unpack_grads(&packed, Some(x), w, b)
    }
}

struct LayerNormLastBwd {
    eps: f32,
}

impl CustomOp3 for LayerNormLastBwd {
    fn name(&self) -> &'static str {
        "pretext-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, self.name())?;
        let w = slice(ws, wl, self.name())?;
        let g = slice(gs, gl, self.name())?;
        let d = last_dim(xl);
        let n = x.len();
        let mut out = vec![0f32; n + 2 * d];
        let (dx, _) = out.split_at_mut(n);
        let step = rows_per_chunk(d) * d;
        let eps = self.eps;
        // Each chunk returns its partial dweight and dbias; summed in chunk order below.
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(step)
            .zip(x.par_chunks(step).zip(g.par_chunks(step)))
            .map(|(dx, (x, g))| {
                simd(
                    #[inline(always)]
                    || {
                        let mut acc = vec![0f32; 2 * d];
                        let mut xhat = vec![0f32; d];
                        let mut gw = vec![0f32; d];
                        for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                            let (mean, rstd) = moments(x, eps);
                            let (dw, db) = acc.split_at_mut(d);
                            let terms = xhat.iter_mut().zip(gw.iter_mut()).zip(dw.iter_mut());
                            for ((((xhat, gw), dw), db), ((&x, &g), &w)) in
                                terms.zip(db.iter_mut()).zip(x.iter().zip(g).zip(w))
                            {
                                *xhat = (x - mean) * rstd;
                                *gw = g * w;
                                *dw += g * *xhat;
                                *db += g;
                            }
                            let [sum_gw, sum_gw_xhat] =
                                sums(&gw, &xhat, |gw: f32, xhat| [gw, gw * xhat]);
                            let mean_gw = sum_gw / d as f32;
                            let mean_gw_xhat = sum_gw_xhat / d as f32;
                            for ((dx, &gw), &xhat) in dx.iter_mut().zip(&gw).zip(&xhat) {
                                *dx = rstd * (gw - mean_gw - xhat * mean_gw_xhat);
                            }
                        }
                        acc
                    },
                )
            })
            .collect();
        let tail = &mut out[n..];
        for p in partials {
            tail.iter_mut().zip(p).for_each(|(t, v)| *t += v);
        }
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * d)))
    }
}

// ------------------------------------------------------------------------------------- GELU

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7): one exp and a polynomial,
/// branch-free apart from the sign.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    erf_given_exp(x, a, exp_f32(-a * a))
}

/// erf(x) from |x| = `a` and e^(-a^2) = `e`: the GELU backward needs that exponential for the
/// normal density as well, and computing it once saves one exp of two per element.
#[inline(always)]
fn erf_given_exp(x: f32, a: f32, e: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * e;
    y.copysign(x)
}

/// GELU(x) = x/2 (1 + erf(x / sqrt 2)).
#[inline(always)]
fn gelu_erf_of(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// GELU of every element, in parallel chunks.
fn gelu_erf(x: &[f32]) -> Vec<f32> {
    map_chunks(
        x,
        CHUNK_ELEMS,
        #[inline(always)]
        |y, x| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = gelu_erf_of(x);
            }
        },
    )
}

/// GELU with the exact (erf) form, as torch's `F.gelu` default and timm's MLP use.
pub struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "pretext-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = gelu_erf(slice(s, l, self.name())?);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluErfBwd)?))
    }
}

struct GeluErfBwd;

impl CustomOp2 for GeluErfBwd {
    fn name(&self) -> &'static str {
        "pretext-gelu-erf-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(xs, xl, self.name())?, slice(gs, gl, self.name())?);
        let dx = map_chunks2(
            (x, g),
            CHUNK_ELEMS,
            #[inline(always)]
            |dx, x, g| {
                for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                    // e^(-x^2/2) serves both erf(x / sqrt 2) and the density.
                    let s = x * FRAC_1_SQRT_2;
                    let a = s.abs();
                    let e = exp_f32(-a * a);
                    let cdf = 0.5 * (1.0 + erf_given_exp(s, a, e));
                    let pdf = e * INV_SQRT_2PI;
                    *dx = g * (cdf + x * pdf);
                }
            },
        );
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

// ------------------------------------------------------------------------------------- relu

/// max(x, 0). Composed, candle's backward builds a mask through four allocating passes
/// (zeros, compare, cast, multiply); here it is one pass over the output and the gradient.
pub struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "pretext-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let y = map_chunks(
            x,
            CHUNK_ELEMS,
            #[inline(always)]
            |y, x| {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = x.max(0.0);
                }
            },
        );
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &ReluBwd)?))
    }
}

/// dx = g where the output is positive, else 0 (torch's rule: no gradient at exactly 0).
struct ReluBwd;

impl CustomOp2 for ReluBwd {
    fn name(&self) -> &'static str {
        "pretext-relu-bwd"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (slice(ys, yl, self.name())?, slice(gs, gl, self.name())?);
        let dx = map_chunks2(
            (y, g),
            CHUNK_ELEMS,
            #[inline(always)]
            |dx, y, g| {
                for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                    *dx = if y > 0.0 { g } else { 0.0 };
                }
            },
        );
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }
}

// -------------------------------------------------------------------------------- attention

/// A row-major view of a matrix inside a larger buffer: element (i, j) at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}
// SAFETY: a view is only read through, and the functions that take one require its memory to
// stay valid for the call, which is all the parallel tasks sharing it live for.
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    /// The view from row `row` on.
    ///
    /// # Safety
    /// The row must lie inside the matrix.
    unsafe fn rows_from(self, row: usize) -> View {
        View {
            ptr: self.ptr.offset(row as isize * self.rs),
            ..self
        }
    }
    fn t(self) -> View {
        View {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// dst[m x n] (row stride `dst_rs`) = scale * lhs[m x k] * rhs[k x n] on `parallelism`'s
/// threads, or += with `accumulate`. Without it gemm writes every element of dst without
/// reading it, so dst may be uninitialised. The one place that maps views onto the `gemm`
/// crate's arguments (column stride before row stride).
///
/// # Safety
/// Every view must address valid memory for its shape; `dst` must not overlap the inputs.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    parallelism: gemm::Parallelism,
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    lhs: View,
    rhs: View,
    scale: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0,
        scale,
        false,
        false,
        false,
        parallelism,
    )
}

/// Rows of the left operand per task in `gemm_by_rows`.
const GEMM_ROWS: usize = 256;

/// `gemm_into` with lhs's rows cut into blocks of `GEMM_ROWS`, one single-threaded GEMM per
/// block on rayon's pool. For the linear layers' tall products (6304 rows in a ViT-Tiny batch
/// at 224 px) this measured 15-35% faster on 2 cores than the `gemm` crate's own
/// `Parallelism::Rayon(2)` (best of 15: qkv 12.3 -> 9.5 ms, its dx 17.4 -> 11.2 ms), which
/// splits the work into fewer, larger pieces. A block's arithmetic does not depend on the
/// thread count.
///
/// # Safety
/// As `gemm_into`.
unsafe fn gemm_by_rows(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: isize,
    lhs: View,
    rhs: View,
) {
    let dst = Shared(dst);
    (0..m.div_ceil(GEMM_ROWS))
        .into_par_iter()
        .for_each(|block| {
            let first = block * GEMM_ROWS;
            let rows = GEMM_ROWS.min(m - first);
            // SAFETY: the blocks write disjoint rows of dst, and row `first` lies inside lhs's m
            // rows; the caller vouches for the views.
            unsafe {
                matmul(
                    rows,
                    n,
                    k,
                    dst.at(first * dst_rs as usize),
                    dst_rs,
                    lhs.rows_from(first),
                    rhs,
                    1.0,
                )
            }
        });
}

/// `gemm_into` on the calling thread.
///
/// # Safety
/// As `gemm_into`.
unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    lhs: View,
    rhs: View,
    scale: f32,
) {
    gemm_into(
        gemm::Parallelism::None,
        (m, n, k),
        dst,
        dst_rs,
        false,
        lhs,
        rhs,
        scale,
    )
}

/// A pointer that parallel tasks share; each task writes a region no other task touches.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: tasks write disjoint regions (one (batch, head) block each); see the callers.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Through a method, so that closures capture the whole `Shared` (which is Send) rather
    /// than its raw pointer field.
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the buffer this pointer came from.
        unsafe { self.0.add(offset) }
    }
}

#[inline(always)]
fn softmax_rows(s: &mut [f32], n: usize) {
    simd(
        #[inline(always)]
        || {
            for row in s.chunks_mut(n) {
                let max = max_of(row);
                row.iter_mut().for_each(|v| *v = exp_f32(*v - max));
                let [sum] = sums(row, row, |v: f32, _| [v]);
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|v| *v *= inv);
            }
        },
    )
}

/// Multi-head self-attention core on the packed output of the qkv projection:
/// `[B, N, 3*C]` (q, k, v, each `heads` x `C/heads`, as timm's `Attention` lays them out) to
/// `[B, N, C]` = softmax(q k^T * scale) v, heads side by side. Reading q, k and v through strides
/// and writing the heads in place replaces timm's reshape/permute/contiguous copies, and the
/// backward recomputes the attention matrix per (batch, head) instead of keeping it.
pub struct Attention {
    pub heads: usize,
    pub scale: f32,
}

struct Geometry {
    b: usize,
    n: usize,
    c: usize,
    dh: usize,
}

impl Attention {
    fn geometry(&self, l: &Layout) -> Result<Geometry> {
        let &[b, n, c3] = l.dims() else {
            candle_core::bail!("attention: expected [B, N, 3C], got {:?}", l.dims());
        };
        if c3 % (3 * self.heads) != 0 {
            candle_core::bail!("attention: {c3} is not 3 x {} heads", self.heads);
        }
        let c = c3 / 3;
        Ok(Geometry {
            b,
            n,
            c,
            dh: c / self.heads,
        })
    }

    /// q, k and v of (batch, head) inside the packed qkv buffer.
    fn qkv_views(&self, base: *const f32, g: &Geometry, b: usize, h: usize) -> [View; 3] {
        let rs = (3 * g.c) as isize;
        // SAFETY (for the callers): offsets stay inside [b, 0..N, 0..3C].
        [0, 1, 2].map(|part| View {
            ptr: unsafe { base.add(b * g.n * 3 * g.c + part * g.c + h * g.dh) },
            rs,
            cs: 1,
        })
    }

    /// scores = softmax(q k^T * scale) into `s` (N x N).
    unsafe fn probabilities(&self, s: &mut [f32], g: &Geometry, q: View, k: View) {
        matmul(
            g.n,
            g.n,
            g.dh,
            s.as_mut_ptr(),
            g.n as isize,
            q,
            k.t(),
            self.scale,
        );
        softmax_rows(s, g.n);
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "pretext-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = slice(s, l, self.name())?;
        let g = self.geometry(l)?;
        // SAFETY (both): the GEMMs overwrite the scores whole, and the heads' [n, dh] blocks
        // tile `out`.
        let mut out = unsafe { unzeroed(g.b * g.n * g.c) };
        let dst = Shared(out.as_mut_ptr());
        let base = qkv.as_ptr() as usize;
        (0..g.b * self.heads).into_par_iter().for_each_init(
            || unsafe { unzeroed(g.n * g.n) },
            |p, task| {
                let (b, h) = (task / self.heads, task % self.heads);
                let [q, k, v] = self.qkv_views(base as *const f32, &g, b, h);
                // SAFETY: views stay inside qkv; this task alone writes head h of batch b.
                unsafe {
                    self.probabilities(p, &g, q, k);
                    let o = dst.at(b * g.n * g.c + h * g.dh);
                    let p = View {
                        ptr: p.as_ptr(),
                        rs: g.n as isize,
                        cs: 1,
                    };
                    matmul(g.n, g.dh, g.n, o, g.c as isize, p, v, 1.0);
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.n, g.c))))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op2_no_bwd(
            &grad.contiguous()?,
            &AttentionBwd {
                heads: self.heads,
                scale: self.scale,
            },
        )?))
    }
}

struct AttentionBwd {
    heads: usize,
    scale: f32,
}

impl CustomOp2 for AttentionBwd {
    fn name(&self) -> &'static str {
        "pretext-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let fwd = Attention {
            heads: self.heads,
            scale: self.scale,
        };
        let qkv = slice(qs, ql, self.name())?;
        let grad = slice(gs, gl, self.name())?;
        let g = fwd.geometry(ql)?;
        // SAFETY (all three): GEMMs overwrite P and dP whole, and each head's dq, dk and dv
        // blocks tile dqkv.
        let mut dqkv = unsafe { unzeroed(qkv.len()) };
        let dst = Shared(dqkv.as_mut_ptr());
        let (base, gbase) = (qkv.as_ptr() as usize, grad.as_ptr() as usize);
        let nn = g.n as isize;
        (0..g.b * self.heads).into_par_iter().for_each_init(
            || unsafe { (unzeroed(g.n * g.n), unzeroed(g.n * g.n)) },
            |(p, dp), task| {
                let (b, h) = (task / self.heads, task % self.heads);
                let [q, k, v] = fwd.qkv_views(base as *const f32, &g, b, h);
                // SAFETY: views stay inside qkv/grad; this task alone writes the q, k and v
                // columns of head h in batch b's rows of dqkv.
                unsafe {
                    let d_o = View {
                        ptr: (gbase as *const f32).add(b * g.n * g.c + h * g.dh),
                        rs: g.c as isize,
                        cs: 1,
                    };
                    fwd.probabilities(p, &g, q, k);
                    let pv = View {
                        ptr: p.as_ptr(),
                        rs: nn,
                        cs: 1,
                    };
                    let [dq, dk, dv] = fwd
                        .qkv_views(dst.at(0) as *const f32, &g, b, h)
                        .map(|w| w.ptr as *mut f32);
                    let drs = (3 * g.c) as isize;
                    // dV = P^T dO
                    matmul(g.n, g.dh, g.n, dv, drs, pv.t(), d_o, 1.0);
                    // dP = dO V^T, then dS = P * (dP - rowsum(dP * P)) in place
                    matmul(g.n, g.n, g.dh, dp.as_mut_ptr(), nn, d_o, v.t(), 1.0);
                    simd(
                        #[inline(always)]
                        || {
                            for (dp, p) in dp.chunks_mut(g.n).zip(p.chunks(g.n)) {
                                let [dot] = sums(dp, p, |dp: f32, p| [dp * p]);
                                for (d, &pp) in dp.iter_mut().zip(p.iter()) {
                                    *d = pp * (*d - dot);
                                }
                            }
                        },
                    );
                    let ds = View {
                        ptr: dp.as_ptr(),
                        rs: nn,
                        cs: 1,
                    };
                    // dQ = scale dS K, dK = scale dS^T Q
                    matmul(g.n, g.dh, g.n, dq, drs, ds, k, self.scale);
                    matmul(g.n, g.dh, g.n, dk, drs, ds.t(), q, self.scale);
                }
            },
        );
        Ok((CpuStorage::F32(dqkv), ql.shape().clone()))
    }
}

// ----------------------------------------------------------------------------------- linear

/// y = x w^T + b over the last dimension: `[.., in]` with weight `[out, in]` and bias `[out]`.
/// One graph node instead of candle_nn's reshape, matmul, reshape, broadcast and add: candle's
/// autograd accumulates every node's gradient onto a fresh zero tensor, so each node costs an
/// allocation, a memset and a full add in backward. The GEMMs are the ones candle calls, on
/// candle's thread count.
pub struct LinearLast;

fn threads() -> gemm::Parallelism {
    gemm::Parallelism::Rayon(candle_core::utils::get_num_threads())
}

/// x w^T (the bias not yet added) with the bias and output shape, after checking the shapes.
/// The bias is added afterwards, in a pass of its own or fused with the activation: copied
/// into the output before the GEMM, as BLAS's beta = 1 wants it, it cost a serial pass over the
/// output's memory (10% of the qkv projection's forward at 224 px).
fn linear_without_bias<'a>(
    (xs, xl): (&CpuStorage, &Layout),
    (ws, wl): (&CpuStorage, &Layout),
    (bs, bl): (&'a CpuStorage, &Layout),
    op: &'static str,
) -> Result<(Vec<f32>, &'a [f32], Shape)> {
    let x = slice(xs, xl, op)?;
    let w = slice(ws, wl, op)?;
    let b = slice(bs, bl, op)?;
    let (out, inp) = wl.shape().dims2()?;
    if last_dim(xl) != inp || b.len() != out {
        candle_core::bail!(
            "{op}: x {:?}, weight {:?}, bias {}",
            xl.dims(),
            wl.dims(),
            b.len()
        );
    }
    let rows = x.len() / inp;
    let mut y: Vec<f32> = Vec::with_capacity(rows * out);
    // SAFETY: x is rows x inp, w is out x inp (read transposed). With read_dst false gemm writes
    // every one of y's rows x out elements without reading any, so they are initialised when the
    // length is set.
    unsafe {
        gemm_by_rows(
            (rows, out, inp),
            y.as_mut_ptr(),
            out as isize,
            row_major(x, inp),
            row_major(w, inp).t(),
        );
        y.set_len(rows * out);
    }
    let mut dims = xl.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = out;
    Ok((y, b, Shape::from(dims)))
}

impl CustomOp3 for LinearLast {
    fn name(&self) -> &'static str {
        "pretext-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (mut y, b, shape) = linear_without_bias((xs, xl), (ws, wl), (bs, bl), self.name())?;
        let out = b.len();
        y.par_chunks_mut(rows_per_chunk(out) * out).for_each(|y| {
            simd(
                #[inline(always)]
                || {
                    for row in y.chunks_mut(out) {
                        row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                    }
                },
            )
        });
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The patch embedding's input is the image: no GEMM for a gradient nobody reads.
        let need_dx = x.track_op();
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &LinearLastBwd { need_dx })?;
        unpack_grads(&packed, need_dx.then_some(x), w, b)
    }
}

/// GELU(x w^T + b): the linear layer with the activation applied in place on its output, one
/// graph node instead of two (the MLP's widest tensor then gets one zeroed gradient and one add
/// in candle's backward, not two of each). When a gradient is wanted, the pre-activation is kept
/// for the backward, as the separate GELU node kept its input.
pub struct LinearGelu {
    pre: std::sync::Mutex<Option<Vec<f32>>>,
    keep: bool,
}

impl LinearGelu {
    pub fn new(keep_pre_activation: bool) -> LinearGelu {
        LinearGelu {
            pre: std::sync::Mutex::new(None),
            keep: keep_pre_activation,
        }
    }
}

impl CustomOp3 for LinearGelu {
    fn name(&self) -> &'static str {
        "pretext-linear-gelu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (mut pre, b, shape) = linear_without_bias((xs, xl), (ws, wl), (bs, bl), self.name())?;
        let out = b.len();
        let step = rows_per_chunk(out) * out;
        // The bias and the activation in one pass over the pre-activation.
        // SAFETY: the pass writes every element of y.
        let mut y = unsafe { unzeroed(pre.len()) };
        y.par_chunks_mut(step)
            .zip(pre.par_chunks_mut(step))
            .for_each(|(y, pre)| {
                simd(
                    #[inline(always)]
                    || {
                        for (y, pre) in y.chunks_mut(out).zip(pre.chunks_mut(out)) {
                            for ((y, p), b) in y.iter_mut().zip(pre.iter_mut()).zip(b) {
                                *p += b;
                                *y = gelu_erf_of(*p);
                            }
                        }
                    },
                )
            });
        if self.keep {
            *self.pre.lock().unwrap_or_else(|e| e.into_inner()) = Some(pre);
        }
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let kept = self.pre.lock().unwrap_or_else(|e| e.into_inner()).take();
        let pre = match kept {
            Some(pre) if pre.len() == y.elem_count() => {
                Tensor::from_vec(pre, y.shape(), y.device())?
            }
            _ => x.apply_op3_no_bwd(w, b, &LinearLast)?,
        };
        let d_pre = pre.apply_op2_no_bwd(&g.contiguous()?, &GeluErfBwd)?;
        LinearLast.bwd(x, w, b, y, &d_pre)
    }
}

/// `[dx (when `need_dx`), dw, db]` end to end.
struct LinearLastBwd {
    need_dx: bool,
}

impl CustomOp3 for LinearLastBwd {
    fn name(&self) -> &'static str {
        "pretext-linear-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, self.name())?;
        let w = slice(ws, wl, self.name())?;
        let g = slice(gs, gl, self.name())?;
        let (out, inp) = wl.shape().dims2()?;
        let rows = x.len() / inp;
        let n = if self.need_dx { x.len() } else { 0 };
        let mut packed = vec![0f32; n + out * inp + out];
        let (dx, rest) = packed.split_at_mut(n);
        let (dw, db) = rest.split_at_mut(out * inp);
        // SAFETY: g is rows x out, w is out x inp, x is rows x inp; dx (when there is one) is
        // rows x inp and disjoint from dw.
        unsafe {
            if self.need_dx {
                // dx = g w
                gemm_by_rows(
                    (rows, inp, out),
                    dx.as_mut_ptr(),
                    inp as isize,
                    row_major(g, out),
                    row_major(w, inp),
                );
            }
            // dw = g^T x
            gemm_into(
                threads(),
                (out, inp, rows),
                dw.as_mut_ptr(),
                inp as isize,
                false,
                row_major(g, out).t(),
                row_major(x, inp),
                1.0,
            );
        }
        // db = column sums of g, chunk partials summed in chunk order.
        let step = rows_per_chunk(out) * out;
        let partials: Vec<Vec<f32>> = g
            .par_chunks(step)
            .map(|chunk| {
                let mut acc = vec![0f32; out];
                for row in chunk.chunks(out) {
                    acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
                }
                acc
            })
            .collect();
        for p in partials {
            db.iter_mut().zip(p).for_each(|(d, v)| *d += v);
        }
        Ok((CpuStorage::F32(packed), Shape::from(n + out * inp + out)))
    }
}

// ------------------------------------------------------------------------------------- conv

/// 2-D convolution without bias (torchvision's ResNet and DenseNet), square kernel, as im2col
/// and one GEMM per image; images run in parallel. Backward computes the weight's gradient with
/// GEMMs over the same columns and the input's gradient only when the input needs one: candle's
/// conv backward computes the image's gradient with direct loops even for the network's input.
pub struct Conv2d {
    pub stride: usize,
    pub padding: usize,
}

/// Sizes of one convolution.
#[derive(Clone, Copy)]
struct ConvGeometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    padding: usize,
}

impl ConvGeometry {
    fn new(x: &[usize], w: &[usize], stride: usize, padding: usize) -> Result<ConvGeometry> {
        let (&[b, c, h, wd], &[o, ci, k, k2]) = (x, w) else {
            candle_core::bail!("conv2d: expected [B,C,H,W] and [O,C,K,K], got {x:?} and {w:?}");
        };
        if ci != c || k != k2 || h + 2 * padding < k || wd + 2 * padding < k {
            candle_core::bail!("conv2d: input {x:?} does not fit weight {w:?}");
        }
        Ok(ConvGeometry {
            b,
            c,
            h,
            w: wd,
            o,
            k,
            oh: (h + 2 * padding - k) / stride + 1,
            ow: (wd + 2 * padding - k) / stride + 1,
            stride,
            padding,
        })
    }
    /// Rows of the column matrix: C * K * K.
    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }
    /// Output positions per image.
    fn positions(&self) -> usize {
        self.oh * self.ow
    }

    /// Images per GEMM of the weight gradient, whose inner dimension is the positions: at
    /// 128 px ResNet's last stage has 16 per image, and a GEMM that adds one image's 16 terms
    /// to each of dW's 2.4M entries reads and writes all of dW per image. Images side by side
    /// make the inner dimension about `GEMM_POSITIONS` (this stage's backward: 170 -> 110 ms).
    /// The forward and the input gradient stay per image: grouped, they measured no faster, and
    /// the forward slower (fewer, larger tasks to share between the threads). Depends on the
    /// shape only, so results do not depend on the thread count.
    fn group(&self) -> usize {
        GEMM_POSITIONS
            .div_ceil(self.positions())
            .clamp(1, self.b.max(1))
    }
    fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }
    fn output_len(&self) -> usize {
        self.o * self.positions()
    }

    /// A 1x1 convolution with stride 1 and no padding (DenseNet's bottlenecks and
    /// transitions): its column matrix is the image itself.
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }
    /// Length of one image's column matrix, none where the image serves as its own.
    fn cols_len(&self) -> usize {
        if self.pointwise() {
            0
        } else {
            self.ckk() * self.positions()
        }
    }
    /// One image's column matrix (rows `positions()` apart): the image itself for a pointwise
    /// convolution, else `cols` filled by `im2col`.
    fn columns<'a>(&self, image: &'a [f32], cols: &'a mut [f32]) -> &'a [f32] {
        if self.pointwise() {
            return image;
        }
        self.im2col(image, cols, self.positions());
        cols
    }

    /// The outputs `o < outputs` whose input index `o*stride + offset - padding` lies in
    /// `0..len`: one contiguous run, so the copies below need no test per element.
    fn inside(&self, offset: usize, outputs: usize, len: usize) -> Range<usize> {
        let (s, p) = (self.stride, self.padding);
        let lo = p.saturating_sub(offset).div_ceil(s).min(outputs);
        let hi = (len + p).saturating_sub(offset).div_ceil(s).min(outputs);
        lo..hi.max(lo)
    }

    /// cols[(c*K + i)*K + j, oy*OW + ox] = image[c, oy*s - p + i, ox*s - p + j] (0 outside),
    /// rows `ld` apart, so that several images' columns can sit side by side.
    fn im2col(&self, image: &[f32], cols: &mut [f32], ld: usize) {
        let (k, s, p, n) = (self.k, self.stride, self.padding, self.positions());
        let shifted = s == 1 && self.ow == self.w && self.ow <= SHIFTED_ROWS_UP_TO;
        for c in 0..self.c {
            for i in 0..k {
                let rows = self.inside(i, self.oh, self.h);
                for j in 0..k {
                    let xs = self.inside(j, self.ow, self.w);
                    let row = &mut cols[((c * k + i) * k + j) * ld..][..n];
                    if shifted {
                        let plane = &image[c * self.h * self.w..][..self.h * self.w];
                        self.shifted_row(plane, (i, j), (rows.clone(), xs), row);
                        continue;
                    }
                    for (oy, out) in row.chunks_exact_mut(self.ow).enumerate() {
                        if !rows.contains(&oy) || xs.is_empty() {
                            out.fill(0.0);
                            continue;
                        }
                        let y = oy * s + i - p;
                        let src = &image[(c * self.h + y) * self.w + xs.start * s + j - p..];
                        out[..xs.start].fill(0.0);
                        out[xs.end..].fill(0.0);
                        let out = &mut out[xs.clone()];
                        if s == 1 {
                            out.copy_from_slice(&src[..out.len()]);
                        } else {
                            out.iter_mut()
                                .zip(src.iter().step_by(s))
                                .for_each(|(o, &v)| *o = v);
                        }
                    }
                }
            }
        }
    }

    /// One column row of a stride-1 convolution with as many output columns as input columns:
    /// the plane shifted by `i - p` rows and `j - p` columns, so one copy serves all in-bounds
    /// rows instead of one per row (see `SHIFTED_ROWS_UP_TO`). The copy wraps around the edges
    /// (a value from the neighbouring row lands in a padding column); zeros overwrite those
    /// after it.
    fn shifted_row(
        &self,
        plane: &[f32],
        (i, j): (usize, usize),
        (rows, xs): (Range<usize>, Range<usize>),
        row: &mut [f32],
    ) {
        let ow = self.ow;
        if rows.is_empty() || xs.is_empty() {
            row.fill(0.0);
            return;
        }
        row[..rows.start * ow].fill(0.0);
        row[rows.end * ow..].fill(0.0);
        // row[d] = plane[d + i*W + j - (p*W + p)]; out-of-plane ends are padding columns.
        let (shift, back) = (i * self.w + j, self.padding * self.w + self.padding);
        let lo = (rows.start * ow).max(back.saturating_sub(shift));
        let hi = (rows.end * ow).min((plane.len() + back).saturating_sub(shift));
        row[lo..hi].copy_from_slice(&plane[lo + shift - back..][..hi - lo]);
        for out in row[rows.start * ow..rows.end * ow].chunks_exact_mut(ow) {
            out[..xs.start].fill(0.0);
            out[xs.end..].fill(0.0);
        }
    }

    /// The adjoint of `im2col`: adds each column entry back onto the pixel it came from, in the
    /// same order as a loop over every entry would.
    fn col2im(&self, cols: &[f32], ld: usize, image: &mut [f32]) {
        let (k, s, p, n) = (self.k, self.stride, self.padding, self.positions());
        for c in 0..self.c {
            for i in 0..k {
                let rows = self.inside(i, self.oh, self.h);
                for j in 0..k {
                    let xs = self.inside(j, self.ow, self.w);
                    let row = &cols[((c * k + i) * k + j) * ld..][..n];
                    for (oy, from) in row.chunks_exact(self.ow).enumerate() {
                        if !rows.contains(&oy) || xs.is_empty() {
                            continue;
                        }
                        let y = oy * s + i - p;
                        let dst = &mut image[(c * self.h + y) * self.w + xs.start * s + j - p..];
                        dst.iter_mut()
                            .step_by(s)
                            .zip(&from[xs.clone()])
                            .for_each(|(d, v)| *d += v);
                    }
                }
            }
        }
    }
}

/// See `ConvGeometry::group`.
const GEMM_POSITIONS: usize = 256;

/// Planes up to this wide build their column rows by one shifted copy (`shifted_row`): row by
/// row, DenseNet's 4x4 and 2x2 stages copied 4 and 2 values per call into memcpy (im2col and
/// memcpy 20% of its step's samples). DenseNet-121 step median ratio 0.95 in 5 pairs; with
/// every width shifted 0.91, but ResNet-18 (planes of 32 and 16) then 1.03-1.04 in 14 pairs:
/// inside the noise, on the wrong side, so wider planes keep their row copies.
const SHIFTED_ROWS_UP_TO: usize = 8;

/// The transpose of a row-major matrix with rows of `cols` values. Blocks of 16 rows at a time,
/// so that each write is a run of 16 and the 16 rows being read stay in L1: element by element
/// it took 9.4-9.8 ms for ResNet's 512x4608 weight (writes 2 KiB apart), this way 4.3-5.9.
fn transpose(m: &[f32], cols: usize) -> Vec<f32> {
    const BLOCK: usize = 16;
    let rows = m.len() / cols.max(1);
    // SAFETY: the blocks' runs cover every element of t.
    let mut t = unsafe { unzeroed(m.len()) };
    for (b, block) in m.chunks(BLOCK * cols.max(1)).enumerate() {
        let n = block.len() / cols;
        for c in 0..cols {
            let run = &mut t[c * rows + b * BLOCK..][..n];
            for (i, d) in run.iter_mut().enumerate() {
                *d = block[i * cols + c];
            }
        }
    }
    t
}

/// `[images, rows, n]` to `[rows, images * n]` with rows `ld` apart: a group's gradient as
/// its GEMM reads it.
fn side_by_side(images: &[f32], rows: usize, n: usize, out: &mut [f32], ld: usize) {
    for (t, image) in images.chunks_exact(rows * n).enumerate() {
        for (r, src) in image.chunks_exact(n).enumerate() {
            out[r * ld + t * n..][..n].copy_from_slice(src);
        }
    }
}

/// dst[m x n] (rows `dst_rs` apart) = lhs * rhs, or += with `accumulate`, on the calling
/// thread: the convolutions run their images in parallel instead.
fn conv_gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: View,
    rhs: View,
) {
    assert!(m == 0 || dst.len() >= (m - 1) * dst_rs + n);
    // SAFETY: the callers pass views whose extents lie inside live slices of the right sizes;
    // dst's extent is checked above.
    unsafe {
        gemm_into(
            gemm::Parallelism::None,
            (m, n, k),
            dst.as_mut_ptr(),
            dst_rs as isize,
            accumulate,
            lhs,
            rhs,
            1.0,
        )
    }
}

fn row_major(data: &[f32], cols: usize) -> View {
    View {
        ptr: data.as_ptr(),
        rs: cols as isize,
        cs: 1,
    }
}

/// y[image] = W[O, CKK] cols(image)[CKK, N], one GEMM per image, images in parallel.
fn convolve(g: &ConvGeometry, x: &[f32], w: &[f32]) -> Vec<f32> {
    let (n, ckk) = (g.positions(), g.ckk());
    // SAFETY (both): each image's GEMM overwrites its output whole; im2col writes every
    // column entry (zero where the window leaves the image).
    let mut y = unsafe { unzeroed(g.b * g.output_len()) };
    y.par_chunks_mut(g.output_len())
        .zip(x.par_chunks(g.image_len()))
        .for_each_init(
            || unsafe { unzeroed(g.cols_len()) },
            |cols, (y, image)| {
                let cols = row_major(g.columns(image, cols), n);
                conv_gemm((g.o, n, ckk), y, n, false, row_major(w, ckk), cols);
            },
        );
    y
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "pretext-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, self.name())?;
        let w = slice(ws, wl, self.name())?;
        let g = ConvGeometry::new(xl.dims(), wl.dims(), self.stride, self.padding)?;
        let y = convolve(&g, x, w);
        Ok((CpuStorage::F32(y), Shape::from((g.b, g.o, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dw = x.apply_op2_no_bwd(
            &grad,
            &Conv2dWeightGrad {
                stride: self.stride,
                padding: self.padding,
                kernel: w.dim(2)?,
            },
        )?;
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(
                w,
                &Conv2dInputGrad {
                    stride: self.stride,
                    padding: self.padding,
                    input: x.dims().to_vec(),
                },
            )?)
        } else {
            None
        };
        Ok((dx, Some(dw)))
    }
}

/// dW = sum over images of g[O, N] cols[CKK, N]^T, one GEMM per group of images (see
/// `ConvGeometry::group`; transposed for few channels, see `TRANSPOSED_DW_BELOW`), in a fixed
/// number of batch chunks summed in order (the same result whatever the thread count).
struct Conv2dWeightGrad {
    stride: usize,
    padding: usize,
    kernel: usize,
}

const CONV_GRAD_CHUNKS: usize = 8;

/// Below this many output channels the weight gradient is computed transposed, dW^T[CKK, O],
/// and transposed once at the end. The `gemm` crate ran the same product 1.3-1.6x faster with
/// a row-major output of O columns than of O rows (one thread, best of 7: ResNet's 64-channel
/// layer1 1.89 -> 1.16 ms, DenseNet's 32-channel growth 0.40 -> 0.25 ms, the stem 2.06 -> 1.52),
/// about even at 128 channels and 10-20% slower at 256 and 512.
const TRANSPOSED_DW_BELOW: usize = 128;

impl CustomOp2 for Conv2dWeightGrad {
    fn name(&self) -> &'static str {
        "pretext-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, self.name())?;
        let grad = slice(gs, gl, self.name())?;
        let (c, o) = (xl.dims()[1], gl.dims()[1]);
        let g = ConvGeometry::new(
            xl.dims(),
            &[o, c, self.kernel, self.kernel],
            self.stride,
            self.padding,
        )?;
        let (n, ckk, group) = (g.positions(), g.ckk(), g.group());
        let ld = group * n;
        let transposed = g.o < TRANSPOSED_DW_BELOW;
        let per_chunk =
            g.b.div_ceil(CONV_GRAD_CHUNKS)
                .max(1)
                .next_multiple_of(group);
        let partials: Vec<Vec<f32>> = x
            .par_chunks(per_chunk * g.image_len())
            .zip(grad.par_chunks(per_chunk * g.output_len()))
            .map(|(images, grads)| {
                // SAFETY: the chunk's first GEMM overwrites dw whole (t == 0 does not
                // accumulate). im2col and side_by_side write the columns of every image in the
                // group, and the GEMMs read only those (`width`); a short last group leaves the
                // tail of each row unread.
                let mut dw = unsafe { unzeroed(g.o * ckk) };
                let mut cols =
                    unsafe { unzeroed(if group == 1 { g.cols_len() } else { ckk * ld }) };
                let mut gathered = unsafe { unzeroed(if group == 1 { 0 } else { g.o * ld }) };
                for (t, (images, grads)) in images
                    .chunks(group * g.image_len())
                    .zip(grads.chunks(group * g.output_len()))
                    .enumerate()
                {
                    let (cols, gy) = if group == 1 {
                        (
                            row_major(g.columns(images, &mut cols), n),
                            row_major(grads, n),
                        )
                    } else {
                        for (i, image) in images.chunks(g.image_len()).enumerate() {
                            g.im2col(image, &mut cols[i * n..], ld);
                        }
                        side_by_side(grads, g.o, n, &mut gathered, ld);
                        (row_major(&cols, ld), row_major(&gathered, ld))
                    };
                    let width = images.len() / g.image_len() * n;
                    if transposed {
                        // dW^T[CKK, O] += cols[CKK, images * N] g^T[images * N, O]
                        conv_gemm((ckk, g.o, width), &mut dw, g.o, t > 0, cols, gy.t());
                    } else {
                        // dW[O, CKK] += g[O, images * N] cols^T[images * N, CKK]
                        conv_gemm((g.o, ckk, width), &mut dw, ckk, t > 0, gy, cols.t());
                    }
                }
                dw
            })
            .collect();
        let mut sum = vec![0f32; g.o * ckk];
        for p in partials {
            sum.iter_mut().zip(p).for_each(|(d, v)| *d += v);
        }
        let dw = if transposed {
            transpose(&sum, g.o)
        } else {
            sum
        };
        Ok((
            CpuStorage::F32(dw),
            Shape::from((g.o, g.c, self.kernel, self.kernel)),
        ))
    }
}

/// dX, by one of two routes. A stride-1 convolution's input gradient is itself a convolution: of
/// g with the kernel flipped in space and its in/out channels swapped, padded by K - 1 - P. That
/// route runs GEMMs of C rows and O*K*K inner terms and needs no col2im. The other, for any
/// stride: per image col2im(W^T[CKK, O] g[O, N]), GEMMs of C*K*K rows and only O inner terms.
struct Conv2dInputGrad {
    stride: usize,
    padding: usize,
    input: Vec<usize>,
}

/// From this many input channels on, stride-1 input gradients take the convolution route. One
/// thread, best of 10, `gemm` crate: ResNet-18's 3x3 shapes at 128 px ran 62-66 GFLOP/s by
/// col2im and 83-88 as a convolution from 128 channels up; at 64 channels (layer1) the col2im
/// route's 576-row GEMM was the faster, 84-86 against 68.
const INPUT_GRAD_AS_CONV_FROM: usize = 128;

impl ConvGeometry {
    /// The geometry of the input gradient as a convolution of the output gradient, where that
    /// route applies (see `Conv2dInputGrad`).
    fn input_grad_as_conv(&self) -> Option<ConvGeometry> {
        let applies = self.stride == 1
            && self.padding < self.k
            && !self.pointwise()
            && self.c >= INPUT_GRAD_AS_CONV_FROM;
        if !applies {
            return None;
        }
        let shape = [self.b, self.o, self.oh, self.ow];
        ConvGeometry::new(
            &shape,
            &[self.c, self.o, self.k, self.k],
            1,
            self.k - 1 - self.padding,
        )
        .ok()
    }
}

/// W[O, C, K, K] to W'[C, O, K, K] with W'[c, o, i, j] = W[o, c, K-1-i, K-1-j]: flipping both
/// spatial axes reverses each flattened K x K block.
fn flip_kernel(w: &[f32], o: usize, c: usize, kk: usize) -> Vec<f32> {
    // SAFETY: the loops write every (c, o) block.
    let mut flipped = unsafe { unzeroed(w.len()) };
    for (oi, per_out) in w.chunks_exact(c * kk).enumerate() {
        for (ci, block) in per_out.chunks_exact(kk).enumerate() {
            let dst = &mut flipped[(ci * o + oi) * kk..][..kk];
            dst.iter_mut()
                .zip(block.iter().rev())
                .for_each(|(d, &v)| *d = v);
        }
    }
    flipped
}

impl CustomOp2 for Conv2dInputGrad {
    fn name(&self) -> &'static str {
        "pretext-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let grad = slice(gs, gl, self.name())?;
        let w = slice(ws, wl, self.name())?;
        let g = ConvGeometry::new(&self.input, wl.dims(), self.stride, self.padding)?;
        if let Some(as_conv) = g.input_grad_as_conv() {
            let flipped = flip_kernel(w, g.o, g.c, g.k * g.k);
            let dx = convolve(&as_conv, grad, &flipped);
            return Ok((CpuStorage::F32(dx), Shape::from(self.input.clone())));
        }
        let (n, ckk) = (g.positions(), g.ckk());
        // W^T as a row-major copy: read through a transposed view, gemm ran this product at
        // 29-42 GFLOP/s on one thread, from the copy at 38-66 (best of 10, ResNet's layer3 and
        // layer4 and DenseNet's growth shapes); the copy is once per call, the GEMMs per image.
        let wt = transpose(w, ckk);
        let mut dx = vec![0f32; g.b * g.image_len()];
        dx.par_chunks_mut(g.image_len())
            .zip(grad.par_chunks(g.output_len()))
            .for_each_init(
                // SAFETY: the GEMM overwrites dcols whole before col2im reads it.
                || unsafe { unzeroed(g.cols_len()) },
                |dcols, (image, gy)| {
                    // dcols[CKK, N] = W^T[CKK, O] g[O, N]
                    let (wt, gy) = (row_major(&wt, g.o), row_major(gy, n));
                    if g.pointwise() {
                        conv_gemm((ckk, n, g.o), image, n, false, wt, gy);
                    } else {
                        conv_gemm((ckk, n, g.o), dcols, n, false, wt, gy);
                        g.col2im(dcols, n, image);
                    }
                },
            );
        Ok((CpuStorage::F32(dx), Shape::from(self.input.clone())))
    }
}

// ------------------------------------------------------------------------------- batch norm

/// Per channel of `[B, C, H, W]`: its values, as (batch, contiguous plane) pairs.
fn channel_planes(
    x: &[f32],
    b: usize,
    c: usize,
    hw: usize,
    ch: usize,
) -> impl Iterator<Item = &[f32]> {
    (0..b).map(move |i| &x[(i * c + ch) * hw..][..hw])
}

fn nchw(l: &Layout) -> Result<(usize, usize, usize)> {
    match l.dims() {
        &[b, c, h, w] => Ok((b, c, h * w)),
        d => candle_core::bail!("batch norm: expected [B, C, H, W], got {d:?}"),
    }
}

/// The sums of `f` over one channel of `[B, C, H, W]` tensors `a` and `b`.
#[inline(always)]
fn channel_sums<const K: usize>(
    (a, b): (&[f32], &[f32]),
    (batch, c, hw, ch): (usize, usize, usize, usize),
    f: impl Fn(f64, f64) -> [f64; K] + Copy,
) -> [f64; K] {
    channel_planes(a, batch, c, hw, ch)
        .zip(channel_planes(b, batch, c, hw, ch))
        .map(|(pa, pb)| sums(pa, pb, f))
        .fold([0f64; K], |mut t, s| {
            for k in 0..K {
                t[k] += s[k];
            }
            t
        })
}

/// Mean and biased variance of one channel, accumulated in f64 (a channel can hold 10^5 values),
/// in two passes (a one-pass E[x^2] - mean^2 cancels when the mean is large).
#[inline(always)]
fn channel_moments(x: &[f32], b: usize, c: usize, hw: usize, ch: usize) -> (f64, f64) {
    let mean = channel_mean(x, b, c, hw, ch);
    let [ss] = channel_sums((x, x), (b, c, hw, ch), |v, _| [(v - mean) * (v - mean)]);
    (mean, ss / (b * hw) as f64)
}

#[inline(always)]
fn channel_mean(x: &[f32], b: usize, c: usize, hw: usize, ch: usize) -> f64 {
    let [sum] = channel_sums((x, x), (b, c, hw, ch), |v, _| [v]);
    sum / (b * hw) as f64
}

/// Each channel's mean and biased variance over batch and space of an f32 `[B, C, H, W]` CPU
/// tensor, computed once per train-mode BatchNorm: they feed the running statistics, the
/// forward and the backward (each recomputed them before: five passes over the activation in the
/// forward, three in the backward, now three and two).
pub fn channel_stats(x: &Tensor) -> Result<Vec<(f64, f64)>> {
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*storage else {
        candle_core::bail!("channel stats: only CPU tensors are fused");
    };
    let data = slice(s, layout, "channel stats")?;
    let (b, c, hw) = nchw(layout)?;
    Ok((0..c)
        .into_par_iter()
        .map(|ch| {
            simd(
                #[inline(always)]
                || channel_moments(data, b, c, hw, ch),
            )
        })
        .collect())
}

/// The forward and backward ops carry one (mean, variance) pair per channel of their input.
fn stats_fit(stats: &[(f64, f64)], c: usize) -> Result<()> {
    if stats.len() != c {
        candle_core::bail!(
            "batch norm: {} channel statistics for {c} channels",
            stats.len()
        );
    }
    Ok(())
}

/// Train-mode BatchNorm over `[B, C, H, W]` with the batch's statistics (`channel_stats` of the
/// input), weight and bias `[C]`.
pub struct BatchNormTrain {
    pub eps: f64,
    pub stats: Vec<(f64, f64)>,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "pretext-batch-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, self.name())?;
        let (w, bias) = (slice(ws, wl, self.name())?, slice(bs, bl, self.name())?);
        let (b, c, hw) = nchw(xl)?;
        stats_fit(&self.stats, c)?;
        // SAFETY: the channels' tasks write every element.
        let mut y = unsafe { unzeroed(x.len()) };
        let dst = Shared(y.as_mut_ptr());
        (0..c).into_par_iter().for_each(|ch| {
            simd(
                #[inline(always)]
                || {
                    let (mean, var) = self.stats[ch];
                    let scale = (w[ch] as f64 / (var + self.eps).sqrt()) as f32;
                    let shift = bias[ch] - mean as f32 * scale;
                    for i in 0..b {
                        let off = (i * c + ch) * hw;
                        // SAFETY: channel `ch` of each image is written by this task alone.
                        let out = unsafe { std::slice::from_raw_parts_mut(dst.at(off), hw) };
                        for (o, &v) in out.iter_mut().zip(&x[off..off + hw]) {
                            *o = v * scale + shift;
                        }
                    }
                },
            )
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let bwd = BatchNormTrainBwd {
            eps: self.eps,
            stats: self.stats.clone(),
        };
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &bwd)?;
        unpack_grads(&packed, Some(x), w, b)
    }
}

struct BatchNormTrainBwd {
    eps: f64,
    stats: Vec<(f64, f64)>,
}

impl CustomOp3 for BatchNormTrainBwd {
    fn name(&self) -> &'static str {
        "pretext-batch-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, self.name())?;
        let w = slice(ws, wl, self.name())?;
        let g = slice(gs, gl, self.name())?;
        let (b, c, hw) = nchw(xl)?;
        stats_fit(&self.stats, c)?;
        let n = x.len();
        // SAFETY: the channels' tasks write every element of dx and both sums.
        let mut out = unsafe { unzeroed(n + 2 * c) };
        let dst = Shared(out.as_mut_ptr());
        (0..c).into_par_iter().for_each(|ch| {
            simd(
                #[inline(always)]
                || {
                    // dbias = sum g, dweight = sum g * xhat
                    let count = (b * hw) as f64;
                    let (mean, var) = self.stats[ch];
                    let [sum_g, sum_g_xmu] =
                        channel_sums((x, g), (b, c, hw, ch), |xv, gv| [gv, gv * (xv - mean)]);
                    let rstd = 1.0 / (var + self.eps).sqrt();
                    let sum_g_xhat = sum_g_xmu * rstd;
                    // dx = w * rstd * (g - mean(g) - xhat * mean(g * xhat))
                    let k = w[ch] as f64 * rstd;
                    let (mg, mgx) = (sum_g / count, sum_g_xhat / count);
                    for i in 0..b {
                        let off = (i * c + ch) * hw;
                        // SAFETY: channel `ch` of each image, and slots n+ch and n+c+ch, are written by
                        // this task alone.
                        let dx = unsafe { std::slice::from_raw_parts_mut(dst.at(off), hw) };
                        for ((d, &xv), &gv) in
                            dx.iter_mut().zip(&x[off..off + hw]).zip(&g[off..off + hw])
                        {
                            let xhat = (xv as f64 - mean) * rstd;
                            *d = (k * (gv as f64 - mg - xhat * mgx)) as f32;
                        }
                    }
                    unsafe {
                        *dst.at(n + ch) = sum_g_xhat as f32;
                        *dst.at(n + c + ch) = sum_g as f32;
                    }
                },
            )
        });
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * c)))
    }
}

// ---------------------------------------------------------------------------------- pooling

/// The 3x3 window, stride 2, padding 1, of `[B, C, H, W]` (the ResNet and DenseNet stem).
struct PoolGeometry {
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

impl PoolGeometry {
    fn of(dims: &[usize]) -> Result<Self> {
        match *dims {
            [b, c, h, w] => Ok(Self {
                planes: b * c,
                h,
                w,
                oh: (h + 2 - 3) / 2 + 1,
                ow: (w + 2 - 3) / 2 + 1,
            }),
            ref d => candle_core::bail!("max pool: expected [B, C, H, W], got {d:?}"),
        }
    }

    /// The rows and columns of output cell (i, j)'s window, clipped to the plane.
    fn window(&self, i: usize, j: usize) -> (Range<usize>, Range<usize>) {
        (
            (2 * i).saturating_sub(1)..(2 * i + 2).min(self.h),
            (2 * j).saturating_sub(1)..(2 * j + 2).min(self.w),
        )
    }

    /// The plane index of the first largest value in output cell (i, j)'s window, scanning rows
    /// then columns, as torch records it (ties go to the first, not shared); a NaN wins.
    fn argmax(&self, plane: &[f32], i: usize, j: usize) -> usize {
        let (rows, cols) = self.window(i, j);
        let mut best = rows.start * self.w + cols.start;
        for r in rows {
            for c in cols.clone() {
                let k = r * self.w + c;
                if plane[k] > plane[best] || plane[k].is_nan() {
                    best = k;
                }
            }
        }
        best
    }

    /// `argmax` for a window whose maximum `max` is known (and not NaN): the first index holding
    /// it, found by a backward scan of selects. `argmax`'s comparisons branch on the data and
    /// mispredicted about every other time (the ResNet-18 stem's pool at 128 px: 49 ms forward,
    /// twice that backward).
    #[inline(always)]
    fn first_index_of(&self, plane: &[f32], i: usize, j: usize, max: f32) -> usize {
        let (rows, cols) = self.window(i, j);
        let mut first = rows.start * self.w + cols.start;
        for r in rows.rev() {
            for c in cols.clone().rev() {
                let k = r * self.w + c;
                first = if plane[k] == max { k } else { first };
            }
        }
        first
    }
}

/// The larger of two values, NaN if either is (torch's pooling propagates NaN).
#[inline(always)]
fn max_nan(a: f32, b: f32) -> f32 {
    if (b > a) | b.is_nan() {
        b
    } else {
        a
    }
}

/// Max-pool 3x3, stride 2, padding 1, as torch's `max_pool2d` computes it, one plane per task.
pub struct MaxPool3x3S2;

impl CustomOp1 for MaxPool3x3S2 {
    fn name(&self) -> &'static str {
        "pretext-max-pool-3x3-s2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let p = PoolGeometry::of(l.dims())?;
        // SAFETY: every output of every plane is written.
        let mut y = unsafe { unzeroed(p.planes * p.oh * p.ow) };
        y.par_chunks_mut(p.oh * p.ow)
            .zip(x.par_chunks(p.h * p.w))
            .for_each(|(y, x)| {
                simd(
                    #[inline(always)]
                    || {
                        // Separable: the max over the window's rows for every column (a
                        // vectorised pass), then over each window's columns.
                        let mut over_rows = vec![0f32; p.w];
                        for (i, y) in y.chunks_mut(p.ow).enumerate() {
                            let (rows, _) = p.window(i, 0);
                            over_rows.copy_from_slice(&x[rows.start * p.w..][..p.w]);
                            for r in rows.skip(1) {
                                let row = &x[r * p.w..][..p.w];
                                for (m, &v) in over_rows.iter_mut().zip(row) {
                                    *m = max_nan(*m, v);
                                }
                            }
                            for (j, y) in y.iter_mut().enumerate() {
                                let (_, cols) = p.window(i, j);
                                let window = &over_rows[cols];
                                *y = window[1..].iter().copied().fold(window[0], max_nan);
                            }
                        }
                    },
                )
            });
        let mut dims = l.dims().to_vec();
        dims[2] = p.oh;
        dims[3] = p.ow;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op3_no_bwd(
            y,
            &g.contiguous()?,
            &MaxPool3x3S2Bwd,
        )?))
    }
}

/// Each output's gradient goes to its window's argmax, found again from the input and the
/// window's maximum (the forward's output).
struct MaxPool3x3S2Bwd;

impl CustomOp3 for MaxPool3x3S2Bwd {
    fn name(&self) -> &'static str {
        "pretext-max-pool-3x3-s2-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, self.name())?;
        let (y, g) = (slice(ys, yl, self.name())?, slice(gs, gl, self.name())?);
        let p = PoolGeometry::of(xl.dims())?;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(p.h * p.w)
            .zip(x.par_chunks(p.h * p.w))
            .zip(y.par_chunks(p.oh * p.ow).zip(g.par_chunks(p.oh * p.ow)))
            .for_each(|((dx, x), (y, g))| {
                simd(
                    #[inline(always)]
                    || {
                        for i in 0..p.oh {
                            for j in 0..p.ow {
                                let max = y[i * p.ow + j];
                                let k = if max.is_nan() {
                                    p.argmax(x, i, j)
                                } else {
                                    p.first_index_of(x, i, j, max)
                                };
                                dx[k] += g[i * p.ow + j];
                            }
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}
