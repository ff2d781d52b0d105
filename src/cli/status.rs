use super::PipelineArgs;
use crate::exec::keys::stage_keys;
use crate::stage::Catalog;
use anyhow::Result;
use clap::Args;
use std::process::ExitCode;

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// One JSON array of stages on stdout (documented at `exec::StageStatus`).
    #[arg(long)]
    json: bool,
}

pub fn status(args: StatusArgs, catalog: &Catalog) -> Result<ExitCode> {
    let loaded = args.pipeline.load(catalog)?;
    let keys = stage_keys(&loaded.plan, &loaded.store, &loaded.selected);
    let report = crate::exec::status(&loaded.plan, &keys, &loaded.selected, &loaded.store);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let width = report.iter().map(|s| s.stage.len()).max().unwrap_or(0);
    for s in &report {
        let key = s
            .key
            .as_deref()
            .map_or(String::new(), |k| format!("{}  ", &k[..12]));
        println!(
            "{:<8} {:<width$}  {key}{}",
            s.state,
            s.stage,
            s.reasons.join("; ")
        );
    }
    let count = |state: &str| report.iter().filter(|s| s.state == state).count();
    println!(
        "{} cached, {} stale, {} blocked",
        count("cached"),
        count("stale"),
        count("blocked")
    );
    Ok(ExitCode::SUCCESS)
}
