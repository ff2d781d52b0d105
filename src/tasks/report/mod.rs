//! `kind: report`: gathers the stages of a pipeline or matrix into one results table (Markdown,
//! CSV) and one self-contained HTML page (a minijinja template, `page.html`, with plotters SVG
//! figures): test results with intervals over seeds, paired tests between routes, the
//! label-fraction figure, per evaluation a confusion matrix, per-class table, ROC curves and a
//! reliability diagram, training curves, Grad-CAM statistics and a gallery, and the provenance
//! of every stage.
//!
//! It reads each input's `manifest.json` and the files the kinds document (`predictions.csv`,
//! `curves.json`, `maps.csv`, `gallery.csv`, pictures), and copies the pictures it shows next
//! to the page.

mod charts;
mod gather;
mod tables;

use crate::stage::{InputSlot, Inputs, OutputSlot, StageCtx, Task};
use anyhow::{Context, Result};
use charts::{Axes, Series};
use gather::{floats, metric_over, Leaf, Route};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;
use tables::{ResultRow, Summary};

pub struct Report;

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The report's title.
    #[serde(default = "d_title")]
    pub title: String,
}

fn d_title() -> String {
    "pretext results".into()
}

impl Task for Report {
    const KIND: &'static str = "report";
    const VERSION: u32 = 4;
    const SUMMARY: &'static str =
        "one table and one HTML page over the results of many stages, spread over seeds";
    type Params = Params;

    const HEADLINE: Option<crate::stage::Headline> =
        Some(|_, entry_dir| format!("page {}", entry_dir.join("index.html").display()));

    fn inputs(_: &Params) -> Option<Vec<InputSlot>> {
        Some(vec![InputSlot {
            name: "results",
            required: true,
            many: true,
            doc:
                "whole stages to gather (`evaluate@*`, `gradcam@*`, `finetune@*`, `chest_mae`, ...)",
        }])
    }

    fn outputs(_: &Params) -> Vec<OutputSlot> {
        vec![
            OutputSlot {
                name: "html",
                path: "index.html",
                doc: "the report page",
            },
            OutputSlot {
                name: "table",
                path: "results.md",
                doc: "the results table in Markdown (results.csv beside it)",
            },
        ]
    }

    fn run(p: &Params, inputs: &Inputs, ctx: &mut StageCtx) -> Result<Value> {
        let leaves: Vec<Leaf> = inputs
            .items("results")
            .iter()
            .map(|item| {
                // Named as this pipeline names it, not as the run that computed it did.
                let mut leaf = gather::read(&item.path)?;
                if let Some(name) = &item.stage {
                    leaf.stage.clone_from(name);
                }
                Ok(leaf)
            })
            .collect::<Result<_>>()?;
        let routes = gather::routes(&leaves);
        let of_kind = |k: &str| routes.iter().filter(|r| r.kind == k).collect::<Vec<_>>();
        let (evaluations, cams) = (of_kind("evaluate"), of_kind("gradcam"));
        let pictures = ctx.out_dir.join("img");
        std::fs::create_dir_all(&pictures)?;

        let results: Vec<ResultRow> = evaluations.iter().map(|r| tables::result_row(r)).collect();
        write_results_csv(&ctx.out_dir.join("results.csv"), &results)?;
        let page = Page {
            title: p.title.clone(),
            generated: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            pretext: format!("{} ({})", env!("CARGO_PKG_VERSION"), env!("PRETEXT_COMMIT")),
            results: results.iter().map(ResultCells::of).collect(),
            paired_accuracy: tables::paired_accuracy(&evaluations)?,
            fraction_svgs: fraction_figures(&evaluations),
            evaluations: evaluations
                .iter()
                .map(|r| evaluation_view(r))
                .collect::<Result<_>>()?,
            training: training_figures(&routes),
            cam_rows: cams.iter().map(|r| cam_row(r)).collect(),
            paired_maps: tables::paired_maps(&cams)?,
            box_rows: cams.iter().filter_map(|r| box_row(r)).collect(),
            galleries: cams
                .iter()
                .filter_map(|r| gallery(r, &pictures).transpose())
                .collect::<Result<_>>()?,
            colour_bar: charts::colour_bar(&crate::tasks::gradcam::colour_stops(11)),
            pretraining: pretraining_figures(&leaves),
            reconstructions: reconstructions(&leaves, &pictures)?,
            provenance: leaves.iter().map(|l| provenance(l, &ctx.out_dir)).collect(),
        };
        let mut env = minijinja::Environment::new();
        env.add_template("page.html", include_str!("page.html"))?;
        env.add_template("results.md", include_str!("results.md"))?;
        for name in ["page.html", "results.md"] {
            let text = env.get_template(name)?.render(&page)?;
            let file = if name == "page.html" {
                "index.html"
            } else {
                name
            };
            std::fs::write(ctx.out_dir.join(file), text)?;
        }
        ctx.log(&format!(
            "report: {}",
            ctx.out_dir.join("index.html").display()
        ));
        Ok(json!({ "stages": leaves.len(), "routes": evaluations.len() }))
    }
}

