//! `pretext results`: every evaluation in the cache as one table, like `dvc exp show` or a W&B
//! runs table. A row is an `evaluate` entry with the fine-tune it scored: the route that led to
//! it (its upstream stages), the fine-tune and evaluation params (`eval.*`) that differ between
//! the rows shown, the test metrics with their confidence intervals, when it ran, how long it
//! took, and the command that computed it (from its manifest; older entries from the
//! journals). Seeds can be grouped into mean ± sd; two entries can be diffed.

use super::{open_store, UsageError};
use crate::cache::journal::{Journal, JournalLine};
use crate::cache::{KeyedInput, Manifest, StageKey, Store};
use anyhow::Result;
use clap::{Args, ValueEnum};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct ResultsArgs {
    /// Only evaluations that a run of this pipeline file recorded.
    #[arg(long, value_name = "FILE")]
    pipeline: Option<PathBuf>,
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Only rows whose fine-tune param NAME has VALUE, e.g. --where epochs=60 (repeatable).
    #[arg(long = "where", value_name = "NAME=VALUE", value_parser = super::parse_set)]
    filter: Vec<(String, Value)>,
    /// Sort rows by this column (best first for metrics, newest first for date).
    #[arg(long, value_enum, default_value = "date")]
    sort: SortKey,
    /// One row per group of runs that differ only in `seed`: mean ± sd over the seeds.
    #[arg(long)]
    group_seeds: bool,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Compare two evaluations (stage names or key prefixes): params and metrics side by side.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    diff: Option<Vec<String>>,
}

