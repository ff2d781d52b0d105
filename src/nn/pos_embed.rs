//! Fixed 2-D sin-cos position embeddings, as MAE's `get_2d_sincos_pos_embed`.
//!
//! Row t = i*G + j (i the grid row, j the column). The first D/2 columns encode the column index
//! j and the last D/2 the row index i (MAE's meshgrid order). Each half is
//! [sin(pos*w_k)] ++ [cos(pos*w_k)], w_k = 1/10000^(k/(D/4)). Computed in f64, like numpy.

use candle_core::{Device, Result, Tensor};

pub fn sincos_2d(embed_dim: usize, grid: usize, cls_token: bool) -> Vec<f64> {
    assert!(
        embed_dim.is_multiple_of(4),
        "sin-cos position embedding needs embed_dim divisible by 4"
    );
    let quarter = embed_dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let mut out = Vec::with_capacity((grid * grid + cls_token as usize) * embed_dim);
    if cls_token {
        out.extend(std::iter::repeat_n(0.0, embed_dim));
    }
    for i in 0..grid {
        for j in 0..grid {
            for pos in [j as f64, i as f64] {
                out.extend(omega.iter().map(|w| (pos * w).sin()));
                out.extend(omega.iter().map(|w| (pos * w).cos()));
            }
        }
    }
    out
}

/// As a [1, (cls) + G*G, D] f32 tensor.
pub fn sincos_2d_tensor(
    embed_dim: usize,
    grid: usize,
    cls_token: bool,
    device: &Device,
) -> Result<Tensor> {
    let rows = grid * grid + cls_token as usize;
    let values: Vec<f32> = sincos_2d(embed_dim, grid, cls_token)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    Tensor::from_vec(values, (1, rows, embed_dim), device)
}
