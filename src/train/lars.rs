//! LARS (You et al. 2017) as MAE uses it for linear probing: SGD with momentum where each
//! multi-dimensional parameter's update is scaled by trust * ||w|| / ||g + wd*w||; 1-D
//! parameters (biases, norms) get neither weight decay nor the trust scaling.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use std::collections::BTreeMap;

pub struct Lars {
    pub momentum: f64,
    pub weight_decay: f64,
    pub trust_coefficient: f64,
    pub params: Vec<(String, Var)>,
    pub state: BTreeMap<String, Tensor>,
}

fn norm(t: &Tensor) -> Result<f64> {
    t.sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()
        .map(f64::sqrt)
}

impl Lars {
    pub fn new(params: Vec<(String, Var)>, weight_decay: f64) -> Lars {
        Lars {
            momentum: 0.9,
            weight_decay,
            trust_coefficient: 0.001,
            params,
            state: BTreeMap::new(),
        }
    }

    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        for (name, var) in &self.params {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let p = var.as_tensor();
            let mut d = g.clone();
            if p.rank() > 1 {
                d = (d + (p * self.weight_decay)?)?;
                let (pn, dn) = (norm(p)?, norm(&d)?);
                let q = if pn > 0.0 && dn > 0.0 {
                    self.trust_coefficient * pn / dn
                } else {
                    1.0
                };
                d = (d * q)?;
            }
            let mu = match self.state.remove(name) {
                Some(m) => ((m * self.momentum)? + &d)?,
                None => d,
            };
            var.set(&(p - (&mu * lr)?)?)?;
            self.state.insert(name.clone(), mu.detach());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn trust_ratio_scales_matrix_updates_only() {
        let w = Var::from_vec(vec![3f32, 4.0], (1, 2), &Device::Cpu).unwrap();
        let b = Var::from_vec(vec![1f32], 1, &Device::Cpu).unwrap();
        // loss = sum(w) + 2*b: gradients are 1 for w and 2 for b.
        let loss = (w.as_tensor().sum_all().unwrap()
            + (b.as_tensor().sum_all().unwrap() * 2.0).unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let mut opt = Lars::new(vec![("w".into(), w.clone()), ("b".into(), b.clone())], 0.0);
        opt.step(&grads, 1.0).unwrap();
        // ||w|| = 5, ||g|| = sqrt(2): q = 0.001 * 5 / sqrt(2).
        let q = 0.001 * 5.0 / 2f64.sqrt();
        let got: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            (got[0] as f64 - (3.0 - q)).abs() < 1e-6 && (got[1] as f64 - (4.0 - q)).abs() < 1e-6,
            "{got:?}"
        );
        assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), vec![-1.0]);
    }
}
