//! Differentiable building blocks that candle 0.11 lacks or gets wrong: its fused
//! LayerNorm and `softmax_last_dim` have no backward, its max-pool backward is wrong for
//! kernel == stride and missing for 3x3/2. LayerNorm, softmax and GELU run as the fused kernels
//! of [`super::fused`] on f32 CPU tensors and as compositions of differentiable candle ops
//! elsewhere; the tests check both against finite differences and against each other.

use crate::rng::Rng;
use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// LayerNorm over the last dimension, with gradients for input, weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fusable(x) && fusable(&self.weight) && fusable(&self.bias) {
            return x.contiguous()?.apply_op3(
                &self.weight,
                &self.bias,
                super::fused::LayerNormLast {
                    eps: self.eps as f32,
                },
            );
        }
        self.forward_composed(x)
    }

    fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// How a transformer's weights start. The two references differ, and the difference matters on
/// small data: the official MAE draws every linear layer xavier-uniform (RMS 0.14 for a 192-wide
/// head), timm's classifier ViT draws them normal with std 0.02, its cls token with 1e-6, and
/// leaves the patch embedding at PyTorch's convolution default.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum WeightInit {
    /// The official MAE (`initialize_weights`): xavier-uniform linears and patch embedding.
    Mae,
    /// timm's `VisionTransformer` default (`init_weights_vit_timm`).
    #[default]
    Timm,
}

/// A linear layer initialised as `init` says (zero bias either way).
pub fn linear_init(
    in_dim: usize,
    out_dim: usize,
    init: WeightInit,
    vb: VarBuilder,
) -> Result<Linear> {
    let hint = match init {
        WeightInit::Mae => {
            let bound = (6.0 / (in_dim + out_dim) as f64).sqrt();
            Init::Uniform {
                lo: -bound,
                up: bound,
            }
        }
        // timm's trunc_normal_(std=.02) cuts at +-2 (absolute), 100 standard deviations out:
        // a plain normal draw.
        WeightInit::Timm => Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        },
    };
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", hint)?;
    let bias = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
    Ok(Linear { weight, bias })
}

/// A linear layer with the official MAE's initialisation (xavier-uniform weight, zero bias).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_init(in_dim, out_dim, WeightInit::Mae, vb)
}

/// y = x w^T + b over the last dimension: the fused kernel for f32 on the CPU, candle_nn's
/// composition elsewhere.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fusable(x) && fusable(&self.weight) && fusable(&self.bias) {
            return x
                .contiguous()?
                .apply_op3(&self.weight, &self.bias, super::fused::LinearLast);
        }
        self.forward_composed(x)
    }

    /// GELU(self(x)), fused into one kernel where the linear layer is.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        if fusable(x) && fusable(&self.weight) && fusable(&self.bias) {
            let keep = x.track_op() || self.weight.track_op() || self.bias.track_op();
            return x.contiguous()?.apply_op3(
                &self.weight,
                &self.bias,
                super::fused::LinearGelu::new(keep),
            );
        }
        gelu(&self.forward_composed(x)?)
    }

    fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        use candle_core::Module;
        candle_nn::Linear::new(self.weight.clone(), Some(self.bias.clone())).forward(x)
    }
}

/// f32 on the CPU: where the fused kernels apply.
pub fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Softmax over the last dimension, with a backward.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        return x.contiguous()?.apply_op1(super::fused::SoftmaxLast);
    }
    candle_nn::ops::softmax(x, D::Minus1)
}

/// GELU, exact (erf) form, with a backward.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        return x.contiguous()?.apply_op1(super::fused::GeluErf);
    }
    x.gelu_erf()
}

/// ReLU. The fused kernel follows torch's backward (no gradient where the output is 0); candle's
/// composed one, used elsewhere, passes the gradient at exactly 0.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        return x.contiguous()?.apply_op1(super::fused::Relu);
    }
    x.relu()
}

