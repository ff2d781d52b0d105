//! `pretext bench train`: training steps (forward, backward, AdamW) of a model on random data,
//! candle against the same model in PyTorch (`bench/train_twin.py`), measured so that neither
//! side is favoured:
//!
//! - each measurement is a fresh process of its own, started by this command, which itself
//!   loads no model, starts no thread pool and holds no memory while the sides run. (The twin
//!   used to run as a child of the process that had just measured candle, and ran about 1.4x
//!   slower there than on its own: BENCHMARKS.md has the probe.)
//! - the sides alternate, A B then B A, for `--pairs` pairs; each process discards a warm-up
//!   step and reports the median of its timed steps;
//! - the ratio is reported per pair, then as the median of the pairs with its range;
//! - the 1-minute load average at the start is reported, with a warning above 0.5.
//!
//! `--no-torch` measures candle once, in this process (what each candle side of the harness
//! runs). `--json` prints one object: `{"model":..,"machine":"AMD EPYC","load_at_start":0.1,
//! "pairs":[{"candle":{..},"pytorch":{..},"speed_ratio":1.02}],"speed_ratio_median":1.0,
//! "speed_ratio_min":0.9,"speed_ratio_max":1.1}`, where each side has the fields of
//!
//! ```json
//! {"impl":"candle (cpu)","model":"mae","img":64,"patch":8,"dim":192,"depth":12,"heads":3,"batch":32,
//!  "threads":2,"steps":5,"step_ms_median":412.0,"steps_per_s":2.43,"forward_ms":120.1,
//!  "backward_ms":260.3,"optimizer_ms":31.6,"peak_rss_mib":510.2}
//! ```
//! (`speed_ratio` is candle's steps per second over PyTorch's: above 1, candle is faster). With
//! `--no-torch --json`, the candle object alone.

use crate::nn::mae::{Mae, MaeConfig};
use crate::nn::ops::cross_entropy;
use crate::nn::params::ParamStore;
use crate::nn::tap::Taps;
use crate::rng::Rng;
use crate::tasks::fit::{optimizer, OptimSpec};
use crate::tasks::net::{Net, NetDesc};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

/// The model and batch a training step is measured on.
#[derive(Args, Clone)]
pub struct Shape {
    /// mae (ViT encoder + decoder), vit (classifier), resnet (ResNet-18) or densenet (DenseNet-121).
    #[arg(long, default_value = "mae", value_parser = ["mae", "vit", "resnet", "densenet"])]
    pub model: String,
    #[arg(long, default_value_t = 64)]
    pub img: usize,
    #[arg(long, default_value_t = 8)]
    pub patch: usize,
    /// ViT width (ViT-Tiny: 192).
    #[arg(long, default_value_t = 192)]
    pub dim: usize,
    #[arg(long, default_value_t = 12)]
    pub depth: usize,
    #[arg(long, default_value_t = 3)]
    pub heads: usize,
    /// MAE decoder width, depth and heads.
    #[arg(long, default_value_t = 128)]
    pub decoder_dim: usize,
    #[arg(long, default_value_t = 2)]
    pub decoder_depth: usize,
    #[arg(long, default_value_t = 4)]
    pub decoder_heads: usize,
    #[arg(long, default_value_t = 0.75)]
    pub mask_ratio: f64,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
}

#[derive(Args, Clone)]
pub struct TrainArgs {
    #[command(flatten)]
    shape: Shape,
    /// Timed steps (after one warm-up step); the median is reported.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Pairs of runs (one candle process, one PyTorch process each), alternated.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pairs: u32,
    /// Threads for both sides [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Where candle runs the step: cpu or cuda:N (needs a CUDA build). The PyTorch twin runs on
    /// the same device.
    #[arg(long, default_value = "cpu")]
    device: crate::stage::Device,
    /// Before timing, run one forward and backward on --device and on the CPU with the same
    /// weights and batch, and fail if the loss or any gradient differs by more than this
    /// fraction of the gradient's largest value (e.g. 1e-3).
    #[arg(long, value_name = "TOLERANCE")]
    compare_cpu: Option<f64>,
    /// Skip the PyTorch side.
    #[arg(long)]
    no_torch: bool,
    /// The Python that runs the twin [env: PRETEXT_PYTHON; default: python3].
    #[arg(long)]
    python: Option<PathBuf>,
    /// The rival's script [default: bench/train_twin.py]. It takes the shape flags and prints
    /// one JSON object with the fields above on its last line.
    #[arg(long)]
    twin: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub model: String,
    pub img: usize,
    pub patch: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub batch: usize,
    pub threads: usize,
    pub steps: usize,
    pub step_ms_median: f64,
    pub steps_per_s: f64,
    /// Medians of the three parts of a step.
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    pub peak_rss_mib: f64,
}

