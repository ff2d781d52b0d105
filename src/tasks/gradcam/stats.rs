//! Statistics over Grad-CAM maps: where a map puts its mass (centre energy, distance of its
//! centre of mass from the image centre, entropy), how it agrees with a box, and their summaries
//! over the test set.

use serde::Serialize;
use serde_json::{json, Value};

/// Where one map puts its mass.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MapStats {
    pub center_energy: f64,
    pub com_distance: f64,
    pub entropy: f64,
}

pub fn map_stats(map: &[f32], size: usize, center_fraction: f64) -> MapStats {
    let total: f64 = map.iter().map(|&v| v as f64).sum::<f64>().max(1e-12);
    let half = size as f64 * center_fraction / 2.0;
    let c = size as f64 / 2.0;
    let (mut inner, mut mx, mut my, mut entropy) = (0.0, 0.0, 0.0, 0.0);
    for y in 0..size {
        for x in 0..size {
            let v = map[y * size + x] as f64 / total;
            let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
            if (px - c).abs() < half && (py - c).abs() < half {
                inner += v;
            }
            mx += v * px;
            my += v * py;
            if v > 0.0 {
                entropy -= v * v.ln();
            }
        }
    }
    MapStats {
        center_energy: inner,
        com_distance: ((mx - c).powi(2) + (my - c).powi(2)).sqrt() / (c * std::f64::consts::SQRT_2),
        entropy: entropy / ((size * size) as f64).ln(),
    }
}

/// How one map agrees with one box.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BoxStats {
    /// The pointing game (Zhang et al., 2016): the map's maximum lies inside the box.
    pub hit: bool,
    pub iou: f64,
    /// Share of the map's total inside the box.
    pub energy: f64,
}

/// `bx` is [x, y, w, h] in map pixels; a pixel is inside when its centre is (or, for a box that
/// contains no pixel centre, when it holds the box's centre).
pub fn box_stats(map: &[f32], size: usize, bx: [f64; 4], iou_threshold: f64) -> BoxStats {
    let [x0, y0, w, h] = bx;
    let centre_in = |x: usize, y: usize| {
        let (cx, cy) = (x as f64 + 0.5, y as f64 + 0.5);
        cx >= x0 && cx < x0 + w && cy >= y0 && cy < y0 + h
    };
    let any_centre = (0..size * size).any(|k| centre_in(k % size, k / size));
    let (mx, my) = (x0 + w / 2.0, y0 + h / 2.0);
    let inside = |k: usize| {
        let (x, y) = (k % size, k / size);
        if any_centre {
            centre_in(x, y)
        } else {
            x == (mx.max(0.0) as usize).min(size - 1) && y == (my.max(0.0) as usize).min(size - 1)
        }
    };
    // A map with no positive value points nowhere.
    let peak = (0..map.len()).fold(0, |best, k| if map[k] > map[best] { k } else { best });
    let points = map.get(peak).is_some_and(|&v| v > 0.0);
    let (mut inter, mut union, mut in_box, mut total) = (0usize, 0usize, 0.0f64, 0.0f64);
    for (k, &v) in map.iter().enumerate() {
        let (on, inb) = (v as f64 >= iou_threshold, inside(k));
        inter += (on && inb) as usize;
        union += (on || inb) as usize;
        total += v as f64;
        if inb {
            in_box += v as f64;
        }
    }
    BoxStats {
        hit: points && inside(peak),
        iou: if union == 0 {
            0.0
        } else {
            inter as f64 / union as f64
        },
        energy: if total > 0.0 { in_box / total } else { 0.0 },
    }
}

