//! GELU in its exact (erf) form, with its backward.

#[allow(unused_imports)]
use super::*;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

pub(super) const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
pub(super) const INV_SQRT_2PI: f32 = 0.398_942_3;

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
pub(super) fn erf_given_exp(x: f32, a: f32, e: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * e;
    y.copysign(x)
}

/// GELU(x) = x/2 (1 + erf(x / sqrt 2)).
#[inline(always)]
pub(super) fn gelu_erf_of(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// GELU of every element, in parallel chunks.
pub(super) fn gelu_erf(x: &[f32]) -> Vec<f32> {
    // SAFETY: the closure writes its output chunk whole, element by element from the
    // input, before it reads any of it.
    unsafe {
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

pub(super) struct GeluErfBwd;

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
        // SAFETY: the closure writes its output chunk whole, element by element from the
        // input, before it reads any of it.
        let dx = unsafe {
            map_chunks2(
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
            )
        };
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}
