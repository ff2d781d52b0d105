//! The integration tests: one binary (faster to link), one module per area.

mod cli_errors;
mod datasets;
mod fuzz;
mod orchestrator;
mod science;
mod slurm;
mod util;
