//! The Slurm executor: every stale stage becomes one `sbatch` job that runs `pretext exec-job` on
//! that stage (a [`StageJob`](super::stage_job::StageJob) file) against the cache on the cluster's
//! shared filesystem.
//!
//! All stale stages are submitted up front, each with `--dependency=afterok:<upstream jobs>` and
//! `--kill-on-invalid-dep=yes` (many clusters leave `kill_invalid_depend` off, and then a job whose
//! upstream failed would pend forever). Then one loop follows every job: `squeue` each
//! `poll_s`, the job's own event lines from its output file, `scontrol`/`sacct -c` and an exit
//! code file the job script writes itself once a job has left the queue. What a job did is read
//! from the cache first: an entry under the stage's key means done, whatever Slurm says.
//!
//! A job killed by its time limit or `scancel` never publishes (publishing is an atomic rename),
//! and its checkpoint folder stays in the cache, so the next submission resumes it.
//!
//! `queue` is all the talk with Slurm's commands, `job_files` what a job runs and what it leaves
//! behind, `follow` one run from the first submission to the last job's end.

mod follow;
mod job_files;
mod queue;

pub use follow::run_plan;

use crate::pipeline::spec::ExecutorSpec;
use crate::stage::Device;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// What the cluster is asked for beyond each stage's own `resources`.
#[derive(Debug, Clone)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub sbatch_args: Vec<String>,
    pub poll: Duration,
    /// The binary the jobs run.
    pub pretext: PathBuf,
}

impl SlurmConfig {
    pub fn from_spec(spec: &ExecutorSpec) -> Result<SlurmConfig> {
        let pretext = match &spec.pretext {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe().context("finding this pretext binary for the jobs")?,
        };
        let poll_s = spec.poll_s.unwrap_or(1.0);
        if !(poll_s.is_finite() && poll_s > 0.0) {
            bail!("executor.poll_s must be a positive number of seconds, got {poll_s}");
        }
        Ok(SlurmConfig {
            partition: spec.partition.clone(),
            account: spec.account.clone(),
            qos: spec.qos.clone(),
            sbatch_args: spec.sbatch_args.clone(),
            poll: Duration::from_secs_f64(poll_s),
            pretext,
        })
    }
}

/// What a Slurm run needs beyond the plan.
pub struct SlurmRun<'a> {
    pub config: SlurmConfig,
    /// `--device` when given; otherwise `cuda:0` for stages that ask for a GPU (Slurm remaps
    /// `CUDA_VISIBLE_DEVICES`), `cpu` for the rest.
    pub device: Option<Device>,
    /// Set on Ctrl-C: every job of this run is cancelled.
    pub interrupted: &'a AtomicBool,
}
