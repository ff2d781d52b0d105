//! The linear layer over the last dimension, with its backward.

#[allow(unused_imports)]
use super::*;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// y = x w^T + b over the last dimension: `[.., in]` with weight `[out, in]` and bias `[out]`.
/// One graph node instead of candle_nn's reshape, matmul, reshape, broadcast and add: candle's
/// autograd accumulates every node's gradient onto a fresh zero tensor, so each node costs an
/// allocation, a memset and a full add in backward. The GEMMs are the ones candle calls, on
/// candle's thread count.
pub struct LinearLast;

pub(super) fn threads() -> gemm::Parallelism {
    gemm::Parallelism::Rayon(candle_core::utils::get_num_threads())
}

/// x w^T (the bias not yet added) with the bias and output shape, after checking the shapes.
/// The bias is added afterwards, in a pass of its own or fused with the activation: copied
/// into the output before the GEMM, as BLAS's beta = 1 wants it, it cost a serial pass over the
/// output's memory (10% of the qkv projection's forward at 224 px).
pub(super) fn linear_without_bias<'a>(
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
pub(super) struct LinearLastBwd {
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
