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
    use candle_core::{DType, Device, Var};

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
            // 19 images. The weight gradient's GEMMs take 1 to 19 of them at a time (as many
            // as make 256 positions), a smaller group last; the 17 px row takes one image per
            // GEMM and sums 3 per batch chunk. The 1 px row pads by 1 on every side, so some
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
            // row. Outputs under 16 positions (the 1 px row, the 3 px row padded by 1, the 5 px
            // 1x1/2 row) take their forward 4 images at a time (3 last); the 3 px row's input
            // gradient too, as a convolution, and its weight gradient, all 19 images in one
            // chunk, is split into row blocks of 512 and 64.
            check_conv(19, (c, o, k), (stride, padding), (size, size));
        }
    }

    /// Planes wider than tall and taller than wide, so that no index may mix rows and columns
    /// up: by Winograd (odd sizes both ways, and the 64-channel row's input gradient as well),
    /// by im2col with stride 2, and grouped (under 16 positions).
    #[test]
    fn fused_conv_matches_candle_on_non_square_planes() {
        for (c, o, k, stride, padding, hw) in [
            (3, 4, 3, 1, 1, (9, 14)),
            (64, 5, 3, 1, 1, (13, 10)),
            (4, 6, 3, 2, 1, (7, 11)),
            (64, 4, 3, 1, 1, (2, 5)),
        ] {
            check_conv(7, (c, o, k), (stride, padding), hw);
        }
    }

    /// The fused convolution's output and both gradients on a batch of `b` random images of
    /// `c` channels and `hw` pixels, against candle's in f64: a weight gradient sums up to
    /// thousands of products, and in f32 candle's own sum strays from the exact one by more
    /// than the tolerance where those products cancel (seen: 1.2e-4 on a value of 0.064, 64
    /// channels at 16 px over 19 images).
    fn check_conv(
        b: usize,
        (c, o, k): (usize, usize, usize),
        (stride, padding): (usize, usize),
        (h, w): (usize, usize),
    ) {
        let dev = Device::Cpu;
        let f64_var = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev).unwrap()).unwrap();
        let weight = Tensor::randn(0f32, 0.5, (o, c, k, k), &dev).unwrap();
        let conv = Conv {
            weight: Var::from_tensor(&weight).unwrap().as_tensor().clone(),
            stride,
            padding,
        };
        let exact = Conv {
            weight: f64_var(&weight).as_tensor().clone(),
            stride,
            padding,
        };
        let x64 = f64_var(&x);
        let what = format!("{c}->{o} k{k} s{stride} p{padding} {h}x{w}");
        let fused = conv.forward(&x).unwrap();
        let composed = exact.forward_composed(&x64).unwrap();
        assert_eq!(fused.dims(), composed.dims(), "{what}");
        let up = Tensor::randn(0f32, 1.0, fused.dims(), &dev).unwrap();
        let close = |a: &Tensor, e: &Tensor, part: &str| {
            let e = e.to_dtype(DType::F32).unwrap();
            assert_close(a, &e, 1e-4, &format!("{what}: {part}"))
        };
        close(&fused, &composed, "y");
        let gf = pull(&fused, &up);
        let gc = pull(&composed, &up.to_dtype(DType::F64).unwrap());
        close(gf.get(&x).unwrap(), gc.get(&x64).unwrap(), "dx");
        close(
            gf.get(&conv.weight).unwrap(),
            gc.get(&exact.weight).unwrap(),
            "dw",
        );
    }

    /// The same output and gradients, bit for bit, on 1 thread and on 3: every split of the
    /// convolution's work is decided by the shape. Covers Winograd (forward and input
    /// gradient), the grouped forward, a weight gradient over 8 batch chunks with more than 512
    /// rows (576) and one split into row blocks, and a sum of partials longer than one step.
    #[test]
    fn fused_conv_does_not_depend_on_the_thread_count() {
        let dev = Device::Cpu;
        for (b, c, o, size) in [(32, 64, 8, 8), (9, 64, 4, 3), (8, 64, 64, 16)] {
            let x = Tensor::randn(0f32, 1.0, (b, c, size, size), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.5, (o, c, 3, 3), &dev).unwrap();
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let x = Var::from_tensor(&x).unwrap();
                    let conv = Conv {
                        weight: w.clone(),
                        stride: 1,
                        padding: 1,
                    };
                    let y = conv.forward(&x).unwrap();
                    let up = y.ones_like().unwrap();
                    let grads = pull(&y, &up);
                    [
                        y,
                        grads.get(&x).unwrap().clone(),
                        grads.get(&w).unwrap().clone(),
                    ]
                    .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                })
            };
            assert_eq!(run(1), run(3), "{b}x{c}->{o} at {size} px");
        }
    }
}
