//! `kind: gradcam`: Grad-CAM (or Grad-CAM++) maps for test images, overlay PNGs, and statistics
//! that answer "where does the model look": the share of map energy in the central region versus
//! the border, the distance of the map's centre of mass from the image centre, and the map's
//! entropy, each also for the same architecture with random weights (the sanity baseline of
//! Adebayo et al.: maps that do not change are not explaining the model). Deletion and insertion
//! AUC (Petsiuk et al.) measure whether a map ranks first the pixels the trained model needs; the
//! random-weights maps, used the same way on the trained model, give the reference values.
//!
//! Given a `boxes` input (NIH's `BBox_List_2017.csv`, or a CSV of `path,label,x,y,w,h` in the
//! original image's pixels), every box on a test image is scored against the map of its finding
//! (or of the image's target class when the box has no label): the pointing game (is the map's
//! maximum inside the box?), the IoU of the map thresholded at `iou_threshold` with the box, and
//! the share of the map's energy inside the box; the random-weights maps give the chance level.
//! Per box in `boxes.csv` (written only with a `boxes` input), summarised in the metrics.

mod gallery;

/// CSS colours of the maps' colour map from 0 to 1 (for a report's colour bar).
pub fn colour_stops(stops: usize) -> Vec<String> {
    gallery::css_stops(stops)
}

use super::fit::{ImageSet, SetSpec};
use super::net::{ModelCard, Net};
use crate::data::decode::OnBadImage;
use crate::data::formats::FindingBox;
use crate::data::loader;
use crate::data::loader::Normalize;
use crate::data::source::Split;
use crate::nn::gradcam::{grad_cam, CamMethod};
use crate::nn::tap::Taps;
use crate::stage::{InputSlot, Inputs, OutputSlot, StageCtx, Task};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use gallery::{Gallery, Tile};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

pub struct GradCamTask;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Gradcam,
    GradcamPlusPlus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The true class of each image.
    Label,
    /// The class the model predicts.
    Prediction,
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// `gradcam` or `gradcam_plus_plus`.
    #[serde(default = "d_method")]
    pub method: Method,
    /// Tap name of the explained layer; default: the last block's norm1 (ViT), layer4 (ResNet;
    /// layer3 when the image is 32 px or smaller and layer4's map would be one cell),
    /// features.norm5 (DenseNet).
    #[serde(default)]
    pub layer: Option<String>,
    /// The class each map explains: the true `label`, or the model's `prediction`.
    #[serde(default = "d_target")]
    pub target: Target,
    /// Side of the central square, as a fraction of the image side (0.5 = the central quarter).
    #[serde(default = "d_center")]
    pub center_fraction: f64,
    /// Test images drawn in `overlays.png`, spread over classes and right / wrong predictions.
    #[serde(default = "d_overlays")]
    pub overlays: usize,
    /// Also compute every statistic on the maps of the same architecture with random weights, the baseline that says whether a statistic is the model's or the architecture's.
    #[serde(default = "yes")]
    pub random_baseline: bool,
    /// Use at most this many images, evenly spaced (quick runs).
    #[serde(default)]
    pub max_images: Option<usize>,
    /// Points on the deletion and insertion curves (0 skips them; each point is two forward
    /// passes per batch of test images).
    #[serde(default = "d_deletion_steps")]
    pub deletion_steps: usize,
    /// Maps are scaled to [0, 1] per image; pixels at or above this value form the region whose
    /// IoU with each box is reported (with a `boxes` input). Default 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iou_threshold: Option<f64>,
    /// Seeds the random-weights baseline model.
    #[serde(default)]
    pub seed: u64,
    /// `error`: stop at an image that does not decode, naming its row; `skip`: leave it out and count it.
    #[serde(default)]
    pub on_bad_image: OnBadImage,
}

impl Params {
    fn iou_threshold(&self) -> Result<f64> {
        let t = self.iou_threshold.unwrap_or(0.5);
        if !(t > 0.0 && t <= 1.0) {
            bail!("iou_threshold {t} is outside (0, 1]: maps are scaled to [0, 1] per image");
        }
        Ok(t)
    }
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

/// How one map agrees with one box.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BoxStats {
    /// The pointing game (Zhang et al., 2016): the map's maximum lies inside the box.
    pub hit: bool,
    pub iou: f64,
    /// Share of the map's total inside the box.
    pub energy: f64,
}

