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

/// `t` = the transpose of `m` (row-major, rows of `cols` values; `t` the same length). In 8x8
/// blocks through AVX registers where the CPU has AVX, the ragged edges element by element.
/// Element by element with 16-row blocks it took about 4 cycles an element (a quarter of a
/// Winograd convolution's samples at ResNet's layer1); in registers, under one.
pub(super) fn transpose_into(m: &[f32], cols: usize, t: &mut [f32]) {
    assert_eq!(m.len(), t.len(), "transpose: sizes differ");
    // Whole rows only: `t` starts unzeroed in the callers, and a ragged tail would stay unwritten.
    assert!(
        m.is_empty() || (cols > 0 && m.len().is_multiple_of(cols)),
        "transpose: {} values are not rows of {cols}",
        m.len()
    );
    let rows = m.len() / cols.max(1);
    let (full_rows, full_cols) = (rows / 8 * 8, cols / 8 * 8);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX (checked above); the blocks lie inside both matrices.
        unsafe { transpose_blocks_avx(m, rows, cols, t) };
        transpose_edges(m, rows, cols, t, (full_rows, full_cols));
        return;
    }
    transpose_edges(m, rows, cols, t, (0, 0));
}

/// The elements of `m` outside its first `full.0` rows' first `full.1` columns, transposed
/// into `t`; with `full = (0, 0)`, the whole matrix.
fn transpose_edges(m: &[f32], rows: usize, cols: usize, t: &mut [f32], full: (usize, usize)) {
    for r in 0..rows {
        let from = if r < full.0 { full.1 } else { 0 };
        for c in from..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
}

/// The 8x8 blocks of the first `rows / 8 * 8` rows and `cols / 8 * 8` columns.
///
/// # Safety
/// The CPU must have AVX; `m` and `t` must hold `rows * cols` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_blocks_avx(m: &[f32], rows: usize, cols: usize, t: &mut [f32]) {
    use std::arch::x86_64::*;
    for r in (0..rows / 8 * 8).step_by(8) {
        for c in (0..cols / 8 * 8).step_by(8) {
            // SAFETY: rows r..r+8 and columns c..c+8 lie inside m, and their transposes
            // inside t (the loop bounds stop at the last whole block).
            unsafe {
                let row = |i: usize| _mm256_loadu_ps(m.as_ptr().add((r + i) * cols + c));
                let (a0, a1, a2, a3) = (row(0), row(1), row(2), row(3));
                let (a4, a5, a6, a7) = (row(4), row(5), row(6), row(7));
                let (b0, b1) = (_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1));
                let (b2, b3) = (_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3));
                let (b4, b5) = (_mm256_unpacklo_ps(a4, a5), _mm256_unpackhi_ps(a4, a5));
                let (b6, b7) = (_mm256_unpacklo_ps(a6, a7), _mm256_unpackhi_ps(a6, a7));
                let c0 = _mm256_shuffle_ps::<0x44>(b0, b2);
                let c1 = _mm256_shuffle_ps::<0xEE>(b0, b2);
                let c2 = _mm256_shuffle_ps::<0x44>(b1, b3);
                let c3 = _mm256_shuffle_ps::<0xEE>(b1, b3);
                let c4 = _mm256_shuffle_ps::<0x44>(b4, b6);
                let c5 = _mm256_shuffle_ps::<0xEE>(b4, b6);
                let c6 = _mm256_shuffle_ps::<0x44>(b5, b7);
                let c7 = _mm256_shuffle_ps::<0xEE>(b5, b7);
                let out = [
                    _mm256_permute2f128_ps::<0x20>(c0, c4),
                    _mm256_permute2f128_ps::<0x20>(c1, c5),
                    _mm256_permute2f128_ps::<0x20>(c2, c6),
                    _mm256_permute2f128_ps::<0x20>(c3, c7),
                    _mm256_permute2f128_ps::<0x31>(c0, c4),
                    _mm256_permute2f128_ps::<0x31>(c1, c5),
                    _mm256_permute2f128_ps::<0x31>(c2, c6),
                    _mm256_permute2f128_ps::<0x31>(c3, c7),
                ];
                for (j, v) in out.into_iter().enumerate() {
                    _mm256_storeu_ps(t.as_mut_ptr().add((c + j) * rows + r), v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shape class: whole 8x8 blocks only, ragged rows, ragged columns, both, and
    /// matrices narrower than a block.
    #[test]
    fn transpose_matches_the_definition() {
        for (rows, cols) in [
            (16, 24),
            (13, 16),
            (16, 21),
            (13, 21),
            (3, 5),
            (1, 9),
            (9, 1),
        ] {
            let m: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut t = vec![-1f32; rows * cols];
            transpose_into(&m, cols, &mut t);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        t[c * rows + r],
                        m[r * cols + c],
                        "{rows}x{cols} at ({r}, {c})"
                    );
                }
            }
        }
    }
}
