//! ResNet as in torchvision (`conv1`, `bn1`, `layer1.0.conv1`, `layerN.0.downsample.{0,1}`, `fc`),
//! BasicBlock (18/34) and Bottleneck (50), any number of input channels.

use super::cnn::{apply, batch_norm, bn, classifier, Conv};
use super::ops::{global_avg_pool, max_pool_3x3_s2, relu};
use super::tap::Taps;
use candle_core::{Result, Tensor};
use candle_nn::{BatchNorm, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockKind {
    BasicBlock,
    Bottleneck,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    pub block: BlockKind,
    pub layers: [usize; 4],
    pub num_classes: usize,
    #[serde(default = "three")]
    pub in_chans: usize,
}

fn three() -> usize {
    3
}

impl ResNetConfig {
    pub fn preset(name: &str, in_chans: usize, num_classes: usize) -> Option<ResNetConfig> {
        let (block, layers) = match name {
            "resnet18" => (BlockKind::BasicBlock, [2, 2, 2, 2]),
            "resnet34" => (BlockKind::BasicBlock, [3, 4, 6, 3]),
            "resnet50" => (BlockKind::Bottleneck, [3, 4, 6, 3]),
            _ => return None,
        };
        Some(ResNetConfig {
            block,
            layers,
            num_classes,
            in_chans,
        })
    }
    fn expansion(&self) -> usize {
        match self.block {
            BlockKind::BasicBlock => 1,
            BlockKind::Bottleneck => 4,
        }
    }
    pub fn feature_dim(&self) -> usize {
        512 * self.expansion()
    }
}

#[derive(Debug, Clone)]
struct ResBlock {
    convs: Vec<(Conv, BatchNorm)>,
    downsample: Option<(Conv, BatchNorm)>,
}

impl ResBlock {
    fn new(
        kind: BlockKind,
        cin: usize,
        planes: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let expansion = if kind == BlockKind::BasicBlock { 1 } else { 4 };
        let cout = planes * expansion;
        let convs = match kind {
            BlockKind::BasicBlock => vec![
                (
                    Conv::new(cin, planes, 3, stride, 1, vb.pp("conv1"))?,
                    batch_norm(planes, vb.pp("bn1"))?,
                ),
                (
                    Conv::new(planes, planes, 3, 1, 1, vb.pp("conv2"))?,
                    batch_norm(planes, vb.pp("bn2"))?,
                ),
            ],
            BlockKind::Bottleneck => vec![
                (
                    Conv::new(cin, planes, 1, 1, 0, vb.pp("conv1"))?,
                    batch_norm(planes, vb.pp("bn1"))?,
                ),
                (
                    Conv::new(planes, planes, 3, stride, 1, vb.pp("conv2"))?,
                    batch_norm(planes, vb.pp("bn2"))?,
                ),
                (
                    Conv::new(planes, cout, 1, 1, 0, vb.pp("conv3"))?,
                    batch_norm(cout, vb.pp("bn3"))?,
                ),
            ],
        };
        let downsample = if stride != 1 || cin != cout {
            Some((
                Conv::new(cin, cout, 1, stride, 0, vb.pp("downsample").pp(0))?,
                batch_norm(cout, vb.pp("downsample").pp(1))?,
            ))
        } else {
            None
        };
        Ok(ResBlock { convs, downsample })
    }

    /// Taps `{prefix}.conv1`.. (each convolution's output) for Grad-CAM at any conv layer.
    fn forward(&self, x: &Tensor, train: bool, prefix: &str, taps: &mut Taps) -> Result<Tensor> {
        let mut y = x.clone();
        let last = self.convs.len() - 1;
        for (i, (conv, norm)) in self.convs.iter().enumerate() {
            let c = taps.point(&format!("{prefix}.conv{}", i + 1), conv.forward(&y)?)?;
            y = bn(norm, &c, train)?;
            if i != last {
                y = relu(&y)?;
            }
        }
        let identity = match &self.downsample {
            Some((conv, norm)) => bn(norm, &conv.forward(x)?, train)?,
            None => x.clone(),
        };
        relu(&(y + identity)?)
    }
}

#[derive(Debug, Clone)]
pub struct ResNet {
    pub config: ResNetConfig,
    conv1: Conv,
    bn1: BatchNorm,
    layers: Vec<Vec<ResBlock>>,
    fc: Option<Linear>,
}

pub struct CnnOutput {
    /// The last feature map, [B, C, h, w].
    pub features: Tensor,
    pub pooled: Tensor,
    pub logits: Option<Tensor>,
}

impl ResNet {
    pub fn new(config: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        let mut layers = Vec::new();
        let mut cin = 64;
        for (i, &n) in config.layers.iter().enumerate() {
            let planes = 64 << i;
            let stride = if i == 0 { 1 } else { 2 };
            let vb_layer = vb.pp(format!("layer{}", i + 1));
            let mut blocks = Vec::new();
            for j in 0..n {
                blocks.push(ResBlock::new(
                    config.block,
                    cin,
                    planes,
                    if j == 0 { stride } else { 1 },
                    vb_layer.pp(j),
                )?);
                cin = planes * config.expansion();
            }
            layers.push(blocks);
        }
        Ok(ResNet {
            conv1: Conv::new(config.in_chans, 64, 7, 2, 3, vb.pp("conv1"))?,
            bn1: batch_norm(64, vb.pp("bn1"))?,
            layers,
            fc: if config.num_classes > 0 {
                Some(classifier(
                    config.feature_dim(),
                    config.num_classes,
                    vb.pp("fc"),
                )?)
            } else {
                None
            },
            config: config.clone(),
        })
    }

    /// Taps: `maxpool`, `layer1`..`layer4` (each stage's output, i.e. its last block's),
    /// `layerN.M` (every block's output, pytorch-grad-cam's `model.layerN[M]`) and
    /// `layerN.M.convK` (every convolution's output).
    pub fn forward_t(&self, x: &Tensor, train: bool, taps: &mut Taps) -> Result<CnnOutput> {
        let x = relu(&bn(&self.bn1, &self.conv1.forward(x)?, train)?)?;
        let mut x = taps.point("maxpool", max_pool_3x3_s2(&x)?)?;
        for (i, layer) in self.layers.iter().enumerate() {
            for (j, block) in layer.iter().enumerate() {
                let name = format!("layer{}.{j}", i + 1);
                x = block.forward(&x, train, &name, taps)?;
                x = taps.point(&name, x)?;
            }
            x = taps.point(&format!("layer{}", i + 1), x)?;
        }
        let pooled = global_avg_pool(&x)?;
        let logits = self.fc.as_ref().map(|fc| apply(fc, &pooled)).transpose()?;
        Ok(CnnOutput {
            features: x,
            pooled,
            logits,
        })
    }
}