/// Milliseconds of one step's forward, backward and optimiser update.
type Split = [f64; 3];

fn ms_since(t: &mut Instant) -> f64 {
    let now = Instant::now();
    let ms = (now - *t).as_secs_f64() * 1e3;
    *t = now;
    ms
}

pub fn train(args: TrainArgs) -> Result<ExitCode> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if args.shape.batch == 0 || args.steps == 0 || threads == 0 {
        bail!("--batch, --steps and --threads must be at least 1");
    }
    if args.no_torch {
        return in_process(&args, threads);
    }
    let report = side_by_side(&args, threads)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table(&describe(&args)));
    }
    Ok(ExitCode::SUCCESS)
}

/// Candle measured in this process: one side of the harness.
fn in_process(args: &TrainArgs, threads: usize) -> Result<ExitCode> {
    // candle's kernels and the gemm crate size their pools from this variable; nothing has
    // started a pool yet at this point.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let dev = (args.device.open()).map_err(|e| super::UsageError(format!("--device: {e:#}")))?;
    if let Some(tolerance) = args.compare_cpu {
        let worst = compare_with_cpu(args, &dev, tolerance)?;
        if worst > tolerance {
            eprintln!("error: {} and the CPU disagree by {worst:.2e}", args.device);
            return Ok(ExitCode::from(1));
        }
    }
    let ours = measure(
        &args.shape,
        args.steps,
        threads,
        &dev,
        &args.device.to_string(),
    )?;
    if args.json {
        println!("{}", serde_json::to_string(&ours)?);
    } else {
        println!(
            "{} img {} batch {} threads {}: {:.1} ms/step ({:.0} / {:.0} / {:.0} ms forward / backward / optimizer), peak RSS {:.0} MiB",
            describe(args),
            args.shape.img,
            args.shape.batch,
            threads,
            ours.step_ms_median,
            ours.forward_ms,
            ours.backward_ms,
            ours.optimizer_ms,
            ours.peak_rss_mib
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One pair of the harness: each side measured in its own process.
#[derive(Debug, Serialize)]
struct Pair {
    /// Which side ran first in this pair.
    first: &'static str,
    candle: Measured,
    pytorch: Measured,
    /// candle steps/s over PyTorch's.
    speed_ratio: f64,
}

#[derive(Debug, Serialize)]
struct SideBySide {
    machine: String,
    load_at_start: Option<f64>,
    pairs: Vec<Pair>,
    speed_ratio_median: f64,
    speed_ratio_min: f64,
    speed_ratio_max: f64,
}

/// The load above which a side-by-side is not trusted without a second look.
const BUSY_LOAD: f64 = 0.5;

fn side_by_side(args: &TrainArgs, threads: usize) -> Result<SideBySide> {
    let load_at_start = load_average();
    if let Some(load) = load_at_start.filter(|&l| l > BUSY_LOAD) {
        eprintln!("warning: the 1-minute load average is {load:.2}: other work competes with both sides, and their times say less");
    }
    let mut pairs = Vec::new();
    for k in 0..args.pairs {
        let candle_first = k % 2 == 0;
        let (candle, pytorch) = if candle_first {
            let c = candle_process(args, threads)?;
            (c, pytorch(args, threads)?)
        } else {
            let t = pytorch(args, threads)?;
            (candle_process(args, threads)?, t)
        };
        eprintln!(
            "pair {}: candle {:.1} ms, PyTorch {:.1} ms per step",
            k + 1,
            candle.step_ms_median,
            pytorch.step_ms_median
        );
        pairs.push(Pair {
            first: if candle_first { "candle" } else { "pytorch" },
            speed_ratio: candle.steps_per_s / pytorch.steps_per_s,
            candle,
            pytorch,
        });
    }
    let ratios: Vec<f64> = pairs.iter().map(|p| p.speed_ratio).collect();
    Ok(SideBySide {
        machine: cpu_model(),
        load_at_start,
        speed_ratio_median: median(ratios.iter().copied()),
        speed_ratio_min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
        speed_ratio_max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        pairs,
    })
}

impl SideBySide {
    fn table(&self, what: &str) -> String {
        let mut out = format!(
            "{what}: forward + backward + AdamW, each side in its own process, {} pairs alternated\n",
            self.pairs.len()
        );
        out.push_str(&format!(
            "machine: {}, load average at start {}\n",
            self.machine,
            self.load_at_start
                .map_or("unknown".into(), |l| format!("{l:.2}"))
        ));
        out.push_str("| pair | first | candle ms/step | PyTorch ms/step | candle / PyTorch speed | peak RSS candle / PyTorch (MiB) |\n|---|---|---|---|---|---|\n");
        for (k, p) in self.pairs.iter().enumerate() {
            out.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} | {:.2}x | {:.0} / {:.0} |\n",
                k + 1,
                p.first,
                p.candle.step_ms_median,
                p.pytorch.step_ms_median,
                p.speed_ratio,
                p.candle.peak_rss_mib,
                p.pytorch.peak_rss_mib
            ));
        }
        out.push_str(&format!(
            "candle / PyTorch speed: {:.2}x, median of {} pairs (range {:.2}-{:.2}x; above 1 is faster)\n",
            self.speed_ratio_median,
            self.pairs.len(),
            self.speed_ratio_min,
            self.speed_ratio_max
        ));
        out
    }
}

