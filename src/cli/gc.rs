use super::open_store;
use crate::cache::journal::{now_unix, Journal};
use crate::cache::store::verify as verify_entry;
use crate::cache::{KeyedInput, StageKey};
use crate::exec::keys::stage_keys;
use crate::pipeline::{load_plan, LoadOptions};
use crate::stage::Catalog;
use anyhow::{Context, Result};
use clap::Args;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
pub struct GcArgs {
    /// Folder of pipeline files whose stages are kept (searched recursively for *.yaml).
    #[arg(long, default_value = "pipelines", value_name = "DIR")]
    pipelines: PathBuf,
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// List what would be removed, remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Also remove the job folders of Slurm runs (cache/jobs/: scripts, stage files, job
    /// output) untouched for this many days.
    #[arg(long, default_value_t = 7.0, value_name = "DAYS")]
    keep_jobs_days: f64,
    /// Keep every entry a run recorded in the last DAYS days (whatever vars, profile or --set
    /// made its key), with everything upstream of it.
    #[arg(long, default_value_t = 30.0, value_name = "DAYS")]
    keep_days: f64,
}

#[derive(Args)]
pub struct VerifyArgs {
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Remove the corrupted entries, so the next run recomputes them.
    #[arg(long)]
    remove: bool,
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            yaml_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
    Ok(())
}

/// Removes what no pipeline and no recent run reaches. Kept: every stage of every pipeline file
/// under `--pipelines`, under its default vars and under each of its profiles; every key a run
/// recorded in the journals within `--keep-days` (so `--set` and profile results survive);
/// everything upstream of a kept entry; the checkpoints of kept stages. gc waits while a run
/// uses the cache, so it never deletes what a live run reads.
pub fn gc(args: GcArgs, catalog: &Catalog) -> Result<ExitCode> {
    let mut files = Vec::new();
    yaml_files(&args.pipelines, &mut files)
        .with_context(|| format!("reading {}", args.pipelines.display()))?;
    files.sort();
    let root = args
        .pipelines
        .canonicalize()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let store = open_store(args.cache.as_deref(), &root)?;
    let _alone = store.exclude_runs(|| {
        eprintln!("waiting: a pretext run is using this cache (gc deletes nothing while it runs)")
    })?;
    let mut keep: HashSet<StageKey> = HashSet::new();
    for file in &files {
        // A pipeline that does not load could reach anything: refuse rather than delete its entries.
        let plan = load_plan(file, catalog, &LoadOptions::default())?;
        let mut plans = vec![plan];
        for profile in plans[0].profiles.clone() {
            let opts = LoadOptions {
                profile: Some(profile),
                set: Vec::new(),
            };
            plans.push(load_plan(file, catalog, &opts)?);
        }
        for plan in &plans {
            let all = vec![true; plan.stages.len()];
            keep.extend(
                stage_keys(plan, &store, &all)
                    .into_iter()
                    .flatten()
                    .map(|k| k.key),
            );
        }
    }
    let since = now_unix().saturating_sub((args.keep_days.max(0.0) * 86_400.0) as u64);
    for journal in Journal::all(&store.journal_dir()) {
        keep.extend(
            journal
                .lines()
                .into_iter()
                .filter(|l| l.at_unix > since)
                .map(|l| l.key),
        );
    }
    let entries = store.entries()?;
    keep_upstream(&entries, &mut keep);
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    let remove_folder = |what: &str, dir: &Path| -> Result<()> {
        println!("{verb} {what} {}", dir.display());
        if !args.dry_run {
            std::fs::remove_dir_all(dir)?;
        }
        Ok(())
    };
    let (mut removed, mut kept) = (0, 0);
    for entry in &entries {
        if keep.contains(&entry.key) {
            kept += 1;
            continue;
        }
        let stage = entry
            .manifest()
            .map(|m| m.stage)
            .unwrap_or_else(|_| "?".into());
        println!("{verb} {}/{} ({stage})", entry.kind, entry.key.short());
        if !args.dry_run {
            store.remove(entry)?;
        }
        removed += 1;
    }
    let mut unfinished = 0;
    for (key, dir) in store.staging_dirs()? {
        if !keep.contains(&key) && !store.is_locked(&key) {
            remove_folder("unfinished", &dir)?;
            unfinished += 1;
        }
    }
    for run in old_job_runs(&store.jobs_dir(), args.keep_jobs_days)? {
        remove_folder("Slurm job folder", &run)?;
    }
    println!(
        "{} pipelines; {kept} of {} entries kept, {removed} {verb}; {unfinished} unfinished stages {verb}",
        files.len(),
        entries.len(),
    );
    Ok(ExitCode::SUCCESS)
}

