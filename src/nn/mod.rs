//! candle models with the reference implementations' parameter names (timm ViT, official MAE,
//! torchvision ResNet and DenseNet), the differentiable ops they need, and Grad-CAM.
//! Nothing here knows about files, YAML or caching.

pub mod cnn;
pub mod densenet;
pub mod fused;
pub mod gradcam;
pub mod mae;
pub mod masked_cnn;
pub mod ops;
pub mod params;
pub mod pos_embed;
pub mod resnet;
pub mod tap;
pub mod vit;
