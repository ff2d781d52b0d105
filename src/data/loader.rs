//! Batches assembled in parallel (rayon) and prefetched on a producer thread, so the training
//! step never waits for pixels. What a sample becomes is a function of (item, seeded stream):
//! a classification view, four rotations of one image, a jigsaw permutation, two contrastive
//! views; the loader does not care.

use super::augment::{hflip, rand_augment, random_resized_crop, resize, rotate90, Grey};
use super::decode::{shuffled, Decoded};
use crate::rng::Rng;
use rayon::prelude::*;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// A batch: `x` is [n, 1, size, size] in row-major order, normalised.
#[derive(Debug, Clone)]
pub struct Batch {
    pub x: Vec<f32>,
    pub y: Vec<u32>,
    /// The item each sample came from.
    pub items: Vec<usize>,
    pub n: usize,
    pub size: usize,
}

/// One sample: pixels of a `size` x `size` image and its target.
pub type Sample = (Vec<f32>, u32);

/// Training-time augmentation for classification and MAE.
#[derive(Debug, Clone, Copy)]
pub struct TrainAug {
    pub crop_scale: (f64, f64),
    pub center_bias: f64,
    pub hflip: bool,
    /// Rotate by 0, 90, 180 or 270 degrees, uniformly: for images whose label does not depend
    /// on which way up the film was taken.
    pub quarter_turns: bool,
    /// (number of ops, magnitude 0-10).
    pub randaug: Option<(usize, f64)>,
}

/// Pixel normalisation with per-dataset statistics.
#[derive(Debug, Clone, Copy)]
pub struct Normalize {
    pub mean: f32,
    pub std: f32,
}

impl Normalize {
    pub fn apply(&self, g: Grey) -> Vec<f32> {
        g.px.into_iter()
            .map(|v| (v - self.mean) / self.std)
            .collect()
    }
}

/// The image `pos` of `decoded`, augmented (training) or only resized (evaluation).
pub fn view(
    decoded: &Decoded,
    pos: usize,
    size: usize,
    aug: Option<&TrainAug>,
    rng: &mut Rng,
) -> Grey {
    let img = Grey::from_u8(decoded.image(pos), decoded.size);
    match aug {
        None => resize(&img, size),
        Some(a) => augmented(&img, size, a, rng),
    }
}

/// One training view of `img` at `size`: crop, flip, quarter turn, RandAugment, as `a` asks.
pub fn augmented(img: &Grey, size: usize, a: &TrainAug, rng: &mut Rng) -> Grey {
    let mut g = random_resized_crop(img, size, a.crop_scale, a.center_bias, rng);
    if a.hflip && rng.f64() < 0.5 {
        g = hflip(&g);
    }
    if a.quarter_turns {
        g = rotate90(&g, rng.below(4));
    }
    if let Some((n, m)) = a.randaug {
        g = rand_augment(&g, n, m, rng);
    }
    g
}

/// The image `pos` of `decoded` as evaluation sees it: the store resized to `size`.
pub fn resized(decoded: &Decoded, pos: usize, size: usize) -> Grey {
    resize(&Grey::from_u8(decoded.image(pos), decoded.size), size)
}

/// One epoch's batches as they arrive from the producer thread. A sample that panicked while it
/// was built ends the epoch with that panic in the consumer's thread (where the stage turns it
/// into its failure) instead of a silently short epoch.
pub struct Batches {
    rx: Receiver<Result<Batch, String>>,
}

impl Iterator for Batches {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        match self.rx.recv() {
            Ok(Ok(batch)) => Some(batch),
            Ok(Err(message)) => panic!("building a batch failed: {message}"),
            Err(_) => None,
        }
    }
}

/// The order an epoch visits its items in.
#[derive(Debug, Clone, Copy)]
pub enum Order {
    /// Item 0 first (scoring).
    InOrder,
    /// Shuffled by (seed, epoch), which also seed each item's random stream: the same seed and
    /// epoch give the same batches.
    Shuffled { seed: u64, epoch: u64 },
}

