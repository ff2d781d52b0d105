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

mod boxes;
mod gallery;
mod maps;
mod stats;

pub use stats::{box_stats, map_stats, BoxStats, MapStats};

/// CSS colours of the maps' colour map from 0 to 1 (for a report's colour bar).
pub fn colour_stops(stops: usize) -> Vec<String> {
    gallery::css_stops(stops)
}

use super::fit::{ImageSet, SetSpec};
use super::net::{ModelCard, Net};
use crate::data::decode::OnBadImage;
use crate::data::loader;
use crate::data::loader::Normalize;
use crate::data::source::Split;
use crate::nn::gradcam::CamMethod;
use crate::stage::{InputSlot, Inputs, OutputSlot, StageCtx, Task};
use anyhow::{bail, Context, Result};
use boxes::{place_boxes, PlacedBox};
use candle_core::{Device, Tensor};
use gallery::{Gallery, Tile};
use maps::{deletion_insertion, maps_for};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use stats::{box_summary, faithfulness_summary, summary};
use std::collections::BTreeMap;

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
        let explainer = Explainer {
            p,
            layer: p.layer.clone().unwrap_or_else(|| net.cam_layer(size)),
            method: match p.method {
                Method::Gradcam => CamMethod::GradCam,
                Method::GradcamPlusPlus => CamMethod::GradCamPlusPlus,
            },
            random: Net::build(&card.net, p.seed ^ 0xBA5E, &Device::Cpu)?,
            net,
            size,
            iou_threshold,
        };
        let mut out = Written {
            maps: csv::Writer::from_path(ctx.out_dir.join("maps.csv"))?,
            boxes: match boxes {
                Some(_) => Some(csv::Writer::from_path(ctx.out_dir.join("boxes.csv"))?),
                None => None,
            },
            tally: Tally::default(),
            gallery: Gallery::new(p.overlays, card.classes.len()),
        };
        for (chunk_no, chunk) in test.chunks(CHUNK).enumerate() {
            let first = chunk_no * CHUNK;
            let placed: Vec<&[PlacedBox]> = (first..first + chunk.len())
                .map(|pos| {
                    boxes
                        .as_ref()
                        .and_then(|b| b.get(&pos))
                        .map_or(&[][..], Vec::as_slice)
                })
                .collect();
            explainer
                .chunk(&set, &card, chunk, &placed, &mut out)
                .with_context(|| format!("Grad-CAM at layer `{}`", explainer.layer))?;
            ctx.report((first + chunk.len()) as u64, test.len() as u64, "maps");
        }
        out.maps.flush()?;
        if let Some(w) = &mut out.boxes {
            w.flush()?;
        }
        out.gallery.write(&set, &card.classes, size, &ctx.out_dir)?;
        let t = &out.tally;
        let or_null = |empty: bool, v: Value| if empty { Value::Null } else { v };
        Ok(json!({
            "layer": explainer.layer, "method": p.method, "target": p.target, "images": t.stats.len(), "center_fraction": p.center_fraction,
            "model": summary(&t.stats), "random_baseline": or_null(t.base_stats.is_empty(), summary(&t.base_stats)),
            "faithfulness": or_null(t.faith.is_empty(), json!({
                "model": faithfulness_summary(&t.faith),
                "random_baseline": or_null(t.base_faith.is_empty(), faithfulness_summary(&t.base_faith)),
            })),
            "boxes": match boxes {
                None => Value::Null,
                Some(placed) => json!({
                    "boxes": t.box_model.len(), "images": placed.len(), "outside_test_split": unmatched,
                    "iou_threshold": iou_threshold, "model": box_summary(&t.box_model),
                    "random_baseline": or_null(t.box_base.is_empty(), box_summary(&t.box_base)),
                }),
            },
        }))
    }
}

/// Test images explained per batch of forward and backward passes.
const CHUNK: usize = 16;

/// One row of `maps.csv`: a test image, the class explained, and its map's statistics (the
/// `random_` columns: the random-weights model's map; empty without `random_baseline`).
#[derive(Serialize)]
struct MapRow<'a> {
    path: String,
    label: &'a str,
    prediction: &'a str,
    target: &'a str,
    center_energy: f64,
    com_distance: f64,
    entropy: f64,
    random_center_energy: Option<f64>,
    random_com_distance: Option<f64>,
    random_entropy: Option<f64>,
    deletion_auc: Option<f64>,
    insertion_auc: Option<f64>,
    random_deletion_auc: Option<f64>,
    random_insertion_auc: Option<f64>,
}

