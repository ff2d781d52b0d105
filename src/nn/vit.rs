//! Vision Transformer with timm's structure and parameter names, so timm checkpoints load as they
//! are: `patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,
//! mlp.fc1,mlp.fc2}`, `norm` / `fc_norm`, `head`.

use super::ops::{drop_path, fusable, linear_init, softmax_last, LayerNorm, Linear, WeightInit};
use super::pos_embed::sincos_2d_tensor;
use super::tap::Taps;
use crate::rng::Rng;
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

/// timm's LayerNorm epsilon for ViTs (and MAE's).
pub const LN_EPS: f64 = 1e-6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GlobalPool {
    /// Mean of the patch tokens (cls excluded), then `fc_norm`.
    Avg,
    /// The cls token after the final norm.
    Token,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PosEmbed {
    /// A parameter (timm's default).
    #[default]
    Learned,
    /// Fixed 2-D sin-cos, no gradient (MAE's).
    Sincos,
}

/// Mirrors the kwargs of timm's `VisionTransformer` that pretext uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    pub img_size: usize,
    pub patch_size: usize,
    #[serde(default = "one")]
    pub in_chans: usize,
    pub num_classes: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    #[serde(default = "four")]
    pub mlp_ratio: f64,
    #[serde(default = "avg")]
    pub global_pool: GlobalPool,
    /// Defaults to `global_pool == avg`, as in timm.
    #[serde(default)]
    pub fc_norm: Option<bool>,
    #[serde(default = "yes")]
    pub class_token: bool,
    #[serde(default = "yes")]
    pub final_norm: bool,
    #[serde(default)]
    pub drop_path_rate: f64,
    #[serde(default)]
    pub pos_embed: PosEmbed,
    #[serde(default)]
    pub weight_init: WeightInit,
}

fn one() -> usize {
    1
}
fn four() -> f64 {
    4.0
}
fn avg() -> GlobalPool {
    GlobalPool::Avg
}
fn yes() -> bool {
    true
}

impl VitConfig {
    /// ViT-Tiny (192 wide, 12 deep, 3 heads), -Small (384/12/6), -Base (768/12/12).
    pub fn preset(
        name: &str,
        img_size: usize,
        patch_size: usize,
        in_chans: usize,
        num_classes: usize,
    ) -> Option<VitConfig> {
        let (embed_dim, depth, num_heads) = match name {
            "vit_tiny" => (192, 12, 3),
            "vit_small" => (384, 12, 6),
            "vit_base" => (768, 12, 12),
            _ => return None,
        };
        Some(VitConfig {
            img_size,
            patch_size,
            in_chans,
            num_classes,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            global_pool: GlobalPool::Avg,
            fc_norm: None,
            class_token: true,
            final_norm: true,
            drop_path_rate: 0.0,
            pos_embed: PosEmbed::Learned,
            weight_init: WeightInit::Timm,
        })
    }
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
    fn use_fc_norm(&self) -> bool {
        self.fc_norm.unwrap_or(self.global_pool == GlobalPool::Avg)
    }
    fn prefix_tokens(&self) -> usize {
        self.class_token as usize
    }
}

/// Multi-head self-attention with one fused qkv projection (timm `Attention`).
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    pub fn new(dim: usize, heads: usize, init: WeightInit, vb: VarBuilder) -> Result<Self> {
        Ok(Attention {
            qkv: linear_init(dim, dim * 3, init, vb.pp("qkv"))?,
            proj: linear_init(dim, dim, init, vb.pp("proj"))?,
            heads,
            scale: ((dim / heads) as f64).powf(-0.5),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(&attention_core(
            &self.qkv.forward(x)?,
            self.heads,
            self.scale,
        )?)
    }
}

/// softmax(q k^T * scale) v for every head, from the packed qkv projection `[B, N, 3C]` to
/// `[B, N, C]`: the fused kernel on f32 CPU tensors, candle ops elsewhere.
pub fn attention_core(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    if fusable(qkv) {
        return qkv.contiguous()?.apply_op1(super::fused::Attention {
            heads,
            scale: scale as f32,
        });
    }
    attention_core_composed(qkv, heads, scale)
}

fn attention_core_composed(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, n, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let qkv = qkv
        .reshape((b, n, 3, heads, c / heads))?
        .permute((2, 0, 3, 1, 4))?;
    let q = (qkv.get(0)?.contiguous()? * scale)?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let attn = softmax_last(&q.matmul(&k.t()?.contiguous()?)?)?;
    attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))
}

