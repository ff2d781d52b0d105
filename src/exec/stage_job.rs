//! One planned stage frozen into a file, so that another process (a Slurm job on a compute node)
//! runs exactly what the submitting run planned, through the same cache layer as a local run.
//!
//! `pretext exec-job FILE` reads it. Freezing the plan instead of re-reading the pipeline in the
//! job means an edit to the YAML while jobs wait in the queue cannot change what they compute
//! under an already-announced key. The file is JSON:
//!
//! ```json
//! {"schema":1,"stage":"finetune@vit-seed1","kind":"finetune","params":{..},
//!  "keyed":{"key":"<hex>","input":{..}},"inputs":{"encoder":{"path":"/cache/mae/<hex>/encoder.safetensors","options":{}}},
//!  "cache":"/shared/cache","workdir":"/shared/project","device":"cuda:0","force":false}
//! ```

use super::cached::{self, Job, Local, Outcome};
use super::events::EventSink;
use super::keys::Keyed;
use crate::cache::Store;
use crate::stage::{Catalog, Device, DeviceChoice, InputValue, Inputs};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub const STAGE_JOB_SCHEMA: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageJob {
    pub schema: u32,
    pub stage: String,
    pub kind: String,
    pub params: Value,
    pub keyed: Keyed,
    pub inputs: BTreeMap<String, InputValue>,
    pub cache: PathBuf,
    pub workdir: PathBuf,
    pub device: Device,
    pub force: bool,
}

impl StageJob {
    pub fn read(path: &Path) -> Result<StageJob> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the stage job file {}", path.display()))?;
        let job: StageJob = serde_json::from_str(&text)
            .with_context(|| format!("parsing the stage job file {}", path.display()))?;
        if job.schema != STAGE_JOB_SCHEMA {
            bail!(
                "{} has schema {}, this pretext reads {STAGE_JOB_SCHEMA}: submit with the same \
                 pretext version the jobs run (executor.pretext)",
                path.display(),
                job.schema
            );
        }
        Ok(job)
    }

    /// Runs the stage through the cache layer: a hit (another run got there first) returns at once.
    /// `cancel` stops the stage at its next step (SIGTERM from Slurm).
    pub fn run(
        &self,
        catalog: &Catalog,
        threads: usize,
        cancel: Arc<AtomicBool>,
        sink: &dyn EventSink,
    ) -> Result<Outcome> {
        let store = Store::open(&self.cache)
            .with_context(|| format!("opening the cache at {}", self.cache.display()))?;
        let _sharing = store.share_with_runs()?;
        let local = Local {
            catalog,
            workdir: self.workdir.clone(),
            scratch_dir: store.scratch_dir(),
            device: DeviceChoice::Fixed(self.device),
            threads,
            cancel,
        };
        let job = Job {
            name: &self.stage,
            kind: &self.kind,
            params: &self.params,
            keyed: &self.keyed,
            inputs: Inputs(self.inputs.clone()),
            force: self.force,
            gpus: &[],
        };
        Ok(cached::execute(&store, &local, &job, sink))
    }
}
