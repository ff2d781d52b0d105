//! `pretext bench train`: one training step (forward, backward, AdamW) of a model on random data,
//! timed after a warm-up, with the process's peak RSS over the timed steps; and, in the same run,
//! the same model in PyTorch (`bench/train_twin.py`) when `import torch` works.
//!
//! `--json` prints one object per side:
//!
//! ```json
//! {"impl":"candle (cpu)","model":"mae","img":64,"patch":8,"dim":192,"depth":12,"heads":3,"batch":32,
//!  "threads":2,"steps":5,"step_ms_median":412.0,"steps_per_s":2.43,"forward_ms":120.1,
//!  "backward_ms":260.3,"optimizer_ms":31.6,"peak_rss_mib":510.2}
//! ```
//! and `{"impl":"pytorch (cpu)",...}` with the same fields (or `"error"` when the twin could not
//! run); the parenthesis names the device.

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
    /// Threads for both sides [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Where candle runs the step: cpu or cuda:N (needs a CUDA build). The PyTorch twin runs on
    /// the same device.
    #[arg(long, default_value = "cpu")]
    device: String,
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
    // candle's kernels and the gemm crate size their pools from this variable; nothing has
    // started a pool yet at this point.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let dev = crate::tasks::compute_device(&args.device)
        .map_err(|e| super::UsageError(format!("--device: {e:#}")))?;
    if let Some(tolerance) = args.compare_cpu {
        let worst = compare_with_cpu(&args, &dev, tolerance)?;
        if worst > tolerance {
            eprintln!("error: {} and the CPU disagree by {worst:.2e}", args.device);
            return Ok(ExitCode::from(1));
        }
    }
    let ours = measure(&args.shape, args.steps, threads, &dev, &args.device)?;
    let twin = if args.no_torch {
        None
    } else {
        Some(pytorch(&args, threads))
    };
    if args.json {
        println!("{}", serde_json::to_string(&ours)?);
        match &twin {
            Some(Ok(t)) => println!("{}", serde_json::to_string(t)?),
            Some(Err(e)) => println!(
                "{}",
                serde_json::json!({"impl": format!("pytorch ({})", args.device), "error": format!("{e:#}")})
            ),
            None => {}
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} img {} batch {} threads {}: forward + backward + AdamW, median of {} steps",
        describe(&args),
        args.shape.img,
        args.shape.batch,
        threads,
        args.steps
    );
    println!("| impl | ms/step | steps/s | forward / backward / optimizer (ms) | peak RSS (MiB) |");
    println!("|---|---|---|---|---|");
    let row = |m: &Measured| {
        println!(
            "| {} | {:.1} | {:.3} | {:.0} / {:.0} / {:.0} | {:.0} |",
            m.implementation,
            m.step_ms_median,
            m.steps_per_s,
            m.forward_ms,
            m.backward_ms,
            m.optimizer_ms,
            m.peak_rss_mib
        )
    };
    row(&ours);
    match twin {
        Some(Ok(t)) => {
            row(&t);
            println!(
                "candle / PyTorch speed: {:.2}x (above 1 is faster); peak RSS {:.2}x",
                ours.steps_per_s / t.steps_per_s,
                ours.peak_rss_mib / t.peak_rss_mib
            );
        }
        Some(Err(e)) => println!("PyTorch twin not run: {e:#}"),
        None => {}
    }
    Ok(ExitCode::SUCCESS)
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

/// Runs `bench/train_twin.py` with the same shape, threads and steps.
fn pytorch(a: &TrainArgs, threads: usize) -> Result<Measured> {
    let python = a
        .python
        .clone()
        .or_else(|| std::env::var_os("PRETEXT_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("python3"));
    let script = twin_script()?;
    let out = Command::new(&python)
        .arg(&script)
        .args([
            "--model",
            &a.shape.model,
            "--img",
            &a.shape.img.to_string(),
            "--patch",
            &a.shape.patch.to_string(),
            "--dim",
            &a.shape.dim.to_string(),
            "--depth",
            &a.shape.depth.to_string(),
            "--heads",
            &a.shape.heads.to_string(),
            "--decoder-dim",
            &a.shape.decoder_dim.to_string(),
            "--decoder-depth",
            &a.shape.decoder_depth.to_string(),
            "--decoder-heads",
            &a.shape.decoder_heads.to_string(),
            "--mask-ratio",
            &a.shape.mask_ratio.to_string(),
            "--batch",
            &a.shape.batch.to_string(),
            "--steps",
            &a.steps.to_string(),
            "--threads",
            &threads.to_string(),
            "--device",
            &a.device,
        ])
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("MKL_NUM_THREADS", threads.to_string())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").to_owned();
        bail!(
            "{} {} failed: {last} (set PRETEXT_PYTHON to a Python with torch)",
            python.display(),
            script.display()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("reading the twin's output `{line}`"))
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
