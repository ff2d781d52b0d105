//! Input references: `stage`, `stage.output`, `stage@instance`, `stage@*` (gather), `data.NAME`
//! and `file:PATH`, parsed and resolved to the planned instances and data paths they name.

use super::diagnostic::{closest, SpecError};
use super::expand::{list_or_none, Binding, Expander};
use super::plan::{InputRef, OutputRef};
use super::vars;
use serde_json::{Map, Value};

pub(super) enum Ref<'a> {
    Data(&'a str),
    File(&'a str),
    Stage {
        template: &'a str,
        instance: Option<&'a str>,
        gather: bool,
        output: Option<&'a str>,
    },
}

pub(super) fn parse_ref(s: &str) -> Ref<'_> {
    if let Some(name) = s.strip_prefix("data.") {
        return Ref::Data(name);
    }
    if let Some(path) = s.strip_prefix("file:") {
        return Ref::File(path);
    }
    let (head, output) = match s.split_once('.') {
        Some((h, o)) => (h, Some(o)),
        None => (s, None),
    };
    match head.split_once('@') {
        Some((template, "*")) => Ref::Stage {
            template,
            instance: None,
            gather: true,
            output,
        },
        Some((template, _)) => Ref::Stage {
            template,
            instance: Some(head),
            gather: false,
            output,
        },
        None => Ref::Stage {
            template: head,
            instance: None,
            gather: false,
            output,
        },
    }
}

impl Expander<'_> {
    /// The planned inputs one reference `r` of input `slot` names, for the instance made with
    /// `binding`: one data path, or the upstream instances it picks.
    pub(super) fn resolve(
        &self,
        template: &str,
        slot: &str,
        r: &str,
        binding: &Binding,
    ) -> Result<Vec<InputRef>, SpecError> {
        match parse_ref(r) {
            Ref::Data(name) => Ok(vec![self.resolve_data(template, slot, name, binding)?]),
            Ref::File(path) => Ok(vec![InputRef::Data {
                path: self.root.join(path),
                options: Map::new(),
            }]),
            Ref::Stage {
                template: target,
                instance,
                gather,
                output,
            } => self
                .chosen_instances(template, slot, target, instance, gather, binding)?
                .into_iter()
                .map(|stage| {
                    let output = match output {
                        Some(name) => Some(self.output_ref(template, slot, stage, name)?),
                        None => None,
                    };
                    Ok(InputRef::Stage { stage, output })
                })
                .collect(),
        }
    }

    fn resolve_data(
        &self,
        template: &str,
        slot: &str,
        name: &str,
        binding: &Binding,
    ) -> Result<InputRef, SpecError> {
        let Some(data) = self.merged.data.get(name) else {
            return Err(self
                .err(
                    template,
                    &["inputs", slot],
                    format!("no data entry `{name}`"),
                )
                .suggest(name, self.merged.data.keys()));
        };
        let scope = self.scope(binding);
        let path = match vars::interpolate_str(&data.value.path, &scope) {
            Ok(Value::String(p)) => p,
            Ok(other) => other.to_string(),
            Err(var) => return Err(self.unknown_var(template, &["inputs", slot], &var, &scope)),
        };
        let options = match vars::interpolate(&Value::Object(data.value.options.clone()), &scope) {
            Ok(Value::Object(m)) => m,
            _ => data.value.options.clone(),
        };
        Ok(InputRef::Data {
            path: self.root.join(path),
            options,
        })
    }

    /// The instances of `target` a reference picks: the one named (`stage@instance`), every one
    /// agreeing with `binding` on the axes both have (`stage@*`), or the one made with the same
    /// values of `target`'s axes (plain `stage`).
    fn chosen_instances(
        &self,
        template: &str,
        slot: &str,
        target: &str,
        instance: Option<&str>,
        gather: bool,
        binding: &Binding,
    ) -> Result<Vec<usize>, SpecError> {
        let (target_axes, instances) = &self.expanded[target];
        if let Some(instance) = instance {
            let found = instances
                .iter()
                .find(|(_, i)| self.stages[*i].name == instance);
            return match found {
                Some((_, i)) => Ok(vec![*i]),
                None => {
                    let names = instances.iter().map(|(_, i)| self.stages[*i].name.as_str());
                    Err(self
                        .err(
                            template,
                            &["inputs", slot],
                            format!("no stage instance `{instance}`"),
                        )
                        .suggest(instance, names))
                }
            };
        }
        let picked = |b: &Binding| {
            if gather {
                b.iter()
                    .all(|(a, v)| binding.get(a).is_none_or(|mine| mine == v))
            } else {
                target_axes.iter().all(|a| b.get(a) == binding.get(a))
            }
        };
        Ok(instances
            .iter()
            .filter(|(b, _)| picked(b))
            .map(|(_, i)| *i)
            .collect())
    }

    /// The output `name` of upstream instance `stage`, checked against what its kind declares.
    fn output_ref(
        &self,
        template: &str,
        slot: &str,
        stage: usize,
        name: &str,
    ) -> Result<OutputRef, SpecError> {
        let upstream = &self.stages[stage];
        let outputs = (self.catalog.get(&upstream.kind).expect("known").outputs)(&upstream.params);
        if let Some(o) = outputs.iter().find(|o| o.name == name) {
            return Ok(OutputRef {
                name: name.to_owned(),
                path: o.path.to_owned(),
            });
        }
        let names: Vec<&str> = outputs.iter().map(|o| o.name).collect();
        let e = self.err(
            template,
            &["inputs", slot],
            format!(
                "stage `{}` ({}) has no output `{name}`",
                upstream.template, upstream.kind
            ),
        );
        Err(match closest(name, names.iter().copied()) {
            Some(best) => e.help(format!(
                "did you mean `{best}`? outputs: {}",
                names.join(", ")
            )),
            None => e.help(format!(
                "outputs of `{}`: {}",
                upstream.kind,
                list_or_none(&names)
            )),
        })
    }
}
