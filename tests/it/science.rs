//! The stage kinds on tiny settings with real radiographs from data/: every output exists and is
//! sane, parameter changes rerun only what they should, models learn, gradients reach every
//! parameter, and the report page renders in a real browser.

use crate::util::Project;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// A small real data set: `per_class` train and `test_per_class` test images per shoulder class,
/// and `chest` chest images, copied with a labels.csv in the bundled format.
pub(crate) fn tiny_data(p: &Project, per_class: usize, test_per_class: usize, chest: usize) {
    let src = repo().join("data/shoulder-implant");
    let text = std::fs::read_to_string(src.join("labels.csv")).unwrap();
    let mut csv = String::from("path,label,split\n");
    let mut taken = std::collections::HashMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (path, label, split) = (f[0], f[1], f[2]);
        let want = if split == "train" {
            per_class
        } else {
            test_per_class
        };
        let n = taken
            .entry((label.to_owned(), split.to_owned()))
            .or_insert(0);
        if *n < want {
            *n += 1;
            let dst = p.path().join("data/shoulder").join(path);
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(src.join(path), dst).unwrap();
            csv.push_str(&format!("{path},{label},{split}\n"));
        }
    }
    p.write("data/shoulder/labels.csv", &csv);
    let csrc = repo().join("data/chest-pneumonia224");
    let ctext = std::fs::read_to_string(csrc.join("labels.csv")).unwrap();
    let mut ccsv = String::from("path,label,split,patient\n");
    for line in ctext.lines().skip(1).step_by(97).take(chest) {
        let f: Vec<&str> = line.split(',').collect();
        let dst = p.path().join("data/chest").join(f[0]);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(csrc.join(f[0]), dst).unwrap();
        ccsv.push_str(&format!("{},{},{},{}\n", f[0], f[1], f[2], f[3]));
    }
    p.write("data/chest/labels.csv", &ccsv);
}

/// MAE -> fine-tune -> evaluate at the smallest sizes: a real training chain in a few seconds.
pub(crate) const TINY_FT: &str = r#"
data:
  chest: { path: data/chest }
  shoulder: { path: data/shoulder }
stages:
  mae:
    kind: mae
    inputs: { images: data.chest }
    params: { model: vit, vit_dims: [16, 1, 2], img_size: 16, patch: 4, decoder_dim: 16, decoder_depth: 1, decoder_heads: 2, epochs: 1, batch: 8, recon_images: 2 }
  ft:
    kind: finetune
    inputs: { data: data.shoulder, init: mae.encoder }
    params: { model: vit, vit_dims: [16, 1, 2], img_size: 16, patch: 4, epochs: 2, batch: 8, val_fraction: 0.25 }
  eval:
    kind: evaluate
    inputs: { model: ft.model, data: data.shoulder }
    params: { bootstrap: 20 }
"#;

const TINY: &str = r#"
vars:
  ft_epochs: 1
matrix:
  backbone: [vit, resnet18]
data:
  chest: { path: data/chest }
  shoulder: { path: data/shoulder }
  boxes: { path: data/boxes.csv }