/// One row of `boxes.csv`: a box (in map pixels) scored against the map of `explained_class`.
#[derive(Serialize)]
struct BoxRow<'a> {
    path: &'a str,
    finding: &'a str,
    explained_class: &'a str,
    x: f64,
    y: f64,
    w: f64,
    h: f64,
    hit: u8,
    iou: f64,
    energy_in_box: f64,
    random_hit: Option<u8>,
    random_iou: Option<f64>,
    random_energy_in_box: Option<f64>,
}

/// What the stage accumulates over the test images for its metrics.
#[derive(Default)]
struct Tally {
    stats: Vec<MapStats>,
    base_stats: Vec<MapStats>,
    faith: Vec<[f64; 2]>,
    base_faith: Vec<[f64; 2]>,
    box_model: Vec<BoxStats>,
    box_base: Vec<BoxStats>,
}

/// Where the per-image results go.
struct Written {
    maps: csv::Writer<std::fs::File>,
    boxes: Option<csv::Writer<std::fs::File>>,
    tally: Tally,
    gallery: Gallery,
}

/// The maps of one chunk of images: the trained model's and, optionally, a random-weights twin's.
struct ChunkMaps {
    model: Vec<Vec<f32>>,
    random: Option<Vec<Vec<f32>>>,
}

/// The trained model, its random-weights twin, and how they are explained.
struct Explainer<'a> {
    p: &'a Params,
    net: Net,
    random: Net,
    layer: String,
    method: CamMethod,
    size: usize,
    iou_threshold: f64,
}