pub fn box_summary(v: &[BoxStats]) -> Value {
    let n = v.len().max(1) as f64;
    let mean_std = |f: &dyn Fn(&BoxStats) -> f64| {
        let m = v.iter().map(f).sum::<f64>() / n;
        let sd = (v.iter().map(|s| (f(s) - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
        json!({ "mean": m, "std": sd })
    };
    json!({
        "pointing_game": v.iter().filter(|s| s.hit).count() as f64 / n,
        "iou": mean_std(&|s| s.iou),
        "energy_in_box": mean_std(&|s| s.energy),
    })
}

pub fn faithfulness_summary(v: &[[f64; 2]]) -> Value {
    let n = v.len().max(1) as f64;
    let stat = |k: usize| {
        let m = v.iter().map(|x| x[k]).sum::<f64>() / n;
        let sd = (v.iter().map(|x| (x[k] - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
        json!({ "mean": m, "std": sd })
    };
    json!({ "deletion_auc": stat(0), "insertion_auc": stat(1) })
}

pub fn summary(stats: &[MapStats]) -> Value {
    let mean_std = |f: fn(&MapStats) -> f64| {
        let n = stats.len().max(1) as f64;
        let m = stats.iter().map(f).sum::<f64>() / n;
        let sd =
            (stats.iter().map(|s| (f(s) - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
        json!({ "mean": m, "std": sd })
    };
    json!({ "center_energy": mean_std(|s| s.center_energy), "com_distance": mean_std(|s| s.com_distance), "entropy": mean_std(|s| s.entropy) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centre_and_border_maps_are_told_apart() {
        let n = 8;
        let centre: Vec<f32> = (0..n * n)
            .map(|k| {
                if (2..6).contains(&(k / n)) && (2..6).contains(&(k % n)) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        let border: Vec<f32> = centre.iter().map(|v| 1.0 - v).collect();
        let c = map_stats(&centre, n, 0.5);
        let b = map_stats(&border, n, 0.5);
        assert!((c.center_energy - 1.0).abs() < 1e-9 && b.center_energy.abs() < 1e-9);
        assert!(c.com_distance < 1e-9);
        let uniform = map_stats(&vec![1.0; n * n], n, 0.5);
        assert!(
            (uniform.entropy - 1.0).abs() < 1e-9 && (uniform.center_energy - 0.25).abs() < 1e-9
        );
    }

    #[test]
    fn boxes_score_the_peak_the_overlap_and_the_energy() {
        let n = 8;
        // A map that is 1 on the 2x2 block at (4..6, 4..6), 0.25 elsewhere, its peak at (5, 5).
        let mut map = vec![0.25f32; n * n];
        for y in 4..6 {
            for x in 4..6 {
                map[y * n + x] = if (x, y) == (5, 5) { 1.0 } else { 0.9 };
            }
        }
        let on_block = box_stats(&map, n, [4.0, 4.0, 2.0, 2.0], 0.5);
        assert!(on_block.hit);
        assert!((on_block.iou - 1.0).abs() < 1e-12, "{on_block:?}");
        let total = 3.7 + 60.0 * 0.25;
        assert!((on_block.energy - 3.7 / total).abs() < 1e-6, "{on_block:?}");
        // A box on the left half: misses the peak, overlaps no thresholded pixel.
        let left = box_stats(&map, n, [0.0, 0.0, 4.0, 8.0], 0.5);
        assert!(!left.hit && left.iou == 0.0);
        assert!((left.energy - 32.0 * 0.25 / total).abs() < 1e-6);
        // A box smaller than a pixel still owns the pixel holding its centre.
        let tiny = box_stats(&map, n, [5.1, 5.2, 0.3, 0.3], 0.5);
        assert!(tiny.hit && (tiny.iou - 0.25).abs() < 1e-12, "{tiny:?}");
        // The whole image: every box holds the peak and all the energy.
        let all = box_stats(&map, n, [0.0, 0.0, 8.0, 8.0], 0.5);
        assert!(all.hit && (all.energy - 1.0).abs() < 1e-9 && (all.iou - 4.0 / 64.0).abs() < 1e-12);
        // An all-zero map (a one-cell layer after min-max scaling) points at nothing.
        let zero = box_stats(&vec![0.0; n * n], n, [0.0, 0.0, 8.0, 8.0], 0.5);
        assert!(!zero.hit && zero.energy == 0.0 && zero.iou == 0.0);
    }
}
