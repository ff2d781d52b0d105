//! Hostile but fair input: data folders and caches that a careless or malicious lab mate could
//! leave behind. Each case is refused with a message naming the file (and row), or handled
//! without losing or corrupting work; none hangs or panics.

use crate::util::Project;
use std::path::Path;
use std::time::Duration;

fn chest_jpeg(i: usize) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/chest-pneumonia224/train/NORMAL");
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v[i].clone()
}

/// A labelled folder `data/d` of real images: `rows` are (file, label, split).
fn folder(p: &Project, rows: &[(&str, &str, &str)]) {
    let mut csv = String::from("path,label,split\n");
    for (k, (file, label, split)) in rows.iter().enumerate() {
        let dst = p.path().join("data/d").join(file);
        if !dst.exists() && !file.contains("..") && !file.starts_with('/') {
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(chest_jpeg(k), &dst).unwrap();
        }
        csv.push_str(&format!("{file},{label},{split}\n"));
    }
    p.write("data/d/labels.csv", &csv);
}

/// `data inspect` on `data/d`, which must fail within 20 s (a FIFO would block it forever).
fn inspect_fails(p: &Project) -> String {
    let mut child = p
        .command(&["data", "inspect", "data/d"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("`data inspect` hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn paths_outside_the_data_folder_are_refused_with_their_row() {
    let p = Project::new();
    p.write("secret.jpg", "not for training");
    for path in ["../../secret.jpg", "/etc/passwd"] {
        folder(&p, &[("a.jpg", "x", "train"), (path, "y", "train")]);
        let e = inspect_fails(&p);
        assert!(
            e.contains("labels.csv:3") && e.contains("outside the data folder"),
            "{path}: {e}"
        );
    }
}

#[test]
fn a_fifo_listed_as_an_image_is_refused_not_waited_on() {
    let p = Project::new();
    folder(&p, &[("a.jpg", "x", "train"), ("b.jpg", "y", "train")]);
    let fifo = p.path().join("data/d/pipe.jpg");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let mut csv = std::fs::read_to_string(p.path().join("data/d/labels.csv")).unwrap();
    csv.push_str("pipe.jpg,y,train\n");
    p.write("data/d/labels.csv", &csv);
    let e = inspect_fails(&p);
    assert!(
        e.contains("labels.csv:4") && e.contains("not a regular file"),
        "{e}"
    );
}

#[test]
fn labels_that_differ_only_by_case_and_images_in_two_splits_are_refused() {
    let p = Project::new();
    folder(
        &p,
        &[("a.jpg", "depuy", "train"), ("b.jpg", "Depuy", "train")],
    );
    let e = inspect_fails(&p);
    assert!(
        e.contains("`Depuy`") && e.contains("`depuy`") && e.contains("differ only by case"),
        "{e}"
    );

    folder(
        &p,
        &[
            ("a.jpg", "x", "train"),
            ("b.jpg", "y", "test"),
            ("a.jpg", "x", "test"),
        ],
    );
    let e = inspect_fails(&p);
    assert!(
        e.contains("labels.csv:4") && e.contains("labels.csv:2") && e.contains("two splits"),
        "{e}"
    );
}

#[test]
fn a_byte_order_mark_in_labels_csv_is_read_as_text_editors_write_it() {
    let p = Project::new();
    folder(&p, &[("a.jpg", "x", "train"), ("b.jpg", "y", "test")]);
    let csv = std::fs::read_to_string(p.path().join("data/d/labels.csv")).unwrap();
    p.write(
        "data/d/labels.csv",
        &format!("\u{feff}{}", csv.replace('\n', "\r\n")),
    );
    p.run(&["data", "inspect", "data/d"]).ok();
}

#[test]
fn a_symlink_loop_in_a_data_folder_blocks_its_stages_with_the_path() {
    let p = Project::new();
    folder(&p, &[("a.jpg", "x", "train"), ("b.jpg", "y", "test")]);
    std::os::unix::fs::symlink("..", p.path().join("data/d/up")).unwrap();
    p.write(
        "pipelines/p.yaml",
        "data:\n  d: { path: data/d }\nstages:\n  ev:\n    kind: command\n    run: 'true'\n    inputs: { d: data.d }\n",
    );
    let r = p.run(&["run", "pipelines/p.yaml"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("symlink loop") && r.stderr.contains("data/d/up"),
        "{}",
        r.stderr
    );
}

/// prep -> train -> eval, each a command stage with one output file.
const CHAIN: &str = r#"
vars:
  epochs: 1
stages:
  prep:
    kind: command
    run: echo prep >> "$COUNTS/prep"; echo p > "$PRETEXT_OUT/p.txt"
  train:
    kind: command
    run: echo train >> "$COUNTS/train"; cat "$PRETEXT_IN_P/p.txt" > "$PRETEXT_OUT/t.txt"; echo ${epochs} >> "$PRETEXT_OUT/t.txt"
    inputs: { p: prep.out }
  eval:
    kind: command
    run: echo eval >> "$COUNTS/eval"; cat "$PRETEXT_IN_T/t.txt" > "$PRETEXT_OUT/e.txt"
    inputs: { t: train.out }
"#;

fn entry_of(p: &Project, needle: &str) -> std::path::PathBuf {
    std::fs::read_dir(p.path().join("cache/command"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|d| d.join("out").join(needle).exists())
        .unwrap()
}

#[test]
fn a_damaged_entry_is_recomputed_with_a_warning_not_served() {
    let p = Project::new();
    p.write("pipelines/c.yaml", CHAIN);
    p.run(&["run", "pipelines/c.yaml"]).ok();
    // An output cut short, then a manifest cut short.
    std::fs::write(entry_of(&p, "t.txt").join("out/t.txt"), "p").unwrap();
    let st = p.run(&["status", "pipelines/c.yaml"]);
    assert!(
        st.stdout.contains("train") && st.stdout.contains("damaged"),
        "{}",
        st.stdout
    );
    let r = p.run(&["run", "pipelines/c.yaml", "-v"]);
    r.ok();
    assert!(
        r.stderr.contains("damaged") && r.stderr.contains("t.txt has 1 bytes"),
        "{}",
        r.stderr
    );
    assert_eq!(
        [p.count("prep"), p.count("train"), p.count("eval")],
        [1, 2, 1]
    );
    let manifest = entry_of(&p, "p.txt").join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, &text[..text.len() / 2]).unwrap();
    p.run(&["run", "pipelines/c.yaml"]).ok();
    assert_eq!(p.count("prep"), 2, "a truncated manifest is not a hit");
    p.run(&["verify"]).ok();
}

#[test]
fn verify_remove_takes_the_entries_computed_from_a_corrupted_one() {
    let p = Project::new();
    p.write("pipelines/c.yaml", CHAIN);
    p.run(&["run", "pipelines/c.yaml"]).ok();
    // Same size, other bytes: only hashing finds it.
    std::fs::write(entry_of(&p, "p.txt").join("out/p.txt"), "x\n").unwrap();
    let r = p.run(&["verify", "--remove"]);
    r.ok();
    assert!(
        r.stdout.contains("computed from a corrupted entry"),
        "{}",
        r.stdout
    );
    assert_eq!(
        p.entries("command"),
        0,
        "prep and everything built on it are gone"
    );
    p.run(&["run", "pipelines/c.yaml"]).ok();
    assert_eq!(
        [p.count("prep"), p.count("train"), p.count("eval")],
        [2, 2, 2]
    );
    p.run(&["verify"]).ok();
}

#[test]
fn symlinks_planted_in_the_cache_are_never_followed() {
    let p = Project::new();
    p.write("pipelines/c.yaml", CHAIN);
    let keys = p.status("pipelines/c.yaml");
    let prep = &keys.iter().find(|s| s.0 == "prep").unwrap().2;
    let victim = p.path().join("victim");
    p.write("victim/precious.txt", "keep me");
    std::fs::create_dir_all(p.path().join("cache/tmp")).unwrap();
    std::os::unix::fs::symlink(&victim, p.path().join("cache/tmp").join(prep)).unwrap();
    p.run(&["run", "pipelines/c.yaml", "--stage", "prep"]).ok();
    assert_eq!(
        std::fs::read_to_string(victim.join("precious.txt")).unwrap(),
        "keep me"
    );
    let entry = p.path().join("cache/command").join(prep);
    assert!(
        std::fs::symlink_metadata(&entry).unwrap().is_dir(),
        "a real folder was published"
    );

    let train = &keys.iter().find(|s| s.0 == "train").unwrap().2;
    let target = p.path().join("elsewhere.txt");
    std::os::unix::fs::symlink(&target, p.path().join(format!("cache/locks/{train}.lock")))
        .unwrap();
    let r = p.run(&["run", "pipelines/c.yaml"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("symlink") && r.stderr.contains(&format!("{train}.lock")),
        "{}",
        r.stderr
    );
    assert!(!target.exists(), "no file was created through the link");
}

#[test]
fn gc_keeps_recent_set_results_and_their_upstream_and_waits_for_live_runs() {
    let p = Project::new();
    p.write("pipelines/c.yaml", CHAIN);
    p.run(&["run", "pipelines/c.yaml"]).ok();
    p.run(&["run", "pipelines/c.yaml", "--set", "epochs=2"])
        .ok();
    assert_eq!(p.entries("command"), 5);
    let r = p.run(&["gc"]);
    r.ok();
    assert!(r.stdout.contains("5 of 5 entries kept"), "{}", r.stdout);
    let journal = std::fs::read_dir(p.path().join("cache/journal"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = std::fs::read_to_string(&journal).unwrap();
    assert!(
        text.contains("\"set\":[\"epochs=2\"]") && text.contains("at_unix"),
        "{text}"
    );

    // A run in progress holds the cache: gc waits for it instead of deleting what it reads.
    p.write(
        "pipelines/slow.yaml",
        "stages:\n  s:\n    kind: command\n    run: touch started; sleep 2\n",
    );
    let mut slow = p
        .command(&["run", "pipelines/slow.yaml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    while !p.path().join("started").exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = std::time::Instant::now();
    let gc = p.run(&["gc", "--keep-days", "0"]);
    gc.ok();
    assert!(gc.stderr.contains("waiting"), "{}", gc.stderr);
    assert!(
        t.elapsed() > Duration::from_millis(500),
        "gc ran beside a live run"
    );
    assert!(slow.wait().unwrap().success());
}

#[test]
fn a_huge_pipeline_plans_in_linear_time_and_deep_nesting_is_refused_at_once() {
    let p = Project::new();
    let mut yaml = String::from("stages:\n");
    for i in 0..30_000 {
        yaml.push_str(&format!("  s{i}:\n    kind: command\n    run: echo {i}\n"));
    }
    p.write("pipelines/big.yaml", &yaml);
    let t = std::time::Instant::now();
    let r = p.run(&["status", "pipelines/big.yaml"]);
    r.ok();
    assert!(r.stdout.contains("0 cached, 30000 stale"), "{}", r.stdout);
    // Linear: under a second here; the per-stage rescans it replaced took over 10 s.
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());

    p.write(
        "pipelines/deep.yaml",
        &format!("stages: {}{}\n", "[".repeat(100_000), "]".repeat(100_000)),
    );
    let t = std::time::Instant::now();
    let r = p.run(&["status", "pipelines/deep.yaml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("nested 100000 levels deep"),
        "{}",
        r.stderr
    );
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn an_included_file_that_is_not_yaml_is_quoted_briefly() {
    let p = Project::new();
    let blob: String = (0..5000)
        .map(|i| format!("line {i} of a big text file\n"))
        .collect();
    p.write("notes.txt", &blob);
    p.write(
        "pipelines/i.yaml",
        "include: [../notes.txt]\nstages:\n  a:\n    kind: command\n    run: 'true'\n",
    );
    let r = p.run(&["status", "pipelines/i.yaml"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.len() < 2_000, "{} bytes of error", r.stderr.len());
}

#[test]
fn a_missing_test_split_stops_the_run_before_any_stage_trains() {
    let p = Project::new();
    folder(
        &p,
        &[
            ("a.jpg", "x", "train"),
            ("b.jpg", "y", "train"),
            ("c.jpg", "x", "train"),
            ("d.jpg", "y", "train"),
        ],
    );
    p.write(
        "pipelines/p.yaml",
        "data:\n  d: { path: data/d }\nstages:\n  first:\n    kind: command\n    run: echo ran > first.txt\n  ft:\n    kind: finetune\n    inputs: { data: data.d }\n    params: { model: vit, vit_dims: [16, 1, 2], img_size: 16, patch: 4, epochs: 1, batch: 2, val_fraction: 0.5 }\n  ev:\n    kind: evaluate\n    inputs: { model: ft.model, data: data.d }\n",
    );
    let r = p.run(&["run", "pipelines/p.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("stage `ev` (pipelines/p.yaml:11)")
            && r.stderr.contains("no image is in the Test split"),
        "{}",
        r.stderr
    );
    assert!(!p.path().join("first.txt").exists(), "nothing ran");
}

#[test]
fn an_input_that_contains_the_cache_is_still_a_hit() {
    let p = Project::new();
    p.write("src/a.txt", "a");
    p.write(
        "pipelines/p.yaml",
        "stages:\n  s:\n    kind: command\n    run: ls \"$PRETEXT_IN_TREE\" > \"$PRETEXT_OUT/ls.txt\"\n    inputs: { tree: \"file:.\" }\n",
    );
    p.run(&["run", "pipelines/p.yaml"]).ok();
    assert_eq!(
        p.status("pipelines/p.yaml")[0].1,
        "cached",
        "publishing into cache/ does not change the project's fingerprint"
    );
}

#[test]
fn vars_in_run_are_single_shell_words() {
    let p = Project::new();
    p.write(
        "pipelines/p.yaml",
        "vars:\n  msg: \"a; touch pwned\"\nstages:\n  s:\n    kind: command\n    run: echo ${msg} > \"$PRETEXT_OUT/m.txt\"\n",
    );
    p.run(&["run", "pipelines/p.yaml"]).ok();
    assert!(
        !p.path().join("pwned").exists(),
        "the var's text ran as a command"
    );
    let entry = std::fs::read_dir(p.path().join("cache/command"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        std::fs::read_to_string(entry.join("out/m.txt")).unwrap(),
        "a; touch pwned\n"
    );
}

#[test]
fn a_failed_publish_keeps_the_checkpoint_and_names_the_file() {
    let p = Project::new();
    // The command leaves a symlink among its outputs, which pretext refuses to publish.
    p.write(
        "pipelines/p.yaml",
        "stages:\n  s:\n    kind: command\n    run: echo work > \"$PRETEXT_CHECKPOINT/state\"; ln -s /etc/hostname \"$PRETEXT_OUT/link\"\n",
    );
    let r = p.run(&["run", "pipelines/p.yaml"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("link") && r.stderr.contains("not a regular file"),
        "{}",
        r.stderr
    );
    let key = &p.status("pipelines/p.yaml")[0].2;
    let state = p
        .path()
        .join("cache/tmp")
        .join(key)
        .join("checkpoint/state");
    assert_eq!(
        std::fs::read_to_string(state).unwrap(),
        "work\n",
        "the checkpoint survived"
    );
}

#[test]
fn an_unreadable_checkpoint_restarts_the_stage_instead_of_failing_forever() {
    let p = Project::new();
    folder(
        &p,
        &[
            ("a.jpg", "x", "train"),
            ("b.jpg", "y", "train"),
            ("c.jpg", "x", "train"),
            ("d.jpg", "y", "train"),
            ("e.jpg", "x", "test"),
        ],
    );
    p.write(
        "pipelines/p.yaml",
        "data:\n  d: { path: data/d }\nstages:\n  ft:\n    kind: finetune\n    inputs: { data: data.d }\n    params: { model: vit, vit_dims: [16, 1, 2], img_size: 16, patch: 4, epochs: 1, warmup_epochs: 0, batch: 2, val_fraction: 0.5 }\n",
    );
    let key = &p.status("pipelines/p.yaml")[0].2;
    p.write(
        &format!("cache/tmp/{key}/checkpoint/checkpoint.json"),
        "{ \"epoch\": 1, \"tens",
    );
    let r = p.run(&["run", "pipelines/p.yaml", "-v"]);
    r.ok();
    assert!(
        r.stderr.contains("checkpoint") && r.stderr.contains("unreadable"),
        "{}",
        r.stderr
    );
}

#[test]
fn weights_that_are_not_numbers_are_named_at_the_load() {
    let p = Project::new();
    folder(
        &p,
        &[
            ("a.jpg", "x", "train"),
            ("b.jpg", "y", "train"),
            ("c.jpg", "x", "train"),
            ("d.jpg", "y", "train"),
            ("e.jpg", "x", "test"),
        ],
    );
    let ft = "    kind: finetune\n    params: { model: vit, vit_dims: [16, 1, 2], img_size: 16, patch: 4, epochs: 1, warmup_epochs: 0, batch: 2, val_fraction: 0.5 }\n";
    p.write(
        "pipelines/a.yaml",
        &format!(
            "data:\n  d: {{ path: data/d }}\nstages:\n  ft:\n    inputs: {{ data: data.d }}\n{ft}"
        ),
    );
    p.run(&["run", "pipelines/a.yaml"]).ok();
    let entry = std::fs::read_dir(p.path().join("cache/finetune"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(entry.join("encoder.safetensors")).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(p.path().join("nan.safetensors"), bytes).unwrap();
    p.write(
        "pipelines/b.yaml",
        &format!("data:\n  d: {{ path: data/d }}\nstages:\n  ft2:\n    inputs: {{ data: data.d, init: \"file:nan.safetensors\" }}\n{ft}"),
    );
    let r = p.run(&["run", "pipelines/b.yaml"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("nan.safetensors") && r.stderr.contains("not finite"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_dangling_symlink_in_a_data_folder_is_named() {
    let p = Project::new();
    folder(&p, &[("a.jpg", "x", "train"), ("b.jpg", "y", "test")]);
    std::os::unix::fs::symlink("/nowhere/x.jpg", p.path().join("data/d/gone.jpg")).unwrap();
    p.write(
        "pipelines/p.yaml",
        "data:\n  d: { path: data/d }\nstages:\n  s:\n    kind: command\n    run: 'true'\n    inputs: { d: data.d }\n",
    );
    let r = p.run(&["run", "pipelines/p.yaml"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("gone.jpg") && r.stderr.contains("symlink"),
        "{}",
        r.stderr
    );
}
