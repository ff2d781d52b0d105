//! Running a plan: stage keys, the cache layer, the scheduler, and the per-pipeline journal.

pub mod cached;
pub mod events;
pub mod keys;
pub mod scheduler;
pub mod slurm;
pub mod stage_job;

use crate::cache::journal::{now_unix, Invocation, Journal, JournalLine, RENEW_AFTER_S};
use crate::cache::store::EntryState;
use crate::cache::{KeyedInput, Store};
use crate::pipeline::{InputRef, Plan, PlannedInput};
use crate::stage::{InputItem, InputValue, Inputs};
use cached::{Job, Local, Outcome};
use events::{Event, EventSink};
use keys::Keyed;
use scheduler::{Node, Status, WalkOptions};
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;

pub struct RunOptions {
    pub walk: WalkOptions,
    /// Per stage: rerun even if cached.
    pub force: Vec<bool>,
    /// What the journal records beside each key.
    pub invocation: Invocation,
}

/// The paths a stage's task reads: upstream entries (and outputs inside them) and data folders.
pub fn resolve_inputs(plan: &Plan, keys: &[Keyed], store: &Store, index: usize) -> Inputs {
    let stage = &plan.stages[index];
    let keyed = &keys[index].input.inputs;
    // The k-th ref of a slot was keyed as the k-th entry of that slot in the key input.
    let item = |slot: &str, k: usize, r: &InputRef| match r {
        InputRef::Stage { stage: up, output } => {
            let dir = store.entry_dir(&plan.stages[*up].kind, &keys[*up].key);
            InputItem {
                path: output.as_ref().map_or(dir.clone(), |o| dir.join(&o.path)),
                options: Default::default(),
                digest: None,
                stage: Some(plan.stages[*up].name.clone()),
            }
        }
        InputRef::Data { path, options } => InputItem {
            path: path.clone(),
            options: options.clone(),
            digest: match keyed.get(slot).and_then(|v| v.get(k)) {
                Some(KeyedInput::Data { fingerprint, .. }) => Some(fingerprint.hex()),
                _ => None,
            },
            stage: None,
        },
    };
    Inputs(
        stage
            .inputs
            .iter()
            .map(|(slot, input)| {
                let value = match input {
                    PlannedInput::One(r) => InputValue::One(item(slot, 0, r)),
                    PlannedInput::Many(rs) => InputValue::Many(
                        rs.iter()
                            .enumerate()
                            .map(|(k, r)| item(slot, k, r))
                            .collect(),
                    ),
                };
                (slot.clone(), value)
            })
            .collect(),
    )
}

/// Runs the selected stages of a plan whose keys are all known.
pub fn run_plan(
    plan: &Plan,
    keys: &[Keyed],
    selected: &[bool],
    store: &Store,
    local: &Local,
    opts: &RunOptions,
    sink: &dyn EventSink,
) -> Vec<Status> {
    let journal = Journal::for_pipeline(&store.journal_dir(), &plan.file);
    let recorded = journal.latest();
    // The hits are not settled here: the walk meets each again in `cached::execute` and reports
    // it when it gets there (a hit below a failed stage is skipped, as before).
    announce_plan(plan, keys, selected, &opts.force, store, sink);

    let runner = |i: usize, gpus: &[u32]| {
        let stage = &plan.stages[i];
        let job = Job {
            name: &stage.name,
            kind: &stage.kind,
            params: &stage.params,
            keyed: &keys[i],
            inputs: resolve_inputs(plan, keys, store, i),
            force: opts.force[i],
            gpus,
        };
        let outcome = cached::execute(store, local, &job, sink);
        announce(&stage.name, &keys[i], &outcome, sink);
        remember(
            &journal,
            &recorded,
            &stage.name,
            &keys[i],
            &outcome,
            &opts.invocation,
        );
        outcome
    };
    let nodes: Vec<Node> = plan
        .stages
        .iter()
        .map(|s| Node {
            name: &s.name,
            deps: &s.deps,
            gpus: s.resources.gpu.unwrap_or(0),
            // Training kinds use every core unless the stage says otherwise.
            cpus: s.resources.cpu.unwrap_or(
                if local.catalog.get(&s.kind).is_some_and(|e| e.trains) {
                    u32::MAX
                } else {
                    1
                },
            ),
        })
        .collect();
    scheduler::walk(&nodes, selected, &opts.walk, &runner, sink)
}

/// The pre-pass of both executors: which selected stages already have an entry (forced ones
/// never count), announced as the run's `plan` event so the view knows how much work is ahead.
/// Returns each hit with the seconds its entry saved.
fn announce_plan(
    plan: &Plan,
    keys: &[Keyed],
    selected: &[bool],
    force: &[bool],
    store: &Store,
    sink: &dyn EventSink,
) -> Vec<(usize, f64)> {
    let hits: Vec<(usize, f64)> = (0..plan.stages.len())
        .filter(|&i| selected[i] && !force[i])
        .filter_map(|i| {
            let entry = store.lookup(&plan.stages[i].kind, &keys[i].key)?;
            Some((i, entry.wall_s().unwrap_or(0.0)))
        })
        .collect();
    let total = selected.iter().filter(|&&s| s).count();
    sink.emit(Event::Plan {
        stages: total,
        cached: hits.len(),
        to_run: total - hits.len(),
    });
    hits
}

