//! Training plumbing shared by the stage kinds: labelled image sets, optimiser groups, the
//! per-epoch loop with atomic checkpoints that a restarted attempt resumes from.

pub mod checkpoint;
mod epochs;
pub mod scores;

pub use epochs::{run_epochs, EpochDone, Schedule, Step};

use crate::data::decode::{decode_all, Decoded, OnBadImage};
use crate::data::loader::{Batch, Normalize};
use crate::data::source::{self, Dataset, Split};
use crate::nn::params::ParamStore;
use crate::stage::{InputItem, StageCtx};
use crate::train::lars::Lars;
use crate::train::lr_decay::param_groups_lrd;
use crate::train::optim::{AdamW, AdamWConfig, ParamGroup};
use crate::train::schedule::WarmupCosine;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};

/// A decoded data input with its splits.
pub struct ImageSet {
    pub dataset: Dataset,
    pub decoded: Decoded,
    /// Per split: positions into `decoded` (images that failed to decode under `skip` are absent).
    pub splits: BTreeMap<Split, Vec<usize>>,
    /// Dataset sample index of each decoded image.
    pub sample_of: Vec<usize>,
}

/// How a stage reads a data input: the size images are stored at, and how the train split is
/// divided.
#[derive(Debug, Clone)]
pub struct SetSpec {
    /// Side of the decoded store; training crops are drawn from it and evaluation resizes it.
    pub store: usize,
    /// Share of the train split (grouped, stratified) held out for validation when the data
    /// names no `val` rows.
    pub val_fraction: f64,
    /// k-fold instead of `val_fraction`: (folds, the fold used for validation).
    pub folds: Option<(usize, usize)>,
    /// Seeds the validation carve-out and the label subsample, apart from the model's seed, so
    /// every model seed sees the same split.
    pub split_seed: u64,
    /// Keep this share of the training labels, per class (1.0: all).
    pub label_fraction: f64,
    pub max_images: Option<usize>,
    pub on_bad: OnBadImage,
}

impl SetSpec {
    /// All images in one split as the data defines it (test where labelled so), stored at `store`.
    pub fn whole(store: usize, max_images: Option<usize>, on_bad: OnBadImage) -> SetSpec {
        SetSpec {
            store,
            val_fraction: 0.0,
            folds: None,
            split_seed: 0,
            label_fraction: 1.0,
            max_images,
            on_bad,
        }
    }
}

/// The side images are stored at for training at `img` px: `scale` x `img`, at least `img`.
pub fn store_size(img: usize, scale: f64) -> usize {
    ((img as f64 * scale).round() as usize).max(img)
}

impl ImageSet {
    pub fn open(item: &InputItem, spec: &SetSpec, ctx: &StageCtx) -> Result<ImageSet> {
        let mut dataset = source::open_with(&item.path, &item.options)?;
        if let Some(max) = spec.max_images {
            // Evenly spaced, so every class and split keeps its share.
            let n = dataset.samples.len();
            if max < n {
                dataset.samples = (0..max)
                    .map(|i| dataset.samples[i * n / max].clone())
                    .collect();
            }
        }
        let paths: Vec<_> = dataset.samples.iter().map(|s| s.path.clone()).collect();
        let origins: Vec<_> = dataset.samples.iter().map(|s| s.origin.clone()).collect();
        let size = spec.store;
        ctx.log(&format!(
            "decoding {} images at {size} px from {}",
            paths.len(),
            item.path.display()
        ));
        let decoded = decode_all(
            &paths,
            &origins,
            size,
            item.digest.as_deref(),
            Some(&ctx.scratch_dir),
            spec.on_bad,
        )?;
        for (p, e) in &decoded.skipped {
            ctx.log(&format!("skipped {}: {e}", p.display()));
        }
        let mut by_sample = match spec.folds {
            Some((k, fold)) => source::kfold_indices(&dataset, k, fold, spec.split_seed)?,
            None => source::split_indices(&dataset, spec.val_fraction, spec.split_seed),
        };
        if spec.label_fraction < 1.0 {
            if let Some(train) = by_sample.get_mut(&Split::Train) {
                *train = source::subsample_per_class(
                    &dataset,
                    train,
                    spec.label_fraction,
                    spec.split_seed,
                );
            }
        }
        let position: HashMap<usize, usize> = decoded
            .kept
            .iter()
            .enumerate()
            .map(|(pos, &s)| (s, pos))
            .collect();
        let splits = by_sample
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    v.into_iter()
                        .filter_map(|s| position.get(&s).copied())
                        .collect(),
                )
            })
            .collect();
        let sample_of = decoded.kept.clone();
        Ok(ImageSet {
            dataset,
            decoded,
            splits,
            sample_of,
        })
    }

    /// For self-supervised stages: every image not held out for testing (train and val), and
    /// the normalisation measured on them.
    pub fn unlabelled(
        item: &InputItem,
        spec: &SetSpec,
        ctx: &StageCtx,
    ) -> Result<(ImageSet, Vec<usize>, Normalize)> {
        let set = ImageSet::open(item, spec, ctx)?;
        let mut positions = set.split(Split::Train).to_vec();
        positions.extend_from_slice(set.split(Split::Val));
        let (mean, std) = set.decoded.stats(&positions);
        Ok((set, positions, Normalize { mean, std }))
    }

    pub fn split(&self, split: Split) -> &[usize] {
        self.splits.get(&split).map_or(&[], Vec::as_slice)
    }

    /// Label of decoded image `pos`; an unlabelled image is an error naming its CSV row.
    pub fn label(&self, pos: usize) -> Result<u32> {
        let s = &self.dataset.samples[self.sample_of[pos]];
        if s.label.is_none() && s.targets.is_some() {
            bail!("{}: this data set is multi-label (NIH / CheXpert); the stage kinds train single-label classifiers so far", s.origin);
        }
        s.label
            .map(|l| l as u32)
            .with_context(|| format!("{}: image has no label", s.origin))
    }

    pub fn require(&self, split: Split, what: &str) -> Result<&[usize]> {
        let v = self.split(split);
        if v.is_empty() {
            bail!(
                "{}: the {split:?} split is empty; {what}",
                self.dataset.root.display()
            );
        }
        Ok(v)
    }
}

