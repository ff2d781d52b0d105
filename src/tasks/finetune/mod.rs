//! `kind: finetune`: supervised training of a CNN or ViT on a labelled X-ray set with the study's
//! recipe (layer-wise lr decay 0.55 for ViTs, DropPath 0.2, RandAugment magnitude 6, label
//! smoothing, AdamW, warmup + cosine), or a linear probe. Starts from scratch, from an upstream
//! encoder (`init`), or from an ImageNet checkpoint file (`imagenet`). The checkpoint kept is the
//! best on a validation split carved from train (grouped, stratified, seeded): never the test split.

use super::fit::scores::score;
use super::fit::{
    batch_tensors, run_epochs, schedule, store_size, EpochDone, ImageSet, OptimSpec, Schedule,
    SetSpec, Step, TrainingPlan,
};
use super::net::{Backbone, ModelCard, Net, NetDesc, Preprocess};
use crate::data::decode::OnBadImage;
use crate::data::loader::{self, Batch, Normalize, TrainAug};
use crate::data::source::Split;
use crate::nn::ops::{weighted_cross_entropy, WeightInit};
use crate::nn::tap::Taps;
use crate::rng::Rng;
use crate::stage::{InputSlot, Inputs, OutputSlot, StageCtx, Task};
use crate::train::schedule::scaled_lr;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;

pub struct Finetune;

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
    #[serde(default = "super::net::defaults::weight_decay")]
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
    #[serde(default = "super::net::defaults::crop_scale")]
    pub crop_scale: (f64, f64),
    /// Images are decoded once at `decode_scale` x `img_size`; training crops come from that
    /// store, validation and test resize it.
    #[serde(default = "super::net::defaults::decode_scale")]
    pub decode_scale: f64,
    /// 0 = uniform crop positions; towards 1 pulls crops to the image centre.
    #[serde(default)]
    pub center_bias: f64,
    /// Flip training images horizontally with probability 0.5.
    #[serde(default = "yes")]
    pub hflip: bool,
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

#[derive(Debug, Default, Serialize, Deserialize)]
struct History {
    train_loss: Vec<f64>,
    val_loss: Vec<f64>,
    val_accuracy: Vec<f64>,
    val_auc: Vec<Option<f64>>,
    /// Per epoch, the one-vs-rest AUC of each class on validation.
    #[serde(default)]
    val_auc_per_class: Vec<Vec<Option<f64>>>,
    lr: Vec<f64>,
    best_epoch: usize,
    best_score: Option<(f64, f64)>,
}

impl Task for Finetune {
    const KIND: &'static str = "finetune";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str = "fine-tunes (or linearly probes) a CNN or ViT on labelled radiographs, keeping the best checkpoint on validation";
    const TRAINS: bool = true;
    type Params = Params;

    fn inputs(_: &Params) -> Option<Vec<InputSlot>> {
        Some(vec![
            InputSlot { name: "data", required: true, many: false, doc: "a labelled data folder (labels.csv with path,label[,split][,patient|study])" },
            InputSlot { name: "init", required: false, many: false, doc: "an upstream encoder (e.g. `chest_mae.encoder`)" },
            InputSlot { name: "imagenet", required: false, many: false, doc: "ImageNet weights saved as safetensors from timm / torchvision (`file:weights/resnet18.safetensors`)" },
        ])
    }

    fn lint(p: &Params) -> Vec<String> {
        super::checks::warmup_lint(p.warmup_epochs, p.epochs)
    }

    fn check(p: &Params) -> super::checks::Checked {
        use super::checks::{crop_scale, positive, positive_f, schedule, within};
        p.net(2).check()?;
        schedule(p.epochs, p.batch, p.warmup_epochs, p.weight_decay)?;
        if let Some(lr) = p.lr {
            positive_f("lr", lr)?;
        }
        if let Some(blr) = p.blr {
            positive_f("blr", blr)?;
        }
        if p.lr.is_some() && p.blr.is_some() {
            return Err(
                "give either `lr` (used as given) or `blr` (per 256 images), not both".into(),
            );
        }
        within("min_lr", p.min_lr, 0.0, f64::MAX, false)?;
        if let Some(d) = p.layer_decay {
            within("layer_decay", d, f64::MIN_POSITIVE, 1.0, false)?;
        }
        within("label_smoothing", p.label_smoothing, 0.0, 1.0, true)?;
        within("randaug_magnitude", p.randaug_magnitude, 0.0, 10.0, false)?;
        within("center_bias", p.center_bias, 0.0, 1.0, true)?;
        within("decode_scale", p.decode_scale, 1.0, 8.0, false)?;
        within("val_fraction", p.val_fraction, 0.0, 1.0, true)?;
        within(
            "label_fraction",
            p.label_fraction,
            f64::MIN_POSITIVE,
            1.0,
            false,
        )?;
        crop_scale(p.crop_scale)?;
        if let Some(c) = p.clip_grad {
            positive_f("clip_grad", c)?;
        }
        if let Some(k) = p.folds {
            if k < 2 || p.fold.unwrap_or(0) >= k {
                return Err(format!(
                    "k-fold needs `folds` >= 2 and 0 <= `fold` < `folds` (got folds {k}, fold {})",
                    p.fold.unwrap_or(0)
                ));
            }
        }
        if p.randaug_magnitude > 0.0 {
            positive("randaug_n", p.randaug_n)?;
        }
        Ok(())
    }

