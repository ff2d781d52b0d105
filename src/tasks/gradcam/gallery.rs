//! The Grad-CAM gallery: test images chosen per true class and per right / wrong prediction, each
//! drawn as the radiograph beside its map over it (a perceptual colour map, viridis), listed in
//! `gallery.csv` with what the caption says.

use crate::data::loader;
use crate::tasks::fit::ImageSet;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// One test image of the gallery.
pub struct Tile {
    /// Position in the decoded set.
    pub pos: usize,
    pub label: usize,
    pub predicted: usize,
    /// The predicted class's softmax probability.
    pub probability: f64,
    /// The map, `size` x `size`, scaled to [0, 1].
    pub map: Vec<f32>,
}

/// Up to `per_bucket` images per (true class, right or wrong), first come in test order: every
/// class shows where the model is right and where it is wrong, not the first N files.
pub struct Gallery {
    per_bucket: usize,
    taken: BTreeMap<(usize, bool), usize>,
    pub tiles: Vec<Tile>,
}

impl Gallery {
    /// About `total` images over `classes` classes.
    pub fn new(total: usize, classes: usize) -> Gallery {
        Gallery {
            per_bucket: if total == 0 {
                0
            } else {
                (total / (2 * classes.max(1))).max(1)
            },
            taken: BTreeMap::new(),
            tiles: Vec::new(),
        }
    }

    /// Whether a tile of this class and outcome would be kept (so its map need not be copied).
    pub fn wants(&self, label: usize, correct: bool) -> bool {
        self.taken.get(&(label, correct)).copied().unwrap_or(0) < self.per_bucket
    }

    pub fn offer(&mut self, tile: Tile) {
        let bucket = (tile.label, tile.label == tile.predicted);
        if self.wants(bucket.0, bucket.1) {
            *self.taken.entry(bucket).or_default() += 1;
            self.tiles.push(tile);
        }
    }

    /// `gallery/NNN.png` per tile, `gallery.csv`, and every tile stacked in `overlays.png`; tiles
    /// sorted by class, then right before wrong.
    pub fn write(
        mut self,
        set: &ImageSet,
        classes: &[String],
        size: usize,
        out: &Path,
    ) -> Result<()> {
        self.tiles
            .sort_by_key(|t| (t.label, t.label != t.predicted, t.pos));
        let dir = out.join("gallery");
        std::fs::create_dir_all(&dir)?;
        let mut csv = csv::Writer::from_path(out.join("gallery.csv"))?;
        csv.write_record([
            "file",
            "path",
            "label",
            "prediction",
            "probability",
            "correct",
        ])?;
        let scale = (192 / size).max(1) as u32;
        let mut tiles = Vec::new();
        for (n, t) in self.tiles.iter().enumerate() {
            let tile = draw(set, t, size, scale);
            let file = format!("gallery/{n:03}.png");
            tile.save(out.join(&file))
                .with_context(|| format!("writing {file}"))?;
            let sample = &set.dataset.samples[set.sample_of[t.pos]];
            let path = sample
                .path
                .strip_prefix(&set.dataset.root)
                .unwrap_or(&sample.path);
            csv.write_record([
                file,
                path.display().to_string(),
                classes[t.label].clone(),
                classes[t.predicted].clone(),
                format!("{:.3}", t.probability),
                (t.label == t.predicted).to_string(),
            ])?;
            tiles.push(tile);
        }
        csv.flush()?;
        let (w, h) = (2 * size as u32 * scale, size as u32 * scale);
        let mut strip = image::RgbImage::new(w, h * tiles.len().max(1) as u32);
        for (row, tile) in tiles.iter().enumerate() {
            image::imageops::replace(&mut strip, tile, 0, (row as u32 * h) as i64);
        }
        strip
            .save(out.join("overlays.png"))
            .context("writing overlays.png")
    }
}

/// The radiograph, and beside it the map blended over it.
fn draw(set: &ImageSet, t: &Tile, size: usize, scale: u32) -> image::RgbImage {
    let img = loader::resized(&set.decoded, t.pos, size).px;
    let s = size as u32 * scale;
    let mut png = image::RgbImage::new(2 * s, s);
    for y in 0..s {
        for x in 0..s {
            let k = (y / scale) as usize * size + (x / scale) as usize;
            let g = img[k];
            let c = colour(t.map[k]);
            let grey = [g, g, g].map(|v| (v.clamp(0.0, 1.0) * 255.0) as u8);
            let over = [0, 1, 2].map(|ch| ((0.5 * g + 0.5 * c[ch]).clamp(0.0, 1.0) * 255.0) as u8);
            png.put_pixel(x, y, image::Rgb(grey));
            png.put_pixel(s + x, y, image::Rgb(over));
        }
    }
    png
}

/// Viridis: perceptually uniform and readable in grey, unlike jet.
pub fn colour(v: f32) -> [f32; 3] {
    let c = colorous::VIRIDIS.eval_continuous(v.clamp(0.0, 1.0) as f64);
    [c.r, c.g, c.b].map(|u| u as f32 / 255.0)
}

/// `stops` CSS colours of the colour map from 0 to 1, for a colour bar.
pub fn css_stops(stops: usize) -> Vec<String> {
    (0..stops)
        .map(|i| {
            let c = colorous::VIRIDIS.eval_continuous(i as f64 / (stops - 1).max(1) as f64);
            format!("#{:02x}{:02x}{:02x}", c.r, c.g, c.b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tile(label: usize, predicted: usize) -> Tile {
        Tile {
            pos: 0,
            label,
            predicted,
            probability: 0.5,
            map: Vec::new(),
        }
    }

    #[test]
    fn the_gallery_takes_each_class_right_and_wrong() {
        let mut g = Gallery::new(8, 2);
        for _ in 0..5 {
            g.offer(tile(0, 0));
            g.offer(tile(0, 1));
        }
        g.offer(tile(1, 0));
        let count = |l, ok: bool| {
            g.tiles
                .iter()
                .filter(|t| t.label == l && (t.label == t.predicted) == ok)
                .count()
        };
        assert_eq!(
            (count(0, true), count(0, false), count(1, false)),
            (2, 2, 1)
        );
        assert!(!g.wants(0, true) && g.wants(1, true));
        assert_eq!(css_stops(3).len(), 3);
    }
}
