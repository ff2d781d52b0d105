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
