//! The networks stages train, described in params and in `model.json`, built on the nn layer, and
//! initialised from upstream encoders or ImageNet checkpoints.

use crate::nn::densenet::{DenseNet, DenseNetConfig};
use crate::nn::ops::{relu, WeightInit};
use crate::nn::params::ParamStore;
use crate::nn::resnet::{ResNet, ResNetConfig};
use crate::nn::tap::Taps;
use crate::nn::vit::{Vit, VitConfig};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

mod card;
pub use card::{GreyStem, ModelCard, Preprocess, PythonHandoff};

/// Which network: `vit_tiny` / `vit_small` / `vit_base` (or `vit` with `vit_dims`), `resnet18` /
/// `resnet34` / `resnet50`, `densenet121` (or `densenet` with `densenet_dims`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetDesc {
    pub arch: String,
    pub img_size: usize,
    #[serde(default = "eight")]
    pub patch: usize,
    /// [embed_dim, depth, heads] for `arch: vit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vit_dims: Option<[usize; 3]>,
    /// [growth_rate, init_features, blocks per stage...] for `arch: densenet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub densenet_dims: Option<Vec<usize>>,
    #[serde(default)]
    pub drop_path: f64,
    pub num_classes: usize,
    /// How a ViT's weights start before any checkpoint is loaded (timm's classifier init by
    /// default; `mae` for the official MAE's xavier init).
    #[serde(default, skip_serializing_if = "is_timm")]
    pub weight_init: WeightInit,
}

fn is_timm(w: &WeightInit) -> bool {
    *w == WeightInit::Timm
}

fn eight() -> usize {
    8
}

// The network fields every training kind shares (`mae`, `proxy`, `finetune`), flattened into
// each kind's params so the YAML stays flat: `model: vit, vit_dims: [96, 4, 3], img_size: 64`.
// (A `//` comment: schemars would give a doc comment to every params schema that flattens this.)
// The fields' doc comments are single lines because schemars keeps their line breaks.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Backbone {
    /// The network: `vit_tiny` / `vit_small` / `vit_base`, `vit` (with `vit_dims`), `resnet18` / `resnet34` / `resnet50`, `densenet121`, `densenet` (with `densenet_dims`).
    #[serde(default = "defaults::model")]
    pub model: String,
    /// [embed dim, depth, heads] for `model: vit`.
    #[serde(default)]
    pub vit_dims: Option<[usize; 3]>,
    /// [growth rate, initial features, layers per block...] for `model: densenet`.
    #[serde(default)]
    pub densenet_dims: Option<Vec<usize>>,
    /// Input side in pixels (square; images are stretched, not cropped, to it).
    #[serde(default = "defaults::img_size")]
    pub img_size: usize,
    /// ViT patch side in pixels (must divide `img_size`); for CNN masked-image pretraining, the side of the masked squares.
    #[serde(default = "defaults::patch")]
    pub patch: usize,
}

impl Backbone {
    /// The network with `num_classes` outputs (0: features only).
    pub fn desc(&self, num_classes: usize, drop_path: f64, weight_init: WeightInit) -> NetDesc {
        NetDesc {
            arch: self.model.clone(),
            img_size: self.img_size,
            patch: self.patch,
            vit_dims: self.vit_dims,
            densenet_dims: self.densenet_dims.clone(),
            drop_path,
            num_classes,
            weight_init,
        }
    }
}

/// Serde defaults of the network fields every training kind shares (`model`, `img_size`, `patch`).
pub mod defaults {
    pub fn model() -> String {
        "vit_tiny".into()
    }
    pub fn img_size() -> usize {
        64
    }
    pub fn patch() -> usize {
        8
    }
    pub fn weight_decay() -> f64 {
        0.05
    }
    pub fn crop_scale() -> (f64, f64) {
        (0.5, 1.0)
    }
    /// The store is 1.25x the training size, as the reference pipeline keeps it (80 px for 64).
    pub fn decode_scale() -> f64 {
        1.25
    }
}

