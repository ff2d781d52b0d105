//! Train-mode BatchNorm: batch statistics per channel, with its backward.

#[allow(unused_imports)]
use super::*;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Per channel of `[B, C, H, W]`: its values, as (batch, contiguous plane) pairs.
pub(super) fn channel_planes(
    x: &[f32],
    b: usize,
    c: usize,
    hw: usize,
    ch: usize,
) -> impl Iterator<Item = &[f32]> {
    (0..b).map(move |i| &x[(i * c + ch) * hw..][..hw])
}

pub(super) fn nchw(l: &Layout) -> Result<(usize, usize, usize)> {
    match l.dims() {
        &[b, c, h, w] => Ok((b, c, h * w)),
        d => candle_core::bail!("batch norm: expected [B, C, H, W], got {d:?}"),
    }
}

/// The sums of `f` over one channel of `[B, C, H, W]` tensors `a` and `b`.
#[inline(always)]
pub(super) fn channel_sums<const K: usize>(
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
pub(super) fn channel_moments(x: &[f32], b: usize, c: usize, hw: usize, ch: usize) -> (f64, f64) {
    let mean = channel_mean(x, b, c, hw, ch);
    let [ss] = channel_sums((x, x), (b, c, hw, ch), |v, _| [(v - mean) * (v - mean)]);
    (mean, ss / (b * hw) as f64)
}

#[inline(always)]
pub(super) fn channel_mean(x: &[f32], b: usize, c: usize, hw: usize, ch: usize) -> f64 {
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
pub(super) fn stats_fit(stats: &[(f64, f64)], c: usize) -> Result<()> {
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

pub(super) struct BatchNormTrainBwd {
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
