//! Fine-tuning as the shared epoch loop runs it: augmented, labelled batches, a (weighted)
//! cross-entropy, and after each epoch a validation score that picks the checkpoint kept.

use super::params::{better, Params};
use crate::data::augment::Tta;
use crate::data::loader::{self, Batch, Normalize, TrainAug};
use crate::nn::ops::weighted_cross_entropy;
use crate::nn::tap::Taps;
use crate::rng::Rng;
use crate::stage::StageCtx;
use crate::tasks::fit::scores::score;
use crate::tasks::fit::{batch_tensors, EpochDone, ImageSet, Step};
use crate::tasks::net::Net;
use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct History {
    pub(super) train_loss: Vec<f64>,
    pub(super) val_loss: Vec<f64>,
    pub(super) val_accuracy: Vec<f64>,
    pub(super) val_auc: Vec<Option<f64>>,
    /// Per epoch, the one-vs-rest AUC of each class on validation.
    #[serde(default)]
    pub(super) val_auc_per_class: Vec<Vec<Option<f64>>>,
    pub(super) lr: Vec<f64>,
    pub(super) best_epoch: usize,
    /// The kept epoch's score and tie-breaker; the tie-breaker is -inf when ties keep the
    /// earliest epoch, which JSON cannot hold, so it is written as null.
    #[serde(with = "score_json")]
    pub(super) best_score: Option<(f64, f64)>,
}

/// `(score, tie-breaker)` in JSON with a non-finite tie-breaker as `null`: serde_json writes
/// -inf as `null` and then refuses to read it back, which made every checkpoint of a fine-tune
/// selecting by accuracy unreadable, so no such stage could resume.
mod score_json {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<(f64, f64)>, s: S) -> Result<S::Ok, S::Error> {
        v.map(|(a, b)| (a, b.is_finite().then_some(b))).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<(f64, f64)>, D::Error> {
        let v = Option::<(f64, Option<f64>)>::deserialize(d)?;
        Ok(v.map(|(a, b)| (a, b.unwrap_or(f64::NEG_INFINITY))))
    }
}

/// Training images as the fine-tune sees them: an augmented view and its label.
pub(super) struct Views {
    pub(super) decoded: crate::data::decode::Decoded,
    pub(super) train: Vec<usize>,
    pub(super) labels: Vec<u32>,
    pub(super) norm: Normalize,
    pub(super) aug: TrainAug,
    pub(super) size: usize,
}

/// Fine-tuning as the shared epoch loop runs it: after each epoch, the validation split scores
/// the model, and the best epoch by `select` is kept.
pub(super) struct FineTuning<'a> {
    pub(super) p: &'a Params,
    pub(super) net: &'a Net,
    pub(super) dev: &'a candle_core::Device,
    pub(super) set: &'a ImageSet,
    pub(super) val: &'a [usize],
    pub(super) classes: usize,
    pub(super) views: Arc<Views>,
    pub(super) class_weights: Option<Vec<f32>>,
    pub(super) best_file: std::path::PathBuf,
}

impl Step for FineTuning<'_> {
    type History = History;

    fn batches(&self, epoch: usize) -> crate::data::loader::Batches {
        let v = self.views.clone();
        let n = v.train.len();
        loader::epoch(
            n,
            self.p.batch,
            loader::Order::Shuffled {
                seed: self.p.seed,
                epoch: epoch as u64,
            },
            if n > self.p.batch {
                loader::LastBatch::Drop
            } else {
                loader::LastBatch::Keep
            },
            v.size,
            move |i, rng| {
                vec![(
                    v.norm.apply(loader::view(
                        &v.decoded,
                        v.train[i],
                        v.size,
                        Some(&v.aug),
                        rng,
                    )),
                    v.labels[i],
                )]
            },
        )
    }

    fn loss(&mut self, b: &Batch, _: usize, _: usize, rng: &mut Rng) -> Result<Tensor> {
        let (x, y) = batch_tensors(b, self.dev)?;
        let logits = self.net.logits(&x, Some(rng), &mut Taps::none())?;
        Ok(weighted_cross_entropy(
            &logits,
            &y,
            self.p.label_smoothing,
            self.class_weights.as_deref(),
        )?)
    }

    /// `  val acc 0.537 (kept: epoch 12, 0.552)` once an epoch is scored: the checkpoint kept
    /// so far is the one `select` prefers.
    fn progress_note(h: &History) -> String {
        match h.val_accuracy.last() {
            Some(last) => format!(
                "  val acc {last:.3} (kept: epoch {}, {:.3})",
                h.best_epoch,
                h.val_accuracy
                    .get(h.best_epoch.wrapping_sub(1))
                    .copied()
                    .unwrap_or(*last)
            ),
            None => String::new(),
        }
    }

    fn end_epoch(
        &mut self,
        epoch: usize,
        done: &EpochDone,
        h: &mut History,
        ctx: &StageCtx,
    ) -> Result<()> {
        let scored = score(
            self.net,
            self.set,
            self.val,
            self.p.backbone.img_size,
            self.views.norm,
            self.classes,
            Tta::None,
        )?;
        let (vl, va, vauc) = (scored.loss, scored.accuracy, scored.auc);
        h.train_loss.push(done.mean_loss);
        h.val_loss.push(vl);
        h.val_accuracy.push(va);
        h.val_auc.push(vauc);
        h.val_auc_per_class.push(scored.auc_per_class);
        h.lr.push(done.last_lr);
        let score = self.p.select.score(epoch, va, vauc, vl);
        if h.best_score.is_none_or(|b| better(score, b)) {
            h.best_score = Some(score);
            h.best_epoch = epoch + 1;
            self.net
                .params
                .save_safetensors(&self.best_file, |_| true)?;
        }
        ctx.log(&format!(
            "epoch {} train loss {:.4} val loss {vl:.4} acc {va:.3} auc {}",
            epoch + 1,
            h.train_loss[epoch],
            vauc.map_or("-".into(), |a| format!("{a:.3}"))
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_that_keeps_the_earliest_tie_survives_its_checkpoint() {
        let h = History {
            val_accuracy: vec![0.5],
            best_epoch: 1,
            best_score: Some((0.5, f64::NEG_INFINITY)),
            ..History::default()
        };
        let json = serde_json::to_string(&h).unwrap();
        let back: History = serde_json::from_str(&json).unwrap();
        assert_eq!(back.best_score, Some((0.5, f64::NEG_INFINITY)));
        let none: History =
            serde_json::from_str(&serde_json::to_string(&History::default()).unwrap()).unwrap();
        assert_eq!(none.best_score, None);
    }

    #[test]
    fn the_progress_line_shows_the_last_validation_accuracy_and_the_kept_epoch() {
        let mut h = History::default();
        assert_eq!(FineTuning::progress_note(&h), "");
        h.val_accuracy = vec![0.4, 0.55, 0.5];
        h.best_epoch = 2;
        assert_eq!(
            FineTuning::progress_note(&h),
            "  val acc 0.500 (kept: epoch 2, 0.550)"
        );
    }
}
