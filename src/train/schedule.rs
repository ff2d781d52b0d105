//! Learning-rate schedule: linear warmup, then a half-cycle cosine to `min_lr`, evaluated per
//! iteration at a fractional epoch (MAE's `adjust_learning_rate`).

#[derive(Debug, Clone, Copy)]
pub struct WarmupCosine {
    pub base_lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub epochs: f64,
}

impl WarmupCosine {
    pub fn lr(&self, epoch: f64) -> f64 {
        if epoch < self.warmup_epochs {
            return self.base_lr * epoch / self.warmup_epochs;
        }
        let span = (self.epochs - self.warmup_epochs).max(1e-9);
        let progress = ((epoch - self.warmup_epochs) / span).clamp(0.0, 1.0);
        self.min_lr
            + (self.base_lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// MAE's rule: the lr written in configs is per 256 images.
pub fn scaled_lr(blr: f64, batch: usize) -> f64 {
    blr * batch as f64 / 256.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = WarmupCosine {
            base_lr: 1.0,
            min_lr: 0.0,
            warmup_epochs: 2.0,
            epochs: 10.0,
        };
        assert_eq!(s.lr(0.0), 0.0);
        assert!((s.lr(1.0) - 0.5).abs() < 1e-12);
        assert!((s.lr(2.0) - 1.0).abs() < 1e-12);
        assert!((s.lr(6.0) - 0.5).abs() < 1e-12);
        assert!(s.lr(10.0).abs() < 1e-12);
        assert_eq!(scaled_lr(1.5e-4, 512), 3e-4);
    }
}
