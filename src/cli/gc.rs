use super::open_store;
use crate::cache::store::verify as verify_entry;
use crate::cache::StageKey;
use crate::exec::keys::stage_keys;
use crate::pipeline::{load_plan, LoadOptions};
use crate::tasks::Catalog;
use anyhow::{Context, Result};
use clap::Args;
use std::collections::HashSet;
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
    let mut keep: HashSet<StageKey> = HashSet::new();
    for file in &files {
        // A pipeline that does not load could reach anything: refuse rather than delete its entries.
        let plan = load_plan(file, catalog, &LoadOptions::default())?;
        let all = vec![true; plan.stages.len()];
        for k in stage_keys(&plan, &store, &all).into_iter().flatten() {
            keep.insert(k.key);
        }
    }
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
    let mut removed = 0;
    for entry in store.entries()? {
        if keep.contains(&entry.key) {
            continue;
        }
        let stage = entry
            .manifest()
            .map(|m| m.stage)
            .unwrap_or_else(|_| "?".into());
        println!("{verb} {}/{} ({stage})", entry.kind, entry.key.short());
        if !args.dry_run {
            store.remove(&entry)?;
        }
        removed += 1;
    }
    for (key, dir) in store.staging_dirs()? {
        if !keep.contains(&key) && !store.is_locked(&key) {
            remove_folder("unfinished", &dir)?;
        }
    }
    for run in old_job_runs(&store.jobs_dir(), args.keep_jobs_days)? {
        remove_folder("Slurm job folder", &run)?;
    }
    println!(
        "{} pipelines, {} entries kept, {removed} {}",
        files.len(),
        keep.len(),
        if args.dry_run { "to remove" } else { "removed" }
    );
    Ok(ExitCode::SUCCESS)
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

pub fn verify(args: VerifyArgs) -> Result<ExitCode> {
    let store = open_store(args.cache.as_deref(), &std::env::current_dir()?)?;
    let entries = store.entries()?;
    let mut bad = 0;
    for entry in &entries {
        let problems = verify_entry(entry);
        if problems.is_empty() {
            continue;
        }
        bad += 1;
        println!("corrupted {}/{}:", entry.kind, entry.key.short());
        for p in &problems {
            println!("  {p}");
        }
        if args.remove {
            store.remove(entry)?;
            println!("  removed; the next run recomputes it");
        }
    }
    println!("{} entries checked, {bad} corrupted", entries.len());
    Ok(if bad > 0 && !args.remove {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
