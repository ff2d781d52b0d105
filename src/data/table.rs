//! CSV files as the data sources read them, through the `csv` crate (quoted fields, embedded
//! commas and quotes, CRLF): a UTF-8 byte-order mark dropped, blank lines skipped, ragged rows
//! allowed (NIH's trailing comma), every row with its 1-based line number for error messages.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// A CSV file: its header (trimmed, as written) when it has one, and its data rows.
pub struct Table {
    pub file: PathBuf,
    pub header: Vec<String>,
    /// (1-based line number, trimmed fields) of every non-blank row.
    pub rows: Vec<(usize, Vec<String>)>,
}

impl Table {
    /// A file whose first row names the columns.
    pub fn with_header(file: &Path) -> Result<Table> {
        let mut t = Table::read(file)?;
        if !t.rows.is_empty() {
            t.header = t.rows.remove(0).1;
        }
        Ok(t)
    }

    /// A file without a header row (MURA's).
    pub fn headerless(file: &Path) -> Result<Table> {
        Table::read(file)
    }

    fn read(file: &Path) -> Result<Table> {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(bytes);
        // Line numbers from byte offsets: the csv crate's own count skips blank lines, and a
        // record's offset is where its reader started, before the line breaks ahead of it.
        let newlines: Vec<usize> = bytes
            .iter()
            .enumerate()
            .filter(|(_, &b)| b == b'\n')
            .map(|(i, _)| i)
            .collect();
        let line_at = |byte: u64| {
            let start = bytes[byte as usize..]
                .iter()
                .position(|b| !matches!(b, b'\r' | b'\n'))
                .map_or(bytes.len(), |k| byte as usize + k);
            1 + newlines.partition_point(|&nl| nl < start)
        };
        let mut rows = Vec::new();
        for record in reader.records() {
            let record = record.map_err(|e| {
                let line = e.position().map_or(0, |p| line_at(p.byte()));
                anyhow::anyhow!("{}:{line}: {}", file.display(), csv_problem(&e))
            })?;
            let line = line_at(record.position().map_or(0, |p| p.byte()));
            let fields: Vec<String> = record.iter().map(|f| f.trim().to_owned()).collect();
            if fields.iter().all(String::is_empty) {
                continue;
            }
            rows.push((line, fields));
        }
        Ok(Table {
            file: file.to_path_buf(),
            header: Vec::new(),
            rows,
        })
    }

    /// The index of the column named `name` (ASCII case ignored), or an error listing the header.
    pub fn column(&self, name: &str) -> Result<usize> {
        self.find(name).with_context(|| {
            format!(
                "{}: no `{name}` column (the header has: {})",
                self.file.display(),
                self.header.join(", ")
            )
        })
    }

    pub fn find(&self, name: &str) -> Option<usize> {
        self.header
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))
    }

    /// `file:line`, for messages about a row.
    pub fn origin(&self, line: usize) -> String {
        format!("{}:{line}", self.file.display())
    }
}

fn csv_problem(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Utf8 { .. } => {
            "not UTF-8 text; save the file as UTF-8 (CSV UTF-8 in a spreadsheet)".to_owned()
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_bom_blank_lines_and_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("labels.csv");
        std::fs::write(
            &file,
            "\u{feff}path,Label\r\n\"a, b.png\",\"say \"\"x\"\"\"\r\n\r\nc.png, y \r\n",
        )
        .unwrap();
        let t = Table::with_header(&file).unwrap();
        assert_eq!(t.header, ["path", "Label"], "BOM dropped");
        assert_eq!(t.column("label").unwrap(), 1);
        assert_eq!(
            t.rows,
            vec![
                (2, vec!["a, b.png".to_owned(), "say \"x\"".to_owned()]),
                (4, vec!["c.png".to_owned(), "y".to_owned()])
            ]
        );
        let missing = t.column("split").unwrap_err().to_string();
        assert!(missing.contains("no `split` column (the header has: path, Label)"));
    }
}
