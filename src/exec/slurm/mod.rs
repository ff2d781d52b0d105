//! The Slurm executor: every stale stage becomes one `sbatch` job that runs `pretext exec-job` on
//! that stage (a [`StageJob`] file) against the cache on the cluster's shared filesystem.
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

use super::cached::Outcome;
use super::events::{Event, EventSink};
use super::keys::Keyed;
use super::scheduler::Status;
use super::stage_job::{StageJob, STAGE_JOB_SCHEMA};
use super::{resolve_inputs, RunOptions};
use crate::cache::journal::Journal;
use crate::cache::Store;
use crate::pipeline::spec::{ExecutorSpec, Resources};
use crate::pipeline::Plan;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// The `sbatch` flags of one stage's job. `after` are the job ids of its stale upstream stages.
pub fn sbatch_flags(
    config: &SlurmConfig,
    res: &Resources,
    stage: &str,
    job_dir: &Path,
    workdir: &Path,
    after: &[String],
) -> Vec<String> {
    let mut flags = vec![
        "--parsable".to_owned(),
        format!("--job-name=pretext:{stage}"),
        format!("--output={}", job_dir.join("slurm-%j.out").display()),
        format!("--chdir={}", workdir.display()),
        "--kill-on-invalid-dep=yes".to_owned(),
        format!("--cpus-per-task={}", res.cpu.unwrap_or(1).max(1)),
    ];
    if let Some(gpus) = res.gpu.filter(|&g| g > 0) {
        flags.push(format!("--gres=gpu:{gpus}"));
    }
    if let Some(mem) = &res.mem {
        flags.push(format!("--mem={mem}"));
    }
    if let Some(time) = &res.time {
        flags.push(format!("--time={time}"));
    }
    if let Some(p) = res.partition.as_ref().or(config.partition.as_ref()) {
        flags.push(format!("--partition={p}"));
    }
    if let Some(a) = res.account.as_ref().or(config.account.as_ref()) {
        flags.push(format!("--account={a}"));
    }
    if let Some(q) = &config.qos {
        flags.push(format!("--qos={q}"));
    }
    if !after.is_empty() {
        flags.push(format!("--dependency=afterok:{}", after.join(":")));
    }
    flags.extend(config.sbatch_args.iter().cloned());
    flags.extend(res.sbatch_args.iter().cloned());
    flags
}

/// The batch script: runs the one stage and leaves its exit code in a file, so the result does
/// not depend on how long the controller remembers the job or on accounting being set up.
pub fn batch_script(pretext: &Path, job_file: &Path, exit_code_file: &Path) -> String {
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

/// A job's place in the queue as `squeue -o '%i|%T|%r'` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueState {
    pub state: String,
    pub reason: String,
}

impl QueueState {
    pub fn is_final(&self) -> bool {
        !matches!(
            self.state.as_str(),
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "SUSPENDED"
                | "REQUEUED"
                | "RESIZING"
                | "SIGNALING"
                | "STAGE_OUT"
                | "STOPPED"
        )
    }

    /// A pending job that will never start: what is wrong and how to fix it.
    pub fn never_starts(&self) -> Option<&'static str> {
        if self.state != "PENDING" {
            return None;
        }
        Some(match self.reason.as_str() {
            "DependencyNeverSatisfied" => "an upstream job failed",
            "PartitionConfig" | "PartitionNodeLimit" | "BadConstraints" => {
                "it asks for more than any node of the partition has: lower the stage's \
                 resources (cpu, gpu, mem) or choose another partition"
            }
            "PartitionTimeLimit" => {
                "its resources.time is above the partition's limit: lower it or choose another \
                 partition"
            }
            "InvalidAccount" | "InvalidQOS" | "AccountNotAllowed" | "QOSNotAllowed" => {
                "the account or QOS is not valid for this partition: check executor.account/qos"
            }
            _ => return None,
        })
    }
}

/// Parses `squeue -h -t all -o '%i|%T|%r'` output.
pub fn parse_squeue(text: &str) -> HashMap<String, QueueState> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.trim().splitn(3, '|');
            let id = parts.next()?.trim();
            let state = parts.next()?.trim();
            let reason = parts.next().unwrap_or("").trim();
            (!id.is_empty() && !state.is_empty()).then(|| {
                (
                    id.to_owned(),
                    QueueState {
                        state: state.to_owned(),
                        reason: reason.to_owned(),
                    },
                )
            })
        })
        .collect()
}

