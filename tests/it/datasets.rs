//! The dataset readers on small trees in the published layouts (MURA, NIH ChestX-ray14, CheXpert),
//! built from real radiographs of data/, through `pretext data inspect`; and bad images.

use crate::util::Project;
use std::path::{Path, PathBuf};

fn real_images(n: usize) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/chest-pneumonia224/train/NORMAL");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v.truncate(n);
    v
}

/// Writes a real X-ray as PNG (MURA and NIH ship PNGs).
fn png(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    image::open(src).unwrap().to_luma8().save(dst).unwrap();
}

fn inspect(p: &Project, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["data", "inspect"];
    all.extend_from_slice(args);
    all.push("--json");
    let r = p.run(&all);
    r.ok();
    serde_json::from_str(&r.stdout).unwrap()
}

#[test]
fn mura_layout_without_header_rows_and_body_part_filter() {
    let p = Project::new();
    let imgs = real_images(6);
    let rows = [
        ("train", "XR_SHOULDER", "patient00001", "study1_positive", 2),
        ("train", "XR_SHOULDER", "patient00002", "study1_negative", 1),
        ("train", "XR_WRIST", "patient00003", "study1_negative", 1),
        ("valid", "XR_SHOULDER", "patient11185", "study1_positive", 2),
    ];
    let (mut k, mut paths, mut studies) = (
        0,
        [String::new(), String::new()],
        [String::new(), String::new()],
    );
    for (split, part, patient, study, n) in rows {
        let s = if split == "train" { 0 } else { 1 };
        let dir = format!("MURA-v1.1/{split}/{part}/{patient}/{study}");
        studies[s].push_str(&format!("{dir}/,{}\n", study.ends_with("positive") as u8));
        for i in 1..=n {
            png(
                &imgs[k],
                &p.path().join("mura").join(format!("{dir}/image{i}.png")),
            );
            paths[s].push_str(&format!("{dir}/image{i}.png\n"));
            k += 1;
        }
    }
    for (s, split) in ["train", "valid"].iter().enumerate() {
        p.write(
            &format!("mura/MURA-v1.1/{split}_image_paths.csv"),
            &paths[s],
        );
        p.write(
            &format!("mura/MURA-v1.1/{split}_labeled_studies.csv"),
            &studies[s],
        );
    }
    let v = inspect(
        &p,
        &["mura", "--format", "mura", "--body-part", "XR_SHOULDER"],
    );
    assert_eq!(v["images"], 5, "{v}");
    assert_eq!(v["per_split"]["train"]["positive"], 2);
    assert_eq!(v["per_split"]["train"]["negative"], 1);
    assert_eq!(v["per_split"]["test"]["positive"], 2);
    assert_eq!(v["groups"], 3, "studies are the groups");
    assert_eq!(
        inspect(&p, &["mura/MURA-v1.1", "--format", "mura"])["images"],
        6,
        "the MURA-v1.1 folder itself works, all body parts"
    );
}

#[test]
fn nih_entries_lists_and_boxes() {
    let p = Project::new();
    let imgs = real_images(4);
    let names = [
        "00000001_000.png",
        "00000001_001.png",
        "00000002_000.png",
        "00000003_000.png",
    ];
    for (src, name) in imgs.iter().zip(names) {
        png(src, &p.path().join("nih/images_001/images").join(name));
    }
    // The original release: a trailing comma and bracketed column names.
    p.write("nih/Data_Entry_2017.csv", "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n\
00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143,\n\
00000001_001.png,Cardiomegaly|Effusion,1,1,58,M,PA,2894,2729,0.143,0.143,\n\
00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171,\n\
00000003_000.png,Infiltration,0,3,74,F,PA,2500,2048,0.168,0.168,\n");
    p.write(
        "nih/train_val_list.txt",
        "00000001_000.png\n00000001_001.png\n00000002_000.png\n",
    );
    p.write("nih/test_list.txt", "00000003_000.png\n");
    p.write("nih/BBox_List_2017.csv", "Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000003_000.png,Infiltrate,225.08,547.02,86.78,79.19\n");
    let v = inspect(&p, &["nih", "--format", "nih"]);
    assert_eq!(v["images"], 4, "{v}");
    assert_eq!(v["per_split"]["train"]["Cardiomegaly"], 2);
    assert_eq!(v["per_split"]["train"]["Effusion"], 1);
    assert_eq!(
        v["per_split"]["train"]["(no positive finding)"], 1,
        "No Finding is all-zero"
    );
    assert_eq!(v["per_split"]["test"]["Infiltration"], 1);
    assert_eq!(v["groups"], 3, "patients are the groups");
    assert!(v["bad"].as_array().unwrap().is_empty());
    let boxes = pretext::data::formats::nih_boxes(&p.path().join("nih")).unwrap();
    assert_eq!(boxes[0].finding, "Infiltration", "Infiltrate is mapped");
    assert_eq!(boxes[0].xywh, [225.08, 547.02, 86.78, 79.19]);
}

