//! The seam between the orchestrator and the science, in a room of its own: one [`Task`] trait,
//! one [`StageCtx`], and the type-erased [`TaskEntry`] rows of a [`Catalog`].
//!
//! A task is a function `(params, inputs, ctx) -> metrics` that writes its outputs into
//! `ctx.out_dir`. It never sees the cache, the scheduler or YAML: the orchestrator hands it
//! plain paths and publishes its output directory atomically once it returns `Ok`. The
//! orchestrator (`pipeline`, `cache`, `exec`) imports this module, never `tasks`: it sees kinds
//! only as catalog rows, which the cli builds with `tasks::catalog()` and hands to it, so it never
//! names a model. This module imports nothing of either side (`tests/it/layers.rs` checks).

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A named input a task accepts.
#[derive(Debug, Clone)]
pub struct InputSlot {
    pub name: &'static str,
    pub required: bool,
    /// Accepts a list of references (`results: [eval_a, eval_b]` or `eval@*`).
    pub many: bool,
    pub doc: &'static str,
}

/// A named output, at a path relative to the stage's output directory.
#[derive(Debug, Clone)]
pub struct OutputSlot {
    pub name: &'static str,
    pub path: &'static str,
    pub doc: &'static str,
}

pub trait Task {
    const KIND: &'static str;
    /// Bump when the same params would now give different results: it changes every key.
    const VERSION: u32;
    const SUMMARY: &'static str;
    /// Trains a model: its tensor ops use every core, so by default the scheduler gives it the
    /// whole machine (a stage's `resources.cpu` overrides this).
    const TRAINS: bool = false;
    /// Defaults applied by serde; unknown fields rejected (`#[serde(deny_unknown_fields)]`).
    /// Doc comments on the fields are the params' documentation (`pretext kinds KIND`, and the
    /// JSON Schema of `pretext schema`).
    type Params: DeserializeOwned + Serialize + schemars::JsonSchema;
    /// `None` accepts any slot name (the `command` kind).
    fn inputs(p: &Self::Params) -> Option<Vec<InputSlot>>;
    fn outputs(p: &Self::Params) -> Vec<OutputSlot>;
    /// Refuses values no run could use (a zero batch, an image size the patch does not divide),
    /// at plan time, before any stage starts. Defaults are applied already.
    fn check(_p: &Self::Params) -> std::result::Result<(), String> {
        Ok(())
    }
    /// Values that run but probably not as meant (a warmup as long as the run), said at plan
    /// time as warnings.
    fn lint(_p: &Self::Params) -> Vec<String> {
        Vec::new()
    }
    /// Checks the inputs before the run starts any stage (a test split to score, two classes to
    /// tell apart), so a mistake in the data surfaces before hours of upstream training.
    fn preflight(_p: &Self::Params, _inputs: &Inputs) -> Result<()> {
        Ok(())
    }
    /// Writes outputs into `ctx.out_dir` and returns the metrics recorded in the manifest.
    fn run(p: &Self::Params, inputs: &Inputs, ctx: &mut StageCtx) -> Result<Value>;
    /// The line the end of a run prints for an entry of this kind (its result, or where to
    /// look), from the entry's metrics and folder; `None` for kinds with nothing to say, whose
    /// entries the end of a run then does not open.
    const HEADLINE: Option<Headline> = None;
}

/// What the end of a run says about an entry, from its metrics and its folder.
pub type Headline = fn(&Value, &Path) -> String;

/// One task kind with its types erased, as the orchestrator sees it.
#[derive(Clone, Copy)]
pub struct TaskEntry {
    pub kind: &'static str,
    pub version: u32,
    pub summary: &'static str,
    pub trains: bool,
    /// Parses params, applies defaults, checks them, and returns them in canonical form.
    pub normalize: fn(Value) -> std::result::Result<Value, String>,
    pub inputs: fn(&Value) -> Option<Vec<InputSlot>>,
    pub outputs: fn(&Value) -> Vec<OutputSlot>,
    pub run: fn(&Value, &Inputs, &mut StageCtx) -> Result<Value>,
    /// The JSON Schema of the params (defaults, types, doc comments).
    pub schema: fn() -> Value,
    /// Plan-time warnings about normalized params.
    pub lint: fn(&Value) -> Vec<String>,
    /// Checks of the inputs before any stage runs.
    pub preflight: fn(&Value, &Inputs) -> Result<()>,
    /// What the end of a run says about an entry (metrics, entry folder), for kinds that speak.
    pub headline: Option<Headline>,
}

