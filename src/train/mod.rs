//! Training pieces: AdamW with parameter groups, layer-wise lr decay, the schedule, metrics.
//! Nothing here knows about YAML or the cache.

pub mod lars;
pub mod lr_decay;
pub mod metrics;
pub mod optim;
pub mod schedule;
