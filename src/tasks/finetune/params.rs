//! The fine-tune's params and the recipe rules that read them: the peak lr, layer decay only
//! from pretrained weights, balanced class weights, steps per epoch, checkpoint selection.

use crate::data::decode::OnBadImage;
use crate::nn::ops::WeightInit;
use crate::tasks::net::{Backbone, NetDesc};
use crate::train::schedule::scaled_lr;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Full,
    LinearProbe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adamw,
    Lars,
}

fn d_optimizer() -> OptimizerKind {
    OptimizerKind::Adamw
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_timm_init(w: &WeightInit) -> bool {
    *w == WeightInit::Timm
}

/// How the training loss weighs the classes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ClassWeights {
    /// Every image counts the same (the reference's choice).
    #[default]
    None,
    /// Each class weighs n / (classes x n_class), sklearn's "balanced": on imbalanced data the
    /// small classes are not traded away for the largest.
    Balanced,
}

impl ClassWeights {
    fn is_none(&self) -> bool {
        *self == ClassWeights::None
    }

    /// Per-class weights for training labels `labels` of `classes` classes (`None`: unweighted).
    pub fn weights(self, labels: &[u32], classes: usize) -> Option<Vec<f32>> {
        match self {
            ClassWeights::None => None,
            ClassWeights::Balanced => {
                let mut counts = vec![0usize; classes];
                for &l in labels {
                    counts[l as usize] += 1;
                }
                let n = labels.len() as f32;
                Some(
                    counts
                        .iter()
                        .map(|&c| {
                            if c == 0 {
                                0.0
                            } else {
                                n / (classes as f32 * c as f32)
                            }
                        })
                        .collect(),
                )
            }
        }
    }
}

/// Which validation number picks the checkpoint that is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Select {
    /// Highest validation accuracy; ties keep the earliest epoch (the reference's rule).
    Accuracy,
    /// Highest mean one-vs-rest AUC; ties keep the lower validation loss.
    Auc,
    /// Lowest validation loss.
    Loss,
    /// The last epoch, whatever validation says (a fixed schedule chosen in advance; on a
    /// validation split of a few dozen images every per-epoch choice is mostly noise).
    Last,
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Params {
    /// The network (`model`, `vit_dims`, `densenet_dims`, `img_size`, `patch`).
    #[serde(flatten)]
    pub backbone: Backbone,
    /// `full` fine-tuning, or `linear_probe` (only the head trains).
    #[serde(default = "d_mode")]
    pub mode: Mode,
    /// `adamw`, or `lars` (MAE's choice for linear probes).
    #[serde(default = "d_optimizer")]
    pub optimizer: OptimizerKind,
    /// Passes over the training images.
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Images per optimiser step.
    #[serde(default = "d_batch")]
    pub batch: usize,
    /// Peak learning rate, used as given. Unset (and no `blr`): 5e-4 for ViTs, 1e-3 for CNNs,
    /// the reference's values for a few hundred images at batch 32 (docs/recipes.md).
    #[serde(default)]
    pub lr: Option<f64>,
    /// Base lr per 256 images (MAE's rule for large batches): lr = blr x batch / 256. Give
    /// either `lr` or `blr`.
    #[serde(default)]
    pub blr: Option<f64>,
    /// The learning rate the cosine schedule ends at.
    #[serde(default = "d_min_lr")]
    pub min_lr: f64,
    /// Epochs of linear warmup from 0 to the peak lr (cut to half the epochs if longer).
    #[serde(default = "d_warmup")]
    pub warmup_epochs: f64,
    /// AdamW weight decay (none on biases, norms, position embeddings and tokens).
    #[serde(default = "crate::tasks::net::defaults::weight_decay")]
    pub weight_decay: f64,
    /// Layer-wise lr decay for ViTs (ignored for CNNs). Unset: 0.75 when starting from
    /// pretrained weights (`init` or `imagenet`), none from scratch.
    #[serde(default)]
    pub layer_decay: Option<f64>,
    /// Stochastic depth rate of the last ViT block (timm's linear rule over the blocks); 0 for CNNs.
    #[serde(default = "d_drop_path")]
    pub drop_path: f64,
    /// RandAugment operations drawn per image (each applied with probability 0.5, as timm).
    #[serde(default = "d_ra_n")]
    pub randaug_n: usize,
    /// RandAugment magnitude (0-10); 0 turns it off.
    #[serde(default)]
    pub randaug_magnitude: f64,
    /// Label smoothing of the cross-entropy (0: none).
    #[serde(default)]
    pub label_smoothing: f64,
    /// RandomResizedCrop area range [low, high] as fractions of the image.
    #[serde(default = "crate::tasks::net::defaults::crop_scale")]
    pub crop_scale: (f64, f64),
    /// Images are decoded once at `decode_scale` x `img_size`; training crops come from that
    /// store, validation and test resize it.
    #[serde(default = "crate::tasks::net::defaults::decode_scale")]
    pub decode_scale: f64,
    /// 0 = uniform crop positions; towards 1 pulls crops to the image centre.
    #[serde(default)]
    pub center_bias: f64,
    /// Flip training images horizontally with probability 0.5.
    #[serde(default = "yes")]
    pub hflip: bool,
    /// Also rotate training images by a random multiple of 90 degrees (radiographs filed on
    /// their side or upside down; the label must not depend on orientation).
    #[serde(default, skip_serializing_if = "is_false")]
    pub quarter_turns: bool,
    /// Clip the gradient's global norm to this value (unset: no clipping).
    #[serde(default)]
    pub clip_grad: Option<f64>,
    /// Share of the train split held out for validation (stratified, grouped by patient/study) when the data names no `val` rows.
    #[serde(default = "d_val")]
    pub val_fraction: f64,
    /// k-fold instead of `val_fraction`: the train split in `folds` grouped, stratified folds,
    /// fold `fold` (default 0) as validation. Left out of the key when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folds: Option<usize>,
    /// The fold used for validation with `folds` (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fold: Option<usize>,
    /// Seeds the validation carve-out and the label subsample; the same for every model `seed`,
    /// so seeds differ only in the model and the batches.
    #[serde(default)]
    pub split_seed: u64,
    /// Train on this share of the training labels, subsampled per class (validation and test
    /// stay whole).
    #[serde(default = "d_fraction")]
    pub label_fraction: f64,
    /// Which validation number chooses the checkpoint kept.
    #[serde(default = "d_select")]
    pub select: Select,
    /// How a ViT's weights start where no checkpoint sets them (the head, or all of a scratch
    /// model): `timm` (normal, std 0.02) or `mae` (xavier-uniform).
    #[serde(default, skip_serializing_if = "is_timm_init")]
    pub weight_init: WeightInit,
    /// `none` or `balanced` (weights inverse to class frequency in the training split).
    #[serde(default, skip_serializing_if = "ClassWeights::is_none")]
    pub class_weights: ClassWeights,
    /// Seeds the model's initial weights, the batches, masks and augmentations: the same seed gives the same run.
    #[serde(default)]
    pub seed: u64,
    /// Use at most this many images, evenly spaced (quick runs).
    #[serde(default)]
    pub max_images: Option<usize>,
    /// `error`: stop at an image that does not decode, naming its row; `skip`: leave it out and count it.
    #[serde(default)]
    pub on_bad_image: OnBadImage,
}