/// The plan-time look at a labelled data input: it opens (every listed file inside the folder,
/// labels consistent) and has rows in each of `splits` (a split that the stage carves out of
/// train, like validation, is not listed) and at least two classes.
pub fn preflight_labelled(item: &InputItem, splits: &[Split]) -> Result<()> {
    let ds = source::open_with(&item.path, &item.options)?;
    if ds.classes.len() < 2 {
        bail!(
            "{}: {} class(es) ({:?}); a classifier needs at least two",
            item.path.display(),
            ds.classes.len(),
            ds.classes
        );
    }
    for split in splits {
        let any = ds
            .samples
            .iter()
            .any(|s| s.split.unwrap_or(Split::Train) == *split);
        if !any {
            bail!(
                "{}: no image is in the {split:?} split; give rows `{}` in a `split` column of its labels file",
                item.path.display(),
                format!("{split:?}").to_lowercase()
            );
        }
    }
    Ok(())
}

pub fn batch_tensors(b: &Batch, device: &Device) -> Result<(Tensor, Tensor)> {
    let x = Tensor::from_slice(&b.x, (b.n, 1, b.size, b.size), device)?;
    let y = Tensor::from_slice(&b.y, b.n, device)?;
    Ok((x, y))
}

pub struct OptimSpec<'a> {
    pub weight_decay: f64,
    pub betas: (f64, f64),
    /// Layer-wise lr decay, with the ViT's depth: lr scale decay^(depth+1 - layer).
    pub layer_decay: Option<(f64, usize)>,
    /// Train only these parameters (a linear probe trains the head alone).
    pub only: Option<&'a dyn Fn(&str) -> bool>,
    /// LARS instead of AdamW (linear probes).
    pub lars: bool,
}

/// AdamW groups: no decay for 1-D parameters, position embeddings and tokens; layer-wise decay
/// for ViTs when asked. BatchNorm running statistics are not parameters and are left out.
pub fn optimizer(params: &ParamStore, spec: &OptimSpec) -> Optim {
    let named: Vec<(String, candle_core::Var)> = params
        .named()
        .into_iter()
        .filter(|(n, _)| !n.ends_with("running_mean") && !n.ends_with("running_var"))
        .filter(|(n, _)| spec.only.is_none_or(|f| f(n)))
        .collect();
    let shapes: Vec<(String, usize)> = named.iter().map(|(n, v)| (n.clone(), v.rank())).collect();
    let (decay, depth) = spec.layer_decay.unwrap_or((1.0, 0));
    let settings = param_groups_lrd(
        &shapes,
        depth + 1,
        spec.weight_decay,
        &["pos_embed", "cls_token", "mask_token"],
        decay,
    );
    let mut groups: Vec<ParamGroup> = Vec::new();
    for (s, (_, var)) in settings.iter().zip(named) {
        if groups.len() <= s.group {
            groups.resize(
                s.group + 1,
                ParamGroup {
                    lr_scale: 1.0,
                    weight_decay: 0.0,
                    params: Vec::new(),
                },
            );
        }
        let g = &mut groups[s.group];
        (g.lr_scale, g.weight_decay) = (s.lr_scale, s.weight_decay);
        g.params.push((s.name.clone(), var));
    }
    if spec.lars {
        let params = groups.into_iter().flat_map(|g| g.params).collect();
        return Optim::Lars(Lars::new(params, spec.weight_decay));
    }
    Optim::AdamW(AdamW::new(
        AdamWConfig {
            beta1: spec.betas.0,
            beta2: spec.betas.1,
            eps: 1e-8,
        },
        groups,
    ))
}

