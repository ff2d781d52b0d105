//! `kind: evaluate`: scores the selected model once on the held-out test split: accuracy, macro-F1,
//! Cohen's kappa, per-class and mean one-vs-rest AUC, confusion matrix, study-level scores where
//! the data has studies or patients, and bootstrap 95% confidence intervals. Predictions per image
//! go to `predictions.csv`.

use super::fit::scores::{argmax, score};
use super::fit::{ImageSet, SetSpec};
use super::net::ModelCard;
use crate::data::augment::Tta;
use crate::data::decode::OnBadImage;
use crate::data::loader::Normalize;
use crate::data::source::Split;
use crate::stage::{InputSlot, Inputs, OutputSlot, StageCtx, Task};
use crate::train::metrics::{
    accuracy, bootstrap_ci, calibration, cohen_kappa, confusion, macro_f1,
    per_class as per_class_rows, roc_auc, roc_auc_per_class, roc_curve, study_level, Calibration,
};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;

pub struct Evaluate;

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Bootstrap resamples of the test set for the 95% confidence intervals.
    #[serde(default = "d_rounds")]
    pub bootstrap: usize,
    /// Seeds the bootstrap resamples.
    #[serde(default)]
    pub seed: u64,
    /// Use at most this many images, evenly spaced (quick runs).
    #[serde(default)]
    pub max_images: Option<usize>,
    /// `error`: stop at an image that does not decode, naming its row; `skip`: leave it out and count it.
    #[serde(default)]
    pub on_bad_image: OnBadImage,
    /// Test-time augmentation: `none`, `flip` (the image and its mirror image) or `dihedral`
    /// (its eight rotations and mirror images); the class probabilities are their mean. Use
    /// only the symmetries the model was trained with (`hflip`, `quarter_turns`).
    #[serde(default, skip_serializing_if = "Tta::is_none")]
    pub tta: Tta,
}

fn d_rounds() -> usize {
    1000
}

impl Task for Evaluate {
    const KIND: &'static str = "evaluate";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "scores a fine-tuned model once on the test split, with bootstrap confidence intervals";
    type Params = Params;

    fn inputs(_: &Params) -> Option<Vec<InputSlot>> {
        Some(super::net::model_and_data_inputs())
    }

    fn preflight(_: &Params, inputs: &Inputs) -> Result<()> {
        super::fit::preflight_labelled(inputs.item("data")?, &[Split::Test])
    }

    fn outputs(_: &Params) -> Vec<OutputSlot> {
        vec![
            OutputSlot {
                name: "predictions",
                path: "predictions.csv",
                doc: "per image: path (relative to the data folder), label, prediction, class probabilities",
            },
            OutputSlot {
                name: "curves",
                path: "curves.json",
                doc: "ROC curve per class ({\"roc\": [[[fpr, tpr], ..], ..]}) and the reliability diagram ({\"calibration\": {\"ece\", \"bins\": [[confidence, accuracy, images], ..]}})",
            },
        ]
    }

    const HEADLINE: Option<crate::stage::Headline> = Some(|metrics, _| headline(metrics));

