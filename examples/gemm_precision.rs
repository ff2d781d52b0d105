//! What would bf16 or f16 storage give pretext's GEMMs on this CPU, with the kernels the stack
//! has? Times candle's matmul in f32, f16 and bf16 on the GEMM shapes of a ResNet-18 step at
//! 128 px, batch 32 (one per stage: out-channels x C*K*K, times C*K*K x the batch's positions),
//! the dtypes alternated within each round so a busy machine slows all three alike.
//!
//!     RAYON_NUM_THREADS=2 cargo run --release --example gemm_precision [rounds]
//!
//! Prints one row per shape and dtype: the median over the rounds, and the speed against f32.

use candle_core::{DType, Device, Result, Tensor};
use std::time::Instant;

/// (name, M, K, N): a 3x3 convolution of one ResNet-18 stage as its GEMM.
const SHAPES: [(&str, usize, usize, usize); 4] = [
    ("layer1 64x576 . 576x32768", 64, 576, 32 * 32 * 32),
    ("layer2 128x1152 . 1152x8192", 128, 1152, 32 * 16 * 16),
    ("layer3 256x2304 . 2304x2048", 256, 2304, 32 * 8 * 8),
    ("layer4 512x4608 . 4608x512", 512, 4608, 32 * 4 * 4),
];

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn time_matmul(a: &Tensor, b: &Tensor) -> Result<f64> {
    let start = Instant::now();
    let c = a.matmul(b)?;
    // Touch the result so the product cannot be skipped.
    let _ = c.dims();
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let dev = Device::Cpu;
    println!("| GEMM (M x K . K x N) | dtype | median ms ({rounds} rounds) | speed vs f32 |");
    println!("|---|---|---|---|");
    for (name, m, k, n) in SHAPES {
        let a32 = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let b32 = Tensor::randn(0f32, 1.0, (k, n), &dev)?;
        let pairs: Vec<(Tensor, Tensor)> = DTYPES
            .iter()
            .map(|&dt| Ok((a32.to_dtype(dt)?, b32.to_dtype(dt)?)))
            .collect::<Result<_>>()?;
        for (a, b) in &pairs {
            time_matmul(a, b)?; // warm-up: page faults and gemm's packing buffers
        }
        let mut times = vec![Vec::new(); DTYPES.len()];
        for _ in 0..rounds {
            for (i, (a, b)) in pairs.iter().enumerate() {
                times[i].push(time_matmul(a, b)?);
            }
        }
        let medians: Vec<f64> = times.into_iter().map(median).collect();
        for (dt, ms) in DTYPES.iter().zip(&medians) {
            println!("| {name} | {dt:?} | {ms:.1} | {:.2}x |", medians[0] / ms);
        }
    }
    Ok(())
}
