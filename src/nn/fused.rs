//! Fused CPU kernels, with hand-written backward, for the three ops that dominate a ViT step on the
//! CPU once the matmuls are fast: softmax, LayerNorm and GELU. Composed from candle ops they are
//! chains of single-threaded elementwise passes, each allocating a tensor (candle.md measures
//! softmax backward at 152 ms vs torch's 2 ms for ViT-Tiny attention). Here each is one pass over
//! rows, split across rayon's pool.
//!
//! The wrappers in `ops` use these for f32 tensors on the CPU and the composed ops everywhere else
//! (CUDA, half precision), so every device computes the same function. Work is cut into chunks of
//! a fixed number of rows and partial sums are reduced in chunk order: results do not depend on
//! the number of threads, and reruns stay bit-identical.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
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
        let mut y = vec![0f32; x.len()];
        let step = rows_per_chunk(d) * d;
        y.par_chunks_mut(step)
            .zip(x.par_chunks(step))
            .for_each(|(y, x)| {
                y.copy_from_slice(x);
                softmax_rows(y, d);
            });
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
        let mut dx = vec![0f32; y.len()];
        let step = rows_per_chunk(d) * d;
        dx.par_chunks_mut(step)
            .zip(y.par_chunks(step).zip(g.par_chunks(step)))
            .for_each(|(dx, (y, g))| {
                for ((dx, y), g) in dx.chunks_mut(d).zip(y.chunks(d)).zip(g.chunks(d)) {
                    let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                    for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                        *dx = y * (g - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }
}

// -------------------------------------------------------------------------------- LayerNorm

/// LayerNorm over the last dimension of `x` with `weight` and `bias` (both `[d]`), biased variance
/// as torch computes it.
pub struct LayerNormLast {
    pub eps: f32,
}

fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = x.iter().sum::<f32>() / d;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + eps).sqrt())
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
        let mut y = vec![0f32; x.len()];
        let step = rows_per_chunk(d) * d;
        let eps = self.eps;
        y.par_chunks_mut(step)
            .zip(x.par_chunks(step))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                    let (mean, rstd) = moments(x, eps);
                    for i in 0..d {
                        y[i] = (x[i] - mean) * rstd * w[i] + b[i];
                    }
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.dim(0)?;
        let n = x.elem_count();
        // One output holds dx, then dweight, then dbias.
        let packed = x.apply_op3_no_bwd(
            &w.contiguous()?,
            &g.contiguous()?,
            &LayerNormLastBwd { eps: self.eps },
        )?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, d)?;
        let db = packed.narrow(0, n + d, d)?;
        Ok((Some(dx), Some(dw), Some(db)))
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
                let mut acc = vec![0f32; 2 * d];
                let mut xhat = vec![0f32; d];
                let mut gw = vec![0f32; d];
                for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                    let (mean, rstd) = moments(x, eps);
                    let (mut mean_gw, mut mean_gw_xhat) = (0f32, 0f32);
                    for i in 0..d {
                        xhat[i] = (x[i] - mean) * rstd;
                        gw[i] = g[i] * w[i];
                        mean_gw += gw[i];
                        mean_gw_xhat += gw[i] * xhat[i];
                        acc[i] += g[i] * xhat[i];
                        acc[d + i] += g[i];
                    }
                    mean_gw /= d as f32;
                    mean_gw_xhat /= d as f32;
                    for i in 0..d {
                        dx[i] = rstd * (gw[i] - mean_gw - xhat[i] * mean_gw_xhat);
                    }
                }
                acc
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
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * (-a * a).exp();
    y.copysign(x)
}

/// GELU with the exact (erf) form, as torch's `F.gelu` default and timm's MLP use.
pub struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "pretext-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK_ELEMS)
            .zip(x.par_chunks(CHUNK_ELEMS))
            .for_each(|(y, x)| {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2));
                }
            });
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
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(CHUNK_ELEMS)
            .zip(x.par_chunks(CHUNK_ELEMS).zip(g.par_chunks(CHUNK_ELEMS)))
            .for_each(|(dx, (x, g))| {
                for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                    let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
                    let pdf = (-0.5 * x * x).exp() * INV_SQRT_2PI;
                    *dx = g * (cdf + x * pdf);
                }
            });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
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

