//! Computing maps: Grad-CAM (or Grad-CAM++) at a layer for chosen classes, and the deletion and
//! insertion curves that test whether a map ranks first the pixels the model needs.

use crate::nn::gradcam::{grad_cam, CamMethod};
use crate::nn::tap::Taps;
use crate::tasks::net::Net;
use anyhow::Result;
use candle_core::Tensor;

/// Per image: the predicted class and its probability.
pub(super) type Predicted = Vec<(usize, f64)>;

/// Maps of `x` for `targets`, and per image the predicted class with its probability.
pub(super) fn maps_for(
    net: &Net,
    layer: &str,
    x: &Tensor,
    targets: &[Vec<usize>],
    size: usize,
    method: CamMethod,
) -> Result<(Vec<Vec<f32>>, Predicted)> {
    let mut predicted = Vec::new();
    let cam = grad_cam(
        |taps| {
            let logits = net
                .logits(x, None, taps)
                .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
            let probs: Vec<Vec<f32>> =
                candle_nn::ops::softmax(&logits.detach(), candle_core::D::Minus1)?.to_vec2()?;
            predicted = probs
                .iter()
                .map(|r| {
                    let (c, p) =
                        r.iter()
                            .enumerate()
                            .fold((0, f32::MIN), |b, (c, &p)| if p > b.1 { (c, p) } else { b });
                    (c, p as f64)
                })
                .collect();
            Ok(logits)
        },
        layer,
        targets,
        |t| net.to_grid(t),
        (size, size),
        method,
    )?;
    Ok((cam.grayscale, predicted))
}

/// Deletion and insertion AUC of each image's map (Petsiuk et al., RISE, 2018): the probability
/// of the target class as the pixels the map ranks highest are removed from the image (deletion:
/// a faithful map makes it fall fast, low AUC) or put onto a blank image (insertion: rises fast,
/// high AUC). Removed or blank pixels are the dataset mean, 0 after normalisation. The AUC is the
/// trapezoid rule over `steps` equal fractions of the pixels.
pub(super) fn deletion_insertion(
    net: &Net,
    x: &Tensor,
    maps: &[Vec<f32>],
    targets: &[usize],
    steps: usize,
) -> Result<Vec<[f64; 2]>> {
    let (b, _, h, w) = x.dims4()?;
    let px = h * w;
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let orders: Vec<Vec<usize>> = maps
        .iter()
        .map(|m| {
            let mut idx: Vec<usize> = (0..px).collect();
            idx.sort_by(|&a, &b| m[b].total_cmp(&m[a]).then(a.cmp(&b)));
            idx
        })
        .collect();
    let mut curves = vec![[Vec::new(), Vec::new()]; b];
    for s in 0..=steps {
        let k = px * s / steps;
        let mut deleted = xs.clone();
        let mut inserted = vec![0f32; xs.len()];
        for (i, order) in orders.iter().enumerate() {
            for &p in &order[..k] {
                deleted[i * px + p] = 0.0;
                inserted[i * px + p] = xs[i * px + p];
            }
        }
        for (which, data) in [deleted, inserted].into_iter().enumerate() {
            let t = Tensor::from_vec(data, (b, 1, h, w), x.device())?;
            let logits = net.logits(&t, None, &mut Taps::none())?;
            let prob: Vec<Vec<f32>> =
                candle_nn::ops::softmax(&logits, candle_core::D::Minus1)?.to_vec2()?;
            for i in 0..b {
                curves[i][which].push(prob[i][targets[i]] as f64);
            }
        }
    }
    let auc =
        |c: &[f64]| (c.iter().sum::<f64>() - (c[0] + c[c.len() - 1]) / 2.0) / (c.len() - 1) as f64;
    Ok(curves.iter().map(|[d, i]| [auc(d), auc(i)]).collect())
}