#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    pub fn new(dim: usize, hidden: usize, init: WeightInit, vb: VarBuilder) -> Result<Self> {
        Ok(Mlp {
            fc1: linear_init(dim, hidden, init, vb.pp("fc1"))?,
            fc2: linear_init(hidden, dim, init, vb.pp("fc2"))?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward_gelu(x)?)
    }
}

/// Pre-norm transformer block (timm `Block`).
#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
    drop_path: f64,
}

impl Block {
    pub fn new(
        dim: usize,
        heads: usize,
        mlp_ratio: f64,
        drop_path: f64,
        init: WeightInit,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Block {
            norm1: LayerNorm::new(dim, LN_EPS, vb.pp("norm1"))?,
            attn: Attention::new(dim, heads, init, vb.pp("attn"))?,
            norm2: LayerNorm::new(dim, LN_EPS, vb.pp("norm2"))?,
            mlp: Mlp::new(dim, (dim as f64 * mlp_ratio) as usize, init, vb.pp("mlp"))?,
            drop_path,
        })
    }

    /// `prefix` names the taps: `blocks.3` gives `blocks.3.norm1`. `rng` is `Some` in training
    /// (DropPath draws from it).
    pub fn forward(
        &self,
        x: &Tensor,
        mut rng: Option<&mut Rng>,
        prefix: &str,
        taps: &mut Taps,
    ) -> Result<Tensor> {
        let a = taps.point(&format!("{prefix}.norm1"), self.norm1.forward(x)?)?;
        let x = (x + drop_path(&self.attn.forward(&a)?, self.drop_path, rng.as_deref_mut())?)?;
        let m = self.mlp.forward(&self.norm2.forward(&x)?)?;
        x + drop_path(&m, self.drop_path, rng)?
    }
}

/// timm's linear stochastic-depth rule: rate i/(depth-1) * max for block i.
pub fn drop_path_rates(max: f64, depth: usize) -> Vec<f64> {
    if depth <= 1 {
        return vec![0.0; depth];
    }
    (0..depth)
        .map(|i| max * i as f64 / (depth - 1) as f64)
        .collect()
}

/// Conv patch embedding: [B, C, H, W] -> [B, L, D].
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    weight: Tensor,
    bias: Tensor,
    patch: usize,
}

impl PatchEmbed {
    pub fn new(
        in_chans: usize,
        dim: usize,
        patch: usize,
        init: WeightInit,
        vb: VarBuilder,
    ) -> Result<Self> {
        let fan_in = in_chans * patch * patch;
        // PyTorch's convolution default, kaiming-uniform with a = sqrt(5), is a bound of
        // 1 / sqrt(fan_in) for weight and bias. timm keeps it; the official MAE redraws only the
        // weight, xavier-uniform on its (out, -1) view.
        let default_bound = 1.0 / (fan_in as f64).sqrt();
        let weight_bound = match init {
            WeightInit::Mae => (6.0 / (fan_in + dim) as f64).sqrt(),
            WeightInit::Timm => default_bound,
        };
        let uniform = |b: f64| Init::Uniform { lo: -b, up: b };
        Ok(PatchEmbed {
            weight: vb.get_with_hints(
                (dim, in_chans, patch, patch),
                "proj.weight",
                uniform(weight_bound),
            )?,
            bias: vb.get_with_hints(dim, "proj.bias", uniform(default_bound))?,
            patch,
        })
    }
    /// `[B, C, H, W]` to `[B, L, D]`. A convolution whose kernel equals its stride is a linear
    /// layer over flattened patches. Written that way its backward is one GEMM for the weight and
    /// none for the image (the fused linear layer skips the gradient of an input that needs
    /// none), where candle's conv2d backward also computes the image's gradient with direct loops
    /// (a quarter of an MAE step at 64 px, measured with perf) and its matmul backward with a
    /// GEMM (1% of a ViT step at 224 px).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        // Like the convolution, ignore rows and columns that do not fill a patch.
        let x = x.narrow(2, 0, gh * p)?.narrow(3, 0, gw * p)?;
        let patches = x
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        let d = self.weight.dim(0)?;
        let proj = Linear {
            weight: self.weight.reshape((d, c * p * p))?,
            bias: self.bias.clone(),
        };
        proj.forward(&patches)?.reshape((b, gh * gw, d))
    }
}

