//! A training stage's checkpoint in its checkpoint folder: `epoch-N.safetensors` (the model's
//! parameters as `param.<name>`, the optimiser's moments as `opt<k>.<name>`) and
//! `checkpoint.json`, the [`Meta`] that names it. Both are written to temporary names and renamed:
//! the JSON last, so a kill between the two leaves the previous checkpoint whole.

use super::Optim;
use crate::nn::params::ParamStore;
use crate::stage::StageCtx;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const META: &str = "checkpoint.json";

/// `checkpoint.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Meta<S> {
    /// Epochs done.
    pub epoch: usize,
    /// The tensor file of this checkpoint, in the same folder.
    pub tensors: String,
    /// The optimiser's step count per parameter.
    pub steps: BTreeMap<String, u64>,
    /// The training kind's own loop state (its history).
    pub state: S,
}

/// Saves model, optimiser state and loop state after `epoch` epochs, then deletes older tensor
/// files.
pub fn save<S: Serialize>(
    dir: &Path,
    params: &ParamStore,
    opt: &Optim,
    state: &S,
    epoch: usize,
) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = params
        .named()
        .into_iter()
        .map(|(n, v)| (format!("param.{n}"), v.as_tensor().clone()))
        .collect();
    let mut steps = BTreeMap::new();
    for (name, state, t) in opt.state() {
        for (k, tensor) in state.into_iter().enumerate() {
            tensors.insert(format!("opt{k}.{name}"), tensor);
        }
        steps.insert(name, t);
    }
    let file = format!("epoch-{epoch}.safetensors");
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    candle_core::safetensors::save(&tensors, tmp.path())?;
    tmp.persist(dir.join(&file))?;
    let meta = Meta {
        epoch,
        tensors: file.clone(),
        steps,
        state,
    };
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::write(tmp.path(), serde_json::to_vec_pretty(&meta)?)?;
    tmp.persist(dir.join(META))?;
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("epoch-") && name != file {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// Restores the stage's last checkpoint, if any: (epochs done, loop state). A checkpoint that
/// cannot be read (cut short by a full disk, damaged) is not retried forever: it is removed with
/// a warning and the stage starts over, from untouched weights ([`load`] checks the whole
/// checkpoint before it sets anything).
pub fn resume<S: DeserializeOwned>(
    ctx: &StageCtx,
    params: &ParamStore,
    opt: &mut Optim,
) -> Result<Option<(usize, S)>> {
    match load(&ctx.checkpoint_dir, params, opt) {
        Ok(found) => Ok(found),
        Err(e) => {
            ctx.log(&format!(
                "warning: the checkpoint in {} is unreadable ({e:#}); starting this stage over",
                ctx.checkpoint_dir.display()
            ));
            for entry in std::fs::read_dir(&ctx.checkpoint_dir)?.flatten() {
                std::fs::remove_file(entry.path())?;
            }
            Ok(None)
        }
    }
}

/// Restores the last checkpoint in `dir`, if any: (epochs done, loop state).
pub fn load<S: DeserializeOwned>(
    dir: &Path,
    params: &ParamStore,
    opt: &mut Optim,
) -> Result<Option<(usize, S)>> {
    let meta_path = dir.join(META);
    let Ok(text) = std::fs::read_to_string(&meta_path) else {
        return Ok(None);
    };
    let meta: Meta<S> = serde_json::from_str(&text)
        .with_context(|| format!("{} is corrupt", meta_path.display()))?;
    let file = dir.join(&meta.tensors);
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
        .with_context(|| format!("reading {}", file.display()))?;
    let params_only: HashMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("param.").map(|n| (n.to_owned(), v.clone())))
        .collect();
    // Everything is checked before anything is set: a failed resume leaves the model as built.
    for (name, var) in params.named() {
        if params_only.get(&name).map(|t| t.dims()) != Some(var.dims()) {
            bail!(
                "checkpoint {} does not fit this model at `{name}`",
                file.display()
            );
        }
    }
    params.load_tensors(&params_only, |_| false)?;
    for (name, &step) in &meta.steps {
        let state: Vec<Tensor> = (0..)
            .map_while(|k| tensors.get(&format!("opt{k}.{name}")).cloned())
            .collect();
        opt.restore(name, state, step);
    }
    Ok(Some((meta.epoch, meta.state)))
}
