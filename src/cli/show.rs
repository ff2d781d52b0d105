use super::{open_store, UsageError};
use crate::cache::journal::Journal;
use crate::cache::{Entry, KeyedInput, Manifest, Store};
use crate::exec::keys::stage_keys;
use crate::pipeline::{load_plan, LoadOptions};
use crate::stage::Catalog;
use anyhow::Result;
use clap::Args;
use serde::Serialize;
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct ShowArgs {
    /// A stage name (instance or template) or a cache key (at least 6 hex digits).
    target: String,
    /// Resolve the stage name in this pipeline (else: in the journals of past runs).
    #[arg(long, value_name = "FILE")]
    pipeline: Option<PathBuf>,
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// With --pipeline: the profile the stage was run under.
    #[arg(long, requires = "pipeline")]
    profile: Option<String>,
    /// With --pipeline: the var overrides it was run with (--set epochs=3, repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = super::parse_set, requires = "pipeline")]
    set: Vec<(String, serde_json::Value)>,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// `pretext show --json`. Stable JSON:
///
/// ```json
/// {"key":"<hex>","kind":"mae","stage":"chest_mae","cached":true,"dir":"cache/mae/<hex>",
///  "params":{..},"inputs":{"images":[{"type":"data","fingerprint":"<hex>"}]},
///  "upstream":[{"slot":"init","key":"<hex>","stage":"chest_mae","kind":"mae"}],
///  "manifest":{..}}
/// ```
/// `manifest` (see `cache::store::Manifest`) is present when the entry exists.
#[derive(Serialize)]
struct Shown {
    key: String,
    kind: String,
    stage: String,
    cached: bool,
    dir: PathBuf,
    params: Value,
    inputs: Value,
    upstream: Vec<Upstream>,
    #[serde(skip_serializing_if = "Option::is_none")]
    manifest: Option<Manifest>,
}

#[derive(Serialize)]
struct Upstream {
    slot: String,
    key: String,
    stage: Option<String>,
    kind: Option<String>,
}

pub fn show(args: ShowArgs, catalog: &Catalog) -> Result<ExitCode> {
    let (store, stage, key_input) = if let Some(file) = &args.pipeline {
        let opts = LoadOptions {
            profile: args.profile.clone(),
            set: args.set.clone(),
        };
        let plan = load_plan(file, catalog, &opts)?;
        let store = open_store(args.cache.as_deref(), &plan.root)?;
        let selected = plan
            .select(std::slice::from_ref(&args.target))
            .map_err(UsageError)?;
        let index = plan
            .stages
            .iter()
            .position(|s| s.name == args.target)
            .or_else(|| plan.stages.iter().position(|s| s.template == args.target))
            .expect("select found it");
        let keys = stage_keys(&plan, &store, &selected);
        let keyed = keys[index]
            .clone()
            .map_err(|r| UsageError(format!("stage `{}` is blocked: {r}", args.target)))?;
        (store, plan.stages[index].name.clone(), keyed.input)
    } else {
        let store = open_store(args.cache.as_deref(), &std::env::current_dir()?)?;
        let hits = store.find(&args.target)?;
        match hits.as_slice() {
            [one] => {
                let m = one.manifest()?;
                (store, m.stage.clone(), m.key_input)
            }
            [] => {
                let line = Journal::all(&store.journal_dir())
                    .into_iter()
                    .filter_map(|j| j.latest().remove(&args.target))
                    .next();
                let Some(line) = line else {
                    return Err(UsageError(format!(
                        "`{}` is neither a cache key nor a stage recorded in {}; pass --pipeline FILE to resolve a stage name",
                        args.target,
                        store.root().display()
                    ))
                    .into());
                };
                (store, line.stage, line.key_input)
            }
            many => {
                return Err(UsageError(format!(
                    "key prefix `{}` matches {} entries; give more digits",
                    args.target,
                    many.len()
                ))
                .into())
            }
        }
    };
    let key = key_input.key();
    let entry = store.lookup(&key_input.kind, &key);
    let shown = Shown {
        key: key.hex(),
        kind: key_input.kind.clone(),
        stage,
        cached: entry.is_some(),
        dir: store.entry_dir(&key_input.kind, &key),
        params: key_input.params.clone(),
        inputs: serde_json::to_value(&key_input.inputs)?,
        upstream: upstream(&store, &key_input.inputs),
        manifest: entry.as_ref().map(Entry::manifest).transpose()?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
    } else {
        print_human(&shown);
    }
    Ok(ExitCode::SUCCESS)
}

fn upstream(
    store: &Store,
    inputs: &std::collections::BTreeMap<String, Vec<KeyedInput>>,
) -> Vec<Upstream> {
    let entries = store.entries().unwrap_or_default();
    let mut out = Vec::new();
    for (slot, items) in inputs {
        for item in items {
            if let KeyedInput::Stage { key, .. } = item {
                let found = entries
                    .iter()
                    .find(|e| e.key == *key)
                    .and_then(|e| e.manifest().ok());
                out.push(Upstream {
                    slot: slot.clone(),
                    key: key.hex(),
                    stage: found.as_ref().map(|m| m.stage.clone()),
                    kind: found.map(|m| m.kind),
                });
            }
        }
    }
    out
}

/// A metric as one readable line: a per-epoch series becomes its length, first, last, min and
/// max (the whole of it is in `--json` and the manifest); anything short prints as it is.
fn brief(value: &Value) -> String {
    const SHORT: usize = 8;
    let Some(items) = value.as_array().filter(|a| a.len() > SHORT) else {
        return value.to_string();
    };
    let numbers: Vec<f64> = items.iter().filter_map(Value::as_f64).collect();
    if numbers.len() != items.len() {
        let inner = items[0]
            .as_array()
            .map_or(String::new(), |a| format!(" x {}", a.len()));
        return format!("[{}{inner} values; --json prints them]", items.len());
    }
    let (min, max) = numbers
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let num = |v: f64| {
        if v != 0.0 && v.abs() < 1e-2 {
            format!("{v:.3e}")
        } else {
            format!("{v:.4}")
        }
    };
    format!(
        "[{} values: first {}, last {}, min {}, max {}]",
        numbers.len(),
        num(numbers[0]),
        num(numbers[numbers.len() - 1]),
        num(min),
        num(max)
    )
}

fn print_human(s: &Shown) {
    println!("stage    {}", s.stage);
    println!("kind     {}", s.kind);
    println!("key      {}", s.key);
    println!("cached   {}", if s.cached { "yes" } else { "no (stale)" });
    println!("dir      {}", s.dir.display());
    println!("params   {}", s.params);
    for u in &s.upstream {
        println!(
            "input    {} <- {} ({})",
            u.slot,
            u.stage.as_deref().unwrap_or("not computed"),
            &u.key[..12]
        );
    }
    if let Value::Object(inputs) = &s.inputs {
        for (slot, items) in inputs {
            for item in items.as_array().into_iter().flatten() {
                if let Some(fp) = item.get("fingerprint").and_then(Value::as_str) {
                    println!("input    {slot} <- data ({})", &fp[..12]);
                }
            }
        }
    }
    if let Some(m) = &s.manifest {
        println!(
            "ran      {:.1}s on {} ({}), pretext {}",
            m.wall_s, m.host, m.device, m.pretext_version
        );
        if let Some(p) = m.peak_rss_kib {
            println!("memory   {:.1} MiB peak", p as f64 / 1024.0);
        }
        if let Some(metrics) = m.metrics.as_object() {
            for (name, value) in metrics {
                println!("metric   {name}: {}", brief(value));
            }
        }
        for path in m.outputs.keys() {
            println!("file     {path}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::brief;
    use serde_json::json;

    #[test]
    fn a_metric_series_prints_as_its_summary_and_short_values_as_they_are() {
        let losses: Vec<f64> = (0..60).map(|i| 2.0 - i as f64 * 0.01).collect();
        assert_eq!(
            brief(&json!(losses)),
            "[60 values: first 2.0000, last 1.4100, min 1.4100, max 2.0000]"
        );
        assert_eq!(
            brief(&json!(vec![vec![0.5; 4]; 60])),
            "[60 x 4 values; --json prints them]"
        );
        assert_eq!(brief(&json!(["a", "b"])), r#"["a","b"]"#);
        assert_eq!(brief(&json!(0.25)), "0.25");
    }
}
