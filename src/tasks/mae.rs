//! `kind: mae`: masked-autoencoder pretraining of a ViT on unlabelled radiographs, with the X-ray
//! recipe as defaults (mask ratio 0.9, RandomResizedCrop 0.5-1.0, AdamW betas (0.9, 0.95), weight
//! decay 0.05, base lr 1.5e-4 x batch/256, warmup then cosine per iteration). Can continue from an
//! upstream encoder (chest MAE -> shoulder MAE).

use super::fit::{
    run_epochs, schedule, store_size, EpochDone, ImageSet, OptimSpec, Schedule, SetSpec, Step,
};
use super::net::{Backbone, Net, NetDesc};
use crate::data::decode::OnBadImage;
use crate::data::loader::{self, Batch, Normalize, TrainAug};
use crate::nn::mae::{masking_noise, plan_mask, Mae, MaeConfig, Masking};
use crate::nn::masked_cnn::{masked_mse, pixel_mask, PixelHead};
use crate::nn::params::ParamStore;
use crate::nn::pos_embed::sincos_2d_tensor;
use crate::rng::Rng;
use crate::stage::{InputSlot, Inputs, OutputSlot, StageCtx, Task};
use crate::train::schedule::scaled_lr;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;

pub struct MaeTask;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MaskingKind {
    Random,
    Center,
    Block,
    Grid,
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Params {
    /// The network (`model`, `vit_dims`, `densenet_dims`, `img_size`, `patch`).
    #[serde(flatten)]
    pub backbone: Backbone,
    /// MAE decoder width.
    #[serde(default = "d_dec_dim")]
    pub decoder_dim: usize,
    /// MAE decoder blocks.
    #[serde(default = "d_dec_depth")]
    pub decoder_depth: usize,
    /// MAE decoder attention heads.
    #[serde(default = "d_dec_heads")]
    pub decoder_heads: usize,
    /// Share of patches masked (X-rays: 0.9; natural images: 0.75).
    #[serde(default = "d_ratio")]
    pub mask_ratio: f64,
    /// Which patches are masked: `random` (MAE), `center` (weighted towards the image centre), `block` (squares of `block_size` patches), `grid` (a regular pattern).
    #[serde(default = "d_masking")]
    pub masking: MaskingKind,
    /// Width of the centre weighting (`masking: center`), in half-widths of the image.
    #[serde(default = "d_sigma")]
    pub center_sigma: f64,
    /// Side of the masked blocks in patches (`masking: block`).
    #[serde(default = "d_block")]
    pub block_size: usize,
    /// Normalise each target patch by its own mean and variance (MAE's norm-pix loss).
    #[serde(default = "yes")]
    pub norm_pix_loss: bool,
    /// Passes over the training images.
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Images per optimiser step.
    #[serde(default = "d_batch")]
    pub batch: usize,
    /// Base lr per 256 images; the lr used is blr x batch / 256.
    #[serde(default = "d_blr")]
    pub blr: f64,
    /// The learning rate the cosine schedule ends at.
    #[serde(default)]
    pub min_lr: f64,
    /// Epochs of linear warmup from 0 to the peak lr (cut to half the epochs if longer).
    #[serde(default = "d_warmup")]
    pub warmup_epochs: f64,
    /// AdamW weight decay (none on biases, norms, position embeddings and tokens).
    #[serde(default = "super::net::defaults::weight_decay")]
    pub weight_decay: f64,
    /// RandomResizedCrop area range [low, high] as fractions of the image.
    #[serde(default = "super::net::defaults::crop_scale")]
    pub crop_scale: (f64, f64),
    /// Images are decoded once at `decode_scale` x `img_size` and the random crops drawn from
    /// that store, so a crop is resampled from pixels, not upsampled from a 64 px copy.
    #[serde(default = "super::net::defaults::decode_scale")]
    pub decode_scale: f64,
    /// Seeds the model's initial weights, the batches, masks and augmentations: the same seed gives the same run.
    #[serde(default)]
    pub seed: u64,
    /// Use at most this many images (evenly spaced), for quick runs.
    #[serde(default)]
    pub max_images: Option<usize>,
    /// `error`: stop at an image that does not decode, naming its row; `skip`: leave it out and count it.
    #[serde(default)]
    pub on_bad_image: OnBadImage,
    /// Images shown in `reconstructions.png`.
    #[serde(default = "d_recon")]
    pub recon_images: usize,
}

fn d_dec_dim() -> usize {
    128
}
fn d_dec_depth() -> usize {
    2
}
fn d_dec_heads() -> usize {
    4
}
fn d_ratio() -> f64 {
    0.9
}
fn d_masking() -> MaskingKind {
    MaskingKind::Random
}
fn d_sigma() -> f64 {
    0.5
}
fn d_block() -> usize {
    2
}
fn yes() -> bool {
    true
}
fn d_epochs() -> usize {
    20
}
fn d_batch() -> usize {
    64
}
fn d_blr() -> f64 {
    1.5e-4
}
fn d_warmup() -> f64 {
    2.0
}
fn d_recon() -> usize {
    6
}

impl Params {
    fn masking(&self) -> Masking {
        match self.masking {
            MaskingKind::Random => Masking::Random,
            MaskingKind::Center => Masking::Center {
                sigma: self.center_sigma,
            },
            MaskingKind::Block => Masking::Block {
                block: self.block_size,
            },
            MaskingKind::Grid => Masking::Grid,
        }
    }

