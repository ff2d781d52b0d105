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
    /// The fused im2col/GEMM kernel for f32 on the CPU, candle's conv2d elsewhere.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if super::ops::fusable(x) && super::ops::fusable(&self.weight) {
            return x.contiguous()?.apply_op2(
                &self.weight,
                super::fused::Conv2d {
                    stride: self.stride,
                    padding: self.padding,
                },
            );
        }
        self.forward_composed(x)
    }

    fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
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

/// BatchNorm; in training, the fused kernel for f32 on the CPU (candle_nn's train mode is a
/// dozen graph nodes with two transposed copies), with candle_nn's running-statistics update.
pub fn bn(norm: &BatchNorm, x: &Tensor, train: bool) -> Result<Tensor> {
    match norm.weight_and_bias() {
        Some((w, b)) if train && super::ops::fusable(x) && x.rank() == 4 => {
            let x = x.contiguous()?;
            let stats = super::fused::channel_stats(&x)?;
            let (mean, var): (Vec<f32>, Vec<f32>) =
                stats.iter().map(|&(m, v)| (m as f32, v as f32)).unzip();
            let c = stats.len();
            let m = norm.momentum();
            let count = (x.elem_count() / c) as f64;
            let running_mean = candle_core::Var::from_tensor(norm.running_mean())?;
            let mean = Tensor::from_vec(mean, c, x.device())?;
            running_mean.set(&((running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?)?;
            let running_var = candle_core::Var::from_tensor(norm.running_var())?;
            let unbiased =
                (Tensor::from_vec(var, c, x.device())? * (count / (count - 1.0).max(1.0)))?;
            running_var.set(&((running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?)?;
            let eps = norm.eps();
            x.apply_op3(w, b, super::fused::BatchNormTrain { eps, stats })
        }
        _ => norm.forward_t(x, train),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::agree::{assert_close, pull};
    use candle_core::{Device, Var};

    /// The fused train-mode BatchNorm against candle_nn's: output, every gradient, and the
    /// running statistics it leaves behind.
    #[test]
    fn fused_batch_norm_matches_candle() {
        let dev = Device::Cpu;
        let make = || {
            let vm = candle_nn::VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, candle_core::DType::F32, &dev);
            let norm = batch_norm(5, vb).unwrap();
            (vm, norm)
        };
        let (vm_f, fused_bn) = make();
        let (vm_c, composed_bn) = make();
        let x = Var::from_tensor(
            &(Tensor::randn(0f32, 2.0, (4, 5, 6, 7), &dev).unwrap() + 0.5).unwrap(),
        )
        .unwrap();
        let up = Tensor::randn(0f32, 1.0, (4, 5, 6, 7), &dev).unwrap();
        let fused = bn(&fused_bn, &x, true).unwrap();
        let composed = composed_bn.forward_t(&x, true).unwrap();
        let close = |a: &Tensor, e: &Tensor, what: &str| assert_close(a, e, 1e-4, what);
        close(&fused, &composed, "y");
        close(
            fused_bn.running_mean(),
            composed_bn.running_mean(),
            "running mean",
        );
        close(
            fused_bn.running_var(),
            composed_bn.running_var(),
            "running var",
        );
        let (gf, gc) = (pull(&fused, &up), pull(&composed, &up));
        close(gf.get(&x).unwrap(), gc.get(&x).unwrap(), "dx");
        for name in ["weight", "bias"] {
            let f = vm_f.data().lock().unwrap()[name].clone();
            let c = vm_c.data().lock().unwrap()[name].clone();
            close(gf.get(&f).unwrap(), gc.get(&c).unwrap(), name);
        }
    }

    /// The fused convolution against candle's: output, weight gradient and input gradient, for
    /// the shapes ResNet and DenseNet use (7x7/2 stem, 3x3 with and without stride, 1x1/2
    /// shortcut, 1x1/1 bottleneck).
    #[test]
    fn fused_conv_matches_candle() {
        let dev = Device::Cpu;
        for (c, o, k, stride, padding, size) in [
            (1, 4, 7, 2, 3, 13),
            (3, 5, 3, 1, 1, 9),
            (4, 6, 3, 2, 1, 8),
            (6, 3, 1, 2, 0, 7),
            (2, 3, 3, 1, 1, 17),
            (2, 3, 3, 1, 2, 3),
            (3, 4, 1, 1, 0, 16),
            (5, 4, 1, 1, 0, 6),
            (2, 128, 3, 1, 1, 5),
            (128, 3, 3, 1, 1, 6),
            (128, 5, 3, 1, 2, 3),
            (130, 4, 1, 2, 0, 5),
            (3, 4, 5, 1, 2, 7),
            (2, 3, 3, 1, 1, 1),
            (3, 4, 3, 1, 1, 15),
            (64, 5, 3, 1, 1, 16),
            (64, 4, 3, 1, 1, 3),
        ] {
            // 19 images: the weight gradient's GEMMs take them 4 to 16 at a time (256 positions
            // over 81 to 16 per image), a smaller group last; the 17 px row takes one image per
            // GEMM and sums 3 per batch chunk. The 3 px row pads by 2 on every side, so some
            // column rows are all padding. The 1x1 rows use the image as its own column
            // matrix, except in the 6 px row's grouped weight gradient. The rows with 64 to 130
            // input channels take the input gradient as a convolution (stride 1, that
            // convolution padded by 1 and by 0) or, with stride 2, by col2im. Stride-1 3x3
            // convolutions padded by 1 with at least 4x4 tiles of 2x2 outputs (the 9, 15, 16
            // and 17 px rows) run by Winograd's F(2x2, 3x3): 6 images per GEMM at 9 px (a
            // single image last), 2 at 15 to 17 px; the 16 px row's input gradient too,
            // through the convolution route; 9, 15 and 17 px have odd sizes, so their last
            // tiles hang over the edge. Stride-1 rows with as many output as input columns
            // (padding (K - 1) / 2) on planes up to 8 wide build their column rows by one
            // shifted copy each, the 1 px row from zeros alone; the 9 and 17 px rows copy row by
            // row. Planes under 16 positions (the 1 and 3 px rows, the 5 px 1x1/2 row) take
            // their forward 5 images at a time (4 last); the 3 px row's input gradient too, as
            // a convolution, and its weight gradient, all 19 images in one chunk, is split into
            // row blocks of 512 and 64.
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (19, c, size, size), &dev).unwrap())
                .unwrap();
            let conv = Conv {
                weight: Var::from_tensor(&Tensor::randn(0f32, 0.5, (o, c, k, k), &dev).unwrap())
                    .unwrap()
                    .as_tensor()
                    .clone(),
                stride,
                padding,
            };
            let fused = conv.forward(&x).unwrap();
            let composed = conv.forward_composed(&x).unwrap();
            assert_eq!(fused.dims(), composed.dims());
            let up = Tensor::randn(0f32, 1.0, fused.dims(), &dev).unwrap();
            let close = |a: &Tensor, e: &Tensor, what: &str| assert_close(a, e, 1e-4, what);
            close(&fused, &composed, "y");
            let (gf, gc) = (pull(&fused, &up), pull(&composed, &up));
            close(gf.get(&x).unwrap(), gc.get(&x).unwrap(), "dx");
            close(
                gf.get(&conv.weight).unwrap(),
                gc.get(&conv.weight).unwrap(),
                "dw",
            );
        }
    }
}
