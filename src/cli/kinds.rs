//! `pretext kinds [KIND]` (the stage kinds, and one kind's every param with its type, default
//! and meaning) and `pretext schema` (a JSON Schema of pipeline files for editor completion).
//! Both read the params' JSON Schema, which schemars derives from the `Params` structs and
//! their doc comments: the documentation cannot drift from the code.

use crate::stage::{Catalog, TaskEntry};
use anyhow::Result;
use clap::Args;
use serde_json::{json, Map, Value};
use std::process::ExitCode;

#[derive(Args)]
pub struct KindsArgs {
    /// A kind to document in full: every param with its type, default and meaning.
    kind: Option<String>,
    /// The kinds (or the kind) as JSON.
    #[arg(long)]
    json: bool,
}

pub fn kinds(args: KindsArgs, catalog: &Catalog) -> Result<ExitCode> {
    let entries: Vec<&TaskEntry> = match &args.kind {
        Some(k) => vec![catalog.get(k).ok_or_else(|| {
            let known: Vec<&str> = catalog.kinds().collect();
            super::UsageError(format!("no stage kind `{k}`; known: {}", known.join(", ")))
        })?],
        None => catalog.kinds().filter_map(|k| catalog.get(k)).collect(),
    };
    if args.json {
        let all: Vec<Value> = entries.iter().map(|e| describe(e)).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    for e in &entries {
        print!("{}", text(e, args.kind.is_some()));
    }
    if args.kind.is_none() {
        println!("\n`pretext kinds KIND` documents every param of a kind; `pretext schema` writes a JSON Schema of pipeline files.");
    }
    Ok(ExitCode::SUCCESS)
}

/// A kind as data: summary, version, inputs, outputs and the params' schema.
fn describe(e: &TaskEntry) -> Value {
    let defaults = (e.normalize)(json!({})).ok();
    let slots = defaults.as_ref().and_then(|d| (e.inputs)(d));
    let outputs = defaults
        .as_ref()
        .map(|d| (e.outputs)(d))
        .unwrap_or_default();
    json!({
        "kind": e.kind, "version": e.version, "summary": e.summary,
        "inputs": slots.map(|s| s.iter().map(|s| json!({"name": s.name, "required": s.required, "many": s.many, "doc": s.doc})).collect::<Vec<_>>()),
        "outputs": outputs.iter().map(|o| json!({"name": o.name, "path": o.path, "doc": o.doc})).collect::<Vec<_>>(),
        "params": (e.schema)(),
    })
}

fn text(e: &TaskEntry, full: bool) -> String {
    let d = describe(e);
    let mut out = format!("{} (version {}): {}\n", e.kind, e.version, e.summary);
    if !full {
        return out;
    }
    match d["inputs"].as_array() {
        Some(slots) => {
            for s in slots {
                out.push_str(&format!(
                    "  input  {}{}{}: {}\n",
                    s["name"].as_str().unwrap_or(""),
                    if s["many"] == true { " (list)" } else { "" },
                    if s["required"] == true {
                        ""
                    } else {
                        " (optional)"
                    },
                    s["doc"].as_str().unwrap_or("")
                ));
            }
        }
        None => out.push_str("  inputs: any names\n"),
    }
    for o in d["outputs"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  output {} ({}): {}\n",
            o["name"].as_str().unwrap_or(""),
            o["path"].as_str().unwrap_or(""),
            o["doc"].as_str().unwrap_or("")
        ));
    }
    let schema = &d["params"];
    let required: Vec<&str> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY)
        .set_content_arrangement(comfy_table::ContentArrangement::Dynamic)
        .set_header(vec!["param", "type", "default", "meaning"]);
    for (name, p) in schema["properties"].as_object().into_iter().flatten() {
        let default = if required.contains(&name.as_str()) {
            "(required)".to_owned()
        } else {
            p.get("default").map_or("-".into(), |v| v.to_string())
        };
        t.add_row(vec![
            name.clone(),
            type_name(p, schema),
            default,
            p["description"].as_str().unwrap_or("").replace('\n', " "),
        ]);
    }
    out.push_str(&format!("{t}\n"));
    out
}

