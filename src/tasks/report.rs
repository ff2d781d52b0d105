//! `kind: report`: gathers the leaves of a pipeline or matrix into one results table (Markdown,
//! CSV) and one self-contained HTML page: the table with mean +- spread over seeds and bootstrap
//! CIs, loss and validation curves, MAE reconstructions and Grad-CAM galleries per route.
//!
//! It reads each input's `manifest.json` (documented at `cache::store::Manifest`) for the stage's
//! name, kind and metrics, and copies the pictures it shows next to the page.

use super::{InputSlot, Inputs, OutputSlot, StageCtx, Task};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;

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

struct Leaf {
    stage: String,
    kind: String,
    metrics: Value,
    dir: std::path::PathBuf,
}

/// `evaluate@vit-chest_mae-seed1` -> `evaluate@vit-chest_mae`: runs that differ only by seed.
pub fn route_of(stage: &str) -> String {
    let (head, tail) = stage.split_once('@').unwrap_or((stage, ""));
    let parts: Vec<&str> = tail
        .split('-')
        .filter(|p| !(p.starts_with("seed") && p[4..].chars().all(|c| c.is_ascii_digit())))
        .collect();
    let route = parts.join("-");
    if route.is_empty() {
        head.to_owned()
    } else {
        format!("{head}@{route}")
    }
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, sd)
}

fn fmt_ms(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (m, sd) = mean_sd(v);
    if v.len() > 1 {
        format!("{m:.3} ± {sd:.3}")
    } else {
        format!("{m:.3}")
    }
}

fn ci_text(leaves: &[&Leaf], key: &str) -> String {
    let cis: Vec<(f64, f64)> = leaves
        .iter()
        .filter_map(|l| {
            l.metrics[key]
                .as_array()
                .and_then(|a| Some((a.first()?.as_f64()?, a.get(1)?.as_f64()?)))
        })
        .collect();
    if cis.is_empty() {
        return "-".into();
    }
    let lo = cis.iter().map(|c| c.0).sum::<f64>() / cis.len() as f64;
    let hi = cis.iter().map(|c| c.1).sum::<f64>() / cis.len() as f64;
    format!("[{lo:.3}, {hi:.3}]")
}

fn svg_lines(title: &str, series: &[(String, Vec<f64>)]) -> String {
    let (w, h, pad) = (420.0, 220.0, 34.0);
    let all: Vec<f64> = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    if all.is_empty() {
        return String::new();
    }
    let (lo, hi) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let span = (hi - lo).max(1e-9);
    let len = series
        .iter()
        .map(|(_, v)| v.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let colors = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
    ];
    let mut s = format!("<figure><svg width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\"><rect width=\"100%\" height=\"100%\" fill=\"#fff\" stroke=\"#ccc\"/>");
    write!(s, "<text x=\"{pad}\" y=\"14\" font-size=\"12\">{title}</text><text x=\"2\" y=\"{}\" font-size=\"10\">{lo:.3}</text><text x=\"2\" y=\"28\" font-size=\"10\">{hi:.3}</text>", h - pad).ok();
    for (k, (name, v)) in series.iter().enumerate() {
        let pts: Vec<String> = v
            .iter()
            .enumerate()
            .filter(|(_, y)| y.is_finite())
            .map(|(i, y)| {
                format!(
                    "{:.1},{:.1}",
                    pad + (w - 2.0 * pad) * i as f64 / (len - 1) as f64,
                    h - pad - (h - 2.0 * pad) * (y - lo) / span
                )
            })
            .collect();
        let c = colors[k % colors.len()];
        write!(s, "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/><text x=\"{}\" y=\"{}\" font-size=\"10\" fill=\"{c}\">{}</text>", pts.join(" "), pad + 4.0, h - 8.0 - 11.0 * (series.len() - 1 - k) as f64, html_escape(name)).ok();
    }
    s.push_str("</svg></figure>");
    s
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect())
        .unwrap_or_default()
}

