//! Masked autoencoder as in the official MAE code (`models_mae.py`), with its parameter names:
//! an encoder that sees only the visible patches, a lighter decoder with mask tokens, and a loss
//! on the masked patches only. Masking is an argsort of per-patch noise, so every strategy below
//! is a way to draw that noise; tests inject it to match the reference exactly.

use super::ops::{linear, LayerNorm, Linear, WeightInit};
use super::pos_embed::sincos_2d_tensor;
use super::tap::Taps;
use super::vit::{Block, PatchEmbed, LN_EPS};
use candle_core::{Device, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaeConfig {
    pub img_size: usize,
    pub patch_size: usize,
    #[serde(default = "three")]
    pub in_chans: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub decoder_embed_dim: usize,
    pub decoder_depth: usize,
    pub decoder_num_heads: usize,
    #[serde(default = "four")]
    pub mlp_ratio: f64,
    #[serde(default)]
    pub norm_pix_loss: bool,
}

fn three() -> usize {
    3
}
fn four() -> f64 {
    4.0
}

impl MaeConfig {
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
    /// MAE's `int(L * (1 - mask_ratio))`.
    pub fn len_keep(&self, mask_ratio: f64) -> usize {
        (self.num_patches() as f64 * (1.0 - mask_ratio)) as usize
    }
}

/// How masked patches are chosen; every strategy masks the same fraction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "strategy")]
pub enum Masking {
    /// Uniform (the reference).
    Random,
    /// Keeps patches near the image centre more often: keep-weight exp(-r^2 / (2 sigma^2)) with r the
    /// distance from the centre in units of the half-width (Efraimidis-Spirakis weighted sampling).
    Center { sigma: f64 },
    /// Masks square blocks of about `block` x `block` patches until the ratio is reached.
    Block { block: usize },
    /// Keeps one patch per cell of a regular grid (random offset), topped up or trimmed at random.
    Grid,
}

/// Per-patch noise; the `len_keep` smallest values are kept (MAE's convention).
pub fn masking_noise(
    strategy: Masking,
    batch: usize,
    grid: usize,
    mask_ratio: f64,
    rng: &mut impl FnMut() -> f64,
) -> Vec<f32> {
    let l = grid * grid;
    let mut out = Vec::with_capacity(batch * l);
    for _ in 0..batch {
        match strategy {
            Masking::Random => out.extend((0..l).map(|_| rng() as f32)),
            Masking::Center { sigma } => {
                let c = (grid as f64 - 1.0) / 2.0;
                let half = (grid as f64 / 2.0).max(1e-9);
                out.extend((0..l).map(|t| {
                    let (i, j) = ((t / grid) as f64, (t % grid) as f64);
                    let r2 = ((i - c).powi(2) + (j - c).powi(2)) / (half * half);
                    let weight = (-r2 / (2.0 * sigma * sigma)).exp().max(1e-12);
                    // Exp(weight) draws: the smallest are a weighted sample without replacement.
                    (-(1.0 - rng()).max(1e-300).ln() / weight) as f32
                }));
            }
            Masking::Block { block } => {
                let target = l - ((l as f64) * (1.0 - mask_ratio)) as usize;
                let mut masked = vec![false; l];
                let mut count = 0;
                let b = block.clamp(1, grid);
                let mut tries = 0;
                while count < target && tries < 10_000 {
                    tries += 1;
                    let (i0, j0) = (
                        (rng() * (grid - b + 1) as f64) as usize,
                        (rng() * (grid - b + 1) as f64) as usize,
                    );
                    for i in i0..i0 + b {
                        for j in j0..j0 + b {
                            if count < target && !masked[i * grid + j] {
                                masked[i * grid + j] = true;
                                count += 1;
                            }
                        }
                    }
                }
                out.extend(masked.iter().map(|&m| m as u8 as f32 + 0.5 * rng() as f32));
            }
            Masking::Grid => {
                let step = ((1.0 / (1.0 - mask_ratio).max(1e-9)).sqrt().round() as usize).max(1);
                let (oi, oj) = (
                    (rng() * step as f64) as usize,
                    (rng() * step as f64) as usize,
                );
                out.extend((0..l).map(|t| {
                    let on_grid = (t / grid) % step == oi && (t % grid) % step == oj;
                    (!on_grid) as u8 as f32 + 0.5 * rng() as f32
                }));
            }
        }
    }
    out
}

/// `ids_shuffle = argsort(noise)`, `ids_restore = argsort(ids_shuffle)`, `mask` 1 = removed,
/// in original patch order. Ties break by index (the reference's noise has none).
pub struct MaskPlan {
    pub ids_shuffle: Vec<Vec<u32>>,
    pub ids_restore: Vec<Vec<u32>>,
    pub mask: Vec<Vec<f32>>,
    pub len_keep: usize,
}

pub fn plan_mask(noise: &[f32], batch: usize, l: usize, len_keep: usize) -> MaskPlan {
    let mut plan = MaskPlan {
        ids_shuffle: Vec::new(),
        ids_restore: Vec::new(),
        mask: Vec::new(),
        len_keep,
    };
    for n in 0..batch {
        let row = &noise[n * l..(n + 1) * l];
        let mut shuffle: Vec<u32> = (0..l as u32).collect();
        shuffle.sort_by(|&a, &b| row[a as usize].total_cmp(&row[b as usize]).then(a.cmp(&b)));
        let mut restore = vec![0u32; l];
        for (pos, &id) in shuffle.iter().enumerate() {
            restore[id as usize] = pos as u32;
        }
        let mask = restore
            .iter()
            .map(|&r| if (r as usize) < len_keep { 0.0 } else { 1.0 })
            .collect();
        plan.ids_shuffle.push(shuffle);
        plan.ids_restore.push(restore);
        plan.mask.push(mask);
    }
    plan
}

#[derive(Debug, Clone)]
pub struct Mae {
    pub config: MaeConfig,
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    decoder_embed: Linear,
    mask_token: Tensor,
    decoder_pos_embed: Tensor,
    decoder_blocks: Vec<Block>,
    decoder_norm: LayerNorm,
    decoder_pred: Linear,
}

pub struct MaeOutput {
    pub loss: Tensor,
    /// [N, L, p*p*C] predicted patches (cls removed).
    pub pred: Tensor,
    /// [N, L] with 1 = masked.
    pub mask: Tensor,
    pub latent: Tensor,
    pub target: Tensor,
    pub plan: MaskPlan,
}

impl Mae {
    pub fn new(config: &MaeConfig, vb: VarBuilder) -> Result<Self> {
        let (d, dd) = (config.embed_dim, config.decoder_embed_dim);
        let p = config.patch_size;
        let dev = vb.device().clone();
        let blocks = (0..config.depth)
            .map(|i| {
                Block::new(
                    d,
                    config.num_heads,
                    config.mlp_ratio,
                    0.0,
                    WeightInit::Mae,
                    vb.pp("blocks").pp(i),
                )
            })
            .collect::<Result<_>>()?;
        let decoder_blocks = (0..config.decoder_depth)
            .map(|i| {
                Block::new(
                    dd,
                    config.decoder_num_heads,
                    config.mlp_ratio,
                    0.0,
                    WeightInit::Mae,
                    vb.pp("decoder_blocks").pp(i),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Mae {
            patch_embed: PatchEmbed::new(
                config.in_chans,
                d,
                p,
                WeightInit::Mae,
                vb.pp("patch_embed"),
            )?,
            cls_token: vb.get_with_hints(
                (1, 1, d),
                "cls_token",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            // Fixed, not parameters: computed, so they never enter the optimiser.
            pos_embed: sincos_2d_tensor(d, config.grid(), true, &dev)?,
            blocks,
            norm: LayerNorm::new(d, LN_EPS, vb.pp("norm"))?,
            decoder_embed: linear(d, dd, vb.pp("decoder_embed"))?,
            mask_token: vb.get_with_hints(
                (1, 1, dd),
                "mask_token",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            decoder_pos_embed: sincos_2d_tensor(dd, config.grid(), true, &dev)?,
            decoder_blocks,
            decoder_norm: LayerNorm::new(dd, LN_EPS, vb.pp("decoder_norm"))?,
            decoder_pred: linear(dd, p * p * config.in_chans, vb.pp("decoder_pred"))?,
            config: config.clone(),
        })
    }

    /// imgs [N, C, H, W] -> [N, L, p*p*C], channel fastest (`nchpwq->nhwpqc`).
    pub fn patchify(&self, imgs: &Tensor) -> Result<Tensor> {
        let (n, c, _, _) = imgs.dims4()?;
        let (p, g) = (self.config.patch_size, self.config.grid());
        imgs.reshape((n, c, g, p, g, p))?
            .permute((0, 2, 4, 3, 5, 1))?
            .reshape((n, g * g, p * p * c))
    }

    /// The inverse of [`Mae::patchify`].
    pub fn unpatchify(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (p, g, c) = (
            self.config.patch_size,
            self.config.grid(),
            self.config.in_chans,
        );
        x.reshape((n, g, g, p, p, c))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((n, c, g * p, g * p))
    }

    /// [N, K] ids broadcast to [N, K, width], contiguous as `gather` needs.
    fn index_tensor(rows: &[Vec<u32>], width: usize, dev: &Device) -> Result<Tensor> {
        let n = rows.len();
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let k = flat.len() / n.max(1);
        Tensor::from_vec(flat, (n, k), dev)?
            .unsqueeze(2)?
            .broadcast_as((n, k, width))?
            .contiguous()
    }

    pub fn forward_encoder(
        &self,
        imgs: &Tensor,
        plan: &MaskPlan,
        taps: &mut Taps,
    ) -> Result<Tensor> {
        let d = self.config.embed_dim;
        let n = imgs.dim(0)?;
        let l = self.config.num_patches();
        let x = self
            .patch_embed
            .forward(imgs)?
            .broadcast_add(&self.pos_embed.narrow(1, 1, l)?)?;
        let keep: Vec<Vec<u32>> = plan
            .ids_shuffle
            .iter()
            .map(|s| s[..plan.len_keep].to_vec())
            .collect();
        let index = Self::index_tensor(&keep, d, imgs.device())?;
        let x = x.contiguous()?.gather(&index, 1)?;
        let cls = (&self.cls_token + self.pos_embed.narrow(1, 0, 1)?)?.broadcast_as((n, 1, d))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?;
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward(&x, None, &format!("blocks.{i}"), taps)?;
        }
        self.norm.forward(&x)
    }

    pub fn forward_decoder(
        &self,
        latent: &Tensor,
        plan: &MaskPlan,
        taps: &mut Taps,
    ) -> Result<Tensor> {
        let dd = self.config.decoder_embed_dim;
        let (n, k, _) = latent.dims3()?;
        let l = self.config.num_patches();
        let x = self.decoder_embed.forward(latent)?;
        let mask_tokens = self.mask_token.broadcast_as((n, l + 1 - k, dd))?;
        let x_ = Tensor::cat(&[&x.narrow(1, 1, k - 1)?, &mask_tokens], 1)?.contiguous()?;
        let index = Self::index_tensor(&plan.ids_restore, dd, latent.device())?;
        let x_ = x_.gather(&index, 1)?;
        let mut x =
            Tensor::cat(&[&x.narrow(1, 0, 1)?, &x_], 1)?.broadcast_add(&self.decoder_pos_embed)?;
        for (i, b) in self.decoder_blocks.iter().enumerate() {
            x = b.forward(&x, None, &format!("decoder_blocks.{i}"), taps)?;
        }
        let x = self.decoder_pred.forward(&self.decoder_norm.forward(&x)?)?;
        x.narrow(1, 1, l)
    }

    /// The reconstruction target: raw patches, or per-patch normalised (unbiased variance, eps 1e-6).
    pub fn target(&self, imgs: &Tensor) -> Result<Tensor> {
        let target = self.patchify(imgs)?;
        if !self.config.norm_pix_loss {
            return Ok(target);
        }
        let k = target.dim(D::Minus1)? as f64;
        let mean = target.mean_keepdim(D::Minus1)?;
        let centered = target.broadcast_sub(&mean)?;
        let var = (centered.sqr()?.sum_keepdim(D::Minus1)? / (k - 1.0))?;
        centered.broadcast_div(&(var + 1e-6)?.sqrt()?)
    }

    /// MAE has no dropout or DropPath: training and evaluation compute the same thing.
    pub fn forward(&self, imgs: &Tensor, noise: &[f32], mask_ratio: f64) -> Result<MaeOutput> {
        let n = imgs.dim(0)?;
        let l = self.config.num_patches();
        let plan = plan_mask(noise, n, l, self.config.len_keep(mask_ratio));
        let mut taps = Taps::none();
        let latent = self.forward_encoder(imgs, &plan, &mut taps)?;
        let pred = self.forward_decoder(&latent, &plan, &mut taps)?;
        let target = self.target(imgs)?;
        let mask_flat: Vec<f32> = plan.mask.iter().flatten().copied().collect();
        let mask = Tensor::from_vec(mask_flat, (n, l), imgs.device())?;
        let per_patch = (&pred - &target)?.sqr()?.mean(D::Minus1)?;
        let loss = ((per_patch * &mask)?.sum_all()? / mask.sum_all()?)?;
        Ok(MaeOutput {
            loss,
            pred,
            mask,
            latent,
            target,
            plan,
        })
    }
}
