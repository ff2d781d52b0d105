//! The [`Plan`]: a pipeline with every stage concrete, in dependency order, as the cache keys and
//! the executors see it. [`load_plan`] builds one (see `expand` for how).

use super::diagnostic::{closest, SpecError};
use super::expand::Expander;
use super::load;
use super::spec::{ExecutorSpec, Resources};
use crate::stage::Catalog;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A pipeline with every stage concrete: what the cache keys and the scheduler work on.
#[derive(Debug)]
pub struct Plan {
    pub file: PathBuf,
    /// Relative paths in the pipeline resolve against this folder (see [`project_root`]).
    pub root: PathBuf,
    /// In dependency order: every stage comes after the stages it reads.
    pub stages: Vec<PlannedStage>,
    /// The pipeline's `executor:` block (its includes' under it).
    pub executor: ExecutorSpec,
    /// The profiles the file declares (its includes' too), by name.
    pub profiles: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct PlannedStage {
    /// `finetune@vit-seed1` for a matrix instance, the template name otherwise.
    pub name: String,
    pub template: String,
    pub kind: String,
    pub version: u32,
    /// With defaults applied (the task's canonical form).
    pub params: Value,
    pub inputs: BTreeMap<String, PlannedInput>,
    pub resources: Resources,
    /// Indices into `Plan::stages`, sorted, unique.
    pub deps: Vec<usize>,
    /// Matrix values this instance was made with, in axis order.
    pub binding: Vec<(String, Value)>,
    pub file: PathBuf,
    pub line: Option<usize>,
    /// What the kind's lint says of the params (values that run, but probably not as meant).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum PlannedInput {
    One(InputRef),
    Many(Vec<InputRef>),
}

impl PlannedInput {
    pub fn refs(&self) -> &[InputRef] {
        match self {
            PlannedInput::One(r) => std::slice::from_ref(r),
            PlannedInput::Many(rs) => rs,
        }
    }
}

#[derive(Debug, Clone)]
pub enum InputRef {
    /// Another stage's whole output folder (`output: None`) or one named output.
    Stage {
        stage: usize,
        output: Option<OutputRef>,
    },
    /// A data folder or file, fingerprinted by content.
    Data {
        path: PathBuf,
        options: Map<String, Value>,
    },
}

#[derive(Debug, Clone)]
pub struct OutputRef {
    pub name: String,
    /// Relative to the upstream stage's output folder.
    pub path: String,
}

#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    pub profile: Option<String>,
    /// `--set name=value`: overrides a var, or pins a matrix axis to one value or a list of them.
    pub set: Vec<(String, Value)>,
}

impl Plan {
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    /// The stages named (instance names or template names) and everything upstream of them.
    pub fn select(&self, names: &[String]) -> Result<Vec<bool>, String> {
        let mut keep = vec![names.is_empty(); self.stages.len()];
        for name in names {
            let hits: Vec<usize> = (0..self.stages.len())
                .filter(|&i| self.stages[i].name == *name || self.stages[i].template == *name)
                .collect();
            if hits.is_empty() {
                let mut msg = format!("no stage named `{name}` in {}", self.file.display());
                if let Some(best) = closest(name, self.stages.iter().map(|s| s.name.as_str())) {
                    msg.push_str(&format!("; did you mean `{best}`?"));
                }
                return Err(msg);
            }
            hits.into_iter().for_each(|i| keep[i] = true);
        }
        for i in (0..self.stages.len()).rev() {
            if keep[i] {
                for &d in &self.stages[i].deps {
                    keep[d] = true;
                }
            }
        }
        Ok(keep)
    }
}

/// The folder relative paths resolve against: the parent of the nearest enclosing `pipelines/`
/// folder, else the pipeline file's own folder. So `pipelines/x.yaml` reads `data/...` from the
/// project root, wherever `pretext` is started.
pub fn project_root(file: &Path) -> PathBuf {
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    dir.ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "pipelines"))
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or(dir)
}

/// Reads a pipeline file (and its includes), expands its matrix and checks every stage against
/// the task catalog.
pub fn load_plan(file: &Path, catalog: &Catalog, opts: &LoadOptions) -> Result<Plan, SpecError> {
    let merged = load::load(file)?;
    Expander::new(file, &merged, catalog, opts)?.run()
}
