//! The `pretext` command line: clap definitions, one function per command, exit codes.
//!
//! Exit codes: 0 success, 1 a stage failed (or another runtime error), 2 a bad pipeline file or
//! bad flags.

mod bench;
mod bench_train;
mod dag;
mod data;
mod gc;
mod interrupt;
mod kinds;
mod results;
mod run;
mod show;
mod status;
mod view;

use crate::cache::Store;
use crate::exec::keys::{stage_keys, Keyed};
use crate::pipeline::{load_plan, LoadOptions, Plan};
use crate::stage::Catalog;
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const ABOUT: &str = "Content-addressed pipelines for self-supervised learning on radiographs.

A pipeline is a YAML file of stages (MAE pretraining, proxy tasks, fine-tuning, evaluation,
Grad-CAM, reports, or any shell command). pretext keys every stage by a blake3 hash of its kind,
version, params and inputs, reuses cached results, and reruns only what changed.";

const EXAMPLES: &str = "Examples:
  pretext run pipelines/chest_mae_proxy_shoulder.yaml        run what is stale, reuse the rest
  pretext status pipelines/chest_mae_proxy_shoulder.yaml     what would run, and why
  pretext run pipelines/matrix.yaml --jobs 2 --keep-going    the whole experiment matrix
  pretext run PIPELINE --stage finetune --force finetune     rerun one stage (and what it needs)
  pretext run PIPELINE --set epochs=3 --profile full         override vars, pick a profile
  pretext dag PIPELINE --format mermaid                      the stage graph
  pretext show finetune --pipeline PIPELINE                  params, lineage, metrics, files
  pretext kinds                                              stage kinds, their inputs and outputs
  pretext data inspect data/shoulder-implant                 counts, sizes, bit depths, bad files

Exit codes: 0 ok, 1 a stage failed, 2 bad pipeline file or flags.
Environment: PRETEXT_CACHE sets the cache folder (default: cache/ in the project root).";

#[derive(Parser)]
#[command(name = "pretext", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("PRETEXT_COMMIT"), ")"), about = ABOUT, after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the stale stages of a pipeline, in dependency order, reusing cached ones.
    Run(run::RunArgs),
    /// Show each stage as cached, stale (and why) or blocked, without running anything.
    Status(status::StatusArgs),
    /// Print the stage graph as text, Mermaid or Graphviz dot.
    Dag(dag::DagArgs),
    /// Show one stage or cache entry: params, upstream lineage, metrics, files.
    Show(show::ShowArgs),
    /// Remove cache entries that no pipeline under pipelines/ reaches.
    Gc(gc::GcArgs),
    /// Re-hash every cache entry and report the ones whose files changed.
    Verify(gc::VerifyArgs),
    /// Every evaluation in the cache as one table: route, params that differ, test metrics
    /// with confidence intervals, date, wall time, command; grouped by seed or diffed.
    Results(results::ResultsArgs),
    /// The stage kinds; with a KIND, its inputs, outputs and every param (type, default, meaning).
    Kinds(kinds::KindsArgs),
    /// Print a JSON Schema of pipeline files (for editor completion and checking).
    Schema(kinds::SchemaArgs),
    /// Look at data folders before training on them.
    Data(data::DataArgs),
    /// Measure training steps (beside PyTorch) and the data loader.
    Bench(bench::BenchArgs),
    /// Run one stage frozen into a job file (what a Slurm job of `run --executor slurm` runs).
    #[command(hide = true)]
    ExecJob(ExecJobArgs),
    /// Run a command stage's shell command in its own process group, and stop the group when
    /// pretext is interrupted or dies (see src/tasks/command.rs).
    #[command(hide = true, name = "command-guard")]
    Guard(CommandGuardArgs),
}

#[derive(Args)]
struct CommandGuardArgs {
    /// The pretext process the command belongs to.
    #[arg(long)]
    parent: i32,
    /// A descriptor to keep open until the command's process group is gone (the stage's lock).
    #[arg(long)]
    hold_fd: Option<i32>,
    /// The command text, run by `sh -c`.
    #[arg(last = true)]
    run: std::ffi::OsString,
}

#[derive(Args)]
struct ExecJobArgs {
    /// The stage job file (JSON, see src/exec/stage_job.rs).
    file: PathBuf,
}