/// The two inputs of the self-supervised kinds (mae, proxy): unlabelled images and an optional
/// encoder to start from.
pub fn images_and_init_inputs() -> Vec<crate::stage::InputSlot> {
    vec![
        crate::stage::InputSlot {
            name: "images",
            required: true,
            many: false,
            doc: "a data folder (labels unused)",
        },
        crate::stage::InputSlot {
            name: "init",
            required: false,
            many: false,
            doc: "an encoder to start from (e.g. `chest_mae.encoder`)",
        },
    ]
}

/// The two inputs of the kinds that use a fine-tuned model on a labelled set (evaluate, gradcam).
pub fn model_and_data_inputs() -> Vec<crate::stage::InputSlot> {
    vec![
        crate::stage::InputSlot {
            name: "model",
            required: true,
            many: false,
            doc: "a fine-tuned model (`finetune.model`)",
        },
        crate::stage::InputSlot {
            name: "data",
            required: true,
            many: false,
            doc: "the labelled data folder with a test split",
        },
    ]
}

pub enum Arch {
    Vit(Vit),
    ResNet(ResNet),
    DenseNet(DenseNet),
}

pub struct Net {
    pub desc: NetDesc,
    pub arch: Arch,
    pub params: ParamStore,
    device: Device,
}

impl NetDesc {
    pub fn is_vit(&self) -> bool {
        self.arch.starts_with("vit")
    }

    pub fn vit_config(&self) -> Result<VitConfig> {
        let mut cfg = match (self.arch.as_str(), self.vit_dims) {
            ("vit", Some([d, depth, heads])) => {
                let mut c =
                    VitConfig::preset("vit_tiny", self.img_size, self.patch, 1, self.num_classes)
                        .expect("preset");
                (c.embed_dim, c.depth, c.num_heads) = (d, depth, heads);
                c
            }
            ("vit", None) => bail!("`model: vit` needs `vit_dims: [embed_dim, depth, heads]`"),
            (name, _) => VitConfig::preset(name, self.img_size, self.patch, 1, self.num_classes)
                .with_context(|| format!("unknown model `{name}`; known: {}", KNOWN.join(", ")))?,
        };
        if !self.img_size.is_multiple_of(self.patch) {
            bail!(
                "img_size {} is not a multiple of patch {}",
                self.img_size,
                self.patch
            );
        }
        cfg.drop_path_rate = self.drop_path;
        cfg.weight_init = self.weight_init;
        Ok(cfg)
    }

    /// The plan-time check of a network description: a known model, sizes above zero, a patch
    /// that divides the image, heads that divide the width.
    pub fn check(&self) -> super::checks::Checked {
        use super::checks::positive;
        if !KNOWN.contains(&self.arch.as_str()) {
            return Err(format!(
                "unknown model `{}`; known: {}",
                self.arch,
                KNOWN.join(", ")
            ));
        }
        positive("img_size", self.img_size)?;
        positive("patch", self.patch)?;
        super::checks::within("drop_path", self.drop_path, 0.0, 1.0, true)?;
        if self.is_vit() {
            if !self.img_size.is_multiple_of(self.patch) {
                return Err(format!(
                    "`img_size` {} is not a multiple of `patch` {}",
                    self.img_size, self.patch
                ));
            }
            match (self.arch.as_str(), self.vit_dims) {
                ("vit", None) => {
                    return Err("`model: vit` needs `vit_dims: [embed_dim, depth, heads]`".into())
                }
                (_, Some([dim, depth, heads])) => {
                    positive("vit_dims[0] (embed dim)", dim)?;
                    positive("vit_dims[1] (depth)", depth)?;
                    positive("vit_dims[2] (heads)", heads)?;
                    if dim % heads != 0 {
                        return Err(format!(
                            "`vit_dims`: {heads} heads do not divide the embed dim {dim}"
                        ));
                    }
                }
                _ => {}
            }
        }
        if let Some(dims) = &self.densenet_dims {
            if dims.len() < 3 || dims.contains(&0) {
                return Err(format!("`densenet_dims` is {dims:?}; it needs [growth, init_features, blocks...], every number at least 1"));
            }
        }
        Ok(())
    }

