//! What a run reports, as it happens.
//!
//! The scheduler emits [`Event`]s into an [`EventSink`]; the terminal view, the JSON-lines
//! printer and tests are sinks. `pretext run --json` prints one event per line on stdout:
//!
//! ```json
//! {"type":"plan","stages":12,"cached":9,"to_run":3}
//! {"type":"stage_cached","stage":"chest_mae","key":"<hex>","saved_s":512.3}
//! {"type":"stage_wait_lock","stage":"finetune@vit-seed1","key":"<hex>"}
//! {"type":"stage_submitted","stage":"finetune@vit-seed1","job":"4711"}
//! {"type":"stage_queue","stage":"finetune@vit-seed1","job":"4711","state":"PENDING","reason":"Resources"}
//! {"type":"stage_start","stage":"finetune@vit-seed1","key":"<hex>"}
//! {"type":"stage_progress","stage":"finetune@vit-seed1","done":3,"total":30,"message":"loss 1.21"}
//! {"type":"stage_log","stage":"finetune@vit-seed1","line":"..."}
//! {"type":"stage_done","stage":"finetune@vit-seed1","key":"<hex>","wall_s":41.2,"metrics":{..}}
//! {"type":"stage_failed","stage":"evaluate@vit-seed1","key":"<hex>","error":"..."}
//! {"type":"stage_skipped","stage":"report","reason":"upstream `evaluate@vit-seed1` failed"}
//! {"type":"run_end","ran":2,"cached":9,"failed":1,"skipped":1,"wall_s":45.0}
//! ```
//! Fields are only ever added. `stage_cached` means the stage's key was found in the cache,
//! possibly computed by a concurrent run that this one waited for. `stage_submitted` and
//! `stage_queue` come only from the Slurm executor: the job id, and the job's Slurm state and
//! reason each time they change. A Slurm job prints the events of its one stage on its standard
//! output in this same format; the submitting run reads them back and passes them on.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Plan {
        stages: usize,
        cached: usize,
        to_run: usize,
    },
    StageCached {
        stage: String,
        key: String,
        saved_s: f64,
    },
    StageSubmitted {
        stage: String,
        job: String,
    },
    StageQueue {
        stage: String,
        job: String,
        state: String,
        reason: String,
    },
    StageWaitLock {
        stage: String,
        key: String,
    },
    StageStart {
        stage: String,
        key: String,
    },
    StageProgress {
        stage: String,
        done: u64,
        total: u64,
        message: String,
    },
    StageLog {
        stage: String,
        line: String,
    },
    StageDone {
        stage: String,
        key: String,
        wall_s: f64,
        metrics: Value,
    },
    StageFailed {
        stage: String,
        key: String,
        error: String,
    },
    StageSkipped {
        stage: String,
        reason: String,
    },
    RunEnd {
        ran: usize,
        cached: usize,
        failed: usize,
        skipped: usize,
        wall_s: f64,
    },
}

pub trait EventSink: Sync {
    fn emit(&self, event: Event);
}

/// Collects events (tests, summaries).
#[derive(Default)]
pub struct Recorder(pub std::sync::Mutex<Vec<Event>>);

impl EventSink for Recorder {
    fn emit(&self, event: Event) {
        self.0.lock().expect("recorder lock").push(event);
    }
}