stages:
  chest_mae:
    kind: mae
    inputs: { images: data.chest }
    params: { model: vit, vit_dims: [16, 1, 2], img_size: 16, patch: 4, decoder_dim: 16, decoder_depth: 1, decoder_heads: 2, epochs: 2, batch: 8, recon_images: 2 }
  chest_rotation:
    kind: proxy
    inputs: { images: data.chest, init: chest_mae.encoder }
    params: { task: rotation, model: vit, vit_dims: [16, 1, 2], img_size: 16, patch: 4, epochs: 1, batch: 8 }
  shoulder_jigsaw:
    kind: proxy
    inputs: { images: data.shoulder }
    params: { task: jigsaw, model: "${backbone}", vit_dims: [16, 1, 2], img_size: 32, patch: 8, epochs: 1, batch: 8, jigsaw_perms: 4 }
  shoulder_contrastive:
    kind: proxy
    inputs: { images: data.shoulder }
    params: { task: contrastive, model: vit, vit_dims: [16, 1, 2], img_size: 16, patch: 4, epochs: 1, batch: 8 }
  shoulder_mae_center:
    kind: mae
    inputs: { images: data.shoulder, init: chest_mae.encoder }
    params: { model: vit, vit_dims: [16, 1, 2], img_size: 16, patch: 4, decoder_dim: 16, decoder_depth: 1, decoder_heads: 2, masking: center, epochs: 1, batch: 8, recon_images: 2 }
  shoulder_cnn_masked:
    kind: mae
    inputs: { images: data.shoulder }
    params: { model: resnet18, img_size: 32, patch: 8, mask_ratio: 0.75, epochs: 2, batch: 8, recon_images: 2 }
  ft:
    kind: finetune
    inputs: { data: data.shoulder, init: shoulder_jigsaw.encoder }
    params: { model: "${backbone}", vit_dims: [16, 1, 2], img_size: 32, patch: 8, epochs: "${ft_epochs}", batch: 8, val_fraction: 0.25 }
  ft_mae:
    kind: finetune
    inputs: { data: data.shoulder, init: chest_rotation.encoder }
    params: { model: vit, vit_dims: [16, 1, 2], img_size: 16, patch: 4, epochs: 1, batch: 8, val_fraction: 0.25 }
  eval:
    kind: evaluate
    inputs: { model: ft.model, data: data.shoulder }
    params: { bootstrap: 50 }
  cam:
    kind: gradcam
    inputs: { model: ft.model, data: data.shoulder, boxes: data.boxes }
    params: { overlays: 2 }
  report:
    kind: report
    inputs: { results: [chest_mae, ft@*, eval@*, cam@*] }
"#;

fn entry_metrics(p: &Project, stage: &str) -> serde_json::Value {
    shown(
        p,
        &["show", stage, "--pipeline", "pipelines/tiny.yaml", "--json"],
        stage,
    )
}

/// `pretext show ARGS` of a stage that must have a cache entry.
fn shown(p: &Project, args: &[&str], stage: &str) -> serde_json::Value {
    let r = p.run(args);
    r.ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["cached"], true, "{stage} has an entry");
    v
}

/// Boxes in original-image pixels: the whole of the first test image (no label: its target
/// class; named by its path), the left half of the second for class `zimmer` (named by its file
/// name, as NIH's list does), and one on a training image.
fn boxes_on_test_images(p: &Project) -> String {
    let labels = std::fs::read_to_string(p.path().join("data/shoulder/labels.csv")).unwrap();
    let rows: Vec<Vec<&str>> = labels
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let test: Vec<&str> = rows
        .iter()
        .filter(|r| r[2] == "test")
        .map(|r| r[0])
        .collect();
    let train = rows.iter().find(|r| r[2] == "train").unwrap()[0];
    let size =
        |rel: &str| image::image_dimensions(p.path().join("data/shoulder").join(rel)).unwrap();
    let ((w0, h0), (w1, h1)) = (size(test[0]), size(test[1]));
    format!(
        "path,label,x,y,w,h\n{},,0,0,{w0},{h0}\n{},zimmer,0,0,{},{h1}\n{train},,10,10,20,20\n",
        test[0],
        test[1].rsplit('/').next().unwrap(),
        w1 / 2
    )
}

