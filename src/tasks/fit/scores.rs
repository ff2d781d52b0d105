//! A model scored on a set of images (validation after each epoch, the test split once): loss,
//! accuracy, one-vs-rest AUCs, and the probabilities behind them.

use super::{batch_tensors, scalar, ImageSet};
use crate::data::augment::Tta;
use crate::data::loader::{self, Normalize};
use crate::nn::ops::cross_entropy;
use crate::nn::tap::Taps;
use crate::tasks::net::Net;
use crate::train::metrics::{accuracy, roc_auc_per_class};
use anyhow::Result;
use candle_core::D;
use std::sync::Arc;

/// What a scoring pass found.
pub struct Scores {
    /// Mean cross-entropy.
    pub loss: f64,
    pub accuracy: f64,
    /// Mean of the defined one-vs-rest AUCs.
    pub auc: Option<f64>,
    /// One-vs-rest AUC per class (`None` where the images hold one label value only).
    pub auc_per_class: Vec<Option<f64>>,
    /// Per image, the class probabilities.
    pub probs: Vec<Vec<f64>>,
}

/// `net` on the images at `positions` of `set`, each the store resized to `size`; with `tta`,
/// each image's class probabilities are the mean over its views (the loss stays the mean
/// cross-entropy over every view).
pub fn score(
    net: &Net,
    set: &ImageSet,
    positions: &[usize],
    size: usize,
    norm: Normalize,
    classes: usize,
    tta: Tta,
) -> Result<Scores> {
    let dev = net.device().clone();
    let (mut loss_sum, mut probs, mut truth) = (0.0, Vec::new(), Vec::new());
    let d = Arc::new(set.decoded.clone());
    let labels: Vec<u32> = positions
        .iter()
        .map(|&p| set.label(p))
        .collect::<Result<_>>()?;
    let (pos, lab) = (positions.to_vec(), labels.clone());
    let views = tta.count();
    let rx = loader::epoch(
        positions.len(),
        (64 / views).max(1),
        loader::Order::InOrder,
        loader::LastBatch::Keep,
        size,
        move |i, _| {
            let img = loader::resized(&d, pos[i], size);
            tta.views(img)
                .into_iter()
                .map(|v| (norm.apply(v), lab[i]))
                .collect()
        },
    );
    for b in rx {
        let (x, y) = batch_tensors(&b, &dev)?;
        let logits = net.logits(&x, None, &mut Taps::none())?;
        loss_sum += scalar(&cross_entropy(&logits, &y, 0.0)?)? * b.n as f64;
        let p: Vec<Vec<f32>> = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2()?;
        // A batch holds whole items, each as `views` consecutive rows.
        for (rows, ys) in p.chunks(views).zip(b.y.chunks(views)) {
            probs.push(mean_rows(rows));
            truth.push(ys[0] as usize);
        }
    }
    let pred: Vec<usize> = probs.iter().map(|r| argmax(r)).collect();
    let onehot: Vec<Vec<bool>> = truth
        .iter()
        .map(|&t| (0..classes).map(|c| c == t).collect())
        .collect();
    let (auc_per_class, auc) = roc_auc_per_class(&onehot, &probs);
    Ok(Scores {
        loss: loss_sum / (positions.len() * views).max(1) as f64,
        accuracy: accuracy(&truth, &pred),
        auc,
        auc_per_class,
        probs,
    })
}

/// The mean of equally long rows, in f64.
fn mean_rows(rows: &[Vec<f32>]) -> Vec<f64> {
    let mut mean = vec![0.0; rows[0].len()];
    for r in rows {
        for (m, &v) in mean.iter_mut().zip(r) {
            *m += f64::from(v);
        }
    }
    let n = rows.len() as f64;
    mean.iter_mut().for_each(|m| *m /= n);
    mean
}

/// The index of the largest value (the first of ties).
pub fn argmax(r: &[f64]) -> usize {
    r.iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}
