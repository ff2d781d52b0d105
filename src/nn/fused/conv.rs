//! 2-D convolution by im2col and GEMMs, with its backward.

#[allow(unused_imports)]
use super::*;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// 2-D convolution without bias (torchvision's ResNet and DenseNet), square kernel, as im2col
/// and GEMMs, images in parallel (3x3 stride-1 layers by Winograd's algorithm, see
/// `winograd`). Backward computes the weight's gradient with
/// GEMMs over the same columns and the input's gradient only when the input needs one: candle's
/// conv backward computes the image's gradient with direct loops even for the network's input.
pub struct Conv2d {
    pub stride: usize,
    pub padding: usize,
}

/// Sizes of one convolution.
#[derive(Clone, Copy)]
pub(super) struct ConvGeometry {
    pub(super) b: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) o: usize,
    pub(super) k: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
    pub(super) stride: usize,
    pub(super) padding: usize,
}

impl ConvGeometry {
    fn new(x: &[usize], w: &[usize], stride: usize, padding: usize) -> Result<ConvGeometry> {
        let (&[b, c, h, wd], &[o, ci, k, k2]) = (x, w) else {
            candle_core::bail!("conv2d: expected [B,C,H,W] and [O,C,K,K], got {x:?} and {w:?}");
        };
        if ci != c || k != k2 || h + 2 * padding < k || wd + 2 * padding < k {
            candle_core::bail!("conv2d: input {x:?} does not fit weight {w:?}");
        }
        if c == 0 || o == 0 || k == 0 || stride == 0 {
            candle_core::bail!("conv2d: empty weight {w:?} or stride 0");
        }
        Ok(ConvGeometry {
            b,
            c,
            h,
            w: wd,
            o,
            k,
            oh: (h + 2 * padding - k) / stride + 1,
            ow: (wd + 2 * padding - k) / stride + 1,
            stride,
            padding,
        })
    }
    /// Rows of the column matrix: C * K * K.
    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }
    /// An error unless `dims` is the output's shape: the gradient kernels read and write as
    /// many values as the geometry says, from buffers that start unzeroed.
    fn check_gradient(&self, op: &str, dims: &[usize]) -> Result<()> {
        let want = [self.b, self.o, self.oh, self.ow];
        if dims != want {
            candle_core::bail!("{op}: gradient {dims:?} for an output of {want:?}");
        }
        Ok(())
    }
    /// Output positions per image.
    pub(super) fn positions(&self) -> usize {
        self.oh * self.ow
    }

    /// Images per GEMM of the weight gradient, whose inner dimension is the positions: at
    /// 128 px ResNet's last stage has 16 per image, and a GEMM that adds one image's 16 terms
    /// to each of dW's 2.4M entries reads and writes all of dW per image. Images side by side
    /// make the inner dimension about `GEMM_POSITIONS` (this stage's backward: 170 -> 110 ms).
    /// The forward and the input gradient stay per image from 16 positions up: grouped, they
    /// measured no faster there, and the forward slower (fewer, larger tasks to share between
    /// the threads); below, see `convolve_grouped`. Depends on the shape only, so results do
    /// not depend on the thread count.
    fn group(&self) -> usize {
        GEMM_POSITIONS
            .div_ceil(self.positions())
            .clamp(1, self.b.max(1))
    }
    pub(super) fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }
    pub(super) fn output_len(&self) -> usize {
        self.o * self.positions()
    }

    /// A 1x1 convolution with stride 1 and no padding (DenseNet's bottlenecks and
    /// transitions): its column matrix is the image itself.
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }
    /// Length of one image's column matrix, none where the image serves as its own.
    fn cols_len(&self) -> usize {
        if self.pointwise() {
            0
        } else {
            self.ckk() * self.positions()
        }
    }
    /// One image's column matrix (rows `positions()` apart): the image itself for a pointwise
    /// convolution, else `cols` filled by `im2col`.
    fn columns<'a>(&self, image: &'a [f32], cols: &'a mut [f32]) -> &'a [f32] {
        if self.pointwise() {
            return image;
        }
        self.im2col(image, cols, self.positions());
        cols
    }

    /// The outputs `o < outputs` whose input index `o*stride + offset - padding` lies in
    /// `0..len`: one contiguous run, so the copies below need no test per element.
    fn inside(&self, offset: usize, outputs: usize, len: usize) -> Range<usize> {
        let (s, p) = (self.stride, self.padding);
        let lo = p.saturating_sub(offset).div_ceil(s).min(outputs);
        let hi = (len + p).saturating_sub(offset).div_ceil(s).min(outputs);
        lo..hi.max(lo)
    }

    /// cols[(c*K + i)*K + j, oy*OW + ox] = image[c, oy*s - p + i, ox*s - p + j] (0 outside),
    /// rows `ld` apart, so that several images' columns can sit side by side.
    fn im2col(&self, image: &[f32], cols: &mut [f32], ld: usize) {
        let (k, s, p, n) = (self.k, self.stride, self.padding, self.positions());
        let shifted = s == 1 && self.ow == self.w && self.ow <= SHIFTED_ROWS_UP_TO;
        for c in 0..self.c {
            for i in 0..k {
                let rows = self.inside(i, self.oh, self.h);
                for j in 0..k {
                    let xs = self.inside(j, self.ow, self.w);
                    let row = &mut cols[((c * k + i) * k + j) * ld..][..n];
                    if shifted {
                        let plane = &image[c * self.h * self.w..][..self.h * self.w];
                        self.shifted_row(plane, (i, j), (rows.clone(), xs), row);
                        continue;
                    }
                    for (oy, out) in row.chunks_exact_mut(self.ow).enumerate() {
                        if !rows.contains(&oy) || xs.is_empty() {
                            out.fill(0.0);
                            continue;
                        }
                        let y = oy * s + i - p;
                        let src = &image[(c * self.h + y) * self.w + xs.start * s + j - p..];
                        out[..xs.start].fill(0.0);
                        out[xs.end..].fill(0.0);
                        let out = &mut out[xs.clone()];
                        if s == 1 {
                            out.copy_from_slice(&src[..out.len()]);
                        } else {
                            out.iter_mut()
                                .zip(src.iter().step_by(s))
                                .for_each(|(o, &v)| *o = v);
                        }
                    }
                }
            }
        }
    }

    /// One column row of a stride-1 convolution with as many output columns as input columns:
    /// the plane shifted by `i - p` rows and `j - p` columns, so one copy serves all in-bounds
    /// rows instead of one per row (see `SHIFTED_ROWS_UP_TO`). The copy wraps around the edges
    /// (a value from the neighbouring row lands in a padding column); zeros overwrite those
    /// after it.
    fn shifted_row(
        &self,
        plane: &[f32],
        (i, j): (usize, usize),
        (rows, xs): (Range<usize>, Range<usize>),
        row: &mut [f32],
    ) {
        let ow = self.ow;
        if rows.is_empty() || xs.is_empty() {
            row.fill(0.0);
            return;
        }
        row[..rows.start * ow].fill(0.0);
        row[rows.end * ow..].fill(0.0);
        // row[d] = plane[d + i*W + j - (p*W + p)]; out-of-plane ends are padding columns.
        let (shift, back) = (i * self.w + j, self.padding * self.w + self.padding);
        let lo = (rows.start * ow).max(back.saturating_sub(shift));
        let hi = (rows.end * ow).min((plane.len() + back).saturating_sub(shift));
        row[lo..hi].copy_from_slice(&plane[lo + shift - back..][..hi - lo]);
        for out in row[rows.start * ow..rows.end * ow].chunks_exact_mut(ow) {
            out[..xs.start].fill(0.0);
            out[xs.end..].fill(0.0);
        }
    }

    /// The column matrices of several images side by side, rows `ld` apart: image i's
    /// columns from column i * N on.
    fn columns_side_by_side(&self, images: &[f32], cols: &mut [f32], ld: usize) {
        for (i, image) in images.chunks(self.image_len()).enumerate() {
            self.im2col(image, &mut cols[i * self.positions()..], ld);
        }
    }

    /// The adjoint of `im2col`: adds each column entry back onto the pixel it came from, in the
    /// same order as a loop over every entry would.
    fn col2im(&self, cols: &[f32], ld: usize, image: &mut [f32]) {
        let (k, s, p, n) = (self.k, self.stride, self.padding, self.positions());
        for c in 0..self.c {
            for i in 0..k {
                let rows = self.inside(i, self.oh, self.h);
                for j in 0..k {
                    let xs = self.inside(j, self.ow, self.w);
                    let row = &cols[((c * k + i) * k + j) * ld..][..n];
                    for (oy, from) in row.chunks_exact(self.ow).enumerate() {
                        if !rows.contains(&oy) || xs.is_empty() {
                            continue;
                        }
                        let y = oy * s + i - p;
                        let dst = &mut image[(c * self.h + y) * self.w + xs.start * s + j - p..];
                        dst.iter_mut()
                            .step_by(s)
                            .zip(&from[xs.clone()])
                            .for_each(|(d, v)| *d += v);
                    }
                }
            }
        }
    }
}