#[test]
fn chexpert_views_and_uncertainty_policies() {
    let p = Project::new();
    let imgs = real_images(3);
    let rels = [
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
        "CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg",
        "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg",
    ];
    for (src, rel) in imgs.iter().zip(rels) {
        let dst = p.path().join("cx").join(rel);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(src, dst).unwrap();
    }
    let header = "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices";
    p.write(
        "cx/CheXpert-v1.0-small/train.csv",
        &format!(
            "{header}\n\
{},Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0\n\
{},Female,68,Lateral,,,,,,,-1.0,,,,,,,,\n\
{},Male,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,\n",
            rels[0], rels[1], rels[2]
        ),
    );
    let frontal = inspect(&p, &["cx", "--format", "chexpert"]);
    assert_eq!(
        frontal["images"], 2,
        "lateral views are left out by default: {frontal}"
    );
    let counts = &frontal["per_split"]["train"];
    // mixed policy: U-Ones for Atelectasis and Edema, U-Zeros for Cardiomegaly, Consolidation, Pleural Effusion.
    assert_eq!(counts["Atelectasis"], 1);
    assert_eq!(counts["Edema"], 1);
    assert!(counts.get("Cardiomegaly").is_none(), "{counts}");
    let ones = inspect(
        &p,
        &[
            "cx",
            "--format",
            "chexpert",
            "--uncertain",
            "ones",
            "--views",
            "all",
        ],
    );
    assert_eq!(ones["images"], 3);
    assert_eq!(ones["per_split"]["train"]["Cardiomegaly"], 1);
    assert_eq!(ones["per_split"]["train"]["Edema"], 2);
    let bad = p.run(&[
        "data",
        "inspect",
        "cx",
        "--format",
        "chexpert",
        "--uncertain",
        "maybe",
    ]);
    assert_eq!(bad.code, 1);
    assert!(
        bad.stderr.contains("ones, zeros or mixed"),
        "{}",
        bad.stderr
    );
}

