//! A dataset as every reader returns it: labelled image files with their split and group.

use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub fn parse(s: &str) -> Option<Split> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" | "training" => Some(Split::Train),
            "val" | "valid" | "validation" => Some(Split::Val),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub path: PathBuf,
    pub label: Option<usize>,
    pub split: Option<Split>,
    /// Patient or study: the unit that must not be split across train and validation.
    pub group: Option<String>,
    /// Where the sample was declared, for error messages (`labels.csv:17`).
    pub origin: String,
    /// Multi-label targets (NIH, CheXpert), one value per class in `Dataset::classes`.
    pub targets: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub samples: Vec<Sample>,
}
