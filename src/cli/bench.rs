//! `pretext bench loader`: how fast the data layer feeds training, measured beside the training
//! step it feeds, in the same run. `pretext bench train` is in `bench_train.rs`.

use super::bench_train::{measure, Shape};
use crate::data::decode::{decode_all, OnBadImage};
use crate::data::loader::{self, Normalize, TrainAug};
use crate::data::source;
use anyhow::Result;
use candle_core::Device;
use clap::{Args, Subcommand};
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Images/s of the loader (decoded cache -> RandomResizedCrop + flip + RandAugment(2, 6) ->
    /// batches) beside images/s of a training step of the given model, in one run.
    Loader {
        /// A data folder (labels.csv or class folders).
        #[arg(long, default_value = "data/chest-pneumonia224")]
        data: PathBuf,
        /// Image sizes to measure (repeatable).
        #[arg(long = "img", default_values_t = vec![64, 128, 224])]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Batches per measurement.
        #[arg(long, default_value_t = 20)]
        batches: usize,
        /// The model whose training step is timed beside the loader (`vit` is 96/4/3).
        #[arg(long, default_value = "vit")]
        model: String,
        #[arg(long)]
        json: bool,
    },
    /// Steps/s and peak memory of one training step (forward, backward, AdamW) of a model on
    /// random data, beside the same model in PyTorch (bench/train_twin.py) when torch imports.
    ///
    /// Example: pretext bench train --model mae --img 64 --patch 8 --threads 2
    Train(super::bench_train::TrainArgs),
}

/// One row of `pretext bench loader --json`: `{"img":64,"loader_img_per_s":..,"train_img_per_s":..}`.
#[derive(Serialize)]
struct Row {
    img: usize,
    loader_img_per_s: f64,
    train_img_per_s: f64,
}

pub fn bench(args: BenchArgs) -> Result<ExitCode> {
    let (data, sizes, batch, batches, model, json) = match args.command {
        BenchCommand::Train(a) => return super::bench_train::train(a),
        BenchCommand::Loader {
            data,
            sizes,
            batch,
            batches,
            model,
            json,
        } => (data, sizes, batch, batches, model, json),
    };
    let ds = source::open(&data, None)?;
    let paths: Vec<PathBuf> = ds.samples.iter().map(|s| s.path.clone()).collect();
    let origins: Vec<String> = ds.samples.iter().map(|s| s.origin.clone()).collect();
    let scratch = std::env::temp_dir().join("pretext-bench-decoded");
    let mut rows = Vec::new();
    for &size in &sizes {
        // The decoded cache is built once (not timed): epochs read it, they never decode JPEGs.
        let decoded = Arc::new(decode_all(
            &paths,
            &origins,
            size,
            None,
            Some(&scratch),
            OnBadImage::Skip,
        )?);
        let all: Vec<usize> = (0..decoded.len()).collect();
        let (mean, std) = decoded.stats(&all);
        let norm = Normalize { mean, std };
        let aug = TrainAug {
            crop_scale: (0.5, 1.0),
            center_bias: 0.0,
            hflip: true,
            quarter_turns: false,
            randaug: Some((2, 6.0)),
        };
        let n = (batch * batches).min(decoded.len());
        let d = decoded.clone();
        let start = Instant::now();
        let rx = loader::epoch(
            n,
            batch,
            loader::Order::Shuffled { seed: 0, epoch: 0 },
            loader::LastBatch::Keep,
            size,
            move |i, rng| vec![(norm.apply(loader::view(&d, i, size, Some(&aug), rng)), 0)],
        );
        let got: usize = rx.map(|b| b.n).sum();
        let loader_rate = got as f64 / start.elapsed().as_secs_f64();

        let patch = if size % 16 == 0 && size >= 128 { 16 } else { 8 };
        let shape = Shape {
            model: model.clone(),
            img: size,
            patch,
            dim: 96,
            depth: 4,
            heads: 3,
            decoder_dim: 128,
            decoder_depth: 2,
            decoder_heads: 4,
            mask_ratio: 0.75,
            batch,
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let step = measure(&shape, 3, threads, &Device::Cpu, "cpu")?;
        let train_rate = step.steps_per_s * batch as f64;
        rows.push(Row {
            img: size,
            loader_img_per_s: loader_rate,
            train_img_per_s: train_rate,
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("| img | loader (img/s, 2 ops RandAugment m6) | training step of `{model}` (img/s) | loader / training |");
        println!("|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {:.0} | {:.0} | {:.1}x |",
                r.img,
                r.loader_img_per_s,
                r.train_img_per_s,
                r.loader_img_per_s / r.train_img_per_s
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
