//! Pipeline files: YAML schema, includes, vars, matrix expansion, references and the stage DAG.

pub mod config;
pub mod diagnostic;
mod expand;
mod graph;
pub mod load;
pub mod ordered;
pub mod plan;
mod refs;
pub mod spec;
pub mod vars;
pub mod yaml;

pub use diagnostic::SpecError;
pub use plan::{load_plan, InputRef, LoadOptions, OutputRef, Plan, PlannedInput, PlannedStage};
