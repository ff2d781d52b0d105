//! LayerNorm over the last dimension, with its backward.

#[allow(unused_imports)]
use super::*;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// LayerNorm over the last dimension of `x` with `weight` and `bias` (both `[d]`), biased variance
/// as torch computes it.
pub struct LayerNormLast {
    pub eps: f32,
}

#[inline(always)]
pub(super) fn moments(x: &[f32], eps: f32) -> (f32, f32) {
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
        // SAFETY: the closure writes its output chunk whole, element by element from the
        // input, before it reads any of it.
        let y = unsafe {
            map_chunks(
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
            )
        };
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

pub(super) struct LayerNormLastBwd {
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
