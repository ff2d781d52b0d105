//! A per-pipeline history of stage keys: `pretext status` says from it *why* a stage is stale,
//! `pretext gc` keeps what it names from the last days (whatever vars, profile or `--set` made
//! the key), and `pretext results` shows the invocation behind an entry.
//!
//! One JSON line per (stage name, new key), appended with a single `write(2)` on an `O_APPEND`
//! file: O(1) per stage, safe with concurrent runs, never rewritten (DVC rewrites its lock file
//! after every stage, which made its runs O(N^2)). A stage whose key did not change appends
//! nothing, unless its last line is a day old: then the line is renewed, so a key in daily use
//! stays recent for gc.

use super::digest::StageKey;
use super::key::KeyInput;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalLine {
    pub stage: String,
    pub key: StageKey,
    pub key_input: KeyInput,
    /// When the line was written (0 in lines written before times were recorded).
    #[serde(default)]
    pub at_unix: u64,
    /// The command that ran the stage.
    #[serde(default, skip_serializing_if = "Invocation::is_empty")]
    pub invocation: Invocation,
    /// The pipeline file the stage is in, as it was given (set by [`Journal::append`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pipeline: String,
}

/// How a run was asked for: what a result table shows beside a number.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Invocation {
    /// The command line, as typed (`pretext run pipelines/x.yaml --set seed=1`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// `--set` overrides as `name=value`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<String>,
}

impl Invocation {
    pub fn is_empty(&self) -> bool {
        *self == Invocation::default()
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A line older than this is renewed when its stage runs or hits again.
pub const RENEW_AFTER_S: u64 = 86_400;

pub struct Journal {
    path: PathBuf,
    /// The pipeline file, as given (empty for journals found by [`Journal::all`]).
    pipeline: String,
}

impl Journal {
    /// The journal of the pipeline file at `pipeline` (by its absolute path).
    pub fn for_pipeline(journal_dir: &Path, pipeline: &Path) -> Journal {
        let abs = pipeline
            .canonicalize()
            .unwrap_or_else(|_| pipeline.to_path_buf());
        let id = &blake3::hash(abs.as_os_str().as_encoded_bytes()).to_hex()[..24];
        Journal {
            path: journal_dir.join(format!("{id}.jsonl")),
            pipeline: pipeline.display().to_string(),
        }
    }

    /// The last line recorded per stage name. Unreadable lines (a torn write) are skipped.
    pub fn latest(&self) -> HashMap<String, JournalLine> {
        let mut out = HashMap::new();
        for l in self.lines() {
            out.insert(l.stage.clone(), l);
        }
        out
    }

    /// Every readable line, oldest first.
    pub fn lines(&self) -> Vec<JournalLine> {
        let Ok(text) = fs::read_to_string(&self.path) else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|line| serde_json::from_str::<JournalLine>(line).ok())
            .collect()
    }

    pub fn append(&self, line: &JournalLine) -> io::Result<()> {
        let mut line = line.clone();
        if line.pipeline.is_empty() {
            line.pipeline.clone_from(&self.pipeline);
        }
        let mut bytes = serde_json::to_vec(&line).map_err(io::Error::other)?;
        bytes.push(b'\n');
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?
            .write_all(&bytes)
    }

    /// Every journal in the folder (for `pretext show STAGE` without a pipeline).
    pub fn all(journal_dir: &Path) -> Vec<Journal> {
        fs::read_dir(journal_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| Journal {
                path: e.path(),
                pipeline: String::new(),
            })
            .collect()
    }
}