/// `bx` is [x, y, w, h] in map pixels; a pixel is inside when its centre is (or, for a box that
/// contains no pixel centre, when it holds the box's centre).
pub fn box_stats(map: &[f32], size: usize, bx: [f64; 4], iou_threshold: f64) -> BoxStats {
    let [x0, y0, w, h] = bx;
    let centre_in = |x: usize, y: usize| {
        let (cx, cy) = (x as f64 + 0.5, y as f64 + 0.5);
        cx >= x0 && cx < x0 + w && cy >= y0 && cy < y0 + h
    };
    let any_centre = (0..size * size).any(|k| centre_in(k % size, k / size));
    let (mx, my) = (x0 + w / 2.0, y0 + h / 2.0);
    let inside = |k: usize| {
        let (x, y) = (k % size, k / size);
        if any_centre {
            centre_in(x, y)
        } else {
            x == (mx.max(0.0) as usize).min(size - 1) && y == (my.max(0.0) as usize).min(size - 1)
        }
    };
    // A map with no positive value points nowhere.
    let peak = (0..map.len()).fold(0, |best, k| if map[k] > map[best] { k } else { best });
    let points = map.get(peak).is_some_and(|&v| v > 0.0);
    let (mut inter, mut union, mut in_box, mut total) = (0usize, 0usize, 0.0f64, 0.0f64);
    for (k, &v) in map.iter().enumerate() {
        let (on, inb) = (v as f64 >= iou_threshold, inside(k));
        inter += (on && inb) as usize;
        union += (on || inb) as usize;
        total += v as f64;
        if inb {
            in_box += v as f64;
        }
    }
    BoxStats {
        hit: points && inside(peak),
        iou: if union == 0 {
            0.0
        } else {
            inter as f64 / union as f64
        },
        energy: if total > 0.0 { in_box / total } else { 0.0 },
    }
}

/// One map per image of a chunk for one class: the trained model's, and the random-weights
/// model's when that baseline is on.
type ChunkMaps = (Vec<Vec<f32>>, Option<Vec<Vec<f32>>>);

/// A box on one test image, in map pixels, with the class whose map it is scored against
/// (`None`: the image's target class).
struct PlacedBox {
    finding: String,
    class: Option<usize>,
    xywh: [f64; 4],
}

/// The boxes of `file` on the test images, by position in `test`; boxes on other images are
/// counted, not used (NIH's list also covers images outside a chosen test split).
fn place_boxes(
    file: &std::path::Path,
    set: &ImageSet,
    test: &[usize],
    classes: &[String],
    size: usize,
) -> Result<(HashMap<usize, Vec<PlacedBox>>, usize)> {
    let boxes = crate::data::formats::read_boxes(file)?;
    let root = &set.dataset.root;
    // A box names its image by the path relative to the data folder, or by file name (NIH's
    // `Image Index`) where that name is unique among the test images.
    let (mut by_path, mut by_name) = (HashMap::new(), HashMap::<String, Vec<usize>>::new());
    for (pos, &i) in test.iter().enumerate() {
        let path = &set.dataset.samples[set.sample_of[i]].path;
        if let Some(name) = path.file_name() {
            by_name
                .entry(name.to_string_lossy().into_owned())
                .or_default()
                .push(pos);
        }
        if let Ok(rel) = path.strip_prefix(root) {
            by_path.insert(rel.to_string_lossy().into_owned(), pos);
        }
    }
    let (mut placed, mut unmatched) = (HashMap::<usize, Vec<PlacedBox>>::new(), 0);
    let mut dims = HashMap::new();
    for b in boxes {
        let pos = match (
            by_path.get(&b.image),
            by_name.get(&b.image).map(Vec::as_slice),
        ) {
            (Some(&pos), _) | (None, Some(&[pos])) => pos,
            (None, Some(_)) => bail!(
                "{}: several test images are named `{}`; name the image by its path relative to {}",
                b.origin,
                b.image,
                root.display()
            ),
            (None, None) => {
                unmatched += 1;
                continue;
            }
        };
        let class = class_of(&b, classes)?;
        let path = &set.dataset.samples[set.sample_of[test[pos]]].path;
        let (w, h) = match dims.entry(pos) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(e) => *e.insert(crate::data::decode::dimensions(path)?),
        };
        let (sx, sy) = (size as f64 / w as f64, size as f64 / h as f64);
        let [x, y, bw, bh] = b.xywh.map(|v| v as f64);
        placed.entry(pos).or_default().push(PlacedBox {
            finding: b.finding,
            class,
            xywh: [x * sx, y * sy, bw * sx, bh * sy],
        });
    }
    Ok((placed, unmatched))
}

