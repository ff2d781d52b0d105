//! Finding boxes (NIH's `BBox_List_2017.csv`, or `path,label,x,y,w,h`) placed on the test
//! images in map pixels, each with the class whose map it is scored against.

use crate::data::formats::FindingBox;
use crate::tasks::fit::ImageSet;
use anyhow::{bail, Result};
use std::collections::hash_map::Entry;
use std::collections::HashMap;

/// A box on one test image, in map pixels, with the class whose map it is scored against
/// (`None`: the image's target class).
pub(super) struct PlacedBox {
    pub(super) finding: String,
    pub(super) class: Option<usize>,
    pub(super) xywh: [f64; 4],
}

/// The boxes of `file` on the test images, by position in `test`; boxes on other images are
/// counted, not used (NIH's list also covers images outside a chosen test split).
pub(super) fn place_boxes(
    file: &std::path::Path,
    set: &ImageSet,
    test: &[usize],
    classes: &[String],
    size: usize,
) -> Result<(HashMap<usize, Vec<PlacedBox>>, usize)> {
    let boxes = crate::data::formats::read_boxes(file)?;
    let root = &set.dataset.root;
    // A box names its image by the path relative to the data folder, or by file name (NIH's
    // `Image Index`) where that name is unique among the test images.
    let (mut by_path, mut by_name) = (HashMap::new(), HashMap::<String, Vec<usize>>::new());
    for (pos, &i) in test.iter().enumerate() {
        let path = &set.dataset.samples[set.sample_of[i]].path;
        if let Some(name) = path.file_name() {
            by_name
                .entry(name.to_string_lossy().into_owned())
                .or_default()
                .push(pos);
        }
        if let Ok(rel) = path.strip_prefix(root) {
            by_path.insert(rel.to_string_lossy().into_owned(), pos);
        }
    }
    let (mut placed, mut unmatched) = (HashMap::<usize, Vec<PlacedBox>>::new(), 0);
    let mut dims = HashMap::new();
    for b in boxes {
        let pos = match (
            by_path.get(&b.image),
            by_name.get(&b.image).map(Vec::as_slice),
        ) {
            (Some(&pos), _) | (None, Some(&[pos])) => pos,
            (None, Some(_)) => bail!(
                "{}: several test images are named `{}`; name the image by its path relative to {}",
                b.origin,
                b.image,
                root.display()
            ),
            (None, None) => {
                unmatched += 1;
                continue;
            }
        };
        let class = class_of(&b, classes)?;
        let path = &set.dataset.samples[set.sample_of[test[pos]]].path;
        let (w, h) = match dims.entry(pos) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(e) => *e.insert(crate::data::decode::dimensions(path)?),
        };
        let (sx, sy) = (size as f64 / w as f64, size as f64 / h as f64);
        let [x, y, bw, bh] = b.xywh.map(|v| v as f64);
        placed.entry(pos).or_default().push(PlacedBox {
            finding: b.finding,
            class,
            xywh: [x * sx, y * sy, bw * sx, bh * sy],
        });
    }
    Ok((placed, unmatched))
}

fn class_of(b: &FindingBox, classes: &[String]) -> Result<Option<usize>> {
    if b.finding.is_empty() {
        return Ok(None);
    }
    match classes
        .iter()
        .position(|c| c.eq_ignore_ascii_case(&b.finding))
    {
        Some(c) => Ok(Some(c)),
        None => bail!(
            "{}: the box's finding `{}` is not a class of the model ({}); leave the label empty \
             to score the box against each image's target class",
            b.origin,
            b.finding,
            classes.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_files_are_read_in_either_layout_and_bad_rows_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let generic = dir.path().join("boxes.csv");
        std::fs::write(
            &generic,
            "path,label,x,y,w,h\na.jpg,Zimmer,1,2,3,4\nb.jpg,,0,0,5,5\n",
        )
        .unwrap();
        let boxes = crate::data::formats::read_boxes(&generic).unwrap();
        assert_eq!(boxes.len(), 2);
        assert_eq!(boxes[0].xywh, [1.0, 2.0, 3.0, 4.0]);
        let classes = ["depuy".to_string(), "zimmer".to_string()];
        assert_eq!(
            class_of(&boxes[0], &classes).unwrap(),
            Some(1),
            "case-insensitive"
        );
        assert_eq!(
            class_of(&boxes[1], &classes).unwrap(),
            None,
            "no label: target class"
        );
        let mut other = boxes[0].clone();
        other.finding = "Atelectasis".into();
        let e = format!("{:#}", class_of(&other, &classes).unwrap_err());
        assert!(
            e.contains("boxes.csv:2") && e.contains("depuy, zimmer"),
            "{e}"
        );

        std::fs::write(&generic, "path,x,y,w,h\na.jpg,1,2,0,4\n").unwrap();
        let e = format!(
            "{:#}",
            crate::data::formats::read_boxes(&generic).unwrap_err()
        );
        assert!(
            e.contains("boxes.csv:2") && e.contains("`0`"),
            "a zero width is named: {e}"
        );
        std::fs::write(&generic, "image,x,y\na.jpg,1,2\n").unwrap();
        let e = format!(
            "{:#}",
            crate::data::formats::read_boxes(&generic).unwrap_err()
        );
        assert!(e.contains("path, x, y, w, h"), "{e}");
    }
}