/// See `ConvGeometry::group`.
pub(super) const GEMM_POSITIONS: usize = 256;

/// Planes up to this wide build their column rows by one shifted copy (`shifted_row`): row by
/// row, DenseNet's 4x4 and 2x2 stages copied 4 and 2 values per call into memcpy (im2col and
/// memcpy 20% of its step's samples). DenseNet-121 step median ratio 0.95 in 5 pairs; with
/// every width shifted 0.91, but ResNet-18 (planes of 32 and 16) then 1.03-1.04 in 14 pairs:
/// inside the noise, on the wrong side, so wider planes keep their row copies.
pub(super) const SHIFTED_ROWS_UP_TO: usize = 8;

/// The transpose of a row-major matrix with rows of `cols` values (see `transpose_into`).
pub(super) fn transpose(m: &[f32], cols: usize) -> Vec<f32> {
    // SAFETY: `transpose_into` writes every element of t.
    let mut t = unsafe { unzeroed(m.len()) };
    transpose_into(m, cols, &mut t);
    t
}

/// dst[m x n] (rows `dst_rs` apart) = lhs * rhs, or += with `accumulate`, on the calling
/// thread: the convolutions run their images in parallel instead.
pub(super) fn conv_gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: View,
    rhs: View,
) {
    assert!(m == 0 || dst.len() >= (m - 1) * dst_rs + n);
    // SAFETY: the callers pass views whose extents lie inside live slices of the right sizes;
    // dst's extent is checked above.
    unsafe {
        gemm_into(
            gemm::Parallelism::None,
            (m, n, k),
            dst.as_mut_ptr(),
            dst_rs as isize,
            accumulate,
            lhs,
            rhs,
            1.0,
        )
    }
}

