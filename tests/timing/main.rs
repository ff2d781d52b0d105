//! `pretext bench train`'s side-by-side harness: each side in its own process, alternated, and a
//! rival measured through it runs as fast as on its own (the twin used to be measured as a child
//! of the process that had just measured candle, about 1.4x slower than alone).
//!
//! A test binary of its own: cargo runs test binaries one after another, so no other test shares
//! the machine while this one compares timings.

#[path = "../it/util.rs"]
#[allow(dead_code)]
mod util;

use std::path::Path;
use util::Project;

fn busy_twin() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/data/busy_twin.py")
}

fn twin_alone() -> f64 {
    let out = std::process::Command::new("python3")
        .arg(busy_twin())
        .args(["--steps", "5"])
        .output()
        .expect("python3 runs");
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    v["step_ms_median"].as_f64().unwrap()
}

/// The fastest of several measurements: what a process gets when nothing else competes, so the
/// comparison holds while other tests share the machine (a harness that slowed its children, by
/// pinning, nicing or crowding them, would slow every one of them).
fn fastest(v: impl IntoIterator<Item = f64>) -> f64 {
    v.into_iter().fold(f64::INFINITY, f64::min)
}

#[test]
fn the_harness_alternates_fresh_processes_and_measures_a_rival_as_it_runs_alone() {
    let p = Project::new();
    let twin = busy_twin();
    let mut alone: Vec<f64> = (0..3).map(|_| twin_alone()).collect();
    let r = p.run(&[
        "bench",
        "train",
        "--model",
        "mae",
        "--img",
        "16",
        "--patch",
        "4",
        "--dim",
        "16",
        "--depth",
        "1",
        "--heads",
        "2",
        "--decoder-dim",
        "16",
        "--decoder-depth",
        "1",
        "--decoder-heads",
        "2",
        "--batch",
        "2",
        "--steps",
        "5",
        "--threads",
        "2",
        "--pairs",
        "3",
        "--json",
        "--twin",
        twin.to_str().unwrap(),
    ]);
    r.ok();
    alone.extend((0..3).map(|_| twin_alone()));
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let pairs = v["pairs"].as_array().unwrap();
    let first: Vec<&str> = pairs.iter().map(|p| p["first"].as_str().unwrap()).collect();
    assert_eq!(first, ["candle", "pytorch", "candle"], "alternated");
    for p in pairs {
        assert_eq!(p["candle"]["impl"], "candle (cpu)");
        let ratio = p["candle"]["steps_per_s"].as_f64().unwrap()
            / p["pytorch"]["steps_per_s"].as_f64().unwrap();
        assert!((p["speed_ratio"].as_f64().unwrap() - ratio).abs() < 1e-9);
    }
    assert!(v["speed_ratio_min"].as_f64() <= v["speed_ratio_median"].as_f64());
    assert!(v["load_at_start"].as_f64().is_some() && v["machine"].as_str().is_some());
    let through = fastest(
        pairs
            .iter()
            .map(|p| p["pytorch"]["step_ms_median"].as_f64().unwrap()),
    );
    let alone = fastest(alone);
    assert!(
        (0.75..1.33).contains(&(through / alone)),
        "the rival took {through:.1} ms a step through the harness, {alone:.1} ms on its own"
    );
}
