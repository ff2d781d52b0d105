//! The one place that names the YAML crate.
//!
//! The design card asks for `serde_yaml`, which is archived upstream. Everything else in pretext goes
//! through [`from_str`], so switching to a maintained fork with the same API (`serde_yaml_ng`,
//! `serde_norway`) is a one-line change here and in `Cargo.toml`.

use serde::de::DeserializeOwned;

/// A YAML syntax or type error with the 1-based position serde_yaml reported, when it had one.
#[derive(Debug)]
pub struct YamlError {
    pub message: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

/// Pipelines nest a handful of levels; anything far deeper is refused before the parser, whose
/// time grows with depth, sees it.
pub const MAX_NESTING: usize = 64;

pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    let depth = super::diagnostic::nesting_depth(text);
    if depth > MAX_NESTING {
        return Err(YamlError {
            message: format!(
                "nested {depth} levels deep; a pipeline file may nest at most {MAX_NESTING}"
            ),
            line: None,
            column: None,
        });
    }
    serde_yaml::from_str(text).map_err(|e| {
        let location = e.location();
        // serde_yaml appends " at line L column C" to its message; the position is reported separately.
        let mut message = e.to_string();
        if let Some(cut) = message.find(" at line ") {
            message.truncate(cut);
        }
        // serde_yaml quotes the offending value whole: an included binary or /etc/passwd would
        // be echoed in full.
        if let Some((cut, _)) = message.char_indices().nth(300) {
            message.truncate(cut);
            message.push_str("...");
        }
        YamlError {
            message,
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
        }
    })
}