    fn desc(&self) -> NetDesc {
        self.backbone.desc(0, 0.0, Default::default())
    }

    fn config(&self) -> Result<MaeConfig> {
        let v = self.desc().vit_config()?;
        if !(0.0..1.0).contains(&self.mask_ratio)
            || MaeConfig::len_keep(&mae_config(&v, self), self.mask_ratio) == 0
        {
            bail!(
                "mask_ratio {} leaves no visible patch of {}",
                self.mask_ratio,
                v.num_patches()
            );
        }
        Ok(mae_config(&v, self))
    }
}

fn mae_config(v: &crate::nn::vit::VitConfig, p: &Params) -> MaeConfig {
    MaeConfig {
        img_size: p.backbone.img_size,
        patch_size: p.backbone.patch,
        in_chans: 1,
        embed_dim: v.embed_dim,
        depth: v.depth,
        num_heads: v.num_heads,
        decoder_embed_dim: p.decoder_dim,
        decoder_depth: p.decoder_depth,
        decoder_num_heads: p.decoder_heads,
        mlp_ratio: 4.0,
        norm_pix_loss: p.norm_pix_loss,
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct History {
    loss: Vec<f64>,
}

impl Task for MaeTask {
    const KIND: &'static str = "mae";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str = "masked-image pretraining on radiographs: the official MAE for ViTs, a SimMIM-style variant for CNNs";
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
        p.desc().check()?;
        schedule(p.epochs, p.batch, p.warmup_epochs, p.weight_decay)?;
        positive_f("blr", p.blr)?;
        within("min_lr", p.min_lr, 0.0, f64::MAX, false)?;
        within("decode_scale", p.decode_scale, 1.0, 8.0, false)?;
        crop_scale(p.crop_scale)?;
        if !p.backbone.img_size.is_multiple_of(p.backbone.patch) {
            return Err(format!(
                "`img_size` {} is not a multiple of the masking `patch` {}",
                p.backbone.img_size, p.backbone.patch
            ));
        }
        let patches = (p.backbone.img_size / p.backbone.patch).pow(2);
        let kept = (patches as f64 * (1.0 - p.mask_ratio)) as usize;
        if !(0.0..1.0).contains(&p.mask_ratio) || kept == 0 {
            return Err(format!(
                "`mask_ratio` {} leaves no visible patch of {patches}",
                p.mask_ratio
            ));
        }
        if p.desc().is_vit() {
            positive("decoder_dim", p.decoder_dim)?;
            positive("decoder_depth", p.decoder_depth)?;
            positive("decoder_heads", p.decoder_heads)?;
            if !p.decoder_dim.is_multiple_of(p.decoder_heads) {
                return Err(format!(
                    "{} `decoder_heads` do not divide `decoder_dim` {}",
                    p.decoder_heads, p.decoder_dim
                ));
            }
        }
        Ok(())
    }

    fn outputs(_: &Params) -> Vec<OutputSlot> {
        vec![
            OutputSlot {
                name: "encoder",
                path: "encoder.safetensors",
                doc: "the ViT encoder, timm names (pos_embed included)",
            },
            OutputSlot {
                name: "mae",
                path: "mae.safetensors",
                doc: "encoder and decoder, official MAE names",
            },
            OutputSlot {
                name: "recon",
                path: "reconstructions.png",
                doc: "original | masked | reconstruction | reconstruction + visible",
            },
        ]
    }

    fn run(p: &Params, inputs: &Inputs, ctx: &mut StageCtx) -> Result<Value> {
        if p.desc().is_vit() {
            run_vit(p, inputs, ctx)
        } else {
            run_cnn(p, inputs, ctx)
        }
    }
}

/// The pretraining images (see `ImageSet::unlabelled`), refusing an empty set.
fn pretraining_set(
    p: &Params,
    inputs: &Inputs,
    ctx: &StageCtx,
) -> Result<(ImageSet, Vec<usize>, Normalize)> {
    let spec = SetSpec::whole(
        store_size(p.backbone.img_size, p.decode_scale),
        p.max_images,
        p.on_bad_image,
    );
    let (set, train, norm) = ImageSet::unlabelled(inputs.item("images")?, &spec, ctx)?;
    if train.is_empty() {
        bail!(
            "{}: no images to pretrain on",
            inputs.path("images")?.display()
        );
    }
    Ok((set, train, norm))
}

/// One pretraining epoch's batches: augmented, normalised views.
fn epoch_batches(
    p: &Params,
    set: &ImageSet,
    train: &[usize],
    norm: Normalize,
    epoch: usize,
) -> crate::data::loader::Batches {
    let aug = TrainAug {
        crop_scale: p.crop_scale,
        center_bias: 0.0,
        hflip: true,
        quarter_turns: false,
        randaug: None,
    };
    let (d, t, size) = (
        std::sync::Arc::new(set.decoded.clone()),
        train.to_vec(),
        p.backbone.img_size,
    );
    loader::epoch(
        train.len(),
        p.batch,
        loader::Order::Shuffled {
            seed: p.seed,
            epoch: epoch as u64,
        },
        loader::LastBatch::Keep,
        size,
        move |item, rng| {
            vec![(
                norm.apply(loader::view(&d, t[item], size, Some(&aug), rng)),
                0,
            )]
        },
    )
}

fn masks(p: &Params, n: usize, grid: usize, epoch: usize, step: usize) -> Vec<f32> {
    let mut rng = Rng::stream(p.seed, epoch as u64, 0x3A5C_0000 + step as u64);
    masking_noise(p.masking(), n, grid, p.mask_ratio, &mut || rng.f64())
}

fn run_vit(p: &Params, inputs: &Inputs, ctx: &mut StageCtx) -> Result<Value> {
    let cfg = p.config()?;
    let dev = ctx.compute_device()?;
    let (set, train, norm) = pretraining_set(p, inputs, ctx)?;
    let params = ParamStore::seeded(p.seed);
    let mae = Mae::new(&cfg, params.var_builder(&dev))?;
    if let Some(init) = inputs.optional_path("init") {
        let tensors = super::net::read_tensors(init)?;
        super::net::refuse_non_finite(&tensors, init)?;
        let report = params.load_tensors(&tensors, |k| {
            k == "pos_embed" || k.starts_with("head.") || k.starts_with("fc_norm.")
        })?;
        let missing: Vec<&String> = report
            .missing
            .iter()
            .filter(|n| !n.starts_with("decoder") && *n != "mask_token" && !n.starts_with("norm."))
            .collect();
        if !missing.is_empty() || !report.mismatched.is_empty() {
            bail!(
                "init {} does not fit this MAE encoder: {}",
                init.display(),
                report.describe()
            );
        }
        ctx.log(&format!("initialised the encoder from {}", init.display()));
    }
    let history = train_loop(
        p,
        &set,
        &train,
        norm,
        &params,
        &dev,
        ctx,
        |x, epoch, step, _rng| {
            let noise = masks(p, x.dim(0)?, cfg.grid(), epoch, step);
            Ok(mae.forward(x, &noise, p.mask_ratio)?.loss)
        },
    )?;
    // The encoder in timm names, with its fixed sin-cos position embedding, which a fine-tuned
    // ViT starts its learned one from.
    let mut encoder: HashMap<String, Tensor> = params
        .named()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("decoder") && n != "mask_token")
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    encoder.insert(
        "pos_embed".into(),
        sincos_2d_tensor(cfg.embed_dim, cfg.grid(), true, &dev)?,
    );
    candle_core::safetensors::save(&encoder, ctx.out_dir.join("encoder.safetensors"))?;
    params.save_safetensors(&ctx.out_dir.join("mae.safetensors"), |_| true)?;

    let shown = shown_images(p, &set, &train, norm, &dev)?;
    let n = shown.dim(0)?;
    let mut rng = Rng::new(p.seed ^ 0x5EC0);
    let noise = masking_noise(p.masking(), n, cfg.grid(), p.mask_ratio, &mut || rng.f64());
    let out = mae.forward(&shown, &noise, p.mask_ratio)?;
    let mut pred = out.pred.clone();
    if p.norm_pix_loss {
        // Undo the per-patch normalisation with the target's own statistics, as MAE's demo does.
        let target = mae.patchify(&shown)?;
        let mean = target.mean_keepdim(2)?;
        let var =
            (target.broadcast_sub(&mean)?.sqr()?.sum_keepdim(2)? / ((target.dim(2)? - 1) as f64))?;
        pred = pred
            .broadcast_mul(&(var + 1e-6)?.sqrt()?)?
            .broadcast_add(&mean)?;
    }
    let mask_px = mae.unpatchify(&out.mask.unsqueeze(2)?.repeat((
        1,
        1,
        p.backbone.patch * p.backbone.patch,
    ))?)?;
    write_panels(
        &shown,
        &mae.unpatchify(&pred)?,
        &mask_px,
        norm,
        &ctx.out_dir.join("reconstructions.png"),
    )?;
    Ok(summary(p, &history, &set, train.len(), norm))
}

fn run_cnn(p: &Params, inputs: &Inputs, ctx: &mut StageCtx) -> Result<Value> {
    let dev = ctx.compute_device()?;
    if !p.backbone.img_size.is_multiple_of(p.backbone.patch) {
        bail!(
            "img_size {} is not a multiple of the masking patch {}",
            p.backbone.img_size,
            p.backbone.patch
        );
    }
    let (set, train, norm) = pretraining_set(p, inputs, ctx)?;
    let net = Net::build(&p.desc(), p.seed, &dev)?;
    if let Some(init) = inputs.optional_path("init") {
        let note = net.load_init(init)?;
        ctx.log(&format!("initialised from {} {note}", init.display()));
    }
    let probe = net.feature_map(
        &Tensor::zeros(
            (1, 1, p.backbone.img_size, p.backbone.img_size),
            candle_core::DType::F32,
            &dev,
        )?,
        None,
    )?;
    let (_, channels, side, _) = probe.dims4()?;
    if !p.backbone.img_size.is_multiple_of(side) {
        bail!(
            "img_size {} is not a multiple of the feature map ({side})",
            p.backbone.img_size
        );
    }
    let head = PixelHead::new(
        channels,
        p.backbone.img_size / side,
        net.params.var_builder(&dev).pp("decoder_pred"),
    )?;
    let grid = p.backbone.img_size / p.backbone.patch;
    let len_keep = ((grid * grid) as f64 * (1.0 - p.mask_ratio)) as usize;
    let reconstruct =
        |x: &Tensor, noise: &[f32], rng: Option<&mut Rng>| -> Result<(Tensor, Tensor)> {
            let n = x.dim(0)?;
            let plan = plan_mask(noise, n, grid * grid, len_keep);
            let mask = pixel_mask(&plan.mask, grid, p.backbone.patch, &dev)?;
            let visible = x.mul(&(1.0 - &mask)?)?;
            Ok((head.forward(&net.feature_map(&visible, rng)?)?, mask))
        };
    let history = train_loop(
        p,
        &set,
        &train,
        norm,
        &net.params,
        &dev,
        ctx,
        |x, epoch, step, rng| {
            let noise = masks(p, x.dim(0)?, grid, epoch, step);
            let (pred, mask) = reconstruct(x, &noise, Some(rng))?;
            Ok(masked_mse(&pred, x, &mask)?)
        },
    )?;
    net.params
        .save_safetensors(&ctx.out_dir.join("encoder.safetensors"), |n| {
            !n.starts_with("decoder_pred")
        })?;
    net.params
        .save_safetensors(&ctx.out_dir.join("mae.safetensors"), |_| true)?;
    let shown = shown_images(p, &set, &train, norm, &dev)?;
    let mut rng = Rng::new(p.seed ^ 0x5EC0);
    let noise = masking_noise(p.masking(), shown.dim(0)?, grid, p.mask_ratio, &mut || {
        rng.f64()
    });
    let (pred, mask) = reconstruct(&shown, &noise, None)?;
    write_panels(
        &shown,
        &pred,
        &mask,
        norm,
        &ctx.out_dir.join("reconstructions.png"),
    )?;
    Ok(summary(p, &history, &set, train.len(), norm))
}

/// What both variants give the shared epoch loop: batches of augmented views, and their loss.
struct Pretraining<'a, F> {
    p: &'a Params,
    set: &'a ImageSet,
    train: &'a [usize],
    norm: Normalize,
    // The device the model was built on: asking the context again would open a second CUDA
    // device, whose tensors candle will not mix with the first one's.
    dev: &'a Device,
    loss_of: F,
}