/// Adds to `keep` every entry a kept entry was computed from, through the upstream keys in
/// their manifests.
fn keep_upstream(entries: &[crate::cache::store::Entry], keep: &mut HashSet<StageKey>) {
    let upstream: HashMap<StageKey, Vec<StageKey>> = entries
        .iter()
        .filter_map(|e| Some((e.key, upstream_keys(&e.manifest().ok()?))))
        .collect();
    let mut todo: Vec<StageKey> = keep.iter().copied().collect();
    while let Some(k) = todo.pop() {
        for up in upstream.get(&k).into_iter().flatten() {
            if keep.insert(*up) {
                todo.push(*up);
            }
        }
    }
}

/// Run folders under `jobs` in which nothing changed for `days` (a running job keeps appending
/// to its output file, so a live run is never old).
fn old_job_runs(jobs: &Path, days: f64) -> Result<Vec<PathBuf>> {
    let Ok(runs) = std::fs::read_dir(jobs) else {
        return Ok(Vec::new());
    };
    let limit = std::time::Duration::from_secs_f64((days * 86_400.0).max(0.0));
    let now = std::time::SystemTime::now();
    let newest = |dir: &Path| -> std::time::SystemTime {
        let mut t = std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .unwrap_or(now);
        for stage in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(stage.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Ok(m) = f.metadata().and_then(|m| m.modified()) {
                    t = t.max(m);
                }
            }
        }
        t
    };
    let mut old = Vec::new();
    for run in runs {
        let dir = run?.path();
        if dir.is_dir() && now.duration_since(newest(&dir)).unwrap_or_default() >= limit {
            old.push(dir);
        }
    }
    old.sort();
    Ok(old)
}

/// Hashes every entry against its manifest. With `--remove`, a corrupted entry is removed
/// together with every entry computed from it (its downstream, through the keys in their
/// manifests): those were built on data that can no longer be trusted.
pub fn verify(args: VerifyArgs) -> Result<ExitCode> {
    let store = open_store(args.cache.as_deref(), &std::env::current_dir()?)?;
    let entries = store.entries()?;
    let mut bad: HashSet<StageKey> = HashSet::new();
    for entry in &entries {
        let problems = verify_entry(entry);
        if problems.is_empty() {
            continue;
        }
        bad.insert(entry.key);
        println!("corrupted {}/{}:", entry.kind, entry.key.short());
        for p in &problems {
            println!("  {p}");
        }
    }
    println!("{} entries checked, {} corrupted", entries.len(), bad.len());
    if !args.remove {
        return Ok(if bad.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    let _alone = store.exclude_runs(|| eprintln!("waiting: a pretext run is using this cache"))?;
    let doomed = with_downstream(&entries, &bad);
    for entry in entries.iter().filter(|e| doomed.contains(&e.key)) {
        store.remove(entry)?;
        let why = if bad.contains(&entry.key) {
            "corrupted"
        } else {
            "computed from a corrupted entry"
        };
        println!(
            "removed {}/{} ({why}); the next run recomputes it",
            entry.kind,
            entry.key.short()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `roots` and every entry whose key input names one of them, transitively.
fn with_downstream(
    entries: &[crate::cache::store::Entry],
    roots: &HashSet<StageKey>,
) -> HashSet<StageKey> {
    let mut out = roots.clone();
    let reads: Vec<(StageKey, Vec<StageKey>)> = entries
        .iter()
        .filter_map(|e| {
            let m = e.manifest().ok()?;
            Some((e.key, upstream_keys(&m)))
        })
        .collect();
    loop {
        let before = out.len();
        for (key, ups) in &reads {
            if ups.iter().any(|u| out.contains(u)) {
                out.insert(*key);
            }
        }
        if out.len() == before {
            return out;
        }
    }
}

fn upstream_keys(m: &crate::cache::store::Manifest) -> Vec<StageKey> {
    m.key_input
        .inputs
        .values()
        .flatten()
        .filter_map(|i| match i {
            KeyedInput::Stage { key, .. } => Some(*key),
            KeyedInput::Data { .. } => None,
        })
        .collect()
}