    /// Feature width of the backbone (what a head sees).
    pub fn feature_dim(&self) -> Result<usize> {
        Ok(match self.arch.as_str() {
            a if a.starts_with("vit") => self.vit_config()?.embed_dim,
            a if a.starts_with("resnet") => ResNetConfig::preset(a, 1, 0)
                .with_context(|| format!("unknown model `{a}`"))?
                .feature_dim(),
            _ => {
                let probe = Net::build(
                    &NetDesc {
                        num_classes: 0,
                        ..self.clone()
                    },
                    0,
                    &Device::Cpu,
                )?;
                match probe.arch {
                    Arch::DenseNet(d) => d.num_features,
                    _ => unreachable!(),
                }
            }
        })
    }
}

pub const KNOWN: &[&str] = &[
    "vit_tiny",
    "vit_small",
    "vit_base",
    "vit",
    "resnet18",
    "resnet34",
    "resnet50",
    "densenet121",
    "densenet",
];

impl Net {
    /// Where the parameters live.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn build(desc: &NetDesc, seed: u64, device: &Device) -> Result<Net> {
        let params = ParamStore::seeded(seed);
        let vb = params.var_builder(device);
        let arch = match desc.arch.as_str() {
            a if a.starts_with("vit") => Arch::Vit(Vit::new(&desc.vit_config()?, vb)?),
            a if a.starts_with("resnet") => {
                let cfg = ResNetConfig::preset(a, 1, desc.num_classes)
                    .with_context(|| format!("unknown model `{a}`; known: {}", KNOWN.join(", ")))?;
                Arch::ResNet(ResNet::new(&cfg, vb)?)
            }
            "densenet121" => Arch::DenseNet(DenseNet::new(
                &DenseNetConfig::densenet121(1, desc.num_classes),
                vb,
            )?),
            "densenet" => {
                let dims = desc
                    .densenet_dims
                    .as_ref()
                    .filter(|d| d.len() >= 3)
                    .context(
                    "`model: densenet` needs `densenet_dims: [growth, init_features, blocks...]`",
                )?;
                let cfg = DenseNetConfig {
                    growth_rate: dims[0],
                    num_init_features: dims[1],
                    block_config: dims[2..].to_vec(),
                    bn_size: 4,
                    num_classes: desc.num_classes,
                    in_chans: 1,
                };
                Arch::DenseNet(DenseNet::new(&cfg, vb)?)
            }
            other => bail!("unknown model `{other}`; known: {}", KNOWN.join(", ")),
        };
        Ok(Net {
            desc: desc.clone(),
            arch,
            params,
            device: device.clone(),
        })
    }

    /// Logits; `rng` is `Some` in training (BatchNorm uses batch statistics, DropPath is active).
    pub fn logits(&self, x: &Tensor, rng: Option<&mut Rng>, taps: &mut Taps) -> Result<Tensor> {
        self.forward(x, rng, taps)?
            .1
            .context("this network has no head")
    }

    /// (pooled features, logits).
    pub fn forward(
        &self,
        x: &Tensor,
        rng: Option<&mut Rng>,
        taps: &mut Taps,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let train = rng.is_some();
        Ok(match &self.arch {
            Arch::Vit(v) => {
                let o = v.forward_t(x, rng, taps)?;
                (o.pre_logits, o.logits)
            }
            Arch::ResNet(r) => {
                let o = r.forward_t(x, train, taps)?;
                (o.pooled, o.logits)
            }
            Arch::DenseNet(d) => {
                let o = d.forward_t(x, train, taps)?;
                (o.pooled, o.logits)
            }
        })
    }

    /// The last feature map of a CNN, [B, C, h, w] (masked-image pretraining reconstructs from it).
    pub fn feature_map(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let train = rng.is_some();
        Ok(match &self.arch {
            Arch::ResNet(r) => r.forward_t(x, train, &mut Taps::none())?.features,
            Arch::DenseNet(d) => relu(&d.forward_t(x, train, &mut Taps::none())?.features)?,
            Arch::Vit(_) => bail!("a ViT has no feature map; use the MAE path"),
        })
    }

    /// The layer Grad-CAM explains by default: the last block's norm1 (ViT, as in the reference
    /// recipe), the last residual stage (ResNet), norm5 (DenseNet).
    /// The layer Grad-CAM explains by default. For a ResNet, `layer4` unless the image is so small
    /// that its map is one cell (a constant map, which min-max scaling turns into zeros): then the
    /// deepest stage whose map has at least 2 x 2 cells (`layer3` at 32 px).
    pub fn cam_layer(&self, img_size: usize) -> String {
        match &self.arch {
            Arch::Vit(v) => format!("blocks.{}.norm1", v.depth() - 1),
            Arch::ResNet(_) => {
                let stage = (1..=4)
                    .rev()
                    .find(|&k| img_size.div_ceil(2 << k) >= 2)
                    .unwrap_or(1);
                format!("layer{stage}")
            }
            Arch::DenseNet(_) => "features.norm5".into(),
        }
    }

    pub fn to_grid(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        match &self.arch {
            Arch::Vit(v) => v.tokens_to_grid(t),
            _ => Ok(t.clone()),
        }
    }

    /// Names of the classifier head's parameters (left out of exported encoders).
    pub fn is_head(&self, name: &str) -> bool {
        match &self.arch {
            Arch::Vit(_) => name.starts_with("head.") || name.starts_with("fc_norm."),
            Arch::ResNet(_) => name.starts_with("fc."),
            Arch::DenseNet(_) => name.starts_with("classifier."),
        }
    }

    pub fn save_encoder(&self, path: &Path) -> Result<()> {
        self.params.save_safetensors(path, |n| !self.is_head(n))
    }

    /// Initialises from a checkpoint (an upstream encoder, or timm / torchvision ImageNet weights):
    /// 3-channel first convolutions are folded to grey by summing over channels, a position
    /// embedding of another grid size is interpolated, the head stays freshly initialised, and
    /// any other missing or misshapen parameter is an error that lists them.
    pub fn load_init(&self, path: &Path) -> Result<String> {
        let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading weights {}", path.display()))?;
        refuse_non_finite(&tensors, path)?;
        for (name, var) in self.params.named() {
            let Some(t) = tensors.get(&name).cloned() else {
                continue;
            };
            if t.dims() == var.dims() {
                continue;
            }
            let fixed = if t.rank() == 4
                && var.rank() == 4
                && t.dim(1)? == 3
                && var.dim(1)? == 1
                && t.dim(0)? == var.dim(0)?
            {
                Some(t.sum_keepdim(1)?)
            } else if name == "pos_embed" {
                Some(interpolate_pos_embed(&t, var.dim(1)?)?)
            } else {
                None
            };
            if let Some(f) = fixed {
                tensors.insert(name, f);
            }
        }
        for name in self
            .params
            .named()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| self.is_head(n))
        {
            tensors.remove(&name);
        }
        let report = self
            .params
            .load_tensors(&tensors, |k| k.ends_with("num_batches_tracked"))?;
        let missing: Vec<&String> = report
            .missing
            .iter()
            .filter(|n| !self.is_head(n) && !n.starts_with("norm."))
            .collect();
        if !missing.is_empty() || !report.mismatched.is_empty() {
            bail!(
                "weights {} do not fit a {} backbone: {}",
                path.display(),
                self.desc.arch,
                report.describe()
            );
        }
        Ok(report.describe())
    }
}