/// The 1-minute load average (Linux).
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The shape flags both sides take.
fn shape_args(a: &TrainArgs, threads: usize) -> Vec<String> {
    let s = &a.shape;
    [
        ("--model", s.model.clone()),
        ("--img", s.img.to_string()),
        ("--patch", s.patch.to_string()),
        ("--dim", s.dim.to_string()),
        ("--depth", s.depth.to_string()),
        ("--heads", s.heads.to_string()),
        ("--decoder-dim", s.decoder_dim.to_string()),
        ("--decoder-depth", s.decoder_depth.to_string()),
        ("--decoder-heads", s.decoder_heads.to_string()),
        ("--mask-ratio", s.mask_ratio.to_string()),
        ("--batch", s.batch.to_string()),
        ("--steps", a.steps.to_string()),
        ("--threads", threads.to_string()),
        ("--device", a.device.to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_owned(), v])
    .collect()
}

/// A side's process: a clean environment for thread counts (this process set none), its
/// last stdout line read as the measurement.
fn run_side(mut cmd: Command, what: &str) -> Result<Measured> {
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        cmd.env_remove(var);
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("{what} failed: {}", err.lines().last().unwrap_or("").trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("reading {what}'s output `{line}`"))
}

/// Candle in a fresh `pretext bench train --no-torch --json` process.
fn candle_process(a: &TrainArgs, threads: usize) -> Result<Measured> {
    let mut cmd = Command::new(std::env::current_exe().context("finding this binary")?);
    cmd.args(["bench", "train", "--no-torch", "--json"])
        .args(shape_args(a, threads));
    run_side(cmd, "the candle side")
}

fn describe(a: &TrainArgs) -> String {
    match a.shape.model.as_str() {
        "mae" => format!(
            "MAE ViT {}/{}/{} (decoder {}/{}/{}), patch {}, mask {}",
            a.shape.dim,
            a.shape.depth,
            a.shape.heads,
            a.shape.decoder_dim,
            a.shape.decoder_depth,
            a.shape.decoder_heads,
            a.shape.patch,
            a.shape.mask_ratio
        ),
        "vit" => format!(
            "ViT {}/{}/{}, patch {}",
            a.shape.dim, a.shape.depth, a.shape.heads, a.shape.patch
        ),
        "resnet" => "ResNet-18 (train-mode BatchNorm)".into(),
        _ => "DenseNet-121 (train-mode BatchNorm)".into(),
    }
}