fn d_mode() -> Mode {
    Mode::Full
}
fn d_epochs() -> usize {
    60
}
fn d_batch() -> usize {
    32
}
fn d_min_lr() -> f64 {
    1e-6
}
fn d_warmup() -> f64 {
    5.0
}
fn d_drop_path() -> f64 {
    0.1
}
fn d_ra_n() -> usize {
    2
}
fn yes() -> bool {
    true
}
fn d_val() -> f64 {
    0.15
}
fn d_fraction() -> f64 {
    1.0
}
fn d_select() -> Select {
    Select::Accuracy
}

/// The default layer-wise lr decay for a pretrained ViT (MAE's ViT-L value, the reference's).
pub const PRETRAINED_LAYER_DECAY: f64 = 0.75;

impl Params {
    /// The network this stage trains, with `classes` outputs.
    pub fn net(&self, classes: usize) -> NetDesc {
        self.backbone.desc(
            classes,
            if self.mode == Mode::Full {
                self.drop_path
            } else {
                0.0
            },
            self.weight_init,
        )
    }

    /// The peak learning rate: `lr`, `blr` scaled by the batch, or the family default.
    pub fn peak_lr(&self, is_vit: bool) -> Result<f64> {
        match (self.lr, self.blr) {
            (Some(_), Some(_)) => {
                bail!("give either `lr` (used as given) or `blr` (per 256 images), not both")
            }
            (Some(lr), None) => Ok(lr),
            (None, Some(blr)) => Ok(scaled_lr(blr, self.batch)),
            (None, None) => Ok(if is_vit { 5e-4 } else { 1e-3 }),
        }
    }