#[derive(Debug, Clone)]
pub struct Vit {
    pub config: VitConfig,
    patch_embed: PatchEmbed,
    cls_token: Option<Tensor>,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: Option<LayerNorm>,
    fc_norm: Option<LayerNorm>,
    head: Option<Linear>,
}

/// What a forward pass produces, named as in the timm fixtures.
pub struct VitOutput {
    /// Tokens after the final norm (cls first).
    pub features: Tensor,
    /// Pooled, before `fc_norm`.
    pub pooled: Tensor,
    /// After `fc_norm`: what the head sees.
    pub pre_logits: Tensor,
    pub logits: Option<Tensor>,
}

impl Vit {
    pub fn new(config: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let d = config.embed_dim;
        let tokens = config.num_patches() + config.prefix_tokens();
        // Created in timm's order (cls_token, pos_embed, patch_embed, blocks, norms, head): the
        // parameter order decides how lr-decay groups are numbered.
        let init = config.weight_init;
        let cls_token = if config.class_token {
            Some(vb.get_with_hints(
                (1, 1, d),
                "cls_token",
                Init::Randn {
                    mean: 0.0,
                    stdev: match init {
                        WeightInit::Mae => 0.02,
                        WeightInit::Timm => 1e-6,
                    },
                },
            )?)
        } else {
            None
        };
        let pos_embed = match config.pos_embed {
            PosEmbed::Learned => vb.get_with_hints(
                (1, tokens, d),
                "pos_embed",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            PosEmbed::Sincos => {
                sincos_2d_tensor(d, config.grid(), config.class_token, vb.device())?
            }
        };
        let patch_embed = PatchEmbed::new(
            config.in_chans,
            d,
            config.patch_size,
            init,
            vb.pp("patch_embed"),
        )?;
        let rates = drop_path_rates(config.drop_path_rate, config.depth);
        let blocks = (0..config.depth)
            .map(|i| {
                Block::new(
                    d,
                    config.num_heads,
                    config.mlp_ratio,
                    rates[i],
                    init,
                    vb.pp("blocks").pp(i),
                )
            })
            .collect::<Result<_>>()?;
        let fc = config.use_fc_norm();
        Ok(Vit {
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm: if config.final_norm && !fc {
                Some(LayerNorm::new(d, LN_EPS, vb.pp("norm"))?)
            } else {
                None
            },
            fc_norm: if fc {
                Some(LayerNorm::new(d, LN_EPS, vb.pp("fc_norm"))?)
            } else {
                None
            },
            head: if config.num_classes > 0 {
                Some(linear_init(d, config.num_classes, init, vb.pp("head"))?)
            } else {
                None
            },
            config: config.clone(),
        })
    }

    /// `rng` is `Some` in training: DropPath is active and draws from it.
    pub fn forward_t(
        &self,
        x: &Tensor,
        mut rng: Option<&mut Rng>,
        taps: &mut Taps,
    ) -> Result<VitOutput> {
        let b = x.dim(0)?;
        let mut t = taps.point("patch_embed", self.patch_embed.forward(x)?)?;
        if let Some(cls) = &self.cls_token {
            let d = self.config.embed_dim;
            t = Tensor::cat(&[&cls.broadcast_as((b, 1, d))?, &t], 1)?;
        }
        t = taps.point("embedded_tokens", t.broadcast_add(&self.pos_embed)?)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let name = format!("blocks.{i}");
            t = block.forward(&t, rng.as_deref_mut(), &name, taps)?;
            t = taps.point(&name, t)?;
        }
        let features = match &self.norm {
            Some(n) => n.forward(&t)?,
            None => t,
        };
        let prefix = self.config.prefix_tokens();
        let pooled = match self.config.global_pool {
            GlobalPool::Avg => features
                .narrow(1, prefix, features.dim(1)? - prefix)?
                .mean(1)?,
            GlobalPool::Token => features.get_on_dim(1, 0)?,
        };
        let pre_logits = match &self.fc_norm {
            Some(n) => n.forward(&pooled)?,
            None => pooled.clone(),
        };
        let logits = self
            .head
            .as_ref()
            .map(|h| h.forward(&pre_logits))
            .transpose()?;
        Ok(VitOutput {
            features,
            pooled,
            pre_logits,
            logits,
        })
    }

