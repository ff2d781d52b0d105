//! `kind: proxy`: self-supervised proxy tasks that train an encoder without labels.
//!
//! - `rotation`: each image appears at 0/90/180/270 degrees in the same batch; predict the angle.
//! - `jigsaw`: 3x3 tiles (cropped with jitter so edges cannot be matched) are shuffled by one of
//!   `jigsaw_perms` permutations chosen for maximal Hamming distance; predict which. The shuffled
//!   tiles are reassembled into one image, so CNNs and ViTs take it unchanged.
//! - `exemplar`: every image is its own class under heavy augmentation (surrogate classes).
//! - `contrastive`: SimCLR, two augmented views per image, NT-Xent loss with a temperature.

use super::fit::{
    batch_tensors, run_epochs, schedule, store_size, EpochDone, ImageSet, OptimSpec, Schedule,
    SetSpec, Step,
};
use super::net::{Backbone, Net, NetDesc};
use crate::data::augment::{crop_resize, jigsaw_tiles, rotate90, Grey};
use crate::data::decode::OnBadImage;
use crate::data::loader::{self, Batch, TrainAug};
use crate::nn::ops::cross_entropy;
use crate::nn::tap::Taps;
use crate::rng::Rng;
use crate::stage::{InputSlot, Inputs, OutputSlot, StageCtx, Task};
use crate::train::schedule::scaled_lr;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;

pub struct Proxy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProxyKind {
    Rotation,
    Jigsaw,
    Exemplar,
    Contrastive,
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Params {
    /// `rotation`, `jigsaw`, `exemplar` or `contrastive`.
    pub task: ProxyKind,
    /// The network (`model`, `vit_dims`, `densenet_dims`, `img_size`, `patch`).
    #[serde(flatten)]
    pub backbone: Backbone,
    /// Passes over the training images.
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Images per batch (rotation puts 4 samples per image in it, contrastive 2).
    #[serde(default = "d_batch")]
    pub batch: usize,
    /// Base learning rate per 256 images: lr = blr x batch / 256.
    #[serde(default = "d_blr")]
    pub blr: f64,
    /// Epochs of linear warmup from 0 to the peak lr (cut to half the epochs if longer).
    #[serde(default = "d_warmup")]
    pub warmup_epochs: f64,
    /// AdamW weight decay (none on biases, norms, position embeddings and tokens).
    #[serde(default = "super::net::defaults::weight_decay")]
    pub weight_decay: f64,
    /// RandomResizedCrop area range [low, high] as fractions of the image.
    #[serde(default = "super::net::defaults::crop_scale")]
    pub crop_scale: (f64, f64),
    /// Images are decoded once at `decode_scale` x `img_size` and the crops drawn from there.
    #[serde(default = "super::net::defaults::decode_scale")]
    pub decode_scale: f64,
    /// Jigsaw: how many tile permutations to classify (chosen for maximal Hamming distance).
    #[serde(default = "d_perms")]
    pub jigsaw_perms: usize,
    /// Pixels of random offset inside each jigsaw cell.
    #[serde(default = "d_jitter")]
    pub jigsaw_jitter: usize,
    /// Contrastive: NT-Xent temperature.
    #[serde(default = "d_temp")]
    pub temperature: f64,
    /// Contrastive: width of the projection head's output.
    #[serde(default = "d_proj")]
    pub projection_dim: usize,
    /// Seeds the model's initial weights, the batches, masks and augmentations: the same seed gives the same run.
    #[serde(default)]
    pub seed: u64,
    /// Use at most this many images, evenly spaced (quick runs).
    #[serde(default)]
    pub max_images: Option<usize>,
    /// `error`: stop at an image that does not decode, naming its row; `skip`: leave it out and count it.
    #[serde(default)]
    pub on_bad_image: OnBadImage,
}

fn d_epochs() -> usize {
    5
}
fn d_batch() -> usize {
    32
}
fn d_blr() -> f64 {
    1e-3
}
fn d_warmup() -> f64 {
    1.0
}
fn d_perms() -> usize {
    30
}
fn d_jitter() -> usize {
    2
}
fn d_temp() -> f64 {
    0.2
}
fn d_proj() -> usize {
    64
}

impl Params {
    /// The network this stage trains, with `outputs` outputs for the proxy head.
    fn desc(&self, outputs: usize) -> NetDesc {
        self.backbone.desc(outputs, 0.0, Default::default())
    }
}

/// Permutations of `n` tiles chosen greedily for maximal minimum Hamming distance (Noroozi &
/// Favaro), from seeded random candidates; the identity comes first.
pub fn hamming_permutations(n: usize, count: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = Rng::new(seed);
    let mut set = vec![(0..n).collect::<Vec<usize>>()];
    let hamming = |a: &[usize], b: &[usize]| a.iter().zip(b).filter(|(x, y)| x != y).count();
    while set.len() < count {
        let mut best: Option<(usize, Vec<usize>)> = None;
        for _ in 0..200 {
            let mut cand: Vec<usize> = (0..n).collect();
            rng.shuffle(&mut cand);
            let d = set.iter().map(|s| hamming(s, &cand)).min().unwrap_or(n);
            if best.as_ref().is_none_or(|(bd, _)| d > *bd) {
                best = Some((d, cand));
            }
        }
        set.push(best.expect("candidates").1);
    }
    set
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct History {
    loss: Vec<f64>,
    accuracy: Vec<f64>,
}

/// How an image becomes the proxy task's samples: rotated copies, a shuffled jigsaw, itself, or
/// two views.
struct Samples {
    decoded: crate::data::decode::Decoded,
    train: Vec<usize>,
    norm: crate::data::loader::Normalize,
    aug: TrainAug,
    perms: Arc<Vec<Vec<usize>>>,
    task: ProxyKind,
    size: usize,
    jitter: usize,
}

impl Samples {
    fn of(&self, i: usize, rng: &mut Rng) -> Vec<crate::data::loader::Sample> {
        let (size, norm) = (self.size, self.norm);
        let v = loader::view(&self.decoded, self.train[i], size, Some(&self.aug), rng);
        match self.task {
            ProxyKind::Rotation => (0..4)
                .map(|k| (norm.apply(rotate90(&v, k)), k as u32))
                .collect(),
            ProxyKind::Jigsaw => {
                let which = rng.below(self.perms.len());
                let tile = size / 3;
                let tiles = jigsaw_tiles(&v, 3, tile, self.jitter, rng);
                let mut img = Grey {
                    size,
                    px: vec![0.0; size * size],
                };
                for (slot, &src) in self.perms[which].iter().enumerate() {
                    let (oy, ox) = ((slot / 3) * tile, (slot % 3) * tile);
                    for y in 0..tile {
                        for x in 0..tile {
                            img.px[(oy + y) * size + ox + x] = tiles[src].px[y * tile + x];
                        }
                    }
                }
                vec![(norm.apply(img), which as u32)]
            }
            ProxyKind::Exemplar => vec![(norm.apply(v), i as u32)],
            ProxyKind::Contrastive => {
                let w = loader::view(&self.decoded, self.train[i], size, Some(&self.aug), rng);
                let whole = crop_resize(&w, 0.0, 0.0, size as f32, size as f32, size);
                vec![(norm.apply(v), 0), (norm.apply(whole), 0)]
            }
        }
    }
}

/// The proxy task as the shared epoch loop runs it.
struct ProxyTraining<'a> {
    p: &'a Params,
    net: &'a Net,
    dev: &'a candle_core::Device,
    samples: Arc<Samples>,
    /// Right answers this epoch (not for `contrastive`).
    correct: usize,
}

impl Step for ProxyTraining<'_> {
    type History = History;

