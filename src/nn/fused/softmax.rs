//! Softmax over the last dimension, with its backward, and the row softmax attention uses.

#[allow(unused_imports)]
use super::*;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// Softmax over the last dimension.
pub struct SoftmaxLast;

impl CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "pretext-softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let d = last_dim(l);
        // SAFETY: the closure writes its output chunk whole, element by element from the
        // input, before it reads any of it.
        let y = unsafe {
            map_chunks(
                x,
                rows_per_chunk(d) * d,
                #[inline(always)]
                |y, x| {
                    y.copy_from_slice(x);
                    softmax_rows(y, d);
                },
            )
        };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxLastBwd)?))
    }
}

/// dx = y * (g - sum(g * y)) per row.
pub(super) struct SoftmaxLastBwd;

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
        // SAFETY: the closure writes its output chunk whole, element by element from the
        // input, before it reads any of it.
        let dx = unsafe {
            map_chunks2(
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
            )
        };
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }
}

#[inline(always)]
pub(super) fn softmax_rows(s: &mut [f32], n: usize) {
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
