//! DICOM radiographs (uncompressed transfer syntaxes) to grey images, parsed with `dicom-object`:
//! stored bits masked, signed data honoured, Modality LUT (rescale slope / intercept), the first
//! VOI window (centre / width, DICOM's linear function) or the image's own range when there is
//! none, and MONOCHROME1 inverted so that dense tissue is bright, as in every other source.

use anyhow::{bail, Context, Result};
use dicom_dictionary_std::tags;
use dicom_object::{open_file, DefaultDicomObject};
use std::path::Path;

/// A DICOM file begins with a 128-byte preamble and `DICM`.
pub fn is_dicom(bytes: &[u8]) -> bool {
    bytes.get(128..132) == Some(b"DICM")
}

fn int(obj: &DefaultDicomObject, tag: dicom_object::Tag, what: &str) -> Result<i64> {
    obj.element(tag)
        .with_context(|| format!("missing {what}"))?
        .to_int::<i64>()
        .with_context(|| format!("{what} is not a number"))
}

fn float(obj: &DefaultDicomObject, tag: dicom_object::Tag) -> Option<f64> {
    let e = obj.element(tag).ok()?;
    e.to_multi_float64()
        .ok()
        .and_then(|v| v.first().copied())
        .or_else(|| e.to_float64().ok())
}

/// (width, height, pixels in [0, 1]).
pub fn decode(path: &Path) -> Result<(u32, u32, Vec<f32>)> {
    let obj = open_file(path)
        .with_context(|| format!("{} is not a readable DICOM file", path.display()))?;
    let rows = int(&obj, tags::ROWS, "Rows")? as usize;
    let cols = int(&obj, tags::COLUMNS, "Columns")? as usize;
    let allocated = int(&obj, tags::BITS_ALLOCATED, "BitsAllocated")?;
    let stored = int(&obj, tags::BITS_STORED, "BitsStored").unwrap_or(allocated);
    let signed = int(&obj, tags::PIXEL_REPRESENTATION, "PixelRepresentation").unwrap_or(0) == 1;
    let samples = int(&obj, tags::SAMPLES_PER_PIXEL, "SamplesPerPixel").unwrap_or(1);
    let photometric = obj
        .element(tags::PHOTOMETRIC_INTERPRETATION)
        .ok()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    if samples != 1 || !photometric.starts_with("MONOCHROME") {
        bail!("{}: only grey (MONOCHROME1/2) radiographs are supported, found {photometric} with {samples} samples", path.display());
    }
    let ts = obj.meta().transfer_syntax().trim_end_matches('\0');
    if ![
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
    ]
    .contains(&ts)
    {
        bail!("{}: compressed transfer syntax {ts} is not supported yet; decompress it first (e.g. `gdcmconv --raw`)", path.display());
    }
    let data = obj
        .element(tags::PIXEL_DATA)
        .context("missing PixelData")?
        .to_bytes()
        .context("PixelData is not a byte string")?;
    let n = rows * cols;
    let big_endian = ts == "1.2.840.10008.1.2.2";
    let mask: i64 = (1i64 << stored) - 1;
    let raw: Vec<i64> = match allocated {
        8 => data.iter().take(n).map(|&b| b as i64).collect(),
        16 => data
            .chunks_exact(2)
            .take(n)
            .map(|c| {
                let v = if big_endian {
                    u16::from_be_bytes([c[0], c[1]])
                } else {
                    u16::from_le_bytes([c[0], c[1]])
                } as i64
                    & mask;
                if signed && v >> (stored - 1) & 1 == 1 {
                    v - (1 << stored)
                } else {
                    v
                }
            })
            .collect(),
        other => bail!(
            "{}: {other} bits allocated per pixel are not supported",
            path.display()
        ),
    };
    if raw.len() != n {
        bail!(
            "{}: PixelData holds {} pixels, Rows x Columns is {n}",
            path.display(),
            raw.len()
        );
    }
    let slope = float(&obj, tags::RESCALE_SLOPE).unwrap_or(1.0);
    let intercept = float(&obj, tags::RESCALE_INTERCEPT).unwrap_or(0.0);
    let values: Vec<f64> = raw.iter().map(|&v| v as f64 * slope + intercept).collect();
    let window = float(&obj, tags::WINDOW_CENTER)
        .zip(float(&obj, tags::WINDOW_WIDTH))
        .filter(|(_, w)| *w >= 1.0);
    let mut px: Vec<f32> = match window {
        // DICOM PS3.3 C.11.2.1.2: the linear VOI function.
        Some((c, w)) => values
            .iter()
            .map(|&v| (((v - (c - 0.5)) / (w - 1.0)) + 0.5).clamp(0.0, 1.0) as f32)
            .collect(),
        None => {
            let (lo, hi) = values
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let span = (hi - lo).max(1e-9);
            values.iter().map(|&v| ((v - lo) / span) as f32).collect()
        }
    };
    if photometric == "MONOCHROME1" {
        px.iter_mut().for_each(|v| *v = 1.0 - *v);
    }
    Ok((cols as u32, rows as u32, px))
}