/// `JobState=` and `Reason=` of a `scontrol -o show job` line.
pub fn parse_scontrol(line: &str) -> Option<QueueState> {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(str::to_owned)
    };
    Some(QueueState {
        state: field("JobState=")?,
        reason: field("Reason=").unwrap_or_default(),
    })
}

/// Submits one job; returns its id.
pub fn submit(flags: &[String], script: &Path) -> Result<String> {
    let out = Command::new("sbatch")
        .args(flags)
        .arg(script)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::anyhow!(
                "`sbatch` is not on PATH: the Slurm executor runs where Slurm's client commands \
                 are (a login node), or use --executor local"
            ),
            _ => anyhow::anyhow!("running sbatch: {e}"),
        })?;
    if !out.status.success() {
        bail!(
            "sbatch refused the job: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // `--parsable` prints `id` or `id;cluster`.
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().split(';').next().unwrap_or("").to_owned();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        bail!("sbatch printed no job id: `{}`", text.trim());
    }
    Ok(id)
}

/// States of `ids` still known to the controller. A job missing from the answer has left the
/// queue (or never existed); the caller falls back to [`final_state`].
pub fn query(ids: &[&str]) -> Result<HashMap<String, QueueState>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let out = Command::new("squeue")
        .args(["-h", "-t", "all", "-o", "%i|%T|%r", "-j", &ids.join(",")])
        .output()
        .context("running squeue")?;
    if out.status.success() {
        return Ok(parse_squeue(&String::from_utf8_lossy(&out.stdout)));
    }
    // squeue refuses the whole list when one id has been purged: ask one by one.
    let mut states = HashMap::new();
    for id in ids {
        let out = Command::new("scontrol")
            .args(["-o", "show", "job", id])
            .output()
            .context("running scontrol")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("Unable to contact") {
            bail!("the Slurm controller does not answer: {}", err.trim());
        }
        if let Some(st) = text.lines().next().and_then(parse_scontrol) {
            states.insert((*id).to_owned(), st);
        }
    }
    Ok(states)
}

/// The end of a job the controller has forgotten: the completion log (`sacct -c`, works without
/// slurmdbd), then plain accounting, then the exit code file the batch script wrote.
pub fn final_state(id: &str, exit_code_file: &Path) -> QueueState {
    for args in [
        vec!["-c", "-j", id, "-n", "-P", "-X", "-o", "State"],
        vec!["-j", id, "-n", "-P", "-X", "-o", "State"],
    ] {
        if let Ok(out) = Command::new("sacct").args(&args).output() {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(state) = text.lines().map(str::trim).find(|l| !l.is_empty()) {
                if out.status.success() {
                    return QueueState {
                        // `CANCELLED by 0` -> `CANCELLED`
                        state: state.split_whitespace().next().unwrap_or(state).to_owned(),
                        reason: String::new(),
                    };
                }
            }
        }
    }
    match std::fs::read_to_string(exit_code_file) {
        Ok(code) if code.trim() == "0" => QueueState {
            state: "COMPLETED".into(),
            reason: String::new(),
        },
        Ok(code) => QueueState {
            state: "FAILED".into(),
            reason: format!("exit code {}", code.trim()),
        },
        Err(_) => QueueState {
            state: "VANISHED".into(),
            reason: "the controller forgot the job and it left no exit code file".into(),
        },
    }
}

pub fn cancel(ids: &[&str]) {
    if !ids.is_empty() {
        // Best effort: a job that already ended is not an error worth stopping for.
        let _ = Command::new("scancel").args(ids).output();
    }
}

