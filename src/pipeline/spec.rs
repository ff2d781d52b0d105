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
    /// Where stages run (`type: local | slurm`) and the cluster's settings; see [`ExecutorSpec`].
    #[serde(default)]
    pub executor: Option<ExecutorSpec>,
}

/// How to run stages: on this machine, or as one Slurm job each. Set here, in the user's config
/// file (`$PRETEXT_CONFIG`, default `~/.config/pretext/config.yaml`, top-level key `executor:`),
/// or with `--executor`; the command line wins over the pipeline, the pipeline over the config
/// file, field by field. Never part of a stage key: where a stage ran does not change it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorSpec {
    #[serde(default, rename = "type")]
    pub kind: Option<ExecutorKind>,
    /// `sbatch --partition` for every stage (a stage's `resources.partition` wins).
    #[serde(default)]
    pub partition: Option<String>,
    /// `sbatch --account` for every stage (a stage's `resources.account` wins).
    #[serde(default)]
    pub account: Option<String>,
    /// `sbatch --qos`.
    #[serde(default)]
    pub qos: Option<String>,
    /// Extra flags passed to every `sbatch` as written (`["--constraint=a100"]`).
    #[serde(default)]
    pub sbatch_args: Vec<String>,
    /// Seconds between two looks at the queue [default: 1].
    #[serde(default)]
    pub poll_s: Option<f64>,
    /// The `pretext` binary the jobs run, as the compute nodes see it [default: this binary].
    #[serde(default)]
    pub pretext: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    Local,
    Slurm,
}

impl ExecutorSpec {
    /// `self` with the fields `over` sets replaced (lists are appended).
    pub fn overlay(mut self, over: ExecutorSpec) -> ExecutorSpec {
        self.kind = over.kind.or(self.kind);
        self.partition = over.partition.or(self.partition);
        self.account = over.account.or(self.account);
        self.qos = over.qos.or(self.qos);
        self.sbatch_args.extend(over.sbatch_args);
        self.poll_s = over.poll_s.or(self.poll_s);
        self.pretext = over.pretext.or(self.pretext);
        self
    }
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
    /// Cores: CPU tokens locally, `--cpus-per-task` on Slurm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    /// GPUs: GPU tokens locally, `--gres=gpu:N` on Slurm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<u32>,
    /// `--mem` on Slurm: `16G`, `500M`, or a number of megabytes.
    #[serde(
        default,
        deserialize_with = "text_or_number",
        skip_serializing_if = "Option::is_none"
    )]
    pub mem: Option<String>,
    /// `--time` on Slurm: minutes (`90`) or Slurm's forms (`1:30:00`, `2-00:00:00`).
    #[serde(
        default,
        deserialize_with = "text_or_number",
        skip_serializing_if = "Option::is_none"
    )]
    pub time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Extra `sbatch` flags for this stage, after the executor's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sbatch_args: Vec<String>,
}

/// `time: 90` and `time: "90"` mean the same; YAML makes the first a number.
fn text_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(serde::de::Error::custom(format!(
            "expected text or a number, got {other}"
        ))),
    }
}

/// A data input: a folder or file, plus options handed to the task (`labels: labels.csv`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DataSpec {
    pub path: String,
    #[serde(flatten)]
    pub options: Map<String, Value>,
}