    fn run(p: &Params, inputs: &Inputs, ctx: &mut StageCtx) -> Result<Value> {
        let (card, net) = ModelCard::read(inputs.path("model")?)?;
        let set = ImageSet::open(
            inputs.item("data")?,
            &SetSpec::whole(card.store_size(), p.max_images, p.on_bad_image),
            ctx,
        )?;
        if set.dataset.classes != card.classes {
            bail!(
                "the model was trained on classes {:?}, the data has {:?}",
                card.classes,
                set.dataset.classes
            );
        }
        let test = set
            .require(Split::Test, "add rows with split=test to labels.csv")?
            .to_vec();
        let k = card.classes.len();
        let probs = score(
            &net,
            &set,
            &test,
            card.net.img_size,
            Normalize {
                mean: card.mean,
                std: card.std,
            },
            k,
            p.tta,
        )?
        .probs;
        let truth: Vec<usize> = test
            .iter()
            .map(|&i| set.label(i).map(|l| l as usize))
            .collect::<Result<_>>()?;
        let pred: Vec<usize> = probs.iter().map(|r| argmax(r)).collect();
        let onehot = |idx: &[usize]| -> Vec<Vec<bool>> {
            idx.iter()
                .map(|&i| (0..k).map(|c| c == truth[i]).collect())
                .collect()
        };
        let all: Vec<usize> = (0..test.len()).collect();
        let (per_class, mean_auc) = roc_auc_per_class(&onehot(&all), &probs);
        let (acc_ci, f1_ci, auc_ci) = bootstrap_cis(p, &truth, &pred, &probs);

        write_predictions(
            &ctx.out_dir,
            &set,
            &test,
            &card.classes,
            &truth,
            &pred,
            &probs,
        )?;
        let study = study_metrics(&set, &test, &probs, &truth);
        let matrix = confusion(&truth, &pred, k);
        let correct: Vec<bool> = truth.iter().zip(&pred).map(|(t, p)| t == p).collect();
        let confidence: Vec<f64> = probs.iter().zip(&pred).map(|(r, &c)| r[c]).collect();
        let calibration = calibration(&confidence, &correct, 10);
        write_curves(&ctx.out_dir, &card.classes, &truth, &probs, &calibration)?;
        let metrics = json!({
            "test_images": test.len(), "classes": card.classes, "best_epoch": card.best_epoch,
            "label_fraction": card.label_fraction,
            "accuracy": accuracy(&truth, &pred), "accuracy_ci95": acc_ci,
            "macro_f1": macro_f1(&truth, &pred, k), "macro_f1_ci95": f1_ci,
            "kappa": cohen_kappa(&truth, &pred, k),
            "auc_mean": mean_auc, "auc_mean_ci95": auc_ci, "auc_per_class": per_class,
            "per_class": per_class_rows(&matrix), "ece": calibration.ece,
            "confusion": matrix, "study": study,
            "majority_baseline": majority(&truth, k),
        });
        ctx.log(&format!(
            "test accuracy {:.3}, macro-F1 {:.3}, mean AUC {}",
            metrics["accuracy"].as_f64().unwrap_or(0.0),
            metrics["macro_f1"].as_f64().unwrap_or(0.0),
            mean_auc.map_or("-".into(), |a| format!("{a:.3}"))
        ));
        Ok(metrics)
    }
}

/// 95% bootstrap intervals (over test images) of accuracy, macro-F1 and mean AUC.
fn bootstrap_cis(
    p: &Params,
    truth: &[usize],
    pred: &[usize],
    probs: &[Vec<f64>],
) -> (Option<Value>, Option<Value>, Option<Value>) {
    let k = probs.first().map_or(0, Vec::len);
    let pick = |idx: &[usize], v: &[usize]| -> Vec<usize> { idx.iter().map(|&i| v[i]).collect() };
    let onehot = |idx: &[usize]| -> Vec<Vec<bool>> {
        idx.iter()
            .map(|&i| (0..k).map(|c| c == truth[i]).collect())
            .collect()
    };
    let ci = |f: &dyn Fn(&[usize]) -> Option<f64>| {
        bootstrap_ci(truth.len(), p.bootstrap, p.seed, 0.05, f).map(|(lo, hi)| json!([lo, hi]))
    };
    let acc = ci(&|idx| Some(accuracy(&pick(idx, truth), &pick(idx, pred))));
    let f1 = ci(&|idx| Some(macro_f1(&pick(idx, truth), &pick(idx, pred), k)));
    let auc = ci(&|idx| {
        let sub: Vec<Vec<f64>> = idx.iter().map(|&i| probs[i].clone()).collect();
        roc_auc_per_class(&onehot(idx), &sub).1
    });
    (acc, f1, auc)
}

/// `predictions.csv`: one row per test image, its path relative to the data folder (so the file
/// means the same on another machine), label, prediction and class probabilities.
fn write_predictions(
    out_dir: &Path,
    set: &ImageSet,
    test: &[usize],
    classes: &[String],
    truth: &[usize],
    pred: &[usize],
    probs: &[Vec<f64>],
) -> Result<()> {
    let mut csv = csv::Writer::from_path(out_dir.join("predictions.csv"))?;
    let mut header = vec!["path".to_owned(), "label".into(), "prediction".into()];
    header.extend(classes.iter().map(|c| format!("p_{c}")));
    csv.write_record(&header)?;
    for (j, &i) in test.iter().enumerate() {
        let s = &set.dataset.samples[set.sample_of[i]];
        let path = s.path.strip_prefix(&set.dataset.root).unwrap_or(&s.path);
        let mut row = vec![
            path.display().to_string(),
            classes[truth[j]].clone(),
            classes[pred[j]].clone(),
        ];
        row.extend(probs[j].iter().map(|v| format!("{v:.6}")));
        csv.write_record(&row)?;
    }
    csv.flush()?;
    Ok(())
}