#[test]
fn every_kind_runs_on_real_xrays_and_reruns_only_downstream() {
    let p = Project::new();
    tiny_data(&p, 6, 3, 16);
    p.write("data/boxes.csv", &boxes_on_test_images(&p));
    p.write("pipelines/tiny.yaml", TINY);
    let r = p.run(&["run", "pipelines/tiny.yaml", "--jobs", "2"]);
    r.ok();

    let mae = entry_metrics(&p, "chest_mae");
    let losses: Vec<f64> = mae["manifest"]["metrics"]["loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!(
        losses.len() == 2 && losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    let recon = image::open(Path::new(mae["dir"].as_str().unwrap()).join("reconstructions.png"))
        .expect("reconstruction PNG decodes");
    assert_eq!(recon.width(), 4 * 16 * 2);
    let cnn = entry_metrics(&p, "shoulder_cnn_masked");
    assert!(cnn["manifest"]["metrics"]["final_loss"]
        .as_f64()
        .unwrap()
        .is_finite());
    let enc = pretext::tasks::net::read_tensors(
        &Path::new(cnn["dir"].as_str().unwrap()).join("encoder.safetensors"),
    )
    .unwrap();
    assert!(
        enc.contains_key("layer4.1.conv2.weight")
            && !enc.keys().any(|k| k.starts_with("decoder_pred")),
        "the CNN encoder is exported without its pixel head"
    );

    let mut non_empty_whole_box = false;
    for backbone in ["vit", "resnet18"] {
        let ev = entry_metrics(&p, &format!("eval@{backbone}"));
        let m = &ev["manifest"]["metrics"];
        let acc = m["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{m}");
        assert_eq!(m["test_images"], 12);
        let ci = m["accuracy_ci95"].as_array().unwrap();
        assert!(
            ci[0].as_f64().unwrap() <= acc && acc <= ci[1].as_f64().unwrap(),
            "{m}"
        );
        let cam = entry_metrics(&p, &format!("cam@{backbone}"));
        let ce = cam["manifest"]["metrics"]["model"]["center_energy"]["mean"]
            .as_f64()
            .unwrap();
        assert!(
            ce > 0.0 && ce <= 1.0,
            "{backbone}: centre energy {ce} (all-zero maps?)"
        );
        let faith = &cam["manifest"]["metrics"]["faithfulness"];
        for who in ["model", "random_baseline"] {
            for curve in ["deletion_auc", "insertion_auc"] {
                let auc = faith[who][curve]["mean"].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&auc), "{who} {curve}: {faith}");
            }
        }
        image::open(Path::new(cam["dir"].as_str().unwrap()).join("overlays.png"))
            .expect("overlay PNG decodes");
        let boxes = &cam["manifest"]["metrics"]["boxes"];
        assert_eq!(boxes["boxes"], 2, "{boxes}");
        assert_eq!(boxes["outside_test_split"], 1, "{boxes}");
        for who in ["model", "random_baseline"] {
            let pg = boxes[who]["pointing_game"].as_f64().unwrap();
            let iou = boxes[who]["iou"]["mean"].as_f64().unwrap();
            assert!(
                (0.0..=1.0).contains(&pg) && (0.0..=1.0).contains(&iou),
                "{boxes}"
            );
        }
        let cam_dir = Path::new(cam["dir"].as_str().unwrap());
        let rows = std::fs::read_to_string(cam_dir.join("boxes.csv")).unwrap();
        let whole: Vec<&str> = rows.lines().nth(1).unwrap().split(',').collect();
        // The first box is the whole first image: it holds the map's peak and all its energy,
        // unless the class has no positive evidence anywhere (an all-zero map points nowhere).
        let maps = std::fs::read_to_string(cam_dir.join("maps.csv")).unwrap();
        let first: Vec<&str> = maps.lines().nth(1).unwrap().split(',').collect();
        assert_eq!(
            first[0], whole[0],
            "maps.csv and boxes.csv list the same first image"
        );
        let num = |s: &str| s.parse::<f64>().unwrap();
        let empty_map = num(first[4]) == 0.0 && num(first[6]) == 0.0;
        let expect = if empty_map { ("0", 0.0) } else { ("1", 1.0) };
        assert_eq!(whole[7], expect.0, "{backbone}: {rows}\n{maps}");
        assert!(
            (num(whole[9]) - expect.1).abs() < 1e-6,
            "{backbone}: {rows}\n{maps}"
        );
        non_empty_whole_box |= !empty_map;
        let ft = entry_metrics(&p, &format!("ft@{backbone}"));
        assert!(ft["manifest"]["metrics"]["train_loss"][0]
            .as_f64()
            .unwrap()
            .is_finite());
        assert!(Path::new(ft["dir"].as_str().unwrap())
            .join("model/model.json")
            .is_file());
    }
    assert!(
        non_empty_whole_box,
        "no backbone explained the first test image"
    );
    let report = entry_metrics(&p, "report");
    let md = std::fs::read_to_string(Path::new(report["dir"].as_str().unwrap()).join("results.md"))
        .unwrap();
    assert!(
        md.contains("| eval@vit |") && md.contains("| eval@resnet18 |"),
        "{md}"
    );
    assert!(
        md.contains("## Do the maps find the boxes?") && md.contains("| cam@vit | 2 | "),
        "{md}"
    );
    // The two backbones explained the same 12 test images: one paired test per statistic.
    assert!(
        md.contains("| centre energy | cam@resnet18 | cam@vit | 12 |")
            && md.contains("| deletion AUC | cam@resnet18 | cam@vit | 12 |"),
        "{md}"
    );

    // A fine-tune param reruns the fine-tunes and what reads them, nothing upstream.
    let st = p.run(&[
        "status",
        "pipelines/tiny.yaml",
        "--set",
        "ft_epochs=2",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    for s in v.as_array().unwrap() {
        let name = s["stage"].as_str().unwrap();
        let expect_stale = name.starts_with("ft@")
            || name.starts_with("eval@")
            || name.starts_with("cam@")
            || name == "report";
        assert_eq!(
            s["state"] == "stale",
            expect_stale,
            "{name}: {}",
            s["state"]
        );
    }
}

#[test]
fn models_learn_on_real_images_and_every_parameter_gets_a_gradient() {
    use candle_core::{Device, Tensor};
    use pretext::data::decode::{decode_all, OnBadImage};
    use pretext::nn::ops::cross_entropy;
    use pretext::nn::tap::Taps;
    use pretext::rng::Rng;
    use pretext::tasks::fit::{optimizer, OptimSpec};
    use pretext::tasks::net::{Net, NetDesc};

    let src = repo().join("data/shoulder-implant");
    let text = std::fs::read_to_string(src.join("labels.csv")).unwrap();
    let rows: Vec<(PathBuf, u32)> = text
        .lines()
        .skip(1)
        .step_by(19)
        .take(16)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                src.join(f[0]),
                ["cofield", "depuy", "tornier", "zimmer"]
                    .iter()
                    .position(|c| *c == f[1])
                    .unwrap() as u32,
            )
        })
        .collect();
    let paths: Vec<PathBuf> = rows.iter().map(|r| r.0.clone()).collect();
    let decoded = decode_all(
        &paths,
        &vec![String::new(); paths.len()],
        32,
        None,
        None,
        OnBadImage::Error,
    )
    .unwrap();
    let x: Vec<f32> = decoded
        .pixels()
        .iter()
        .map(|&v| v as f32 / 255.0 - 0.5)
        .collect();
    let x = Tensor::from_vec(x, (16, 1, 32, 32), &Device::Cpu).unwrap();
    let y = Tensor::new(
        rows.iter().map(|r| r.1).collect::<Vec<u32>>().as_slice(),
        &Device::Cpu,
    )
    .unwrap();
    for (arch, dims) in [
        ("vit", Some([32, 2, 2])),
        ("resnet18", None),
        ("densenet", None),
    ] {
        let desc = NetDesc {
            arch: arch.into(),
            img_size: 32,
            patch: 8,
            vit_dims: dims,
            densenet_dims: Some(vec![8, 16, 2, 2]),
            drop_path: 0.1,
            num_classes: 4,
            weight_init: Default::default(),
        };
        let net = Net::build(&desc, 1, &Device::Cpu).unwrap();
        let mut opt = optimizer(
            &net.params,
            &OptimSpec {
                weight_decay: 0.05,
                betas: (0.9, 0.999),
                layer_decay: None,
                only: None,
                lars: false,
            },
        );
        let mut rng = Rng::new(3);
        let mut first = None;
        let mut last = 0.0;
        for step in 0..25 {
            let loss = cross_entropy(
                &net.logits(&x, Some(&mut rng), &mut Taps::none()).unwrap(),
                &y,
                0.0,
            )
            .unwrap();
            let grads = loss.backward().unwrap();
            if step == 0 {
                // The silent-trap guard: every trainable parameter receives a non-zero gradient.
                for (name, var) in net.params.named() {
                    if name.ends_with("running_mean") || name.ends_with("running_var") {
                        continue;
                    }
                    let g = grads
                        .get(var.as_tensor())
                        .unwrap_or_else(|| panic!("{arch}: `{name}` gets no gradient"));
                    let norm = g
                        .abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(norm > 0.0, "{arch}: `{name}` has an all-zero gradient");
                }
            }
            opt.step(&grads, 2e-3).unwrap();
            last = loss.to_scalar::<f32>().unwrap();
            first.get_or_insert(last);
        }
        assert!(
            last < 0.7 * first.unwrap(),
            "{arch}: loss {} -> {last} did not fall on real images",
            first.unwrap()
        );
    }
}

