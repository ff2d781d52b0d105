//! `kind: gradcam`: Grad-CAM (or Grad-CAM++) maps for test images, overlay PNGs, and statistics
//! that answer "where does the model look": the share of map energy in the central region versus
//! the border, the distance of the map's centre of mass from the image centre, and the map's
//! entropy, each also for the same architecture with random weights (the sanity baseline of
//! Adebayo et al.: maps that do not change are not explaining the model). Deletion and insertion
//! AUC (Petsiuk et al.) measure whether a map ranks first the pixels the trained model needs; the
//! random-weights maps, used the same way on the trained model, give the reference values.

use super::fit::ImageSet;
use super::net::{ModelCard, Net};
use super::{InputSlot, Inputs, OutputSlot, StageCtx, Task};
use crate::data::augment::Grey;
use crate::data::decode::OnBadImage;
use crate::data::loader::Normalize;
use crate::data::source::Split;
use crate::nn::gradcam::{grad_cam, CamMethod};
use crate::nn::tap::Taps;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::fmt::Write as _;

pub struct GradCamTask;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Gradcam,
    GradcamPlusPlus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The true class of each image.
    Label,
    /// The class the model predicts.
    Prediction,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    #[serde(default = "d_method")]
    pub method: Method,
    /// Tap name of the explained layer; default: the last block's norm1 (ViT), layer4 (ResNet),
    /// features.norm5 (DenseNet).
    #[serde(default)]
    pub layer: Option<String>,
    #[serde(default = "d_target")]
    pub target: Target,
    /// Side of the central square, as a fraction of the image side (0.5 = the central quarter).
    #[serde(default = "d_center")]
    pub center_fraction: f64,
    #[serde(default = "d_overlays")]
    pub overlays: usize,
    #[serde(default = "yes")]
    pub random_baseline: bool,
    #[serde(default)]
    pub max_images: Option<usize>,
    /// Points on the deletion and insertion curves (0 skips them; each point is two forward
    /// passes per batch of test images).
    #[serde(default = "d_deletion_steps")]
    pub deletion_steps: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub on_bad_image: OnBadImage,
}

fn d_method() -> Method {
    Method::Gradcam
}
fn d_target() -> Target {
    Target::Label
}
fn d_center() -> f64 {
    0.5
}
fn d_overlays() -> usize {
    12
}
fn yes() -> bool {
    true
}
fn d_deletion_steps() -> usize {
    10
}

/// Where one map puts its mass.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MapStats {
    pub center_energy: f64,
    pub com_distance: f64,
    pub entropy: f64,
}

pub fn map_stats(map: &[f32], size: usize, center_fraction: f64) -> MapStats {
    let total: f64 = map.iter().map(|&v| v as f64).sum::<f64>().max(1e-12);
    let half = size as f64 * center_fraction / 2.0;
    let c = size as f64 / 2.0;
    let (mut inner, mut mx, mut my, mut entropy) = (0.0, 0.0, 0.0, 0.0);
    for y in 0..size {
        for x in 0..size {
            let v = map[y * size + x] as f64 / total;
            let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
            if (px - c).abs() < half && (py - c).abs() < half {
                inner += v;
            }
            mx += v * px;
            my += v * py;
            if v > 0.0 {
                entropy -= v * v.ln();
            }
        }
    }
    MapStats {
        center_energy: inner,
        com_distance: ((mx - c).powi(2) + (my - c).powi(2)).sqrt() / (c * std::f64::consts::SQRT_2),
        entropy: entropy / ((size * size) as f64).ln(),
    }
}

