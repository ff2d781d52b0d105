//! ReLU as one pass forward and one backward.

#[allow(unused_imports)]
use super::*;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// max(x, 0). Composed, candle's backward builds a mask through four allocating passes
/// (zeros, compare, cast, multiply); here it is one pass over the output and the gradient.
pub struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "pretext-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        // SAFETY: the closure writes its output chunk whole, element by element from the
        // input, before it reads any of it.
        let y = unsafe {
            map_chunks(
                x,
                CHUNK_ELEMS,
                #[inline(always)]
                |y, x| {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = x.max(0.0);
                    }
                },
            )
        };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &ReluBwd)?))
    }
}

/// dx = g where the output is positive, else 0 (torch's rule: no gradient at exactly 0).
pub(super) struct ReluBwd;

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
        // SAFETY: the closure writes its output chunk whole, element by element from the
        // input, before it reads any of it.
        let dx = unsafe {
            map_chunks2(
                (y, g),
                CHUNK_ELEMS,
                #[inline(always)]
                |dx, y, g| {
                    for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                        *dx = if y > 0.0 { g } else { 0.0 };
                    }
                },
            )
        };
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }
}