#[derive(Clone, Copy, ValueEnum)]
enum SortKey {
    Date,
    Accuracy,
    MacroF1,
    Auc,
    Kappa,
    Stage,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Format {
    Table,
    Md,
    Csv,
    Json,
}

/// One evaluation with the fine-tune it scored.
#[derive(Debug, Clone, Serialize)]
struct Row {
    key: String,
    stage: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pipeline: String,
    /// Upstream stage names, then the fine-tune: `chest_mae > chest_rotation > shoulder_ft`.
    route: String,
    params: BTreeMap<String, Value>,
    metrics: Value,
    date: String,
    /// Fine-tune and evaluation together.
    wall_s: f64,
    #[serde(skip_serializing_if = "String::is_empty")]
    invocation: String,
    #[serde(skip)]
    at_unix: u64,
}

pub fn results(args: ResultsArgs) -> Result<ExitCode> {
    let store = open_store(args.cache.as_deref(), &std::env::current_dir()?)?;
    let own = args
        .pipeline
        .as_ref()
        .map(|file| Journal::for_pipeline(&store.journal_dir(), file).lines());
    let book = Book::read(&store, own.as_deref())?;
    let mut rows = book.rows();
    if let Some(own) = &own {
        let keys: HashSet<String> = own.iter().map(|l| l.key.hex()).collect();
        rows.retain(|r| keys.contains(&r.key));
    }
    for (name, value) in &args.filter {
        rows.retain(|r| r.params.get(name).is_some_and(|v| same_value(v, value)));
    }
    if let Some(pair) = &args.diff {
        let a = book.pick(&rows, &pair[0])?;
        let b = book.pick(&rows, &pair[1])?;
        print!("{}", diff_text(a, b));
        return Ok(ExitCode::SUCCESS);
    }
    sort(&mut rows, args.sort);
    let varying = varying_params(&rows);
    if args.group_seeds {
        let groups = group_seeds(&rows);
        print!("{}", render_groups(&groups, &varying, args.format)?);
    } else {
        print!("{}", render_rows(&rows, &varying, args.format)?);
    }
    if rows.is_empty() && args.format != Format::Json {
        eprintln!(
            "no evaluations in {} match; run a pipeline with an `evaluate` stage first",
            store.root().display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The cache's manifests by key, and the journal line naming each key: the latest of any
/// pipeline's, or, with `--pipeline`, that pipeline's own (a key shared by two pipelines is
/// named as the one asked about names it).
struct Book {
    manifests: HashMap<StageKey, Manifest>,
    journal: HashMap<StageKey, JournalLine>,
}

impl Book {
    fn read(store: &Store, own: Option<&[JournalLine]>) -> Result<Book> {
        let manifests = store
            .entries()?
            .into_iter()
            .filter_map(|e| e.manifest().ok().map(|m| (e.key, m)))
            .collect();
        let mut journal: HashMap<StageKey, JournalLine> = HashMap::new();
        for j in Journal::all(&store.journal_dir()) {
            for line in j.lines() {
                match journal.get(&line.key) {
                    Some(old) if old.at_unix > line.at_unix => {}
                    _ => {
                        journal.insert(line.key, line);
                    }
                }
            }
        }
        for line in own.into_iter().flatten() {
            journal.insert(line.key, line.clone());
        }
        Ok(Book { manifests, journal })
    }

    fn rows(&self) -> Vec<Row> {
        self.manifests
            .iter()
            .filter(|(_, m)| m.kind == "evaluate")
            .map(|(key, m)| self.row(key, m))
            .collect()
    }

    fn row(&self, key: &StageKey, eval: &Manifest) -> Row {
        let line = self.journal.get(key);
        let ft = upstream(eval, "model").and_then(|k| self.manifests.get(&k));
        let mut params = ft.map_or_else(BTreeMap::new, |m| flat_params(&m.key_input.params));
        // The evaluation's own params (test-time views, bootstrap) tell apart two scorings
        // of one model; prefixed so that its `seed` is not taken for the model's.
        params.extend(flat_params(&json!({ "eval": eval.key_input.params })));
        let wall_s = eval.wall_s + ft.map_or(0.0, |m| m.wall_s);
        Row {
            key: key.hex(),
            stage: line.map_or_else(|| eval.stage.clone(), |l| l.stage.clone()),
            pipeline: line.map_or_else(String::new, |l| l.pipeline.clone()),
            route: ft.map_or_else(|| "?".to_owned(), |m| self.route(m)),
            params,
            metrics: eval.metrics.clone(),
            date: date(eval.started_at_unix),
            wall_s,
            // The run that computed the evaluation, as `date` is; a journal line may name a
            // later run that only found it cached.
            invocation: if eval.invocation.is_empty() {
                line.map_or_else(String::new, |l| l.invocation.argv.join(" "))
            } else {
                eval.invocation.join(" ")
            },
            at_unix: eval.started_at_unix,
        }
    }

    /// Names of the stages a model was built from, oldest first, ending with the model's own.
    fn route(&self, ft: &Manifest) -> String {
        let mut names = vec![self.name_of(ft)];
        let mut at = ft;
        let mut start = "scratch".to_owned();
        for _ in 0..16 {
            let next = ["init", "imagenet"]
                .iter()
                .find_map(|slot| at.key_input.inputs.get(*slot).and_then(|v| v.first()));
            match next {
                Some(KeyedInput::Stage { key, .. }) => match self.manifests.get(key) {
                    Some(m) => {
                        names.push(self.name_of(m));
                        at = m;
                    }
                    None => {
                        names.push(format!("({} not in the cache)", key.short()));
                        break;
                    }
                },
                Some(KeyedInput::Data { .. }) => {
                    start = "ImageNet weights".to_owned();
                    break;
                }
                None => break,
            }
        }
        if names.len() == 1 || start != "scratch" {
            names.push(start);
        }
        names.reverse();
        names.join(" > ")
    }

    /// A stage's template name (`ft@seed1` gives `ft`): routes compare across matrix instances.
    fn name_of(&self, m: &Manifest) -> String {
        let name = self.journal.get(&m.key).map_or(&m.stage, |l| &l.stage);
        name.split('@').next().unwrap_or(name).to_owned()
    }

    /// A row by stage name (latest run of that name) or key prefix.
    fn pick<'r>(&self, rows: &'r [Row], target: &str) -> Result<&'r Row> {
        let hits: Vec<&Row> = rows
            .iter()
            .filter(|r| r.stage == target || (target.len() >= 6 && r.key.starts_with(target)))
            .collect();
        match hits.as_slice() {
            [] => Err(UsageError(format!(
                "no evaluation named `{target}` (stage name or key prefix)"
            ))
            .into()),
            _ => Ok(hits.into_iter().max_by_key(|r| r.at_unix).expect("one")),
        }
    }
}

fn upstream(m: &Manifest, slot: &str) -> Option<StageKey> {
    match m.key_input.inputs.get(slot)?.first()? {
        KeyedInput::Stage { key, .. } => Some(*key),
        KeyedInput::Data { .. } => None,
    }
}

/// Params as `name -> value`, nested objects flattened with dots.
fn flat_params(params: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    let name = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&name, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.clone());
            }
        }
    }
    walk("", params, &mut out);
    out
}

