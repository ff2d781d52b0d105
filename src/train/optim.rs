//! AdamW with parameter groups, identical to `torch.optim.AdamW` (decoupled decay, bias
//! correction, eps added after the bias-corrected square root), with named state that can be
//! checkpointed. candle's own AdamW has one lr and one decay for all parameters and private state.
//!
//! On the CPU the update runs in place: three passes over each parameter's memory (first moment,
//! second moment, parameter) instead of a dozen candle ops that each allocate a tensor. Elsewhere
//! (CUDA) the same arithmetic runs as candle ops.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};
use rayon::prelude::*;
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
    /// Update f32 CPU tensors in place (the default); false runs candle ops everywhere.
    pub in_place: bool,
}

impl AdamW {
    pub fn new(config: AdamWConfig, groups: Vec<ParamGroup>) -> AdamW {
        AdamW {
            config,
            groups,
            state: BTreeMap::new(),
            in_place: true,
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
                let bc1 = 1.0 - beta1.powi(t as i32);
                let bc2_sqrt = (1.0 - beta2.powi(t as i32)).sqrt();
                if self.in_place && in_place(&[var.as_tensor(), g, &m, &v]) {
                    m.inplace_op2(g, &Moment::new(beta1, false))?;
                    v.inplace_op2(g, &Moment::new(beta2, true))?;
                    var.as_tensor().inplace_op3(
                        &m,
                        &v,
                        &Update {
                            keep: (1.0 - lr * group.weight_decay) as f32,
                            decays: group.weight_decay != 0.0,
                            inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
                            eps: eps as f32,
                            step: (lr / bc1) as f32,
                        },
                    )?;
                    self.state.insert(name.clone(), (m, v, t));
                    continue;
                }
                let p = if group.weight_decay != 0.0 {
                    (var.as_tensor() * (1.0 - lr * group.weight_decay))?
                } else {
                    var.as_tensor().clone()
                };
                let m = ((&m * beta1)? + (g * (1.0 - beta1))?)?;
                let v = ((&v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
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

/// Whether the in-place CPU update applies: f32 CPU tensors, contiguous, of one shape.
fn in_place(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| {
        t.device().is_cpu()
            && t.dtype() == candle_core::DType::F32
            && t.is_contiguous()
            && t.shape() == ts[0].shape()
    })
}

/// Below this many elements a pass runs on the calling thread.
const PARALLEL_FROM: usize = 1 << 15;
const CHUNK: usize = 1 << 14;

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("adamw: expected contiguous f32"),
    }
}

fn f32s_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: expected contiguous f32"),
    }
}

/// `dst[i] = f(dst[i], i)` over chunks, in parallel when the tensor is large.
fn for_each_chunk(dst: &mut [f32], f: impl Fn(&mut [f32], usize) + Sync) {
    if dst.len() < PARALLEL_FROM {
        f(dst, 0);
    } else {
        dst.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, d)| f(d, c * CHUNK));
    }
}

/// m = decay * m + (1 - decay) * g (or g^2). The constants are rounded to f32 as candle rounds
/// a scalar operand, so that both paths give the same bits.
struct Moment {
    decay: f32,
    rest: f32,
    square: bool,
}

impl Moment {
    fn new(decay: f64, square: bool) -> Moment {
        Moment {
            decay: decay as f32,
            rest: (1.0 - decay) as f32,
            square,
        }
    }
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "pretext-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (m, g) = (f32s_mut(s1, l1)?, f32s(s2, l2)?);
        let Moment {
            decay,
            rest,
            square,
        } = *self;
        for_each_chunk(m, |m, at| {
            for (m, &g) in m.iter_mut().zip(&g[at..]) {
                let g = if square { g * g } else { g };
                *m = *m * decay + g * rest;
            }
        });
        Ok(())
    }
}

/// p = p * (1 - lr * wd) - (m / (sqrt(v) / bc2_sqrt + eps)) * lr / bc1, dividing by a scalar
/// as candle does (multiplying by its reciprocal).
struct Update {
    keep: f32,
    decays: bool,
    inv_bc2_sqrt: f32,
    eps: f32,
    step: f32,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "pretext-adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (p, m, v) = (f32s_mut(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?);
        let Update {
            keep,
            decays,
            inv_bc2_sqrt,
            eps,
            step,
        } = *self;
        for_each_chunk(p, |p, at| {
            for ((p, &m), &v) in p.iter_mut().zip(&m[at..]).zip(&v[at..]) {
                let decayed = if decays { *p * keep } else { *p };
                *p = decayed - (m / (v.sqrt() * inv_bc2_sqrt + eps)) * step;
            }
        });
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The in-place CPU update gives the composed candle ops' bits, step after step, with and
    /// without weight decay, for a tensor big enough to be split across threads.
    #[test]
    fn in_place_update_is_bit_identical_to_the_composed_ops() {
        let dev = Device::Cpu;
        let runs: Vec<Vec<Vec<f32>>> = [true, false]
            .into_iter()
            .map(|in_place| {
                let init: Vec<f32> = (0..70_000).map(|i| (i as f32 * 0.37).sin()).collect();
                let big = Var::from_tensor(&Tensor::new(init, &dev).unwrap()).unwrap();
                let small = Var::from_tensor(&Tensor::arange(0f32, 9.0, &dev).unwrap()).unwrap();
                let mut opt = AdamW::new(
                    AdamWConfig::default(),
                    vec![
                        ParamGroup {
                            lr_scale: 1.0,
                            weight_decay: 0.05,
                            params: vec![("big".into(), big.clone())],
                        },
                        ParamGroup {
                            lr_scale: 0.3,
                            weight_decay: 0.0,
                            params: vec![("small".into(), small.clone())],
                        },
                    ],
                );
                opt.in_place = in_place;
                let mut seen = Vec::new();
                for step in 0..3 {
                    let loss = ((big.as_tensor().sqr().unwrap().sum_all().unwrap()
                        + small.as_tensor().sin().unwrap().sum_all().unwrap())
                    .unwrap()
                        * (step + 1) as f64)
                        .unwrap();
                    opt.step(&loss.backward().unwrap(), 1e-3).unwrap();
                    seen.push(big.as_tensor().to_vec1::<f32>().unwrap());
                    seen.push(small.as_tensor().to_vec1::<f32>().unwrap());
                }
                for (m, v, _) in opt.state.values() {
                    seen.push(m.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                    seen.push(v.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                }
                seen
            })
            .collect();
        assert_eq!(runs[0].len(), runs[1].len());
        for (k, (a, b)) in runs[0].iter().zip(&runs[1]).enumerate() {
            let differ = a
                .iter()
                .zip(b)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count();
            assert_eq!(
                differ,
                0,
                "tensor {k}: {differ} of {} elements differ",
                a.len()
            );
        }
    }
}