/// The events `cached::execute` leaves to its caller: a hit, or a failure.
pub fn announce(stage: &str, keyed: &Keyed, outcome: &Outcome, sink: &dyn EventSink) {
    match outcome {
        Outcome::Cached { saved_s } => sink.emit(Event::StageCached {
            stage: stage.to_owned(),
            key: keyed.key.hex(),
            saved_s: *saved_s,
        }),
        Outcome::Failed { error } => sink.emit(Event::StageFailed {
            stage: stage.to_owned(),
            key: keyed.key.hex(),
            error: error.clone(),
        }),
        Outcome::Ran { .. } => {}
    }
}

/// Appends a journal line when a stage got a new key under its name, or its line is a day old.
fn remember(
    journal: &Journal,
    recorded: &HashMap<String, JournalLine>,
    stage: &str,
    keyed: &Keyed,
    outcome: &Outcome,
    invocation: &Invocation,
) {
    let now = now_unix();
    let current = recorded
        .get(stage)
        .is_some_and(|l| l.key == keyed.key && now.saturating_sub(l.at_unix) < RENEW_AFTER_S);
    if !matches!(outcome, Outcome::Failed { .. }) && !current {
        // Best effort: the journal explains staleness and keeps entries from gc for a while;
        // losing a line loses no work.
        let _ = journal.append(&JournalLine {
            stage: stage.to_owned(),
            key: keyed.key,
            key_input: keyed.input.clone(),
            at_unix: now,
            invocation: invocation.clone(),
            pipeline: String::new(),
        });
    }
}

/// One stage as `pretext status` reports it. Stable JSON (`pretext status --json`):
///
/// ```json
/// {"stage":"finetune@vit-seed1","kind":"finetune","state":"stale","key":"<hex>",
///  "reasons":["params.epochs: 30 -> 40"]}
/// ```
/// `state` is `cached` (an entry exists), `stale` (would run; `reasons` says why) or `blocked`
/// (cannot run: a data input is missing, or an upstream stage is blocked).
#[derive(Debug, Clone, Serialize)]
pub struct StageStatus {
    pub stage: String,
    pub kind: String,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

pub fn status(
    plan: &Plan,
    keys: &[Result<Keyed, keys::Blocked>],
    selected: &[bool],
    store: &Store,
) -> Vec<StageStatus> {
    let recorded = Journal::for_pipeline(&store.journal_dir(), &plan.file).latest();
    let mut out: Vec<StageStatus> = Vec::new();
    for (i, stage) in plan.stages.iter().enumerate() {
        if !selected[i] {
            continue;
        }
        let mut st = StageStatus {
            stage: stage.name.clone(),
            kind: stage.kind.clone(),
            state: "stale",
            key: None,
            reasons: Vec::new(),
        };
        match &keys[i] {
            Err(reason) => {
                st.state = "blocked";
                st.reasons.push(reason.clone());
            }
            Ok(k) => {
                st.key = Some(k.key.hex());
                match store.check(&stage.kind, &k.key) {
                    EntryState::Intact(_) => st.state = "cached",
                    EntryState::Damaged(why) => st.reasons.push(format!(
                        "its cached entry is damaged ({why}) and will be computed again"
                    )),
                    EntryState::Absent => {
                        st.reasons = stale_reasons(plan, keys, store, i, recorded.get(&stage.name))
                    }
                }
            }
        }
        out.push(st);
    }
    out
}

fn stale_reasons(
    plan: &Plan,
    keys: &[Result<Keyed, keys::Blocked>],
    store: &Store,
    i: usize,
    last: Option<&JournalLine>,
) -> Vec<String> {
    let Ok(k) = &keys[i] else { return Vec::new() };
    let stale_ups: Vec<String> = plan.stages[i]
        .deps
        .iter()
        .filter(|&&d| {
            keys[d]
                .as_ref()
                .is_ok_and(|kd| store.lookup(&plan.stages[d].kind, &kd.key).is_none())
        })
        .map(|&d| format!("upstream `{}` is stale", plan.stages[d].name))
        .collect();
    let Some(last) = last else {
        let mut r = vec!["never run under this name".to_owned()];
        r.extend(stale_ups);
        return r;
    };
    if last.key == k.key {
        return vec!["its entry was removed from the cache (gc or by hand)".to_owned()];
    }
    let old = serde_json::to_value(&last.key_input).unwrap_or_default();
    let new = serde_json::to_value(&k.input).unwrap_or_default();
    let mut reasons: Vec<String> = crate::cache::key::diff(&old, &new)
        .into_iter()
        .map(|d| {
            // Name the upstream stage instead of showing two hashes.
            if let Some(rest) = d.strip_prefix("inputs.") {
                let slot = rest.split(['[', '.', ':']).next().unwrap_or(rest);
                if d.contains(".key:") {
                    return format!("input `{slot}`: upstream stage changed");
                }
                if d.contains(".fingerprint:") {
                    return format!("input `{slot}`: data changed");
                }
            }
            d
        })
        .collect();
    reasons.extend(stale_ups);
    reasons.dedup();
    reasons
}

/// The folder entries of `plan` land in unless `--cache` or `PRETEXT_CACHE` say otherwise.
pub fn default_cache_dir(plan_root: &std::path::Path) -> PathBuf {
    plan_root.join("cache")
}