/// Weights that hold NaN or infinity would train into a NaN loss several stages later; say so at
/// the load, with the tensors' names.
pub fn refuse_non_finite(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let mut bad: Vec<&String> = tensors
        .iter()
        .filter(|(_, t)| {
            t.to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .is_ok_and(|v| v.iter().any(|x| !x.is_finite()))
        })
        .map(|(n, _)| n)
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    bad.sort();
    bail!(
        "weights {} hold values that are not finite (NaN or infinity) in {}",
        path.display(),
        bad.iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Bilinear resize of the patch-grid part of a [1, prefix + g*g, D] position embedding to
/// `tokens` rows (the cls row is kept).
fn interpolate_pos_embed(t: &Tensor, tokens: usize) -> Result<Tensor> {
    let (_, n, d) = t.dims3()?;
    let prefix = if (n as f64 - 1.0).sqrt().fract() == 0.0 {
        1
    } else {
        0
    };
    let (g_in, g_out) = (
        ((n - prefix) as f64).sqrt() as usize,
        ((tokens - prefix) as f64).sqrt() as usize,
    );
    if g_in * g_in + prefix != n || g_out * g_out + prefix != tokens {
        bail!("cannot interpolate a position embedding of {n} tokens to {tokens}");
    }
    let grid: Vec<f32> = t
        .narrow(1, prefix, n - prefix)?
        .squeeze(0)?
        .t()?
        .contiguous()?
        .flatten_all()?
        .to_vec1()?;
    let mut out = Vec::with_capacity(d * g_out * g_out);
    for c in 0..d {
        out.extend(crate::nn::gradcam::resize_bilinear(
            &grid[c * g_in * g_in..(c + 1) * g_in * g_in],
            (g_in, g_in),
            (g_out, g_out),
        ));
    }
    let patches = Tensor::from_vec(out, (d, g_out * g_out), t.device())?
        .t()?
        .unsqueeze(0)?;
    Ok(if prefix == 1 {
        Tensor::cat(&[&t.narrow(1, 0, 1)?, &patches], 1)?
    } else {
        patches
    })
}

/// Loads a safetensors file's tensors (for callers outside the nn layer).
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vit(img: usize, classes: usize) -> NetDesc {
        NetDesc {
            arch: "vit".into(),
            img_size: img,
            patch: 8,
            vit_dims: Some([16, 1, 2]),
            densenet_dims: None,
            drop_path: 0.0,
            num_classes: classes,
            weight_init: WeightInit::Timm,
        }
    }

    #[test]
    fn imagenet_style_weights_are_folded_interpolated_and_the_head_stays_fresh() {
        let dir = tempfile::tempdir().unwrap();
        // A "timm" checkpoint: 3 input channels, 32 px (4x4 grid), 10 classes.
        let source = Net::build(&vit(32, 10), 1, &Device::Cpu).unwrap();
        let mut tensors: HashMap<String, Tensor> = source
            .params
            .named()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        let w = tensors["patch_embed.proj.weight"].clone();
        tensors.insert(
            "patch_embed.proj.weight".into(),
            Tensor::cat(&[&w, &w, &w], 1).unwrap(),
        );
        let file = dir.path().join("imagenet.safetensors");
        candle_core::safetensors::save(&tensors, &file).unwrap();

        // A grey 64 px (8x8 grid) model with 4 classes loads it.
        let target = Net::build(&vit(64, 4), 2, &Device::Cpu).unwrap();
        let param =
            |net: &Net, name: &str| net.params.get(name).unwrap().as_tensor().copy().unwrap();
        let head_before = param(&target, "head.weight");
        target.load_init(&file).unwrap();
        let folded = param(&target, "patch_embed.proj.weight");
        let expected = (&w * 3.0).unwrap();
        let diff = (folded - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "3 channels are summed into 1");
        assert_eq!(target.params.get("pos_embed").unwrap().dims(), &[1, 65, 16]);
        let head_after = param(&target, "head.weight");
        assert_eq!(
            head_before.to_vec2::<f32>().unwrap(),
            head_after.to_vec2::<f32>().unwrap(),
            "the head is not loaded"
        );
    }

    #[test]
    fn a_checkpoint_of_another_shape_is_an_error_that_lists_keys() {
        let dir = tempfile::tempdir().unwrap();
        let other = Net::build(
            &NetDesc {
                vit_dims: Some([32, 1, 2]),
                ..vit(32, 4)
            },
            1,
            &Device::Cpu,
        )
        .unwrap();
        let file = dir.path().join("other.safetensors");
        other.params.save_safetensors(&file, |_| true).unwrap();
        let err = Net::build(&vit(32, 4), 1, &Device::Cpu)
            .unwrap()
            .load_init(&file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("shape mismatch") && err.contains("blocks.0.attn.qkv.weight"),
            "{err}"
        );
    }
}
