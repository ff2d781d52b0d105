//! Augmentations that make sense for grey radiographs, on f32 images in [0, 1].
//!
//! RandomResizedCrop (torchvision's sampling, with an optional pull of the crop towards the image
//! centre), horizontal flip, 90-degree rotation (the rotation proxy), RandAugment with grey-valid
//! operations only, and jigsaw tiles with jitter. Everything draws from the [`Rng`] it is given.

use crate::rng::Rng;

/// A square grey image.
#[derive(Debug, Clone, PartialEq)]
pub struct Grey {
    pub size: usize,
    pub px: Vec<f32>,
}

impl Grey {
    pub fn from_u8(px: &[u8], size: usize) -> Grey {
        Grey {
            size,
            px: px.iter().map(|&v| v as f32 / 255.0).collect(),
        }
    }
    fn at(&self, x: f32, y: f32) -> f32 {
        let s = self.size as f32;
        if x < -0.5 || y < -0.5 || x > s - 0.5 || y > s - 0.5 {
            return 0.0;
        }
        let (x, y) = (x.clamp(0.0, s - 1.0), y.clamp(0.0, s - 1.0));
        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(self.size - 1), (y0 + 1).min(self.size - 1));
        let (fx, fy) = (x - x0 as f32, y - y0 as f32);
        let row = |yy: usize| {
            self.px[yy * self.size + x0] * (1.0 - fx) + self.px[yy * self.size + x1] * fx
        };
        row(y0) * (1.0 - fy) + row(y1) * fy
    }
}

/// Bilinear sampling of the crop (x0, y0, w, h) (source pixels) into an `out` x `out` image.
pub fn crop_resize(img: &Grey, x0: f32, y0: f32, w: f32, h: f32, out: usize) -> Grey {
    let mut px = Vec::with_capacity(out * out);
    for j in 0..out {
        for i in 0..out {
            let sx = x0 + (i as f32 + 0.5) * w / out as f32 - 0.5;
            let sy = y0 + (j as f32 + 0.5) * h / out as f32 - 0.5;
            px.push(img.at(sx, sy));
        }
    }
    Grey { size: out, px }
}

pub fn resize(img: &Grey, out: usize) -> Grey {
    if img.size == out {
        return img.clone();
    }
    crop_resize(img, 0.0, 0.0, img.size as f32, img.size as f32, out)
}

/// torchvision's RandomResizedCrop: area fraction in `scale`, log-uniform aspect in [3/4, 4/3],
/// ten tries then the whole image. `center_bias` in [0, 1) draws the crop centre from a normal
/// around the image centre instead of uniformly (0 = torchvision).
pub fn random_resized_crop(
    img: &Grey,
    out: usize,
    scale: (f64, f64),
    center_bias: f64,
    rng: &mut Rng,
) -> Grey {
    let s = img.size as f64;
    let area = s * s;
    for _ in 0..10 {
        let target = area * rng.range(scale.0, scale.1);
        let ratio = rng.range((3f64 / 4.0).ln(), (4f64 / 3.0).ln()).exp();
        let w = (target * ratio).sqrt();
        let h = (target / ratio).sqrt();
        if w <= s && h <= s {
            let (x, y) = if center_bias > 0.0 {
                let spread = (1.0 - center_bias.min(0.99)) * 0.5;
                let cx = ((s - w) / 2.0 + rng.normal() * spread * (s - w)).clamp(0.0, s - w);
                let cy = ((s - h) / 2.0 + rng.normal() * spread * (s - h)).clamp(0.0, s - h);
                (cx, cy)
            } else {
                (rng.range(0.0, s - w), rng.range(0.0, s - h))
            };
            return crop_resize(img, x as f32, y as f32, w as f32, h as f32, out);
        }
    }
    resize(img, out)
}

pub fn hflip(img: &Grey) -> Grey {
    let n = img.size;
    Grey {
        size: n,
        px: (0..n * n)
            .map(|k| img.px[(k / n) * n + (n - 1 - k % n)])
            .collect(),
    }
}

/// Rotation by `quarter_turns` x 90 degrees counter-clockwise (exact, no resampling).
pub fn rotate90(img: &Grey, quarter_turns: usize) -> Grey {
    let n = img.size;
    let mut out = img.clone();
    for _ in 0..quarter_turns % 4 {
        let src = out.px.clone();
        for y in 0..n {
            for x in 0..n {
                out.px[(n - 1 - x) * n + y] = src[y * n + x];
            }
        }
    }
    out
}

/// Which views of each image a scoring pass averages its class probabilities over
/// (test-time augmentation). Views are exact pixel permutations, so no view is blurrier than
/// the image itself.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Tta {
    /// The image alone.
    #[default]
    None,
    /// The image and its mirror image (for models trained with `hflip`).
    Flip,
    /// All eight rotations and mirror images (for models trained with `hflip` and
    /// `quarter_turns`).
    Dihedral,
}