pub fn entry<T: Task>() -> TaskEntry {
    fn parse<T: Task>(v: &Value) -> T::Params {
        // Only called on values that `normalize` produced, which parse by construction.
        serde_json::from_value(v.clone()).expect("normalized params parse")
    }
    TaskEntry {
        kind: T::KIND,
        version: T::VERSION,
        summary: T::SUMMARY,
        trains: T::TRAINS,
        normalize: |v| {
            reject_unknown_keys(&v, &schemars::schema_for!(T::Params).to_value())?;
            let p: T::Params = serde_json::from_value(v).map_err(|e| e.to_string())?;
            T::check(&p)?;
            serde_json::to_value(p).map_err(|e| e.to_string())
        },
        inputs: |v| T::inputs(&parse::<T>(v)),
        outputs: |v| T::outputs(&parse::<T>(v)),
        run: |v, inputs, ctx| {
            let p: T::Params = serde_json::from_value(v.clone())?;
            T::run(&p, inputs, ctx)
        },
        schema: || serde_json::to_value(schemars::schema_for!(T::Params)).unwrap_or_default(),
        lint: |v| T::lint(&parse::<T>(v)),
        preflight: |v, inputs| T::preflight(&parse::<T>(v), inputs),
        headline: T::HEADLINE,
    }
}

/// Where the kind's schema closes its params (`additionalProperties: false`), a key it does not
/// list is an error worded as serde words its own (`unknown field `x`, expected one of ...`), so
/// the planner's "did you mean" reads it. Checked here rather than with serde's
/// `deny_unknown_fields`, which does not work beside `flatten` (the shared `Backbone` block).
fn reject_unknown_keys(params: &Value, schema: &Value) -> std::result::Result<(), String> {
    let (Some(given), Some(known)) = (params.as_object(), schema["properties"].as_object()) else {
        return Ok(());
    };
    if schema["additionalProperties"] != Value::Bool(false) {
        return Ok(());
    }
    match given.keys().find(|k| !known.contains_key(*k)) {
        None => Ok(()),
        Some(wrong) => {
            let expected: Vec<String> = known.keys().map(|k| format!("`{k}`")).collect();
            Err(format!(
                "unknown field `{wrong}`, expected one of {}",
                expected.join(", ")
            ))
        }
    }
}

/// The stage kinds pretext knows, with their params types erased: a list the orchestrator reads,
/// never names.
#[derive(Clone)]
pub struct Catalog {
    entries: Vec<TaskEntry>,
}

impl Catalog {
    pub fn new(entries: Vec<TaskEntry>) -> Self {
        Catalog { entries }
    }
    pub fn get(&self, kind: &str) -> Option<&TaskEntry> {
        self.entries.iter().find(|e| e.kind == kind)
    }
    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.entries.iter().map(|e| e.kind)
    }
}