/// The loss of one fixed batch, drawing masks or DropPath from the given stream.
type LossFn = Box<dyn Fn(&mut Rng) -> Result<Tensor>>;

/// A model ready to train on one fixed batch.
struct Bench {
    params: ParamStore,
    forward: LossFn,
}

/// A loss and each parameter's gradient, by name, on the host.
type Gradients = (f32, Vec<(String, Vec<f32>)>);

/// The model of `a` on `dev`, with parameters drawn from seed 0 and the batch `x` (made on the
/// CPU, so that two devices see the same numbers).
fn build(a: &Shape, x: &Tensor, dev: &Device) -> Result<Bench> {
    let x = x.to_device(dev)?;
    let y = Tensor::new(
        (0..a.batch as u32)
            .map(|i| i % 4)
            .collect::<Vec<_>>()
            .as_slice(),
        dev,
    )?;
    if a.model == "mae" {
        if !a.img.is_multiple_of(a.patch) {
            bail!("--img {} is not a multiple of --patch {}", a.img, a.patch);
        }
        let cfg = MaeConfig {
            img_size: a.img,
            patch_size: a.patch,
            in_chans: 1,
            embed_dim: a.dim,
            depth: a.depth,
            num_heads: a.heads,
            decoder_embed_dim: a.decoder_dim,
            decoder_depth: a.decoder_depth,
            decoder_num_heads: a.decoder_heads,
            mlp_ratio: 4.0,
            norm_pix_loss: true,
        };
        let params = ParamStore::seeded(0);
        let mae = Mae::new(&cfg, params.var_builder(dev)).context("building the MAE")?;
        let l = cfg.num_patches() * a.batch;
        let ratio = a.mask_ratio;
        return Ok(Bench {
            params,
            forward: Box::new(move |rng| {
                let noise: Vec<f32> = (0..l).map(|_| rng.f64() as f32).collect();
                Ok(mae.forward(&x, &noise, ratio)?.loss)
            }),
        });
    }
    let desc = NetDesc {
        arch: match a.model.as_str() {
            "resnet" => "resnet18".into(),
            "densenet" => "densenet121".into(),
            // `vit`, or a model name as stages write it (`resnet50`, `vit_small`).
            other => other.to_owned(),
        },
        img_size: a.img,
        patch: a.patch,
        vit_dims: Some([a.dim, a.depth, a.heads]),
        densenet_dims: None,
        drop_path: 0.0,
        num_classes: 4,
        weight_init: Default::default(),
    };
    let net = Net::build(&desc, 0, dev)?;
    let params = net.params.clone();
    Ok(Bench {
        params,
        forward: Box::new(move |rng| {
            Ok(cross_entropy(
                &net.logits(&x, Some(rng), &mut Taps::none())?,
                &y,
                0.0,
            )?)
        }),
    })
}

/// `steps` timed training steps of `a` on `dev` (labelled `device` in the result).
pub fn measure(
    a: &Shape,
    steps: usize,
    threads: usize,
    dev: &Device,
    device: &str,
) -> Result<Measured> {
    let x = Tensor::randn(0f32, 1.0, (a.batch, 1, a.img, a.img), &Device::Cpu)?;
    let bench = build(a, &x, dev)?;
    let mut opt = optimizer(
        &bench.params,
        &OptimSpec {
            weight_decay: 0.05,
            betas: (0.9, 0.95),
            layer_decay: None,
            only: None,
            lars: false,
        },
    );
    let mut rng = Rng::new(0);
    let mut step = |rng: &mut Rng| -> Result<Split> {
        let mut t = Instant::now();
        let loss = (bench.forward)(rng)?;
        let fwd = ms_since(&mut t);
        let grads = loss.backward()?;
        let bwd = ms_since(&mut t);
        opt.step(&grads, 1e-4)?;
        dev.synchronize()?;
        Ok([fwd, bwd, ms_since(&mut t)])
    };
    step(&mut rng)?; // warm-up: first allocations, lazily built pools and kernels
    reset_peak_rss();
    let times: Vec<Split> = (0..steps).map(|_| step(&mut rng)).collect::<Result<_>>()?;
    let peak = peak_rss_mib();
    Ok(Measured {
        implementation: format!("candle ({device})"),
        model: a.model.clone(),
        img: a.img,
        patch: a.patch,
        dim: a.dim,
        depth: a.depth,
        heads: a.heads,
        batch: a.batch,
        threads,
        steps,
        step_ms_median: median(times.iter().map(|t| t.iter().sum())),
        steps_per_s: 1e3 / median(times.iter().map(|t| t.iter().sum())),
        forward_ms: median(times.iter().map(|t| t[0])),
        backward_ms: median(times.iter().map(|t| t[1])),
        optimizer_ms: median(times.iter().map(|t| t[2])),
        peak_rss_mib: peak,
    })
}