    fn preflight(_: &Params, inputs: &Inputs) -> Result<()> {
        super::fit::preflight_labelled(inputs.item("data")?, &[Split::Train])
    }

    fn outputs(_: &Params) -> Vec<OutputSlot> {
        vec![
            OutputSlot {
                name: "model",
                path: "model",
                doc: "model.safetensors + model.json (architecture, classes, normalisation)",
            },
            OutputSlot {
                name: "encoder",
                path: "encoder.safetensors",
                doc: "the fine-tuned backbone without its head",
            },
        ]
    }

    fn run(p: &Params, inputs: &Inputs, ctx: &mut StageCtx) -> Result<Value> {
        let dev = ctx.compute_device()?;
        let store = store_size(p.backbone.img_size, p.decode_scale);
        let set = ImageSet::open(
            inputs.item("data")?,
            &SetSpec {
                store,
                val_fraction: p.val_fraction,
                folds: p.folds.map(|k| (k, p.fold.unwrap_or(0))),
                split_seed: p.split_seed,
                label_fraction: p.label_fraction,
                max_images: p.max_images,
                on_bad: p.on_bad_image,
            },
            ctx,
        )?;
        let classes = set.dataset.classes.clone();
        if classes.len() < 2 {
            bail!(
                "{}: fine-tuning needs at least two classes, found {:?}",
                set.dataset.root.display(),
                classes
            );
        }
        let train = set
            .require(Split::Train, "fine-tuning needs training images")?
            .to_vec();
        let val = set
            .require(Split::Val, "raise `val_fraction` or add `split: val` rows")?
            .to_vec();
        if val.len() < SMALL_VALIDATION {
            ctx.log(&format!(
                "warning: the validation split has {} images; the checkpoint chosen on it is noisy (raise `val_fraction`, or use `folds`)",
                val.len()
            ));
        }
        let (mean, std) = set.decoded.stats(&train);
        let norm = Normalize { mean, std };
        let desc = p.net(classes.len());
        let net = Net::build(&desc, p.seed, &dev)?;
        let init = match (
            inputs.optional_path("init"),
            inputs.optional_path("imagenet"),
        ) {
            (Some(_), Some(_)) => bail!("give either `init` or `imagenet`, not both"),
            (Some(path), None) => Some(path.to_path_buf()),
            (None, Some(path)) => {
                if !path.is_file() {
                    bail!("ImageNet weights {} not found: save timm/torchvision weights as safetensors there (see docs/pipelines.md)", path.display());
                }
                Some(path.to_path_buf())
            }
            (None, None) => None,
        };
        let init_note = match &init {
            Some(path) => {
                let note = net.load_init(path)?;
                ctx.log(&format!("initialised from {} {note}", path.display()));
                path.display().to_string()
            }
            None => "scratch".to_owned(),
        };
        let layer_decay = p.effective_layer_decay(desc.is_vit(), init.is_some());
        let head_only = |n: &str| net.is_head(n);
        let mut opt = super::fit::optimizer(
            &net.params,
            &OptimSpec {
                weight_decay: p.weight_decay,
                betas: (0.9, 0.999),
                layer_decay: match layer_decay {
                    Some(d) => Some((d, desc.vit_config()?.depth)),
                    None => None,
                },
                only: if p.mode == Mode::LinearProbe {
                    Some(&head_only)
                } else {
                    None
                },
                lars: p.optimizer == OptimizerKind::Lars,
            },
        );
        let peak_lr = p.peak_lr(desc.is_vit())?;
        let steps = train_steps(train.len(), p.batch);
        let plan = TrainingPlan {
            peak_lr,
            steps_per_epoch: steps,
            epochs: p.epochs,
            warmup_epochs: p.warmup_epochs,
            layer_decay,
        };
        for line in plan.describe(train.len()) {
            ctx.log(&line);
        }
        let aug = TrainAug {
            crop_scale: p.crop_scale,
            center_bias: p.center_bias,
            hflip: p.hflip,
            randaug: (p.randaug_magnitude > 0.0 && p.randaug_n > 0)
                .then_some((p.randaug_n, p.randaug_magnitude)),
        };
        let labels: Vec<u32> = train
            .iter()
            .map(|&pos| set.label(pos))
            .collect::<Result<_>>()?;
        let class_weights = p.class_weights.weights(&labels, classes.len());
        if let Some(w) = &class_weights {
            ctx.log(&format!("class weights {w:.3?} ({classes:?})"));
        }
        let best_file = ctx.checkpoint_dir.join("best.safetensors");
        let mut kind = FineTuning {
            p,
            net: &net,
            dev: &dev,
            set: &set,
            val: &val,
            classes: classes.len(),
            views: Arc::new(Views {
                decoded: set.decoded.clone(),
                train: train.clone(),
                labels,
                norm,
                aug,
                size: p.backbone.img_size,
            }),
            class_weights,
            best_file: best_file.clone(),
        };
        let plan = Schedule {
            epochs: p.epochs,
            steps_per_epoch: steps,
            lr: schedule(peak_lr, p.min_lr, p.warmup_epochs, p.epochs),
            clip_grad: p.clip_grad,
            seed: p.seed,
            stream: 0xD209,
        };
        let h = run_epochs(&mut kind, &plan, &net.params, &mut opt, ctx)?;
        if best_file.is_file() {
            let report = net.params.load_safetensors(&best_file, |_| false)?;
            if !report.is_clean() {
                bail!("best checkpoint unreadable: {}", report.describe());
            }
        }
        let model_dir = ctx.out_dir.join("model");
        std::fs::create_dir_all(&model_dir)?;
        net.params
            .save_safetensors(&model_dir.join("model.safetensors"), |_| true)?;
        let python = desc.python(Preprocess {
            channels: 1,
            store,
            size: p.backbone.img_size,
            mean,
            std,
        })?;
        let card = ModelCard {
            net: desc,
            classes: classes.clone(),
            mean,
            std,
            store,
            best_epoch: h.best_epoch,
            label_fraction: p.label_fraction,
            python: Some(python),
        };
        std::fs::write(
            model_dir.join("model.json"),
            serde_json::to_vec_pretty(&card)?,
        )
        .context("writing model.json")?;
        net.save_encoder(&ctx.out_dir.join("encoder.safetensors"))?;
        Ok(json!({
            "init": init_note, "mode": p.mode, "classes": classes, "train_images": train.len(), "val_images": val.len(),
            "peak_lr": peak_lr, "layer_decay": layer_decay, "steps_per_epoch": steps, "total_steps": steps * p.epochs,
            "best_epoch": h.best_epoch, "select": p.select, "train_loss": h.train_loss, "val_loss": h.val_loss,
            "val_accuracy": h.val_accuracy, "val_auc": h.val_auc, "val_auc_per_class": h.val_auc_per_class, "lr": h.lr, "skipped_images": set.decoded.skipped.len(),
        }))
    }
}