/// Max-pool 3x3, stride 2, padding 1 (the ResNet/DenseNet stem), as torch computes it, gradients
/// included: out[i] = max(x[2i-1], x[2i], x[2i+1]) along each spatial axis. Elsewhere than f32 on
/// the CPU it is built from strided views of the padded input and `maximum`, whose backward
/// shares a tied gradient where torch gives it to the first maximum.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        return x.contiguous()?.apply_op1(super::fused::MaxPool3x3S2);
    }
    max_pool_3x3_s2_composed(x)
}

fn max_pool_3x3_s2_composed(x: &Tensor) -> Result<Tensor> {
    let pooled_h = pool_axis_3_2(x, 2)?;
    pool_axis_3_2(&pooled_h, 3)
}

fn pool_axis_3_2(x: &Tensor, axis: usize) -> Result<Tensor> {
    let n = x.dim(axis)?;
    let out = (n + 2 - 3) / 2 + 1;
    // Pad with -inf: one in front, enough behind for 2*out+2 elements (even, for the reshape).
    let total = 2 * out + 2;
    let neg = |len: usize| -> Result<Tensor> {
        let mut shape = x.dims().to_vec();
        shape[axis] = len;
        Tensor::full(f32::NEG_INFINITY, shape, x.device())?.to_dtype(x.dtype())
    };
    let padded = Tensor::cat(&[&neg(1)?, x, &neg(total - 1 - n)?], axis)?;
    let mut pair_shape = padded.dims().to_vec();
    pair_shape[axis] = total / 2;
    pair_shape.insert(axis + 1, 2);
    let pairs = padded.reshape(pair_shape)?;
    let even = pairs.narrow(axis + 1, 0, 1)?.squeeze(axis + 1)?;
    let odd = pairs.narrow(axis + 1, 1, 1)?.squeeze(axis + 1)?;
    let a = even.narrow(axis, 0, out)?;
    let b = odd.narrow(axis, 0, out)?;
    let c = even.narrow(axis, 1, out)?;
    a.maximum(&b)?.maximum(&c)
}

/// Average-pool 2x2, stride 2, floor mode (DenseNet transitions): odd sizes drop the last row/column.
pub fn avg_pool_2x2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / 2, w / 2);
    let x = x.narrow(2, 0, oh * 2)?.narrow(3, 0, ow * 2)?;
    x.reshape((b, c, oh, 2, ow, 2))?.sum(5)?.sum(3)? * 0.25
}

/// Global average pool over H and W: [B, C, H, W] -> [B, C].
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean(3)?.mean(2)
}

/// Stochastic depth: drops the residual branch per sample with probability `rate`, scaling the
/// kept ones by 1/(1-rate) (timm's `drop_path`). Identity when not training.
pub fn drop_path(x: &Tensor, rate: f64, rng: Option<&mut Rng>) -> Result<Tensor> {
    let Some(rng) = rng.filter(|_| rate > 0.0) else {
        return Ok(x.clone());
    };
    let keep = 1.0 - rate;
    let b = x.dim(0)?;
    let mut shape = vec![1usize; x.rank()];
    shape[0] = b;
    let mask: Vec<f32> = (0..b)
        .map(|_| {
            if rng.f64() >= rate {
                (1.0 / keep) as f32
            } else {
                0.0
            }
        })
        .collect();
    x.broadcast_mul(&Tensor::from_vec(mask, shape, x.device())?.to_dtype(x.dtype())?)
}

/// Cross-entropy with label smoothing against integer targets, averaged over the batch.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, smoothing: f64) -> Result<Tensor> {
    weighted_cross_entropy(logits, targets, smoothing, None)
}

