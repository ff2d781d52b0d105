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
        /// A folder with labels.csv, one sub-folder per class, or a MURA / NIH / CheXpert tree.
        source: PathBuf,
        /// Layout: folder (default), mura, nih, chexpert.
        #[arg(long, value_name = "KIND")]
        format: Option<String>,
        /// The labels file inside the folder, if not labels.csv.
        #[arg(long)]
        labels: Option<String>,
        /// Declared classes, comma-separated: a label outside them is an error naming its row.
        #[arg(long, value_delimiter = ',')]
        classes: Vec<String>,
        /// MURA: only this body part (XR_SHOULDER, XR_WRIST, ...).
        #[arg(long)]
        body_part: Option<String>,
        /// CheXpert: train.csv or valid.csv.
        #[arg(long)]
        csv: Option<String>,
        /// CheXpert: frontal, lateral or all.
        #[arg(long)]
        views: Option<String>,
        /// CheXpert: what -1 (uncertain) becomes: ones, zeros, mixed.
        #[arg(long)]
        uncertain: Option<String>,
        /// One JSON object on stdout (documented at `data::inspect::Inspection`).
        #[arg(long)]
        json: bool,
    },
}

pub fn data(args: DataArgs) -> Result<ExitCode> {
    match args.command {
        DataCommand::Inspect {
            source,
            format,
            labels,
            classes,
            body_part,
            csv,
            views,
            uncertain,
            json,
        } => {
            let options: serde_json::Map<String, serde_json::Value> = [
                ("source", format),
                ("labels", labels),
                ("body_part", body_part),
                ("csv", csv),
                ("views", views),
                ("uncertain", uncertain),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), serde_json::Value::String(v))))
            .collect();
            let mut options = options;
            if !classes.is_empty() {
                options.insert("classes".into(), serde_json::json!(classes));
            }
            let report = inspect(&source, &options)?;
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
