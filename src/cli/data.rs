use crate::data::inspect::inspect;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Counts per split and label, image sizes, bit depths and unreadable files of a data folder.
    Inspect {
        /// A folder with labels.csv, or one sub-folder per class.
        source: PathBuf,
        /// The labels file inside the folder, if not labels.csv.
        #[arg(long)]
        labels: Option<String>,
        /// One JSON object on stdout (documented at `data::inspect::Inspection`).
        #[arg(long)]
        json: bool,
    },
}

pub fn data(args: DataArgs) -> Result<ExitCode> {
    match args.command {
        DataCommand::Inspect {
            source,
            labels,
            json,
        } => {
            let report = inspect(&source, labels.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{}: {} images, {} classes ({})",
                    report.root,
                    report.images,
                    report.classes.len(),
                    report.classes.join(", ")
                );
                for (split, counts) in &report.per_split {
                    let parts: Vec<String> =
                        counts.iter().map(|(l, n)| format!("{l} {n}")).collect();
                    println!("  {split:<8} {}", parts.join(", "));
                }
                if report.groups > 0 {
                    println!("  groups (patients/studies): {}", report.groups);
                }
                let mut sizes: Vec<(&String, &usize)> = report.sizes.iter().collect();
                sizes.sort_by(|a, b| b.1.cmp(a.1));
                let shown: Vec<String> = sizes
                    .iter()
                    .take(5)
                    .map(|(s, n)| format!("{s} x{n}"))
                    .collect();
                println!(
                    "  sizes    {}{}",
                    shown.join(", "),
                    if sizes.len() > 5 {
                        format!(" (+{} more)", sizes.len() - 5)
                    } else {
                        String::new()
                    }
                );
                let depths: Vec<String> = report
                    .bit_depths
                    .iter()
                    .map(|(d, n)| format!("{d}-bit x{n}"))
                    .collect();
                println!("  depth    {}", depths.join(", "));
                for b in &report.bad {
                    println!("  BAD      {} ({}): {}", b.path, b.origin, b.error);
                }
            }
            Ok(if report.bad.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
