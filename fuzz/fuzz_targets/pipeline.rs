//! Feeds arbitrary bytes to the pipeline loader: any error is fine, a panic is a bug.
//! Run: `cargo +nightly fuzz run pipeline fuzz/corpus/pipeline` (new findings go to the corpus).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pretext::pipeline::{load_plan, LoadOptions};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("fuzz.yaml");
    std::fs::write(&file, data).expect("write input");
    let _ = load_plan(&file, &pretext::tasks::catalog(), &LoadOptions::default());
});