/// Prints the stage's events as JSON lines for the submitting run to read back; exit 0 when the
/// stage's entry exists afterwards.
fn exec_job(args: ExecJobArgs, catalog: &Catalog) -> Result<ExitCode> {
    // Slurm pre-empts and times out a job with SIGTERM: the stage stops at a step, keeps its
    // checkpoint, and the resubmitted job resumes.
    let interrupt = interrupt::Interrupt::install("stopping the stage; its checkpoint is kept");
    let job = crate::exec::stage_job::StageJob::read(&args.file)?;
    let threads = std::env::var("SLURM_CPUS_PER_TASK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let outcome = job.run(catalog, threads, interrupt.flag.clone(), &view::JsonLines)?;
    crate::exec::announce(&job.stage, &job.keyed, &outcome, &view::JsonLines);
    if let Some(code) = interrupt.exit_code() {
        return Ok(ExitCode::from(code));
    }
    Ok(match outcome {
        crate::exec::cached::Outcome::Failed { .. } => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    })
}

/// Flags shared by every command that reads a pipeline.
#[derive(Args, Clone)]
pub struct PipelineArgs {
    /// The pipeline file (YAML), e.g. pipelines/chest_mae_proxy_shoulder.yaml.
    pub file: PathBuf,
    /// Cache folder [env: PRETEXT_CACHE; default: cache/ beside pipelines/].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Apply the var overrides of a profile declared under `profiles:` (e.g. `full`).
    #[arg(long)]
    pub profile: Option<String>,
    /// Override a var or pin a matrix axis: --set epochs=3 --set seed=1 --set seed=[0,1] (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_set)]
    pub set: Vec<(String, serde_json::Value)>,
    /// Only these stages (instance or template names) and what they need (repeatable).
    #[arg(long = "stage", value_name = "NAME")]
    pub stages: Vec<String>,
}

/// A usage mistake found after parsing (unknown stage name, say): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn parse_set(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got `{s}`"))?;
    let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_owned()));
    Ok((k.trim().to_owned(), value))
}

/// A loaded pipeline with its cache and selection.
pub struct Loaded {
    pub plan: Plan,
    pub store: Store,
    pub selected: Vec<bool>,
}

impl PipelineArgs {
    /// How this pipeline was asked for, as the journal records it.
    pub fn invocation(&self) -> crate::cache::journal::Invocation {
        crate::cache::journal::Invocation {
            argv: std::env::args().collect(),
            profile: self.profile.clone(),
            set: self.set.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        }
    }

    pub fn load(&self, catalog: &Catalog) -> Result<Loaded> {
        let opts = LoadOptions {
            profile: self.profile.clone(),
            set: self.set.clone(),
        };
        let plan = load_plan(&self.file, catalog, &opts)?;
        let selected = plan.select(&self.stages).map_err(UsageError)?;
        warn_of(&plan, &selected);
        let store = open_store(self.cache.as_deref(), &plan.root)?;
        Ok(Loaded {
            plan,
            store,
            selected,
        })
    }
}

/// The kinds' plan-time warnings, once per stage template (not per matrix instance).
fn warn_of(plan: &crate::pipeline::Plan, selected: &[bool]) {
    let mut said = std::collections::HashSet::new();
    for (stage, _) in plan.stages.iter().zip(selected).filter(|(_, &s)| s) {
        for w in &stage.warnings {
            if said.insert((stage.template.clone(), w.clone())) {
                let at = match stage.line {
                    Some(l) => format!("{}:{l}", stage.file.display()),
                    None => stage.file.display().to_string(),
                };
                eprintln!("warning: {at}: stage `{}`: {w}", stage.template);
            }
        }
    }
}

pub fn open_store(flag: Option<&Path>, project_root: &Path) -> Result<Store> {
    let dir = flag
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("PRETEXT_CACHE").map(PathBuf::from))
        .unwrap_or_else(|| crate::exec::default_cache_dir(project_root));
    Store::open(&dir).with_context(|| format!("opening the cache at {}", dir.display()))
}

