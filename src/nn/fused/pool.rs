//! The 3x3 / stride 2 max pool of the ResNet and DenseNet stems, with its backward.

#[allow(unused_imports)]
use super::*;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// The 3x3 window, stride 2, padding 1, of `[B, C, H, W]` (the ResNet and DenseNet stem).
pub(super) struct PoolGeometry {
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
pub(super) fn max_nan(a: f32, b: f32) -> f32 {
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
pub(super) struct MaxPool3x3S2Bwd;

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
