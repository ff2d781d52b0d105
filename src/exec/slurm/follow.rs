//! Following a run: the stale stages are submitted in plan order, then one loop polls their jobs,
//! passes on what they print, records how each stage ended and cancels what should no longer
//! run (after a failure, on Ctrl-C).

use super::job_files::{self, JobFiles, OutputTail};
use super::queue::{self, QueueState};
use super::SlurmRun;
use crate::cache::journal::{Journal, JournalLine};
use crate::cache::Store;
use crate::exec::cached::Outcome;
use crate::exec::events::{Event, EventSink};
use crate::exec::keys::Keyed;
use crate::exec::scheduler::{self, upstream_trouble, Status, STOPPED};
use crate::exec::{announce, announce_plan, remember, RunOptions};
use crate::pipeline::Plan;
use anyhow::Result;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Why this run cancelled a job on Ctrl-C; a stage whose job then failed is reported as
/// interrupted, not as failing on its own.
const INTERRUPTED: &str = "cancelled: the run was interrupted";

/// How long the queue may not answer before the run gives up on its jobs: a controller restart
/// takes seconds, a minute of silence is an outage.
const QUERY_PATIENCE_MS: u32 = 60_000;

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
    let mut run = Following {
        plan,
        keys,
        store,
        opts,
        slurm,
        sink,
        recorded: journal.latest(),
        journal,
        status: Status::initial(selected),
        jobs: HashMap::new(),
        stop: None,
    };
    // Hits are settled before anything is submitted: a cached stage never becomes a job.
    for (i, saved_s) in announce_plan(plan, keys, selected, &opts.force, store, sink) {
        let outcome = Outcome::Cached { saved_s };
        announce(&plan.stages[i].name, &keys[i], &outcome, sink);
        run.status[i] = Status::Done(outcome);
    }
    run.submit_all();
    run.follow();
    scheduler::emit_run_end(&run.status, started, sink);
    run.status
}

/// A submitted job being followed.
struct Tracked {
    id: String,
    files: JobFiles,
    tail: OutputTail,
    /// The queue state last reported, so only changes become events.
    last: Option<QueueState>,
    /// The stage's end as the job itself reported it.
    said: Option<Outcome>,
    /// Why this run cancelled it, if it did.
    cancelled: Option<String>,
}

/// One Slurm run: the plan, where each stage stands, and the jobs being followed.
struct Following<'a> {
    plan: &'a Plan,
    keys: &'a [Keyed],
    store: &'a Store,
    opts: &'a RunOptions,
    slurm: &'a SlurmRun<'a>,
    sink: &'a dyn EventSink,
    journal: Journal,
    recorded: HashMap<String, JournalLine>,
    status: Vec<Status>,
    jobs: HashMap<usize, Tracked>,
    /// Set after a failure without `--keep-going`: nothing more is submitted, and waiting jobs
    /// are cancelled with this reason.
    stop: Option<String>,
}