/// Keys of the selected stages. A stage whose key cannot be computed (a data input is missing)
/// is deselected with everything downstream of it, and returned with the reason so the run can
/// report it and go on with the rest.
pub fn keys_or_blocked(loaded: &mut Loaded) -> (Vec<Keyed>, Vec<(String, String)>) {
    let keys = stage_keys(&loaded.plan, &loaded.store, &loaded.selected);
    let mut out = Vec::with_capacity(keys.len());
    let mut blocked = Vec::new();
    for (i, k) in keys.into_iter().enumerate() {
        match k {
            Ok(k) => out.push(k),
            Err(reason) => {
                if loaded.selected[i] {
                    let s = &loaded.plan.stages[i];
                    blocked.push((
                        s.name.clone(),
                        format!(
                            "blocked: {reason} ({}:{})",
                            s.file.display(),
                            s.line.unwrap_or(0)
                        ),
                    ));
                    loaded.selected[i] = false;
                }
                // Never run: a placeholder keeps indices aligned.
                out.push(Keyed {
                    key: crate::cache::StageKey::of(b""),
                    input: placeholder_input(),
                });
            }
        }
    }
    (out, blocked)
}

fn placeholder_input() -> crate::cache::KeyInput {
    crate::cache::KeyInput {
        key_schema: 0,
        kind: String::new(),
        version: 0,
        params: serde_json::Value::Null,
        inputs: Default::default(),
    }
}

pub fn main() -> ExitCode {
    // Piped into `head`, stop quietly as Unix tools do instead of panicking in `println!`.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    keep_freed_memory();
    quiet_elementwise_pool();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let catalog = crate::tasks::catalog();
    let result = match cli.command {
        Command::Run(a) => run::run(a, &catalog),
        Command::Status(a) => status::status(a, &catalog),
        Command::Dag(a) => dag::dag(a, &catalog),
        Command::Show(a) => show::show(a, &catalog),
        Command::Gc(a) => gc::gc(a, &catalog),
        Command::Verify(a) => gc::verify(a),
        Command::Data(a) => data::data(a),
        Command::Bench(a) => bench::bench(a),
        Command::ExecJob(a) => exec_job(a, &catalog),
        Command::Guard(a) => crate::tasks::command::guard(a.parent, a.hold_fd, &a.run)
            .map(|code| ExitCode::from(code.clamp(0, 255) as u8)),
        Command::Results(a) => results::results(a),
        Command::Kinds(a) => kinds::kinds(a, &catalog),
        Command::Schema(a) => kinds::schema(a, &catalog),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(spec) = e.downcast_ref::<crate::pipeline::SpecError>() {
                eprintln!("{spec}");
                return ExitCode::from(2);
            }
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            ExitCode::from(if e.downcast_ref::<UsageError>().is_some() {
                2
            } else {
                1
            })
        }
    }
}

/// A training step allocates and frees tensors of megabytes by the hundred. glibc hands blocks
/// it mapped with mmap back to the kernel on free, so every step page-faults them in again and
/// the kernel zeroes each page: 24% of a ViT-Tiny step at 224 px, measured with perf. So blocks
/// stay in the heap: mmap is off (`M_MMAP_MAX` 0) and the trim threshold keeps freed memory.
/// Raising the mmap threshold instead is not enough: glibc caps it at 32 MiB, and ResNet's
/// stem activations at 128 px are 33.5 MiB; mapped afresh each time, they cost 190,000 page
/// faults per 8 steps and 5.6% of the step (median of 8 alternated pairs). Peak RSS is
/// unchanged. Freed memory then stays with the process: glibc trims only a free heap top above
/// the 1 GiB threshold. Call it before any thread starts (the CLI's `main` does; benchmarks
/// outside it, such as `examples/conv_layers.rs`, too).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator (glibc serialises it with its own locks).
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// candle runs large elementwise ops on its own pool, beside rayon's, and each of its workers
/// spins for up to 25,000 iterations after every op: on 2 cores that worker took 20-25% of the
/// CPU samples of an MAE-64 step away from the GEMM threads. Without workers (one thread: the
/// caller) an MAE-64 step was 10-20% faster and a ViT-224 step no slower in three paired runs
/// (BENCHMARKS.md). Only on small machines, where the pools contend for the same cores, and only
/// when the user has not chosen. Call it before any thread starts (the CLI's `main` does;
/// benchmarks outside it, such as `examples/conv_layers.rs`, too).
pub fn quiet_elementwise_pool() {
    let small = std::thread::available_parallelism().is_ok_and(|n| n.get() <= 4);
    if small && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
