//! Errors in pipeline files, pointing at the file, line and column, with a suggested fix.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A mistake in a pipeline file. `pretext` exits with code 2 on these. Boxed, so that the
/// `Result`s of the loader stay one pointer wide on their happy path.
#[derive(Debug, Clone)]
pub struct SpecError(Box<Located>);

/// Where a [`SpecError`] is and what it says.
#[derive(Debug, Clone)]
pub struct Located {
    pub file: PathBuf,
    /// 1-based; `None` when the position is unknown (a missing file, say).
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
    pub help: Option<String>,
    /// The offending source line, shown under the position.
    pub snippet: Option<String>,
}

impl std::ops::Deref for SpecError {
    type Target = Located;
    fn deref(&self) -> &Located {
        &self.0
    }
}

impl std::ops::DerefMut for SpecError {
    fn deref_mut(&mut self) -> &mut Located {
        &mut self.0
    }
}

impl SpecError {
    pub fn new(file: &Path, message: impl Into<String>) -> Self {
        SpecError(Box::new(Located {
            file: file.to_path_buf(),
            line: None,
            column: None,
            message: message.into(),
            help: None,
            snippet: None,
        }))
    }

    pub fn at(mut self, source: &str, line: usize, column: usize) -> Self {
        self.line = Some(line);
        self.column = Some(column);
        self.snippet = source
            .lines()
            .nth(line.saturating_sub(1))
            .map(str::to_owned);
        self
    }

    /// Points at the YAML key path (`["stages", "train", "params"]`), or at the deepest prefix found.
    pub fn at_path(self, source: &str, path: &[&str]) -> Self {
        match locate(source, path) {
            Some((line, column)) => self.at(source, line, column),
            None => self,
        }
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Adds "did you mean `x`?" when a candidate is close to `wrong`.
    pub fn suggest<'a>(self, wrong: &str, candidates: impl IntoIterator<Item = &'a str>) -> Self {
        match closest(wrong, candidates) {
            Some(best) => self.help(format!("did you mean `{best}`?")),
            None => self,
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", self.message)?;
        write!(f, "  --> {}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}:{}", self.column.unwrap_or(1))?;
        }
        if let (Some(snippet), Some(line)) = (&self.snippet, self.line) {
            let gutter = line.to_string().len();
            let col = self.column.unwrap_or(1);
            write!(
                f,
                "\n{:gutter$} |\n{line} | {snippet}\n{:gutter$} | {:>col$}",
                "", "", "^"
            )?;
        }
        if let Some(help) = &self.help {
            write!(f, "\n  = help: {help}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecError {}

/// The closest candidate by edit distance, if it is close enough to be a plausible typo.
pub fn closest<'a>(wrong: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::normalized_damerau_levenshtein(wrong, c), c))
        .filter(|(score, _)| *score >= 0.5)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Finds the 1-based (line, column) of a key path in block-style YAML, also inside a one-line
/// flow mapping (`inputs: { images: data.chest }`). Returns the deepest part of the path found.
///
/// serde_yaml keeps no positions after deserialising, so semantic errors (unknown kinds, missing
/// inputs, cycles) are located by walking the text's indentation instead.
pub fn locate(source: &str, path: &[&str]) -> Option<(usize, usize)> {
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut best: Option<(usize, (usize, usize))> = None;
    for (index, raw) in source.lines().enumerate() {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = raw.len() - trimmed.len();
        let body = trimmed.strip_prefix("- ").unwrap_or(trimmed);
        let Some((key, _)) = split_key(body) else {
            continue;
        };
        let indent = indent + (trimmed.len() - body.len());
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key.to_owned()));
        let depth = matched_depth(&stack, path);
        let column = indent + 1;
        if depth == stack.len() && best.is_none_or(|(d, _)| depth > d) {
            best = Some((depth, (index + 1, column)));
        }
        if depth == stack.len() && depth < path.len() {
            // One-line flow mapping: look for the next key of the path on this line.
            let needle = format!("{}:", path[depth]);
            if let Some(pos) = find_key_in_flow(raw, &needle) {
                if best.is_none_or(|(d, _)| depth + 1 > d) {
                    best = Some((depth + 1, (index + 1, pos + 1)));
                }
            }
        }
        if best.is_some_and(|(d, _)| d == path.len()) {
            break;
        }
    }
    best.map(|(_, position)| position)
}

/// The 1-based (line, column) of every key directly under `parent` (`["stages"]` gives each
/// stage), in one pass over the text: what a plan of thousands of stages uses instead of one
/// [`locate`] per stage, which rescans the text each time.
pub fn locate_children(source: &str, parent: &[&str]) -> HashMap<String, (usize, usize)> {
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut out = HashMap::new();
    for (index, raw) in source.lines().enumerate() {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let body = trimmed.strip_prefix("- ").unwrap_or(trimmed);
        let Some((key, _)) = split_key(body) else {
            continue;
        };
        let indent = raw.len() - body.len();
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key.to_owned()));
        if stack.len() == parent.len() + 1 && matched_depth(&stack, parent) == parent.len() {
            out.entry(key.to_owned()).or_insert((index + 1, indent + 1));
        }
    }
    out
}