impl Tta {
    pub fn is_none(&self) -> bool {
        *self == Tta::None
    }

    /// How many views [`Tta::views`] makes of each image.
    pub fn count(self) -> usize {
        match self {
            Tta::None => 1,
            Tta::Flip => 2,
            Tta::Dihedral => 8,
        }
    }

    pub fn views(self, img: Grey) -> Vec<Grey> {
        match self {
            Tta::None => vec![img],
            Tta::Flip => {
                let mirrored = hflip(&img);
                vec![img, mirrored]
            }
            Tta::Dihedral => {
                let mirrored = hflip(&img);
                (0..4)
                    .flat_map(|q| [rotate90(&img, q), rotate90(&mirrored, q)])
                    .collect()
            }
        }
    }
}

/// An affine warp about the centre: output (x, y) samples the source at A*(x-c, y-c) + c + t.
fn affine(img: &Grey, a: [f32; 4], t: (f32, f32)) -> Grey {
    let n = img.size;
    let c = (n as f32 - 1.0) / 2.0;
    let mut px = Vec::with_capacity(n * n);
    for y in 0..n {
        for x in 0..n {
            let (dx, dy) = (x as f32 - c, y as f32 - c);
            px.push(img.at(
                a[0] * dx + a[1] * dy + c + t.0,
                a[2] * dx + a[3] * dy + c + t.1,
            ));
        }
    }
    Grey { size: n, px }
}

fn blend(a: &Grey, b: &[f32], factor: f32) -> Grey {
    Grey {
        size: a.size,
        px: a
            .px
            .iter()
            .zip(b)
            .map(|(x, y)| (y + (x - y) * factor).clamp(0.0, 1.0))
            .collect(),
    }
}

/// The operations of RandAugment that are meaningful on a grey radiograph (no colour, no hue).
/// Solarize is left out: it inverts the brightest pixels, which in a radiograph are metal and
/// bone, so it turns an implant (what the shoulder task classifies) dark.
pub const RANDAUG_OPS: &[&str] = &[
    "identity",
    "autocontrast",
    "equalize",
    "rotate",
    "posterize",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
];

/// Each drawn operation is applied with this probability, as timm's `rand_augment_transform`
/// does (`AugmentOp(prob=0.5)`): with 2 ops, a quarter of the images pass unchanged.
pub const RANDAUG_OP_PROB: f64 = 0.5;

/// Draws `n` operations at magnitude `m` (0-10, timm's scale), each with a random sign, and
/// applies each with probability [`RANDAUG_OP_PROB`].
pub fn rand_augment(img: &Grey, n: usize, m: f64, rng: &mut Rng) -> Grey {
    let mut out = img.clone();
    let level = (m / 10.0).clamp(0.0, 1.0) as f32;
    for _ in 0..n {
        let op = RANDAUG_OPS[rng.below(RANDAUG_OPS.len())];
        let sign = if rng.f64() < 0.5 { -1.0 } else { 1.0 };
        if rng.f64() >= RANDAUG_OP_PROB {
            continue;
        }
        out = match op {
            "autocontrast" => {
                let (lo, hi) = out
                    .px
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let span = (hi - lo).max(1e-6);
                Grey {
                    size: out.size,
                    px: out.px.iter().map(|v| (v - lo) / span).collect(),
                }
            }
            "equalize" => equalize(&out),
            "rotate" => {
                let th = (30.0 * level * sign).to_radians();
                affine(&out, [th.cos(), -th.sin(), th.sin(), th.cos()], (0.0, 0.0))
            }
            "posterize" => {
                let bits = (8.0 - 4.0 * level).round().max(1.0);
                let q = 2f32.powf(bits);
                Grey {
                    size: out.size,
                    px: out
                        .px
                        .iter()
                        .map(|v| (v * (q - 1.0)).floor() / (q - 1.0))
                        .collect(),
                }
            }
            "contrast" => {
                let mean = out.px.iter().sum::<f32>() / out.px.len() as f32;
                blend(&out, &vec![mean; out.px.len()], 1.0 + 0.9 * level * sign)
            }
            "brightness" => blend(&out, &vec![0.0; out.px.len()], 1.0 + 0.9 * level * sign),
            "sharpness" => {
                let blurred = smooth(&out);
                blend(&out, &blurred.px, 1.0 + 0.9 * level * sign)
            }
            "shear_x" => affine(&out, [1.0, 0.3 * level * sign, 0.0, 1.0], (0.0, 0.0)),
            "shear_y" => affine(&out, [1.0, 0.0, 0.3 * level * sign, 1.0], (0.0, 0.0)),
            "translate_x" => affine(
                &out,
                [1.0, 0.0, 0.0, 1.0],
                (0.45 * level * sign * out.size as f32, 0.0),
            ),
            "translate_y" => affine(
                &out,
                [1.0, 0.0, 0.0, 1.0],
                (0.0, 0.45 * level * sign * out.size as f32),
            ),
            _ => out,
        };
    }
    out
}