#[test]
fn report_renders_in_headless_chromium() {
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|c| which(c));
    let Some(chromium) = chromium else {
        assert!(
            std::env::var_os("PRETEXT_REQUIRE_CHROMIUM").is_none(),
            "PRETEXT_REQUIRE_CHROMIUM is set but no chromium is installed"
        );
        eprintln!("SKIPPED report_renders_in_headless_chromium: no chromium on PATH (.ci/run installs it)");
        return;
    };
    let p = Project::new();
    tiny_data(&p, 3, 2, 8);
    // The fine-tune chain of TINY_FT over two seeds, with a scratch route beside it, explained
    // and reported.
    let pipeline = TINY_FT
        .replace(
            "epochs: 2, batch: 8, val_fraction: 0.25 }",
            "epochs: 2, batch: 8, val_fraction: 0.25, seed: \"${seed}\" }",
        )
        .replace("data:\n", "matrix:\n  seed: [0, 1]\ndata:\n");
    let pipeline = format!(
        "{pipeline}  scratch:\n    kind: finetune\n    inputs: {{ data: data.shoulder }}\n    params: {{ model: vit, vit_dims: [16, 1, 2], img_size: 16, patch: 4, epochs: 2, batch: 8, val_fraction: 0.25, seed: \"${{seed}}\" }}\n  eval_scratch:\n    kind: evaluate\n    inputs: {{ model: scratch.model, data: data.shoulder }}\n    params: {{ bootstrap: 20 }}\n  cam:\n    kind: gradcam\n    inputs: {{ model: ft.model, data: data.shoulder }}\n    params: {{ overlays: 4, deletion_steps: 2 }}\n  report:\n    kind: report\n    inputs: {{ results: [mae, ft@*, eval@*, eval_scratch@*, cam@*] }}\n"
    );
    p.write("pipelines/r.yaml", &pipeline);
    p.run(&["run", "pipelines/r.yaml"]).ok();
    let dir = std::fs::read_dir(p.path().join("cache/report"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let page = format!("file://{}", dir.join("index.html").display());
    let browser = |extra: &[&str]| {
        std::process::Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--window-size=1200,3000",
            ])
            .args(extra)
            .arg(&page)
            .output()
            .expect("chromium starts")
    };
    // The page as the browser built it: every element a reader looks for is there.
    let dom = String::from_utf8_lossy(&browser(&["--dump-dom"]).stdout).into_owned();
    for id in [
        "results-table",
        "paired-table",
        "confusion-1",
        "per-class-1",
        "class=\"roc\"",
        "class=\"reliability\"",
        "id=\"curves\"",
        "cam-table",
        "id=\"gallery\"",
        "colorbar",
        "provenance-table",
    ] {
        assert!(
            dom.contains(id),
            "`{id}` is missing from the rendered report"
        );
    }
    assert!(
        dom.contains("true positive rate") && dom.contains("epoch"),
        "axes are labelled"
    );
    assert!(
        dom.contains("predicted") && dom.contains("(p "),
        "gallery tiles are captioned"
    );
    assert!(
        dom.matches("<img src=\"img/").count() >= 2,
        "gallery and reconstructions shown"
    );
    assert!(
        dom.contains("../../evaluate/"),
        "provenance links to the entries' folders"
    );
    let shot = p.path().join("shot.png");
    let out = browser(&[&format!("--screenshot={}", shot.display())]);
    assert!(
        shot.is_file(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = image::open(&shot).unwrap().to_luma8();
    let dark = img.pixels().filter(|p| p.0[0] < 128).count();
    let frac = dark as f64 / (img.width() * img.height()) as f64;
    assert!(
        frac > 0.005,
        "the rendered report is blank ({frac:.4} dark pixels)"
    );
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(cmd))
            .find(|p| p.is_file())
    })
}

