//! The schema of a pipeline file, as written. See `docs/pipelines.md` for the user-facing reference.

use super::ordered::Ordered;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Other pipeline files whose vars, data and stages this one reuses (paths relative to this file).
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub vars: Ordered<Value>,
    /// Named sets of var overrides, chosen with `--profile NAME`.
    #[serde(default)]
    pub profiles: Ordered<Ordered<Value>>,
    /// Axes: each stage that mentions `${axis}` (or depends on one that does) is expanded per value.
    #[serde(default)]
    pub matrix: Ordered<Vec<Value>>,
    #[serde(default)]
    pub data: Ordered<DataSpec>,
    #[serde(default)]
    pub stages: Ordered<StageSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    pub kind: String,
    #[serde(default)]
    pub desc: Option<String>,
    /// The shell command of a `command` stage.
    #[serde(default)]
    pub run: Option<String>,
    #[serde(default)]
    pub params: Map<String, Value>,
    #[serde(default)]
    pub inputs: Ordered<InputSpec>,
    #[serde(default)]
    pub resources: Resources,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum InputSpec {
    One(String),
    Many(Vec<String>),
}

/// What a stage needs from the machine. The local scheduler counts `cpu` and `gpu`; the Slurm
/// executor maps all of them onto `sbatch` flags.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

/// A data input: a folder or file, plus options handed to the task (`labels: labels.csv`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DataSpec {
    pub path: String,
    #[serde(flatten)]
    pub options: Map<String, Value>,
}