    fn batches(&self, epoch: usize) -> crate::data::loader::Batches {
        let samples = self.samples.clone();
        loader::epoch(
            samples.train.len(),
            self.p.batch,
            loader::Order::Shuffled {
                seed: self.p.seed,
                epoch: epoch as u64,
            },
            loader::LastBatch::Keep,
            self.p.backbone.img_size,
            move |i, rng| samples.of(i, rng),
        )
    }

    fn loss(&mut self, b: &Batch, _: usize, _: usize, rng: &mut Rng) -> Result<Tensor> {
        let (x, y) = batch_tensors(b, self.dev)?;
        let logits = self.net.logits(&x, Some(rng), &mut Taps::none())?;
        Ok(match self.p.task {
            ProxyKind::Contrastive => nt_xent(&logits, self.p.temperature)?,
            _ => {
                let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
                self.correct += pred.iter().zip(&b.y).filter(|(a, b)| a == b).count();
                cross_entropy(&logits, &y, 0.0)?
            }
        })
    }

    fn end_epoch(
        &mut self,
        epoch: usize,
        done: &EpochDone,
        h: &mut History,
        ctx: &StageCtx,
    ) -> Result<()> {
        h.loss.push(done.mean_loss);
        h.accuracy
            .push(std::mem::take(&mut self.correct) as f64 / done.images.max(1) as f64);
        ctx.log(&format!(
            "epoch {} loss {:.4} proxy accuracy {:.3}",
            epoch + 1,
            h.loss[epoch],
            h.accuracy[epoch]
        ));
        Ok(())
    }
}

/// NT-Xent over 2N embeddings laid out as pairs (2i, 2i+1).
fn nt_xent(z: &Tensor, temperature: f64) -> Result<Tensor> {
    let n2 = z.dim(0)?;
    let norm = z
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-8, f64::MAX)?;
    let z = z.broadcast_div(&norm)?;
    let sim = (z.matmul(&z.t()?)? / temperature)?;
    let eye = Tensor::eye(n2, DType::F32, z.device())?;
    let sim = (sim - (eye * 1e9)?)?;
    let targets: Vec<u32> = (0..n2 as u32).map(|i| i ^ 1).collect();
    Ok(cross_entropy(
        &sim,
        &Tensor::new(targets.as_slice(), z.device())?,
        0.0,
    )?)
}

impl Task for Proxy {
    const KIND: &'static str = "proxy";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str = "self-supervised proxy task (rotation, jigsaw, exemplar, contrastive) that trains an encoder";
    const TRAINS: bool = true;
    type Params = Params;