/// Training images as the fine-tune sees them: an augmented view and its label.
struct Views {
    decoded: crate::data::decode::Decoded,
    train: Vec<usize>,
    labels: Vec<u32>,
    norm: Normalize,
    aug: TrainAug,
    size: usize,
}

/// Fine-tuning as the shared epoch loop runs it: after each epoch, the validation split scores
/// the model, and the best epoch by `select` is kept.
struct FineTuning<'a> {
    p: &'a Params,
    net: &'a Net,
    dev: &'a candle_core::Device,
    set: &'a ImageSet,
    val: &'a [usize],
    classes: usize,
    views: Arc<Views>,
    class_weights: Option<Vec<f32>>,
    best_file: std::path::PathBuf,
}

impl Step for FineTuning<'_> {
    type History = History;

    fn batches(&self, epoch: usize) -> crate::data::loader::Batches {
        let v = self.views.clone();
        let n = v.train.len();
        loader::epoch(
            n,
            self.p.batch,
            true,
            n > self.p.batch,
            self.p.seed,
            epoch as u64,
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
        )?;
        let (vl, va, vauc) = (scored.loss, scored.accuracy, scored.auc);
        h.train_loss.push(done.mean_loss);
        h.val_loss.push(vl);
        h.val_accuracy.push(va);
        h.val_auc.push(vauc);
        h.val_auc_per_class.push(scored.auc_per_class);
        h.lr.push(done.last_lr);
        let score = self.p.select.score(va, vauc, vl);
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

/// Below this many validation images, the stage warns that checkpoint selection is noisy.
const SMALL_VALIDATION: usize = 20;

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
    fn score(self, accuracy: f64, auc: Option<f64>, loss: f64) -> (f64, f64) {
        match self {
            Select::Accuracy => (accuracy, f64::NEG_INFINITY),
            Select::Auc => (auc.unwrap_or(accuracy), -loss),
            Select::Loss => (-loss, f64::NEG_INFINITY),
        }
    }
}

/// Strictly better: an equal score keeps the earlier epoch.
fn better(score: (f64, f64), best: (f64, f64)) -> bool {
    score.0 > best.0 || (score.0 == best.0 && score.1 > best.1)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let first = Select::Accuracy.score(0.6, Some(0.7), 1.0);
        let tie = Select::Accuracy.score(0.6, Some(0.9), 0.5);
        assert!(
            !better(tie, first),
            "an equal accuracy keeps the earlier epoch"
        );
        assert!(better(Select::Accuracy.score(0.61, None, 2.0), first));
        let auc = Select::Auc.score(0.5, Some(0.8), 1.0);
        assert!(
            better(Select::Auc.score(0.4, Some(0.8), 0.9), auc),
            "AUC ties go to the lower loss"
        );
    }
}
