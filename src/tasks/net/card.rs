//! `model.json`: what a trained model is (network, classes, normalisation) and how to use it
//! outside pretext (the reference constructor and the preprocessing, for Python).

use super::{Net, NetDesc};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `model.json` beside `model.safetensors`: enough to rebuild and use the network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    pub net: NetDesc,
    pub classes: Vec<String>,
    pub mean: f32,
    pub std: f32,
    /// Side of the decoded store that evaluation resizes to `net.img_size` (0 in cards written
    /// before the store existed: the image size itself).
    #[serde(default)]
    pub store: usize,
    #[serde(default)]
    pub best_epoch: usize,
    /// The share of the training labels the model was trained on (the label-fraction axis).
    #[serde(default = "one")]
    pub label_fraction: f64,
    /// How to build the same network in Python and feed it (docs/python.md); absent in cards
    /// written before 2026-12-07.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<PythonHandoff>,
}

fn one() -> f64 {
    1.0
}

/// The constructor of the reference library whose `state_dict()` the weights match, and the
/// preprocessing the model was trained with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PythonHandoff {
    /// `timm` or `torchvision`.
    pub library: String,
    /// A callable, e.g. `timm.models.vision_transformer.VisionTransformer`.
    pub constructor: String,
    pub kwargs: serde_json::Value,
    /// The stem convolution to replace before loading: torchvision's take 3 channels, pretext's
    /// models grey images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grey_stem: Option<GreyStem>,
    pub preprocess: Preprocess,
}

/// `<attribute> = torch.nn.Conv2d(1, out_channels, kernel_size=7, stride=2, padding=3,
/// bias=False)`, the stem of torchvision's ResNets and DenseNets with one input channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GreyStem {
    /// Dotted path of the module, e.g. `conv1` or `features.conv0`.
    pub attribute: String,
    pub out_channels: usize,
}

/// What an image goes through before the network sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// 1: grey (an RGB file is converted to luminance).
    pub channels: usize,
    /// Decoded once at `store` x `store` (triangle filter, the aspect ratio not kept) ...
    pub store: usize,
    /// ... then resized (bilinear) to `size` x `size`.
    pub size: usize,
    /// Pixel values are v / 255, then (v - mean) / std.
    pub mean: f32,
    pub std: f32,
}

impl ModelCard {
    /// The side images are decoded at before they are resized to the network's input.
    pub fn store_size(&self) -> usize {
        self.store.max(self.net.img_size)
    }
}

impl NetDesc {
    /// The reference constructor that builds this network with the same state_dict keys.
    pub fn python(&self, preprocess: Preprocess) -> Result<PythonHandoff> {
        let classes = self.num_classes;
        let stem = |attribute: &str, out_channels: usize| GreyStem {
            attribute: attribute.to_owned(),
            out_channels,
        };
        let (library, constructor, kwargs, grey_stem) = match self.arch.as_str() {
            a if a.starts_with("vit") => {
                let c = self.vit_config()?;
                (
                    "timm",
                    "timm.models.vision_transformer.VisionTransformer".to_owned(),
                    serde_json::json!({
                        "img_size": c.img_size, "patch_size": c.patch_size, "in_chans": 1,
                        "num_classes": classes, "embed_dim": c.embed_dim, "depth": c.depth,
                        "num_heads": c.num_heads, "mlp_ratio": c.mlp_ratio, "global_pool": "avg",
                        "fc_norm": true, "class_token": true,
                    }),
                    None,
                )
            }
            a if a.starts_with("resnet") => (
                "torchvision",
                format!("torchvision.models.{a}"),
                serde_json::json!({ "num_classes": classes }),
                Some(stem("conv1", 64)),
            ),
            "densenet121" => (
                "torchvision",
                "torchvision.models.densenet121".to_owned(),
                serde_json::json!({ "num_classes": classes }),
                Some(stem("features.conv0", 64)),
            ),
            _ => {
                let d = self.densenet_dims.clone().unwrap_or_default();
                (
                    "torchvision",
                    "torchvision.models.DenseNet".to_owned(),
                    serde_json::json!({
                        "growth_rate": d.first(), "num_init_features": d.get(1),
                        "block_config": d.get(2..), "bn_size": 4, "num_classes": classes,
                    }),
                    Some(stem("features.conv0", d.get(1).copied().unwrap_or(64))),
                )
            }
        };
        Ok(PythonHandoff {
            library: library.to_owned(),
            constructor,
            kwargs,
            grey_stem,
            preprocess,
        })
    }
}

impl ModelCard {
    pub fn read(dir: &Path) -> Result<(ModelCard, Net)> {
        let card_path = dir.join("model.json");
        let card: ModelCard = serde_json::from_str(
            &std::fs::read_to_string(&card_path)
                .with_context(|| format!("reading {}", card_path.display()))?,
        )
        .with_context(|| format!("{} is not a pretext model card", card_path.display()))?;
        let net = Net::build(&card.net, 0, &Device::Cpu)?;
        let report = net
            .params
            .load_safetensors(&dir.join("model.safetensors"), |_| false)?;
        if !report.is_clean() {
            bail!(
                "{}: {}",
                dir.join("model.safetensors").display(),
                report.describe()
            );
        }
        Ok((card, net))
    }
}
