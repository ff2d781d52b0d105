use super::interrupt::Interrupt;
use super::{keys_or_blocked, view, PipelineArgs, UsageError};
use crate::exec::cached::Local;
use crate::exec::cached::Outcome;
use crate::exec::events::{Event, EventSink};
use crate::exec::scheduler::{Status, WalkOptions};
use crate::exec::slurm::{self, SlurmConfig, SlurmRun};
use crate::exec::{run_plan, RunOptions};
use crate::pipeline::config::user_executor;
use crate::pipeline::spec::{ExecutorKind, ExecutorSpec};
use crate::stage::{Catalog, DeviceChoice};
use anyhow::Result;
use clap::Args;
use std::process::ExitCode;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Stages to run at once, 1 to 1024 [default: number of CPUs].
    #[arg(long, short, value_parser = clap::value_parser!(u16).range(1..=1024))]
    jobs: Option<u16>,
    /// Rerun these stages even if cached (repeatable; instance or template names).
    #[arg(long, value_name = "NAME")]
    force: Vec<String>,
    /// After a failure, go on with every stage that does not depend on it.
    #[arg(long)]
    keep_going: bool,
    /// Where stages run their models: cpu, cuda:N, or auto (cuda:0 with --gpus, else cpu; on
    /// Slurm: cuda:0 for stages that ask for a GPU).
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Where stages run: `local` (this machine) or `slurm` (one sbatch job per stale stage,
    /// against this cache on a shared filesystem) [default: the pipeline's or config file's
    /// `executor.type`, else local].
    #[arg(long, value_parser = ["local", "slurm"])]
    executor: Option<String>,
    /// Slurm partition for every stage (a stage's resources.partition wins).
    #[arg(long)]
    partition: Option<String>,
    /// Slurm account for every stage (a stage's resources.account wins).
    #[arg(long)]
    account: Option<String>,
    /// GPUs this machine may use at once; one token each, one GPU stage per token.
    #[arg(long, default_value_t = 0)]
    gpus: u32,
    /// Print every stage's output lines.
    #[arg(long, short)]
    verbose: bool,
    /// Print events as JSON lines on stdout (documented in src/exec/events.rs).
    #[arg(long)]
    json: bool,
}

pub fn run(args: RunArgs, catalog: &Catalog) -> Result<ExitCode> {
    let mut loaded = args.pipeline.load(catalog)?;
    let slurm = slurm_config(&args, &loaded)?;
    // Before any thread starts, so that no thread takes Ctrl-C with the default action.
    let interrupt = Interrupt::install(if slurm.is_some() {
        "cancelling this run's Slurm jobs (a second Ctrl-C quits at once; jobs may then keep running)"
    } else {
        "stopping the running stages, whose checkpoints are kept for the next run (a second Ctrl-C quits at once)"
    });
    let _sharing = loaded.store.share_with_runs()?;
    let (keys, blocked) = keys_or_blocked(&mut loaded);
    preflight(&loaded, &keys, catalog)?;
    let force = forced(&args.force, &loaded)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let jobs = args.jobs.map_or(cpus, usize::from);
    let local = Local {
        catalog,
        workdir: loaded.plan.root.clone(),
        scratch_dir: loaded.store.scratch_dir(),
        device: args.device,
        threads: (cpus / jobs).max(1),
        cancel: interrupt.flag.clone(),
    };
    let opts = RunOptions {
        walk: WalkOptions {
            jobs,
            gpus: args.gpus,
            cpus: cpus as u32,
            keep_going: args.keep_going,
            interrupted: Some(interrupt.flag.clone()),
        },
        force,
        invocation: args.pipeline.invocation(),
    };
    let human;
    let sink: &dyn EventSink = if args.json {
        &view::JsonLines
    } else {
        human = view::Human::new(args.verbose);
        &human
    };
    for (stage, reason) in &blocked {
        sink.emit(Event::StageSkipped {
            stage: stage.clone(),
            reason: reason.clone(),
        });
    }
    let status = match slurm {
        Some(config) => slurm::run_plan(
            &loaded.plan,
            &keys,
            &loaded.selected,
            &loaded.store,
            &opts,
            &SlurmRun {
                config,
                device: match args.device {
                    DeviceChoice::Auto => None,
                    DeviceChoice::Fixed(d) => Some(d),
                },
                interrupted: &interrupt.flag,
            },
            sink,
        ),
        None => run_plan(
            &loaded.plan,
            &keys,
            &loaded.selected,
            &loaded.store,
            &local,
            &opts,
            sink,
        ),
    };
    for line in headlines(&loaded, &keys, catalog) {
        eprintln!("{line}");
    }
    let failed = !blocked.is_empty()
        || status
            .iter()
            .any(|s| matches!(s, Status::Done(Outcome::Failed { .. }) | Status::Skipped(_)));
    Ok(match (interrupt.exit_code(), failed) {
        (Some(code), _) => ExitCode::from(code),
        (None, true) => ExitCode::from(1),
        (None, false) => ExitCode::SUCCESS,
    })
}