pub(super) fn row_major(data: &[f32], cols: usize) -> View {
    View {
        ptr: data.as_ptr(),
        rs: cols as isize,
        cs: 1,
    }
}

/// y[image] = W[O, CKK] cols(image)[CKK, N], one GEMM per image, images in parallel; 3x3
/// stride-1 convolutions of large enough planes by Winograd's algorithm instead.
pub(super) fn convolve(g: &ConvGeometry, x: &[f32], w: &[f32]) -> Vec<f32> {
    if winograd::applies(g) {
        return winograd::convolve(g, x, w);
    }
    if g.positions() < GROUPED_FORWARD_BELOW {
        return convolve_grouped(g, x, w);
    }
    let (n, ckk) = (g.positions(), g.ckk());
    // SAFETY (both): each image's GEMM overwrites its output whole; im2col writes every
    // column entry (zero where the window leaves the image).
    let mut y = unsafe { unzeroed(g.b * g.output_len()) };
    y.par_chunks_mut(g.output_len())
        .zip(x.par_chunks(g.image_len()))
        .for_each_init(
            || unsafe { unzeroed(g.cols_len()) },
            |cols, (y, image)| {
                let cols = row_major(g.columns(image, cols), n);
                conv_gemm((g.o, n, ckk), y, n, false, row_major(w, ckk), cols);
            },
        );
    y
}

/// Planes of fewer positions than this take their forward a group of images at a time
/// (`convolve_grouped`).
pub(super) const GROUPED_FORWARD_BELOW: usize = 16;

/// The grouped forward splits a batch into at least this many groups, so that the threads
/// share it.
pub(super) const FORWARD_TASKS: usize = 4;