impl Following<'_> {
    /// Submits every pending stage in plan order, so each one's upstream jobs already have ids
    /// for its `afterok`. A stage whose upstream stage failed or was skipped is skipped.
    fn submit_all(&mut self) {
        let run_dir = job_files::run_dir(self.store);
        let stages = &self.plan.stages;
        for i in 0..stages.len() {
            if self.status[i] != Status::Pending {
                continue;
            }
            let skip = upstream_trouble(&stages[i].deps, &self.status, |d| &stages[d].name)
                .or_else(|| self.stop.clone());
            if let Some(reason) = skip {
                self.settle(i, Status::Skipped(reason));
                continue;
            }
            match self.submit(i, &run_dir) {
                Ok(tracked) => {
                    self.sink.emit(Event::StageSubmitted {
                        stage: stages[i].name.clone(),
                        job: tracked.id.clone(),
                    });
                    self.jobs.insert(i, tracked);
                }
                Err(e) => {
                    let error = format!("{e:#}");
                    self.settle(i, Status::Done(Outcome::Failed { error }));
                }
            }
        }
    }

    /// Writes stage `i`'s job files and submits the job after its upstream stages' jobs.
    fn submit(&self, i: usize, run_dir: &Path) -> Result<Tracked> {
        let stage = &self.plan.stages[i];
        // Cached upstream stages have no job and need no waiting for.
        let after: Vec<String> = stage
            .deps
            .iter()
            .filter_map(|d| self.jobs.get(d).map(|t| t.id.clone()))
            .collect();
        let job = job_files::stage_job(
            self.plan,
            self.keys,
            self.store,
            i,
            self.opts.force[i],
            self.slurm.device,
        );
        let config = &self.slurm.config;
        let files = JobFiles::write(run_dir, i, &job, &config.pretext)?;
        let flags = queue::sbatch_flags(
            config,
            &stage.resources,
            &stage.name,
            &files.dir,
            &job.workdir,
            &after,
        );
        let id = queue::submit(&flags, &files.script())?;
        Ok(Tracked {
            tail: OutputTail::new(files.output(&id)),
            id,
            files,
            last: None,
            said: None,
            cancelled: None,
        })
    }

    /// Polls the submitted jobs every `poll` until each one's stage has ended.
    fn follow(&mut self) {
        let mut query_failures = 0u32;
        loop {
            let open: Vec<usize> = (0..self.plan.stages.len())
                .filter(|i| self.jobs.contains_key(i) && self.status[*i] == Status::Pending)
                .collect();
            if open.is_empty() {
                break;
            }
            if self.slurm.interrupted.load(Ordering::Relaxed) {
                self.cancel_on_interrupt(&open);
            }
            let ids: Vec<&str> = open.iter().map(|i| self.jobs[i].id.as_str()).collect();
            let states = match queue::query(&ids) {
                Ok(s) => {
                    query_failures = 0;
                    s
                }
                Err(e) => {
                    query_failures += 1;
                    let poll_ms = self.slurm.config.poll.as_millis().max(1) as u32;
                    if query_failures * poll_ms > QUERY_PATIENCE_MS {
                        self.lose_track(&open, &e);
                        break;
                    }
                    pause(self.slurm);
                    continue;
                }
            };
            for i in open {
                self.check(i, &states);
            }
            if let Some(reason) = self.stop.clone() {
                self.cancel_waiting(&reason);
            }
            pause(self.slurm);
        }
    }

    /// Looks at one open job: passes on its events and queue state changes, and settles its
    /// stage once the job has ended or can never start.
    fn check(&mut self, i: usize, states: &HashMap<String, QueueState>) {
        let stage = &self.plan.stages[i];
        let t = self.jobs.get_mut(&i).expect("tracked");
        read_job_events(t, &stage.name, self.sink);
        let st = states
            .get(&t.id)
            .cloned()
            .unwrap_or_else(|| queue::final_state(&t.id, &t.files.exit_code()));
        if t.last.as_ref() != Some(&st) {
            self.sink.emit(Event::StageQueue {
                stage: stage.name.clone(),
                job: t.id.clone(),
                state: st.state.clone(),
                reason: st.reason.clone(),
            });
            t.last = Some(st.clone());
        }
        let stages = &self.plan.stages;
        let trouble = upstream_trouble(&stage.deps, &self.status, |d| &stages[d].name);
        let end = if let Some(why) = st.never_starts() {
            queue::cancel(&[t.id.as_str()]);
            never_started(t, &st, why, trouble)
        } else if st.is_final() {
            // The job's last lines may have landed after the read above.
            read_job_events(t, &stage.name, self.sink);
            let entry = self.store.lookup(&stage.kind, &self.keys[i].key);
            let wall_s = entry.as_ref().map(|e| e.wall_s().unwrap_or(0.0));
            let outcome = outcome_of(t.said.as_ref(), wall_s, &st, &t.id);
            let end = ended(outcome, t.cancelled.as_deref(), trouble);
            if let (Status::Done(Outcome::Ran { wall_s }), None) = (&end, &t.said) {
                // The job's own output was lost; the entry speaks for it.
                let metrics = entry
                    .and_then(|e| e.manifest().ok())
                    .map_or(Value::Null, |m| m.metrics);
                self.sink.emit(Event::StageDone {
                    stage: stage.name.clone(),
                    key: self.keys[i].key.hex(),
                    wall_s: *wall_s,
                    metrics,
                });
            }
            end
        } else {
            return;
        };
        self.settle(i, end);
    }

    /// Records how stage `i` ended: its event, its journal line, and a stop after a failure
    /// unless the run keeps going.
    fn settle(&mut self, i: usize, end: Status) {
        let stage = &self.plan.stages[i];
        match &end {
            Status::Skipped(reason) => self.sink.emit(Event::StageSkipped {
                stage: stage.name.clone(),
                reason: reason.clone(),
            }),
            Status::Done(outcome) => {
                announce(&stage.name, &self.keys[i], outcome, self.sink);
                remember(
                    &self.journal,
                    &self.recorded,
                    &stage.name,
                    &self.keys[i],
                    outcome,
                    &self.opts.invocation,
                );
                if matches!(outcome, Outcome::Failed { .. }) && !self.opts.walk.keep_going {
                    self.stop = Some(STOPPED.into());
                }
            }
            Status::NotSelected | Status::Pending => {}
        }
        self.status[i] = end;
    }

    /// Ctrl-C: every open job not cancelled yet is cancelled now.
    fn cancel_on_interrupt(&mut self, open: &[usize]) {
        let ids: Vec<&str> = open
            .iter()
            .filter(|i| self.jobs[*i].cancelled.is_none())
            .map(|i| self.jobs[i].id.as_str())
            .collect();
        queue::cancel(&ids);
        for i in open {
            let t = self.jobs.get_mut(i).expect("tracked");
            t.cancelled.get_or_insert_with(|| INTERRUPTED.into());
        }
    }

    /// Like the local scheduler after a failure: what runs may finish, what waits does not start.
    fn cancel_waiting(&mut self, reason: &str) {
        let waiting: Vec<usize> = self
            .jobs
            .iter()
            .filter(|(i, t)| {
                self.status[**i] == Status::Pending
                    && t.cancelled.is_none()
                    && t.last.as_ref().is_none_or(|s| s.state == "PENDING")
            })
            .map(|(i, _)| *i)
            .collect();
        let ids: Vec<&str> = waiting.iter().map(|i| self.jobs[i].id.as_str()).collect();
        queue::cancel(&ids);
        for i in waiting {
            self.jobs.get_mut(&i).expect("tracked").cancelled = Some(reason.to_owned());
        }
    }

    /// The queue stopped answering: every open stage fails, saying its job may still publish.
    fn lose_track(&mut self, open: &[usize], e: &anyhow::Error) {
        for &i in open {
            let error = format!(
                "lost track of Slurm job {}: {e:#}; it may still run and publish",
                self.jobs[&i].id
            );
            self.settle(i, Status::Done(Outcome::Failed { error }));
        }
    }
}

