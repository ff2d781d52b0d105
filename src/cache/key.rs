//! What goes into a [`StageKey`], and nothing else.
//!
//! Not in the key, on purpose: the stage's name, the pipeline file, YAML key order and comments,
//! the device, the cache path, the pretext version. So one stage written in three pipelines is
//! one entry, computed once; a param written out with its default value is the same key as one
//! left out, because tasks hand their params over with defaults applied.

use super::digest::{Fingerprint, StageKey};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Bumped when the key's own layout changes; every key changes with it.
pub const KEY_SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyInput {
    pub key_schema: u32,
    pub kind: String,
    /// The task's `VERSION`.
    pub version: u32,
    pub params: Value,
    pub inputs: BTreeMap<String, Vec<KeyedInput>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KeyedInput {
    Stage {
        key: StageKey,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<String>,
    },
    Data {
        fingerprint: Fingerprint,
        #[serde(default, skip_serializing_if = "Map::is_empty")]
        options: Map<String, Value>,
    },
}

impl KeyInput {
    /// blake3 over canonical JSON: serde_json's maps are sorted, so field and key order cannot
    /// change the bytes.
    pub fn key(&self) -> StageKey {
        let canonical = serde_json::to_value(self).expect("key input serialises");
        StageKey::of(&serde_json::to_vec(&canonical).expect("json serialises"))
    }
}

/// Where two key inputs differ, as `path: old -> new` lines (for `pretext status`).
pub fn diff(old: &Value, new: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff_into("", old, new, &mut out);
    out
}

fn diff_into(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff_into(&p, x, y, out),
                    (Some(x), None) => out.push(format!("{p}: {} -> (removed)", short(x))),
                    (None, Some(y)) => out.push(format!("{p}: (new) -> {}", short(y))),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff_into(&format!("{path}[{i}]"), x, y, out);
            }
        }
        _ if old != new => out.push(format!("{path}: {} -> {}", short(old), short(new))),
        _ => {}
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..57])
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input(params: Value) -> KeyInput {
        KeyInput {
            key_schema: KEY_SCHEMA,
            kind: "command".into(),
            version: 1,
            params,
            inputs: BTreeMap::new(),
        }
    }

    #[test]
    fn key_ignores_map_order() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": 2, "x": 3}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a": {"x": 3, "y": 2}, "b": 1}"#).unwrap();
        assert_eq!(input(a).key(), input(b).key());
    }

    #[test]
    fn key_is_stable_across_releases() {
        // A changed value here means every user's cache is invalidated: bump KEY_SCHEMA on purpose.
        let key = input(json!({"run": "true"})).key();
        assert_eq!(key.hex(), EXPECTED_KEY, "stage key drifted");
    }
    const EXPECTED_KEY: &str = "2b60f14a5115040fc7d26892513c5abec2d9847a5b8e156360748549fbe4513f";

    #[test]
    fn diff_names_changed_fields() {
        let d = diff(
            &json!({"params": {"lr": 1, "e": 2}}),
            &json!({"params": {"lr": 2, "e": 2}}),
        );
        assert_eq!(d, vec!["params.lr: 1 -> 2"]);
    }
}