    /// Layer-wise lr decay for this run: only ViTs, and by default only from pretrained weights
    /// (a scratch ViT's patch embedding would otherwise train at decay^(depth+1) of the lr).
    pub fn effective_layer_decay(&self, is_vit: bool, pretrained: bool) -> Option<f64> {
        if !is_vit {
            return None;
        }
        match self.layer_decay {
            Some(d) => Some(d),
            None if pretrained => Some(PRETRAINED_LAYER_DECAY),
            None => None,
        }
    }
}

/// Optimiser steps in an epoch of `images` at `batch`: the last short batch is dropped (as the
/// reference does) unless it would be the only one.
pub fn train_steps(images: usize, batch: usize) -> usize {
    if images > batch {
        images / batch
    } else {
        1
    }
}

impl Select {
    /// A score to maximise, and a second one for ties (or `NEG_INFINITY`: ties keep the
    /// earliest epoch).
    pub(super) fn score(
        self,
        epoch: usize,
        accuracy: f64,
        auc: Option<f64>,
        loss: f64,
    ) -> (f64, f64) {
        match self {
            Select::Accuracy => (accuracy, f64::NEG_INFINITY),
            Select::Auc => (auc.unwrap_or(accuracy), -loss),
            Select::Loss => (-loss, f64::NEG_INFINITY),
            Select::Last => (epoch as f64, f64::NEG_INFINITY),
        }
    }
}

/// Strictly better: an equal score keeps the earlier epoch.
pub(super) fn better(score: (f64, f64), best: (f64, f64)) -> bool {
    score.0 > best.0 || (score.0 == best.0 && score.1 > best.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(yaml: serde_json::Value) -> Params {
        serde_json::from_value(yaml).unwrap()
    }

    #[test]
    fn layer_decay_applies_only_to_pretrained_vits_unless_asked() {
        let p = params(json!({}));
        assert_eq!(p.effective_layer_decay(true, false), None, "scratch ViT");
        assert_eq!(
            p.effective_layer_decay(true, true),
            Some(PRETRAINED_LAYER_DECAY)
        );
        assert_eq!(p.effective_layer_decay(false, true), None, "CNNs never");
        let asked = params(json!({ "layer_decay": 0.65 }));
        assert_eq!(asked.effective_layer_decay(true, false), Some(0.65));
    }

    #[test]
    fn the_lr_is_used_as_given_and_blr_scales_with_the_batch() {
        assert_eq!(params(json!({})).peak_lr(true).unwrap(), 5e-4);
        assert_eq!(params(json!({})).peak_lr(false).unwrap(), 1e-3);
        assert_eq!(
            params(json!({ "lr": 2e-4, "batch": 8 }))
                .peak_lr(true)
                .unwrap(),
            2e-4
        );
        assert_eq!(
            params(json!({ "blr": 1e-3, "batch": 64 }))
                .peak_lr(true)
                .unwrap(),
            2.5e-4
        );
        let both = params(json!({ "lr": 1e-3, "blr": 1e-3 })).peak_lr(true);
        assert!(both.unwrap_err().to_string().contains("either `lr`"));
    }

    #[test]
    fn short_last_batches_are_dropped_unless_they_are_the_only_one() {
        assert_eq!(train_steps(381, 32), 11);
        assert_eq!(train_steps(32, 32), 1);
        assert_eq!(train_steps(5, 32), 1);
    }

    #[test]
    fn balanced_weights_are_inverse_to_class_frequency() {
        let w = ClassWeights::Balanced.weights(&[0, 0, 0, 1], 2).unwrap();
        assert_eq!(w, vec![4.0 / 6.0, 2.0]);
        assert_eq!(ClassWeights::None.weights(&[0, 1], 2), None);
        assert_eq!(ClassWeights::Balanced.weights(&[0, 0], 2).unwrap()[1], 0.0);
    }

    #[test]
    fn selection_by_accuracy_keeps_the_earliest_tie() {
        let first = Select::Accuracy.score(1, 0.6, Some(0.7), 1.0);
        let tie = Select::Accuracy.score(2, 0.6, Some(0.9), 0.5);
        assert!(
            !better(tie, first),
            "an equal accuracy keeps the earlier epoch"
        );
        assert!(better(Select::Accuracy.score(3, 0.61, None, 2.0), first));
        let auc = Select::Auc.score(1, 0.5, Some(0.8), 1.0);
        assert!(
            better(Select::Auc.score(2, 0.4, Some(0.8), 0.9), auc),
            "AUC ties go to the lower loss"
        );
    }

    #[test]
    fn selection_of_the_last_epoch_ignores_validation() {
        let good = Select::Last.score(1, 0.9, Some(0.9), 0.1);
        assert!(better(Select::Last.score(2, 0.1, Some(0.5), 3.0), good));
    }
}