/// The forward of small planes: a group of images' columns side by side (see
/// `ConvGeometry::group`, at most a `FORWARD_TASKS`th of the batch, rounded down), one GEMM W[O, CKK]
/// cols[CKK, images * N], each image's block copied out. One GEMM per image would be N wide,
/// which the `gemm` crate runs with its narrowest kernel and with the whole weight packed again
/// for each image: ResNet-18's last stage at 64 px (2x2 planes, 512 channels) took 13.9 ms a 3x3
/// forward that way, 5.0 grouped, where PyTorch takes 4.8 (batch 32, 2 threads, median of 9).
fn convolve_grouped(g: &ConvGeometry, x: &[f32], w: &[f32]) -> Vec<f32> {
    let (n, ckk) = (g.positions(), g.ckk());
    let group = g.group().min(g.b / FORWARD_TASKS).max(1);
    let ld = group * n;
    // SAFETY (all three): the copies below write every output of the group's images, from a
    // GEMM that writes `wide`'s first `width` columns whole, from columns im2col writes for
    // every image of the group.
    let mut y = unsafe { unzeroed(g.b * g.output_len()) };
    y.par_chunks_mut(group * g.output_len())
        .zip(x.par_chunks(group * g.image_len()))
        .for_each(|(y, images)| {
            let width = images.len() / g.image_len() * n;
            let mut cols = unsafe { unzeroed(ckk * ld) };
            let mut wide = unsafe { unzeroed(g.o * ld) };
            g.columns_side_by_side(images, &mut cols, ld);
            let (w, cols) = (row_major(w, ckk), row_major(&cols, ld));
            conv_gemm((g.o, width, ckk), &mut wide, ld, false, w, cols);
            for (i, y) in y.chunks_exact_mut(g.output_len()).enumerate() {
                for (o, row) in y.chunks_exact_mut(n).enumerate() {
                    row.copy_from_slice(&wide[o * ld + i * n..][..n]);
                }
            }
        });
    y
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "pretext-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, self.name())?;
        let w = slice(ws, wl, self.name())?;
        let g = ConvGeometry::new(xl.dims(), wl.dims(), self.stride, self.padding)?;
        let y = convolve(&g, x, w);
        Ok((CpuStorage::F32(y), Shape::from((g.b, g.o, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dw = x.apply_op2_no_bwd(
            &grad,
            &Conv2dWeightGrad {
                stride: self.stride,
                padding: self.padding,
                kernel: w.dim(2)?,
            },
        )?;
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(
                w,
                &Conv2dInputGrad {
                    stride: self.stride,
                    padding: self.padding,
                    input: x.dims().to_vec(),
                },
            )?)
        } else {
            None
        };
        Ok((dx, Some(dw)))
    }
}

/// dW = sum over images of g[O, N] cols[CKK, N]^T, computed transposed, dW^T[CKK, O] =
/// cols g^T, one GEMM per group of images (see `ConvGeometry::group`) with g^T copied (see
/// `dw_transposed`), in a fixed number of batch chunks summed in order (the same result
/// whatever the thread count) and transposed once at the end.
pub(super) struct Conv2dWeightGrad {
    stride: usize,
    padding: usize,
    kernel: usize,
}

pub(super) const CONV_GRAD_CHUNKS: usize = 8;

impl CustomOp2 for Conv2dWeightGrad {
    fn name(&self) -> &'static str {
        "pretext-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, self.name())?;
        let grad = slice(gs, gl, self.name())?;
        let (c, o) = (xl.dims()[1], gl.dims()[1]);
        let g = ConvGeometry::new(
            xl.dims(),
            &[o, c, self.kernel, self.kernel],
            self.stride,
            self.padding,
        )?;
        g.check_gradient(self.name(), gl.dims())?;
        let per_chunk =
            g.b.div_ceil(CONV_GRAD_CHUNKS)
                .max(1)
                .next_multiple_of(g.group());
        // Few chunks (small planes, so large groups) leave threads idle: then each GEMM is
        // split by rows instead (see `DW_ROWS`).
        let split_rows = g.b.div_ceil(per_chunk) < CONV_GRAD_CHUNKS;
        let partials: Vec<Vec<f32>> = x
            .par_chunks(per_chunk * g.image_len())
            .zip(grad.par_chunks(per_chunk * g.output_len()))
            .map(|(images, grads)| dw_transposed(&g, images, grads, split_rows))
            .collect();
        let dw_t = sum_in_order(&partials, g.o * g.ckk());
        Ok((
            CpuStorage::F32(transpose(&dw_t, g.o)),
            Shape::from((g.o, g.c, self.kernel, self.kernel)),
        ))
    }
}