/// What a training stage is about to do, printed at its start: the numbers to check first when
/// a model does not learn (a starved learning rate, a handful of steps, a warmup that never ends).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingPlan {
    pub peak_lr: f64,
    pub steps_per_epoch: usize,
    pub epochs: usize,
    pub warmup_epochs: f64,
    /// Layer-wise lr decay, when applied.
    pub layer_decay: Option<f64>,
}

impl TrainingPlan {
    /// The plan as log lines, warnings (prefixed `warning:`) last.
    pub fn describe(&self, images: usize) -> Vec<String> {
        let total = self.steps_per_epoch * self.epochs;
        let mut lines = vec![format!(
            "note: training on {images} images: {} steps/epoch x {} epochs = {total} steps; peak lr {:.3e} after {} warmup epochs, then cosine; layer decay {}",
            self.steps_per_epoch,
            self.epochs,
            self.peak_lr,
            self.warmup_epochs.min(self.epochs as f64 / 2.0),
            self.layer_decay.map_or("off".to_owned(), |d| format!("{d}")),
        )];
        if self.epochs > 0 && self.warmup_epochs >= self.epochs as f64 {
            lines.push(format!(
                "warning: warmup_epochs ({}) >= epochs ({}): warmup is cut to half the epochs, and the lr peaks only at the middle of training",
                self.warmup_epochs, self.epochs
            ));
        }
        lines
    }
}

pub fn schedule(lr: f64, min_lr: f64, warmup_epochs: f64, epochs: usize) -> WarmupCosine {
    WarmupCosine {
        base_lr: lr,
        min_lr,
        warmup_epochs: warmup_epochs.min(epochs as f64 / 2.0),
        epochs: epochs as f64,
    }
}

/// The optimisers a stage can train with.
pub enum Optim {
    AdamW(AdamW),
    /// For linear probes, as MAE's recipe.
    Lars(Lars),
}

impl Optim {
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore, lr: f64) -> Result<()> {
        match self {
            Optim::AdamW(o) => o.step(grads, lr)?,
            Optim::Lars(o) => o.step(grads, lr)?,
        }
        Ok(())
    }

    pub fn vars(&self) -> Vec<candle_core::Var> {
        match self {
            Optim::AdamW(o) => o.vars().cloned().collect(),
            Optim::Lars(o) => o.params.iter().map(|(_, v)| v.clone()).collect(),
        }
    }

    /// (name, tensors, step) of the optimiser's state, for checkpoints.
    pub(super) fn state(&self) -> Vec<(String, Vec<Tensor>, u64)> {
        match self {
            Optim::AdamW(o) => o
                .state
                .iter()
                .map(|(n, (m, v, t))| (n.clone(), vec![m.clone(), v.clone()], *t))
                .collect(),
            Optim::Lars(o) => o
                .state
                .iter()
                .map(|(n, mu)| (n.clone(), vec![mu.clone()], 0))
                .collect(),
        }
    }

    pub(super) fn restore(&mut self, name: &str, tensors: Vec<Tensor>, step: u64) {
        match (self, tensors.as_slice()) {
            (Optim::AdamW(o), [m, v]) => {
                o.state
                    .insert(name.to_owned(), (m.clone(), v.clone(), step));
            }
            (Optim::Lars(o), [mu]) => {
                o.state.insert(name.to_owned(), mu.clone());
            }
            _ => {}
        }
    }
}

pub fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_names_the_lr_and_the_steps_and_warns_of_an_endless_warmup() {
        let plan = TrainingPlan {
            peak_lr: 5e-4,
            steps_per_epoch: 11,
            epochs: 60,
            warmup_epochs: 5.0,
            layer_decay: Some(0.75),
        };
        let lines = plan.describe(381);
        assert_eq!(lines.len(), 1, "{lines:?}");
        for part in [
            "381 images",
            "11 steps/epoch x 60 epochs = 660 steps",
            "peak lr 5.000e-4",
            "layer decay 0.75",
        ] {
            assert!(lines[0].contains(part), "{part} in {}", lines[0]);
        }
        let short = TrainingPlan {
            epochs: 3,
            layer_decay: None,
            ..plan
        };
        let lines = short.describe(381);
        assert!(
            lines[0].contains("after 1.5 warmup epochs") && lines[0].contains("layer decay off")
        );
        assert!(
            lines[1].starts_with("warning: warmup_epochs (5) >= epochs (3)"),
            "{lines:?}"
        );
    }
}
