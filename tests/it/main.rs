//! The integration tests: one binary (faster to link), one module per area.

mod cli_errors;
mod datasets;
mod fuzz;
mod hostile;
mod layers;
mod orchestrator;
mod results;
mod science;
mod signals;
mod slurm;
mod util;