/// Study-level scores (MURA-style: the mean probability of the positive class over a study's
/// images), for binary tasks whose test rows all name a study or patient.
fn study_metrics(
    set: &ImageSet,
    test: &[usize],
    probs: &[Vec<f64>],
    truth: &[usize],
) -> Option<Value> {
    let groups: Option<Vec<&String>> = test
        .iter()
        .map(|&i| set.dataset.samples[set.sample_of[i]].group.as_ref())
        .collect();
    let groups = groups.filter(|_| probs.first().is_some_and(|r| r.len() == 2))?;
    let mut ids_map = std::collections::BTreeMap::new();
    let ids: Vec<i64> = groups
        .iter()
        .map(|g| {
            let n = ids_map.len() as i64;
            *ids_map.entry(*g).or_insert(n)
        })
        .collect();
    let p1: Vec<f64> = probs.iter().map(|r| r[1]).collect();
    let (_, _, sp, sl) = study_level(&ids, &p1, truth);
    let spred: Vec<usize> = sp.iter().map(|&v| (v >= 0.5) as usize).collect();
    let sb: Vec<bool> = sl.iter().map(|&l| l == 1).collect();
    Some(json!({
        "studies": sp.len(), "accuracy": accuracy(&sl, &spred),
        "kappa": cohen_kappa(&sl, &spred, 2), "auc": roc_auc(&sb, &sp),
    }))
}

/// `curves.json`: each class's ROC curve and the reliability diagram, which the report draws.
fn write_curves(
    out_dir: &Path,
    classes: &[String],
    truth: &[usize],
    probs: &[Vec<f64>],
    calibration: &Calibration,
) -> Result<()> {
    let roc: Vec<Vec<(f64, f64)>> = (0..classes.len())
        .map(|c| {
            let labels: Vec<bool> = truth.iter().map(|&t| t == c).collect();
            let scores: Vec<f64> = probs.iter().map(|r| r[c]).collect();
            roc_curve(&labels, &scores)
        })
        .collect();
    let curves = json!({ "classes": classes, "roc": roc, "calibration": calibration });
    std::fs::write(out_dir.join("curves.json"), serde_json::to_vec(&curves)?)?;
    Ok(())
}

/// Accuracy of always answering the most frequent test class.
fn majority(truth: &[usize], k: usize) -> f64 {
    let mut counts = vec![0usize; k];
    truth.iter().for_each(|&t| counts[t] += 1);
    *counts.iter().max().unwrap_or(&0) as f64 / truth.len().max(1) as f64
}

/// `acc 0.603 [0.52, 0.68]  F1 0.44  AUC 0.71 [0.64, 0.78]  majority 0.503` from an evaluate
/// stage's metrics.
fn headline(m: &Value) -> String {
    let num = |k: &str| m[k].as_f64();
    let ci = |k: &str| {
        m[k].as_array()
            .filter(|b| b.len() == 2)
            .map_or(String::new(), |b| {
                format!(
                    " [{:.2}, {:.2}]",
                    b[0].as_f64().unwrap_or(f64::NAN),
                    b[1].as_f64().unwrap_or(f64::NAN)
                )
            })
    };
    let mut parts = Vec::new();
    if let Some(a) = num("accuracy") {
        parts.push(format!("acc {a:.3}{}", ci("accuracy_ci95")));
    }
    if let Some(f) = num("macro_f1") {
        parts.push(format!("F1 {f:.3}"));
    }
    if let Some(a) = num("auc_mean") {
        parts.push(format!("AUC {a:.3}{}", ci("auc_mean_ci95")));
    }
    if let Some(b) = num("majority_baseline") {
        parts.push(format!("majority {b:.3}"));
    }
    parts.join("  ")
}