impl<F: Fn(&Tensor, usize, usize, &mut Rng) -> Result<Tensor>> Step for Pretraining<'_, F> {
    type History = History;

    fn batches(&self, epoch: usize) -> crate::data::loader::Batches {
        epoch_batches(self.p, self.set, self.train, self.norm, epoch)
    }

    fn loss(&mut self, b: &Batch, epoch: usize, step: usize, rng: &mut Rng) -> Result<Tensor> {
        let size = self.p.backbone.img_size;
        let x = Tensor::from_slice(&b.x, (b.n, 1, size, size), self.dev)?;
        (self.loss_of)(&x, epoch, step, rng)
    }

    fn end_epoch(
        &mut self,
        epoch: usize,
        done: &EpochDone,
        h: &mut History,
        ctx: &StageCtx,
    ) -> Result<()> {
        h.loss.push(done.mean_loss);
        ctx.log(&format!("epoch {} loss {:.4}", epoch + 1, done.mean_loss));
        Ok(())
    }
}

/// The pretraining run of either variant: AdamW with MAE's betas on the warmup-cosine schedule.
#[allow(clippy::too_many_arguments)] // the run's data, weights and loss; bundling them would name a type used once
fn train_loop(
    p: &Params,
    set: &ImageSet,
    train: &[usize],
    norm: Normalize,
    params: &ParamStore,
    dev: &Device,
    ctx: &mut StageCtx,
    loss_of: impl Fn(&Tensor, usize, usize, &mut Rng) -> Result<Tensor>,
) -> Result<History> {
    let mut opt = super::fit::optimizer(
        params,
        &OptimSpec {
            weight_decay: p.weight_decay,
            betas: (0.9, 0.95),
            layer_decay: None,
            only: None,
            lars: false,
        },
    );
    let plan = Schedule {
        epochs: p.epochs,
        steps_per_epoch: train.len().div_ceil(p.batch),
        lr: schedule(
            scaled_lr(p.blr, p.batch),
            p.min_lr,
            p.warmup_epochs,
            p.epochs,
        ),
        clip_grad: None,
        seed: p.seed,
        stream: 0xB7A1,
    };
    let mut kind = Pretraining {
        p,
        set,
        train,
        norm,
        dev,
        loss_of,
    };
    run_epochs(&mut kind, &plan, params, &mut opt, ctx)
}

