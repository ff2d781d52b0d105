//! Model parameters in the order the model creates them, with safetensors import and export.
//!
//! candle's `VarMap` is a HashMap; layer-wise lr-decay groups, checkpoints and error listings
//! need the model's own order, so this backend records it.

use crate::rng::Rng;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct ParamStore {
    map: VarMap,
    order: Arc<Mutex<Vec<String>>>,
    seed: u64,
}

impl Default for ParamStore {
    fn default() -> Self {
        ParamStore::new()
    }
}

impl SimpleBackend for ParamStore {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut order = self.order.lock().expect("param order lock");
        let mut data = self.map.data().lock().expect("varmap lock");
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!(
                    "parameter `{name}` requested with shape {s:?}, exists with {:?}",
                    var.shape()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        // candle's CPU generator cannot be seeded: draw initial values from our own stream, one
        // per parameter name, so the same seed gives the same model whatever the creation order.
        let mut rng = Rng::stream(self.seed, name_hash(name), 0x1A17);
        let n = s.elem_count();
        let values: Vec<f32> = match h {
            Init::Const(v) => vec![v as f32; n],
            Init::Randn { mean, stdev } => (0..n)
                .map(|_| (mean + stdev * rng.normal()) as f32)
                .collect(),
            Init::Uniform { lo, up } => (0..n).map(|_| rng.range(lo, up) as f32).collect(),
            Init::Kaiming { .. } => candle_core::bail!(
                "parameter `{name}`: Kaiming init is not used by pretext's models"
            ),
        };
        let var = Var::from_tensor(&Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?)?;
        data.insert(name.to_owned(), var.clone());
        order.push(name.to_owned());
        Ok(var.as_tensor().clone())
    }
    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("parameter `{name}` must be created with a shape")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .data()
            .lock()
            .expect("varmap lock")
            .contains_key(name)
    }
}

/// What a checkpoint load did not match: listed in full so the user can see the mapping problem.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl LoadReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.mismatched.is_empty()
    }
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!(
                "missing from the checkpoint ({}): {}",
                self.missing.len(),
                self.missing.join(", ")
            ));
        }
        if !self.mismatched.is_empty() {
            let m: Vec<String> = self
                .mismatched
                .iter()
                .map(|(n, want, got)| format!("{n} (model {want:?}, checkpoint {got:?})"))
                .collect();
            parts.push(format!("shape mismatch: {}", m.join(", ")));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!(
                "unused checkpoint keys ({}): {}",
                self.unexpected.len(),
                self.unexpected.join(", ")
            ));
        }
        parts.join("; ")
    }
}

impl ParamStore {
    pub fn new() -> ParamStore {
        ParamStore::seeded(0)
    }

    pub fn seeded(seed: u64) -> ParamStore {
        ParamStore {
            map: VarMap::new(),
            order: Arc::default(),
            seed,
        }
    }

    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// (name, var) in creation order.
    pub fn named(&self) -> Vec<(String, Var)> {
        let data = self.map.data().lock().expect("varmap lock");
        self.order
            .lock()
            .expect("param order lock")
            .iter()
            .filter_map(|n| data.get(n).map(|v| (n.clone(), v.clone())))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<Var> {
        self.map
            .data()
            .lock()
            .expect("varmap lock")
            .get(name)
            .cloned()
    }

    /// Copies matching tensors in; `ignore` filters checkpoint keys that are expected to be unused
    /// (BatchNorm's `num_batches_tracked`, a fixed `pos_embed`).
    pub fn load_tensors(
        &self,
        tensors: &HashMap<String, Tensor>,
        ignore: impl Fn(&str) -> bool,
    ) -> Result<LoadReport> {
        let mut report = LoadReport::default();
        let named = self.named();
        for (name, var) in &named {
            match tensors.get(name) {
                None => report.missing.push(name.clone()),
                Some(t) if t.dims() != var.dims() => {
                    report
                        .mismatched
                        .push((name.clone(), var.dims().to_vec(), t.dims().to_vec()))
                }
                Some(t) => var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?,
            }
        }
        let mut unexpected: Vec<String> = tensors
            .keys()
            .filter(|k| !ignore(k) && !named.iter().any(|(n, _)| n == *k))
            .cloned()
            .collect();
        unexpected.sort();
        report.unexpected = unexpected;
        Ok(report)
    }

    pub fn load_safetensors(
        &self,
        path: &Path,
        ignore: impl Fn(&str) -> bool,
    ) -> anyhow::Result<LoadReport> {
        let device = self
            .named()
            .first()
            .map_or(Device::Cpu, |(_, v)| v.device().clone());
        let tensors = candle_core::safetensors::load(path, &device)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(self.load_tensors(&tensors, ignore)?)
    }

    /// Writes every parameter (names as the reference's state_dict keys) to a safetensors file,
    /// atomically. Each BatchNorm also gets the `num_batches_tracked` buffer torch's state_dict
    /// has (an i64 scalar, 0: pretext does not count batches, and torch reads it only when
    /// `momentum=None`), so `load_state_dict(strict=True)` finds every key it expects.
    pub fn save_safetensors(
        &self,
        path: &Path,
        filter: impl Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (name, var) in self.named().into_iter().filter(|(n, _)| filter(n)) {
            if let Some(norm) = name.strip_suffix(".running_mean") {
                tensors.insert(
                    format!("{norm}.num_batches_tracked"),
                    Tensor::new(0i64, &Device::Cpu)?,
                );
            }
            tensors.insert(name, var.as_tensor().clone());
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        candle_core::safetensors::save(&tensors, tmp.path())?;
        tmp.persist(path)?;
        Ok(())
    }
}

fn name_hash(name: &str) -> u64 {
    u64::from_le_bytes(
        blake3::hash(name.as_bytes()).as_bytes()[..8]
            .try_into()
            .expect("8 bytes"),
    )
}