/// What the template renders (`page.html`).
#[derive(Serialize)]
struct Page {
    title: String,
    generated: String,
    pretext: String,
    results: Vec<ResultCells>,
    paired_accuracy: Vec<tables::PairedRow>,
    fraction_svgs: Vec<String>,
    evaluations: Vec<EvaluationView>,
    training: Vec<String>,
    cam_rows: Vec<Vec<String>>,
    paired_maps: Vec<tables::PairedRow>,
    box_rows: Vec<Vec<String>>,
    galleries: Vec<GalleryView>,
    colour_bar: String,
    pretraining: Vec<String>,
    reconstructions: Vec<Picture>,
    provenance: Vec<ProvenanceRow>,
}

#[derive(Serialize)]
struct ResultCells {
    route: String,
    seeds: usize,
    label_fraction: f64,
    accuracy: String,
    macro_f1: String,
    auc: String,
    kappa: String,
    ece: String,
    majority: String,
}

fn text(s: &Option<Summary>) -> String {
    s.as_ref().map_or("-".into(), Summary::text)
}

impl ResultCells {
    fn of(r: &ResultRow) -> ResultCells {
        ResultCells {
            route: r.route.clone(),
            seeds: r.seeds,
            label_fraction: r.label_fraction,
            accuracy: text(&r.accuracy),
            macro_f1: text(&r.macro_f1),
            auc: text(&r.auc),
            kappa: text(&r.kappa),
            ece: text(&r.ece),
            majority: r.majority.map_or("-".into(), |m| format!("{m:.3}")),
        }
    }
}

fn write_results_csv(path: &Path, rows: &[ResultRow]) -> Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record([
        "route",
        "seeds",
        "label_fraction",
        "accuracy_mean",
        "accuracy_sd",
        "accuracy_ci_low",
        "accuracy_ci_high",
        "macro_f1_mean",
        "macro_f1_sd",
        "auc_mean",
        "auc_sd",
        "kappa_mean",
        "ece_mean",
        "majority_baseline",
    ])?;
    let num = |s: &Option<Summary>, f: &dyn Fn(&Summary) -> Option<f64>| {
        s.as_ref()
            .and_then(f)
            .map_or(String::new(), |v| format!("{v:.4}"))
    };
    for r in rows {
        w.write_record([
            r.route.clone(),
            r.seeds.to_string(),
            r.label_fraction.to_string(),
            num(&r.accuracy, &|s| Some(s.mean)),
            num(&r.accuracy, &|s| Some(s.sd)),
            num(&r.accuracy, &|s| s.ci.map(|c| c.0)),
            num(&r.accuracy, &|s| s.ci.map(|c| c.1)),
            num(&r.macro_f1, &|s| Some(s.mean)),
            num(&r.macro_f1, &|s| Some(s.sd)),
            num(&r.auc, &|s| Some(s.mean)),
            num(&r.auc, &|s| Some(s.sd)),
            num(&r.kappa, &|s| Some(s.mean)),
            num(&r.ece, &|s| Some(s.mean)),
            r.majority.map_or(String::new(), |m| format!("{m:.4}")),
        ])?;
    }
    w.flush()?;
    Ok(())
}