fn summary(p: &Params, history: &History, set: &ImageSet, images: usize, norm: Normalize) -> Value {
    json!({ "loss": history.loss, "final_loss": history.loss.last(), "images": images, "mean": norm.mean, "std": norm.std,
            "skipped_images": set.decoded.skipped.len(), "mask_ratio": p.mask_ratio, "masking": p.masking, "model": p.backbone.model })
}

/// The first `recon_images` pretraining images, normalised, as [n, 1, S, S].
fn shown_images(
    p: &Params,
    set: &ImageSet,
    train: &[usize],
    norm: Normalize,
    dev: &Device,
) -> Result<Tensor> {
    let shown: Vec<usize> = train.iter().copied().take(p.recon_images.max(1)).collect();
    let x: Vec<f32> = shown
        .iter()
        .flat_map(|&i| norm.apply(loader::resized(&set.decoded, i, p.backbone.img_size)))
        .collect();
    Ok(Tensor::from_vec(
        x,
        (shown.len(), 1, p.backbone.img_size, p.backbone.img_size),
        dev,
    )?)
}

/// Rows of original | masked | reconstruction | reconstruction with the visible pixels pasted,
/// from normalised [n, 1, S, S] tensors and a pixel mask (1 = masked).
fn write_panels(
    imgs: &Tensor,
    recon: &Tensor,
    mask: &Tensor,
    norm: Normalize,
    path: &std::path::Path,
) -> Result<()> {
    let (n, _, size, _) = imgs.dims4()?;
    let visible = (1.0 - mask)?;
    let masked = imgs.mul(&visible)?;
    let pasted = (imgs.mul(&visible)? + recon.mul(mask)?)?;
    let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    let panels = [flat(imgs)?, flat(&masked)?, flat(recon)?, flat(&pasted)?];
    let scale = 2u32;
    let mut png = image::GrayImage::new(4 * size as u32 * scale, n as u32 * size as u32 * scale);
    for r in 0..n {
        for (c, panel) in panels.iter().enumerate() {
            for y in 0..size {
                for x in 0..size {
                    let v = panel[r * size * size + y * size + x] * norm.std + norm.mean;
                    let px = image::Luma([(v.clamp(0.0, 1.0) * 255.0) as u8]);
                    for dy in 0..scale {
                        for dx in 0..scale {
                            png.put_pixel(
                                (c * size) as u32 * scale + x as u32 * scale + dx,
                                (r * size) as u32 * scale + y as u32 * scale + dy,
                                px,
                            );
                        }
                    }
                }
            }
        }
    }
    png.save(path)
        .with_context(|| format!("writing {}", path.display()))
}