fn equalize(img: &Grey) -> Grey {
    let mut hist = [0usize; 256];
    for &v in &img.px {
        hist[(v.clamp(0.0, 1.0) * 255.0) as usize] += 1;
    }
    let mut cdf = [0f32; 256];
    let mut acc = 0;
    for (i, h) in hist.iter().enumerate() {
        acc += h;
        cdf[i] = acc as f32 / img.px.len() as f32;
    }
    Grey {
        size: img.size,
        px: img
            .px
            .iter()
            .map(|&v| cdf[(v.clamp(0.0, 1.0) * 255.0) as usize])
            .collect(),
    }
}

/// PIL's SMOOTH kernel (1 1 1 / 1 5 1 / 1 1 1) / 13, borders kept.
fn smooth(img: &Grey) -> Grey {
    let n = img.size;
    let mut px = img.px.clone();
    for y in 1..n.saturating_sub(1) {
        for x in 1..n - 1 {
            let mut s = 4.0 * img.px[y * n + x];
            for dy in 0..3 {
                for dx in 0..3 {
                    s += img.px[(y + dy - 1) * n + x + dx - 1];
                }
            }
            px[y * n + x] = s / 13.0;
        }
    }
    Grey { size: n, px }
}

/// Cuts the image into `grid` x `grid` tiles, each cropped with up to `jitter` pixels of random
/// offset (so edges cannot be matched), and returns them resized to `tile` pixels, in order.
pub fn jigsaw_tiles(
    img: &Grey,
    grid: usize,
    tile: usize,
    jitter: usize,
    rng: &mut Rng,
) -> Vec<Grey> {
    let cell = img.size as f32 / grid as f32;
    let inner = (cell - jitter as f32).max(1.0);
    let mut out = Vec::with_capacity(grid * grid);
    for gy in 0..grid {
        for gx in 0..grid {
            let ox = gx as f32 * cell + rng.range(0.0, jitter as f64) as f32;
            let oy = gy as f32 * cell + rng.range(0.0, jitter as f64) as f32;
            out.push(crop_resize(img, ox, oy, inner, inner, tile));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Grey {
        Grey {
            size: n,
            px: (0..n * n).map(|k| k as f32 / (n * n) as f32).collect(),
        }
    }

    #[test]
    fn rotation_and_flip_are_exact_permutations() {
        let img = ramp(5);
        assert_eq!(rotate90(&rotate90(&img, 2), 2), img);
        assert_eq!(hflip(&hflip(&img)), img);
        assert_ne!(rotate90(&img, 1), img);
    }

    #[test]
    fn test_time_views_are_the_distinct_symmetries_of_the_image() {
        let img = ramp(5);
        assert_eq!(Tta::None.views(img.clone()), vec![img.clone()]);
        assert_eq!(Tta::Flip.views(img.clone()), vec![img.clone(), hflip(&img)]);
        for tta in [Tta::None, Tta::Flip, Tta::Dihedral] {
            assert_eq!(tta.views(img.clone()).len(), tta.count());
        }
        let eight = Tta::Dihedral.views(img.clone());
        assert_eq!(eight[0], img);
        for (i, a) in eight.iter().enumerate() {
            for b in &eight[i + 1..] {
                assert_ne!(a, b, "two of the eight views are the same");
            }
        }
    }

    #[test]
    fn randaugment_applies_each_drawn_op_with_probability_one_half() {
        // Noise, which every operation but identity changes (a ramp is its own equalisation).
        let mut rng = Rng::new(7);
        let img = Grey {
            size: 16,
            px: (0..256).map(|_| rng.range(0.1, 0.9) as f32).collect(),
        };
        let draws = 4000;
        let unchanged = (0..draws)
            .filter(|_| rand_augment(&img, 2, 6.0, &mut rng) == img)
            .count() as f64
            / draws as f64;
        // Both ops skipped (1/4), or skipped / identity: (1/2 + 1/2 * 1/12)^2 = 0.293. Applying
        // every drawn op would leave only identity twice: 1/144.
        assert!((0.26..0.33).contains(&unchanged), "{unchanged}");
    }

    #[test]
    fn augmentations_are_seeded_and_stay_in_range() {
        let img = ramp(16);
        let a = rand_augment(
            &random_resized_crop(&img, 8, (0.5, 1.0), 0.5, &mut Rng::new(3)),
            2,
            6.0,
            &mut Rng::new(4),
        );
        let b = rand_augment(
            &random_resized_crop(&img, 8, (0.5, 1.0), 0.5, &mut Rng::new(3)),
            2,
            6.0,
            &mut Rng::new(4),
        );
        assert_eq!(a, b);
        assert!(a.px.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_eq!(jigsaw_tiles(&img, 3, 4, 1, &mut Rng::new(1)).len(), 9);
    }
}
