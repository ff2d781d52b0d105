//! The content-addressed store under `cache/`.
//!
//! ```text
//! cache/
//!   <kind>/<key>/          a finished entry: outputs, log.txt, manifest.json (written last)
//!   tmp/<key>/             a stage in progress; renamed to <kind>/<key> only on success
//!   tmp/<key>/checkpoint/  kept across failed attempts so the next one resumes
//!   locks/<key>.lock       one flock per key: two runs never compute the same stage at once
//!   state/                 fingerprint stat caches
//!   journal/               per-pipeline history of stage keys (for `pretext status`)
//!   scratch/               derived data any stage may recompute (decoded images); never an entry
//! ```
//!
//! An entry exists if and only if its directory exists under `<kind>/`: it appears by one
//! `rename(2)`, so a killed run leaves either no entry or a whole one.

use super::digest::StageKey;
use super::fingerprint::hash_file;
use super::key::KeyInput;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";
pub const LOG: &str = "log.txt";
const CHECKPOINT: &str = "checkpoint";
pub const MANIFEST_SCHEMA: u32 = 1;

/// `manifest.json` of an entry. Stable JSON: scripts read it.
///
/// ```json
/// { "schema_version": 1, "key": "<64 hex>", "kind": "mae", "stage": "chest_mae",
///   "key_input": { "key_schema": 1, "kind": "mae", "version": 1, "params": {..},
///                  "inputs": { "images": [ { "type": "data", "fingerprint": "<hex>" } ] } },
///   "outputs": { "encoder.safetensors": "<blake3 hex>", .. },
///   "started_at_unix": 1764000000, "wall_s": 12.5, "peak_rss_kib": 81234,
///   "host": "node1", "device": "cpu", "pretext_version": "0.1.0", "metrics": { .. } }
/// ```
/// `stage` is the name under which the entry was first computed; other pipelines may reuse it
/// under other names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub key: StageKey,
    pub kind: String,
    pub stage: String,
    pub key_input: KeyInput,
    /// blake3 of every file in the entry except the manifest itself, by relative path.
    pub outputs: BTreeMap<String, String>,
    /// Size in bytes of every file in `outputs`: what a cache hit checks before it is trusted
    /// (empty in entries written before sizes were recorded).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sizes: BTreeMap<String, u64>,
    pub started_at_unix: u64,
    pub wall_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_kib: Option<u64>,
    pub host: String,
    pub device: String,
    pub pretext_version: String,
    /// The git commit the binary was built from (`-dirty` with local changes; empty in entries
    /// written before it was recorded).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pretext_commit: String,
    /// The command line of the run that computed the entry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invocation: Vec<String>,
    pub metrics: Value,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A finished entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dir: PathBuf,
    pub kind: String,
    pub key: StageKey,
}

impl Entry {
    /// How long the entry took to compute, without materialising the whole manifest (the
    /// no-op path of a large pipeline reads one per stage).
    pub fn wall_s(&self) -> Option<f64> {
        #[derive(Deserialize)]
        struct Wall {
            wall_s: f64,
        }
        let text = fs::read(self.dir.join(MANIFEST)).ok()?;
        serde_json::from_slice::<Wall>(&text).ok().map(|w| w.wall_s)
    }

    pub fn manifest(&self) -> io::Result<Manifest> {
        let path = self.dir.join(MANIFEST);
        let text = fs::read_to_string(&path)?;
        serde_json::from_str(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })
    }
}

/// What [`Store::check`] found at a key's place.
#[derive(Debug)]
pub enum EntryState {
    Intact(Entry),
    Absent,
    /// Something is there but cannot be trusted; the reason says what. Recomputing replaces it.
    Damaged(String),
}

/// Held while a stage of this key runs; released on drop (or by the kernel if the process dies).
pub struct KeyLock {
    _file: File,
}

impl KeyLock {
    /// The lock's file descriptor: a child process that inherits it holds the lock until it
    /// exits, even if pretext dies first.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self._file)
    }
}

/// The temp folder a stage writes into.
pub struct Staging {
    pub dir: PathBuf,
    pub checkpoint_dir: PathBuf,
    kind: String,
    key: StageKey,
}

/// The cache's own folders; every other top-level folder holds the entries of one kind.
const NOT_KINDS: [&str; 6] = ["tmp", "locks", "state", "journal", "scratch", "jobs"];

