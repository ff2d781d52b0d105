//! Grad-CAM and Grad-CAM++ exactly as pytorch-grad-cam computes them.
//!
//! score = sum over images of the raw logits of each image's target classes (one class, or
//! several for multi-label models); A and G are the
//! activation at the target layer and d score / dA (read through a [`Taps`] probe);
//! cam = relu(sum_k w_k A_k) with w = mean_hw(G) (Grad-CAM) or the ++ weights; then per image
//! min-max scaling, a bilinear resize (align_corners=False, as cv2 INTER_LINEAR), and min-max again.

use super::tap::Taps;
use candle_core::{DType, Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CamMethod {
    GradCam,
    GradCamPlusPlus,
}

/// Every intermediate, so tests can compare each stage with the reference.
#[derive(Debug, Clone)]
pub struct Cam {
    /// [N, C, h, w]
    pub activations: Tensor,
    pub gradients: Tensor,
    /// [N, C]
    pub weights: Vec<Vec<f32>>,
    /// [N][h*w] before scaling.
    pub raw: Vec<Vec<f32>>,
    pub lowres_scaled: Vec<Vec<f32>>,
    pub resized: Vec<Vec<f32>>,
    /// [N][H*W] in [0, 1]: the map to show.
    pub grayscale: Vec<Vec<f32>>,
    pub low_hw: (usize, usize),
    pub out_hw: (usize, usize),
}

/// Runs `forward` with a probe at `layer`, backpropagates the target logits and builds the maps.
/// `to_grid` turns the tapped activation into [N, C, h, w] (identity for CNNs; the token grid
/// for ViTs).
pub fn grad_cam(
    forward: impl FnOnce(&mut Taps) -> Result<Tensor>,
    layer: &str,
    targets: &[Vec<usize>],
    to_grid: impl Fn(&Tensor) -> Result<Tensor>,
    out_hw: (usize, usize),
    method: CamMethod,
) -> Result<Cam> {
    let mut taps = Taps::probe(layer);
    let logits = forward(&mut taps)?;
    let (activation, probe) = taps.probe.take().ok_or_else(|| {
        candle_core::Error::Msg(format!("the model has no layer `{layer}` to explain"))
    })?;
    let (n, classes) = logits.dims2()?;
    let mut select = vec![0f32; n * classes];
    for (i, ts) in targets.iter().enumerate() {
        for &t in ts {
            select[i * classes + t] = 1.0;
        }
    }
    let select = Tensor::from_vec(select, (n, classes), logits.device())?;
    let score = (logits * select)?.sum_all()?;
    let grads = score.backward()?;
    let gradient = grads
        .get(probe.as_tensor())
        .cloned()
        .unwrap_or(probe.as_tensor().zeros_like()?);
    let a = to_grid(&activation.detach())?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let g = to_grid(&gradient)?.to_dtype(DType::F32)?.contiguous()?;
    cam_from(a, g, out_hw, method)
}

pub fn cam_from(a: Tensor, g: Tensor, out_hw: (usize, usize), method: CamMethod) -> Result<Cam> {
    let (n, c, h, w) = a.dims4()?;
    let av: Vec<f32> = a.flatten_all()?.to_vec1()?;
    let gv: Vec<f32> = g.flatten_all()?.to_vec1()?;
    let hw = h * w;
    let mut weights = Vec::with_capacity(n);
    let mut raw = Vec::with_capacity(n);
    for i in 0..n {
        let mut wi = vec![0f32; c];
        for (k, wk) in wi.iter_mut().enumerate() {
            let base = (i * c + k) * hw;
            let gs = &gv[base..base + hw];
            *wk = match method {
                CamMethod::GradCam => gs.iter().sum::<f32>() / hw as f32,
                CamMethod::GradCamPlusPlus => {
                    let sum_a: f32 = av[base..base + hw].iter().sum();
                    gs.iter()
                        .map(|&gij| {
                            let (g2, g3) = (gij * gij, gij * gij * gij);
                            let alpha = if gij != 0.0 {
                                g2 / (2.0 * g2 + sum_a * g3 + 1e-6)
                            } else {
                                0.0
                            };
                            gij.max(0.0) * alpha
                        })
                        .sum()
                }
            };
        }
        let mut cam = vec![0f32; hw];
        for (k, wk) in wi.iter().enumerate() {
            let base = (i * c + k) * hw;
            for (p, v) in cam.iter_mut().enumerate() {
                *v += wk * av[base + p];
            }
        }
        cam.iter_mut().for_each(|v| *v = v.max(0.0));
        weights.push(wi);
        raw.push(cam);
    }
    let lowres_scaled: Vec<Vec<f32>> = raw.iter().map(|c| min_max(c)).collect();
    let resized: Vec<Vec<f32>> = lowres_scaled
        .iter()
        .map(|c| resize_bilinear(c, (h, w), out_hw))
        .collect();
    let grayscale = resized.iter().map(|c| min_max(c)).collect();
    Ok(Cam {
        activations: a,
        gradients: g,
        weights,
        raw,
        lowres_scaled,
        resized,
        grayscale,
        low_hw: (h, w),
        out_hw,
    })
}

/// pytorch-grad-cam's `scale_cam_image`: (c - min) / (1e-7 + max(c - min)).
pub fn min_max(c: &[f32]) -> Vec<f32> {
    let min = c.iter().copied().fold(f32::INFINITY, f32::min);
    let shifted: Vec<f32> = c.iter().map(|v| v - min).collect();
    let max = shifted.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    shifted.iter().map(|v| v / (1e-7 + max)).collect()
}

/// Bilinear resize with align_corners=False (half-pixel centres, clamped at the border).
pub fn resize_bilinear(
    src: &[f32],
    (ih, iw): (usize, usize),
    (oh, ow): (usize, usize),
) -> Vec<f32> {
    let axis = |o: usize, out: usize, inp: usize| -> (usize, usize, f32) {
        let scale = inp as f32 / out as f32;
        let s = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        (i0, i1, s - i0 as f32)
    };
    let mut out = vec![0f32; oh * ow];
    for y in 0..oh {
        let (y0, y1, ly) = axis(y, oh, ih);
        for x in 0..ow {
            let (x0, x1, lx) = axis(x, ow, iw);
            let top = src[y0 * iw + x0] * (1.0 - lx) + src[y0 * iw + x1] * lx;
            let bottom = src[y1 * iw + x0] * (1.0 - lx) + src[y1 * iw + x1] * lx;
            out[y * ow + x] = top * (1.0 - ly) + bottom * ly;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plus_plus_weights_and_multi_label_scores() {
        use candle_core::{Device, Tensor};
        // Two channels; channel 0's gradient is positive, channel 1's negative.
        let a = Tensor::new(
            &[[[[1f32, 2.], [3., 4.]], [[4f32, 3.], [2., 1.]]]],
            &Device::Cpu,
        )
        .unwrap();
        let g = Tensor::new(
            &[[[[0.5f32, 0.5], [0.5, 0.5]], [[-0.5f32, -0.5], [-0.5, -0.5]]]],
            &Device::Cpu,
        )
        .unwrap();
        let cam = cam_from(a, g, (2, 2), CamMethod::GradCamPlusPlus).unwrap();
        assert!(
            cam.weights[0][0] > 0.0 && cam.weights[0][1] == 0.0,
            "{:?}",
            cam.weights
        );
        // A linear model: logits = [sum(x), 2*sum(x)]; both classes as targets sum their gradients.
        let x = Tensor::ones((1, 1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let cam = grad_cam(
            |taps| {
                let t = taps.point("x", x.clone())?;
                let s = t.sum_keepdim(3)?.sum_keepdim(2)?.reshape((1, 1))?;
                Tensor::cat(&[&s, &(&s * 2.0)?], 1)
            },
            "x",
            &[vec![0, 1]],
            |t| Ok(t.clone()),
            (2, 2),
            CamMethod::GradCam,
        )
        .unwrap();
        assert_eq!(cam.weights[0], vec![3.0]);
    }

    #[test]
    fn resize_identity_and_constant() {
        let src: Vec<f32> = (0..16).map(|v| v as f32).collect();
        assert_eq!(resize_bilinear(&src, (4, 4), (4, 4)), src);
        let ones = vec![1.0; 4];
        assert!(resize_bilinear(&ones, (2, 2), (7, 5))
            .iter()
            .all(|v| (v - 1.0).abs() < 1e-6));
    }
}
