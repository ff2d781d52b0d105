//! `kind: finetune`: supervised training of a CNN or ViT on a labelled X-ray set with the study's
//! recipe (layer-wise lr decay 0.55 for ViTs, DropPath 0.2, RandAugment magnitude 6, label
//! smoothing, AdamW, warmup + cosine), or a linear probe. Starts from scratch, from an upstream
//! encoder (`init`), or from an ImageNet checkpoint file (`imagenet`). The checkpoint kept is the
//! best on a validation split carved from train (grouped, stratified, seeded): never the test split.

use super::fit::{
    batch_tensors, finite, load_checkpoint, save_checkpoint, scalar, schedule, EpochLoss, ImageSet,
    OptimSpec,
};
use super::net::{ModelCard, Net, NetDesc};
use super::{InputSlot, Inputs, OutputSlot, StageCtx, Task};
use crate::data::decode::OnBadImage;
use crate::data::loader::{self, Normalize, TrainAug};
use crate::data::source::Split;
use crate::nn::ops::cross_entropy;
use crate::nn::tap::Taps;
use crate::rng::Rng;
use crate::train::metrics::{accuracy, roc_auc_per_class};
use crate::train::optim::clip_grad_norm;
use crate::train::schedule::scaled_lr;
use anyhow::{bail, Context, Result};
use candle_core::D;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;

pub struct Finetune;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Full,
    LinearProbe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adamw,
    Lars,
}

fn d_optimizer() -> OptimizerKind {
    OptimizerKind::Adamw
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    #[serde(default = "super::net::defaults::model")]
    pub model: String,
    #[serde(default)]
    pub vit_dims: Option<[usize; 3]>,
    #[serde(default)]
    pub densenet_dims: Option<Vec<usize>>,
    #[serde(default = "super::net::defaults::img_size")]
    pub img_size: usize,
    #[serde(default = "super::net::defaults::patch")]
    pub patch: usize,
    #[serde(default = "d_mode")]
    pub mode: Mode,
    /// `adamw`, or `lars` (MAE's choice for linear probes).
    #[serde(default = "d_optimizer")]
    pub optimizer: OptimizerKind,
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    #[serde(default = "d_batch")]
    pub batch: usize,
    /// Base lr per 256 images.
    #[serde(default = "d_blr")]
    pub blr: f64,
    #[serde(default = "d_min_lr")]
    pub min_lr: f64,
    #[serde(default = "d_warmup")]
    pub warmup_epochs: f64,
    #[serde(default = "super::net::defaults::weight_decay")]
    pub weight_decay: f64,
    /// Layer-wise lr decay for ViTs (ignored for CNNs).
    #[serde(default = "d_layer_decay")]
    pub layer_decay: f64,
    #[serde(default = "d_drop_path")]
    pub drop_path: f64,
    #[serde(default = "d_ra_n")]
    pub randaug_n: usize,
    /// 0 turns RandAugment off.
    #[serde(default = "d_ra_m")]
    pub randaug_magnitude: f64,
    #[serde(default = "d_smoothing")]
    pub label_smoothing: f64,
    #[serde(default = "super::net::defaults::crop_scale")]
    pub crop_scale: (f64, f64),
    /// 0 = uniform crop positions; towards 1 pulls crops to the image centre.
    #[serde(default)]
    pub center_bias: f64,
    #[serde(default = "yes")]
    pub hflip: bool,
    #[serde(default)]
    pub clip_grad: Option<f64>,
    #[serde(default = "d_val")]
    pub val_fraction: f64,
    /// k-fold instead of `val_fraction`: the train split in `folds` grouped, stratified folds,
    /// fold `fold` (default 0) as validation. Left out of the key when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folds: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fold: Option<usize>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub max_images: Option<usize>,
    #[serde(default)]
    pub on_bad_image: OnBadImage,
}

