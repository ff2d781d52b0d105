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

/// Comparing a fused kernel with the candle ops it replaces.
#[cfg(test)]
pub mod agree {
    use candle_core::{backprop::GradStore, Tensor};

    /// Every element of `got` within `tol` (relative, plus absolute at 0) of `want`.
    pub fn assert_close(got: &Tensor, want: &Tensor, tol: f32, what: &str) {
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (g, w) = (flat(got), flat(want));
        assert_eq!(g.len(), w.len(), "{what}: sizes");
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "{what}[{i}]: {a} vs {b}"
            );
        }
    }

    /// The gradients of sum(t * up): `up` pulled back through whatever made `t`.
    pub fn pull(t: &Tensor, up: &Tensor) -> GradStore {
        (t * up).unwrap().sum_all().unwrap().backward().unwrap()
    }
}
