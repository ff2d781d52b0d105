//! 3x3 stride-1 convolutions with padding 1 by Winograd's minimal filtering F(2x2, 3x3)
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016,
//! arXiv:1509.09308): each 2x2 block of outputs from a 4x4 window of the input with 16
//! multiplications per channel pair instead of 36. The products become 16 GEMMs, one per
//! position of the transformed 4x4 tile, of the transformed input tiles [tiles, C] by the
//! transformed weights [C, O]; the transforms before and after cost only additions. They run
//! channels-last, each step one pass over a tile's C (or O) values, which vectorises whatever
//! the plane size; the image is transposed to that layout and back. Most of ResNet-18's
//! convolution time is in such layers, forward and (as a convolution with the flipped kernel)
//! in the input gradient.
//!
//! With B, G and A the F(2, 3) matrices below, a tile d and a kernel g give the outputs
//! A^T [(G g G^T) . (B^T d B)] A. The transforms are exact in real arithmetic; in f32 the
//! result differs from the direct sum by rounding only (`nn::cnn`'s test checks it against
//! candle's convolution, 1e-4 relative; the parity tests against torchvision's ResNet-18).

#[allow(unused_imports)]
use super::*;
use rayon::prelude::*;

/// Transformed tiles per GEMM: images are taken together until their tiles reach this many,
/// so that the GEMMs are tall enough to run near the kernels' speed while a group's scratch
/// stays in cache. Forward at batch 32 on 2 threads, median of 40 (ResNet-18's layer2 at
/// 128 px, 64 tiles an image / layer1 at 64 px, the same / layer1 at 128 px, 256): 64 tiles
/// 8.0 / 2.0 / 8.0 ms, 128 tiles 6.9 / 2.0 / 8.3, 256 tiles 8.2 / 2.5 / 9.8, 512 tiles 21.6 /
/// 2.5 / -. Depends on the shape only, so results do not depend on the thread count.
const TILES_PER_GEMM: usize = 128;

/// Planes with fewer tiles than this stay with im2col, where the transformed weights (16/9 of
/// the weights, transformed on every call) outweigh the multiplications saved. Forward of
/// C -> C channels at batch 32, 2 threads, median of 30, im2col against Winograd (ms): 32x32
/// planes, 64 channels 14.5 / 9.1; 16x16, 128: 13.3 / 7.4; 8x8, 256: 12.2 / 10.0; 8x8, 128:
/// 3.3 / 2.4; but 4x4 planes (4 tiles), 512 channels: 14.6 / 14.8-19.4.
const MIN_TILES: usize = 16;

/// Whether `g` is a convolution this file computes.
pub(super) fn applies(g: &ConvGeometry) -> bool {
    let (th, tw) = tiles(g);
    g.k == 3 && g.stride == 1 && g.padding == 1 && th * tw >= MIN_TILES
}

/// Tile counts of one image: rows, columns.
fn tiles(g: &ConvGeometry) -> (usize, usize) {
    (g.oh.div_ceil(2), g.ow.div_ceil(2))
}

/// y = conv(x, w) for a geometry where `applies` holds, groups of images in parallel.
pub(super) fn convolve(g: &ConvGeometry, x: &[f32], w: &[f32]) -> Vec<f32> {
    let (th, tw) = tiles(g);
    let group = TILES_PER_GEMM.div_ceil(th * tw).clamp(1, g.b.max(1));
    let u = transform_weights(w, g.o, g.c);
    // SAFETY: each group's images get every output plane written by `transpose_into`.
    let mut y = unsafe { unzeroed(g.b * g.output_len()) };
    y.par_chunks_mut(group * g.output_len())
        .zip(x.par_chunks(group * g.image_len()))
        .for_each(|(y, images)| convolve_group(g, &u, images, y));
    y
}

