//! The report's numbers: test results per route with confidence intervals over seeds, the
//! per-class table and confusion matrix, paired tests between routes on the same test images,
//! and the label-fraction series.

use super::gather::{metric_over, Leaf, Route};
use crate::train::metrics::{holm, mean_ci95, wilcoxon_signed_rank, ClassRow};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;

/// A metric over a route's seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub mean: f64,
    pub sd: f64,
    pub n: usize,
    /// 95% interval: of the mean over seeds (t distribution) with two seeds or more, else the
    /// one run's bootstrap interval over test images.
    pub ci: Option<(f64, f64)>,
}

impl Summary {
    pub fn of(leaves: &[&Leaf], key: &str, bootstrap_key: Option<&str>) -> Option<Summary> {
        let v = metric_over(leaves, &[key]);
        if v.is_empty() {
            return None;
        }
        let n = v.len();
        let mean = v.iter().sum::<f64>() / n as f64;
        let sd = if n > 1 {
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        let ci = match mean_ci95(&v) {
            Some((_, lo, hi)) => Some((lo, hi)),
            None => bootstrap_key.and_then(|k| {
                let b = leaves[0].metrics[k].as_array()?;
                Some((b.first()?.as_f64()?, b.get(1)?.as_f64()?))
            }),
        };
        Some(Summary { mean, sd, n, ci })
    }

    pub fn text(&self) -> String {
        let spread = if self.n > 1 {
            format!(" ± {:.3}", self.sd)
        } else {
            String::new()
        };
        let ci = self
            .ci
            .map_or(String::new(), |(lo, hi)| format!(" [{lo:.3}, {hi:.3}]"));
        format!("{:.3}{spread}{ci}", self.mean)
    }
}

/// One row of the test results table.
#[derive(Debug, Serialize)]
pub struct ResultRow {
    pub route: String,
    pub seeds: usize,
    pub label_fraction: f64,
    pub accuracy: Option<Summary>,
    pub macro_f1: Option<Summary>,
    pub auc: Option<Summary>,
    pub kappa: Option<Summary>,
    pub ece: Option<Summary>,
    pub majority: Option<f64>,
}

pub fn result_row(route: &Route) -> ResultRow {
    let l = &route.leaves;
    ResultRow {
        route: route.name.clone(),
        seeds: l.len(),
        label_fraction: label_fraction(l[0]),
        accuracy: Summary::of(l, "accuracy", Some("accuracy_ci95")),
        macro_f1: Summary::of(l, "macro_f1", Some("macro_f1_ci95")),
        auc: Summary::of(l, "auc_mean", Some("auc_mean_ci95")),
        kappa: Summary::of(l, "kappa", None),
        ece: Summary::of(l, "ece", None),
        majority: metric_over(l, &["majority_baseline"]).first().copied(),
    }
}

pub fn label_fraction(l: &Leaf) -> f64 {
    l.metrics["label_fraction"].as_f64().unwrap_or(1.0)
}

/// The per-class table of a route: each row's numbers averaged over its seeds.
#[derive(Debug, Serialize)]
pub struct ClassLine {
    pub class: String,
    pub support: f64,
    pub sensitivity: f64,
    pub specificity: f64,
    pub ppv: Option<f64>,
    pub f1: f64,
    pub auc: Option<f64>,
}

pub fn per_class(route: &Route) -> Vec<ClassLine> {
    let classes = class_names(route.leaves[0]);
    let rows: Vec<Vec<ClassRow>> = route
        .leaves
        .iter()
        .filter_map(|l| serde_json::from_value(l.metrics["per_class"].clone()).ok())
        .collect();
    if rows.is_empty() {
        return Vec::new();
    }
    let n = rows.len() as f64;
    let mean =
        |f: &dyn Fn(&ClassRow) -> f64, c: usize| rows.iter().map(|r| f(&r[c])).sum::<f64>() / n;
    classes
        .iter()
        .enumerate()
        .filter(|(c, _)| rows.iter().all(|r| r.len() > *c))
        .map(|(c, name)| {
            let ppv: Vec<f64> = rows.iter().filter_map(|r| r[c].ppv).collect();
            let auc: Vec<f64> = route
                .leaves
                .iter()
                .filter_map(|l| l.metrics["auc_per_class"][c].as_f64())
                .collect();
            ClassLine {
                class: name.clone(),
                support: mean(&|r| r.support as f64, c),
                sensitivity: mean(&|r| r.sensitivity, c),
                specificity: mean(&|r| r.specificity, c),
                ppv: (!ppv.is_empty()).then(|| ppv.iter().sum::<f64>() / ppv.len() as f64),
                f1: mean(&|r| r.f1, c),
                auc: (!auc.is_empty()).then(|| auc.iter().sum::<f64>() / auc.len() as f64),
            }
        })
        .collect()
}

pub fn class_names(l: &Leaf) -> Vec<String> {
    l.metrics["classes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The confusion matrix summed over a route's seeds (rows: true class, columns: predicted).
pub fn confusion(route: &Route) -> Vec<Vec<u64>> {
    let mut sum: Vec<Vec<u64>> = Vec::new();
    for l in &route.leaves {
        let Ok(m) = serde_json::from_value::<Vec<Vec<u64>>>(l.metrics["confusion"].clone()) else {
            continue;
        };
        if sum.is_empty() {
            sum = m;
        } else if sum.len() == m.len() {
            for (a, b) in sum.iter_mut().zip(m) {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
            }
        }
    }
    sum
}

/// A paired test of two routes on the same test images.
#[derive(Debug, Serialize)]
pub struct PairedRow {
    pub statistic: String,
    pub a: String,
    pub b: String,
    pub images: usize,
    /// Mean over images of A - B (for correctness: the difference in accuracy).
    pub mean_difference: f64,
    pub median_difference: f64,
    pub z: f64,
    pub p: f64,
    pub p_holm: f64,
}

/// Per test image, a column of each leaf's CSV `file`, averaged over the route's seeds.
fn per_image(
    leaves: &[&Leaf],
    file: &str,
    value: &dyn Fn(&csv::StringRecord, &csv::StringRecord) -> Option<f64>,
) -> Result<BTreeMap<String, f64>> {
    let mut sum: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for l in leaves {
        let path = l.dir.join(file);
        let mut r =
            csv::Reader::from_path(&path).with_context(|| format!("reading {}", path.display()))?;
        let header = r.headers()?.clone();
        for row in r.records() {
            let row = row?;
            if let (Some(image), Some(v)) = (row.get(0), value(&header, &row)) {
                let e = sum.entry(image.to_owned()).or_default();
                e.0 += v;
                e.1 += 1;
            }
        }
    }
    Ok(sum
        .into_iter()
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect())
}

fn column(name: &'static str) -> impl Fn(&csv::StringRecord, &csv::StringRecord) -> Option<f64> {
    move |header, row| {
        let c = header.iter().position(|h| h == name)?;
        row.get(c)?.parse().ok()
    }
}

/// 1 when the image was classified right, 0 when wrong (from `predictions.csv`).
fn correct(header: &csv::StringRecord, row: &csv::StringRecord) -> Option<f64> {
    let at = |n: &str| header.iter().position(|h| h == n).and_then(|c| row.get(c));
    Some((at("label")? == at("prediction")?) as u8 as f64)
}

/// A statistic compared between routes: (label, file, its value from the header and a row).
pub type PairedStatistic<'a> = (
    &'a str,
    &'a str,
    &'a dyn Fn(&csv::StringRecord, &csv::StringRecord) -> Option<f64>,
);

/// Every pair of routes trained on the same fraction of the labels, per statistic: the Wilcoxon
/// signed-rank test over the test images both routes scored, each image's value averaged over
/// the route's seeds, Holm-adjusted per statistic. Routes at different label fractions are not
/// paired: that more labels help is not the question, and each such pair would make the Holm
/// correction of the real comparisons stricter. `statistics`: (label, file, value of a row).
pub fn paired(routes: &[&Route], statistics: &[PairedStatistic]) -> Result<Vec<PairedRow>> {
    let mut rows = Vec::new();
    for (label, file, value) in statistics {
        let means: Vec<(String, f64, BTreeMap<String, f64>)> = routes
            .iter()
            .map(|r| {
                let fraction = label_fraction(r.leaves[0]);
                Ok((
                    r.name.clone(),
                    fraction,
                    per_image(&r.leaves, file, *value)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(|(_, _, m)| !m.is_empty())
            .collect();
        let mut found = Vec::new();
        for a in 0..means.len() {
            for b in a + 1..means.len() {
                if means[a].1 != means[b].1 {
                    continue;
                }
                let diffs: Vec<f64> = means[a]
                    .2
                    .iter()
                    .filter_map(|(img, va)| means[b].2.get(img).map(|vb| va - vb))
                    .collect();
                if let Some(w) = wilcoxon_signed_rank(&diffs) {
                    let mut sorted = diffs.clone();
                    sorted.sort_by(f64::total_cmp);
                    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
                    found.push((a, b, diffs.len(), mean, sorted[sorted.len() / 2], w));
                }
            }
        }
        let adjusted = holm(&found.iter().map(|f| f.5.p).collect::<Vec<_>>());
        for ((a, b, n, mean, median, w), p_holm) in found.into_iter().zip(adjusted) {
            rows.push(PairedRow {
                statistic: label.to_string(),
                a: means[a].0.clone(),
                b: means[b].0.clone(),
                images: n,
                mean_difference: mean,
                median_difference: median,
                z: w.z,
                p: w.p,
                p_holm,
            });
        }
    }
    Ok(rows)
}

/// Paired tests of the evaluate routes: per-image correctness.
pub fn paired_accuracy(routes: &[&Route]) -> Result<Vec<PairedRow>> {
    paired(
        routes,
        &[("correct (accuracy)", "predictions.csv", &correct)],
    )
}

/// Paired tests of the gradcam routes: centre energy and deletion AUC per image.
pub fn paired_maps(routes: &[&Route]) -> Result<Vec<PairedRow>> {
    let centre = column("center_energy");
    let deletion = column("deletion_auc");
    paired(
        routes,
        &[
            ("centre energy", "maps.csv", &centre),
            ("deletion AUC", "maps.csv", &deletion),
        ],
    )
}

/// A route family's points along the label-fraction axis: the route name with its fraction
/// dropped, and per fraction the accuracy and AUC summaries.
#[derive(Debug, Serialize)]
pub struct FractionSeries {
    pub family: String,
    pub points: Vec<(f64, Summary, Option<Summary>)>,
}

/// Routes whose names differ only in a `labels<fraction>` matrix token, with two fractions or
/// more: the standard figure of semi-supervised studies.
pub fn label_fractions(routes: &[&Route]) -> Vec<FractionSeries> {
    let mut families: BTreeMap<String, Vec<&Route>> = BTreeMap::new();
    for r in routes {
        let (head, tail) = r.name.split_once('@').unwrap_or((&r.name, ""));
        let rest: Vec<&str> = tail
            .split('-')
            .filter(|t| !t.is_empty() && !t.starts_with("labels"))
            .collect();
        let family = if rest.is_empty() {
            head.to_owned()
        } else {
            format!("{head}@{}", rest.join("-"))
        };
        families.entry(family).or_default().push(r);
    }
    families
        .into_iter()
        .filter_map(|(family, rs)| {
            let mut points: Vec<(f64, Summary, Option<Summary>)> = rs
                .iter()
                .filter_map(|r| {
                    let acc = Summary::of(&r.leaves, "accuracy", Some("accuracy_ci95"))?;
                    let auc = Summary::of(&r.leaves, "auc_mean", Some("auc_mean_ci95"));
                    Some((label_fraction(r.leaves[0]), acc, auc))
                })
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            points.dedup_by(|a, b| a.0 == b.0);
            (points.len() >= 2).then_some(FractionSeries { family, points })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::report::gather::RunFacts;
    use std::path::Path;

    /// An evaluation leaf at `fraction` whose predictions are right on the images `right`.
    fn leaf(dir: &Path, stage: &str, fraction: f64, right: &[bool]) -> Leaf {
        let dir = dir.join(stage);
        std::fs::create_dir_all(&dir).unwrap();
        let mut csv = String::from("path,label,prediction\n");
        for (i, ok) in right.iter().enumerate() {
            csv += &format!("img{i}.png,a,{}\n", if *ok { "a" } else { "b" });
        }
        std::fs::write(dir.join("predictions.csv"), csv).unwrap();
        Leaf {
            stage: stage.into(),
            kind: "evaluate".into(),
            key: stage.into(),
            dir,
            metrics: serde_json::json!({ "label_fraction": fraction }),
            params: serde_json::Value::Null,
            inputs: serde_json::Value::Null,
            run: RunFacts {
                wall_s: 0.0,
                peak_rss_kib: None,
                device: "cpu".into(),
                host: "h".into(),
                pretext_version: "0".into(),
                pretext_commit: String::new(),
                invocation: vec![],
                started_at_unix: 0,
            },
        }
    }

    #[test]
    fn paired_tests_compare_routes_only_at_the_same_label_fraction() {
        let tmp = tempfile::tempdir().unwrap();
        let right: Vec<bool> = (0..30).map(|i| i % 3 != 0).collect();
        let wrong: Vec<bool> = (0..30).map(|i| i % 2 == 0).collect();
        let leaves = [
            leaf(tmp.path(), "a@labels0.1", 0.1, &right),
            leaf(tmp.path(), "b@labels0.1", 0.1, &wrong),
            leaf(tmp.path(), "a@labels1.0", 1.0, &right),
            leaf(tmp.path(), "b@labels1.0", 1.0, &wrong),
        ];
        let routes: Vec<Route> = leaves
            .iter()
            .map(|l| Route {
                name: l.stage.clone(),
                kind: l.kind.clone(),
                leaves: vec![l],
            })
            .collect();
        let refs: Vec<&Route> = routes.iter().collect();
        let rows = paired_accuracy(&refs).unwrap();
        let pairs: Vec<(&str, &str)> = rows.iter().map(|r| (r.a.as_str(), r.b.as_str())).collect();
        assert_eq!(
            pairs,
            [
                ("a@labels0.1", "b@labels0.1"),
                ("a@labels1.0", "b@labels1.0")
            ]
        );
    }
}
