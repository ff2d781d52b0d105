//! `kind: finetune`: supervised training of a CNN or ViT on a labelled X-ray set, or a linear
//! probe. Starts from scratch, from an upstream encoder (`init`), or from an ImageNet checkpoint
//! file (`imagenet`). The recipe's defaults are sized for a few hundred images (docs/recipes.md):
//! the lr used as given, layer-wise lr decay only from pretrained weights, DropPath 0.1,
//! RandAugment off, AdamW, warmup + cosine. The checkpoint kept is the best on a validation split
//! carved from train (grouped, stratified, seeded): never the test split.

mod params;
mod step;

pub use params::{ClassWeights, Mode, OptimizerKind, Params, Select, PRETRAINED_LAYER_DECAY};

use super::fit::{
    run_epochs, schedule, store_size, ImageSet, Optim, OptimSpec, Schedule, SetSpec, TrainingPlan,
};
use super::net::{ModelCard, Net, NetDesc, Preprocess};
use crate::data::loader::{Normalize, TrainAug};
use crate::data::source::Split;
use crate::stage::{InputSlot, Inputs, OutputSlot, StageCtx, Task};
use anyhow::{bail, Context, Result};
use params::train_steps;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use step::{FineTuning, Views};

pub struct Finetune;

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
        let (set, train, val) = open_splits(p, store, inputs, ctx)?;
        let classes = set.dataset.classes.clone();
        let (mean, std) = set.decoded.stats(&train);
        let desc = p.net(classes.len());
        let net = Net::build(&desc, p.seed, &dev)?;
        let init = starting_weights(inputs)?;
        let init_note = match &init {
            Some(path) => {
                let note = net.load_init(path)?;
                ctx.log(&format!("initialised from {} {note}", path.display()));
                path.display().to_string()
            }
            None => "scratch".to_owned(),
        };
        let layer_decay = p.effective_layer_decay(desc.is_vit(), init.is_some());
        let mut opt = optimizer(p, &net, &desc, layer_decay)?;
        let peak_lr = p.peak_lr(desc.is_vit())?;
        let steps = train_steps(train.len(), p.batch);
        let training = TrainingPlan {
            peak_lr,
            steps_per_epoch: steps,
            epochs: p.epochs,
            warmup_epochs: p.warmup_epochs,
            layer_decay,
        };
        for line in training.describe(train.len()) {
            ctx.log(&line);
        }
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
                norm: Normalize { mean, std },
                aug: train_aug(p),
                size: p.backbone.img_size,
            }),
            class_weights,
            best_file: best_file.clone(),
        };
        let schedule = Schedule {
            epochs: p.epochs,
            steps_per_epoch: steps,
            lr: schedule(peak_lr, p.min_lr, p.warmup_epochs, p.epochs),
            clip_grad: p.clip_grad,
            seed: p.seed,
            stream: 0xD209,
        };
        let h = run_epochs(&mut kind, &schedule, &net.params, &mut opt, ctx)?;
        if best_file.is_file() {
            let report = net.params.load_safetensors(&best_file, |_| false)?;
            if !report.is_clean() {
                bail!("best checkpoint unreadable: {}", report.describe());
            }
        }
        let card = ModelCard {
            python: Some(desc.python(Preprocess {
                channels: 1,
                store,
                size: p.backbone.img_size,
                mean,
                std,
            })?),
            net: desc,
            classes: classes.clone(),
            mean,
            std,
            store,
            best_epoch: h.best_epoch,
            label_fraction: p.label_fraction,
        };
        save_model(&net, &card, &ctx.out_dir)?;
        Ok(json!({
            "init": init_note, "mode": p.mode, "classes": classes, "train_images": train.len(), "val_images": val.len(),
            "peak_lr": peak_lr, "layer_decay": layer_decay, "steps_per_epoch": steps, "total_steps": steps * p.epochs,
            "best_epoch": h.best_epoch, "select": p.select, "train_loss": h.train_loss, "val_loss": h.val_loss,
            "val_accuracy": h.val_accuracy, "val_auc": h.val_auc, "val_auc_per_class": h.val_auc_per_class, "lr": h.lr, "skipped_images": set.decoded.skipped.len(),
        }))
    }
}

/// The labelled set with its train and validation positions, checked for what fine-tuning needs.
fn open_splits(
    p: &Params,
    store: usize,
    inputs: &Inputs,
    ctx: &StageCtx,
) -> Result<(ImageSet, Vec<usize>, Vec<usize>)> {
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
    if set.dataset.classes.len() < 2 {
        bail!(
            "{}: fine-tuning needs at least two classes, found {:?}",
            set.dataset.root.display(),
            set.dataset.classes
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
    Ok((set, train, val))
}

/// The checkpoint the network starts from: an upstream encoder, ImageNet weights, or none.
fn starting_weights(inputs: &Inputs) -> Result<Option<PathBuf>> {
    match (
        inputs.optional_path("init"),
        inputs.optional_path("imagenet"),
    ) {
        (Some(_), Some(_)) => bail!("give either `init` or `imagenet`, not both"),
        (Some(path), None) => Ok(Some(path.to_path_buf())),
        (None, Some(path)) if !path.is_file() => bail!(
            "ImageNet weights {} not found: save timm/torchvision weights as safetensors there (see docs/pipelines.md)",
            path.display()
        ),
        (None, Some(path)) => Ok(Some(path.to_path_buf())),
        (None, None) => Ok(None),
    }
}

/// AdamW (or LARS) over the whole network, or over the head alone for a linear probe.
fn optimizer(p: &Params, net: &Net, desc: &NetDesc, layer_decay: Option<f64>) -> Result<Optim> {
    let head_only = |n: &str| net.is_head(n);
    Ok(super::fit::optimizer(
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
    ))
}

fn train_aug(p: &Params) -> TrainAug {
    TrainAug {
        crop_scale: p.crop_scale,
        center_bias: p.center_bias,
        hflip: p.hflip,
        quarter_turns: p.quarter_turns,
        randaug: (p.randaug_magnitude > 0.0 && p.randaug_n > 0)
            .then_some((p.randaug_n, p.randaug_magnitude)),
    }
}

/// `model/` (weights and model.json, which evaluate, gradcam and Python read) and the encoder
/// alone (what a later stage's `init` reads).
fn save_model(net: &Net, card: &ModelCard, out_dir: &Path) -> Result<()> {
    let model_dir = out_dir.join("model");
    std::fs::create_dir_all(&model_dir)?;
    net.params
        .save_safetensors(&model_dir.join("model.safetensors"), |_| true)?;
    std::fs::write(
        model_dir.join("model.json"),
        serde_json::to_vec_pretty(card)?,
    )
    .context("writing model.json")?;
    net.save_encoder(&out_dir.join("encoder.safetensors"))
}

/// Below this many validation images, the stage warns that checkpoint selection is noisy.
const SMALL_VALIDATION: usize = 20;