/// The deepest nesting the YAML parser will be asked to follow: brackets of flow collections
/// outside quoted strings, and indentation. Checked before parsing, because the parser's time
/// grows with depth (a 100,000-deep file took minutes to be refused).
pub fn nesting_depth(source: &str) -> usize {
    let (mut depth, mut deepest, mut quote) = (0usize, 0usize, None::<char>);
    let mut indent_max = 0;
    for line in source.lines() {
        let indent = line.len() - line.trim_start().len();
        indent_max = indent_max.max(indent);
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        quote = None;
    }
    // Two columns per block level is the tightest indentation YAML users write.
    deepest.max(indent_max / 2)
}

fn matched_depth(stack: &[(usize, String)], path: &[&str]) -> usize {
    stack
        .iter()
        .zip(path)
        .take_while(|((_, k), p)| k == *p)
        .count()
}

fn split_key(body: &str) -> Option<(&str, &str)> {
    let colon = body
        .find(": ")
        .or_else(|| body.strip_suffix(':').map(|k| k.len()))?;
    let key = body[..colon].trim().trim_matches('"').trim_matches('\'');
    if key.is_empty() || key.contains(['{', '[', '#']) {
        return None;
    }
    Some((key, &body[colon..]))
}

fn find_key_in_flow(line: &str, needle: &str) -> Option<usize> {
    let start = line.find('{')?;
    line[start..].match_indices(needle).find_map(|(i, _)| {
        let before = line[start..start + i].chars().last();
        matches!(before, Some('{' | ' ' | ',')).then_some(start + i)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "vars:\n  img: 64\nstages:\n  a:\n    kind: command\n    inputs: { x: b.out, y: data.c }\n  b:\n    kind: mea\n";

    #[test]
    fn locates_block_and_flow_keys() {
        assert_eq!(locate(SRC, &["stages", "b", "kind"]), Some((8, 5)));
        assert_eq!(locate(SRC, &["stages", "a", "inputs", "y"]), Some((6, 25)));
        assert_eq!(locate(SRC, &["vars", "img"]), Some((2, 3)));
        // The deepest prefix found when the leaf does not exist.
        assert_eq!(locate(SRC, &["stages", "b", "params"]), Some((7, 3)));
    }

    #[test]
    fn stage_lines_come_from_one_pass() {
        let lines = locate_children(SRC, &["stages"]);
        assert_eq!(lines.get("a"), Some(&(4, 3)));
        assert_eq!(lines.get("b"), Some(&(7, 3)));
        assert_eq!(lines.len(), 2);
        assert_eq!(nesting_depth("a: [[1], {b: '[['}]\n"), 2);
        assert_eq!(nesting_depth(&"[".repeat(500)), 500);
    }

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(closest("mea", ["mae", "proxy"]), Some("mae"));
        assert_eq!(closest("zzzzzz", ["mae", "proxy"]), None);
    }

    #[test]
    fn renders_position_and_caret() {
        let e = SpecError::new(Path::new("p.yaml"), "unknown kind `mea`")
            .at_path(SRC, &["stages", "b", "kind"])
            .suggest("mea", ["mae"]);
        let text = e.to_string();
        assert!(text.contains("p.yaml:8:5"), "{text}");
        assert!(text.contains("8 |     kind: mea"), "{text}");
        assert!(text.contains("did you mean `mae`?"), "{text}");
    }
}
