use super::PipelineArgs;
use crate::pipeline::Plan;
use crate::stage::Catalog;
use anyhow::Result;
use clap::{Args, ValueEnum};
use std::process::ExitCode;

#[derive(Args)]
pub struct DagArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Mermaid,
    Dot,
}

pub fn dag(args: DagArgs, catalog: &Catalog) -> Result<ExitCode> {
    let loaded = args.pipeline.load(catalog)?;
    print!("{}", render(&loaded.plan, &loaded.selected, args.format));
    Ok(ExitCode::SUCCESS)
}

fn render(plan: &Plan, selected: &[bool], format: Format) -> String {
    let stages = plan.stages.iter().enumerate().filter(|(i, _)| selected[*i]);
    let mut out = String::new();
    match format {
        Format::Text => {
            for (_, s) in stages {
                let deps: Vec<&str> = s
                    .deps
                    .iter()
                    .map(|&d| plan.stages[d].name.as_str())
                    .collect();
                if deps.is_empty() {
                    out.push_str(&format!("{} [{}]\n", s.name, s.kind));
                } else {
                    out.push_str(&format!("{} [{}] <- {}\n", s.name, s.kind, deps.join(", ")));
                }
            }
        }
        Format::Mermaid => {
            out.push_str("flowchart LR\n");
            for (i, s) in stages {
                out.push_str(&format!("  s{i}[\"{} ({})\"]\n", s.name, s.kind));
                for d in &s.deps {
                    out.push_str(&format!("  s{d} --> s{i}\n"));
                }
            }
        }
        Format::Dot => {
            out.push_str("digraph pipeline {\n  rankdir=LR;\n");
            for (i, s) in stages {
                out.push_str(&format!("  s{i} [label=\"{}\\n{}\"];\n", s.name, s.kind));
                for d in &s.deps {
                    out.push_str(&format!("  s{d} -> s{i};\n"));
                }
            }
            out.push_str("}\n");
        }
    }
    out
}