impl Task for Report {
    const KIND: &'static str = "report";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "one table and one HTML page over the results of many stages, spread over seeds";
    type Params = Params;

    fn inputs(_: &Params) -> Option<Vec<InputSlot>> {
        Some(vec![InputSlot {
            name: "results",
            required: true,
            many: true,
            doc: "whole stages to gather (`evaluate@*`, `gradcam@*`, `chest_mae`, ...)",
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
                doc: "the results table in Markdown",
            },
        ]
    }

    fn run(p: &Params, inputs: &Inputs, ctx: &mut StageCtx) -> Result<Value> {
        let mut leaves = Vec::new();
        for item in inputs.items("results") {
            let path = item.path.join("manifest.json");
            let m: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "{}: inputs of a report must be whole stages",
                        path.display()
                    )
                })?)?;
            leaves.push(Leaf {
                stage: m["stage"].as_str().unwrap_or("?").to_owned(),
                kind: m["kind"].as_str().unwrap_or("?").to_owned(),
                metrics: m["metrics"].clone(),
                dir: item.path.clone(),
            });
        }
        let mut groups: BTreeMap<(String, String), Vec<&Leaf>> = BTreeMap::new();
        for l in &leaves {
            groups
                .entry((l.kind.clone(), route_of(&l.stage)))
                .or_default()
                .push(l);
        }
        let f = |ls: &[&Leaf], key: &str| metric_over(ls, &[key]);

        let mut md = format!("# {}\n\n", p.title);
        let mut csv = String::from("route,seeds,accuracy_mean,accuracy_sd,macro_f1_mean,macro_f1_sd,auc_mean,auc_sd,kappa_mean,majority_baseline\n");
        let mut html_rows = String::new();
        md.push_str("| route | seeds | test accuracy | 95% CI | macro-F1 | mean AUC | 95% CI | kappa | majority class |\n|---|---|---|---|---|---|---|---|---|\n");
        for ((kind, route), ls) in &groups {
            if kind != "evaluate" {
                continue;
            }
            let (acc, f1, auc, kappa) = (
                f(ls, "accuracy"),
                f(ls, "macro_f1"),
                f(ls, "auc_mean"),
                f(ls, "kappa"),
            );
            let row = [
                route.clone(),
                ls.len().to_string(),
                fmt_ms(&acc),
                ci_text(ls, "accuracy_ci95"),
                fmt_ms(&f1),
                fmt_ms(&auc),
                ci_text(ls, "auc_mean_ci95"),
                fmt_ms(&kappa),
                fmt_ms(&f(ls, "majority_baseline")),
            ];
            writeln!(md, "| {} |", row.join(" | "))?;
            html_rows.push_str(&html_row(&row));
            let (am, asd) = mean_sd(&acc);
            let (fm, fsd) = mean_sd(&f1);
            let (um, usd) = mean_sd(&auc);
            writeln!(
                csv,
                "{route},{},{am:.4},{asd:.4},{fm:.4},{fsd:.4},{um:.4},{usd:.4},{:.4},{:.4}",
                ls.len(),
                mean_sd(&kappa).0,
                mean_sd(&f(ls, "majority_baseline")).0
            )?;
        }
        let mut cam_rows = String::new();
        md.push_str("\n## Where the models look (Grad-CAM)\n\n| route | images | centre energy | centre-of-mass distance | entropy | random-weights centre energy | deletion AUC (random-weights maps) | insertion AUC (random-weights maps) |\n|---|---|---|---|---|---|---|---|\n");
        for ((kind, route), ls) in &groups {
            if kind != "gradcam" {
                continue;
            }
            let g = |path: &[&str]| metric_over(ls, path);
            let row = [
                route.clone(),
                f(ls, "images")
                    .first()
                    .map_or("-".into(), |v| v.to_string()),
                fmt_ms(&g(&["model", "center_energy", "mean"])),
                fmt_ms(&g(&["model", "com_distance", "mean"])),
                fmt_ms(&g(&["model", "entropy", "mean"])),
                fmt_ms(&g(&["random_baseline", "center_energy", "mean"])),
                format!(
                    "{} ({})",
                    fmt_ms(&g(&["faithfulness", "model", "deletion_auc", "mean"])),
                    fmt_ms(&g(&[
                        "faithfulness",
                        "random_baseline",
                        "deletion_auc",
                        "mean"
                    ]))
                ),
                format!(
                    "{} ({})",
                    fmt_ms(&g(&["faithfulness", "model", "insertion_auc", "mean"])),
                    fmt_ms(&g(&[
                        "faithfulness",
                        "random_baseline",
                        "insertion_auc",
                        "mean"
                    ]))
                ),
            ];
            writeln!(md, "| {} |", row.join(" | "))?;
            cam_rows.push_str(&html_row(&row));
        }
        md.push_str("\nCentre energy: share of the map inside the central square of half the image side (a uniform map scores 0.25). Deletion/insertion AUC: the target class's probability as the pixels the map ranks highest are removed from the image / put onto a blank one; a faithful map gives a lower deletion and a higher insertion AUC than the random-weights model's maps used the same way. Spreads are standard deviations over seeds; CIs are per-run bootstrap 95% intervals, averaged over seeds.\n");
        let cam_routes: Vec<(String, Vec<&Leaf>)> = groups
            .iter()
            .filter(|((kind, _), _)| kind == "gradcam")
            .map(|((_, route), ls)| (route.clone(), ls.clone()))
            .collect();
        let paired = paired_comparisons(&cam_routes)?;
        let mut paired_rows = String::new();
        if !paired.is_empty() {
            md.push_str("\n## Do the routes look at different places? (paired, per test image)\n\n| statistic | route A | route B | images | median A - B | Wilcoxon z | p | p (Holm) |\n|---|---|---|---|---|---|---|---|\n");
            for row in &paired {
                writeln!(md, "| {} |", row.join(" | "))?;
                paired_rows.push_str(&html_row(row.as_slice()));
            }
            md.push_str("\nEach image's value is averaged over a route's seeds; the test pairs the same test images across two routes (Wilcoxon signed-rank, normal approximation, ties averaged). Holm adjusts for the number of comparisons of each statistic.\n");
        }

        // Localisation, where some gradcam stage was given boxes.
        let mut box_rows = String::new();
        for ((kind, route), ls) in &groups {
            let with_boxes: Vec<&Leaf> = ls
                .iter()
                .copied()
                .filter(|l| kind == "gradcam" && l.metrics["boxes"].is_object())
                .collect();
            if with_boxes.is_empty() {
                continue;
            }
            let g = |path: &[&str]| {
                let full: Vec<&str> = std::iter::once("boxes")
                    .chain(path.iter().copied())
                    .collect();
                fmt_ms(&metric_over(&with_boxes, &full))
            };
            let pair = |model: &[&str], base: &[&str]| format!("{} ({})", g(model), g(base));
            let row = [
                route.clone(),
                with_boxes[0].metrics["boxes"]["boxes"].to_string(),
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
            ];
            if box_rows.is_empty() {
                md.push_str("\n## Do the maps find the boxes?\n\n| route | boxes | pointing game (random-weights maps) | IoU (random-weights maps) | energy in box (random-weights maps) |\n|---|---|---|---|---|\n");
            }
            writeln!(md, "| {} |", row.join(" | "))?;
            box_rows.push_str(&html_row(&row));
        }
        if !box_rows.is_empty() {
            md.push_str("\nPointing game: share of boxes that hold the map's maximum. IoU: the map thresholded at `iou_threshold` (0.5 of its maximum by default) against the box. Energy in box: share of the map inside it.\n");
        }

        // Curves and pictures, per stage.
        let mut figures = String::new();
        let curves = |kind: &str, key: &str| -> Vec<(String, Vec<f64>)> {
            leaves
                .iter()
                .filter(|l| l.kind == kind)
                .map(|l| (l.stage.clone(), floats(&l.metrics[key])))
                .filter(|(_, v)| !v.is_empty())
                .collect()
        };
        figures.push_str(&svg_lines("MAE training loss", &curves("mae", "loss")));
        figures.push_str(&svg_lines("proxy training loss", &curves("proxy", "loss")));
        figures.push_str(&svg_lines(
            "fine-tune validation accuracy",
            &curves("finetune", "val_accuracy"),
        ));
        figures.push_str(&svg_lines(
            "fine-tune training loss",
            &curves("finetune", "train_loss"),
        ));
        let mut gallery = String::new();
        let pictures = ctx.out_dir.join("img");
        std::fs::create_dir_all(&pictures)?;
        for (i, l) in leaves.iter().enumerate() {
            for file in ["reconstructions.png", "overlays.png"] {
                let src = l.dir.join(file);
                if src.is_file() {
                    let name = format!("{i}-{file}");
                    std::fs::copy(&src, pictures.join(&name))?;
                    write!(gallery, "<figure><img src=\"img/{name}\" alt=\"{file} of {0}\" style=\"max-width:360px;max-height:600px\"><figcaption>{0}: {1}</figcaption></figure>", html_escape(&l.stage), if file.starts_with("recon") { "original | masked | reconstruction | + visible" } else { "image | Grad-CAM" })?;
                }
            }
        }
        let html = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title><style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}figure{{display:inline-block;margin:8px;vertical-align:top}}</style></head><body>\