/// Deletion and insertion AUC of each image's map (Petsiuk et al., RISE, 2018): the probability
/// of the target class as the pixels the map ranks highest are removed from the image (deletion:
/// a faithful map makes it fall fast, low AUC) or put onto a blank image (insertion: rises fast,
/// high AUC). Removed or blank pixels are the dataset mean, 0 after normalisation. The AUC is the
/// trapezoid rule over `steps` equal fractions of the pixels.
fn deletion_insertion(
    net: &Net,
    x: &Tensor,
    maps: &[Vec<f32>],
    targets: &[usize],
    steps: usize,
) -> Result<Vec<[f64; 2]>> {
    let (b, _, h, w) = x.dims4()?;
    let px = h * w;
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let orders: Vec<Vec<usize>> = maps
        .iter()
        .map(|m| {
            let mut idx: Vec<usize> = (0..px).collect();
            idx.sort_by(|&a, &b| m[b].total_cmp(&m[a]).then(a.cmp(&b)));
            idx
        })
        .collect();
    let mut curves = vec![[Vec::new(), Vec::new()]; b];
    for s in 0..=steps {
        let k = px * s / steps;
        let mut deleted = xs.clone();
        let mut inserted = vec![0f32; xs.len()];
        for (i, order) in orders.iter().enumerate() {
            for &p in &order[..k] {
                deleted[i * px + p] = 0.0;
                inserted[i * px + p] = xs[i * px + p];
            }
        }
        for (which, data) in [deleted, inserted].into_iter().enumerate() {
            let t = Tensor::from_vec(data, (b, 1, h, w), x.device())?;
            let logits = net.logits(&t, None, &mut Taps::none())?;
            let prob: Vec<Vec<f32>> =
                candle_nn::ops::softmax(&logits, candle_core::D::Minus1)?.to_vec2()?;
            for i in 0..b {
                curves[i][which].push(prob[i][targets[i]] as f64);
            }
        }
    }
    let auc =
        |c: &[f64]| (c.iter().sum::<f64>() - (c[0] + c[c.len() - 1]) / 2.0) / (c.len() - 1) as f64;
    Ok(curves.iter().map(|[d, i]| [auc(d), auc(i)]).collect())
}