fn class_of(b: &FindingBox, classes: &[String]) -> Result<Option<usize>> {
    if b.finding.is_empty() {
        return Ok(None);
    }
    match classes
        .iter()
        .position(|c| c.eq_ignore_ascii_case(&b.finding))
    {
        Some(c) => Ok(Some(c)),
        None => bail!(
            "{}: the box's finding `{}` is not a class of the model ({}); leave the label empty \
             to score the box against each image's target class",
            b.origin,
            b.finding,
            classes.join(", ")
        ),
    }
}

fn box_summary(v: &[BoxStats]) -> Value {
    let n = v.len().max(1) as f64;
    let mean_std = |f: &dyn Fn(&BoxStats) -> f64| {
        let m = v.iter().map(f).sum::<f64>() / n;
        let sd = (v.iter().map(|s| (f(s) - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
        json!({ "mean": m, "std": sd })
    };
    json!({
        "pointing_game": v.iter().filter(|s| s.hit).count() as f64 / n,
        "iou": mean_std(&|s| s.iou),
        "energy_in_box": mean_std(&|s| s.energy),
    })
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

/// Maps of `x` for `targets`, and per image the predicted class with its probability.
fn maps_for(
    net: &Net,
    layer: &str,
    x: &Tensor,
    targets: &[Vec<usize>],
    size: usize,
    method: CamMethod,
) -> Result<(Vec<Vec<f32>>, Vec<(usize, f64)>)> {
    let mut predicted = Vec::new();
    let cam = grad_cam(
        |taps| {
            let logits = net
                .logits(x, None, taps)
                .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
            let probs: Vec<Vec<f32>> =
                candle_nn::ops::softmax(&logits.detach(), candle_core::D::Minus1)?.to_vec2()?;
            predicted = probs
                .iter()
                .map(|r| {
                    let (c, p) =
                        r.iter()
                            .enumerate()
                            .fold((0, f32::MIN), |b, (c, &p)| if p > b.1 { (c, p) } else { b });
                    (c, p as f64)
                })
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
    const VERSION: u32 = 3;
    const SUMMARY: &'static str = "Grad-CAM maps of test images, overlays, and where-does-it-look statistics against a random-weights baseline";
    type Params = Params;

    fn inputs(_: &Params) -> Option<Vec<InputSlot>> {
        let mut slots = super::net::model_and_data_inputs();
        slots.push(InputSlot {
            name: "boxes",
            required: false,
            many: false,
            doc: "boxes on test images for the pointing game and IoU: NIH's BBox_List_2017.csv, or a CSV of path,label,x,y,w,h in the original image's pixels",
        });
        Some(slots)
    }

    fn preflight(_: &Params, inputs: &Inputs) -> Result<()> {
        super::fit::preflight_labelled(inputs.item("data")?, &[Split::Test])
    }

    fn outputs(_: &Params) -> Vec<OutputSlot> {
        vec![
            OutputSlot {
                name: "overlays",
                path: "overlays.png",
                doc: "image | Grad-CAM overlay, one row per gallery image",
            },
            OutputSlot {
                name: "gallery",
                path: "gallery.csv",
                doc: "the gallery's images (gallery/NNN.png): path, label, prediction, probability, correct; chosen per true class and per right / wrong prediction",
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
            &SetSpec::whole(card.store_size(), p.max_images, p.on_bad_image),
            ctx,
        )?;
        let test = set
            .require(Split::Test, "add rows with split=test to labels.csv")?
            .to_vec();
        let layer = p.layer.clone().unwrap_or_else(|| net.cam_layer(size));
        let method = match p.method {
            Method::Gradcam => CamMethod::GradCam,
            Method::GradcamPlusPlus => CamMethod::GradCamPlusPlus,
        };
        let random = Net::build(&card.net, p.seed ^ 0xBA5E, &Device::Cpu)?;
        let norm = Normalize {
            mean: card.mean,
            std: card.std,
        };
        let (mut stats, mut base_stats) = (Vec::new(), Vec::new());
        let mut gallery = Gallery::new(p.overlays, card.classes.len());
        let (mut faith, mut base_faith) = (Vec::new(), Vec::new());
        let iou_threshold = p.iou_threshold()?;
        let (boxes, unmatched) = match inputs.optional_path("boxes") {
            Some(file) => {
                let (placed, unmatched) = place_boxes(file, &set, &test, &card.classes, size)?;
                ctx.log(&format!(
                    "{} boxes on {} test images ({unmatched} boxes name images outside the test split)",
                    placed.values().map(Vec::len).sum::<usize>(),
                    placed.len()
                ));
                (Some(placed), unmatched)
            }
            None => (None, 0),
        };
        let (mut box_stats_model, mut box_stats_base) = (Vec::new(), Vec::new());
        let mut box_csv = String::from("path,finding,explained_class,x,y,w,h,hit,iou,energy_in_box,random_hit,random_iou,random_energy_in_box\n");
        let mut csv = String::from("path,label,prediction,target,center_energy,com_distance,entropy,random_center_energy,random_com_distance,random_entropy,deletion_auc,insertion_auc,random_deletion_auc,random_insertion_auc\n");
        for (chunk_no, chunk) in test.chunks(16).enumerate() {
            let x: Vec<f32> = chunk
                .iter()
                .flat_map(|&i| norm.apply(loader::resized(&set.decoded, i, size)))
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
                Target::Prediction => predicted.iter().map(|&(c, _)| c).collect(),
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
            // Boxes of a finding other than the image's target need that class's maps.
            let mut box_maps: BTreeMap<usize, ChunkMaps> = BTreeMap::new();
            if let Some(boxes) = &boxes {
                for (j, pos) in (chunk_no * 16..).take(chunk.len()).enumerate() {
                    for b in boxes.get(&pos).into_iter().flatten() {
                        let c = b.class.unwrap_or(targets[j]);
                        if c == targets[j] || box_maps.contains_key(&c) {
                            continue;
                        }
                        let all = vec![vec![c]; chunk.len()];
                        let m = maps_for(&net, &layer, &x, &all, size, method)?.0;
                        let r = match p.random_baseline {
                            true => Some(maps_for(&random, &layer, &x, &all, size, method)?.0),
                            false => None,
                        };
                        box_maps.insert(c, (m, r));
                    }
                }
            }
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
                    cls(predicted[j].0),
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
                let placed = boxes.as_ref().and_then(|bx| bx.get(&(chunk_no * 16 + j)));
                for pb in placed.into_iter().flatten() {
                    let c = pb.class.unwrap_or(targets[j]);
                    let (m, r) = match box_maps.get(&c) {
                        Some((m, r)) => (&m[j], r.as_ref().map(|r| &r[j])),
                        None => (&maps[j], baseline.as_ref().map(|r| &r[j])),
                    };
                    let bs = box_stats(m, size, pb.xywh, iou_threshold);
                    let rs = r.map(|r| box_stats(r, size, pb.xywh, iou_threshold));
                    let [bx, by, bw, bh] = pb.xywh;
                    writeln!(
                        box_csv,
                        "\"{path}\",\"{}\",{},{bx:.2},{by:.2},{bw:.2},{bh:.2},{},{:.5},{:.5},{},{},{}",
                        pb.finding,
                        cls(c),
                        bs.hit as u8,
                        bs.iou,
                        bs.energy,
                        rs.map_or(String::new(), |r| (r.hit as u8).to_string()),
                        rs.map_or(String::new(), |r| format!("{:.5}", r.iou)),
                        rs.map_or(String::new(), |r| format!("{:.5}", r.energy)),
                    )?;
                    box_stats_model.push(bs);
                    box_stats_base.extend(rs);
                }
                stats.push(s);
                base_stats.extend(b);
                faith.extend(f_model[j]);
                base_faith.extend(f_base[j]);
                let (guess, probability) = predicted[j];
                if gallery.wants(labels[j], labels[j] == guess) {
                    gallery.offer(Tile {
                        pos: i,
                        label: labels[j],
                        predicted: guess,
                        probability,
                        map: maps[j].clone(),
                    });
                }
            }
            ctx.report(
                (chunk_no * 16 + chunk.len()) as u64,
                test.len() as u64,
                "maps",
            );
        }
        std::fs::write(ctx.out_dir.join("maps.csv"), csv)?;
        if boxes.is_some() {
            std::fs::write(ctx.out_dir.join("boxes.csv"), box_csv)?;
        }
        gallery.write(&set, &card.classes, size, &ctx.out_dir)?;
        Ok(json!({
            "layer": layer, "method": p.method, "target": p.target, "images": stats.len(), "center_fraction": p.center_fraction,
            "model": summary(&stats), "random_baseline": if base_stats.is_empty() { Value::Null } else { summary(&base_stats) },
            "faithfulness": if faith.is_empty() { Value::Null } else { json!({
                "model": faithfulness_summary(&faith),
                "random_baseline": if base_faith.is_empty() { Value::Null } else { faithfulness_summary(&base_faith) },
            }) },
            "boxes": match boxes {
                None => Value::Null,
                Some(placed) => json!({
                    "boxes": box_stats_model.len(), "images": placed.len(), "outside_test_split": unmatched,
                    "iou_threshold": iou_threshold, "model": box_summary(&box_stats_model),
                    "random_baseline": if box_stats_base.is_empty() { Value::Null } else { box_summary(&box_stats_base) },
                }),
            },
        }))
    }
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

    #[test]
    fn boxes_score_the_peak_the_overlap_and_the_energy() {
        let n = 8;
        // A map that is 1 on the 2x2 block at (4..6, 4..6), 0.25 elsewhere, its peak at (5, 5).
        let mut map = vec![0.25f32; n * n];
        for y in 4..6 {
            for x in 4..6 {
                map[y * n + x] = if (x, y) == (5, 5) { 1.0 } else { 0.9 };
            }
        }
        let on_block = box_stats(&map, n, [4.0, 4.0, 2.0, 2.0], 0.5);
        assert!(on_block.hit);
        assert!((on_block.iou - 1.0).abs() < 1e-12, "{on_block:?}");
        let total = 3.7 + 60.0 * 0.25;
        assert!((on_block.energy - 3.7 / total).abs() < 1e-6, "{on_block:?}");
        // A box on the left half: misses the peak, overlaps no thresholded pixel.
        let left = box_stats(&map, n, [0.0, 0.0, 4.0, 8.0], 0.5);
        assert!(!left.hit && left.iou == 0.0);
        assert!((left.energy - 32.0 * 0.25 / total).abs() < 1e-6);
        // A box smaller than a pixel still owns the pixel holding its centre.
        let tiny = box_stats(&map, n, [5.1, 5.2, 0.3, 0.3], 0.5);
        assert!(tiny.hit && (tiny.iou - 0.25).abs() < 1e-12, "{tiny:?}");
        // The whole image: every box holds the peak and all the energy.
        let all = box_stats(&map, n, [0.0, 0.0, 8.0, 8.0], 0.5);
        assert!(all.hit && (all.energy - 1.0).abs() < 1e-9 && (all.iou - 4.0 / 64.0).abs() < 1e-12);
        // An all-zero map (a one-cell layer after min-max scaling) points at nothing.
        let zero = box_stats(&vec![0.0; n * n], n, [0.0, 0.0, 8.0, 8.0], 0.5);
        assert!(!zero.hit && zero.energy == 0.0 && zero.iou == 0.0);
    }

    #[test]
    fn box_files_are_read_in_either_layout_and_bad_rows_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let generic = dir.path().join("boxes.csv");
        std::fs::write(
            &generic,
            "path,label,x,y,w,h\na.jpg,Zimmer,1,2,3,4\nb.jpg,,0,0,5,5\n",
        )
        .unwrap();
        let boxes = crate::data::formats::read_boxes(&generic).unwrap();
        assert_eq!(boxes.len(), 2);
        assert_eq!(boxes[0].xywh, [1.0, 2.0, 3.0, 4.0]);
        let classes = ["depuy".to_string(), "zimmer".to_string()];
        assert_eq!(
            class_of(&boxes[0], &classes).unwrap(),
            Some(1),
            "case-insensitive"
        );
        assert_eq!(
            class_of(&boxes[1], &classes).unwrap(),
            None,
            "no label: target class"
        );
        let mut other = boxes[0].clone();
        other.finding = "Atelectasis".into();
        let e = format!("{:#}", class_of(&other, &classes).unwrap_err());
        assert!(
            e.contains("boxes.csv:2") && e.contains("depuy, zimmer"),
            "{e}"
        );

        std::fs::write(&generic, "path,x,y,w,h\na.jpg,1,2,0,4\n").unwrap();
        let e = format!(
            "{:#}",
            crate::data::formats::read_boxes(&generic).unwrap_err()
        );
        assert!(
            e.contains("boxes.csv:2") && e.contains("`0`"),
            "a zero width is named: {e}"
        );
        std::fs::write(&generic, "image,x,y\na.jpg,1,2\n").unwrap();
        let e = format!(
            "{:#}",
            crate::data::formats::read_boxes(&generic).unwrap_err()
        );
        assert!(e.contains("path, x, y, w, h"), "{e}");
    }
}