impl Store {
    pub fn open(root: &Path) -> io::Result<Store> {
        for sub in NOT_KINDS {
            fs::create_dir_all(root.join(sub)).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create cache folder {}: {e}",
                        root.join(sub).display()
                    ),
                )
            })?;
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }
    /// Derived data any stage may recompute (decoded images); never part of an entry.
    pub fn scratch_dir(&self) -> PathBuf {
        self.root.join("scratch")
    }
    /// Job scripts, stage job files and logs of Slurm runs, one folder per run.
    pub fn jobs_dir(&self) -> PathBuf {
        self.root.join("jobs")
    }
    pub fn journal_dir(&self) -> PathBuf {
        self.root.join("journal")
    }

    pub fn entry_dir(&self, kind: &str, key: &StageKey) -> PathBuf {
        self.root.join(kind).join(key.hex())
    }

    /// The entry of `key`, if it exists and passes the quick check of [`Store::check`].
    pub fn lookup(&self, kind: &str, key: &StageKey) -> Option<Entry> {
        match self.check(kind, key) {
            EntryState::Intact(entry) => Some(entry),
            EntryState::Absent | EntryState::Damaged(_) => None,
        }
    }

    /// What is at `key`'s place, checked before it is trusted: a real folder (not a symlink
    /// someone planted), a manifest that parses and names this key, and every output file
    /// present at its recorded size. A flipped byte keeps its size: `verify` hashes contents.
    /// About 20 us per entry (BENCHMARKS.md).
    pub fn check(&self, kind: &str, key: &StageKey) -> EntryState {
        let dir = self.entry_dir(kind, key);
        match fs::symlink_metadata(&dir) {
            Err(_) => return EntryState::Absent,
            Ok(m) if !m.is_dir() => {
                return EntryState::Damaged(format!("{} is not a folder", dir.display()))
            }
            Ok(_) => {}
        }
        let entry = Entry {
            dir,
            kind: kind.to_owned(),
            key: *key,
        };
        let manifest = match entry.manifest() {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return EntryState::Damaged("its manifest.json is missing".into())
            }
            Err(e) => return EntryState::Damaged(format!("its manifest is unreadable: {e}")),
        };
        if manifest.key != *key {
            return EntryState::Damaged("its manifest names another key".into());
        }
        for name in manifest.outputs.keys() {
            let path = entry.dir.join(name);
            let size = match fs::symlink_metadata(&path) {
                Ok(m) if m.is_file() => m.len(),
                Ok(_) => return EntryState::Damaged(format!("{name} is not a regular file")),
                Err(_) => return EntryState::Damaged(format!("{name} is missing")),
            };
            if manifest.sizes.get(name).is_some_and(|&want| want != size) {
                return EntryState::Damaged(format!(
                    "{name} has {size} bytes, the manifest recorded {}",
                    manifest.sizes[name]
                ));
            }
        }
        EntryState::Intact(entry)
    }

    /// Takes the key's lock, calling `on_wait` once if another process holds it.
    pub fn lock(&self, key: &StageKey, on_wait: impl FnOnce()) -> io::Result<KeyLock> {
        let file = self.open_lock(&self.root.join("locks").join(format!("{}.lock", key.hex())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                on_wait();
                file.lock()?;
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        Ok(KeyLock { _file: file })
    }

    /// Held by every run and Slurm job for as long as it uses the cache (shared: runs do not
    /// exclude each other); `gc` takes it exclusively, so it never deletes an entry a live run
    /// is reading or about to read.
    pub fn share_with_runs(&self) -> io::Result<KeyLock> {
        let file = self.open_lock(&self.root.join("locks").join("runs.lock"))?;
        file.lock_shared()?;
        Ok(KeyLock { _file: file })
    }

    /// The exclusive side of [`Store::share_with_runs`], for gc; `on_wait` is called once if a
    /// run holds the cache.
    pub fn exclude_runs(&self, on_wait: impl FnOnce()) -> io::Result<KeyLock> {
        let file = self.open_lock(&self.root.join("locks").join("runs.lock"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                on_wait();
                file.lock()?;
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        Ok(KeyLock { _file: file })
    }

    /// Opens (creating) a lock file without following a symlink: a link planted in a shared
    /// cache must not make pretext create or truncate a file elsewhere.
    fn open_lock(&self, path: &Path) -> io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| {
                let why = if e.raw_os_error() == Some(libc::ELOOP) {
                    "it is a symlink, which pretext does not follow inside its cache; remove it"
                        .to_owned()
                } else {
                    e.to_string()
                };
                io::Error::new(e.kind(), format!("lock file {}: {why}", path.display()))
            })
    }

    /// Whether some process holds the key's lock right now (for gc, which must not delete a
    /// running stage's staging folder).
    pub fn is_locked(&self, key: &StageKey) -> bool {
        let path = self.root.join("locks").join(format!("{}.lock", key.hex()));
        if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            return false;
        }
        let Ok(file) = self.open_lock(&path) else {
            return false;
        };
        matches!(file.try_lock(), Err(fs::TryLockError::WouldBlock))
    }

    /// Prepares `tmp/<key>/`, keeping a checkpoint left by an earlier attempt. Needs the lock.
    pub fn stage(&self, kind: &str, key: &StageKey, _lock: &KeyLock) -> io::Result<Staging> {
        let dir = self.root.join("tmp").join(key.hex());
        let checkpoint_dir = dir.join(CHECKPOINT);
        // Something other than a folder at the staging path (a symlink someone planted, say) is
        // removed itself, never followed: emptying the folder a link points to would delete
        // files outside the cache, and publishing would move the link into place.
        if fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
            fs::remove_file(&dir)?;
        }
        if fs::symlink_metadata(&checkpoint_dir).is_ok_and(|m| !m.is_dir()) {
            fs::remove_file(&checkpoint_dir)?;
        }
        if dir.exists() {
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                if entry.file_name() != CHECKPOINT {
                    remove_any(&entry.path())?;
                }
            }
        }
        fs::create_dir_all(&checkpoint_dir)?;
        Ok(Staging {
            dir,
            checkpoint_dir,
            kind: kind.to_owned(),
            key: *key,
        })
    }

    /// Hashes the outputs, writes the manifest, syncs, and renames the staging folder into place.
    /// Replaces an existing entry of the same key (a `--force` rerun).
    pub fn publish(&self, staging: Staging, mut manifest: Manifest) -> io::Result<Entry> {
        // The checkpoint is set aside, not deleted, until the entry is in place: a publish that
        // fails (a full disk, a read-only folder) leaves the next attempt its checkpoint.
        let aside = self.root.join("tmp").join(format!(
            "{}.checkpoint-{}",
            staging.key.hex(),
            std::process::id()
        ));
        with_path(
            fs::rename(&staging.checkpoint_dir, &aside),
            &staging.checkpoint_dir,
        )?;
        match self.publish_outputs(&staging, &mut manifest) {
            Ok(entry) => {
                let _ = remove_any(&aside);
                Ok(entry)
            }
            Err(e) => {
                let _ = fs::rename(&aside, &staging.checkpoint_dir);
                Err(e)
            }
        }
    }

    fn publish_outputs(&self, staging: &Staging, manifest: &mut Manifest) -> io::Result<Entry> {
        let files = with_path(hash_tree(&staging.dir), &staging.dir)?;
        manifest.outputs = files
            .iter()
            .filter(|(name, _)| *name != MANIFEST)
            .map(|(name, (digest, _))| (name.clone(), digest.clone()))
            .collect();
        manifest.sizes = files
            .into_iter()
            .filter(|(name, _)| name != MANIFEST)
            .map(|(name, (_, size))| (name, size))
            .collect();
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
        let manifest_path = staging.dir.join(MANIFEST);
        let write = |path: &Path| -> io::Result<()> {
            let mut file = File::create(path)?;
            file.write_all(&bytes)?;
            file.sync_all()
        };
        with_path(write(&manifest_path), &manifest_path)?;
        with_path(sync_tree(&staging.dir), &staging.dir)?;
        let target = self.entry_dir(&staging.kind, &staging.key);
        let kind_dir = target.parent().expect("entry has a kind folder");
        with_path(fs::create_dir_all(kind_dir), kind_dir)?;
        if fs::symlink_metadata(&target).is_ok() {
            self.remove(&Entry {
                dir: target.clone(),
                kind: staging.kind.clone(),
                key: staging.key,
            })?;
        }
        with_path(fs::rename(&staging.dir, &target), &target)?;
        with_path(File::open(kind_dir).and_then(|f| f.sync_all()), kind_dir)?;
        Ok(Entry {
            dir: target,
            kind: staging.kind.clone(),
            key: staging.key,
        })
    }

    /// Moves the entry out of sight in one rename, then deletes it.
    pub fn remove(&self, entry: &Entry) -> io::Result<()> {
        let trash =
            self.root
                .join("tmp")
                .join(format!("trash-{}-{}", entry.key.hex(), std::process::id()));
        fs::rename(&entry.dir, &trash)?;
        fs::remove_dir_all(&trash)
    }

    /// Every finished entry, sorted by kind then key.
    pub fn entries(&self) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        for kind_dir in fs::read_dir(&self.root)? {
            let kind_dir = kind_dir?;
            let kind = kind_dir.file_name().to_string_lossy().into_owned();
            if NOT_KINDS.contains(&kind.as_str()) || !kind_dir.file_type()?.is_dir() {
                continue;
            }
            for e in fs::read_dir(kind_dir.path())? {
                let e = e?;
                if let Some(key) = StageKey::parse(&e.file_name().to_string_lossy()) {
                    out.push(Entry {
                        dir: e.path(),
                        kind: kind.clone(),
                        key,
                    });
                }
            }
        }
        out.sort_by(|a, b| (&a.kind, a.key.hex()).cmp(&(&b.kind, b.key.hex())));
        Ok(out)
    }

    /// Staging folders (unfinished or failed stages), by key.
    pub fn staging_dirs(&self) -> io::Result<Vec<(StageKey, PathBuf)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.root.join("tmp"))? {
            let e = e?;
            if let Some(key) = StageKey::parse(&e.file_name().to_string_lossy()) {
                out.push((key, e.path()));
            }
        }
        Ok(out)
    }

    /// Finds an entry by a full key or a unique prefix of at least 6 hex digits.
    pub fn find(&self, key_prefix: &str) -> io::Result<Vec<Entry>> {
        if key_prefix.len() < 6 || !key_prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(Vec::new());
        }
        Ok(self
            .entries()?
            .into_iter()
            .filter(|e| e.key.hex().starts_with(key_prefix))
            .collect())
    }
}