    fn inputs(_: &Params) -> Option<Vec<InputSlot>> {
        Some(super::net::images_and_init_inputs())
    }

    fn lint(p: &Params) -> Vec<String> {
        super::checks::warmup_lint(p.warmup_epochs, p.epochs)
    }

    fn check(p: &Params) -> super::checks::Checked {
        use super::checks::{crop_scale, positive, positive_f, schedule, within};
        p.desc(1).check()?;
        schedule(p.epochs, p.batch, p.warmup_epochs, p.weight_decay)?;
        positive_f("blr", p.blr)?;
        within("decode_scale", p.decode_scale, 1.0, 8.0, false)?;
        crop_scale(p.crop_scale)?;
        match p.task {
            ProxyKind::Jigsaw => {
                if p.backbone.img_size < 3 * (p.jigsaw_jitter + 1) {
                    return Err(format!(
                        "jigsaw needs `img_size` of at least 3 x (jitter + 1) = {} pixels",
                        3 * (p.jigsaw_jitter + 1)
                    ));
                }
                if p.jigsaw_perms < 2 {
                    return Err("`jigsaw_perms` must be at least 2".into());
                }
            }
            ProxyKind::Contrastive => {
                positive_f("temperature", p.temperature)?;
                positive("projection_dim", p.projection_dim)?;
            }
            ProxyKind::Rotation | ProxyKind::Exemplar => {}
        }
        Ok(())
    }

    fn outputs(_: &Params) -> Vec<OutputSlot> {
        vec![OutputSlot {
            name: "encoder",
            path: "encoder.safetensors",
            doc: "the trained backbone without the proxy head",
        }]
    }

    fn run(p: &Params, inputs: &Inputs, ctx: &mut StageCtx) -> Result<Value> {
        let dev = ctx.compute_device()?;
        let spec = SetSpec::whole(
            store_size(p.backbone.img_size, p.decode_scale),
            p.max_images,
            p.on_bad_image,
        );
        let (set, train, norm) = ImageSet::unlabelled(inputs.item("images")?, &spec, ctx)?;
        if train.len() < 2 {
            bail!(
                "{}: a proxy task needs at least two images",
                inputs.path("images")?.display()
            );
        }
        let perms = Arc::new(hamming_permutations(
            9,
            p.jigsaw_perms.max(2),
            p.seed ^ 0x7165,
        ));
        let outputs = match p.task {
            ProxyKind::Rotation => 4,
            ProxyKind::Jigsaw => perms.len(),
            ProxyKind::Exemplar => train.len(),
            ProxyKind::Contrastive => p.projection_dim,
        };
        let desc = p.desc(outputs);
        let net = Net::build(&desc, p.seed, &dev)?;
        if let Some(init) = inputs.optional_path("init") {
            let note = net.load_init(init)?;
            ctx.log(&format!("initialised from {} {note}", init.display()));
        }
        let mut opt = super::fit::optimizer(
            &net.params,
            &OptimSpec {
                weight_decay: p.weight_decay,
                betas: (0.9, 0.999),
                layer_decay: None,
                only: None,
                lars: false,
            },
        );
        let strong = TrainAug {
            crop_scale: if p.task == ProxyKind::Rotation || p.task == ProxyKind::Jigsaw {
                p.crop_scale
            } else {
                (0.2, 1.0)
            },
            center_bias: 0.0,
            hflip: p.task != ProxyKind::Rotation,
            quarter_turns: false,
            randaug: matches!(p.task, ProxyKind::Exemplar | ProxyKind::Contrastive)
                .then_some((2, 9.0)),
        };
        let plan = Schedule {
            epochs: p.epochs,
            steps_per_epoch: train.len().div_ceil(p.batch),
            lr: schedule(scaled_lr(p.blr, p.batch), 1e-6, p.warmup_epochs, p.epochs),
            clip_grad: None,
            seed: p.seed,
            stream: 0x9B0C,
        };
        let mut kind = ProxyTraining {
            p,
            net: &net,
            dev: &dev,
            samples: Arc::new(Samples {
                decoded: set.decoded.clone(),
                train: train.clone(),
                norm,
                aug: strong,
                perms: perms.clone(),
                task: p.task,
                size: p.backbone.img_size,
                jitter: p.jigsaw_jitter,
            }),
            correct: 0,
        };
        let h = run_epochs(&mut kind, &plan, &net.params, &mut opt, ctx)?;
        net.save_encoder(&ctx.out_dir.join("encoder.safetensors"))?;
        Ok(
            json!({ "task": p.task, "loss": h.loss, "proxy_accuracy": if p.task == ProxyKind::Contrastive { Value::Null } else { json!(h.accuracy) }, "images": train.len() }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_distinct_and_spread() {
        let p = hamming_permutations(9, 30, 1);
        assert_eq!(p.len(), 30);
        for (i, a) in p.iter().enumerate() {
            for b in &p[i + 1..] {
                assert!(
                    a.iter().zip(b).filter(|(x, y)| x != y).count() >= 5,
                    "permutations too close"
                );
            }
        }
    }
}