    pub fn logits(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        self.forward_t(x, rng, &mut Taps::none())?
            .logits
            .ok_or_else(|| candle_core::Error::Msg("this ViT has no head (num_classes = 0)".into()))
    }

    /// The patch-token grid of a token tensor (cls dropped): [B, N, D] -> [B, D, g, g], as the
    /// Grad-CAM reshape transform for ViTs.
    pub fn tokens_to_grid(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, n, d) = tokens.dims3()?;
        let prefix = self.config.prefix_tokens();
        let g = self.config.grid();
        tokens
            .narrow(1, prefix, n - prefix)?
            .reshape((b, g, g, d))?
            .permute((0, 3, 1, 2))
    }

    pub fn depth(&self) -> usize {
        self.blocks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::agree::{assert_close, pull};
    use candle_core::{Device, Var};

    fn rms(t: &Tensor) -> f64 {
        t.sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt() as f64
    }

    /// timm's classifier init (the fine-tuning reference) against the official MAE's.
    #[test]
    fn timm_init_draws_the_head_with_std_002_and_mae_init_xavier() {
        let store = crate::nn::params::ParamStore::seeded(3);
        let mut cfg = VitConfig::preset("vit_tiny", 32, 8, 1, 4).unwrap();
        cfg.depth = 1;
        Vit::new(&cfg, store.var_builder(&Device::Cpu)).unwrap();
        let get = |n: &str| store.get(n).unwrap().as_tensor().clone();
        let head = rms(&get("head.weight"));
        assert!((head - 0.02).abs() < 0.004, "head rms {head}");
        assert!((rms(&get("blocks.0.attn.qkv.weight")) - 0.02).abs() < 0.002);
        assert!(rms(&get("cls_token")) < 1e-5);
        assert!(
            rms(&get("patch_embed.proj.bias")) > 0.0,
            "PyTorch's conv default"
        );

        let mae = crate::nn::params::ParamStore::seeded(3);
        cfg.weight_init = WeightInit::Mae;
        Vit::new(&cfg, mae.var_builder(&Device::Cpu)).unwrap();
        let head = rms(&mae.get("head.weight").unwrap().as_tensor().clone());
        // xavier-uniform: bound sqrt(6 / (192 + 4)), RMS bound / sqrt(3).
        let xavier = (6.0f64 / 196.0).sqrt() / 3f64.sqrt();
        assert!((head - xavier).abs() < 0.2 * xavier, "head rms {head}");
    }

    /// The fused attention kernel against candle ops: output and the gradient of the packed qkv,
    /// for an MAE encoder's short sequence and a longer one.
    #[test]
    fn fused_attention_matches_the_composed_ops() {
        for (b, n, heads, dh) in [(3, 17, 3, 4), (2, 65, 4, 8)] {
            let c = heads * dh;
            let dev = Device::Cpu;
            let qkv =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, 3 * c), &dev).unwrap()).unwrap();
            let up = Tensor::randn(0f32, 1.0, (b, n, c), &dev).unwrap();
            let scale = (dh as f64).powf(-0.5);
            let fused = attention_core(&qkv, heads, scale).unwrap();
            let composed = attention_core_composed(&qkv, heads, scale).unwrap();
            assert_close(&fused, &composed, 1e-5, "output");
            let (gf, gc) = (pull(&fused, &up), pull(&composed, &up));
            assert_close(gf.get(&qkv).unwrap(), gc.get(&qkv).unwrap(), 1e-5, "dqkv");
        }
    }
}