/// `pretext` in the repository root against an empty cache: the shipped pipelines as users run them.
fn in_repo(cache: &Path, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pretext"))
        .args(args)
        .args(["--cache", cache.to_str().unwrap(), "--json"])
        .current_dir(repo())
        .env_remove("PRETEXT_CACHE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pretext {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn shipped_pipelines_plan_and_the_matrix_has_every_route_for_both_backbones() {
    let cache = tempfile::tempdir().unwrap();
    let mut files = vec!["pipelines/chest_mae_proxy_shoulder.yaml".to_string()];
    for dir in ["pipelines", "pipelines/routes"] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            // The ImageNet route needs weights that cannot ship (docs/pipelines.md).
            if name.ends_with(".yaml") && !name.contains("imagenet") {
                files.push(format!("{dir}/{name}"));
            }
        }
    }
    for file in &files {
        for profile in [None, Some("smoke"), Some("full")] {
            let mut args = vec!["status", file.as_str()];
            args.extend(profile.iter().flat_map(|p| ["--profile", p]));
            let v = in_repo(cache.path(), &args);
            assert!(!v.as_array().unwrap().is_empty(), "{file} {profile:?}");
        }
    }

    let stages = in_repo(cache.path(), &["status", "pipelines/matrix.yaml"]);
    let mut grid: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for s in stages.as_array().unwrap() {
        let name = s["stage"].as_str().unwrap();
        if s["kind"] != "finetune" {
            continue;
        }
        let shown = in_repo(
            cache.path(),
            &["show", name, "--pipeline", "pipelines/matrix.yaml"],
        );
        let route = name
            .trim_start_matches("ft_")
            .split('@')
            .next()
            .unwrap()
            .trim_end_matches("_cnn")
            .to_string();
        let model = shown["params"]["model"].as_str().unwrap().to_string();
        *grid.entry((route, model)).or_default() += 1;
    }
    let routes = [
        "scratch",
        "chest_mae",
        "chest_mae_chest_proxy",
        "chest_mae_shoulder_proxy",
        "chest_mae_shoulder_mae_center",
        "chest_mae_shoulder_mae_random",
        "shoulder_proxy",
    ];
    for route in routes {
        for model in ["vit", "resnet18"] {
            assert_eq!(
                grid.get(&(route.to_string(), model.to_string())),
                Some(&3),
                "{route} x {model} x 3 seeds: {grid:?}"
            );
        }
    }
    assert_eq!(grid.len(), routes.len() * 2, "{grid:?}");
}

