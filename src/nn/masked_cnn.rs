//! Masked-image pretraining for CNN backbones (SimMIM-style, as medical MAE did for DenseNet-121):
//! masked patches of the input are zeroed, the backbone encodes the whole image, and a one-layer
//! head (1x1 convolution to stride^2 values per feature cell, then pixel shuffle) reconstructs
//! every pixel; the loss is the mean squared error over masked patches only.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

#[derive(Debug, Clone)]
pub struct PixelHead {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
}

impl PixelHead {
    /// `channels` of the feature map, `stride` = image side / feature-map side.
    pub fn new(channels: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let out = stride * stride;
        let bound = (6.0 / (channels + out) as f64).sqrt();
        Ok(PixelHead {
            weight: vb.get_with_hints(
                (out, channels, 1, 1),
                "weight",
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?,
            bias: vb.get_with_hints(out, "bias", Init::Const(0.0))?,
            stride,
        })
    }

    /// [B, C, h, w] -> [B, 1, h*stride, w*stride].
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = features.dims4()?;
        let s = self.stride;
        let y = features
            .conv2d(&self.weight, 0, 1, 1, 1)?
            .broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?;
        y.reshape((b, s, s, h, w))?
            .permute((0, 3, 1, 4, 2))?
            .reshape((b, 1, h * s, w * s))
    }
}

/// Per-pixel mask [B, 1, H, W] (1 = masked) from a per-patch mask [B][L] on a `grid` x `grid`
/// layout of `patch`-pixel patches.
pub fn pixel_mask(
    mask: &[Vec<f32>],
    grid: usize,
    patch: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let side = grid * patch;
    let mut px = Vec::with_capacity(mask.len() * side * side);
    for m in mask {
        for y in 0..side {
            for x in 0..side {
                px.push(m[(y / patch) * grid + x / patch]);
            }
        }
    }
    Tensor::from_vec(px, (mask.len(), 1, side, side), device)
}

/// Mean squared error over masked pixels.
pub fn masked_mse(pred: &Tensor, target: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let err = (pred - target)?.sqr()?.mul(mask)?;
    err.sum_all()? / mask.sum_all()?.clamp(1.0, f64::MAX)?
}
