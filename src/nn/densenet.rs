//! DenseNet as in torchvision (`features.conv0`, `features.denseblockN.denselayerM.{norm1,conv1,
//! norm2,conv2}`, `features.transitionN.{norm,conv}`, `features.norm5`, `classifier`).

use super::cnn::{apply, batch_norm, bn, classifier, Conv};
use super::ops::{avg_pool_2x2, global_avg_pool, max_pool_3x3_s2, relu};
use super::resnet::CnnOutput;
use super::tap::Taps;
use candle_core::{Result, Tensor};
use candle_nn::{BatchNorm, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseNetConfig {
    pub growth_rate: usize,
    pub block_config: Vec<usize>,
    pub num_init_features: usize,
    pub bn_size: usize,
    pub num_classes: usize,
    #[serde(default = "three")]
    pub in_chans: usize,
}

fn three() -> usize {
    3
}

impl DenseNetConfig {
    pub fn densenet121(in_chans: usize, num_classes: usize) -> DenseNetConfig {
        DenseNetConfig {
            growth_rate: 32,
            block_config: vec![6, 12, 24, 16],
            num_init_features: 64,
            bn_size: 4,
            num_classes,
            in_chans,
        }
    }
}

#[derive(Debug, Clone)]
struct DenseLayer {
    norm1: BatchNorm,
    conv1: Conv,
    norm2: BatchNorm,
    conv2: Conv,
}

#[derive(Debug, Clone)]
struct Transition {
    norm: BatchNorm,
    conv: Conv,
}

#[derive(Debug, Clone)]
pub struct DenseNet {
    pub config: DenseNetConfig,
    conv0: Conv,
    norm0: BatchNorm,
    blocks: Vec<(Vec<DenseLayer>, Option<Transition>)>,
    norm5: BatchNorm,
    classifier: Option<Linear>,
    pub num_features: usize,
}

impl DenseNet {
    pub fn new(config: &DenseNetConfig, vb: VarBuilder) -> Result<Self> {
        let f = vb.pp("features");
        let mut c = config.num_init_features;
        let mut blocks = Vec::new();
        for (i, &n) in config.block_config.iter().enumerate() {
            let vb_block = f.pp(format!("denseblock{}", i + 1));
            let mut layers = Vec::new();
            for j in 0..n {
                let vb_l = vb_block.pp(format!("denselayer{}", j + 1));
                let inner = config.bn_size * config.growth_rate;
                layers.push(DenseLayer {
                    norm1: batch_norm(c, vb_l.pp("norm1"))?,
                    conv1: Conv::new(c, inner, 1, 1, 0, vb_l.pp("conv1"))?,
                    norm2: batch_norm(inner, vb_l.pp("norm2"))?,
                    conv2: Conv::new(inner, config.growth_rate, 3, 1, 1, vb_l.pp("conv2"))?,
                });
                c += config.growth_rate;
            }
            let transition = if i + 1 < config.block_config.len() {
                let vb_t = f.pp(format!("transition{}", i + 1));
                let t = Transition {
                    norm: batch_norm(c, vb_t.pp("norm"))?,
                    conv: Conv::new(c, c / 2, 1, 1, 0, vb_t.pp("conv"))?,
                };
                c /= 2;
                Some(t)
            } else {
                None
            };
            blocks.push((layers, transition));
        }
        Ok(DenseNet {
            conv0: Conv::new(
                config.in_chans,
                config.num_init_features,
                7,
                2,
                3,
                f.pp("conv0"),
            )?,
            norm0: batch_norm(config.num_init_features, f.pp("norm0"))?,
            blocks,
            norm5: batch_norm(c, f.pp("norm5"))?,
            classifier: if config.num_classes > 0 {
                Some(classifier(c, config.num_classes, vb.pp("classifier"))?)
            } else {
                None
            },
            num_features: c,
            config: config.clone(),
        })
    }

    /// Taps: `features.pool0`, `features.denseblockN`, `features.transitionN`, `features.norm5`,
    /// and every convolution: `features.denseblockN.denselayerM.conv1|conv2`.
    /// `features` is norm5's output (before the final ReLU), as `model.features(x)`.
    pub fn forward_t(&self, x: &Tensor, train: bool, taps: &mut Taps) -> Result<CnnOutput> {
        let x = relu(&bn(&self.norm0, &self.conv0.forward(x)?, train)?)?;
        let mut x = taps.point("features.pool0", max_pool_3x3_s2(&x)?)?;
        for (i, (layers, transition)) in self.blocks.iter().enumerate() {
            for (j, l) in layers.iter().enumerate() {
                let name = format!("features.denseblock{}.denselayer{}", i + 1, j + 1);
                let y = taps.point(
                    &format!("{name}.conv1"),
                    l.conv1.forward(&relu(&bn(&l.norm1, &x, train)?)?)?,
                )?;
                let y = taps.point(
                    &format!("{name}.conv2"),
                    l.conv2.forward(&relu(&bn(&l.norm2, &y, train)?)?)?,
                )?;
                x = Tensor::cat(&[&x, &y], 1)?;
            }
            x = taps.point(&format!("features.denseblock{}", i + 1), x)?;
            if let Some(t) = transition {
                x = avg_pool_2x2(&t.conv.forward(&relu(&bn(&t.norm, &x, train)?)?)?)?;
                x = taps.point(&format!("features.transition{}", i + 1), x)?;
            }
        }
        let features = taps.point("features.norm5", bn(&self.norm5, &x, train)?)?;
        let pooled = global_avg_pool(&relu(&features)?)?;
        let logits = self
            .classifier
            .as_ref()
            .map(|c| apply(c, &pooled))
            .transpose()?;
        Ok(CnnOutput {
            features,
            pooled,
            logits,
        })
    }
}