/// `--where epochs=60` matches 60 and 60.0; a string matches its text.
fn same_value(have: &Value, want: &Value) -> bool {
    match (have.as_f64(), want.as_f64()) {
        (Some(a), Some(b)) => a == b,
        _ => have == want || have.as_str().is_some_and(|s| Some(s) == want.as_str()),
    }
}

fn date(unix: u64) -> String {
    chrono::DateTime::from_timestamp(unix as i64, 0)
        .map_or_else(|| "?".into(), |d| d.format("%Y-%m-%d %H:%M").to_string())
}

fn sort(rows: &mut [Row], key: SortKey) {
    let metric = |r: &Row, name: &str| r.metrics[name].as_f64().unwrap_or(f64::NEG_INFINITY);
    let by =
        |name: &'static str| move |a: &Row, b: &Row| metric(b, name).total_cmp(&metric(a, name));
    match key {
        SortKey::Date => rows.sort_by_key(|r| std::cmp::Reverse(r.at_unix)),
        SortKey::Accuracy => rows.sort_by(by("accuracy")),
        SortKey::MacroF1 => rows.sort_by(by("macro_f1")),
        SortKey::Auc => rows.sort_by(by("auc_mean")),
        SortKey::Kappa => rows.sort_by(by("kappa")),
        SortKey::Stage => rows.sort_by(|a, b| a.stage.cmp(&b.stage)),
    }
}

/// Params whose value is not the same in every row (the ones worth a column), seed first.
fn varying_params(rows: &[Row]) -> Vec<String> {
    let names: BTreeSet<&String> = rows.iter().flat_map(|r| r.params.keys()).collect();
    let mut out: Vec<String> = names
        .into_iter()
        .filter(|n| {
            let first = rows.first().and_then(|r| r.params.get(*n));
            rows.iter().any(|r| r.params.get(*n) != first)
        })
        .cloned()
        .collect();
    out.sort_by_key(|n| (n.as_str() != "seed", n.clone()));
    out
}

/// The metrics a table shows: (column, metrics field, its CI field).
const METRICS: [(&str, &str, Option<&str>); 4] = [
    ("accuracy [95% CI]", "accuracy", Some("accuracy_ci95")),
    ("macro-F1", "macro_f1", None),
    ("AUC [95% CI]", "auc_mean", Some("auc_mean_ci95")),
    ("kappa", "kappa", None),
];

fn with_ci(metrics: &Value, field: &str, ci: Option<&str>) -> String {
    let Some(v) = metrics[field].as_f64() else {
        return "-".into();
    };
    match ci.and_then(|c| metrics[c].as_array()) {
        Some(b) if b.len() == 2 => format!(
            "{v:.3} [{:.3}, {:.3}]",
            b[0].as_f64().unwrap_or(f64::NAN),
            b[1].as_f64().unwrap_or(f64::NAN)
        ),
        _ => format!("{v:.3}"),
    }
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.as_f64().map_or(n.to_string(), |f| {
            if f.fract() == 0.0 && f.abs() < 1e15 {
                format!("{}", f as i64)
            } else {
                format!("{f}")
            }
        }),
        Some(other) => other.to_string(),
    }
}

fn render_rows(rows: &[Row], varying: &[String], format: Format) -> Result<String> {
    if format == Format::Json {
        return Ok(serde_json::to_string_pretty(rows)? + "\n");
    }
    let mut header: Vec<String> = vec!["stage".into(), "route".into()];
    header.extend(varying.iter().cloned());
    header.extend(METRICS.iter().map(|m| m.0.to_owned()));
    header.extend(["majority".into(), "date".into(), "wall".into()]);
    if format != Format::Table {
        header.push("command".into());
    }
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut line = vec![r.stage.clone(), r.route.clone()];
            line.extend(varying.iter().map(|n| cell(r.params.get(n))));
            line.extend(METRICS.iter().map(|(_, f, ci)| with_ci(&r.metrics, f, *ci)));
            line.push(with_ci(&r.metrics, "majority_baseline", None));
            line.push(r.date.clone());
            line.push(format!("{:.0} s", r.wall_s));
            if format != Format::Table {
                line.push(r.invocation.clone());
            }
            line
        })
        .collect();
    render(header, body, format)
}

