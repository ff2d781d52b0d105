//! AdamW with parameter groups, identical to `torch.optim.AdamW` (decoupled decay, bias
//! correction, eps added after the bias-corrected square root), with named state that can be
//! checkpointed. candle's own AdamW has one lr and one decay for all parameters and private state.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct ParamGroup {
    pub lr_scale: f64,
    pub weight_decay: f64,
    pub params: Vec<(String, Var)>,
}

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    pub groups: Vec<ParamGroup>,
    /// Per parameter name: (exp_avg, exp_avg_sq, step).
    pub state: BTreeMap<String, (Tensor, Tensor, u64)>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, groups: Vec<ParamGroup>) -> AdamW {
        AdamW {
            config,
            groups,
            state: BTreeMap::new(),
        }
    }

    /// One update at base learning rate `lr` (each group scales it). Parameters without a
    /// gradient are left alone, as torch does.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let AdamWConfig { beta1, beta2, eps } = self.config;
        for group in &self.groups {
            let lr = lr * group.lr_scale;
            for (name, var) in &group.params {
                let Some(g) = grads.get(var.as_tensor()) else {
                    continue;
                };
                let (m, v, t) = match self.state.remove(name) {
                    Some(s) => s,
                    None => (
                        var.as_tensor().zeros_like()?,
                        var.as_tensor().zeros_like()?,
                        0,
                    ),
                };
                let t = t + 1;
                let p = if group.weight_decay != 0.0 {
                    (var.as_tensor() * (1.0 - lr * group.weight_decay))?
                } else {
                    var.as_tensor().clone()
                };
                let m = ((&m * beta1)? + (g * (1.0 - beta1))?)?;
                let v = ((&v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                let bc1 = 1.0 - beta1.powi(t as i32);
                let bc2_sqrt = (1.0 - beta2.powi(t as i32)).sqrt();
                let denom = ((v.sqrt()? / bc2_sqrt)? + eps)?;
                let p = (p - (m.div(&denom)? * (lr / bc1))?)?;
                var.set(&p)?;
                self.state.insert(name.clone(), (m.detach(), v.detach(), t));
            }
        }
        Ok(())
    }

    /// Every parameter, in group order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.groups
            .iter()
            .flat_map(|g| g.params.iter().map(|(_, v)| v))
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm<'a>(
    grads: &mut GradStore,
    vars: impl Iterator<Item = &'a Var> + Clone,
    max_norm: f64,
) -> Result<f64> {
    let mut total = 0f64;
    for v in vars.clone() {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = total.sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * scale)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}