/// One group of images: each image's tiles transformed into V[xi][tiles, C], the 16 GEMMs
/// M[xi][tiles, O] = V[xi] U[xi] (in parallel too: a batch of small planes is one or two
/// groups), then each image's tiles back into its output planes.
fn convolve_group(g: &ConvGeometry, u: &[f32], images: &[f32], y: &mut [f32]) {
    let (th, tw) = tiles(g);
    let (per_image, pw) = (th * tw, 2 * tw + 2);
    let width = images.len() / g.image_len() * per_image;
    // SAFETY (all four): `pad_channels_last` writes every element of `padded` and of the
    // first H*W*C of `hwc`; the input transform writes every position of every tile of V
    // (`width` tiles of C values, 16 times); the GEMMs write M whole; the output transform
    // writes every output position of `hwc`'s first H*W*O before the transpose reads them.
    let mut padded = unsafe { unzeroed((2 * th + 2) * pw * g.c) };
    let mut v = unsafe { unzeroed(16 * width * g.c) };
    let mut m = unsafe { unzeroed(16 * width * g.o) };
    let mut hwc = unsafe { unzeroed(g.positions() * g.c.max(g.o)) };
    simd(|| {
        for (i, image) in images.chunks_exact(g.image_len()).enumerate() {
            pad_channels_last(g, image, pw, &mut hwc, &mut padded);
            transform_input(g, &padded, i * per_image, width, &mut v);
        }
    });
    m.par_chunks_mut(width * g.o)
        .enumerate()
        .for_each(|(xi, m)| {
            let v = &v[xi * width * g.c..][..width * g.c];
            let u = row_major(&u[xi * g.c * g.o..][..g.c * g.o], g.o);
            conv_gemm((width, g.o, g.c), m, g.o, false, row_major(v, g.c), u);
        });
    for (i, y) in y.chunks_exact_mut(g.output_len()).enumerate() {
        let hwc = &mut hwc[..g.positions() * g.o];
        simd(|| transform_output(g, &m, i * per_image, width, hwc));
        transpose_into(hwc, g.o, y);
    }
}

/// U[xi][c][o] = (G w[o][c] G^T) at position xi of the 4x4 tile, G = [[1, 0, 0],
/// [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]; the 16 positions in parallel.
fn transform_weights(w: &[f32], o: usize, c: usize) -> Vec<f32> {
    // Row `i` of G applied to (a, b, c).
    let g = |i: usize, a: f32, b: f32, c: f32| match i {
        0 => a,
        1 => 0.5 * (a + b + c),
        2 => 0.5 * (a - b + c),
        _ => c,
    };
    // SAFETY: each position's task writes its [C, O] block whole.
    let mut u = unsafe { unzeroed(16 * o * c) };
    u.par_chunks_mut(o * c).enumerate().for_each(|(xi, u)| {
        let (i, j) = (xi / 4, xi % 4);
        for (oc, k) in w.chunks_exact(9).enumerate() {
            // (G k) row i, then G along it.
            let t: [f32; 3] = std::array::from_fn(|s| g(i, k[s], k[3 + s], k[6 + s]));
            u[(oc % c) * o + oc / c] = g(j, t[0], t[1], t[2]);
        }
    });
    u
}

/// `padded[y][x][c]`: the image channels-last with a border of zeros, one row and column
/// before it and enough after it to fill whole 4x4 windows; every element written. `hwc` is
/// scratch.
fn pad_channels_last(
    g: &ConvGeometry,
    image: &[f32],
    pw: usize,
    hwc: &mut [f32],
    padded: &mut [f32],
) {
    let (c, row) = (g.c, g.w * g.c);
    let hwc = &mut hwc[..g.h * row];
    transpose_into(image, g.h * g.w, hwc);
    let mut lines = padded.chunks_exact_mut(pw * c);
    if let Some(top) = lines.next() {
        top.fill(0.0);
    }
    for (src, line) in hwc.chunks_exact(row).zip(&mut lines) {
        line[..c].fill(0.0);
        line[c..c + row].copy_from_slice(src);
        line[c + row..].fill(0.0);
    }
    lines.for_each(|bottom| bottom.fill(0.0));
}