#[test]
fn bad_images_are_named_with_their_row_or_skipped_and_counted() {
    use pretext::data::decode::{decode_all, OnBadImage};
    let p = Project::new();
    let good = real_images(2);
    let truncated = p.path().join("truncated.jpeg");
    let bytes = std::fs::read(&good[0]).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let paths = vec![good[1].clone(), truncated.clone()];
    let origins = vec!["labels.csv:2".to_owned(), "labels.csv:3".to_owned()];
    let err = format!(
        "{:#}",
        decode_all(&paths, &origins, 16, None, None, OnBadImage::Error).unwrap_err()
    );
    assert!(
        err.contains("truncated.jpeg")
            && err.contains("labels.csv:3")
            && err.contains("on_bad_image: skip"),
        "{err}"
    );
    let d = decode_all(&paths, &origins, 16, None, None, OnBadImage::Skip).unwrap();
    assert_eq!((d.len(), d.skipped.len()), (1, 1));
    // A missing file listed in a CSV is reported by inspect, with its row.
    p.write("set/labels.csv", "path,label\nmissing.png,a\n");
    let r = p.run(&["data", "inspect", "set", "--json"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains("missing.png") && r.stdout.contains("labels.csv:2"),
        "{}",
        r.stdout
    );
}

#[test]
fn real_dicom_radiographs_load_and_look_right() {
    use pretext::data::decode::decode_grey;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/smoke/dicom");
    for (file, (w, h)) in [
        ("RG1_UNCR.dcm", (1841, 1955)),
        ("RG3_UNCR.dcm", (1760, 1760)),
    ] {
        let (width, height, px) = pretext::data::dicom::decode(&dir.join(file)).unwrap();
        assert_eq!((width, height), (w, h), "{file}");
        assert!(px.iter().all(|v| (0.0..=1.0).contains(v)));
        let small = decode_grey(&dir.join(file), 128).unwrap();
        if let Some(out) = std::env::var_os("PRETEXT_DEBUG_DIR") {
            image::GrayImage::from_raw(128, 128, small.clone())
                .unwrap()
                .save(Path::new(&out).join(format!("{file}.png")))
                .unwrap();
        }
        // MONOCHROME1 is inverted so dense tissue is bright. Chest PA: the mediastinum (centre
        // columns) is brighter than the lung fields beside it; tibia: see below.
        let px = &small;
        let mean = |ys: std::ops::Range<usize>, xs: std::ops::Range<usize>| {
            let v: Vec<f64> = ys
                .flat_map(|y| xs.clone().map(move |x| px[y * 128 + x] as f64))
                .collect();
            v.iter().sum::<f64>() / v.len() as f64
        };
        if file == "RG1_UNCR.dcm" {
            let (mediastinum, lungs) = (
                mean(40..80, 58..70),
                (mean(40..80, 25..45) + mean(40..80, 83..103)) / 2.0,
            );
            assert!(
                mediastinum > lungs + 10.0,
                "{file}: mediastinum {mediastinum:.0} vs lungs {lungs:.0}"
            );
        } else {
            // Direct exposure beside the leg is black; the collimated margins are white
            // (unexposed), as on film.
            let (bone, air, margin) = (
                mean(10..60, 62..70),
                mean(10..60, 38..44),
                mean(10..120, 0..10),
            );
            assert!(
                bone > air + 100.0 && margin > bone,
                "{file}: tibia {bone:.0}, air {air:.0}, margin {margin:.0}"
            );
        }
    }
}

#[test]
fn sixteen_bit_and_rgb_pngs_decode_to_the_same_grey() {
    use pretext::data::decode::decode_grey;
    let p = Project::new();
    let src = image::open(&real_images(1)[0]).unwrap().to_luma8();
    let (w, h) = src.dimensions();
    // The same radiograph as 16-bit grey and as RGB with equal channels.
    let wide = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(w, h, |x, y| {
        image::Luma([src.get_pixel(x, y).0[0] as u16 * 257])
    });
    wide.save(p.path().join("wide.png")).unwrap();
    let rgb = image::RgbImage::from_fn(w, h, |x, y| {
        let v = src.get_pixel(x, y).0[0];
        image::Rgb([v, v, v])
    });
    rgb.save(p.path().join("rgb.png")).unwrap();
    src.save(p.path().join("grey.png")).unwrap();
    let grey = decode_grey(&p.path().join("grey.png"), 32).unwrap();
    assert_eq!(decode_grey(&p.path().join("wide.png"), 32).unwrap(), grey);
    assert_eq!(decode_grey(&p.path().join("rgb.png"), 32).unwrap(), grey);
}

#[test]
fn inspect_reads_the_bundled_data_whole() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    let p = Project::new();
    let chest = inspect(&p, &[shared.join("chest-pneumonia224").to_str().unwrap()]);
    assert_eq!(chest["images"], 5216);
    assert_eq!(chest["per_split"]["train"]["NORMAL"], 1341);
    assert!(chest["bad"].as_array().unwrap().is_empty());
    let smoke = inspect(&p, &[shared.join("smoke/chest-fullres").to_str().unwrap()]);
    assert_eq!(smoke["images"], 16);
}

#[test]
fn a_label_outside_the_declared_classes_names_its_row() {
    let p = Project::new();
    png(&real_images(1)[0], &p.path().join("set/a.png"));
    p.write(
        "set/labels.csv",
        "path,label\na.png,NORMAL\na.png,PNEUMONIA_FUNGAL\n",
    );
    let r = p.run(&["data", "inspect", "set", "--classes", "NORMAL,PNEUMONIA"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("labels.csv:3")
            && r.stderr.contains("PNEUMONIA_FUNGAL")
            && r.stderr.contains("declared classes"),
        "{}",
        r.stderr
    );
}