/// The end of a stage whose job will never start. A job this run cancelled, or one whose
/// upstream stage failed, is skipped; anything else is a failure that says how to fix it.
fn never_started(t: &Tracked, st: &QueueState, why: &str, trouble: Option<String>) -> Status {
    match (t.cancelled.clone(), trouble) {
        (Some(reason), _) | (None, Some(reason)) => Status::Skipped(reason),
        (None, None) => Status::Done(Outcome::Failed {
            error: format!("Slurm job {} can never start ({}): {why}", t.id, st.reason),
        }),
    }
}

/// The status of a stage whose job has ended with `outcome`. A failure that this run caused
/// (cancelling after another failure) or an upstream failure explains is a skip, not a failure
/// of its own; a failure after Ctrl-C says the run was interrupted.
fn ended(outcome: Outcome, cancelled: Option<&str>, trouble: Option<String>) -> Status {
    match (outcome, cancelled, trouble) {
        (Outcome::Failed { .. }, Some(reason), _) if reason != INTERRUPTED => {
            Status::Skipped(reason.to_owned())
        }
        (Outcome::Failed { .. }, None, Some(reason)) => Status::Skipped(reason),
        (Outcome::Failed { error }, Some(_), _) => Status::Done(Outcome::Failed {
            error: format!("{INTERRUPTED}: {error}"),
        }),
        (outcome, _, _) => Status::Done(outcome),
    }
}

/// How a finished job's stage ended, from what the job said and what Slurm says.
fn outcome_of(
    said: Option<&Outcome>,
    entry_wall_s: Option<f64>,
    slurm: &QueueState,
    id: &str,
) -> Outcome {
    match (said, entry_wall_s) {
        (Some(o @ (Outcome::Ran { .. } | Outcome::Cached { .. })), Some(_)) => o.clone(),
        (_, Some(wall_s)) => Outcome::Ran { wall_s },
        // A job that Slurm ended (time limit, memory, pre-emption) was signalled, so the stage
        // says only "interrupted": Slurm's reason is the one that tells the user what to change.
        (Some(Outcome::Failed { error }), None) if !ended_by_slurm(&slurm.state) => {
            Outcome::Failed {
                error: error.clone(),
            }
        }
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

/// Whether Slurm itself ended the job (and so its state, not the stage's message, says why).
fn ended_by_slurm(state: &str) -> bool {
    matches!(
        state,
        "TIMEOUT" | "OUT_OF_MEMORY" | "PREEMPTED" | "NODE_FAIL" | "DEADLINE"
    )
}

/// Passes on what the job printed; remembers how the job said its stage ended.
fn read_job_events(t: &mut Tracked, stage: &str, sink: &dyn EventSink) {
    let said = &mut t.said;
    t.tail.read(stage, |event| match event {
        Event::StageDone { wall_s, .. } => {
            *said = Some(Outcome::Ran { wall_s });
            sink.emit(event);
        }
        // The submitting run announces hits and failures itself, once the job has ended.
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

#[cfg(test)]
mod tests {
    use super::*;

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
        // Slurm's SIGTERM at the time limit makes the stage say "interrupted"; the time limit
        // is what the user needs to hear.
        let signalled = Outcome::Failed {
            error: "interrupted: the command and every process it started were stopped".into(),
        };
        match outcome_of(Some(&signalled), None, &timeout, "9") {
            Outcome::Failed { error } => assert!(error.contains("ended TIMEOUT"), "{error}"),
            o => panic!("{o:?}"),
        }
    }
}
