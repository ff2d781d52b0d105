//! pretext: content-addressed pipelines for self-supervised learning experiments on radiographs.
//!
//! Rooms, bottom up; each imports only the rooms below it (ARCHITECTURE.md has the table, and
//! tests/it/layers.rs enforces it): `rng`, `panics`; the science: `nn` (models), `data`
//! (datasets, decoding, loading), `train` (optimisers, schedules, metrics); `stage` (the `Task`
//! seam, which imports no other room); `tasks` (the stage kinds); the orchestrator: `cache` (keys, fingerprints, the store),
//! `pipeline` (YAML to a plan), `exec` (scheduler and executors), which see kinds only through
//! `stage`; and `cli` on top, the one room that calls `tasks::catalog()`.

pub mod cache;
pub mod cli;
pub mod data;
pub mod exec;
pub mod nn;
pub mod panics;
pub mod pipeline;
pub mod rng;
pub mod stage;
pub mod tasks;
pub mod train;