/// Every route of the shipped matrix, as users run it (the repository's pipeline files), on a
/// handful of real X-rays at the smallest sizes: each route's ViT and ResNet-18 reaches the report.
#[test]
fn the_shipped_matrix_runs_every_route_on_tiny_settings() {
    let p = Project::new();
    tiny_data(&p, 6, 3, 16);
    for (tiny, shipped) in [
        ("shoulder", "shoulder-implant"),
        ("chest", "chest-pneumonia224"),
    ] {
        std::fs::rename(
            p.path().join("data").join(tiny),
            p.path().join("data").join(shipped),
        )
        .unwrap();
    }
    for dir in ["pipelines", "pipelines/routes"] {
        std::fs::create_dir_all(p.path().join(dir)).unwrap();
        for e in std::fs::read_dir(repo().join(dir)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), p.path().join(dir).join(e.file_name())).unwrap();
            }
        }
    }
    let overrides = [
        "--profile",
        "smoke",
        "--set",
        "img=32",
        "--set",
        "patch=8",
        "--set",
        "vit_dims=[16, 1, 2]",
    ];
    let mut run = vec!["run", "pipelines/matrix.yaml", "--jobs", "2"];
    run.extend(overrides);
    p.run(&run).ok();
    // `show` resolves the stage under the same profile and overrides as the run; without
    // --pipeline it finds the same entry in the journal of the run just made.
    let mut args = vec![
        "show",
        "report",
        "--pipeline",
        "pipelines/matrix.yaml",
        "--json",
    ];
    args.extend(overrides);
    let report = shown(&p, &args, "report");
    assert_eq!(
        shown(&p, &["show", "report", "--json"], "report")["key"],
        report["key"]
    );
    let md = std::fs::read_to_string(Path::new(report["dir"].as_str().unwrap()).join("results.md"))
        .unwrap();
    for route in [
        "scratch@vit",
        "scratch@resnet18",
        "shoulder_proxy@vit",
        "shoulder_proxy@resnet18",
        "chest_mae",
        "chest_mae_cnn",
        "chest_mae_chest_proxy",
        "chest_mae_chest_proxy_cnn",
        "chest_mae_shoulder_proxy",
        "chest_mae_shoulder_proxy_cnn",
        "chest_mae_shoulder_mae_center",
        "chest_mae_shoulder_mae_center_cnn",
        "chest_mae_shoulder_mae_random",
        "chest_mae_shoulder_mae_random_cnn",
    ] {
        // Test results over 3 seeds; Grad-CAM statistics over the 12 test images.
        for row in [
            format!("| eval_{route} | 3 |"),
            format!("| cam_{route} | 12 |"),
        ] {
            assert!(md.contains(&row), "no row `{row}` in the report:\n{md}");
        }
    }
}
