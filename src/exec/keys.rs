//! Stage keys for a plan: upstream keys and data fingerprints folded in, in dependency order.

use crate::cache::fingerprint::fingerprint;
use crate::cache::key::KEY_SCHEMA;
use crate::cache::{Fingerprint, KeyInput, KeyedInput, StageKey, Store};
use crate::pipeline::{InputRef, Plan};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Keyed {
    pub key: StageKey,
    pub input: KeyInput,
}

/// A stage whose key cannot be computed: a data input is missing or unreadable, or an upstream
/// stage is blocked.
pub type Blocked = String;

/// Keys for every stage; `selected` limits the data fingerprinting to the stages that matter.
pub fn stage_keys(plan: &Plan, store: &Store, selected: &[bool]) -> Vec<Result<Keyed, Blocked>> {
    let mut fingerprints: HashMap<PathBuf, Result<Fingerprint, String>> = HashMap::new();
    let mut out: Vec<Result<Keyed, Blocked>> = Vec::with_capacity(plan.stages.len());
    for (index, stage) in plan.stages.iter().enumerate() {
        if !selected[index] {
            out.push(Err("not selected".into()));
            continue;
        }
        let mut inputs = BTreeMap::new();
        let mut blocked = None;
        for (slot, input) in &stage.inputs {
            let mut keyed = Vec::new();
            for r in input.refs() {
                match r {
                    InputRef::Stage { stage: up, output } => match &out[*up] {
                        Ok(k) => keyed.push(KeyedInput::Stage {
                            key: k.key,
                            output: output.as_ref().map(|o| o.name.clone()),
                        }),
                        Err(_) => {
                            blocked =
                                Some(format!("upstream `{}` is blocked", plan.stages[*up].name))
                        }
                    },
                    InputRef::Data { path, options } => {
                        let fp = fingerprints.entry(path.clone()).or_insert_with(|| {
                            fingerprint(path, &store.state_dir())
                                .map(|(f, _)| f)
                                .map_err(|e| e.to_string())
                        });
                        match fp {
                            Ok(f) => keyed.push(KeyedInput::Data {
                                fingerprint: *f,
                                options: options.clone(),
                            }),
                            Err(e) => blocked = Some(format!("input `{slot}`: {e}")),
                        }
                    }
                }
            }
            inputs.insert(slot.clone(), keyed);
        }
        out.push(match blocked {
            Some(reason) => Err(reason),
            None => {
                let input = KeyInput {
                    key_schema: KEY_SCHEMA,
                    kind: stage.kind.clone(),
                    version: stage.version,
                    params: stage.params.clone(),
                    inputs,
                };
                Ok(Keyed {
                    key: input.key(),
                    input,
                })
            }
        });
    }
    out
}
