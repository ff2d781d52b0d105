//! Datasets as lists of labelled image files, read from the layouts X-ray researchers have: a
//! folder with `labels.csv`, or one sub-folder per class. Splits are grouped (by patient or study)
//! so no group straddles train and validation.

use super::table::Table;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub use super::dataset::{Dataset, Sample, Split};

/// `root/labels.csv` with a header naming at least `path` and `label`, optionally `split` and
/// `patient` or `study`. `classes`, when given, fixes the label set and its order.
pub fn folder_with_csv(root: &Path, csv: &str, classes: Option<&[String]>) -> Result<Dataset> {
    let table = Table::with_header(&root.join(csv))?;
    if table.header.is_empty() {
        bail!("{} is empty", table.file.display())
    }
    let path_col = table.column("path")?;
    let label_col = table.find("label");
    let split_col = table.find("split");
    let group_col = table.find("patient").or_else(|| table.find("study"));
    let mut raw = Vec::new();
    for (line, f) in &table.rows {
        let get = |c: Option<usize>| c.and_then(|c| f.get(c)).filter(|s| !s.is_empty()).cloned();
        let origin = table.origin(*line);
        let Some(path) = get(Some(path_col)) else {
            bail!("{origin}: empty `path`")
        };
        let split = match get(split_col) {
            Some(s) => Some(
                Split::parse(&s)
                    .with_context(|| format!("{origin}: split `{s}` is not train, val or test"))?,
            ),
            None => None,
        };
        raw.push((
            root.join(path),
            get(label_col),
            split,
            get(group_col),
            origin,
        ));
    }
    let classes: Vec<String> = match classes {
        Some(c) => c.to_vec(),
        None => raw
            .iter()
            .filter_map(|r| r.1.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    refuse_case_twins(&classes, &raw)?;
    let mut samples = Vec::with_capacity(raw.len());
    for (path, label, split, group, origin) in raw {
        let label = match label {
            Some(l) => Some(classes.iter().position(|c| *c == l).with_context(|| {
                format!(
                    "{origin}: label `{l}` is not one of the declared classes ({})",
                    classes.join(", ")
                )
            })?),
            None => None,
        };
        samples.push(Sample {
            path,
            label,
            split,
            group,
            origin,
            targets: None,
        });
    }
    if samples.is_empty() {
        bail!("{} lists no images", table.file.display());
    }
    Ok(Dataset {
        root: root.to_path_buf(),
        classes,
        samples,
    })
}

type RawRow = (
    PathBuf,
    Option<String>,
    Option<Split>,
    Option<String>,
    String,
);

/// Two labels that differ only by case (`Depuy`, `depuy`) are a typo, not two classes: one of
/// them would train an almost empty class.
fn refuse_case_twins(classes: &[String], raw: &[RawRow]) -> Result<()> {
    for (i, a) in classes.iter().enumerate() {
        if let Some(b) = classes[i + 1..].iter().find(|b| b.eq_ignore_ascii_case(a)) {
            let row = |l: &str| {
                raw.iter()
                    .find(|r| r.1.as_deref() == Some(l))
                    .map_or(String::new(), |r| format!(" (first at {})", r.4))
            };
            bail!(
                "labels `{a}`{} and `{b}`{} differ only by case; write one spelling (pretext treats them as two classes)",
                row(a),
                row(b)
            );
        }
    }
    Ok(())
}

/// One sub-folder per class (`root/<class>/*.png`), or `root/<split>/<class>/*` when the first
/// level is made of `train`/`val`/`test`.
pub fn class_folders(root: &Path) -> Result<Dataset> {
    let is_image = |p: &Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| ["png", "jpg", "jpeg"].contains(&e.to_ascii_lowercase().as_str()))
    };
    let sorted_dirs = |d: &Path| -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .with_context(|| format!("reading {}", d.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        v.sort();
        Ok(v)
    };
    let top = sorted_dirs(root)?;
    let split_layout = !top.is_empty()
        && top.iter().all(|d| {
            d.file_name()
                .and_then(|n| n.to_str())
                .and_then(Split::parse)
                .is_some()
        });
    let mut found: Vec<(PathBuf, String, Option<Split>)> = Vec::new();
    let bases: Vec<(PathBuf, Option<Split>)> = if split_layout {
        top.iter()
            .map(|d| {
                (
                    d.clone(),
                    Split::parse(&d.file_name().unwrap().to_string_lossy()),
                )
            })
            .collect()
    } else {
        vec![(root.to_path_buf(), None)]
    };
    for (base, split) in bases {
        for class_dir in sorted_dirs(&base)? {
            let class = class_dir
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let mut files: Vec<PathBuf> = std::fs::read_dir(&class_dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_image(p))
                .collect();
            files.sort();
            found.extend(files.into_iter().map(|f| (f, class.clone(), split)));
        }
    }
    let classes: Vec<String> = found
        .iter()
        .map(|f| f.1.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if found.is_empty() {
        bail!(
            "{}: no images found in class sub-folders (expected root/<class>/*.png|jpg)",
            root.display()
        );
    }
    let samples = found
        .into_iter()
        .map(|(path, class, split)| Sample {
            origin: path.display().to_string(),
            label: classes.iter().position(|c| *c == class),
            split,
            group: None,
            targets: None,
            path,
        })
        .collect();
    Ok(Dataset {
        root: root.to_path_buf(),
        classes,
        samples,
    })
}

/// Opens a data input as its `source` option says: `folder` (default: `labels.csv`, or the file
/// named in `labels`, else class folders), `mura`, `nih` or `chexpert` (see `formats`).
///
/// Every listed file must lie inside `root` (a path is relative to the folder and may not leave
/// it; a symlink inside the folder is followed, and its target is part of the folder's
/// fingerprint) and be a regular file where it exists, and no image may sit in two splits.
pub fn open_with(
    root: &Path,
    options: &serde_json::Map<String, serde_json::Value>,
) -> Result<Dataset> {
    let ds = read_layout(root, options)?;
    check_files(&ds)?;
    Ok(ds)
}

fn read_layout(
    root: &Path,
    options: &serde_json::Map<String, serde_json::Value>,
) -> Result<Dataset> {
    let opt = |k: &str| options.get(k).and_then(|v| v.as_str());
    match opt("source").unwrap_or("folder") {
        "folder" => match options.get("classes").and_then(|v| v.as_array()) {
            // Declared classes fix the label set and its order; any other label is an error.
            Some(list) => {
                let classes: Vec<String> = list
                    .iter()
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                    .collect();
                folder_with_csv(root, opt("labels").unwrap_or("labels.csv"), Some(&classes))
            }
            None => open(root, opt("labels")),
        },
        "mura" => super::formats::mura(root, opt("body_part")),
        "nih" => super::formats::nih(root),
        "chexpert" => super::formats::chexpert(
            root,
            opt("csv").unwrap_or("train.csv"),
            opt("views").unwrap_or("frontal"),
            opt("uncertain").unwrap_or("mixed"),
        ),
        other => bail!(
            "{}: unknown data source `{other}` (folder, mura, nih, chexpert)",
            root.display()
        ),
    }
}

/// The rules [`open_with`] states: files inside the folder, regular files (a FIFO or a device
/// would block the reader forever), one split per image.
fn check_files(ds: &Dataset) -> Result<()> {
    let mut split_of: std::collections::HashMap<&Path, (Option<Split>, &str)> =
        std::collections::HashMap::new();
    for s in &ds.samples {
        let inside = s.path.strip_prefix(&ds.root).is_ok_and(|rel| {
            rel.components().all(|c| {
                matches!(
                    c,
                    std::path::Component::Normal(_) | std::path::Component::CurDir
                )
            })
        });
        if !inside {
            bail!(
                "{}: `{}` is outside the data folder {}; paths are relative to the folder and may not leave it (copy or link the image into the folder)",
                s.origin,
                s.path.display(),
                ds.root.display()
            );
        }
        if let Ok(meta) = std::fs::metadata(&s.path) {
            if !meta.is_file() {
                bail!(
                    "{}: `{}` is not a regular file (a folder, FIFO, socket or device); list image files only",
                    s.origin,
                    s.path.display()
                );
            }
        }
        if let Some((split, origin)) = split_of.insert(&s.path, (s.split, &s.origin)) {
            if split != s.split {
                bail!(
                    "{}: `{}` is listed in the {:?} split here and in the {:?} split at {origin}; an image in two splits leaks the test set",
                    s.origin,
                    s.path.display(),
                    s.split.unwrap_or(Split::Train),
                    split.unwrap_or(Split::Train)
                );
            }
        }
    }
    Ok(())
}

/// Opens a data folder: `labels.csv` if present (or the file named in `labels`), class folders otherwise.
pub fn open(root: &Path, labels: Option<&str>) -> Result<Dataset> {
    let csv = labels.unwrap_or("labels.csv");
    if root.join(csv).is_file() {
        folder_with_csv(root, csv, None)
    } else if labels.is_some() {
        bail!("{}: labels file `{csv}` not found", root.display())
    } else {
        class_folders(root)
    }
}

/// Indices of samples per split. Samples without a split go to train; `val_fraction` of the train
/// groups (stratified by the group's majority label, seeded) become validation when the data has
/// no validation split of its own.
pub fn split_indices(ds: &Dataset, val_fraction: f64, seed: u64) -> BTreeMap<Split, Vec<usize>> {
    let mut out: BTreeMap<Split, Vec<usize>> = BTreeMap::new();
    for (i, s) in ds.samples.iter().enumerate() {
        out.entry(s.split.unwrap_or(Split::Train))
            .or_default()
            .push(i);
    }
    if out.contains_key(&Split::Val) || val_fraction <= 0.0 {
        return out;
    }
    let train = out.remove(&Split::Train).unwrap_or_default();
    // Group -> members; ungrouped samples are their own group.
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for &i in &train {
        let key = ds.samples[i]
            .group
            .clone()
            .unwrap_or_else(|| format!("#{i}"));
        groups.entry(key).or_default().push(i);
    }
    let mut by_label: BTreeMap<Option<usize>, Vec<Vec<usize>>> = BTreeMap::new();
    for members in groups.into_values() {
        let label = ds.samples[members[0]].label;
        by_label.entry(label).or_default().push(members);
    }
    let (mut keep, mut val) = (Vec::new(), Vec::new());
    let mut rng = Rng::new(seed);
    for (_, mut groups) in by_label {
        rng.shuffle(&mut groups);
        let total: usize = groups.iter().map(Vec::len).sum();
        let want = (total as f64 * val_fraction).round() as usize;
        let mut taken = 0;
        for g in groups {
            if taken < want {
                taken += g.len();
                val.extend(g);
            } else {
                keep.extend(g);
            }
        }
    }
    keep.sort_unstable();
    val.sort_unstable();
    out.insert(Split::Train, keep);
    out.insert(Split::Val, val);
    out
}

/// A seeded subsample of `indices` keeping `fraction` of each class (at least one image of a
/// class that has any), in their original order: the label-fraction axis of semi-supervised
/// studies. Unlabelled samples are kept whole.
pub fn subsample_per_class(
    ds: &Dataset,
    indices: &[usize],
    fraction: f64,
    seed: u64,
) -> Vec<usize> {
    let mut by_label: BTreeMap<Option<usize>, Vec<usize>> = BTreeMap::new();
    for &i in indices {
        by_label.entry(ds.samples[i].label).or_default().push(i);
    }
    let mut rng = Rng::new(seed ^ 0x1ABE_F8AC);
    let mut kept = Vec::new();
    for (label, mut members) in by_label {
        if label.is_some() {
            let want = ((members.len() as f64 * fraction).round() as usize).clamp(1, members.len());
            rng.shuffle(&mut members);
            members.truncate(want);
        }
        kept.extend(members);
    }
    kept.sort_unstable();
    kept
}

/// Grouped, label-stratified k-fold: the train groups are dealt to `k` folds (seeded shuffle per
/// label, largest groups first, each to the currently smallest fold) and fold `fold` becomes
/// the validation split. Test rows stay test.
pub fn kfold_indices(
    ds: &Dataset,
    k: usize,
    fold: usize,
    seed: u64,
) -> Result<BTreeMap<Split, Vec<usize>>> {
    if k < 2 || fold >= k {
        bail!("k-fold needs folds >= 2 and 0 <= fold < folds (got folds {k}, fold {fold})");
    }
    let mut out: BTreeMap<Split, Vec<usize>> = BTreeMap::new();
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, s) in ds.samples.iter().enumerate() {
        match s.split {
            Some(Split::Test) => out.entry(Split::Test).or_default().push(i),
            _ => groups
                .entry(s.group.clone().unwrap_or_else(|| format!("#{i}")))
                .or_default()
                .push(i),
        }
    }
    let mut by_label: BTreeMap<Option<usize>, Vec<Vec<usize>>> = BTreeMap::new();
    for members in groups.into_values() {
        by_label
            .entry(ds.samples[members[0]].label)
            .or_default()
            .push(members);
    }
    let mut rng = Rng::new(seed);
    let mut folds: Vec<Vec<usize>> = vec![Vec::new(); k];
    for (_, mut gs) in by_label {
        rng.shuffle(&mut gs);
        gs.sort_by_key(|g| std::cmp::Reverse(g.len()));
        let mut sizes = vec![0usize; k];
        for g in gs {
            let target = (0..k).min_by_key(|&f| (sizes[f], f)).expect("k >= 2");
            sizes[target] += g.len();
            folds[target].extend(g);
        }
    }
    for (f, members) in folds.into_iter().enumerate() {
        out.entry(if f == fold { Split::Val } else { Split::Train })
            .or_default()
            .extend(members);
    }
    out.values_mut().for_each(|v| v.sort_unstable());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds() -> Dataset {
        let samples = (0..40)
            .map(|i| Sample {
                path: PathBuf::from(format!("{i}.png")),
                label: Some(i % 2),
                split: if i >= 36 { Some(Split::Test) } else { None },
                group: Some(format!("p{}", i / 2)),
                origin: String::new(),
                targets: None,
            })
            .collect();
        Dataset {
            root: PathBuf::new(),
            classes: vec!["a".into(), "b".into()],
            samples,
        }
    }

    #[test]
    fn label_fractions_subsample_each_class_with_a_fixed_seed() {
        let d = ds();
        let train: Vec<usize> = (0..36).collect();
        let quarter = subsample_per_class(&d, &train, 0.25, 0);
        let per_class = |v: &[usize], c: usize| v.iter().filter(|&&i| i % 2 == c).count();
        assert_eq!((per_class(&quarter, 0), per_class(&quarter, 1)), (5, 5)); // round(18/4)
        assert_eq!(quarter, subsample_per_class(&d, &train, 0.25, 0), "seeded");
        assert_ne!(quarter, subsample_per_class(&d, &train, 0.25, 1));
        assert!(quarter.windows(2).all(|w| w[0] < w[1]), "order kept");
        let tiny = subsample_per_class(&d, &train, 0.001, 0);
        assert_eq!(
            (per_class(&tiny, 0), per_class(&tiny, 1)),
            (1, 1),
            "a class keeps one image"
        );
        assert_eq!(subsample_per_class(&d, &train, 1.0, 3), train);
    }

    #[test]
    fn kfold_partitions_train_by_group_and_keeps_test() {
        let d = ds();
        let mut seen_val = Vec::new();
        for fold in 0..3 {
            let s = kfold_indices(&d, 3, fold, 7).unwrap();
            assert_eq!(s[&Split::Test], vec![36, 37, 38, 39]);
            let val = &s[&Split::Val];
            let groups = |v: &[usize]| {
                v.iter()
                    .map(|&i| d.samples[i].group.clone().unwrap())
                    .collect::<std::collections::BTreeSet<_>>()
            };
            assert!(
                groups(val).is_disjoint(&groups(&s[&Split::Train])),
                "a patient straddles train and validation"
            );
            seen_val.extend(val.iter().copied());
        }
        seen_val.sort_unstable();
        assert_eq!(
            seen_val,
            (0..36).collect::<Vec<_>>(),
            "every train image is validation exactly once"
        );
        assert!(kfold_indices(&d, 3, 3, 0).is_err());
    }

    #[test]
    fn validation_split_is_grouped_and_stratified() {
        let s = split_indices(&ds(), 0.25, 1);
        let val = &s[&Split::Val];
        assert!(!val.is_empty() && val.iter().all(|&i| i < 36));
        let labels: Vec<usize> = val.iter().map(|&i| i % 2).collect();
        assert!(
            labels.contains(&0) && labels.contains(&1),
            "both labels in validation"
        );
    }
}