fn d_mode() -> Mode {
    Mode::Full
}
fn d_epochs() -> usize {
    30
}
fn d_batch() -> usize {
    32
}
fn d_blr() -> f64 {
    1e-3
}
fn d_min_lr() -> f64 {
    1e-6
}
fn d_warmup() -> f64 {
    3.0
}
fn d_layer_decay() -> f64 {
    0.55
}
fn d_drop_path() -> f64 {
    0.2
}
fn d_ra_n() -> usize {
    2
}
fn d_ra_m() -> f64 {
    6.0
}
fn d_smoothing() -> f64 {
    0.1
}
fn yes() -> bool {
    true
}
fn d_val() -> f64 {
    0.15
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct History {
    train_loss: Vec<f64>,
    val_loss: Vec<f64>,
    val_accuracy: Vec<f64>,
    val_auc: Vec<Option<f64>>,
    lr: Vec<f64>,
    best_epoch: usize,
    best_score: Option<(f64, f64)>,
}

/// Validation loss, accuracy and mean one-vs-rest AUC of `net` on `positions`.
pub fn evaluate_split(
    net: &Net,
    set: &ImageSet,
    positions: &[usize],
    size: usize,
    norm: Normalize,
    classes: usize,
) -> Result<(f64, f64, Option<f64>, Vec<Vec<f64>>)> {
    let dev = net.device().clone();
    let (mut loss_sum, mut probs, mut truth) = (0.0, Vec::new(), Vec::new());
    let d = Arc::new(set.decoded.clone());
    let labels: Vec<u32> = positions
        .iter()
        .map(|&p| set.label(p))
        .collect::<Result<_>>()?;
    let (pos, lab) = (positions.to_vec(), labels.clone());
    let rx = loader::epoch(
        positions.len(),
        64,
        false,
        false,
        0,
        0,
        size,
        move |i, rng| {
            vec![(
                norm.apply(loader::view(&d, pos[i], size, None, rng)),
                lab[i],
            )]
        },
    );
    for b in rx.iter() {
        let (x, y) = batch_tensors(&b, &dev)?;
        let logits = net.logits(&x, None, &mut Taps::none())?;
        loss_sum += scalar(&cross_entropy(&logits, &y, 0.0)?)? * b.n as f64;
        let p: Vec<Vec<f32>> = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2()?;
        probs.extend(
            p.into_iter()
                .map(|r| r.into_iter().map(f64::from).collect::<Vec<f64>>()),
        );
        truth.extend(b.y.iter().map(|&v| v as usize));
    }
    let pred: Vec<usize> = probs.iter().map(|r| argmax(r)).collect();
    let onehot: Vec<Vec<bool>> = truth
        .iter()
        .map(|&t| (0..classes).map(|c| c == t).collect())
        .collect();
    let (_, auc) = roc_auc_per_class(&onehot, &probs);
    Ok((
        loss_sum / positions.len().max(1) as f64,
        accuracy(&truth, &pred),
        auc,
        probs,
    ))
}

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

impl Task for Finetune {
    const KIND: &'static str = "finetune";
    const VERSION: u32 = 1;
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
        let set = ImageSet::open(
            inputs.item("data")?,
            p.img_size,
            p.val_fraction,
            p.folds.map(|k| (k, p.fold.unwrap_or(0))),
            p.seed,
            p.max_images,
            p.on_bad_image,
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
        let (mean, std) = set.decoded.stats(&train);
        let norm = Normalize { mean, std };
        let desc = NetDesc {
            arch: p.model.clone(),
            img_size: p.img_size,
            patch: p.patch,
            vit_dims: p.vit_dims,
            densenet_dims: p.densenet_dims.clone(),
            drop_path: if p.mode == Mode::Full {
                p.drop_path
            } else {
                0.0
            },
            num_classes: classes.len(),
        };
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
        let head_only = |n: &str| net.is_head(n);
        let mut opt = super::fit::optimizer(
            &net.params,
            &OptimSpec {
                weight_decay: p.weight_decay,
                betas: (0.9, 0.999),
                layer_decay: desc.vit_config().ok().map(|c| (p.layer_decay, c.depth)),
                only: if p.mode == Mode::LinearProbe {
                    Some(&head_only)
                } else {
                    None
                },
                lars: p.optimizer == OptimizerKind::Lars,
            },
        );
        let sched = schedule(
            scaled_lr(p.blr, p.batch),
            p.min_lr,
            p.warmup_epochs,
            p.epochs,
        );
        let (start, mut h) =
            match load_checkpoint::<History>(&ctx.checkpoint_dir, &net.params, &mut opt)? {
                Some((done, h)) => {
                    ctx.log(&format!("resuming after epoch {done}"));
                    (done, h)
                }
                None => (0, History::default()),
            };
        let aug = TrainAug {
            crop_scale: p.crop_scale,
            center_bias: p.center_bias,
            hflip: p.hflip,
            randaug: (p.randaug_magnitude > 0.0 && p.randaug_n > 0)
                .then_some((p.randaug_n, p.randaug_magnitude)),
        };
        let d = Arc::new(set.decoded.clone());
        let labels: Vec<u32> = train
            .iter()
            .map(|&pos| set.label(pos))
            .collect::<Result<_>>()?;
        let steps = train.len().div_ceil(p.batch);
        let best_file = ctx.checkpoint_dir.join("best.safetensors");
        for epoch in start..p.epochs {
            let (dd, t, lab, size) = (d.clone(), train.clone(), labels.clone(), p.img_size);
            let rx = loader::epoch(
                train.len(),
                p.batch,
                true,
                false,
                p.seed,
                epoch as u64,
                size,
                move |i, rng| {
                    vec![(
                        norm.apply(loader::view(&dd, t[i], size, Some(&aug), rng)),
                        lab[i],
                    )]
                },
            );
            let mut epoch_loss = EpochLoss::new(epoch, p.epochs, steps);
            let mut rng = Rng::stream(p.seed, epoch as u64, 0xD209);
            let mut lr = 0.0;
            for (step, b) in rx.iter().enumerate() {
                if ctx.cancelled() {
                    bail!("cancelled");
                }
                let (x, y) = batch_tensors(&b, &dev)?;
                let logits = net.logits(&x, Some(&mut rng), &mut Taps::none())?;
                let loss = cross_entropy(&logits, &y, p.label_smoothing)?;
                let value = finite(scalar(&loss)?, epoch, step)?;
                let mut grads = loss.backward()?;
                if let Some(max) = p.clip_grad {
                    clip_grad_norm(&mut grads, opt.vars().iter(), max)?;
                }
                lr = sched.lr(epoch as f64 + step as f64 / steps as f64);
                opt.step(&grads, lr)?;
                epoch_loss.add(ctx, step, value, b.n);
            }
            let (vl, va, vauc, _) =
                evaluate_split(&net, &set, &val, p.img_size, norm, classes.len())?;
            h.train_loss.push(epoch_loss.mean());
            h.val_loss.push(vl);
            h.val_accuracy.push(va);
            h.val_auc.push(vauc);
            h.lr.push(lr);
            // Selection on validation only: higher mean AUC, then lower loss.
            let score = (vauc.unwrap_or(va), -vl);
            if h.best_score
                .is_none_or(|b| score.0 > b.0 || (score.0 == b.0 && score.1 > b.1))
            {
                h.best_score = Some(score);
                h.best_epoch = epoch + 1;
                net.params.save_safetensors(&best_file, |_| true)?;
            }
            ctx.log(&format!(
                "epoch {} train loss {:.4} val loss {vl:.4} acc {va:.3} auc {}",
                epoch + 1,
                h.train_loss[epoch],
                vauc.map_or("-".into(), |a| format!("{a:.3}"))
            ));
            save_checkpoint(&ctx.checkpoint_dir, &net.params, &opt, &h, epoch + 1)?;
        }
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
        let card = ModelCard {
            net: desc,
            classes: classes.clone(),
            mean,
            std,
            best_epoch: h.best_epoch,
        };
        std::fs::write(
            model_dir.join("model.json"),
            serde_json::to_vec_pretty(&card)?,
        )
        .context("writing model.json")?;
        net.save_encoder(&ctx.out_dir.join("encoder.safetensors"))?;
        Ok(json!({
            "init": init_note, "mode": p.mode, "classes": classes, "train_images": train.len(), "val_images": val.len(),
            "best_epoch": h.best_epoch, "train_loss": h.train_loss, "val_loss": h.val_loss, "val_accuracy": h.val_accuracy,
            "val_auc": h.val_auc, "lr": h.lr, "skipped_images": set.decoded.skipped.len(),
        }))
    }
}
