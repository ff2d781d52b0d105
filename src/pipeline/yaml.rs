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

pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    serde_yaml::from_str(text).map_err(|e| {
        let location = e.location();
        // serde_yaml appends " at line L column C" to its message; the position is reported separately.
        let mut message = e.to_string();
        if let Some(cut) = message.find(" at line ") {
            message.truncate(cut);
        }
        YamlError {
            message,
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
        }
    })
}
