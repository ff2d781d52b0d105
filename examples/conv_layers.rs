//! Where a ResNet-18 step at 128 px spends its convolution time: forward, and backward (weight
//! and input gradients), of each distinct convolution shape at batch 32, timed on its own.
//!
//!     RAYON_NUM_THREADS=2 cargo run --release --example conv_layers [rounds]
//!     OMP_NUM_THREADS=2 python3 bench/conv_layers_twin.py [rounds]     # PyTorch, channels_last
//!
//! Run the two as separate processes, alternated. Each prints one row per shape, the median
//! over the rounds (one warm-up round discarded), and the totals weighted by how often
//! ResNet-18 has the shape. The backward is the convolution's own (its input and weight
//! gradients from a random output gradient), called directly, and so is PyTorch's
//! (`torch.autograd.grad`). The stem's includes its input gradient, which a network skips.
//! Set CONV=<prefix> to time only the shapes whose name starts with it (for a profiler), and
//! IMG=<px> for another input size than 128 (the planes scale with it).

use candle_core::{CustomOp2, Device, Result, Tensor, Var};
use pretext::nn::fused::Conv2d;
use std::time::Instant;

/// name, C, H, O, K, stride, padding, and how many ResNet-18 has.
type Shape = (
    &'static str,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

const SHAPES: [Shape; 10] = [
    ("stem 7x7 s2", 1, 128, 64, 7, 2, 3, 1),
    ("layer1 3x3", 64, 32, 64, 3, 1, 1, 4),
    ("layer2 3x3 s2", 64, 32, 128, 3, 2, 1, 1),
    ("layer2 3x3", 128, 16, 128, 3, 1, 1, 3),
    ("layer2 1x1 s2", 64, 32, 128, 1, 2, 0, 1),
    ("layer3 3x3 s2", 128, 16, 256, 3, 2, 1, 1),
    ("layer3 3x3", 256, 8, 256, 3, 1, 1, 3),
    ("layer4 3x3 s2", 256, 8, 512, 3, 2, 1, 1),
    ("layer4 3x3", 512, 4, 512, 3, 1, 1, 3),
    ("layer4 1x1 s2", 256, 8, 512, 1, 2, 0, 1),
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    // As `pretext` runs: freed blocks stay in the heap, so that large buffers are not unmapped
    // and faulted in again on every call (in a VM each unmap also costs a TLB shootdown across
    // the cores), and on small machines candle's elementwise pool is the calling thread alone.
    pretext::cli::keep_freed_memory();
    pretext::cli::quiet_elementwise_pool();
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let only = std::env::var("CONV").ok();
    let img: usize = std::env::var("IMG").map_or(128, |v| v.parse().expect("IMG: a size in px"));
    let dev = Device::Cpu;
    println!("| conv | count | fwd ms | bwd ms |");
    println!("|---|---|---|---|");
    let (mut total_f, mut total_b) = (0.0, 0.0);
    for (name, c, h, o, k, stride, padding, count) in SHAPES {
        let h = h * img / 128;
        if only.as_deref().is_some_and(|f| !name.starts_with(f)) {
            continue;
        }
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (32, c, h, h), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.05, (o, c, k, k), &dev)?)?;
        let side = (h + 2 * padding - k) / stride + 1;
        let up = Tensor::randn(0f32, 1.0, (32, o, side, side), &dev)?;
        let (mut f, mut b) = (vec![], vec![]);
        for _ in 0..=rounds {
            let t = Instant::now();
            let y = x
                .as_tensor()
                .apply_op2(w.as_tensor(), Conv2d { stride, padding })?;
            f.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let grads = Conv2d { stride, padding }.bwd(x.as_tensor(), w.as_tensor(), &y, &up)?;
            b.push(t.elapsed().as_secs_f64() * 1e3);
            drop(grads);
        }
        let (f, b) = (median(f[1..].to_vec()), median(b[1..].to_vec()));
        total_f += f * count as f64;
        total_b += b * count as f64;
        println!("| {name} | {count} | {f:.1} | {b:.1} |");
    }
    println!("| total (x count) | | {total_f:.0} | {total_b:.0} |");
    Ok(())
}