impl Explainer<'_> {
    /// Maps of `x` for one class per image (`targets`), from the model and (when asked) the twin.
    fn maps(&self, x: &Tensor, targets: &[usize]) -> Result<ChunkMaps> {
        let model = maps_for(
            &self.net,
            &self.layer,
            x,
            &one_each(targets),
            self.size,
            self.method,
        )?
        .0;
        let random = self.random_maps(x, targets)?;
        Ok(ChunkMaps { model, random })
    }

    /// The random-weights twin's maps, when the params ask for that baseline.
    fn random_maps(&self, x: &Tensor, targets: &[usize]) -> Result<Option<Vec<Vec<f32>>>> {
        if !self.p.random_baseline {
            return Ok(None);
        }
        let maps = maps_for(
            &self.random,
            &self.layer,
            x,
            &one_each(targets),
            self.size,
            self.method,
        )?;
        Ok(Some(maps.0))
    }

    /// Deletion and insertion AUCs per image (`None` when `deletion_steps` is 0).
    fn faithfulness(
        &self,
        x: &Tensor,
        maps: &[Vec<f32>],
        targets: &[usize],
    ) -> Result<Vec<Option<[f64; 2]>>> {
        if self.p.deletion_steps == 0 {
            return Ok(vec![None; maps.len()]);
        }
        Ok(
            deletion_insertion(&self.net, x, maps, targets, self.p.deletion_steps)?
                .into_iter()
                .map(Some)
                .collect(),
        )
    }

    /// Explains the test positions `chunk`, whose boxes are `placed` (one slice per image).
    fn chunk(
        &self,
        set: &ImageSet,
        card: &ModelCard,
        chunk: &[usize],
        placed: &[&[PlacedBox]],
        out: &mut Written,
    ) -> Result<()> {
        let e = self.explain(set, card, chunk, placed)?;
        let cls = |c: usize| card.classes[c].as_str();
        for (j, &i) in chunk.iter().enumerate() {
            let path = set.dataset.samples[set.sample_of[i]]
                .path
                .display()
                .to_string();
            let center = self.p.center_fraction;
            let s = map_stats(&e.maps.model[j], self.size, center);
            let b = (e.maps.random.as_ref()).map(|m| map_stats(&m[j], self.size, center));
            let (f, fb) = (e.f_model[j], e.f_base[j]);
            out.maps.serialize(MapRow {
                label: cls(e.labels[j]),
                prediction: cls(e.predicted[j].0),
                target: cls(e.targets[j]),
                center_energy: s.center_energy,
                com_distance: s.com_distance,
                entropy: s.entropy,
                random_center_energy: b.map(|b| b.center_energy),
                random_com_distance: b.map(|b| b.com_distance),
                random_entropy: b.map(|b| b.entropy),
                deletion_auc: f.map(|f| f[0]),
                insertion_auc: f.map(|f| f[1]),
                random_deletion_auc: fb.map(|f| f[0]),
                random_insertion_auc: fb.map(|f| f[1]),
                path: path.clone(),
            })?;
            for pb in placed[j] {
                self.score_box(&e, j, pb, &path, &card.classes, out)?;
            }
            out.tally.stats.push(s);
            out.tally.base_stats.extend(b);
            out.tally.faith.extend(f);
            out.tally.base_faith.extend(fb);
            let (guess, probability) = e.predicted[j];
            if out.gallery.wants(e.labels[j], e.labels[j] == guess) {
                out.gallery.offer(Tile {
                    pos: i,
                    label: e.labels[j],
                    predicted: guess,
                    probability,
                    map: e.maps.model[j].clone(),
                });
            }
        }
        Ok(())
    }

    /// The maps, predictions and faithfulness of one chunk of test images.
    fn explain(
        &self,
        set: &ImageSet,
        card: &ModelCard,
        chunk: &[usize],
        placed: &[&[PlacedBox]],
    ) -> Result<Explained> {
        let size = self.size;
        let norm = Normalize {
            mean: card.mean,
            std: card.std,
        };
        let x: Vec<f32> = chunk
            .iter()
            .flat_map(|&i| norm.apply(loader::resized(&set.decoded, i, size)))
            .collect();
        let x = Tensor::from_vec(x, (chunk.len(), 1, size, size), &Device::Cpu)?;
        let labels: Vec<usize> = chunk
            .iter()
            .map(|&i| set.label(i).map(|l| l as usize))
            .collect::<Result<_>>()?;
        // The labels' maps come with the predictions; explaining the labels reuses them.
        let (label_maps, predicted) = maps_for(
            &self.net,
            &self.layer,
            &x,
            &one_each(&labels),
            size,
            self.method,
        )?;
        let (targets, maps) = match self.p.target {
            Target::Label => {
                let random = self.random_maps(&x, &labels)?;
                let maps = ChunkMaps {
                    model: label_maps,
                    random,
                };
                (labels.clone(), maps)
            }
            Target::Prediction => {
                let targets: Vec<usize> = predicted.iter().map(|&(c, _)| c).collect();
                let maps = self.maps(&x, &targets)?;
                (targets, maps)
            }
        };
        let f_model = self.faithfulness(&x, &maps.model, &targets)?;
        let f_base = match &maps.random {
            Some(r) => self.faithfulness(&x, r, &targets)?,
            None => vec![None; chunk.len()],
        };
        // Boxes of a finding other than the image's target need that class's maps.
        let mut other: BTreeMap<usize, ChunkMaps> = BTreeMap::new();
        for (j, boxes) in placed.iter().enumerate() {
            for c in boxes.iter().map(|b| b.class.unwrap_or(targets[j])) {
                if c != targets[j] && !other.contains_key(&c) {
                    other.insert(c, self.maps(&x, &vec![c; chunk.len()])?);
                }
            }
        }
        Ok(Explained {
            labels,
            predicted,
            targets,
            maps,
            other,
            f_model,
            f_base,
        })
    }

    /// Scores box `pb` on image `j` of a chunk against the map of its finding.
    fn score_box(
        &self,
        e: &Explained,
        j: usize,
        pb: &PlacedBox,
        path: &str,
        classes: &[String],
        out: &mut Written,
    ) -> Result<()> {
        let c = pb.class.unwrap_or(e.targets[j]);
        let m = e.other.get(&c).unwrap_or(&e.maps);
        let bs = box_stats(&m.model[j], self.size, pb.xywh, self.iou_threshold);
        let rs =
            (m.random.as_ref()).map(|r| box_stats(&r[j], self.size, pb.xywh, self.iou_threshold));
        let [x, y, w, h] = pb.xywh;
        if let Some(csv) = &mut out.boxes {
            csv.serialize(BoxRow {
                path,
                finding: &pb.finding,
                explained_class: &classes[c],
                x,
                y,
                w,
                h,
                hit: bs.hit as u8,
                iou: bs.iou,
                energy_in_box: bs.energy,
                random_hit: rs.map(|r| r.hit as u8),
                random_iou: rs.map(|r| r.iou),
                random_energy_in_box: rs.map(|r| r.energy),
            })?;
        }
        out.tally.box_model.push(bs);
        out.tally.box_base.extend(rs);
        Ok(())
    }
}

/// What one chunk of test images gives: the classes explained, their maps and faithfulness.
struct Explained {
    labels: Vec<usize>,
    /// Predicted class and its probability, per image.
    predicted: Vec<(usize, f64)>,
    targets: Vec<usize>,
    maps: ChunkMaps,
    /// Maps of classes other than an image's target, for boxes of another finding.
    other: BTreeMap<usize, ChunkMaps>,
    f_model: Vec<Option<[f64; 2]>>,
    f_base: Vec<Option<[f64; 2]>>,
}

/// One class to explain per image, as `grad_cam` takes them.
fn one_each(classes: &[usize]) -> Vec<Vec<usize>> {
    classes.iter().map(|&c| vec![c]).collect()
}