/// What one input slot resolved to: paths inside upstream cache entries or data folders.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InputValue {
    One(InputItem),
    Many(Vec<InputItem>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputItem {
    pub path: PathBuf,
    /// Options written beside a data entry (`labels: labels.csv`, `source: mura`); empty otherwise.
    pub options: serde_json::Map<String, Value>,
    /// A data input's content fingerprint (hex), which covers every file in it: what derived
    /// data (decoded images) is keyed by. `None` for upstream outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// For an upstream output, the upstream stage's name in the running pipeline
    /// (`eval@seed1`): a cache entry records the name of the pipeline that computed it, which
    /// another pipeline sharing the entry may call differently. `None` for data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Inputs(pub BTreeMap<String, InputValue>);

impl Inputs {
    pub fn item(&self, slot: &str) -> Result<&InputItem> {
        match self.0.get(slot) {
            Some(InputValue::One(item)) => Ok(item),
            Some(InputValue::Many(_)) => {
                Err(anyhow!("input `{slot}` takes one reference, not a list"))
            }
            None => Err(anyhow!("input `{slot}` is missing")),
        }
    }
    pub fn path(&self, slot: &str) -> Result<&Path> {
        self.item(slot).map(|i| i.path.as_path())
    }
    pub fn optional_path(&self, slot: &str) -> Option<&Path> {
        self.item(slot).ok().map(|i| i.path.as_path())
    }
    pub fn items(&self, slot: &str) -> Vec<&InputItem> {
        match self.0.get(slot) {
            Some(InputValue::One(item)) => vec![item],
            Some(InputValue::Many(items)) => items.iter().collect(),
            None => Vec::new(),
        }
    }
}

/// A stage's view of its progress: `done` of `total` units and a short message (loss, epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    pub message: String,
}

/// What a running task may touch.
pub struct StageCtx<'a> {
    pub stage: &'a str,
    /// Published atomically into the cache when `run` returns `Ok`.
    pub out_dir: PathBuf,
    /// Survives a failed or killed attempt, so the next one resumes; deleted on success.
    pub checkpoint_dir: PathBuf,
    /// The directory relative paths in params are read from (the project root).
    pub workdir: PathBuf,
    /// Shared by all stages for derived data that can always be recomputed (decoded images).
    pub scratch_dir: PathBuf,
    pub device: Device,
    pub threads: usize,
    pub cancel: Arc<AtomicBool>,
    pub progress: &'a (dyn Fn(Progress) + Sync),
    pub log: &'a (dyn Fn(&str) + Sync),
    /// Set by tasks that run a child process, whose peak memory the executor cannot see.
    pub peak_rss_kib: Option<u64>,
    /// A file descriptor that marks this stage as running (the executor's lock on it). A process
    /// the task starts that could outlive pretext (a command's guard) keeps it open, so no
    /// other attempt of the stage starts until that process is gone.
    pub lease: Option<std::os::fd::RawFd>,
}

/// Where a stage computes: the CPU or one CUDA card. Written and read as `cpu` / `cuda:N`
/// (`cuda` alone is `cuda:0`), in flags, job files and `PRETEXT_DEVICE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(name: &str) -> std::result::Result<Device, String> {
        match name {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            n => n
                .strip_prefix("cuda:")
                .and_then(|i| i.parse::<usize>().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device `{n}`: use cpu, cuda, cuda:N or auto")),
        }
    }
}

impl TryFrom<String> for Device {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Device, String> {
        s.parse()
    }
}

impl From<Device> for String {
    fn from(d: Device) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl Device {
    /// The candle device; a CUDA device in a build without CUDA says how to get one.
    pub fn open(self) -> Result<candle_core::Device> {
        let Device::Cuda(ordinal) = self else {
            return Ok(candle_core::Device::Cpu);
        };
        if !candle_core::utils::cuda_is_available() {
            bail!(
                "device `{self}`: this pretext was built without CUDA; build it with \
                 `cargo build --release --features cuda` (tools/cuda/build.sh) or use --device cpu"
            );
        }
        candle_core::Device::new_cuda(ordinal)
            .with_context(|| format!("opening CUDA device {ordinal}"))
    }
}

/// What a run was asked for: one device for every stage, or `auto` (a GPU stage on the card the
/// scheduler gives it, every other stage on the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Fixed(Device),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(name: &str) -> std::result::Result<DeviceChoice, String> {
        match name {
            "auto" => Ok(DeviceChoice::Auto),
            n => n.parse().map(DeviceChoice::Fixed),
        }
    }
}

impl StageCtx<'_> {
    /// Where this stage's models and batches live.
    pub fn compute_device(&self) -> Result<candle_core::Device> {
        self.device.open()
    }

    pub fn report(&self, done: u64, total: u64, message: impl Into<String>) {
        (self.progress)(Progress {
            done,
            total,
            message: message.into(),
        });
    }
    /// A line of the stage's log. Lines starting `warning:` or `note:` are shown to the user
    /// during the run; the others with `--verbose`, and the last of them when the stage fails.
    pub fn log(&self, line: &str) {
        (self.log)(line)
    }
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_read_and_write_as_the_flags_spell_them() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!(
            "cuda:3".parse::<Device>().map(|d| d.to_string()),
            Ok("cuda:3".into())
        );
        assert!("gpu0"
            .parse::<Device>()
            .unwrap_err()
            .contains("unknown device `gpu0`"));
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Fixed(Device::Cpu)));
        let json = serde_json::to_string(&Device::Cuda(1)).unwrap();
        assert_eq!(json, "\"cuda:1\"");
        assert!(serde_json::from_str::<Device>("\"tpu\"").is_err());
    }
}