/// V[xi][first + t][c] = (B^T d B) at position xi for the image's tile t, d its 4x4 window,
/// B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
#[inline(always)]
fn transform_input(g: &ConvGeometry, padded: &[f32], first: usize, width: usize, v: &mut [f32]) {
    let (th, tw) = tiles(g);
    let (c, pw) = (g.c, 2 * tw + 2);
    let mut rows = vec![0f32; 16 * c];
    for ty in 0..th {
        for tx in 0..tw {
            // B^T across each window row a: rows[a * 4 + j].
            for a in 0..4 {
                let d = |b: usize| &padded[((2 * ty + a) * pw + 2 * tx + b) * c..][..c];
                let mut out = rows[a * 4 * c..][..4 * c].chunks_exact_mut(c);
                let out = [(); 4].map(|_| out.next().expect("4 rows of c"));
                combine(out, [d(0), d(1), d(2), d(3)]);
            }
            // Then down the columns: position i * 4 + j, 4 positions (4 * width tiles) apart.
            let t = first + ty * tw + tx;
            for j in 0..4 {
                let r = |a: usize| &rows[(a * 4 + j) * c..][..c];
                let mut out = v[(j * width + t) * c..]
                    .chunks_mut(4 * width * c)
                    .map(|position| &mut position[..c]);
                let out = [(); 4].map(|_| out.next().expect("16 positions"));
                combine(out, [r(0), r(1), r(2), r(3)]);
            }
        }
    }
}

/// B^T applied to four vectors: out[j] = (d0 - d2, d1 + d2, d2 - d1, d1 - d3)[j], element by
/// element.
#[inline(always)]
fn combine([o0, o1, o2, o3]: [&mut [f32]; 4], [d0, d1, d2, d3]: [&[f32]; 4]) {
    for k in 0..o0.len() {
        o0[k] = d0[k] - d2[k];
        o1[k] = d1[k] + d2[k];
        o2[k] = d2[k] - d1[k];
        o3[k] = d1[k] - d3[k];
    }
}

/// hwc[oy][ox][o] = (A^T M A) for the image's tiles, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]];
/// an odd output size drops the tiles' last row or column.
#[inline(always)]
fn transform_output(g: &ConvGeometry, m: &[f32], first: usize, width: usize, hwc: &mut [f32]) {
    let (th, tw) = tiles(g);
    let o = g.o;
    let mut s = vec![0f32; 8 * o];
    for ty in 0..th {
        for tx in 0..tw {
            let t = first + ty * tw + tx;
            let e = |xi: usize| &m[(xi * width + t) * o..][..o];
            // A^T down the columns: s[dy * 4 + c].
            for col in 0..4 {
                let (a, b, d, f) = (e(col), e(4 + col), e(8 + col), e(12 + col));
                let (s0, s1) = s.split_at_mut(4 * o);
                let (s0, s1) = (&mut s0[col * o..][..o], &mut s1[col * o..][..o]);
                for k in 0..o {
                    s0[k] = a[k] + b[k] + d[k];
                    s1[k] = b[k] - d[k] - f[k];
                }
            }
            // Then across, into the two output rows.
            for dy in 0..2 {
                let oy = 2 * ty + dy;
                if oy >= g.oh {
                    continue;
                }
                let r = |col: usize| &s[(dy * 4 + col) * o..][..o];
                let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
                let left = &mut hwc[(oy * g.ow + 2 * tx) * o..][..o];
                for k in 0..o {
                    left[k] = r0[k] + r1[k] + r2[k];
                }
                if 2 * tx + 1 < g.ow {
                    let right = &mut hwc[(oy * g.ow + 2 * tx + 1) * o..][..o];
                    for k in 0..o {
                        right[k] = r1[k] - r2[k] - r3[k];
                    }
                }
            }
        }
    }
}
