//! `${name}` interpolation of vars and matrix values.
//!
//! A string that is exactly `${name}` takes the value with its type (`img_size: ${img}` stays a
//! number); inside a longer string the value is formatted. `$${` writes a literal `${`, which shell
//! commands need (`$HOME` needs no escape).

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Names referenced by `${...}` in every string inside `value`.
pub fn references(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::String(s) => references_in(s, out),
        Value::Array(items) => items.iter().for_each(|v| references(v, out)),
        Value::Object(map) => map.values().for_each(|v| references(v, out)),
        _ => {}
    }
}

pub fn references_in(s: &str, out: &mut BTreeSet<String>) {
    for piece in pieces(s) {
        if let Piece::Var(name) = piece {
            out.insert(name.to_owned());
        }
    }
}

/// Substitutes in every string of `value`. On an unknown name returns it as the error.
pub fn interpolate(value: &Value, scope: &BTreeMap<String, Value>) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => interpolate_str(s, scope)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| interpolate(v, scope))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), interpolate(v, scope)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

pub fn interpolate_str(s: &str, scope: &BTreeMap<String, Value>) -> Result<Value, String> {
    let parts = pieces(s);
    if let [Piece::Var(name)] = parts.as_slice() {
        return scope.get(*name).cloned().ok_or_else(|| (*name).to_owned());
    }
    let mut out = String::with_capacity(s.len());
    for part in parts {
        match part {
            Piece::Text(t) => out.push_str(t),
            Piece::Var(name) => match scope.get(name) {
                Some(Value::String(v)) => out.push_str(v),
                Some(v) => out.push_str(&v.to_string()),
                None => return Err(name.to_owned()),
            },
        }
    }
    Ok(Value::String(out))
}

/// `${name}` in a command stage's `run:` text: each value goes in as one shell word, quoted when
/// it holds anything but letters, digits and `_ . / : = @ % + , -`, so a var whose value is
/// `x; rm -rf ~` or has spaces cannot splice shell syntax into the command. A `run:` that is
/// one var alone is the whole command and goes in as written.
pub fn interpolate_shell(s: &str, scope: &BTreeMap<String, Value>) -> Result<Value, String> {
    let parts = pieces(s);
    if let [Piece::Var(_)] = parts.as_slice() {
        return interpolate_str(s, scope);
    }
    let mut out = String::with_capacity(s.len());
    for part in parts {
        match part {
            Piece::Text(t) => out.push_str(t),
            Piece::Var(name) => match scope.get(name) {
                Some(Value::String(v)) => out.push_str(&shell_word(v)),
                Some(v) => out.push_str(&shell_word(&v.to_string())),
                None => return Err(name.to_owned()),
            },
        }
    }
    Ok(Value::String(out))
}

/// `v` as one POSIX shell word.
fn shell_word(v: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_./:=@%+,-".contains(c);
    if !v.is_empty() && v.chars().all(safe) {
        v.to_owned()
    } else {
        format!("'{}'", v.replace('\'', "'\\''"))
    }
}

#[derive(Debug, PartialEq)]
enum Piece<'a> {
    Text(&'a str),
    Var(&'a str),
}

fn pieces(s: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find('$') {
        let after = &rest[start..];
        if after.starts_with("$${") {
            out.push(Piece::Text(&rest[..start + 1]));
            rest = &rest[start + 2..];
            continue;
        }
        if let (true, Some(end)) = (after.starts_with("${"), after.find('}')) {
            if start > 0 {
                out.push(Piece::Text(&rest[..start]));
            }
            out.push(Piece::Var(after[2..end].trim()));
            rest = &after[end + 1..];
        } else {
            out.push(Piece::Text(&rest[..start + 1]));
            rest = &rest[start + 1..];
        }
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vars_in_a_command_are_single_shell_words() {
        let scope: BTreeMap<String, Value> = [
            ("name".to_owned(), Value::from("x; rm -rf ~")),
            ("n".to_owned(), Value::from(3)),
            ("q".to_owned(), Value::from("it's")),
            ("cmd".to_owned(), Value::from("echo hi")),
        ]
        .into_iter()
        .collect();
        let run = |t: &str| interpolate_shell(t, &scope).unwrap();
        assert_eq!(
            run("echo ${name} ${n}"),
            Value::from("echo 'x; rm -rf ~' 3")
        );
        assert_eq!(run("echo ${q}"), Value::from("echo 'it'\\''s'"));
        assert_eq!(
            run("${cmd}"),
            Value::from("echo hi"),
            "a whole command stays one"
        );
        assert_eq!(run("train.py --lr=${n}"), Value::from("train.py --lr=3"));
    }
    use serde_json::json;

    fn scope() -> BTreeMap<String, Value> {
        BTreeMap::from([("img".into(), json!(64)), ("m".into(), json!("vit"))])
    }

    #[test]
    fn whole_string_keeps_type() {
        assert_eq!(interpolate_str("${img}", &scope()), Ok(json!(64)));
        assert_eq!(
            interpolate_str("${m}-${img}px", &scope()),
            Ok(json!("vit-64px"))
        );
    }

    #[test]
    fn escapes_and_shell_variables_pass_through() {
        assert_eq!(
            interpolate_str("echo $HOME $${X}", &scope()),
            Ok(json!("echo $HOME ${X}"))
        );
        let mut refs = BTreeSet::new();
        references_in("a $${X} ${m}", &mut refs);
        assert_eq!(refs, BTreeSet::from(["m".to_owned()]));
    }

    #[test]
    fn unknown_name_is_reported() {
        assert_eq!(interpolate_str("${nope}", &scope()), Err("nope".into()));
    }
}