/// Runs that differ only in `seed`, summarised.
#[derive(Debug, Serialize)]
struct Group {
    route: String,
    params: BTreeMap<String, Value>,
    seeds: Vec<Value>,
    /// Per metric: (mean, sample sd) over the seeds.
    metrics: BTreeMap<String, (f64, f64)>,
}

/// Groups runs by route and params minus `seed`. A seed evaluated more than once (the model
/// re-evaluated after an `evaluate` upgrade, or retrained after a `finetune` one) counts once,
/// by its newest evaluation: a repeat is not an independent run and would shrink the sd.
fn group_seeds(rows: &[Row]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut members: Vec<Vec<&Row>> = Vec::new();
    for r in newest_run_per_seed(rows) {
        let mut params = r.params.clone();
        let seed = params.remove("seed").unwrap_or(Value::Null);
        match groups
            .iter()
            .position(|g| g.route == r.route && g.params == params)
        {
            Some(i) => {
                groups[i].seeds.push(seed);
                members[i].push(r);
            }
            None => {
                groups.push(Group {
                    route: r.route.clone(),
                    params,
                    seeds: vec![seed],
                    metrics: BTreeMap::new(),
                });
                members.push(vec![r]);
            }
        }
    }
    for g in &mut groups {
        g.seeds
            .sort_by_key(|s| (s.as_f64().map(|f| f as i64), s.to_string()));
    }
    for (g, rows) in groups.iter_mut().zip(&members) {
        for field in [
            "accuracy",
            "macro_f1",
            "auc_mean",
            "kappa",
            "majority_baseline",
        ] {
            let v: Vec<f64> = rows
                .iter()
                .filter_map(|r| r.metrics[field].as_f64())
                .collect();
            if !v.is_empty() {
                g.metrics.insert(field.to_owned(), mean_sd(&v));
            }
        }
    }
    groups
}

/// `rows` in their order, without the older evaluations of a route and params seen again.
fn newest_run_per_seed(rows: &[Row]) -> Vec<&Row> {
    let run = |r: &Row| {
        format!(
            "{} {}",
            r.route,
            Value::from(
                r.params
                    .clone()
                    .into_iter()
                    .collect::<serde_json::Map<_, _>>()
            )
        )
    };
    let mut newest: HashMap<String, &Row> = HashMap::new();
    for r in rows {
        let slot = newest.entry(run(r)).or_insert(r);
        if r.at_unix > slot.at_unix {
            *slot = r;
        }
    }
    rows.iter()
        .filter(|r| std::ptr::eq(*r, newest[&run(r)]))
        .collect()
}

/// Mean and sample standard deviation (0 for one value).
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn render_groups(groups: &[Group], varying: &[String], format: Format) -> Result<String> {
    if format == Format::Json {
        return Ok(serde_json::to_string_pretty(groups)? + "\n");
    }
    let shown: Vec<&String> = varying.iter().filter(|n| n.as_str() != "seed").collect();
    let mut header: Vec<String> = vec!["route".into()];
    header.extend(shown.iter().map(|n| n.to_string()));
    header.push("seeds".into());
    header.extend(
        ["accuracy", "macro-F1", "AUC", "kappa", "majority"].map(|m| format!("{m} (mean ± sd)")),
    );
    let body = groups
        .iter()
        .map(|g| {
            let mut line = vec![g.route.clone()];
            line.extend(shown.iter().map(|n| cell(g.params.get(*n))));
            line.push(
                g.seeds
                    .iter()
                    .map(|s| cell(Some(s)))
                    .collect::<Vec<_>>()
                    .join(","),
            );
            for f in [
                "accuracy",
                "macro_f1",
                "auc_mean",
                "kappa",
                "majority_baseline",
            ] {
                line.push(
                    g.metrics
                        .get(f)
                        .map_or("-".into(), |(m, s)| format!("{m:.3} ± {s:.3}")),
                );
            }
            line
        })
        .collect();
    render(header, body, format)
}