<h1>{t}</h1><h2>Test results</h2><table><tr><th>route</th><th>seeds</th><th>test accuracy</th><th>95% CI</th><th>macro-F1</th><th>mean AUC</th><th>95% CI</th><th>kappa</th><th>majority class</th></tr>\n{html_rows}</table>\
<h2>Where the models look (Grad-CAM)</h2><table><tr><th>route</th><th>images</th><th>centre energy</th><th>centre-of-mass distance</th><th>entropy</th><th>random-weights centre energy</th><th>deletion AUC (random-weights maps)</th><th>insertion AUC (random-weights maps)</th></tr>\n{cam_rows}</table>\
<p>Centre energy: share of the map inside the central square of half the image side (uniform = 0.25). Spreads are standard deviations over seeds.</p>{paired_html}{box_html}<h2>Curves</h2>{figures}<h2>Pictures</h2>{gallery}</body></html>",
            t = html_escape(&p.title),
            box_html = if box_rows.is_empty() { String::new() } else { format!("<h2>Do the maps find the boxes?</h2><table><tr><th>route</th><th>boxes</th><th>pointing game (random-weights maps)</th><th>IoU (random-weights maps)</th><th>energy in box (random-weights maps)</th></tr>\n{box_rows}</table>") },
            paired_html = if paired_rows.is_empty() { String::new() } else { format!("<h2>Paired comparison per test image (Wilcoxon signed-rank)</h2><table><tr><th>statistic</th><th>route A</th><th>route B</th><th>images</th><th>median A - B</th><th>z</th><th>p</th><th>p (Holm)</th></tr>\n{paired_rows}</table>") },
        );
        std::fs::write(ctx.out_dir.join("index.html"), html)?;
        std::fs::write(ctx.out_dir.join("results.md"), &md)?;
        std::fs::write(ctx.out_dir.join("results.csv"), csv)?;
        ctx.log(&format!(
            "report: {}",
            ctx.out_dir.join("index.html").display()
        ));
        Ok(
            json!({ "stages": leaves.len(), "routes": groups.keys().filter(|(k, _)| k == "evaluate").count() }),
        )
    }
}

