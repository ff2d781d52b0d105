//! The user's config file: settings that belong to a person or a cluster, not to a pipeline
//! (today the `executor:` block: partition, account, ...).
//!
//! Read from `$PRETEXT_CONFIG` when set (the file must exist), else from
//! `$XDG_CONFIG_HOME/pretext/config.yaml` or `~/.config/pretext/config.yaml` when present.

use super::diagnostic::SpecError;
use super::spec::ExecutorSpec;
use super::yaml;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    executor: Option<ExecutorSpec>,
}

/// The executor settings of the user's config file; empty when there is none.
pub fn user_executor() -> Result<ExecutorSpec, SpecError> {
    let (path, required) = match std::env::var_os("PRETEXT_CONFIG") {
        Some(p) => (PathBuf::from(p), true),
        None => {
            let base = std::env::var_os("XDG_CONFIG_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
            match base {
                Some(b) => (b.join("pretext").join("config.yaml"), false),
                None => return Ok(ExecutorSpec::default()),
            }
        }
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(ExecutorSpec::default())
        }
        Err(e) => {
            return Err(
                SpecError::new(&path, format!("cannot read the config file: {e}"))
                    .help("PRETEXT_CONFIG names the config file; unset it to use none"),
            )
        }
    };
    let file: ConfigFile = yaml::from_str(&text).map_err(|e| {
        let err = SpecError::new(&path, e.message);
        match (e.line, e.column) {
            (Some(l), Some(c)) => err.at(&text, l, c),
            _ => err,
        }
    })?;
    Ok(file.executor.unwrap_or_default())
}
