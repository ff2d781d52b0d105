//! Readers for the public X-ray collections researchers have, from their exact published layouts.
//!
//! - MURA v1.1: `*_image_paths.csv` and `*_labeled_studies.csv` have **no header row**; labels are
//!   per study (1 = abnormal) and images inherit them; `valid` serves as the test split; groups
//!   are studies, so study-level scoring (mean image probability) works; `body_part` filters
//!   (`XR_SHOULDER`).
//! - NIH ChestX-ray14: `Data_Entry_2017.csv` (the original's trailing comma tolerated), pipe-
//!   separated findings with `No Finding` as all-zero, `train_val_list.txt` / `test_list.txt`,
//!   patients as groups; images found under `images*/` wherever the archives were unpacked.
//!   `BBox_List_2017.csv` boxes (with `Infiltrate` mapped to `Infiltration`) through [`nih_boxes`].
//! - CheXpert: `train.csv` / `valid.csv` with the 14 observations, a view filter, and the
//!   uncertainty policy for -1 labels: `ones`, `zeros`, or `mixed` (U-Ones for Atelectasis and
//!   Edema, U-Zeros for the rest, the common practice).

use super::dataset::{Dataset, Sample, Split};
use super::table::Table;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The folder that `MURA-v1.1/...` paths are relative to: `root` itself or its parent.
fn base_for(root: &Path, prefix: &str) -> PathBuf {
    if root.file_name().is_some_and(|n| n == prefix) {
        root.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        root.to_path_buf()
    }
}

pub fn mura(root: &Path, body_part: Option<&str>) -> Result<Dataset> {
    let base = base_for(root, "MURA-v1.1");
    let dir = base.join("MURA-v1.1");
    let mut samples = Vec::new();
    for (split_name, split) in [("train", Split::Train), ("valid", Split::Test)] {
        let studies = Table::headerless(&dir.join(format!("{split_name}_labeled_studies.csv")))?;
        let mut study_label: HashMap<String, usize> = HashMap::new();
        for (line, f) in &studies.rows {
            let (Some(study), Some(label)) = (f.first(), f.get(1)) else {
                bail!("{}: expected `study_dir/,label`", studies.origin(*line))
            };
            let label: usize = label.parse().with_context(|| {
                format!(
                    "{}: label `{label}` is not 0 or 1 (the file has no header row)",
                    studies.origin(*line)
                )
            })?;
            study_label.insert(study.trim_end_matches('/').to_owned(), label);
        }
        let paths = Table::headerless(&dir.join(format!("{split_name}_image_paths.csv")))?;
        for (line, f) in &paths.rows {
            let rel = f[0].as_str();
            if body_part.is_some_and(|b| !rel.split('/').any(|seg| seg == b)) {
                continue;
            }
            let study = rel.rsplit_once('/').map_or(rel, |(s, _)| s);
            let label = *study_label.get(study).with_context(|| {
                format!(
                    "{}: study {study} is not in {}",
                    paths.origin(*line),
                    studies.file.display()
                )
            })?;
            samples.push(Sample {
                path: base.join(rel),
                label: Some(label),
                split: Some(split),
                group: Some(study.to_owned()),
                origin: paths.origin(*line),
                targets: None,
            });
        }
    }
    if samples.is_empty() {
        bail!(
            "{}: no MURA images{}",
            dir.display(),
            body_part.map_or(String::new(), |b| format!(" for body part {b}"))
        );
    }
    Ok(Dataset {
        root: root.to_path_buf(),
        classes: vec!["negative".into(), "positive".into()],
        samples,
    })
}

pub const NIH_FINDINGS: [&str; 14] = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
];

/// Every file under `root` by file name (the NIH archives unpack into `images_001/images/...`).
fn index_images(root: &Path) -> HashMap<String, PathBuf> {
    let mut out = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "png") {
                out.insert(e.file_name().to_string_lossy().into_owned(), p);
            }
        }
    }
    out
}

pub fn nih(root: &Path) -> Result<Dataset> {
    let entry = ["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"]
        .iter()
        .map(|f| root.join(f))
        .find(|p| p.is_file())
        .with_context(|| format!("{}: no Data_Entry_2017.csv", root.display()))?;
    let table = Table::with_header(&entry)?;
    let (ci, cf, cp) = (
        table.column("Image Index")?,
        table.column("Finding Labels")?,
        table.column("Patient ID")?,
    );
    let list = |f: &str| -> Result<std::collections::HashSet<String>> {
        let file = root.join(f);
        Ok(std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect())
    };
    let (train, test) = (list("train_val_list.txt")?, list("test_list.txt")?);
    let images = index_images(root);
    let mut samples = Vec::new();
    for (line_no, f) in &table.rows {
        let origin = format!("{}:{line_no}", entry.display());
        let name = f.get(ci).map(|s| s.trim()).unwrap_or_default();
        let mut targets = vec![0f32; NIH_FINDINGS.len()];
        for finding in f
            .get(cf)
            .map(String::as_str)
            .unwrap_or_default()
            .split('|')
            .map(str::trim)
        {
            if finding == "No Finding" || finding.is_empty() {
                continue;
            }
            let k = NIH_FINDINGS
                .iter()
                .position(|x| *x == finding)
                .with_context(|| format!("{origin}: unknown finding `{finding}`"))?;
            targets[k] = 1.0;
        }
        let split = if test.contains(name) {
            Split::Test
        } else if train.contains(name) {
            Split::Train
        } else {
            continue;
        };
        let path = images
            .get(name)
            .cloned()
            .unwrap_or_else(|| root.join("images").join(name));
        samples.push(Sample {
            path,
            label: None,
            split: Some(split),
            group: f.get(cp).map(|s| s.trim().to_owned()),
            origin,
            targets: Some(targets),
        });
    }
    Ok(Dataset {
        root: root.to_path_buf(),
        classes: NIH_FINDINGS.iter().map(|s| s.to_string()).collect(),
        samples,
    })
}

