//! `pretext data inspect`: what a data folder holds, before a pipeline trains on it.

use super::source::{self, Split};
use anyhow::Result;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Stable JSON (`pretext data inspect --json`):
///
/// ```json
/// {"root":"data/shoulder-implant","images":597,"classes":["cofield","depuy","tornier","zimmer"],
///  "per_split":{"train":{"depuy":219,..},"test":{..}},"groups":0,
///  "sizes":{"250x250":568,..},"bit_depths":{"8":597},"bad":[{"path":"..","error":".."}]}
/// ```
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub root: String,
    pub images: usize,
    pub classes: Vec<String>,
    pub per_split: BTreeMap<String, BTreeMap<String, usize>>,
    pub groups: usize,
    pub sizes: BTreeMap<String, usize>,
    pub bit_depths: BTreeMap<String, usize>,
    pub bad: Vec<BadFile>,
}

#[derive(Debug, Serialize)]
pub struct BadFile {
    pub path: String,
    pub origin: String,
    pub error: String,
}

/// `options` are a data entry's (`source`, `labels`, `body_part`, ...).
pub fn inspect(
    root: &Path,
    options: &serde_json::Map<String, serde_json::Value>,
) -> Result<Inspection> {
    let ds = source::open_with(root, options)?;
    let mut per_split: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for s in &ds.samples {
        let split = match s.split {
            Some(Split::Train) => "train",
            Some(Split::Val) => "val",
            Some(Split::Test) => "test",
            None => "unsplit",
        };
        let counts = per_split.entry(split.to_owned()).or_default();
        match (&s.targets, s.label) {
            // Multi-label: one count per positive finding, and images with none.
            (Some(t), _) => {
                let positives: Vec<&String> = t
                    .iter()
                    .zip(&ds.classes)
                    .filter(|(v, _)| **v >= 0.5)
                    .map(|(_, c)| c)
                    .collect();
                if positives.is_empty() {
                    *counts.entry("(no positive finding)".into()).or_default() += 1;
                }
                for c in positives {
                    *counts.entry(c.clone()).or_default() += 1;
                }
            }
            (None, Some(l)) => *counts.entry(ds.classes[l].clone()).or_default() += 1,
            (None, None) => *counts.entry("(none)".into()).or_default() += 1,
        }
    }
    let groups = ds
        .samples
        .iter()
        .filter_map(|s| s.group.as_ref())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let probes: Vec<std::result::Result<(u32, u32, u16), String>> = ds
        .samples
        .par_iter()
        .map(|s| {
            let bytes = std::fs::read(&s.path).map_err(|e| e.to_string())?;
            super::decode::check_complete(&bytes).map_err(|e| e.to_string())?;
            let reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
                .with_guessed_format()
                .map_err(|e| e.to_string())?;
            let img = reader.decode().map_err(|e| e.to_string())?;
            let depth = (img.color().bits_per_pixel() / img.color().channel_count() as u16).max(1);
            Ok((img.width(), img.height(), depth))
        })
        .collect();
    let mut sizes = BTreeMap::new();
    let mut bit_depths = BTreeMap::new();
    let mut bad = Vec::new();
    for (s, p) in ds.samples.iter().zip(probes) {
        match p {
            Ok((w, h, d)) => {
                *sizes.entry(format!("{w}x{h}")).or_insert(0) += 1;
                *bit_depths.entry(d.to_string()).or_insert(0) += 1;
            }
            Err(e) => bad.push(BadFile {
                path: s.path.display().to_string(),
                origin: s.origin.clone(),
                error: e,
            }),
        }
    }
    Ok(Inspection {
        root: root.display().to_string(),
        images: ds.samples.len(),
        classes: ds.classes,
        per_split,
        groups,
        sizes,
        bit_depths,
        bad,
    })
}
