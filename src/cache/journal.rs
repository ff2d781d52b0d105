//! A per-pipeline history of stage keys, so `pretext status` can say *why* a stage is stale.
//!
//! One JSON line per (stage name, new key), appended with a single `write(2)` on an `O_APPEND`
//! file: O(1) per stage, safe with concurrent runs, never rewritten (DVC rewrites its lock file
//! after every stage, which made its runs O(N^2)). A stage whose key did not change appends nothing.

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
}

pub struct Journal {
    path: PathBuf,
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
        }
    }

    /// The last line recorded per stage name. Unreadable lines (a torn write) are skipped.
    pub fn latest(&self) -> HashMap<String, JournalLine> {
        let Ok(text) = fs::read_to_string(&self.path) else {
            return HashMap::new();
        };
        let mut out = HashMap::new();
        for line in text.lines() {
            if let Ok(l) = serde_json::from_str::<JournalLine>(line) {
                out.insert(l.stage.clone(), l);
            }
        }
        out
    }

    pub fn append(&self, line: &JournalLine) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(line).map_err(io::Error::other)?;
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
            .map(|e| Journal { path: e.path() })
            .collect()
    }
}