/// A labelled box on one image: top-left (x, y) and size, in pixels of the original image.
#[derive(Debug, Clone, PartialEq)]
pub struct FindingBox {
    /// The image's file name (NIH's `Image Index`) or its path relative to the data folder.
    pub image: String,
    /// The finding (a class name); empty when the file has no label column.
    pub finding: String,
    pub xywh: [f32; 4],
    /// `file:line`, for error messages.
    pub origin: String,
}

/// NIH ChestX-ray14's `root/BBox_List_2017.csv`.
pub fn nih_boxes(root: &Path) -> Result<Vec<FindingBox>> {
    read_boxes(&root.join("BBox_List_2017.csv"))
}

/// Boxes from a CSV in one of two layouts: NIH's `BBox_List_2017.csv` (columns by position:
/// `Image Index`, `Finding Label`, `Bbox [x`, `y`, `w`, `h]`; `Infiltrate` is mapped to the
/// `Infiltration` of `Data_Entry_2017.csv`), or any CSV whose header names `path`, `x`, `y`, `w`,
/// `h` and optionally `label`.
pub fn read_boxes(file: &Path) -> Result<Vec<FindingBox>> {
    let t = Table::with_header(file)?;
    let nih = t.header.first().is_some_and(|h| h == "Image Index");
    let cols: [Option<usize>; 6] = if nih {
        [Some(0), Some(1), Some(2), Some(3), Some(4), Some(5)]
    } else {
        let col = |name: &str| t.header.iter().position(|h| h.eq_ignore_ascii_case(name));
        let need = |name: &str| {
            col(name).with_context(|| {
                format!(
                    "{}: a box file needs the columns path, x, y, w, h (and optionally label), or \
                     NIH's BBox_List_2017.csv header; found: {}",
                    t.file.display(),
                    t.header.join(", ")
                )
            })
        };
        [
            Some(need("path")?),
            col("label"),
            Some(need("x")?),
            Some(need("y")?),
            Some(need("w")?),
            Some(need("h")?),
        ]
    };
    let mut out = Vec::new();
    for (line, f) in &t.rows {
        let origin = format!("{}:{line}", t.file.display());
        let text = |k: usize| {
            cols[k]
                .and_then(|c| f.get(c))
                .map_or("", |s| s.trim())
                .to_owned()
        };
        let num = |k: usize| -> Result<f32> {
            let v = text(k);
            v.parse::<f32>()
                .ok()
                .filter(|v| v.is_finite() && (k < 4 || *v > 0.0))
                .with_context(|| {
                    format!("{origin}: box coordinate `{v}` is not a number (width and height > 0)")
                })
        };
        let image = text(0);
        if image.is_empty() {
            bail!("{origin}: the box names no image");
        }
        let finding = text(1);
        out.push(FindingBox {
            image,
            finding: if nih && finding == "Infiltrate" {
                "Infiltration".into()
            } else {
                finding
            },
            xywh: [num(2)?, num(3)?, num(4)?, num(5)?],
            origin,
        });
    }
    Ok(out)
}

pub const CHEXPERT_OBSERVATIONS: [&str; 14] = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
];

pub fn chexpert(root: &Path, csv: &str, views: &str, uncertain: &str) -> Result<Dataset> {
    let base = base_for(root, "CheXpert-v1.0-small");
    let dir = if root.join(csv).is_file() {
        root.to_path_buf()
    } else {
        base.join("CheXpert-v1.0-small")
    };
    let file = dir.join(csv);
    let table = Table::with_header(&file)?;
    let (cpath, cview) = (table.column("Path")?, table.column("Frontal/Lateral")?);
    let cols: Vec<usize> = CHEXPERT_OBSERVATIONS
        .iter()
        .map(|o| table.column(o))
        .collect::<Result<_>>()?;
    let policy = |obs: &str| -> Result<f32> {
        Ok(match uncertain {
            "ones" => 1.0,
            "zeros" => 0.0,
            "mixed" => {
                if obs == "Atelectasis" || obs == "Edema" {
                    1.0
                } else {
                    0.0
                }
            }
            other => bail!("uncertain: `{other}` is not ones, zeros or mixed"),
        })
    };
    let split = if csv.contains("valid") {
        Split::Test
    } else {
        Split::Train
    };
    let mut samples = Vec::new();
    for (line_no, f) in &table.rows {
        let origin = format!("{}:{line_no}", file.display());
        let view = f.get(cview).map(|s| s.trim()).unwrap_or_default();
        if views != "all" && !view.eq_ignore_ascii_case(views) {
            continue;
        }
        let mut targets = Vec::with_capacity(cols.len());
        for (k, &c) in cols.iter().enumerate() {
            let v = f.get(c).map(|s| s.trim()).unwrap_or_default();
            targets.push(match v {
                "" => 0.0,
                "-1.0" | "-1" => policy(CHEXPERT_OBSERVATIONS[k])?,
                x => x
                    .parse::<f32>()
                    .with_context(|| format!("{origin}: `{x}` is not 1.0, 0.0, -1.0 or blank"))?,
            });
        }
        let rel = f.get(cpath).map(|s| s.trim()).unwrap_or_default();
        let patient = rel
            .split('/')
            .find(|s| s.starts_with("patient"))
            .map(str::to_owned);
        samples.push(Sample {
            path: base.join(rel),
            label: None,
            split: Some(split),
            group: patient,
            origin,
            targets: Some(targets),
        });
    }
    Ok(Dataset {
        root: root.to_path_buf(),
        classes: CHEXPERT_OBSERVATIONS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        samples,
    })
}
