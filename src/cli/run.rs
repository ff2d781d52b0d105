use super::{keys_or_blocked, view, PipelineArgs, UsageError};
use crate::exec::cached::Local;
use crate::exec::cached::Outcome;
use crate::exec::events::{Event, EventSink};
use crate::exec::scheduler::{Status, WalkOptions};
use crate::exec::{run_plan, RunOptions};
use crate::tasks::Catalog;
use anyhow::Result;
use clap::Args;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Stages to run at once [default: number of CPUs].
    #[arg(long, short)]
    jobs: Option<usize>,
    /// Rerun these stages even if cached (repeatable; instance or template names).
    #[arg(long, value_name = "NAME")]
    force: Vec<String>,
    /// After a failure, go on with every stage that does not depend on it.
    #[arg(long)]
    keep_going: bool,
    /// Where stages run their models: cpu, cuda:N, or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// GPUs this machine may use at once; one token each, one GPU stage per token [default: 0].
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
    let (keys, blocked) = keys_or_blocked(&mut loaded);
    let mut force = vec![false; loaded.plan.stages.len()];
    for name in &args.force {
        let hits: Vec<usize> = (0..force.len())
            .filter(|&i| {
                loaded.plan.stages[i].name == *name || loaded.plan.stages[i].template == *name
            })
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
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let jobs = args.jobs.unwrap_or(cpus).max(1);
    let device = if args.device == "auto" {
        if args.gpus > 0 {
            "cuda:0".to_owned()
        } else {
            "cpu".to_owned()
        }
    } else {
        args.device.clone()
    };
    let local = Local {
        catalog,
        workdir: loaded.plan.root.clone(),
        scratch_dir: loaded.store.scratch_dir(),
        device,
        threads: (cpus / jobs).max(1),
        cancel: Arc::new(AtomicBool::new(false)),
    };
    let opts = RunOptions {
        walk: WalkOptions {
            jobs,
            gpus: args.gpus,
            cpus: cpus as u32,
            keep_going: args.keep_going,
        },
        force,
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
    let status = run_plan(
        &loaded.plan,
        &keys,
        &loaded.selected,
        &loaded.store,
        &local,
        &opts,
        sink,
    );
    // Where to look: the pages of report stages that exist now.
    for (i, stage) in loaded.plan.stages.iter().enumerate() {
        if loaded.selected[i] && stage.kind == "report" {
            if let Some(entry) = loaded.store.lookup(&stage.kind, &keys[i].key) {
                eprintln!(
                    "report ({}): {}",
                    stage.name,
                    entry.dir.join("index.html").display()
                );
            }
        }
    }
    let failed = !blocked.is_empty()
        || status
            .iter()
            .any(|s| matches!(s, Status::Done(Outcome::Failed { .. }) | Status::Skipped(_)));
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