fn render(header: Vec<String>, body: Vec<Vec<String>>, format: Format) -> Result<String> {
    Ok(match format {
        Format::Table => {
            let mut t = comfy_table::Table::new();
            t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY)
                .set_content_arrangement(comfy_table::ContentArrangement::Dynamic)
                .set_header(header);
            for line in body {
                t.add_row(line);
            }
            format!("{t}\n")
        }
        Format::Md => {
            let esc = |s: &String| s.replace('|', "\\|");
            let mut out = format!(
                "| {} |\n",
                header.iter().map(esc).collect::<Vec<_>>().join(" | ")
            );
            out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
            for line in body {
                out.push_str(&format!(
                    "| {} |\n",
                    line.iter().map(esc).collect::<Vec<_>>().join(" | ")
                ));
            }
            out
        }
        Format::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_record(&header)?;
            for line in body {
                w.write_record(&line)?;
            }
            String::from_utf8(w.into_inner()?)?
        }
        Format::Json => unreachable!("rendered as JSON above"),
    })
}

/// Two rows' params and metrics side by side, differences marked.
fn diff_text(a: &Row, b: &Row) -> String {
    let mut out = format!(
        "A  {} ({}) {}\nB  {} ({}) {}\n\n",
        a.stage,
        &a.key[..12],
        a.date,
        b.stage,
        &b.key[..12],
        b.date
    );
    let names: BTreeSet<&String> = a.params.keys().chain(b.params.keys()).collect();
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY)
        .set_header(vec!["", "A", "B"]);
    let differs = |x: &str, y: &str| if x == y { "" } else { "*" };
    let route = (a.route.as_str(), b.route.as_str());
    t.add_row(vec![
        format!("route{}", differs(route.0, route.1)),
        route.0.into(),
        route.1.into(),
    ]);
    for n in names {
        let (x, y) = (cell(a.params.get(n)), cell(b.params.get(n)));
        t.add_row(vec![format!("{n}{}", differs(&x, &y)), x, y]);
    }
    for (label, field, ci) in METRICS {
        t.add_row(vec![
            label.to_owned(),
            with_ci(&a.metrics, field, ci),
            with_ci(&b.metrics, field, ci),
        ]);
    }
    out.push_str(&format!("{t}\n(* the value differs)\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mean_and_sample_sd() {
        let (m, s) = mean_sd(&[0.5, 0.6, 0.7]);
        assert!((m - 0.6).abs() < 1e-12 && (s - 0.1).abs() < 1e-12);
        assert_eq!(mean_sd(&[0.4]), (0.4, 0.0));
    }

    #[test]
    fn a_seed_evaluated_twice_counts_once_by_its_newest_evaluation() {
        let row = |seed: u64, acc: f64, at_unix: u64| Row {
            key: String::new(),
            stage: "eval".into(),
            pipeline: String::new(),
            route: "mae > ft".into(),
            params: BTreeMap::from([("seed".to_owned(), json!(seed))]),
            metrics: json!({ "accuracy": acc }),
            date: String::new(),
            wall_s: 0.0,
            invocation: String::new(),
            at_unix,
        };
        let rows = [row(0, 0.5, 1), row(0, 0.6, 2), row(1, 0.7, 1)];
        let groups = group_seeds(&rows);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].seeds, vec![json!(0), json!(1)]);
        let (mean, _) = groups[0].metrics["accuracy"];
        assert!((mean - 0.65).abs() < 1e-12, "{mean}");
    }

    #[test]
    fn two_scorings_of_the_same_models_are_two_groups() {
        let row = |seed: u64, tta: &str| Row {
            key: String::new(),
            stage: "eval".into(),
            pipeline: String::new(),
            route: "mae > ft".into(),
            params: flat_params(&json!({ "seed": seed, "eval": { "tta": tta } })),
            metrics: json!({ "accuracy": 0.5 }),
            date: String::new(),
            wall_s: 0.0,
            invocation: String::new(),
            at_unix: 1,
        };
        let rows = [
            row(0, "none"),
            row(1, "none"),
            row(0, "flip"),
            row(1, "flip"),
        ];
        let groups = group_seeds(&rows);
        assert_eq!(groups.len(), 2);
        assert!(groups.iter().all(|g| g.seeds == vec![json!(0), json!(1)]));
    }

    #[test]
    fn values_match_across_number_forms() {
        assert!(same_value(&json!(60), &json!(60.0)));
        assert!(same_value(&json!("vit"), &json!("vit")));
        assert!(!same_value(&json!(60), &json!(61)));
    }
}