/// Reads what a job appended to its output file since the last call: the job's events (JSON
/// lines) are passed on, any other line (Slurm's own messages, a panic) becomes a log line.
pub struct OutputTail {
    path: PathBuf,
    offset: u64,
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

/// The job's files: `job.json` (the frozen stage), `job.sh`, `slurm-<id>.out`, `exitcode`.
pub struct JobFiles {
    pub dir: PathBuf,
}

impl JobFiles {
    pub fn write(dir: PathBuf, job: &StageJob, config: &SlurmConfig) -> Result<JobFiles> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the job folder {}", dir.display()))?;
        let files = JobFiles { dir };
        std::fs::write(files.job_file(), serde_json::to_vec_pretty(job)?)
            .with_context(|| format!("writing {}", files.job_file().display()))?;
        std::fs::write(
            files.script(),
            batch_script(&config.pretext, &files.job_file(), &files.exit_code()),
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

/// How a finished job's stage ended, from what the job said and what Slurm says.
pub fn outcome_of(
    said: Option<&Outcome>,
    entry_wall_s: Option<f64>,
    slurm: &QueueState,
    id: &str,
) -> Outcome {
    match (said, entry_wall_s) {
        (Some(o @ (Outcome::Ran { .. } | Outcome::Cached { .. })), Some(_)) => o.clone(),
        (_, Some(wall_s)) => Outcome::Ran { wall_s },
        (Some(Outcome::Failed { error }), None) => Outcome::Failed {
            error: error.clone(),
        },
        _ => {
            let why = match slurm.state.as_str() {
                "TIMEOUT" => {
                    " (the stage's resources.time was too short; its checkpoint is kept and the \
                     next run resumes it)"
                }
                "OUT_OF_MEMORY" => " (raise the stage's resources.mem)",
                "CANCELLED" => " (scancel, or the job's dependency failed)",
                "COMPLETED" => " but published no cache entry",
                _ => "",
            };
            let reason = if slurm.reason.is_empty() || slurm.reason == "None" {
                String::new()
            } else {
                format!(", reason {}", slurm.reason)
            };
            Outcome::Failed {
                error: format!("Slurm job {id} ended {}{reason}{why}", slurm.state),
            }
        }
    }
}

/// What a Slurm run needs beyond the plan.
pub struct SlurmRun<'a> {
    pub config: SlurmConfig,
    /// `--device` when given; otherwise `cuda:0` for stages that ask for a GPU (Slurm remaps
    /// `CUDA_VISIBLE_DEVICES`), `cpu` for the rest.
    pub device: Option<String>,
    /// Set on Ctrl-C: every job of this run is cancelled.
    pub interrupted: &'a AtomicBool,
}

/// A submitted job being followed.
struct Tracked {
    id: String,
    files: JobFiles,
    tail: OutputTail,
    last: Option<QueueState>,
    /// The stage's end as the job itself reported it.
    said: Option<Outcome>,
    /// Why this run cancelled it, if it did.
    cancelled: Option<String>,
}

/// Submits the stale selected stages of a plan and follows their jobs to the end. Returns the
/// same statuses and emits the same events as the local scheduler, plus the queue events.
pub fn run_plan(
    plan: &Plan,
    keys: &[Keyed],
    selected: &[bool],
    store: &Store,
    opts: &RunOptions,
    slurm: &SlurmRun,
    sink: &dyn EventSink,
) -> Vec<Status> {
    let started = Instant::now();
    let journal = Journal::for_pipeline(&store.journal_dir(), &plan.file);
    let recorded = journal.latest();
    let n = plan.stages.len();
    let mut status = Status::initial(selected);
    let mut hits = Vec::new();
    for i in 0..n {
        if selected[i] && !opts.force[i] {
            if let Some(entry) = store.lookup(&plan.stages[i].kind, &keys[i].key) {
                hits.push((i, entry.wall_s().unwrap_or(0.0)));
            }
        }
    }
    let total = selected.iter().filter(|&&s| s).count();
    sink.emit(Event::Plan {
        stages: total,
        cached: hits.len(),
        to_run: total - hits.len(),
    });
    for (i, saved_s) in hits {
        let outcome = Outcome::Cached { saved_s };
        super::announce(&plan.stages[i].name, &keys[i], &outcome, sink);
        status[i] = Status::Done(outcome);
    }

    let run_dir = store.jobs_dir().join(format!(
        "{}-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        std::process::id()
    ));
    let mut jobs: HashMap<usize, Tracked> = HashMap::new();
    let mut stop: Option<String> = None;
    for i in 0..n {
        if status[i] != Status::Pending {
            continue;
        }
        let stage = &plan.stages[i];
        let skip = upstream_trouble(plan, &status, i).or_else(|| stop.clone());
        if let Some(reason) = skip {
            sink.emit(Event::StageSkipped {
                stage: stage.name.clone(),
                reason: reason.clone(),
            });
            status[i] = Status::Skipped(reason);
            continue;
        }
        let after: Vec<String> = stage
            .deps
            .iter()
            .filter_map(|d| jobs.get(d).map(|t| t.id.clone()))
            .collect();
        let device = slurm.device.clone().unwrap_or_else(|| {
            if stage.resources.gpu.unwrap_or(0) > 0 {
                "cuda:0".into()
            } else {
                "cpu".into()
            }
        });
        let job = StageJob {
            schema: STAGE_JOB_SCHEMA,
            stage: stage.name.clone(),
            kind: stage.kind.clone(),
            params: stage.params.clone(),
            keyed: keys[i].clone(),
            inputs: resolve_inputs(plan, keys, store, i).0,
            cache: absolute(store.root()),
            workdir: absolute(&plan.root),
            device,
            force: opts.force[i],
        };
        let dir = run_dir.join(format!("{i:04}-{}", file_safe(&stage.name)));
        let submitted = JobFiles::write(dir, &job, &slurm.config).and_then(|files| {
            let flags = sbatch_flags(
                &slurm.config,
                &stage.resources,
                &stage.name,
                &files.dir,
                &job.workdir,
                &after,
            );
            submit(&flags, &files.script()).map(|id| (files, id))
        });
        match submitted {
            Ok((files, id)) => {
                sink.emit(Event::StageSubmitted {
                    stage: stage.name.clone(),
                    job: id.clone(),
                });
                let tail = OutputTail::new(files.output(&id));
                jobs.insert(
                    i,
                    Tracked {
                        id,
                        files,
                        tail,
                        last: None,
                        said: None,
                        cancelled: None,
                    },
                );
            }
            Err(e) => {
                let outcome = Outcome::Failed {
                    error: format!("{e:#}"),
                };
                super::announce(&stage.name, &keys[i], &outcome, sink);
                status[i] = Status::Done(outcome);
                if !opts.walk.keep_going {
                    stop = Some(STOPPED.into());
                }
            }
        }
    }

    let mut query_failures = 0u32;
    loop {
        let open: Vec<usize> = (0..n)
            .filter(|i| jobs.contains_key(i) && status[*i] == Status::Pending)
            .collect();
        if open.is_empty() {
            break;
        }
        if slurm.interrupted.load(Ordering::Relaxed) {
            let ids: Vec<&str> = open
                .iter()
                .filter(|i| jobs[*i].cancelled.is_none())
                .map(|i| jobs[i].id.as_str())
                .collect();
            cancel(&ids);
            for i in &open {
                let t = jobs.get_mut(i).expect("tracked");
                t.cancelled.get_or_insert_with(|| INTERRUPTED.into());
            }
        }
        let ids: Vec<&str> = open.iter().map(|i| jobs[i].id.as_str()).collect();
        let states = match query(&ids) {
            Ok(s) => {
                query_failures = 0;
                s
            }
            Err(e) => {
                query_failures += 1;
                // A controller restart takes seconds; a minute of silence is an outage.
                if query_failures * slurm.config.poll.as_millis().max(1) as u32 > 60_000 {
                    for i in open {
                        let outcome = Outcome::Failed {
                            error: format!(
                                "lost track of Slurm job {}: {e:#}; it may still run and publish",
                                jobs[&i].id
                            ),
                        };
                        super::announce(&plan.stages[i].name, &keys[i], &outcome, sink);
                        status[i] = Status::Done(outcome);
                    }
                    break;
                }
                pause(slurm);
                continue;
            }
        };
        for i in open {
            let stage = &plan.stages[i];
            let t = jobs.get_mut(&i).expect("tracked");
            read_job_events(t, &stage.name, sink);
            let st = states
                .get(&t.id)
                .cloned()
                .unwrap_or_else(|| final_state(&t.id, &t.files.exit_code()));
            if t.last.as_ref() != Some(&st) {
                sink.emit(Event::StageQueue {
                    stage: stage.name.clone(),
                    job: t.id.clone(),
                    state: st.state.clone(),
                    reason: st.reason.clone(),
                });
                t.last = Some(st.clone());
            }
            let end = if let Some(why) = st.never_starts() {
                cancel(&[t.id.as_str()]);
                Some(
                    match (t.cancelled.clone(), upstream_trouble(plan, &status, i)) {
                        (Some(reason), _) | (None, Some(reason)) => Status::Skipped(reason),
                        (None, None) => Status::Done(Outcome::Failed {
                            error: format!(
                                "Slurm job {} can never start ({}): {why}",
                                t.id, st.reason
                            ),
                        }),
                    },
                )
            } else if st.is_final() {
                read_job_events(t, &stage.name, sink);
                let entry = store.lookup(&stage.kind, &keys[i].key);
                let outcome = outcome_of(
                    t.said.as_ref(),
                    entry.as_ref().map(|e| e.wall_s().unwrap_or(0.0)),
                    &st,
                    &t.id,
                );
                Some(
                    match (&outcome, &t.cancelled, upstream_trouble(plan, &status, i)) {
                        (Outcome::Failed { .. }, Some(reason), _) if reason != INTERRUPTED => {
                            Status::Skipped(reason.clone())
                        }
                        (Outcome::Failed { .. }, None, Some(reason)) => Status::Skipped(reason),
                        (Outcome::Failed { error }, Some(_), _) => Status::Done(Outcome::Failed {
                            error: format!("{INTERRUPTED}: {error}"),
                        }),
                        _ => {
                            if let (Outcome::Ran { wall_s }, None) = (&outcome, &t.said) {
                                // The job's own output was lost; the entry speaks for it.
                                let metrics = entry
                                    .and_then(|e| e.manifest().ok())
                                    .map_or(Value::Null, |m| m.metrics);
                                sink.emit(Event::StageDone {
                                    stage: stage.name.clone(),
                                    key: keys[i].key.hex(),
                                    wall_s: *wall_s,
                                    metrics,
                                });
                            }
                            Status::Done(outcome)
                        }
                    },
                )
            } else {
                None
            };
            let Some(end) = end else { continue };
            match &end {
                Status::Skipped(reason) => sink.emit(Event::StageSkipped {
                    stage: stage.name.clone(),
                    reason: reason.clone(),
                }),
                Status::Done(outcome) => {
                    super::announce(&stage.name, &keys[i], outcome, sink);
                    super::remember(
                        &journal,
                        &recorded,
                        &stage.name,
                        &keys[i],
                        outcome,
                        &opts.invocation,
                    );
                    if matches!(outcome, Outcome::Failed { .. }) && !opts.walk.keep_going {
                        stop = Some(STOPPED.into());
                    }
                }
                _ => {}
            }
            status[i] = end;
        }
        if let Some(reason) = &stop {
            // Like the local scheduler: what runs may finish, what waits does not start.
            let waiting: Vec<usize> = jobs
                .iter()
                .filter(|(i, t)| {
                    status[**i] == Status::Pending
                        && t.cancelled.is_none()
                        && t.last.as_ref().is_none_or(|s| s.state == "PENDING")
                })
                .map(|(i, _)| *i)
                .collect();
            let ids: Vec<&str> = waiting.iter().map(|i| jobs[i].id.as_str()).collect();
            cancel(&ids);
            for i in waiting {
                jobs.get_mut(&i).expect("tracked").cancelled = Some(reason.clone());
            }
        }
        pause(slurm);
    }

    super::scheduler::emit_run_end(&status, started, sink);
    status
}

const STOPPED: &str = "the run stopped after a failure (use --keep-going to continue)";
const INTERRUPTED: &str = "cancelled: the run was interrupted";

/// Why stage `i` cannot run because of an upstream stage, if it cannot.
fn upstream_trouble(plan: &Plan, status: &[Status], i: usize) -> Option<String> {
    plan.stages[i].deps.iter().find_map(|&d| match &status[d] {
        Status::Done(Outcome::Failed { .. }) => {
            Some(format!("upstream `{}` failed", plan.stages[d].name))
        }
        Status::Skipped(_) => Some(format!("upstream `{}` was skipped", plan.stages[d].name)),
        _ => None,
    })
}

/// Passes on what the job printed; remembers how the job said its stage ended.
fn read_job_events(t: &mut Tracked, stage: &str, sink: &dyn EventSink) {
    let said = &mut t.said;
    t.tail.read(stage, |event| match event {
        Event::StageDone { wall_s, .. } => {
            *said = Some(Outcome::Ran { wall_s });
            sink.emit(event);
        }
        Event::StageCached { saved_s, .. } => *said = Some(Outcome::Cached { saved_s }),
        Event::StageFailed { error, .. } => *said = Some(Outcome::Failed { error }),
        Event::Plan { .. } | Event::RunEnd { .. } => {}
        other => sink.emit(other),
    });
}

/// Sleeps one poll interval, waking early on Ctrl-C.
fn pause(slurm: &SlurmRun) {
    let step = Duration::from_millis(50);
    let mut left = slurm.config.poll;
    while !left.is_zero() && !slurm.interrupted.load(Ordering::Relaxed) {
        let d = left.min(step);
        std::thread::sleep(d);
        left -= d;
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

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

    fn config() -> SlurmConfig {
        SlurmConfig {
            partition: Some("gpu".into()),
            account: Some("lab".into()),
            qos: None,
            sbatch_args: vec!["--constraint=a100".into()],
            poll: Duration::from_secs(1),
            pretext: PathBuf::from("/opt/pretext"),
        }
    }

    #[test]
    fn resources_map_onto_sbatch_flags_and_the_stage_wins() {
        let res = Resources {
            cpu: Some(8),
            gpu: Some(2),
            mem: Some("32G".into()),
            time: Some("90".into()),
            partition: Some("a100".into()),
            account: None,
            sbatch_args: vec!["--exclusive".into()],
        };
        let flags = sbatch_flags(
            &config(),
            &res,
            "finetune@vit-seed1",
            Path::new("/c/jobs/x"),
            Path::new("/proj"),
            &["11".into(), "12".into()],
        );
        for want in [
            "--parsable",
            "--job-name=pretext:finetune@vit-seed1",
            "--output=/c/jobs/x/slurm-%j.out",
            "--chdir=/proj",
            "--kill-on-invalid-dep=yes",
            "--cpus-per-task=8",
            "--gres=gpu:2",
            "--mem=32G",
            "--time=90",
            "--partition=a100",
            "--account=lab",
            "--dependency=afterok:11:12",
            "--constraint=a100",
            "--exclusive",
        ] {
            assert!(flags.iter().any(|f| f == want), "{want} missing: {flags:?}");
        }
        let plain = sbatch_flags(
            &config(),
            &Resources::default(),
            "s",
            Path::new("/j"),
            Path::new("/p"),
            &[],
        );
        assert!(plain.contains(&"--cpus-per-task=1".to_owned()));
        assert!(plain.contains(&"--partition=gpu".to_owned()));
        assert!(!plain.iter().any(|f| f.starts_with("--dependency")
            || f.starts_with("--gres")
            || f.starts_with("--mem")));
    }

    #[test]
    fn queue_states_parse_and_classify() {
        let q = parse_squeue(
            "101|PENDING|DependencyNeverSatisfied\n102|RUNNING|None\n103|COMPLETED|None\n\n",
        );
        assert_eq!(q.len(), 3);
        assert!(q["101"].never_starts().is_some());
        assert!(!q["101"].is_final());
        assert!(q["102"].never_starts().is_none() && !q["102"].is_final());
        assert!(q["103"].is_final());
        let pending_for_resources = QueueState {
            state: "PENDING".into(),
            reason: "Resources".into(),
        };
        assert!(pending_for_resources.never_starts().is_none());
        let st = parse_scontrol(
            "JobId=7 JobName=x UserId=root(0) JobState=TIMEOUT Reason=TimeLimit Dependency=(null) ExitCode=0:15",
        )
        .unwrap();
        assert_eq!(st.state, "TIMEOUT");
        assert_eq!(st.reason, "TimeLimit");
    }

    #[test]
    fn the_cache_entry_decides_what_a_job_did() {
        let timeout = QueueState {
            state: "TIMEOUT".into(),
            reason: "TimeLimit".into(),
        };
        match outcome_of(None, None, &timeout, "9") {
            Outcome::Failed { error } => {
                assert!(error.contains("job 9 ended TIMEOUT"), "{error}");
                assert!(error.contains("resumes"), "{error}");
            }
            o => panic!("{o:?}"),
        }
        // Slurm lost track but the entry is there: the work is done.
        let vanished = QueueState {
            state: "VANISHED".into(),
            reason: String::new(),
        };
        assert_eq!(
            outcome_of(None, Some(3.0), &vanished, "9"),
            Outcome::Ran { wall_s: 3.0 }
        );
        let said = Outcome::Failed {
            error: "loss is NaN".into(),
        };
        let failed = QueueState {
            state: "FAILED".into(),
            reason: "NonZeroExitCode".into(),
        };
        assert_eq!(outcome_of(Some(&said), None, &failed, "9"), said);
    }

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
