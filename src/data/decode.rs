//! Decoding radiographs to grey squares, and the decoded-tensor cache.
//!
//! JPEG and PNG (8 or 16 bit, grey or RGB with equal channels) through the `image` crate, resized
//! to `size` x `size` with a triangle (bilinear, support scaled on downsampling) filter, stored as
//! 8-bit. A set of images is decoded once per (files, size) into one compact file that every
//! later epoch and stage reads back instead of decoding JPEGs again.

use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    Default,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum OnBadImage {
    /// Stop with an error naming the file and the CSV row.
    #[default]
    Error,
    /// Leave the image out; the count and the files are recorded in the stage's metrics.
    Skip,
}

/// Decoded images: `pixels` holds `kept.len()` squares of `size * size` bytes.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub size: usize,
    /// Positions (into the list given to [`decode_all`]) of the images that decoded.
    pub kept: Vec<usize>,
    pub skipped: Vec<(PathBuf, String)>,
    pixels: Pixels,
}

/// Decoded pixels: built in memory, or memory-mapped from the decoded cache file, so a stage
/// that reuses a decoded set neither reads nor copies it up front.
#[derive(Debug, Clone)]
enum Pixels {
    Owned(Vec<u8>),
    Mapped {
        map: std::sync::Arc<memmap2::Mmap>,
        offset: usize,
    },
}

impl Decoded {
    /// All images back to back, `len() * size * size` bytes.
    pub fn pixels(&self) -> &[u8] {
        match &self.pixels {
            Pixels::Owned(v) => v,
            Pixels::Mapped { map, offset } => &map[*offset..],
        }
    }

    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.size * self.size;
        &self.pixels()[i * n..(i + 1) * n]
    }
    pub fn len(&self) -> usize {
        self.kept.len()
    }
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }
    /// Mean and standard deviation of pixel values in [0, 1] over the given images.
    pub fn stats(&self, which: &[usize]) -> (f32, f32) {
        let (mut sum, mut sq, mut n) = (0f64, 0f64, 0f64);
        for &i in which {
            for &p in self.image(i) {
                let v = p as f64 / 255.0;
                sum += v;
                sq += v * v;
                n += 1.0;
            }
        }
        let mean = sum / n.max(1.0);
        (
            mean as f32,
            ((sq / n.max(1.0) - mean * mean).max(1e-12)).sqrt() as f32,
        )
    }
}

/// Decodes one file to a grey `size` x `size` square.
pub fn decode_grey(path: &Path, size: usize) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot open {}", path.display()))?;
    let grey = if super::dicom::is_dicom(&bytes) {
        let (w, h, px) = super::dicom::decode(path)?;
        image::GrayImage::from_raw(w, h, px.iter().map(|v| (v * 255.0).round() as u8).collect())
            .context("DICOM size")?
    } else {
        check_complete(&bytes).with_context(|| format!("{} is corrupt", path.display()))?;
        image::load_from_memory(&bytes)
            .with_context(|| format!("cannot decode {} (corrupt or truncated?)", path.display()))?
            .to_luma8()
    };
    if grey.width() == 0 || grey.height() == 0 {
        bail!("{} has no pixels", path.display());
    }
    let resized = image::imageops::resize(
        &grey,
        size as u32,
        size as u32,
        image::imageops::FilterType::Triangle,
    );
    Ok(resized.into_raw())
}

/// Width and height of the file as stored, before [`decode_grey`] stretches it to a square: what
/// coordinates given in the original image's pixels (boxes) must be scaled by.
pub fn dimensions(path: &Path) -> Result<(u32, u32)> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut head = Vec::with_capacity(132);
    std::io::Read::read_to_end(&mut std::io::Read::take(file, 132), &mut head)?;
    if super::dicom::is_dicom(&head) {
        let (w, h, _) = super::dicom::decode(path)?;
        return Ok((w, h));
    }
    image::image_dimensions(path)
        .with_context(|| format!("cannot read the size of {}", path.display()))
}