/// Slurm's settings when this run goes to Slurm: the user's config file, then the pipeline's
/// `executor:`, then the flags, each overriding the one before.
fn slurm_config(args: &RunArgs, loaded: &super::Loaded) -> Result<Option<SlurmConfig>> {
    let executor = user_executor()?
        .overlay(loaded.plan.executor.clone())
        .overlay(ExecutorSpec {
            kind: match args.executor.as_deref() {
                Some("slurm") => Some(ExecutorKind::Slurm),
                Some(_) => Some(ExecutorKind::Local),
                None => None,
            },
            partition: args.partition.clone(),
            account: args.account.clone(),
            ..Default::default()
        });
    match executor.kind {
        Some(ExecutorKind::Slurm) => Ok(Some(SlurmConfig::from_spec(&executor)?)),
        _ => Ok(None),
    }
}

/// Which stages `--force` names (instance or template names); a name that matches none is an
/// error.
fn forced(names: &[String], loaded: &super::Loaded) -> Result<Vec<bool>> {
    let stages = &loaded.plan.stages;
    let mut force = vec![false; stages.len()];
    for name in names {
        let hits: Vec<usize> = (0..stages.len())
            .filter(|&i| stages[i].name == *name || stages[i].template == *name)
            .collect();
        if hits.is_empty() {
            return Err(UsageError(format!(
                "--force {name}: no such stage in {}",
                loaded.plan.file.display()
            ))
            .into());
        }
        hits.into_iter().for_each(|i| force[i] = true);
    }
    Ok(force)
}

/// The end of a run: what each kind has to say about the entries the run ran or reused (an
/// evaluation's test headline, where a report's pages are), evaluations first.
fn headlines(
    loaded: &super::Loaded,
    keys: &[crate::exec::keys::Keyed],
    catalog: &Catalog,
) -> Vec<String> {
    let width = (loaded.plan.stages.iter())
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0);
    let mut lines = Vec::new();
    for (i, stage) in loaded.plan.stages.iter().enumerate() {
        let Some(headline) = catalog.get(&stage.kind).and_then(|k| k.headline) else {
            continue;
        };
        let Some(entry) = loaded.selected[i]
            .then(|| loaded.store.lookup(&stage.kind, &keys[i].key))
            .flatten()
        else {
            continue;
        };
        if let Ok(manifest) = entry.manifest() {
            let line = headline(&manifest.metrics, &entry.dir);
            lines.push(format!("{:width$}  {line}", stage.name));
        }
    }
    lines
}

/// Each stage that will run checks its data inputs before any stage starts (a missing test split
/// fails here, not after the training upstream of it). Checked once per kind and data input.
fn preflight(
    loaded: &super::Loaded,
    keys: &[crate::exec::keys::Keyed],
    catalog: &Catalog,
) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    let mut problems = Vec::new();
    for (i, stage) in loaded.plan.stages.iter().enumerate() {
        if !loaded.selected[i] || loaded.store.lookup(&stage.kind, &keys[i].key).is_some() {
            continue;
        }
        let Some(entry) = catalog.get(&stage.kind) else {
            continue;
        };
        let inputs = crate::exec::resolve_inputs(&loaded.plan, keys, &loaded.store, i);
        let data: Vec<String> = inputs
            .0
            .values()
            .flat_map(|v| match v {
                crate::stage::InputValue::One(item) => vec![item],
                crate::stage::InputValue::Many(items) => items.iter().collect(),
            })
            .filter(|item| item.digest.is_some())
            .map(|item| format!("{}{:?}", item.path.display(), item.options))
            .collect();
        if !seen.insert((stage.kind.clone(), data)) {
            continue;
        }
        if let Err(e) = (entry.preflight)(&stage.params, &inputs) {
            let at = stage.line.map_or(String::new(), |l| {
                format!(" ({}:{l})", stage.file.display())
            });
            problems.push(format!("stage `{}`{at}: {e:#}", stage.name));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(UsageError(format!(
        "{} stage(s) cannot run on their data; nothing was started:\n  {}",
        problems.len(),
        problems.join("\n  ")
    ))
    .into())
}