impl View {
    fn t(self) -> View {
        View {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// dst[m x n] = scale * lhs[m x k] * rhs[k x n], on the calling thread.
///
/// # Safety
/// Every view must address valid memory for its shape; `dst` must not overlap the inputs.
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
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        false,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        0.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// A pointer that parallel tasks share; each task writes a region no other task touches.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: tasks write disjoint regions (one (batch, head) block each); see the callers.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

fn softmax_rows(s: &mut [f32], n: usize) {
    for row in s.chunks_mut(n) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
    }
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
        let mut out = vec![0f32; g.b * g.n * g.c];
        let dst = Shared(out.as_mut_ptr());
        let base = qkv.as_ptr() as usize;
        (0..g.b * self.heads).into_par_iter().for_each_init(
            || vec![0f32; g.n * g.n],
            |p, task| {
                let (b, h) = (task / self.heads, task % self.heads);
                let [q, k, v] = self.qkv_views(base as *const f32, &g, b, h);
                let dst = dst;
                // SAFETY: views stay inside qkv; this task alone writes head h of batch b.
                unsafe {
                    self.probabilities(p, &g, q, k);
                    let o = dst.0.add(b * g.n * g.c + h * g.dh);
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
        let mut dqkv = vec![0f32; qkv.len()];
        let dst = Shared(dqkv.as_mut_ptr());
        let (base, gbase) = (qkv.as_ptr() as usize, grad.as_ptr() as usize);
        let nn = g.n as isize;
        (0..g.b * self.heads).into_par_iter().for_each_init(
            || (vec![0f32; g.n * g.n], vec![0f32; g.n * g.n]),
            |(p, dp), task| {
                let (b, h) = (task / self.heads, task % self.heads);
                let [q, k, v] = fwd.qkv_views(base as *const f32, &g, b, h);
                let dst = dst;
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
                        .qkv_views(dst.0 as *const f32, &g, b, h)
                        .map(|w| w.ptr as *mut f32);
                    let drs = (3 * g.c) as isize;
                    // dV = P^T dO
                    matmul(g.n, g.dh, g.n, dv, drs, pv.t(), d_o, 1.0);
                    // dP = dO V^T, then dS = P * (dP - rowsum(dP * P)) in place
                    matmul(g.n, g.n, g.dh, dp.as_mut_ptr(), nn, d_o, v.t(), 1.0);
                    for (dp, p) in dp.chunks_mut(g.n).zip(p.chunks(g.n)) {
                        let dot: f32 = dp.iter().zip(p.iter()).map(|(a, b)| a * b).sum();
                        for (d, &pp) in dp.iter_mut().zip(p.iter()) {
                            *d = pp * (*d - dot);
                        }
                    }
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
        let x = slice(xs, xl, self.name())?;
        let w = slice(ws, wl, self.name())?;
        let b = slice(bs, bl, self.name())?;
        let (out, inp) = wl.shape().dims2()?;
        if last_dim(xl) != inp || b.len() != out {
            candle_core::bail!(
                "{}: x {:?}, weight {:?}, bias {}",
                self.name(),
                xl.dims(),
                wl.dims(),
                b.len()
            );
        }
        let rows = x.len() / inp;
        let mut y: Vec<f32> = Vec::with_capacity(rows * out);
        for _ in 0..rows {
            y.extend_from_slice(b);
        }
        // SAFETY: x is rows x inp, w is out x inp (read transposed), y is rows x out.
        unsafe {
            gemm::gemm(
                rows,
                out,
                inp,
                y.as_mut_ptr(),
                1,
                out as isize,
                true,
                x.as_ptr(),
                1,
                inp as isize,
                w.as_ptr(),
                inp as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                threads(),
            );
        }
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, inp) = w.dims2()?;
        let n = x.elem_count();
        // One output holds dx, then dweight, then dbias.
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &LinearLastBwd)?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, out * inp)?.reshape((out, inp))?;
        let db = packed.narrow(0, n + out * inp, out)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

struct LinearLastBwd;

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
        let n = x.len();
        let mut packed = vec![0f32; n + out * inp + out];
        let (dx, rest) = packed.split_at_mut(n);
        let (dw, db) = rest.split_at_mut(out * inp);
        // SAFETY: g is rows x out, w is out x inp, x is rows x inp; dx and dw are disjoint.
        unsafe {
            // dx = g w
            gemm::gemm(
                rows,
                inp,
                out,
                dx.as_mut_ptr(),
                1,
                inp as isize,
                false,
                g.as_ptr(),
                1,
                out as isize,
                w.as_ptr(),
                1,
                inp as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                threads(),
            );
            // dw = g^T x
            gemm::gemm(
                out,
                inp,
                rows,
                dw.as_mut_ptr(),
                1,
                inp as isize,
                false,
                g.as_ptr(),
                out as isize,
                1,
                x.as_ptr(),
                1,
                inp as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                threads(),
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
