//! pretext: content-addressed pipelines for self-supervised learning experiments on radiographs.
//!
//! Layers, bottom up; each calls only the layers below it (see ARCHITECTURE.md):
//! `tasks` (the stage kinds and the `Task` seam), `pipeline` (YAML to a plan), `cache` (keys,
//! fingerprints, the store), `exec` (the scheduler and executors), `cli`.

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
