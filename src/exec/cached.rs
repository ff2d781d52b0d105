//! The cache as a layer in front of the executor: a hit returns at once, a miss takes the key's
//! lock, checks again (a concurrent run may have finished it), runs the stage in a staging folder
//! and publishes it. Failures are never cached.

use super::events::{Event, EventSink};
use super::keys::Keyed;
use crate::cache::store::{EntryState, Manifest, Staging, MANIFEST_SCHEMA};
use crate::cache::Store;
use crate::stage::{Catalog, Device, DeviceChoice, Inputs, Progress, StageCtx};
use anyhow::{Context, Result};
use serde_json::Value;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Cached { saved_s: f64 },
    Ran { wall_s: f64 },
    Failed { error: String },
}

/// Runs tasks in this process.
pub struct Local<'a> {
    pub catalog: &'a Catalog,
    pub workdir: PathBuf,
    pub scratch_dir: PathBuf,
    /// `auto`: each stage on the GPU the scheduler gave it, else the CPU.
    pub device: DeviceChoice,
    pub threads: usize,
    pub cancel: Arc<AtomicBool>,
}

/// One stage to run: what the cache layer and the task need of it, nothing of the plan, so a
/// stage frozen into a job file (see [`super::stage_job`]) runs through the same code.
pub struct Job<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    /// With defaults applied.
    pub params: &'a Value,
    pub keyed: &'a Keyed,
    pub inputs: Inputs,
    pub force: bool,
    /// The GPUs the scheduler assigned to this stage (empty: none).
    pub gpus: &'a [u32],
}

pub fn execute(store: &Store, local: &Local, job: &Job, sink: &dyn EventSink) -> Outcome {
    let name = job.name;
    let key = job.keyed.key;
    let hit = |store: &Store| {
        store.lookup(job.kind, &key).map(|e| Outcome::Cached {
            saved_s: e.wall_s().unwrap_or(0.0),
        })
    };
    if !job.force {
        if let Some(cached) = hit(store) {
            return cached;
        }
        if let EntryState::Damaged(why) = store.check(job.kind, &key) {
            sink.emit(Event::StageLog {
                stage: name.to_owned(),
                line: format!(
                    "warning: the cached entry {} is damaged ({why}); computing it again",
                    key.short()
                ),
            });
        }
    }
    let lock = match store.lock(&key, || {
        sink.emit(Event::StageWaitLock {
            stage: name.to_owned(),
            key: key.hex(),
        })
    }) {
        Ok(l) => l,
        Err(e) => {
            return Outcome::Failed {
                error: format!("cannot lock cache entry: {e}"),
            }
        }
    };
    if !job.force {
        if let Some(cached) = hit(store) {
            return cached;
        }
    }
    sink.emit(Event::StageStart {
        stage: name.to_owned(),
        key: key.hex(),
    });
    let result = store
        .stage(job.kind, &key, &lock)
        .context("preparing the staging folder")
        .and_then(|staging| run_and_publish(store, local, job, staging, lock.raw_fd(), sink));
    drop(lock);
    match result {
        Ok(wall_s) => Outcome::Ran { wall_s },
        Err(e) => Outcome::Failed {
            error: format!("{e:#}"),
        },
    }
}

fn run_and_publish(
    store: &Store,
    local: &Local,
    job: &Job,
    staging: Staging,
    lease: std::os::fd::RawFd,
    sink: &dyn EventSink,
) -> Result<f64> {
    let started = Instant::now();
    let started_at_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (metrics, peak) = local.run(job, &staging.dir, &staging.checkpoint_dir, lease, sink)?;
    let wall_s = started.elapsed().as_secs_f64();
    let manifest = Manifest {
        schema_version: MANIFEST_SCHEMA,
        key: job.keyed.key,
        kind: job.kind.to_owned(),
        stage: job.name.to_owned(),
        key_input: job.keyed.input.clone(),
        outputs: Default::default(),
        sizes: Default::default(),
        started_at_unix,
        wall_s,
        peak_rss_kib: peak,
        host: hostname(),
        device: local.device_for(job).to_string(),
        pretext_version: env!("CARGO_PKG_VERSION").to_owned(),
        pretext_commit: env!("PRETEXT_COMMIT").to_owned(),
        invocation: std::env::args().collect(),
        metrics: metrics.clone(),
    };
    store
        .publish(staging, manifest)
        .context("publishing the cache entry")?;
    sink.emit(Event::StageDone {
        stage: job.name.to_owned(),
        key: job.keyed.key.hex(),
        wall_s,
        metrics,
    });
    Ok(wall_s)
}

impl Local<'_> {
    /// The device a stage runs on: the one asked for, or under `auto` its first assigned GPU.
    fn device_for(&self, job: &Job) -> Device {
        match (self.device, job.gpus.first()) {
            (DeviceChoice::Auto, Some(&g)) => Device::Cuda(g as usize),
            (DeviceChoice::Auto, None) => Device::Cpu,
            (DeviceChoice::Fixed(d), _) => d,
        }
    }

    /// Runs the task with its log teed to `out_dir/log.txt` and to the event sink.
    fn run(
        &self,
        job: &Job,
        out_dir: &Path,
        checkpoint_dir: &Path,
        lease: std::os::fd::RawFd,
        sink: &dyn EventSink,
    ) -> Result<(Value, Option<u64>)> {
        let entry = self.catalog.get(job.kind).context("unknown kind")?;
        let log_file = Mutex::new(BufWriter::new(File::create(
            out_dir.join(crate::cache::store::LOG),
        )?));
        let stage = job.name;
        let log = |line: &str| {
            if let Ok(mut f) = log_file.lock() {
                // Flushed per line, so `tail -f` on a running stage's log.txt follows it.
                let _ = writeln!(f, "{line}").and_then(|_| f.flush());
            }
            sink.emit(Event::StageLog {
                stage: stage.to_owned(),
                line: line.to_owned(),
            });
        };
        let progress = |p: Progress| {
            sink.emit(Event::StageProgress {
                stage: stage.to_owned(),
                done: p.done,
                total: p.total,
                message: p.message,
            })
        };
        let mut ctx = StageCtx {
            stage,
            out_dir: out_dir.to_path_buf(),
            checkpoint_dir: checkpoint_dir.to_path_buf(),
            workdir: self.workdir.clone(),
            scratch_dir: self.scratch_dir.clone(),
            device: self.device_for(job),
            threads: self.threads,
            cancel: self.cancel.clone(),
            progress: &progress,
            log: &log,
            peak_rss_kib: None,
            lease: Some(lease),
        };
        // A panic (a bug, or a value no check caught) fails this stage with its message; the
        // run goes on or stops as for any failure.
        let result = crate::panics::catch(|| (entry.run)(job.params, &job.inputs, &mut ctx))
            .unwrap_or_else(|msg| Err(anyhow::anyhow!("the stage panicked: {msg}")));
        let peak = ctx.peak_rss_kib.or_else(own_peak_rss_kib);
        log_file
            .into_inner()
            .map_err(|_| anyhow::anyhow!("log lock poisoned"))?
            .flush()?;
        Ok((result?, peak))
    }
}

/// VmHWM of this process: the peak of in-process stages (shared by stages that ran in parallel).
fn own_peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