/// What becomes of a last batch shorter than `per_batch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastBatch {
    Keep,
    /// Dropped, as the reference trainers do (a small last batch is a noisy step).
    Drop,
}

/// Batches of `per_batch` items for one epoch, built ahead on another thread. `make` turns an item
/// into one or more samples, drawing only from the stream it is given (seed, epoch, item).
pub fn epoch<F>(
    items: usize,
    per_batch: usize,
    order: Order,
    last: LastBatch,
    size: usize,
    make: F,
) -> Batches
where
    F: Fn(usize, &mut Rng) -> Vec<Sample> + Send + Sync + 'static,
{
    let (seed, epoch, order) = match order {
        Order::InOrder => (0, 0, (0..items).collect::<Vec<_>>()),
        Order::Shuffled { seed, epoch } => (seed, epoch, shuffled(items, seed, epoch)),
    };
    let (tx, rx) = sync_channel::<Result<Batch, String>>(2);
    let make = Arc::new(make);
    std::thread::spawn(move || {
        for chunk in order.chunks(per_batch.max(1)) {
            if last == LastBatch::Drop && chunk.len() < per_batch {
                break;
            }
            let built = crate::panics::catch(|| build(chunk, size, seed, epoch, &*make));
            let failed = built.is_err();
            if tx.send(built).is_err() || failed {
                return; // the consumer stopped early, or the epoch cannot go on
            }
        }
    });
    Batches { rx }
}

fn build<F>(chunk: &[usize], size: usize, seed: u64, epoch: u64, make: &F) -> Batch
where
    F: Fn(usize, &mut Rng) -> Vec<Sample> + Sync,
{
    let made: Vec<(usize, Vec<Sample>)> = chunk
        .par_iter()
        .map(|&item| (item, make(item, &mut Rng::stream(seed, epoch, item as u64))))
        .collect();
    let mut batch = Batch {
        x: Vec::new(),
        y: Vec::new(),
        items: Vec::new(),
        n: 0,
        size,
    };
    for (item, samples) in made {
        for (px, y) in samples {
            debug_assert_eq!(px.len(), size * size);
            batch.x.extend(px);
            batch.y.push(y);
            batch.items.push(item);
            batch.n += 1;
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarter_turns_draw_every_orientation_and_only_when_asked() {
        // A ramp differs from each of its rotations; a whole-image crop keeps it exact.
        let img = Grey {
            size: 4,
            px: (0..16).map(|v| v as f32 / 15.0).collect(),
        };
        let orientations = |quarter_turns: bool| {
            let a = TrainAug {
                crop_scale: (1.0, 1.0),
                center_bias: 0.0,
                hflip: false,
                quarter_turns,
                randaug: None,
            };
            let mut rng = Rng::new(3);
            let mut seen: Vec<Grey> = Vec::new();
            for _ in 0..64 {
                let g = augmented(&img, 4, &a, &mut rng);
                assert!(
                    (0..4).any(|q| rotate90(&img, q) == g),
                    "not a rotation of the image"
                );
                if !seen.contains(&g) {
                    seen.push(g);
                }
            }
            seen.len()
        };
        assert_eq!(orientations(false), 1);
        assert_eq!(orientations(true), 4);
    }

    #[test]
    fn a_sample_that_panics_ends_the_epoch_with_that_panic_not_silently() {
        let batches = epoch(10, 4, Order::InOrder, LastBatch::Keep, 1, |i, _| {
            assert!(i != 6, "sample {i} is broken");
            vec![(vec![0.0], 0)]
        });
        let got = crate::panics::catch(|| batches.map(|b| b.n).sum::<usize>());
        let message = got.unwrap_err();
        assert!(message.contains("sample 6 is broken"), "{message}");
    }
}