/// One batch chunk's dW^T[CKK, O] = sum over its groups of cols[CKK, images * N]
/// g^T[images * N, O]. The gradient is transposed into a copy rather than read through a
/// transposed view: the `gemm` crate packs a strided operand slowly. One thread, median of 15,
/// ResNet-18's shapes at 128 px (O x CKK, 256 positions), through the view / with the copy:
/// 64 x 576 0.86 / 0.68 ms, 128 x 1152 0.76 / 0.66, 256 x 2304 2.98 / 2.76, 512 x 4608 11.6 /
/// 11.4, the stem's 64 x 49 (4,096 positions) 0.99 / 0.28; untransposed, dW = g cols^T, 2.3 /
/// 0.92 / 3.2 / 12.2 / 0.84.
fn dw_transposed(g: &ConvGeometry, images: &[f32], grads: &[f32], split_rows: bool) -> Vec<f32> {
    let (n, ckk, group) = (g.positions(), g.ckk(), g.group());
    let ld = group * n;
    // SAFETY: the first GEMM overwrites dw whole (t == 0 does not accumulate). im2col and
    // transpose_into write the columns and rows of every image in the group, and the GEMMs
    // read only those (`width`); a short last group leaves the tail of each row unread.
    let mut dw = unsafe { unzeroed(ckk * g.o) };
    let mut cols = unsafe { unzeroed(if group == 1 { g.cols_len() } else { ckk * ld }) };
    let mut g_t = unsafe { unzeroed(ld * g.o) };
    for (t, (images, grads)) in images
        .chunks(group * g.image_len())
        .zip(grads.chunks(group * g.output_len()))
        .enumerate()
    {
        let width = images.len() / g.image_len() * n;
        let cols = if group == 1 {
            row_major(g.columns(images, &mut cols), n)
        } else {
            g.columns_side_by_side(images, &mut cols, ld);
            row_major(&cols, ld)
        };
        for (i, gy) in grads.chunks(g.output_len()).enumerate() {
            transpose_into(gy, n, &mut g_t[i * g.output_len()..][..gy.len()]);
        }
        let g_t = row_major(&g_t, g.o);
        let rows = if split_rows { DW_ROWS } else { ckk };
        dw.par_chunks_mut(rows * g.o)
            .enumerate()
            .for_each(|(b, dw)| {
                // SAFETY: row b * rows lies inside cols (dw has ckk rows, as cols does).
                let cols = unsafe { cols.rows_from(b * rows) };
                conv_gemm((dw.len() / g.o, g.o, width), dw, g.o, t > 0, cols, g_t);
            });
    }
    dw
}

/// Rows of dW^T per task where a weight gradient has fewer batch chunks than
/// `CONV_GRAD_CHUNKS`. A fixed size, so the split depends on the shape only: results do not
/// depend on the thread count.
pub(super) const DW_ROWS: usize = 512;

/// The elementwise sum of the partials (each `len` long; zeros if there are none), added in
/// their order whatever the thread count, the elements split between the threads.
fn sum_in_order(partials: &[Vec<f32>], len: usize) -> Vec<f32> {
    let Some((first, rest)) = partials.split_first() else {
        return vec![0.0; len];
    };
    let mut sum = first.clone();
    sum.par_chunks_mut(CHUNK_ELEMS)
        .enumerate()
        .for_each(|(i, s)| {
            for p in rest {
                s.iter_mut()
                    .zip(&p[i * CHUNK_ELEMS..])
                    .for_each(|(d, v)| *d += v);
            }
        });
    sum
}

/// dX, by one of two routes. A stride-1 convolution's input gradient is itself a convolution: of
/// g with the kernel flipped in space and its in/out channels swapped, padded by K - 1 - P. That
/// route runs GEMMs of C rows and O*K*K inner terms and needs no col2im. The other, for any
/// stride: per image col2im(W^T[CKK, O] g[O, N]), GEMMs of C*K*K rows and only O inner terms.
pub(super) struct Conv2dInputGrad {
    stride: usize,
    padding: usize,
    input: Vec<usize>,
}

/// From this many input channels on, stride-1 input gradients take the convolution route. One
/// thread, best of 10, `gemm` crate: ResNet-18's 3x3 shapes at 128 px ran 62-66 GFLOP/s by
/// col2im and 83-88 as a convolution from 128 channels up. At 64 channels (layer1) the col2im
/// route's GEMM alone was the faster, 84-86 against 68, but with col2im counted the whole input
/// gradient took 31.6 ms by that route against 15.6 as a convolution (batch 32, 2 threads,
/// median of 7), and the convolution route now runs by Winograd's algorithm besides.
pub(super) const INPUT_GRAD_AS_CONV_FROM: usize = 64;