/// One forward and backward of the same model, weights and batch on `dev` and on the CPU: the
/// largest difference of the loss and of every parameter's gradient, relative to the gradient's
/// largest magnitude. Prints one line per parameter over `tolerance`; returns the worst.
fn compare_with_cpu(a: &TrainArgs, dev: &Device, tolerance: f64) -> Result<f64> {
    let x = Tensor::randn(
        0f32,
        1.0,
        (a.shape.batch, 1, a.shape.img, a.shape.img),
        &Device::Cpu,
    )?;
    let run = |d: &Device| -> Result<Gradients> {
        let bench = build(&a.shape, &x, d)?;
        let loss = (bench.forward)(&mut Rng::new(7))?;
        let grads = loss.backward()?;
        let mut out = Vec::new();
        for (name, var) in bench.params.named() {
            if let Some(g) = grads.get(var.as_tensor()) {
                out.push((name, g.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?));
            }
        }
        Ok((loss.to_device(&Device::Cpu)?.to_scalar()?, out))
    };
    let (dev_loss, dev_grads) = run(dev)?;
    let (cpu_loss, cpu_grads) = run(&Device::Cpu)?;
    let mut worst = ((dev_loss - cpu_loss).abs() / cpu_loss.abs().max(1e-6)) as f64;
    println!(
        "loss: {} {dev_loss:.6} vs cpu {cpu_loss:.6} (relative difference {worst:.2e})",
        a.device
    );
    if dev_grads.len() != cpu_grads.len() {
        bail!(
            "{} parameters got a gradient on {} but {} on the CPU",
            dev_grads.len(),
            a.device,
            cpu_grads.len()
        );
    }
    for ((name, g), (_, c)) in dev_grads.iter().zip(&cpu_grads) {
        let scale = c.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let diff = g.iter().zip(c).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale;
        if diff as f64 > tolerance {
            println!("  {name}: gradient differs by {diff:.2e} of its largest value");
        }
        worst = worst.max(diff as f64);
    }
    println!(
        "{} parameters compared; worst relative difference {worst:.2e} (tolerance {tolerance:.0e})",
        cpu_grads.len()
    );
    Ok(worst)
}

fn median(v: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Resets VmHWM so the peak covers the timed steps only (Linux: `5` into clear_refs).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The PyTorch twin in a fresh process, with the same shape, threads and steps.
fn pytorch(a: &TrainArgs, threads: usize) -> Result<Measured> {
    let python = a
        .python
        .clone()
        .or_else(|| std::env::var_os("PRETEXT_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("python3"));
    let script = match &a.twin {
        Some(t) => t.clone(),
        None => twin_script()?,
    };
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .args(shape_args(a, threads))
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("MKL_NUM_THREADS", threads.to_string());
    run_side(cmd, &format!("{} {}", python.display(), script.display())).map_err(|e| {
        e.context(
            "the PyTorch side (set PRETEXT_PYTHON to a Python with torch, or pass --no-torch)",
        )
    })
}

/// The twin lives in the repository's bench folder; found beside the working directory or the
/// source tree this binary was built from.
fn twin_script() -> Result<PathBuf> {
    let rel = PathBuf::from("bench/train_twin.py");
    [
        rel.clone(),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(&rel),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .with_context(|| "bench/train_twin.py not found: run from the pretext repository")
}
