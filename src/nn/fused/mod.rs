//! Fused CPU kernels with hand-written backward, one file per family: softmax, LayerNorm, GELU,
//! ReLU, attention on the packed qkv, the linear layer (with a fused GELU), im2col convolution,
//! train-mode BatchNorm and the stems' max pool. Composed from candle ops these are chains of
//! single-threaded elementwise passes, each allocating a tensor (measured with candle 0.11:
//! softmax backward took 152 ms against torch's 2 ms for ViT-Tiny attention at 224 px); here each
//! is one pass over rows, or GEMMs through the `gemm` crate, split across rayon's pool.
//!
//! The wrappers in `nn::ops` use these for f32 tensors on the CPU and the composed ops everywhere
//! else (CUDA, half precision), so every device computes the same function. Work is cut into
//! chunks of a fixed number of rows and partial sums are reduced in chunk order: results do not
//! depend on the number of threads, and reruns stay bit-identical.
//!
//! `raw` holds every unsafe helper (unzeroed buffers, chunked maps over them, shared pointers,
//! GEMM views); `simd` the AVX2 dispatch and the lane-wise sums.

mod attention;
mod batchnorm;
mod conv;
mod gelu;
mod layernorm;
mod linear;
mod pool;
mod raw;
mod relu;
mod simd;
mod softmax;
mod winograd;

pub use attention::Attention;
pub use batchnorm::{channel_stats, BatchNormTrain};
pub use conv::Conv2d;
pub use gelu::{erf, GeluErf};
pub use layernorm::LayerNormLast;
pub use linear::{LinearGelu, LinearLast};
pub use pool::MaxPool3x3S2;
pub use relu::Relu;
pub use simd::{exp_f32, simd};
pub use softmax::SoftmaxLast;

// The kernels' private helpers, visible to every kernel file through `use super::*`.
use candle_core::{CpuStorage, Layout, Result, Tensor};
#[allow(unused_imports)]
use {
    attention::*, batchnorm::*, conv::*, gelu::*, layernorm::*, linear::*, pool::*, raw::*,
    relu::*, simd::*, softmax::*,
};

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