/// A short type for a param's schema: `integer`, `number?`, `adamw | lars`, `[number, number]`.
fn type_name(p: &Value, root: &Value) -> String {
    if let Some(r) = p["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap_or(r);
        return type_name(&root["$defs"][name], root);
    }
    if let Some(e) = p["enum"].as_array() {
        return e
            .iter()
            .map(|v| v.as_str().unwrap_or("?"))
            .collect::<Vec<_>>()
            .join(" | ");
    }
    if let Some(c) = p["const"].as_str() {
        return c.to_owned();
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(alts) = p[key].as_array() {
            let parts: Vec<String> = alts
                .iter()
                .filter(|a| a["type"] != "null")
                .map(|a| type_name(a, root))
                .collect();
            let nullable = alts.iter().any(|a| a["type"] == "null");
            return format!("{}{}", parts.join(" | "), if nullable { "?" } else { "" });
        }
    }
    match &p["type"] {
        Value::String(t) if t == "array" => match &p["prefixItems"] {
            Value::Array(items) => format!(
                "[{}]",
                items
                    .iter()
                    .map(|i| type_name(i, root))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => format!("[{}]", type_name(&p["items"], root)),
        },
        Value::String(t) => t.clone(),
        Value::Array(ts) => {
            let non_null: Vec<&str> = ts
                .iter()
                .filter_map(Value::as_str)
                .filter(|t| *t != "null")
                .collect();
            let nullable = non_null.len() < ts.len();
            format!(
                "{}{}",
                non_null.join(" | "),
                if nullable { "?" } else { "" }
            )
        }
        _ => "any".into(),
    }
}

#[derive(Args)]
pub struct SchemaArgs {}

/// `pretext schema`: a JSON Schema (2020-12) of pipeline files. Every stage's `params` are
/// checked against its kind's schema; a param may also be a `${var}` string.
pub fn schema(_: SchemaArgs, catalog: &Catalog) -> Result<ExitCode> {
    println!(
        "{}",
        serde_json::to_string_pretty(&pipeline_schema(catalog))?
    );
    Ok(ExitCode::SUCCESS)
}

pub fn pipeline_schema(catalog: &Catalog) -> Value {
    let var = json!({ "type": "string", "pattern": "\\$\\{[A-Za-z_][A-Za-z0-9_]*\\}" });
    let mut defs = Map::new();
    let mut by_kind = Vec::new();
    for kind in catalog.kinds() {
        let e = catalog.get(kind).expect("listed");
        let mut params = (e.schema)();
        // Sub-schemas of every kind under one roof; the names are the types', which no two
        // kinds define differently.
        if let Some(Value::Object(sub)) = params.as_object_mut().and_then(|o| o.remove("$defs")) {
            defs.extend(sub);
        }
        if let Some(props) = params["properties"].as_object_mut() {
            for p in props.values_mut() {
                *p = json!({ "anyOf": [p.clone(), var.clone()], "description": p["description"] });
            }
        }
        for k in ["$schema", "title"] {
            params.as_object_mut().map(|o| o.remove(k));
        }
        let name = format!("params_{kind}");
        defs.insert(name.clone(), params);
        by_kind.push(json!({
            "if": { "properties": { "kind": { "const": kind } } },
            "then": { "properties": { "params": { "$ref": format!("#/$defs/{name}") } } }
        }));
    }
    let kinds: Vec<&str> = catalog.kinds().collect();
    defs.insert(
        "stage".into(),
        json!({
            "type": "object",
            "required": ["kind"],
            "additionalProperties": false,
            "properties": {
                "kind": { "enum": kinds, "description": "the stage kind (`pretext kinds`)" },
                "desc": { "type": "string", "description": "free text, shown in reports" },
                "run": { "type": "string", "description": "the shell command of a `command` stage" },
                "inputs": { "type": "object", "description": "slot: `stage`, `stage.output`, `stage@*`, `data.name`, `file:path`, or a list of them" },
                "params": { "type": "object" },
                "resources": {
                    "type": "object", "additionalProperties": false,
                    "properties": {
                        "cpu": { "type": "integer", "minimum": 1 }, "gpu": { "type": "integer", "minimum": 0 },
                        "mem": { "type": ["string", "integer"] }, "time": { "type": ["string", "integer"] },
                        "partition": { "type": "string" }, "account": { "type": "string" },
                        "sbatch_args": { "type": "array", "items": { "type": "string" } }
                    }
                }
            },
            "allOf": by_kind,
        }),
    );
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "pretext pipeline file",
        "description": "docs/pipelines.md describes the format; `pretext kinds KIND` each kind's params.",
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "include": { "type": "array", "items": { "type": "string" } },
            "vars": { "type": "object" },
            "profiles": { "type": "object", "additionalProperties": { "type": "object" } },
            "matrix": { "type": "object", "additionalProperties": { "type": "array", "minItems": 1 } },
            "data": {
                "type": "object",
                "additionalProperties": { "type": "object", "required": ["path"], "properties": { "path": { "type": "string" } } }
            },
            "stages": { "type": "object", "additionalProperties": { "$ref": "#/$defs/stage" } },
            "executor": { "type": "object" }
        },
        "$defs": defs,
    })
}