/// Checks an entry's files against its manifest: the list of problems, empty when intact.
pub fn verify(entry: &Entry) -> Vec<String> {
    let manifest = match entry.manifest() {
        Ok(m) => m,
        Err(e) => return vec![format!("manifest unreadable: {e}")],
    };
    let mut problems = Vec::new();
    if manifest.key != entry.key || manifest.key_input.key() != entry.key {
        problems.push("manifest does not match the entry's key".to_owned());
    }
    let actual = match hash_tree(&entry.dir) {
        Ok(mut t) => {
            t.remove(MANIFEST);
            t
        }
        Err(e) => return vec![format!("cannot read files: {e}")],
    };
    for (path, digest) in &manifest.outputs {
        match actual.get(path) {
            None => problems.push(format!("{path}: missing")),
            Some((d, _)) if d != digest => problems.push(format!("{path}: content changed")),
            Some(_) => {}
        }
    }
    for path in actual.keys().filter(|p| !manifest.outputs.contains_key(*p)) {
        problems.push(format!("{path}: not in the manifest"));
    }
    problems
}

/// (blake3 hex, size) of every file under `dir`, by relative path. Symlinks are not followed:
/// a link inside an entry is an error, not a way to read files outside the cache.
fn hash_tree(dir: &Path) -> io::Result<BTreeMap<String, (String, u64)>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, prefix)) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let kind = e.file_type()?;
            if kind.is_dir() {
                stack.push((e.path(), rel));
            } else if kind.is_file() {
                let size = e.metadata()?.len();
                out.insert(rel, (hash_file(&e.path())?.hex(), size));
            } else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: not a regular file (a symlink?)", e.path().display()),
                ));
            }
        }
    }
    Ok(out)
}

fn sync_tree(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            sync_tree(&e.path())?;
        } else {
            File::open(e.path())?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()
}

/// The error with the path it is about (`std::io` errors name none), said once.
fn with_path<T>(r: io::Result<T>, path: &Path) -> io::Result<T> {
    r.map_err(|e| {
        let text = e.to_string();
        if text.contains(&path.display().to_string()) {
            e
        } else {
            io::Error::new(e.kind(), format!("{}: {text}", path.display()))
        }
    })
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