/// The JPEG decoder fills a truncated file's missing rows with grey instead of failing, so a
/// JPEG must end with its end-of-image marker (trailing padding allowed).
pub fn check_complete(bytes: &[u8]) -> Result<()> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        let end = bytes
            .iter()
            .rposition(|&b| b != 0x00 && b != b'\n' && b != b'\r')
            .map_or(0, |i| i + 1);
        if end < 4 || bytes[end - 2..end] != [0xFF, 0xD9] {
            bail!("truncated JPEG: no end-of-image marker");
        }
    }
    Ok(())
}

/// Decodes `paths` at `size`, reusing `cache_dir/decoded-<key>.bin` when the same files were
/// decoded at this size before. The key is the files' content: `content`, the data input's
/// fingerprint (which covers every file the paths name), or else a hash of each file read here.
/// Never path and mtime: an image replaced by another of the same size and time must not be
/// served as the old pixels. `origins` name where each path was declared.
pub fn decode_all(
    paths: &[PathBuf],
    origins: &[String],
    size: usize,
    content: Option<&str>,
    cache_dir: Option<&Path>,
    on_bad: OnBadImage,
) -> Result<Decoded> {
    let key = {
        let mut h = blake3::Hasher::new();
        h.update(format!("grey-u8-triangle-v2 {size} {on_bad:?}\n").as_bytes());
        h.update(content.unwrap_or("per-file").as_bytes());
        for p in paths {
            h.update(p.as_os_str().as_encoded_bytes());
            h.update(b"\n");
            if content.is_none() {
                // Unreadable files hash as empty: decoding reports them by name.
                h.update(blake3::hash(&std::fs::read(p).unwrap_or_default()).as_bytes());
            }
        }
        h.finalize().to_hex()[..32].to_owned()
    };
    let cache_file = cache_dir.map(|d| d.join(format!("decoded-{key}.bin")));
    if let Some(file) = &cache_file {
        if let Ok(d) = read_cache(file, size) {
            return Ok(d);
        }
    }
    let results: Vec<Result<Vec<u8>>> = paths.par_iter().map(|p| decode_grey(p, size)).collect();
    let mut out = Decoded {
        size,
        kept: Vec::new(),
        skipped: Vec::new(),
        pixels: Pixels::Owned(Vec::with_capacity(paths.len() * size * size)),
    };
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(px) => {
                out.kept.push(i);
                if let Pixels::Owned(v) = &mut out.pixels {
                    v.extend(px);
                }
            }
            Err(e) => match on_bad {
                OnBadImage::Error => {
                    return Err(e.context(format!(
                        "image listed at {}; set `on_bad_image: skip` to leave bad images out",
                        origins.get(i).map_or("?", String::as_str)
                    )))
                }
                OnBadImage::Skip => out.skipped.push((paths[i].clone(), format!("{e:#}"))),
            },
        }
    }
    if let Some(file) = &cache_file {
        // Best effort: without the cache file the next stage decodes again.
        let _ = write_cache(file, &out);
    }
    Ok(out)
}

const MAGIC: &[u8; 8] = b"PTXDEC01";

fn write_cache(file: &Path, d: &Decoded) -> Result<()> {
    let dir = file.parent().context("cache file has a folder")?;
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        w.write_all(MAGIC)?;
        w.write_all(&(d.size as u64).to_le_bytes())?;
        w.write_all(&(d.kept.len() as u64).to_le_bytes())?;
        let skipped = serde_json::to_vec(
            &d.skipped
                .iter()
                .map(|(p, e)| (p.display().to_string(), e.clone()))
                .collect::<Vec<_>>(),
        )?;
        w.write_all(&(skipped.len() as u64).to_le_bytes())?;
        w.write_all(&skipped)?;
        for &k in &d.kept {
            w.write_all(&(k as u64).to_le_bytes())?;
        }
        w.write_all(d.pixels())?;
        w.flush()?;
    }
    tmp.persist(file)?;
    Ok(())
}