/// Cross-entropy with label smoothing and optional per-class weights: each sample counts with
/// its target class's weight, and the batch mean divides by the sum of those weights, as
/// `torch.nn.functional.cross_entropy(weight=...)` does.
pub fn weighted_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    smoothing: f64,
    class_weights: Option<&[f32]>,
) -> Result<Tensor> {
    let classes = logits.dim(D::Minus1)?;
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let targets = targets.to_dtype(DType::U32)?;
    let one_hot = candle_nn::encoding::one_hot(targets.clone(), classes, 1f32, 0f32)?
        .to_dtype(logits.dtype())?;
    let smooth = ((one_hot * (1.0 - smoothing))? + smoothing / classes as f64)?;
    let per_sample = (smooth * log_p)?.sum(D::Minus1)?.neg()?;
    let Some(weights) = class_weights else {
        return per_sample.mean_all();
    };
    let w: Vec<f32> = targets
        .to_vec1::<u32>()?
        .into_iter()
        .map(|t| weights.get(t as usize).copied().unwrap_or(1.0))
        .collect();
    let total: f32 = w.iter().sum();
    let w = Tensor::from_vec(w, per_sample.dims(), logits.device())?.to_dtype(logits.dtype())?;
    (per_sample * w)?.sum_all()? / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::agree::{assert_close, pull};
    use candle_core::{Device, Var};

    #[test]
    fn class_weights_average_as_torch_does() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[2f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &dev).unwrap();
        let y = Tensor::new(&[0u32, 1, 1], &dev).unwrap();
        let scalar = |t: Tensor| t.to_scalar::<f32>().unwrap();
        let plain = scalar(cross_entropy(&logits, &y, 0.0).unwrap());
        let ones = scalar(weighted_cross_entropy(&logits, &y, 0.0, Some(&[1.0, 1.0])).unwrap());
        assert!((plain - ones).abs() < 1e-6);
        // torch: F.cross_entropy(logits, y, weight=torch.tensor([3., 1.])) = 0.2774
        let w = scalar(weighted_cross_entropy(&logits, &y, 0.0, Some(&[3.0, 1.0])).unwrap());
        assert!((w - 0.2774).abs() < 1e-4, "{w}");
    }

    #[test]
    fn vectorisable_exp_matches_exp_to_f32_precision() {
        let mut worst = 0f64;
        for i in 0..=1_750_000 {
            let x = -87.0 + i as f32 * 1e-4;
            let want = (x as f64).exp();
            let rel = ((crate::nn::fused::exp_f32(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 1.5e-7, "worst relative error {worst:e}");
        assert_eq!(crate::nn::fused::exp_f32(0.0), 1.0);
        assert!(
            crate::nn::fused::exp_f32(-1e4) < 1e-37,
            "clamped, not wrapped"
        );
        assert!(crate::nn::fused::exp_f32(f32::NAN).is_nan());
    }

    /// `fused::simd` may run a kernel compiled for AVX2; the cache relies on that changing no bit.
    #[test]
    fn simd_kernels_are_bit_identical_to_the_baseline() {
        use crate::nn::fused::{erf, exp_f32, simd};
        let xs: Vec<f32> = (0..10_000).map(|i| (i as f32 - 5_000.0) * 0.0173).collect();
        #[inline(always)]
        fn kernel(x: &[f32]) -> Vec<u32> {
            x.iter()
                .map(|&v| (exp_f32(v) * 0.5 + erf(v) * v).to_bits())
                .collect()
        }
        let baseline = kernel(&xs);
        let dispatched = simd(
            #[inline(always)]
            || kernel(&xs),
        );
        assert_eq!(baseline, dispatched);
    }

    fn numeric_grad(f: &dyn Fn(&Tensor) -> Result<Tensor>, x: &[f32], shape: &[usize]) -> Vec<f32> {
        let h = 1e-3f32;
        (0..x.len())
            .map(|i| {
                let mut p = x.to_vec();
                p[i] += h;
                let mut m = x.to_vec();
                m[i] -= h;
                let fp = f(&Tensor::from_vec(p, shape, &Device::Cpu).unwrap())
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let fm = f(&Tensor::from_vec(m, shape, &Device::Cpu).unwrap())
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                (fp - fm) / (2.0 * h)
            })
            .collect()
    }

    /// Finite differences against autograd for a scalar function of one tensor.
    pub fn check_grad(f: &dyn Fn(&Tensor) -> Result<Tensor>, shape: &[usize], seed: u64) {
        let n: usize = shape.iter().product();
        let mut state = seed;
        let x: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect();
        let var = Var::from_vec(x.clone(), shape, &Device::Cpu).unwrap();
        let y = f(var.as_tensor()).unwrap();
        let grads = y.backward().unwrap();
        let g: Vec<f32> = grads
            .get(var.as_tensor())
            .expect("gradient reaches the input")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let num = numeric_grad(f, &x, shape);
        for (i, (a, e)) in g.iter().zip(&num).enumerate() {
            assert!(
                (a - e).abs() <= 2e-2 * (1.0 + e.abs()),
                "grad[{i}]: autograd {a} vs numeric {e}"
            );
        }
    }

    fn weights(n: usize) -> Tensor {
        Tensor::arange(0f32, n as f32, &Device::Cpu)
            .unwrap()
            .affine(0.37, -1.1)
            .unwrap()
            .sin()
            .unwrap()
    }

    #[test]
    fn layer_norm_gradient() {
        let ln = LayerNorm {
            weight: weights(6).affine(0.5, 1.0).unwrap(),
            bias: weights(6),
            eps: 1e-6,
        };
        check_grad(
            &|x| (ln.forward(x)? * weights(18).reshape((3, 6))?)?.sum_all(),
            &[3, 6],
            1,
        );
    }

    /// The vendored candle stores a node's first gradient without adding it to zeros
    /// (vendor/README.md): a node that feeds several ops, or the same op twice, must still get
    /// the sum of their gradients.
    #[test]
    fn gradients_of_shared_nodes_add_up() {
        check_grad(
            &|x| {
                let w = weights(12).reshape((3, 4))?;
                let twice = (x + x)?;
                ((&twice * &w)? + x.sqr()? + relu(x)?.t()?.contiguous()?.t()?)?.sum_all()
            },
            &[3, 4],
            6,
        );
    }

    #[test]
    fn max_pool_matches_definition_and_gradient() {
        let x = Tensor::arange(0f32, 25., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 5, 5))
            .unwrap();
        let y = max_pool_3x3_s2(&x).unwrap();
        assert_eq!(y.dims(), &[1, 1, 3, 3]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![6., 8., 9., 16., 18., 19., 21., 23., 24.]
        );
        check_grad(
            &|x| (max_pool_3x3_s2(x)? * weights(9).reshape((1, 1, 3, 3))?)?.sum_all(),
            &[1, 1, 6, 6],
            2,
        );
    }

    #[test]
    fn avg_pool_floor_and_gradient() {
        let x = Tensor::ones((1, 2, 5, 5), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(avg_pool_2x2(&x).unwrap().dims(), &[1, 2, 2, 2]);
        check_grad(
            &|x| (avg_pool_2x2(x)? * weights(4).reshape((1, 1, 2, 2))?)?.sum_all(),
            &[1, 1, 5, 4],
            3,
        );
    }

    #[test]
    fn softmax_and_gelu_gradients() {
        check_grad(
            &|x| (softmax_last(x)? * weights(12).reshape((3, 4))?)?.sum_all(),
            &[3, 4],
            4,
        );
        check_grad(
            &|x| (gelu(x)? * weights(12).reshape((3, 4))?)?.sum_all(),
            &[3, 4],
            5,
        );
    }

    /// The fused kernels against the composed ops they replace: values and every gradient, on
    /// shapes that span several parallel chunks and a non-contiguous input.
    #[test]
    fn fused_kernels_match_the_composed_ops() {
        let dev = Device::Cpu;
        let close = |a: &Tensor, b: &Tensor, what: &str| assert_close(a, b, 2e-5, what);
        let (rows, d) = (300, 197);
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (rows, d), &dev).unwrap())).unwrap();
        let up = Tensor::randn(0f32, 1.0, (rows, d), &dev).unwrap();
        // softmax over a transposed (non-contiguous) view
        let xt = x.as_tensor().t().unwrap();
        let upt = up.t().unwrap();
        let fused = softmax_last(&xt).unwrap();
        let composed = candle_nn::ops::softmax(&xt, D::Minus1).unwrap();
        close(&fused, &composed, "softmax");
        let (gf, gc) = (pull(&fused, &upt), pull(&composed, &upt));
        close(gf.get(&x).unwrap(), gc.get(&x).unwrap(), "softmax grad");

        let fused = gelu(&x).unwrap();
        let composed = x.gelu_erf().unwrap();
        close(&fused, &composed, "gelu");
        let (gf, gc) = (pull(&fused, &up), pull(&composed, &up));
        close(gf.get(&x).unwrap(), gc.get(&x).unwrap(), "gelu grad");

        let w = Var::from_tensor(&weights(d).affine(0.5, 1.0).unwrap()).unwrap();
        let b = Var::from_tensor(&weights(d)).unwrap();
        let ln = LayerNorm {
            weight: w.as_tensor().clone(),
            bias: b.as_tensor().clone(),
            eps: 1e-6,
        };
        let fused = ln.forward(&x).unwrap();
        let composed = ln.forward_composed(&x).unwrap();
        close(&fused, &composed, "layer norm");
        let (gf, gc) = (pull(&fused, &up), pull(&composed, &up));
        for (v, what) in [(&x, "dx"), (&w, "dweight"), (&b, "dbias")] {
            close(gf.get(v).unwrap(), gc.get(v).unwrap(), what);
        }
    }

    /// ReLU and the stem's max pool against candle's composed ops on several planes of odd and
    /// even sizes (random values: no ties), and torch's rule for ties: all of a window's
    /// gradient goes to its first maximum.
    #[test]
    fn fused_relu_and_max_pool_match_the_composed_ops() {
        let dev = Device::Cpu;
        let close = |a: &Tensor, b: &Tensor, what: &str| assert_close(a, b, 1e-6, what);
        for (h, w) in [(9, 8), (16, 16), (7, 11)] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5, h, w), &dev).unwrap()).unwrap();
            let fused = relu(&x).unwrap();
            let composed = x.relu().unwrap();
            close(&fused, &composed, "relu");
            let up = Tensor::randn(0f32, 1.0, fused.shape(), &dev).unwrap();
            let (gf, gc) = (pull(&fused, &up), pull(&composed, &up));
            close(gf.get(&x).unwrap(), gc.get(&x).unwrap(), "relu grad");

            let fused = max_pool_3x3_s2(&x).unwrap();
            let composed = max_pool_3x3_s2_composed(&x).unwrap();
            close(&fused, &composed, "max pool");
            let up = Tensor::randn(0f32, 1.0, fused.shape(), &dev).unwrap();
            let (gf, gc) = (pull(&fused, &up), pull(&composed, &up));
            close(gf.get(&x).unwrap(), gc.get(&x).unwrap(), "max pool grad");
        }
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The gradient of the pooled values' sum: 1 for each window on the cell it picked.
        let picks = |x: &Var| {
            let grads = max_pool_3x3_s2(x)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            values(grads.get(x).unwrap())
        };
        let flat =
            Var::from_tensor(&Tensor::zeros((1, 1, 4, 4), DType::F32, &dev).unwrap()).unwrap();
        // Output windows start at rows/cols -1 and 1, so their first cells are (0|1, 0|1).
        let mut expected = vec![0f32; 16];
        for k in [0, 1, 4, 5] {
            expected[k] = 1.0;
        }
        assert_eq!(picks(&flat), expected);

        // A NaN wins its windows, forward and backward, as in torch; -inf stays -inf.
        let mut cells = vec![f32::NEG_INFINITY; 9];
        cells[4] = f32::NAN;
        cells[8] = 2.0;
        let odd = Var::from_tensor(&Tensor::from_vec(cells, (1, 1, 3, 3), &dev).unwrap()).unwrap();
        let ys = values(&max_pool_3x3_s2(&odd).unwrap());
        assert!(ys.iter().all(|v| v.is_nan()), "{ys:?}");
        let g = picks(&odd);
        assert_eq!(g[4], 4.0, "{g:?}");
        let low = Tensor::full(f32::NEG_INFINITY, (1, 1, 3, 3), &dev).unwrap();
        let y = values(&max_pool_3x3_s2(&low).unwrap());
        assert!(y.iter().all(|v| *v == f32::NEG_INFINITY), "{y:?}");
    }

    /// Input, weight and bias as variables, an upstream gradient, and the layer over them.
    fn linear_case() -> (Var, Var, Var, Tensor, Linear) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 70, 24), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (40, 24), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 40, &dev).unwrap()).unwrap();
        let up = Tensor::randn(0f32, 1.0, (3, 70, 40), &dev).unwrap();
        let lin = Linear {
            weight: w.as_tensor().clone(),
            bias: b.as_tensor().clone(),
        };
        (x, w, b, up, lin)
    }

    #[test]
    fn fused_linear_matches_the_composed_op() {
        let (x, w, b, up, lin) = linear_case();
        let close = |a: &Tensor, e: &Tensor, what: &str| assert_close(a, e, 1e-4, what);
        let fused = lin.forward(&x).unwrap();
        let composed = lin.forward_composed(&x).unwrap();
        assert_eq!(fused.dims(), &[3, 70, 40]);
        close(&fused, &composed, "y");
        let (gf, gc) = (pull(&fused, &up), pull(&composed, &up));
        for (v, what) in [(&x, "dx"), (&w, "dweight"), (&b, "dbias")] {
            close(gf.get(v).unwrap(), gc.get(v).unwrap(), what);
        }
        // An input that needs no gradient (the patch embedding's image) gets none, and the
        // parameters' gradients are the same.
        let image = x.as_tensor().detach();
        let g_image = pull(&lin.forward(&image).unwrap(), &up);
        assert!(
            g_image.get(&image).is_none(),
            "no gradient for a constant input"
        );
        for (v, what) in [(&w, "dweight"), (&b, "dbias")] {
            assert_close(g_image.get(v).unwrap(), gf.get(v).unwrap(), 0.0, what);
        }
    }

    /// Linear + GELU in one kernel against the two candle ops it replaces (x w^T + b, then
    /// `gelu_erf`): output and the gradients of x, weight and bias; and without the kept
    /// pre-activation the backward recomputes it to the same gradients.
    #[test]
    fn fused_linear_gelu_matches_the_composed_ops() {
        let (x, w, b, up, lin) = linear_case();
        let close = |a: &Tensor, e: &Tensor, what: &str| assert_close(a, e, 1e-4, what);
        let fused = lin.forward_gelu(&x).unwrap();
        let composed = lin.forward_composed(&x).unwrap().gelu_erf().unwrap();
        close(&fused, &composed, "y");
        let (gf, gc) = (pull(&fused, &up), pull(&composed, &up));
        let recomputed = x
            .apply_op3(
                w.as_tensor(),
                b.as_tensor(),
                super::super::fused::LinearGelu::new(false),
            )
            .unwrap();
        let gr = pull(&recomputed, &up);
        for (v, what) in [(&x, "dx"), (&w, "dweight"), (&b, "dbias")] {
            close(gf.get(v).unwrap(), gc.get(v).unwrap(), what);
            assert_close(gr.get(v).unwrap(), gf.get(v).unwrap(), 0.0, what);
        }
    }

    #[test]
    fn erf_is_accurate() {
        // Reference values of erf (f64).
        for (x, want) in [
            (0.0f32, 0.0f64),
            (0.1, 0.112_462_916_018_284_9),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (-1.5, -0.966_105_146_475_310_7),
            (2.5, 0.999_593_047_982_555),
            (4.0, 0.999_999_984_582_742),
        ] {
            let got = super::super::fused::erf(x) as f64;
            assert!((got - want).abs() < 3e-7, "erf({x}) = {got}, want {want}");
        }
    }

    #[test]
    fn cross_entropy_gradient() {
        let t = Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap();
        check_grad(&|x| cross_entropy(x, &t, 0.1), &[3, 4], 6);
    }
}
