//! Reads a pipeline file and the files it includes into one set of definitions.

use super::diagnostic::SpecError;
use super::ordered::Ordered;
use super::spec::{DataSpec, ExecutorSpec, FileSpec, StageSpec};
use super::yaml;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The text of one pipeline file, kept for error positions.
#[derive(Debug)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

/// A definition and the index of the source it came from.
#[derive(Debug, Clone)]
pub struct Sourced<T> {
    pub value: T,
    pub source: usize,
}

#[derive(Debug, Default)]
pub struct Merged {
    pub sources: Vec<Source>,
    pub vars: Ordered<Sourced<Value>>,
    pub profiles: Ordered<Ordered<Value>>,
    pub matrix: Ordered<Sourced<Vec<Value>>>,
    pub data: Ordered<Sourced<DataSpec>>,
    pub stages: Ordered<Sourced<StageSpec>>,
    pub executor: ExecutorSpec,
}

impl Merged {
    pub fn error(&self, source: usize, path: &[&str], message: impl Into<String>) -> SpecError {
        let src = &self.sources[source];
        SpecError::new(&src.path, message).at_path(&src.text, path)
    }
}

pub fn load(path: &Path) -> Result<Merged, SpecError> {
    let mut merged = Merged::default();
    load_into(path, &mut merged, &mut Vec::new())?;
    Ok(merged)
}

fn load_into(path: &Path, merged: &mut Merged, stack: &mut Vec<PathBuf>) -> Result<(), SpecError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        SpecError::new(path, format!("cannot read pipeline file: {e}"))
            .help("check the path; pipelines usually live under `pipelines/`")
    })?;
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if stack.contains(&canonical) {
        let chain: Vec<String> = stack
            .iter()
            .chain([&canonical])
            .map(|p| p.display().to_string())
            .collect();
        return Err(SpecError::new(
            path,
            format!("include cycle: {}", chain.join(" -> ")),
        ));
    }
    let spec: FileSpec = yaml::from_str(&text).map_err(|e| {
        let err = SpecError::new(path, e.message.clone());
        let err = match (e.line, e.column) {
            (Some(l), Some(c)) => err.at(&text, l, c),
            _ => err,
        };
        match unknown_field(&e.message) {
            Some((wrong, expected)) => err.suggest(&wrong, expected.iter().map(String::as_str)),
            None => err,
        }
    })?;
    let index = merged.sources.len();
    merged.sources.push(Source {
        path: path.to_path_buf(),
        text,
    });
    stack.push(canonical);
    let dir = path.parent().unwrap_or(Path::new("."));
    for include in &spec.include {
        let target = dir.join(include);
        if !target.is_file() {
            return Err(merged
                .error(
                    index,
                    &["include"],
                    format!("included file `{include}` does not exist"),
                )
                .help(format!(
                    "paths in `include` are relative to this file: looked for {}",
                    target.display()
                )));
        }
        load_into(&target, merged, stack)?;
    }
    stack.pop();

    // This file's own definitions win over what it included.
    for (k, v) in spec.vars {
        merged.vars.insert(
            k,
            Sourced {
                value: v,
                source: index,
            },
        );
    }
    for (k, v) in spec.profiles {
        merged.profiles.insert(k, v);
    }
    for (k, v) in spec.matrix {
        merged.matrix.insert(
            k,
            Sourced {
                value: v,
                source: index,
            },
        );
    }
    if let Some(executor) = spec.executor {
        merged.executor = std::mem::take(&mut merged.executor).overlay(executor);
    }
    merge_same(&mut merged.data, spec.data, index, "data", &merged.sources)?;
    merge_same(
        &mut merged.stages,
        spec.stages,
        index,
        "stages",
        &merged.sources,
    )?;
    Ok(())
}

/// Stages and data may be defined in several included files only if the definitions are equal:
/// route files share their upstream stages that way.
fn merge_same<T: PartialEq>(
    into: &mut Ordered<Sourced<T>>,
    from: Ordered<T>,
    source: usize,
    section: &str,
    sources: &[Source],
) -> Result<(), SpecError> {
    for (name, value) in from {
        match into.get(&name) {
            Some(existing) if existing.value != value => {
                let src = &sources[source];
                return Err(SpecError::new(
                    &src.path,
                    format!(
                        "`{section}.{name}` is defined differently in {} and here",
                        sources[existing.source].path.display()
                    ),
                )
                .at_path(&src.text, &[section, &name])
                .help("give one of them another name, or make the definitions identical"));
            }
            Some(_) => {}
            None => into.insert(name, Sourced { value, source }),
        }
    }
    Ok(())
}

/// Pulls `wrong` and the expected names out of serde's "unknown field `x`, expected one of `a`, `b`".
pub fn unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message.split("unknown field `").nth(1)?;
    let wrong = rest.split('`').next()?.to_owned();
    let expected = rest.split("expected").nth(1).map(|tail| {
        tail.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    });
    Some((wrong, expected.unwrap_or_default()))
}
