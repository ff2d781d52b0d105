//! Shared CNN pieces with torchvision's conventions: bias-free convs, BatchNorm with eps 1e-5 and
//! momentum 0.1 (train mode uses batch statistics and updates the running ones).

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, BatchNormConfig, Init, VarBuilder};

#[derive(Debug, Clone)]
pub struct Conv {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    /// Kaiming-normal (fan_out, relu) initialisation, as torchvision's ResNet and DenseNet.
    pub fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let std = (2.0 / (cout * k * k) as f64).sqrt();
        Ok(Conv {
            weight: vb.get_with_hints(
                (cout, cin, k, k),
                "weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            )?,
            stride,
            padding,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv2d(&self.weight, self.padding, self.stride, 1, 1)
    }
}

pub fn batch_norm(c: usize, vb: VarBuilder) -> Result<BatchNorm> {
    candle_nn::batch_norm(
        c,
        BatchNormConfig {
            eps: 1e-5,
            remove_mean: true,
            affine: true,
            momentum: 0.1,
        },
        vb,
    )
}

pub fn bn(norm: &BatchNorm, x: &Tensor, train: bool) -> Result<Tensor> {
    norm.forward_t(x, train)
}

/// torch's default Linear initialisation (uniform +-1/sqrt(fan_in)) for classifier heads.
pub fn classifier(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<candle_nn::Linear> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let w = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let b = vb.get_with_hints(
        out_dim,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Ok(candle_nn::Linear::new(w, Some(b)))
}

pub fn apply(linear: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    linear.forward(x)
}
