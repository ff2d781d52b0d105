//! The layer table of ARCHITECTURE.md, enforced: every `crate::<room>` path in a file of `src/`
//! must name a room its own room may use (as buck2 checks `BANNED_DEP_PATHS`). The orchestrator
//! (`pipeline`, `cache`, `exec`) and the science (`nn`, `data`, `train`, `tasks`) meet only in
//! `stage`; `cli` alone sees both.

use std::path::{Path, PathBuf};

/// Each room and the rooms it may import (itself always).
const ALLOWED: &[(&str, &[&str])] = &[
    ("rng", &[]),
    ("panics", &[]),
    ("stage", &[]),
    ("nn", &["rng", "panics"]),
    ("data", &["rng", "panics"]),
    ("train", &["rng", "panics", "nn"]),
    ("tasks", &["rng", "panics", "nn", "data", "train", "stage"]),
    ("pipeline", &["stage"]),
    ("cache", &[]),
    ("exec", &["panics", "stage", "pipeline", "cache"]),
    (
        "cli",
        &[
            "rng", "panics", "nn", "data", "train", "tasks", "stage", "pipeline", "cache", "exec",
        ],
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The room of a file: `src/exec/slurm/queue.rs` is `exec`, `src/stage.rs` is `stage`.
fn room(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

#[test]
fn every_room_imports_only_the_rooms_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut broken = Vec::new();
    for file in &files {
        let own = room(&src, file);
        if own == "lib" || own == "main" {
            continue;
        }
        let allowed = ALLOWED
            .iter()
            .find(|(r, _)| *r == own)
            .unwrap_or_else(|| {
                panic!(
                    "room `{own}` ({}) is not in the layer table",
                    file.display()
                )
            })
            .1;
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for (at, _) in code.match_indices("crate::") {
                let used: String = code[at + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if used != own && !allowed.contains(&used.as_str()) {
                    broken.push(format!(
                        "{}:{}: `{own}` imports `{used}`",
                        file.strip_prefix(&src).unwrap().display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports that break the layer table:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_layer_test_sees_a_forbidden_import() {
    // The check itself: a line of `exec` naming `tasks` is caught.
    let line = "use crate::tasks::Catalog;";
    let used: String = line[line.find("crate::").unwrap() + 7..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let exec = ALLOWED.iter().find(|(r, _)| *r == "exec").unwrap().1;
    assert_eq!(used, "tasks");
    assert!(!exec.contains(&used.as_str()));
}