/// Accuracy and AUC against the label fraction, one line per route family.
fn fraction_figures(evaluations: &[&Route]) -> Vec<String> {
    let families = tables::label_fractions(evaluations);
    if families.is_empty() {
        return Vec::new();
    }
    type Point = (f64, Summary, Option<Summary>);
    let series = |pick: &dyn Fn(&Point) -> Option<Summary>| {
        families
            .iter()
            .map(|f| {
                let pts: Vec<(f64, Summary)> = f
                    .points
                    .iter()
                    .filter_map(|p| Some((p.0, pick(p)?)))
                    .collect();
                Series {
                    name: f.family.clone(),
                    points: pts.iter().map(|(x, s)| (*x, s.mean)).collect(),
                    band: pts
                        .iter()
                        .filter_map(|(x, s)| s.ci.map(|(lo, hi)| (*x, lo, hi)))
                        .collect(),
                    marks: pts.iter().map(|(x, s)| (*x, s.mean)).collect(),
                    dashed: false,
                }
            })
            .collect::<Vec<_>>()
    };
    let axes = |title, y| Axes {
        title,
        x: "share of the training labels used",
        y,
        x_range: Some((0.0, 1.05)),
        y_range: None,
    };
    vec![
        charts::lines(
            &axes("test accuracy against label fraction", "test accuracy"),
            &series(&|p| Some(p.1.clone())),
        ),
        charts::lines(
            &axes("test AUC against label fraction", "mean one-vs-rest AUC"),
            &series(&|p| p.2.clone()),
        ),
    ]
}

#[derive(Serialize)]
struct EvaluationView {
    route: String,
    seeds: usize,
    first_stage: String,
    classes: Vec<String>,
    confusion: Vec<ConfusionRow>,
    per_class: Vec<tables::ClassLine>,
    roc: String,
    reliability: String,
    ece: String,
}

#[derive(Serialize)]
struct ConfusionRow {
    class: String,
    cells: Vec<ConfusionCell>,
}

#[derive(Serialize)]
struct ConfusionCell {
    count: u64,
    /// Share of the row, for the cell's shading.
    shade: String,
}

#[derive(Deserialize)]
struct Curves {
    roc: Vec<Vec<(f64, f64)>>,
    calibration: crate::train::metrics::Calibration,
}

fn evaluation_view(route: &Route) -> Result<EvaluationView> {
    let first = route.leaves[0];
    let classes = tables::class_names(first);
    let matrix = tables::confusion(route);
    let confusion = matrix
        .iter()
        .zip(&classes)
        .map(|(row, class)| {
            let total = row.iter().sum::<u64>().max(1) as f64;
            ConfusionRow {
                class: class.clone(),
                cells: row
                    .iter()
                    .map(|&count| ConfusionCell {
                        count,
                        shade: format!("{:.2}", 0.85 * count as f64 / total),
                    })
                    .collect(),
            }
        })
        .collect();
    let curves: Vec<Curves> = route
        .leaves
        .iter()
        .filter_map(|l| {
            let text = std::fs::read_to_string(l.dir.join("curves.json")).ok()?;
            serde_json::from_str(&text).ok()
        })
        .collect();
    let roc = match curves.first() {
        Some(c) => charts::roc(
            "ROC, one class against the rest",
            &classes
                .iter()
                .cloned()
                .zip(c.roc.iter().cloned())
                .collect::<Vec<_>>(),
        ),
        None => String::new(),
    };
    // The seeds' bins pooled: each seed's (confidence, accuracy, count) weighs by its count.
    let mut pooled: Vec<(f64, f64, usize)> = vec![(0.0, 0.0, 0); 10];
    for c in &curves {
        for &(conf, acc, n) in &c.calibration.bins {
            let b = ((conf * 10.0) as usize).min(9);
            pooled[b].0 += conf * n as f64;
            pooled[b].1 += acc * n as f64;
            pooled[b].2 += n;
        }
    }
    let bins: Vec<(f64, f64, usize)> = pooled
        .into_iter()
        .filter(|b| b.2 > 0)
        .map(|(c, a, n)| (c / n as f64, a / n as f64, n))
        .collect();
    let ece = metric_over(&route.leaves, &["ece"]);
    Ok(EvaluationView {
        route: route.name.clone(),
        seeds: route.leaves.len(),
        first_stage: first.stage.clone(),
        classes,
        confusion,
        per_class: tables::per_class(route),
        roc,
        reliability: charts::reliability("reliability", &bins),
        ece: if ece.is_empty() {
            "-".into()
        } else {
            format!("{:.3}", ece.iter().sum::<f64>() / ece.len() as f64)
        },
    })
}

