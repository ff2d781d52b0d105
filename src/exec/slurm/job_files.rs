//! A job's files: what the submitting run writes before `sbatch` (the frozen stage and the batch
//! script) and what the job leaves behind (its output and exit code), all in one folder per stage
//! under the run's folder in `cache/jobs/`.

use crate::cache::Store;
use crate::exec::events::Event;
use crate::exec::keys::Keyed;
use crate::exec::resolve_inputs;
use crate::exec::stage_job::{StageJob, STAGE_JOB_SCHEMA};
use crate::pipeline::Plan;
use crate::stage::Device;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The folder of this run's jobs: named by time and pid, so runs never share one.
pub(super) fn run_dir(store: &Store) -> PathBuf {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    store
        .jobs_dir()
        .join(format!("{unix}-{}", std::process::id()))
}

/// Stage `i` frozen for its job. Paths are absolute: the job starts in another process, on
/// another node.
pub(super) fn stage_job(
    plan: &Plan,
    keys: &[Keyed],
    store: &Store,
    i: usize,
    force: bool,
    device: Option<Device>,
) -> StageJob {
    let stage = &plan.stages[i];
    // Slurm maps the job's GPU to cuda:0 (CUDA_VISIBLE_DEVICES).
    let device = device.unwrap_or(if stage.resources.gpu.unwrap_or(0) > 0 {
        Device::Cuda(0)
    } else {
        Device::Cpu
    });
    StageJob {
        schema: STAGE_JOB_SCHEMA,
        stage: stage.name.clone(),
        kind: stage.kind.clone(),
        params: stage.params.clone(),
        keyed: keys[i].clone(),
        inputs: resolve_inputs(plan, keys, store, i).0,
        cache: absolute(store.root()),
        workdir: absolute(&plan.root),
        device,
        force,
    }
}

/// The job's files: `job.json` (the frozen stage), `job.sh`, `slurm-<id>.out`, `exitcode`.
pub(super) struct JobFiles {
    pub dir: PathBuf,
}

impl JobFiles {
    /// Writes the job of stage `i` into its folder under `run_dir`.
    pub fn write(run_dir: &Path, i: usize, job: &StageJob, pretext: &Path) -> Result<JobFiles> {
        let dir = run_dir.join(format!("{i:04}-{}", file_safe(&job.stage)));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the job folder {}", dir.display()))?;
        let files = JobFiles { dir };
        std::fs::write(files.job_file(), serde_json::to_vec_pretty(job)?)
            .with_context(|| format!("writing {}", files.job_file().display()))?;
        std::fs::write(
            files.script(),
            batch_script(pretext, &files.job_file(), &files.exit_code()),
        )
        .with_context(|| format!("writing {}", files.script().display()))?;
        Ok(files)
    }
    pub fn job_file(&self) -> PathBuf {
        self.dir.join("job.json")
    }
    pub fn script(&self) -> PathBuf {
        self.dir.join("job.sh")
    }
    pub fn exit_code(&self) -> PathBuf {
        self.dir.join("exitcode")
    }
    pub fn output(&self, id: &str) -> PathBuf {
        self.dir.join(format!("slurm-{id}.out"))
    }
}

/// The batch script: runs the one stage and leaves its exit code in a file, so the result does
/// not depend on how long the controller remembers the job or on accounting being set up.
fn batch_script(pretext: &Path, job_file: &Path, exit_code_file: &Path) -> String {
    format!(
        "#!/bin/bash\n\
         # Written by pretext: runs one stage of a pipeline; see the stage job file below.\n\
         EXIT_CODE_FILE={exit}\n\
         trap 'echo $? > \"$EXIT_CODE_FILE\"' EXIT\n\
         # One pool of SLURM_CPUS_PER_TASK threads (candle and rayon read RAYON_NUM_THREADS).\n\
         export RAYON_NUM_THREADS=\"${{SLURM_CPUS_PER_TASK:-1}}\"\n\
         export OMP_NUM_THREADS=\"${{SLURM_CPUS_PER_TASK:-1}}\"\n\
         {pretext} exec-job {job}\n",
        exit = shell_quote(&exit_code_file.display().to_string()),
        pretext = shell_quote(&pretext.display().to_string()),
        job = shell_quote(&job_file.display().to_string()),
    )
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Reads what a job appended to its output file since the last call: the job's events (JSON
/// lines) are passed on, any other line (Slurm's own messages, a panic) becomes a log line.
pub(super) struct OutputTail {
    path: PathBuf,
    offset: u64,
    /// The start of a line the job has not finished writing yet.
    partial: String,
}

impl OutputTail {
    pub fn new(path: PathBuf) -> OutputTail {
        OutputTail {
            path,
            offset: 0,
            partial: String::new(),
        }
    }

    /// Missing or unreadable output is read as nothing new: the job may not have started, and
    /// the next poll tries again.
    pub fn read(&mut self, stage: &str, mut on: impl FnMut(Event)) {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return;
        }
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        while let Some(nl) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=nl).collect();
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            match serde_json::from_str::<Event>(line) {
                Ok(event) => on(event),
                Err(_) => on(Event::StageLog {
                    stage: stage.to_owned(),
                    line: line.to_owned(),
                }),
            }
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A stage name as part of a folder name (`finetune@vit-seed1` -> `finetune_vit-seed1`).
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_quotes_paths_and_records_the_exit_code() {
        let s = batch_script(
            Path::new("/opt/my pretext"),
            Path::new("/c/it's/job.json"),
            Path::new("/c/x/exitcode"),
        );
        assert!(s.starts_with("#!/bin/bash\n"));
        assert!(
            s.contains("EXIT_CODE_FILE='/c/x/exitcode'\ntrap 'echo $? > \"$EXIT_CODE_FILE\"' EXIT"),
            "{s}"
        );
        assert!(
            s.contains("'/opt/my pretext' exec-job '/c/it'\\''s/job.json'"),
            "{s}"
        );
    }
}
