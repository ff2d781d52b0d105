//! The unsafe plumbing of the kernels, in one place: buffers left unzeroed for outputs a kernel
//! writes whole, chunked maps over them, a pointer parallel tasks share, and the views and
//! GEMM calls into the `gemm` crate. Every item that can break memory safety when misused is an
//! `unsafe fn` whose contract its doc states; the kernels call them in `unsafe` blocks that say
//! why the contract holds.

#[allow(unused_imports)]
use super::*;
use rayon::prelude::*;

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
pub(super) unsafe fn unzeroed(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is n; the caller writes every element before reading it.
    unsafe { v.set_len(n) };
    v
}

/// `out = f(a)` chunk by chunk: chunks of `step` elements in parallel, each through `simd`
/// (`step` a multiple of the row length keeps rows whole). `f` must be `#[inline(always)]`.
///
/// # Safety
/// `f` must write every element of its output chunk before reading any: the output starts
/// unzeroed.
#[inline(always)]
pub(super) unsafe fn map_chunks(
    a: &[f32],
    step: usize,
    f: impl Fn(&mut [f32], &[f32]) + Sync,
) -> Vec<f32> {
    // SAFETY: `f` writes each chunk whole before reading it (the caller's promise).
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

/// `out = f(a, b)` chunk by chunk, as [`map_chunks`].
///
/// # Safety
/// As [`map_chunks`]: `f` writes its output chunk whole before reading it.
pub(super) unsafe fn map_chunks2(
    (a, b): (&[f32], &[f32]),
    step: usize,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) -> Vec<f32> {
    // SAFETY: `f` writes each chunk whole before reading it (the caller's promise).
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

/// A row-major view of a matrix inside a larger buffer: element (i, j) at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
pub(super) struct View {
    pub(super) ptr: *const f32,
    pub(super) rs: isize,
    pub(super) cs: isize,
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
    pub(super) unsafe fn rows_from(self, row: usize) -> View {
        View {
            ptr: self.ptr.offset(row as isize * self.rs),
            ..self
        }
    }
    pub(super) fn t(self) -> View {
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
pub(super) unsafe fn gemm_into(
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
pub(super) const GEMM_ROWS: usize = 256;

/// `gemm_into` with lhs's rows cut into blocks of `GEMM_ROWS`, one single-threaded GEMM per
/// block on rayon's pool. For the linear layers' tall products (6304 rows in a ViT-Tiny batch
/// at 224 px) this measured 15-35% faster on 2 cores than the `gemm` crate's own
/// `Parallelism::Rayon(2)` (best of 15: qkv 12.3 -> 9.5 ms, its dx 17.4 -> 11.2 ms), which
/// splits the work into fewer, larger pieces. A block's arithmetic does not depend on the
/// thread count.
///
/// # Safety
/// As `gemm_into`.
pub(super) unsafe fn gemm_by_rows(
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
#[allow(clippy::too_many_arguments)] // the GEMM's own shape: m, n, k, the output and two views
pub(super) unsafe fn matmul(
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
pub(super) struct Shared(pub(super) *mut f32);
// SAFETY: tasks write disjoint regions (one (batch, head) block each); see the callers.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer `offset` elements in. Through a method, so that closures capture the whole
    /// `Shared` (which is Send) rather than its raw pointer field.
    ///
    /// # Safety
    /// `offset` must stay inside the buffer this pointer came from.
    pub(super) unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: the caller keeps `offset` inside the buffer.
        unsafe { self.0.add(offset) }
    }
}