/// The number at `path` in each leaf's metrics (leaves without it are left out).
fn metric_over(leaves: &[&Leaf], path: &[&str]) -> Vec<f64> {
    leaves
        .iter()
        .filter_map(|l| {
            path.iter()
                .try_fold(&l.metrics, |v, k| v.get(*k))
                .and_then(Value::as_f64)
        })
        .collect()
}

/// One HTML table row, each cell escaped.
fn html_row(cells: &[String]) -> String {
    let cells: String = cells
        .iter()
        .map(|c| format!("<td>{}</td>", html_escape(c)))
        .collect();
    format!("<tr>{cells}</tr>\n")
}

/// A gradcam stage's `maps.csv`.
fn maps_table(dir: &std::path::Path) -> Result<String> {
    let path = dir.join("maps.csv");
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Per test image, a column of a `maps.csv` text (its first field is the quoted path).
fn per_image(text: &str, column: &str) -> BTreeMap<String, f64> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let Some(col) = header.iter().position(|h| *h == column) else {
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for line in lines {
        let (image, rest) = match line.strip_prefix('"').and_then(|l| l.split_once("\",")) {
            Some((p, rest)) => (p.to_owned(), rest),
            None => match line.split_once(',') {
                Some((p, rest)) => (p.to_owned(), rest),
                None => continue,
            },
        };
        if let Some(v) = rest
            .split(',')
            .nth(col - 1)
            .and_then(|v| v.parse::<f64>().ok())
        {
            out.insert(image, v);
        }
    }
    out
}

/// Every pair of routes, per statistic: the Wilcoxon signed-rank test over the test images both
/// routes explained, each image's value averaged over the route's seeds.
fn paired_comparisons(routes: &[(String, Vec<&Leaf>)]) -> Result<Vec<[String; 8]>> {
    // Each table is read once, for both statistics.
    let tables: Vec<(&str, Vec<String>)> = routes
        .iter()
        .map(|(route, leaves)| {
            let texts = leaves
                .iter()
                .map(|l| maps_table(&l.dir))
                .collect::<Result<_>>()?;
            Ok((route.as_str(), texts))
        })
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    for (column, label) in [
        ("center_energy", "centre energy"),
        ("deletion_auc", "deletion AUC"),
    ] {
        let mut means: Vec<(String, BTreeMap<String, f64>)> = Vec::new();
        for (route, texts) in &tables {
            let mut sum: BTreeMap<String, (f64, usize)> = BTreeMap::new();
            for text in texts {
                for (img, v) in per_image(text, column) {
                    let e = sum.entry(img).or_default();
                    e.0 += v;
                    e.1 += 1;
                }
            }
            let m: BTreeMap<String, f64> = sum
                .into_iter()
                .map(|(k, (s, n))| (k, s / n as f64))
                .collect();
            if !m.is_empty() {
                means.push((route.to_string(), m));
            }
        }
        let mut found = Vec::new();
        for a in 0..means.len() {
            for b in a + 1..means.len() {
                let diffs: Vec<f64> = means[a]
                    .1
                    .iter()
                    .filter_map(|(img, va)| means[b].1.get(img).map(|vb| va - vb))
                    .collect();
                if let Some(w) = crate::train::metrics::wilcoxon_signed_rank(&diffs) {
                    let mut sorted = diffs.clone();
                    sorted.sort_by(f64::total_cmp);
                    found.push((a, b, diffs.len(), sorted[sorted.len() / 2], w));
                }
            }
        }
        let adjusted =
            crate::train::metrics::holm(&found.iter().map(|f| f.4.p).collect::<Vec<_>>());
        for ((a, b, n, median, w), p_holm) in found.into_iter().zip(adjusted) {
            rows.push([
                label.to_owned(),
                means[a].0.clone(),
                means[b].0.clone(),
                n.to_string(),
                format!("{median:+.4}"),
                format!("{:+.2}", w.z),
                format!("{:.3}", w.p),
                format!("{p_holm:.3}"),
            ]);
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_collapse_into_routes() {
        assert_eq!(
            route_of("evaluate@vit-chest_mae-seed1"),
            "evaluate@vit-chest_mae"
        );
        assert_eq!(route_of("evaluate@seed2"), "evaluate");
        assert_eq!(route_of("evaluate"), "evaluate");
        assert_eq!(route_of("evaluate@vit-seedling"), "evaluate@vit-seedling");
    }
}
