//! The report's inputs: each whole stage's `manifest.json` (documented at
//! `cache::store::Manifest`, read here through the fields a report needs), grouped into routes:
//! runs of one stage template that differ only in their seed.

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One input stage, as the report sees it.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub stage: String,
    pub kind: String,
    pub key: String,
    pub dir: PathBuf,
    pub metrics: Value,
    /// The stage's params (defaults applied) and the keys and fingerprints of its inputs.
    pub params: Value,
    pub inputs: Value,
    pub run: RunFacts,
}

/// What the manifest says of the run that computed a stage.
#[derive(Debug, Clone, Deserialize)]
pub struct RunFacts {
    pub wall_s: f64,
    #[serde(default)]
    pub peak_rss_kib: Option<u64>,
    pub device: String,
    pub host: String,
    pub pretext_version: String,
    #[serde(default)]
    pub pretext_commit: String,
    #[serde(default)]
    pub invocation: Vec<String>,
    pub started_at_unix: u64,
}

#[derive(Deserialize)]
struct ManifestView {
    stage: String,
    kind: String,
    key: String,
    key_input: KeyInputView,
    metrics: Value,
    #[serde(flatten)]
    run: RunFacts,
}

#[derive(Deserialize)]
struct KeyInputView {
    params: Value,
    inputs: Value,
}

pub fn read(dir: &Path) -> Result<Leaf> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: inputs of a report must be whole stages",
            path.display()
        )
    })?;
    let m: ManifestView = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a pretext manifest", path.display()))?;
    Ok(Leaf {
        stage: m.stage,
        kind: m.kind,
        key: m.key,
        dir: dir.to_path_buf(),
        metrics: m.metrics,
        params: m.key_input.params,
        inputs: m.key_input.inputs,
        run: m.run,
    })
}

/// Runs of one stage template that differ only by seed: `evaluate@vit-chest_mae-seed1` and
/// `-seed2` are the route `evaluate@vit-chest_mae`.
pub struct Route<'a> {
    pub name: String,
    pub kind: String,
    pub leaves: Vec<&'a Leaf>,
}

pub fn routes(leaves: &[Leaf]) -> Vec<Route<'_>> {
    let mut groups: BTreeMap<(String, String), Vec<&Leaf>> = BTreeMap::new();
    for l in leaves {
        groups
            .entry((l.kind.clone(), route_of(&l.stage)))
            .or_default()
            .push(l);
    }
    groups
        .into_iter()
        .map(|((kind, name), leaves)| Route { name, kind, leaves })
        .collect()
}

pub fn route_of(stage: &str) -> String {
    let (head, tail) = stage.split_once('@').unwrap_or((stage, ""));
    let parts: Vec<&str> = tail
        .split('-')
        .filter(|p| !(p.starts_with("seed") && p[4..].chars().all(|c| c.is_ascii_digit())))
        .collect();
    let route = parts.join("-");
    if route.is_empty() {
        head.to_owned()
    } else {
        format!("{head}@{route}")
    }
}

/// The number at `path` in each leaf's metrics (leaves without it are left out).
pub fn metric_over(leaves: &[&Leaf], path: &[&str]) -> Vec<f64> {
    leaves
        .iter()
        .filter_map(|l| {
            path.iter()
                .try_fold(&l.metrics, |v, k| v.get(*k))
                .and_then(Value::as_f64)
        })
        .collect()
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect())
        .unwrap_or_default()
}

/// `to` relative to the folder `from` (both absolute or both relative to one root): what a
/// page in `from` links to `to` with.
pub fn relative(from: &Path, to: &Path) -> String {
    let (a, b): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out: Vec<String> = vec!["..".into(); a.len() - common];
    out.extend(
        b[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    out.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_collapse_into_routes() {
        assert_eq!(
            route_of("evaluate@vit-chest_mae-seed1"),
            "evaluate@vit-chest_mae"
        );
        assert_eq!(route_of("evaluate@seed2"), "evaluate");
        assert_eq!(route_of("evaluate"), "evaluate");
        assert_eq!(route_of("evaluate@vit-seedling"), "evaluate@vit-seedling");
    }

    #[test]
    fn links_are_relative_to_the_page() {
        assert_eq!(
            relative(Path::new("/c/tmp/k1"), Path::new("/c/evaluate/k2")),
            "../../evaluate/k2"
        );
    }
}