fn faithfulness_summary(v: &[[f64; 2]]) -> Value {
    let n = v.len().max(1) as f64;
    let stat = |k: usize| {
        let m = v.iter().map(|x| x[k]).sum::<f64>() / n;
        let sd = (v.iter().map(|x| (x[k] - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
        json!({ "mean": m, "std": sd })
    };
    json!({ "deletion_auc": stat(0), "insertion_auc": stat(1) })
}

fn summary(stats: &[MapStats]) -> Value {
    let mean_std = |f: fn(&MapStats) -> f64| {
        let n = stats.len().max(1) as f64;
        let m = stats.iter().map(f).sum::<f64>() / n;
        let sd =
            (stats.iter().map(|s| (f(s) - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
        json!({ "mean": m, "std": sd })
    };
    json!({ "center_energy": mean_std(|s| s.center_energy), "com_distance": mean_std(|s| s.com_distance), "entropy": mean_std(|s| s.entropy) })
}

/// The jet colormap (as matplotlib / OpenCV), for overlays.
fn jet(v: f32) -> [f32; 3] {
    let v = v.clamp(0.0, 1.0);
    let f = |x: f32| (1.5 - (4.0 * v - x).abs()).clamp(0.0, 1.0);
    [f(3.0), f(2.0), f(1.0)]
}

fn maps_for(
    net: &Net,
    layer: &str,
    x: &Tensor,
    targets: &[Vec<usize>],
    size: usize,
    method: CamMethod,
) -> Result<(Vec<Vec<f32>>, Vec<usize>)> {
    let mut predicted = Vec::new();
    let cam = grad_cam(
        |taps| {
            let logits = net
                .logits(x, None, taps)
                .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
            predicted = logits
                .argmax(1)?
                .to_vec1::<u32>()?
                .into_iter()
                .map(|v| v as usize)
                .collect();
            Ok(logits)
        },
        layer,
        targets,
        |t| net.to_grid(t),
        (size, size),
        method,
    )?;
    Ok((cam.grayscale, predicted))
}

impl Task for GradCamTask {
    const KIND: &'static str = "gradcam";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str = "Grad-CAM maps of test images, overlays, and where-does-it-look statistics against a random-weights baseline";
    type Params = Params;

    fn inputs(_: &Params) -> Option<Vec<InputSlot>> {
        Some(super::net::model_and_data_inputs())
    }

    fn outputs(_: &Params) -> Vec<OutputSlot> {
        vec![
            OutputSlot {
                name: "overlays",
                path: "overlays.png",
                doc: "image | Grad-CAM overlay, one row per image",
            },
            OutputSlot {
                name: "maps",
                path: "maps.csv",
                doc: "per image: statistics of its map and of the random-weights map",
            },
        ]
    }

    fn run(p: &Params, inputs: &Inputs, ctx: &mut StageCtx) -> Result<Value> {
        let (card, net) = ModelCard::read(inputs.path("model")?)?;
        let size = card.net.img_size;
        let set = ImageSet::open(
            inputs.item("data")?,
            size,
            0.0,
            None,
            0,
            p.max_images,
            p.on_bad_image,
            ctx,
        )?;
        let test = set
            .require(Split::Test, "add rows with split=test to labels.csv")?
            .to_vec();
        let layer = p.layer.clone().unwrap_or_else(|| net.cam_layer());
        let method = match p.method {
            Method::Gradcam => CamMethod::GradCam,
            Method::GradcamPlusPlus => CamMethod::GradCamPlusPlus,
        };
        let random = Net::build(&card.net, p.seed ^ 0xBA5E, &Device::Cpu)?;
        let norm = Normalize {
            mean: card.mean,
            std: card.std,
        };
        let (mut stats, mut base_stats, mut shown) = (Vec::new(), Vec::new(), Vec::new());
        let (mut faith, mut base_faith) = (Vec::new(), Vec::new());
        let mut csv = String::from("path,label,prediction,target,center_energy,com_distance,entropy,random_center_energy,random_com_distance,random_entropy,deletion_auc,insertion_auc,random_deletion_auc,random_insertion_auc\n");
        for (chunk_no, chunk) in test.chunks(16).enumerate() {
            let x: Vec<f32> = chunk
                .iter()
                .flat_map(|&i| norm.apply(Grey::from_u8(set.decoded.image(i), size)))
                .collect();
            let x = Tensor::from_vec(x, (chunk.len(), 1, size, size), &Device::Cpu)?;
            let labels: Vec<usize> = chunk
                .iter()
                .map(|&i| set.label(i).map(|l| l as usize))
                .collect::<Result<_>>()?;
            let one = |v: &[usize]| -> Vec<Vec<usize>> { v.iter().map(|&c| vec![c]).collect() };
            let (first, predicted) = maps_for(&net, &layer, &x, &one(&labels), size, method)
                .with_context(|| format!("Grad-CAM at layer `{layer}`"))?;
            let targets = match p.target {
                Target::Label => labels.clone(),
                Target::Prediction => predicted.clone(),
            };
            let maps = if p.target == Target::Label {
                first
            } else {
                maps_for(&net, &layer, &x, &one(&targets), size, method)?.0
            };
            let baseline = if p.random_baseline {
                Some(maps_for(&random, &layer, &x, &one(&targets), size, method)?.0)
            } else {
                None
            };
            let curves = |maps: &[Vec<f32>]| -> Result<Vec<Option<[f64; 2]>>> {
                Ok(if p.deletion_steps == 0 {
                    vec![None; chunk.len()]
                } else {
                    deletion_insertion(&net, &x, maps, &targets, p.deletion_steps)?
                        .into_iter()
                        .map(Some)
                        .collect()
                })
            };
            let f_model = curves(&maps)?;
            let f_base = match &baseline {
                Some(b) => curves(b)?,
                None => vec![None; chunk.len()],
            };
            let auc_text =
                |f: Option<[f64; 2]>, k: usize| f.map_or(String::new(), |f| format!("{:.5}", f[k]));
            for (j, &i) in chunk.iter().enumerate() {
                let s = map_stats(&maps[j], size, p.center_fraction);
                let b = baseline
                    .as_ref()
                    .map(|m| map_stats(&m[j], size, p.center_fraction));
                let path = set.dataset.samples[set.sample_of[i]]
                    .path
                    .display()
                    .to_string();
                let cls = |c: usize| card.classes[c].clone();
                writeln!(
                    csv,
                    "\"{path}\",{},{},{},{:.5},{:.5},{:.5},{},{},{},{},{},{},{}",
                    cls(labels[j]),
                    cls(predicted[j]),
                    cls(targets[j]),
                    s.center_energy,
                    s.com_distance,
                    s.entropy,
                    b.map_or(String::new(), |b| format!("{:.5}", b.center_energy)),
                    b.map_or(String::new(), |b| format!("{:.5}", b.com_distance)),
                    b.map_or(String::new(), |b| format!("{:.5}", b.entropy)),
                    auc_text(f_model[j], 0),
                    auc_text(f_model[j], 1),
                    auc_text(f_base[j], 0),
                    auc_text(f_base[j], 1),
                )?;
                stats.push(s);
                base_stats.extend(b);
                faith.extend(f_model[j]);
                base_faith.extend(f_base[j]);
                if shown.len() < p.overlays {
                    shown.push((i, maps[j].clone()));
                }
            }
            ctx.report(
                (chunk_no * 16 + chunk.len()) as u64,
                test.len() as u64,
                "maps",
            );
        }
        std::fs::write(ctx.out_dir.join("maps.csv"), csv)?;
        write_overlays(&set, &shown, size, &ctx.out_dir.join("overlays.png"))?;
        Ok(json!({
            "layer": layer, "method": p.method, "target": p.target, "images": stats.len(), "center_fraction": p.center_fraction,
            "model": summary(&stats), "random_baseline": if base_stats.is_empty() { Value::Null } else { summary(&base_stats) },
            "faithfulness": if faith.is_empty() { Value::Null } else { json!({
                "model": faithfulness_summary(&faith),
                "random_baseline": if base_faith.is_empty() { Value::Null } else { faithfulness_summary(&base_faith) },
            }) },
        }))
    }
}

fn write_overlays(
    set: &ImageSet,
    shown: &[(usize, Vec<f32>)],
    size: usize,
    path: &std::path::Path,
) -> Result<()> {
    let scale = (128 / size).max(1) as u32;
    let s = size as u32 * scale;
    let mut png = image::RgbImage::new(2 * s, s * shown.len().max(1) as u32);
    for (row, (i, map)) in shown.iter().enumerate() {
        let img = set.decoded.image(*i);
        for y in 0..s {
            for x in 0..s {
                let k = (y / scale) as usize * size + (x / scale) as usize;
                let g = img[k] as f32 / 255.0;
                let c = jet(map[k]);
                let grey = [g, g, g].map(|v| (v * 255.0) as u8);
                let over =
                    [0, 1, 2].map(|ch| ((0.55 * g + 0.45 * c[ch]).clamp(0.0, 1.0) * 255.0) as u8);
                png.put_pixel(x, row as u32 * s + y, image::Rgb(grey));
                png.put_pixel(s + x, row as u32 * s + y, image::Rgb(over));
            }
        }
    }
    png.save(path)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centre_and_border_maps_are_told_apart() {
        let n = 8;
        let centre: Vec<f32> = (0..n * n)
            .map(|k| {
                if (2..6).contains(&(k / n)) && (2..6).contains(&(k % n)) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        let border: Vec<f32> = centre.iter().map(|v| 1.0 - v).collect();
        let c = map_stats(&centre, n, 0.5);
        let b = map_stats(&border, n, 0.5);
        assert!((c.center_energy - 1.0).abs() < 1e-9 && b.center_energy.abs() < 1e-9);
        assert!(c.com_distance < 1e-9);
        let uniform = map_stats(&vec![1.0; n * n], n, 0.5);
        assert!(
            (uniform.entropy - 1.0).abs() < 1e-9 && (uniform.center_energy - 0.25).abs() < 1e-9
        );
    }
}