/// Per fine-tune route: losses (train and validation) and validation accuracy by epoch, mean
/// and range over seeds, each seed's chosen epoch marked.
fn training_figures(routes: &[Route]) -> Vec<String> {
    let mut out = Vec::new();
    for r in routes.iter().filter(|r| r.kind == "finetune") {
        let band = |key: &str, name: &str| -> Series {
            let runs: Vec<Vec<f64>> = r.leaves.iter().map(|l| floats(&l.metrics[key])).collect();
            let epochs = runs.iter().map(Vec::len).max().unwrap_or(0);
            let mut s = Series {
                name: name.into(),
                ..Default::default()
            };
            for e in 0..epochs {
                let v: Vec<f64> = runs
                    .iter()
                    .filter_map(|run| run.get(e).copied())
                    .filter(|x| x.is_finite())
                    .collect();
                if v.is_empty() {
                    continue;
                }
                let mean = v.iter().sum::<f64>() / v.len() as f64;
                let (lo, hi) = v
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
                s.points.push(((e + 1) as f64, mean));
                if r.leaves.len() > 1 {
                    s.band.push(((e + 1) as f64, lo, hi));
                }
            }
            s
        };
        let mut val_acc = band("val_accuracy", "validation accuracy");
        val_acc.marks = r
            .leaves
            .iter()
            .filter_map(|l| {
                let best = l.metrics["best_epoch"].as_u64()? as usize;
                let acc = floats(&l.metrics["val_accuracy"]);
                Some((best as f64, *acc.get(best.checked_sub(1)?)?))
            })
            .collect();
        let n = r.leaves.len();
        let title = format!("{} ({n} seed{})", r.name, if n == 1 { "" } else { "s" });
        out.push(charts::lines(
            &Axes {
                title: &format!("{title}: loss"),
                x: "epoch",
                y: "cross-entropy",
                x_range: None,
                y_range: None,
            },
            &[
                band("train_loss", "training loss"),
                band("val_loss", "validation loss"),
            ],
        ));
        out.push(charts::lines(
            &Axes {
                title: &format!("{title}: validation"),
                x: "epoch",
                y: "validation accuracy",
                x_range: None,
                y_range: None,
            },
            &[val_acc],
        ));
    }
    out
}

/// The pretraining losses by epoch (MAE, proxy tasks), one line per stage.
fn pretraining_figures(leaves: &[Leaf]) -> Vec<String> {
    ["mae", "proxy"]
        .iter()
        .filter_map(|kind| {
            let series: Vec<Series> = leaves
                .iter()
                .filter(|l| l.kind == *kind)
                .map(|l| Series {
                    name: l.stage.clone(),
                    points: floats(&l.metrics["loss"])
                        .into_iter()
                        .enumerate()
                        .map(|(e, v)| ((e + 1) as f64, v))
                        .collect(),
                    ..Default::default()
                })
                .filter(|s| !s.points.is_empty())
                .collect();
            let svg = charts::lines(
                &Axes {
                    title: &format!("{kind} training loss"),
                    x: "epoch",
                    y: "loss",
                    x_range: None,
                    y_range: None,
                },
                &series,
            );
            (!svg.is_empty()).then_some(svg)
        })
        .collect()
}

fn cam_row(route: &Route) -> Vec<String> {
    let g = |path: &[&str]| summary_text(&metric_over(&route.leaves, path));
    let pair = |model: &[&str], base: &[&str]| format!("{} ({})", g(model), g(base));
    vec![
        route.name.clone(),
        metric_over(&route.leaves, &["images"])
            .first()
            .map_or("-".into(), |v| v.to_string()),
        g(&["model", "center_energy", "mean"]),
        g(&["model", "com_distance", "mean"]),
        g(&["model", "entropy", "mean"]),
        g(&["random_baseline", "center_energy", "mean"]),
        pair(
            &["faithfulness", "model", "deletion_auc", "mean"],
            &["faithfulness", "random_baseline", "deletion_auc", "mean"],
        ),
        pair(
            &["faithfulness", "model", "insertion_auc", "mean"],
            &["faithfulness", "random_baseline", "insertion_auc", "mean"],
        ),
    ]
}

fn summary_text(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    if v.len() == 1 {
        return format!("{m:.3}");
    }
    let sd = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    format!("{m:.3} ± {sd:.3}")
}

fn box_row(route: &Route) -> Option<Vec<String>> {
    let with: Vec<&Leaf> = route
        .leaves
        .iter()
        .copied()
        .filter(|l| l.metrics["boxes"].is_object())
        .collect();
    if with.is_empty() {
        return None;
    }
    let g = |path: &[&str]| {
        let full: Vec<&str> = std::iter::once("boxes")
            .chain(path.iter().copied())
            .collect();
        summary_text(&metric_over(&with, &full))
    };
    let pair = |m: &[&str], b: &[&str]| format!("{} ({})", g(m), g(b));
    Some(vec![
        route.name.clone(),
        with[0].metrics["boxes"]["boxes"].to_string(),
        pair(
            &["model", "pointing_game"],
            &["random_baseline", "pointing_game"],
        ),
        pair(
            &["model", "iou", "mean"],
            &["random_baseline", "iou", "mean"],
        ),
        pair(
            &["model", "energy_in_box", "mean"],
            &["random_baseline", "energy_in_box", "mean"],
        ),
    ])
}