impl ConvGeometry {
    /// The geometry of the input gradient as a convolution of the output gradient, where that
    /// route applies (see `Conv2dInputGrad`).
    fn input_grad_as_conv(&self) -> Option<ConvGeometry> {
        let applies = self.stride == 1
            && self.padding < self.k
            && !self.pointwise()
            && self.c >= INPUT_GRAD_AS_CONV_FROM;
        if !applies {
            return None;
        }
        let shape = [self.b, self.o, self.oh, self.ow];
        ConvGeometry::new(
            &shape,
            &[self.c, self.o, self.k, self.k],
            1,
            self.k - 1 - self.padding,
        )
        .ok()
    }
}

/// W[O, C, K, K] to W'[C, O, K, K] with W'[c, o, i, j] = W[o, c, K-1-i, K-1-j]: flipping both
/// spatial axes reverses each flattened K x K block. The input channels in parallel: on one
/// thread, ResNet-18's 512 x 512 x 3 x 3 weight took about 3 ms of each last-stage input
/// gradient.
pub(super) fn flip_kernel(w: &[f32], o: usize, c: usize, kk: usize) -> Vec<f32> {
    // SAFETY: each input channel's task writes all of its O blocks.
    let mut flipped = unsafe { unzeroed(w.len()) };
    flipped
        .par_chunks_mut(o * kk)
        .enumerate()
        .for_each(|(ci, per_in)| {
            for (oi, dst) in per_in.chunks_exact_mut(kk).enumerate() {
                let block = &w[(oi * c + ci) * kk..][..kk];
                dst.iter_mut()
                    .zip(block.iter().rev())
                    .for_each(|(d, &v)| *d = v);
            }
        });
    flipped
}

impl CustomOp2 for Conv2dInputGrad {
    fn name(&self) -> &'static str {
        "pretext-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let grad = slice(gs, gl, self.name())?;
        let w = slice(ws, wl, self.name())?;
        let g = ConvGeometry::new(&self.input, wl.dims(), self.stride, self.padding)?;
        g.check_gradient(self.name(), gl.dims())?;
        if let Some(as_conv) = g.input_grad_as_conv() {
            let flipped = flip_kernel(w, g.o, g.c, g.k * g.k);
            let dx = convolve(&as_conv, grad, &flipped);
            return Ok((CpuStorage::F32(dx), Shape::from(self.input.clone())));
        }
        let (n, ckk) = (g.positions(), g.ckk());
        // W^T as a row-major copy: read through a transposed view, gemm ran this product at
        // 29-42 GFLOP/s on one thread, from the copy at 38-66 (best of 10, ResNet's layer3 and
        // layer4 and DenseNet's growth shapes); the copy is once per call, the GEMMs per image.
        let wt = transpose(w, ckk);
        let mut dx = vec![0f32; g.b * g.image_len()];
        dx.par_chunks_mut(g.image_len())
            .zip(grad.par_chunks(g.output_len()))
            .for_each_init(
                // SAFETY: the GEMM overwrites dcols whole before col2im reads it.
                || unsafe { unzeroed(g.cols_len()) },
                |dcols, (image, gy)| {
                    // dcols[CKK, N] = W^T[CKK, O] g[O, N]
                    let (wt, gy) = (row_major(&wt, g.o), row_major(gy, n));
                    if g.pointwise() {
                        conv_gemm((ckk, n, g.o), image, n, false, wt, gy);
                    } else {
                        conv_gemm((ckk, n, g.o), dcols, n, false, wt, gy);
                        g.col2im(dcols, n, image);
                    }
                },
            );
        Ok((CpuStorage::F32(dx), Shape::from(self.input.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Both gradient kernels refuse a gradient that is not the output's shape (here one column
    /// short) instead of reading past it or leaving part of their result unwritten.
    #[test]
    fn a_gradient_of_the_wrong_shape_is_an_error() {
        let zeros = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
        let (x, w, short) = (
            zeros(&[2, 3, 8, 8]),
            zeros(&[4, 3, 3, 3]),
            zeros(&[2, 4, 8, 7]),
        );
        let dw = x.apply_op2_no_bwd(
            &short,
            &Conv2dWeightGrad {
                stride: 1,
                padding: 1,
                kernel: 3,
            },
        );
        let dx = short.apply_op2_no_bwd(
            &w,
            &Conv2dInputGrad {
                stride: 1,
                padding: 1,
                input: vec![2, 3, 8, 8],
            },
        );
        for (what, result) in [("weight", dw), ("input", dx)] {
            let err = result.expect_err(what).to_string();
            assert!(
                err.contains("gradient [2, 4, 8, 7] for an output of [2, 4, 8, 8]"),
                "{what}: {err}"
            );
        }
    }
}