fn read_cache(file: &Path, size: usize) -> Result<Decoded> {
    let f = std::fs::File::open(file)?;
    // SAFETY: cache files are written to a temporary name and renamed into place, never
    // modified afterwards, so the mapping does not change under us.
    let map = unsafe { memmap2::Mmap::map(&f)? };
    let bytes: &[u8] = &map;
    let u64_at = |o: usize| -> Result<u64> {
        Ok(u64::from_le_bytes(
            bytes.get(o..o + 8).context("truncated")?.try_into()?,
        ))
    };
    if bytes.get(..8) != Some(MAGIC) || u64_at(8)? as usize != size {
        bail!("not a decoded cache of this size");
    }
    let n = u64_at(16)? as usize;
    let sk_len = u64_at(24)? as usize;
    let skipped: Vec<(String, String)> =
        serde_json::from_slice(bytes.get(32..32 + sk_len).context("truncated")?)?;
    let mut off = 32 + sk_len;
    let mut kept = Vec::with_capacity(n);
    for _ in 0..n {
        kept.push(u64_at(off)? as usize);
        off += 8;
    }
    if bytes.len().checked_sub(off) != Some(n * size * size) {
        bail!("decoded cache has the wrong length");
    }
    let skipped = skipped
        .into_iter()
        .map(|(p, e)| (PathBuf::from(p), e))
        .collect();
    let pixels = Pixels::Mapped {
        map: std::sync::Arc::new(map),
        offset: off,
    };
    Ok(Decoded {
        size,
        kept,
        skipped,
        pixels,
    })
}

/// A seeded shuffle of positions, for epochs.
pub fn shuffled(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    Rng::stream(seed, epoch, 0xE90C).shuffle(&mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decoded_cache_maps_back_the_same_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.png");
        image::GrayImage::from_fn(20, 10, |x, y| image::Luma([(x * 10 + y) as u8]))
            .save(&img)
            .unwrap();
        let paths = vec![img.clone(), img];
        let origins = vec![String::new(); 2];
        let first = decode_all(
            &paths,
            &origins,
            8,
            None,
            Some(dir.path()),
            OnBadImage::Error,
        )
        .unwrap();
        assert!(matches!(first.pixels, Pixels::Owned(_)));
        let again = decode_all(
            &paths,
            &origins,
            8,
            None,
            Some(dir.path()),
            OnBadImage::Error,
        )
        .unwrap();
        assert!(
            matches!(again.pixels, Pixels::Mapped { .. }),
            "the second decode reads the cache file"
        );
        assert_eq!(first.pixels(), again.pixels());
        assert_eq!(again.kept, vec![0, 1]);

        // Same size, same mtime, other pixels: a new decode, not the cached one.
        let flat = |v: u8, path: &Path| {
            image::GrayImage::from_pixel(20, 10, image::Luma([v]))
                .save(path)
                .unwrap()
        };
        flat(10, &paths[0]);
        let first = decode_all(
            &paths,
            &origins,
            8,
            None,
            Some(dir.path()),
            OnBadImage::Error,
        )
        .unwrap();
        let before = std::fs::metadata(&paths[0]).unwrap();
        let mtime = before.modified().unwrap();
        flat(200, &paths[0]);
        assert_eq!(std::fs::metadata(&paths[0]).unwrap().len(), before.len());
        std::fs::File::options()
            .write(true)
            .open(&paths[0])
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let replaced = decode_all(
            &paths,
            &origins,
            8,
            None,
            Some(dir.path()),
            OnBadImage::Error,
        )
        .unwrap();
        assert!(
            matches!(replaced.pixels, Pixels::Owned(_)),
            "decoded afresh"
        );
        assert_ne!(replaced.pixels(), first.pixels());
    }
}