#[derive(Serialize)]
struct GalleryView {
    stage: String,
    tiles: Vec<TileView>,
}

#[derive(Serialize)]
struct TileView {
    src: String,
    path: String,
    label: String,
    prediction: String,
    probability: String,
    correct: bool,
}

/// The first seed's gallery of a gradcam route, its tiles copied beside the page.
fn gallery(route: &Route, pictures: &Path) -> Result<Option<GalleryView>> {
    let leaf = route.leaves[0];
    let list = leaf.dir.join("gallery.csv");
    if !list.is_file() {
        return Ok(None);
    }
    let mut r = csv::Reader::from_path(&list)?;
    let mut tiles = Vec::new();
    for row in r.deserialize::<(String, String, String, String, String, bool)>() {
        let (file, path, label, prediction, probability, correct) = row?;
        let name = format!("{}-{}", &leaf.key[..12], file.replace('/', "-"));
        std::fs::copy(leaf.dir.join(&file), pictures.join(&name))
            .with_context(|| format!("copying {}", leaf.dir.join(&file).display()))?;
        tiles.push(TileView {
            src: format!("img/{name}"),
            path,
            label,
            prediction,
            probability,
            correct,
        });
    }
    Ok(Some(GalleryView {
        stage: leaf.stage.clone(),
        tiles,
    }))
}

#[derive(Serialize)]
struct Picture {
    stage: String,
    src: String,
}

fn reconstructions(leaves: &[Leaf], pictures: &Path) -> Result<Vec<Picture>> {
    let mut out = Vec::new();
    for l in leaves {
        let src = l.dir.join("reconstructions.png");
        if src.is_file() {
            let name = format!("{}-reconstructions.png", &l.key[..12]);
            std::fs::copy(&src, pictures.join(&name))?;
            out.push(Picture {
                stage: l.stage.clone(),
                src: format!("img/{name}"),
            });
        }
    }
    Ok(out)
}

#[derive(Serialize)]
struct ProvenanceRow {
    stage: String,
    kind: String,
    key: String,
    link: String,
    params: String,
    inputs: String,
    date: String,
    wall: String,
    memory: String,
    device: String,
    version: String,
    invocation: String,
}

fn provenance(l: &Leaf, page_dir: &Path) -> ProvenanceRow {
    // Params that differ from the kind's defaults (all of them for kinds with required params).
    let defaults = super::catalog()
        .get(&l.kind)
        .and_then(|e| (e.normalize)(json!({})).ok());
    let changed: Vec<String> = l
        .params
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| defaults.as_ref().is_none_or(|d| d.get(*k) != Some(*v)))
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let inputs: Vec<String> = l
        .inputs
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(slot, items)| {
            items.as_array().into_iter().flatten().map(move |i| {
                let what = match (i["key"].as_str(), i["fingerprint"].as_str()) {
                    (Some(k), _) => format!("entry {}", &k[..k.len().min(12)]),
                    (_, Some(f)) => format!("data {}", &f[..f.len().min(12)]),
                    _ => "?".into(),
                };
                format!("{slot} <- {what}")
            })
        })
        .collect();
    let r = &l.run;
    ProvenanceRow {
        stage: l.stage.clone(),
        kind: l.kind.clone(),
        key: l.key[..l.key.len().min(12)].to_owned(),
        link: gather::relative(page_dir, &l.dir),
        params: if changed.is_empty() {
            "(defaults)".into()
        } else {
            changed.join(", ")
        },
        inputs: inputs.join("; "),
        date: chrono::DateTime::from_timestamp(r.started_at_unix as i64, 0)
            .map_or("?".into(), |d| d.format("%Y-%m-%d %H:%M UTC").to_string()),
        wall: format!("{:.1} s", r.wall_s),
        memory: r
            .peak_rss_kib
            .map_or("-".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0)),
        device: format!("{} on {}", r.device, r.host),
        version: if r.pretext_commit.is_empty() {
            r.pretext_version.clone()
        } else {
            format!("{} ({})", r.pretext_version, r.pretext_commit)
        },
        invocation: r.invocation.join(" "),
    }
}
