//! Matrix expansion: each stage template becomes one instance per binding of the axes it uses
//! (directly, through vars, or through the stages it reads without `@*`), with vars interpolated,
//! params normalised by the kind and inputs resolved (`refs`). Templates are expanded in
//! dependency order (`graph`), so an instance can name the instances it reads.

use super::diagnostic::{closest, SpecError};
use super::graph::{cycle_path, declaration_order_topo};
use super::load::{unknown_field, Merged};
use super::plan::{project_root, InputRef, LoadOptions, Plan, PlannedInput, PlannedStage};
use super::refs::{parse_ref, Ref};
use super::spec::{InputSpec, StageSpec};
use super::vars;
use crate::stage::{Catalog, InputSlot};
use petgraph::graph::{DiGraph, NodeIndex};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub(super) type Binding = BTreeMap<String, Value>;

/// A template's matrix axes, and its instances with their bindings and stage indices.
pub(super) type Expansion = (Vec<String>, Vec<(Binding, usize)>);

pub(super) struct Expander<'a> {
    pub(super) file: &'a Path,
    pub(super) root: PathBuf,
    pub(super) merged: &'a Merged,
    pub(super) catalog: &'a Catalog,
    pub(super) axes: Vec<(String, Vec<Value>)>,
    pub(super) vars: Vec<(String, Value)>,
    pub(super) stages: Vec<PlannedStage>,
    /// Per template: its axes, and its instances with their bindings.
    pub(super) expanded: HashMap<String, Expansion>,
    /// Per source file: the line of each stage, found in one pass when first needed.
    pub(super) stage_lines: HashMap<usize, HashMap<String, (usize, usize)>>,
}

/// The values of an axis after `--set`: a list pins it to those values (`--set seed=[0,1]`),
/// anything else to that one value. An axis whose own values are lists (`vit_dims`) takes a list
/// as one value. None for an empty list.
fn pinned(declared: &[Value], value: &Value) -> Option<Vec<Value>> {
    let axis_of_lists = declared.iter().any(Value::is_array);
    match value {
        Value::Array(values) if !axis_of_lists => (!values.is_empty()).then(|| values.clone()),
        one => Some(vec![one.clone()]),
    }
}

impl<'a> Expander<'a> {
    pub(super) fn new(
        file: &'a Path,
        merged: &'a Merged,
        catalog: &'a Catalog,
        opts: &LoadOptions,
    ) -> Result<Self, SpecError> {
        let mut vars: Vec<(String, Value)> = merged
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect();
        let mut axes: Vec<(String, Vec<Value>)> = merged
            .matrix
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect();
        for (axis, values) in &axes {
            if values.is_empty() {
                let src = merged.matrix.get(axis).map_or(0, |s| s.source);
                return Err(merged.error(
                    src,
                    &["matrix", axis],
                    format!("matrix axis `{axis}` has no values"),
                ));
            }
            if vars.iter().any(|(k, _)| k == axis) {
                let src = merged.matrix.get(axis).map_or(0, |s| s.source);
                return Err(merged
                    .error(
                        src,
                        &["matrix", axis],
                        format!("`{axis}` is both a var and a matrix axis, and the var would hide the axis's values"),
                    )
                    .help(format!("remove `{axis}` from `vars:` (`--set {axis}=...` pins an axis to one value)")));
            }
        }
        if let Some(profile) = &opts.profile {
            let Some(overrides) = merged.profiles.get(profile) else {
                let known: Vec<&str> = merged.profiles.keys().collect();
                let e = SpecError::new(file, format!("no profile named `{profile}`"));
                return Err(match closest(profile, known.iter().copied()) {
                    Some(best) => e.help(format!("did you mean `{best}`?")),
                    None => e.help(format!("profiles in this file: {}", list_or_none(&known))),
                });
            };
            for (k, v) in overrides.iter() {
                set_var(&mut vars, k, v.clone());
            }
        }
        for (name, value) in &opts.set {
            if let Some(axis) = axes.iter_mut().find(|(a, _)| a == name) {
                axis.1 = pinned(&axis.1, value).ok_or_else(|| {
                    SpecError::new(file, format!("`--set {name}=[]` leaves the axis no values"))
                        .help(format!(
                            "give one value or a list: --set {name}=1 or --set {name}=[0,1]"
                        ))
                })?;
            } else if vars.iter().any(|(k, _)| k == name) {
                set_var(&mut vars, name, value.clone());
            } else {
                let names: Vec<&str> = vars
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .chain(axes.iter().map(|(a, _)| a.as_str()))
                    .collect();
                return Err(SpecError::new(
                    file,
                    format!("`--set {name}=...` names no var or matrix axis of this pipeline"),
                )
                .suggest(name, names.iter().copied()));
            }
        }
        Ok(Expander {
            file,
            root: project_root(file),
            merged,
            catalog,
            axes,
            vars,
            stages: Vec::new(),
            expanded: HashMap::new(),
            stage_lines: HashMap::new(),
        })
    }

    pub(super) fn err(
        &self,
        template: &str,
        path: &[&str],
        message: impl Into<String>,
    ) -> SpecError {
        let source = self.merged.stages.get(template).map_or(0, |s| s.source);
        let mut full = vec!["stages", template];
        full.extend_from_slice(path);
        self.merged.error(source, &full, message)
    }

    pub(super) fn run(mut self) -> Result<Plan, SpecError> {
        if self.merged.stages.is_empty() {
            return Err(SpecError::new(self.file, "this pipeline has no stages")
                .help("add a `stages:` mapping; see docs/pipelines.md"));
        }
        for (name, spec) in self.merged.stages.iter() {
            self.check_name(name)?;
            if self.catalog.get(&spec.value.kind).is_none() {
                let kinds: Vec<&str> = self.catalog.kinds().collect();
                let e = self.err(
                    name,
                    &["kind"],
                    format!("unknown stage kind `{}`", spec.value.kind),
                );
                return Err(match closest(&spec.value.kind, kinds.iter().copied()) {
                    Some(best) => e.help(format!(
                        "did you mean `{best}`? known kinds: {}",
                        kinds.join(", ")
                    )),
                    None => e.help(format!("known kinds: {}", kinds.join(", "))),
                });
            }
        }
        for template in self.template_order()? {
            self.expand(&template)?;
        }
        Ok(Plan {
            file: self.file.to_path_buf(),
            root: self.root,
            stages: self.stages,
            executor: self.merged.executor.clone(),
            profiles: self.merged.profiles.keys().map(str::to_owned).collect(),
        })
    }

    fn check_name(&self, name: &str) -> Result<(), SpecError> {
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            && name != "data"
            && name != "file";
        if valid {
            Ok(())
        } else {
            Err(self
                .err(name, &[], format!("`{name}` is not a valid stage name"))
                .help("use letters, digits, `_` and `-`; `data` and `file` are reserved"))
        }
    }

    /// The axes a stage uses itself: through `${axis}` directly or through vars that mention one.
    fn own_axes(&self, template: &str) -> Vec<String> {
        let spec = &self
            .merged
            .stages
            .get(template)
            .expect("template exists")
            .value;
        let mut names = BTreeSet::new();
        vars::references(&Value::Object(spec.params.clone()), &mut names);
        if let Some(run) = &spec.run {
            vars::references_in(run, &mut names);
        }
        for (_, input) in spec.inputs.iter() {
            for s in input_strings(input) {
                vars::references_in(s, &mut names);
            }
        }
        let mut seen = BTreeSet::new();
        while let Some(name) = names.pop_first() {
            if !seen.insert(name.clone()) {
                continue;
            }
            if let Some((_, v)) = self.vars.iter().find(|(k, _)| *k == name) {
                vars::references(v, &mut names);
            }
        }
        self.axes
            .iter()
            .filter(|(a, _)| seen.contains(a))
            .map(|(a, _)| a.clone())
            .collect()
    }

    pub(super) fn scope(&self, binding: &Binding) -> BTreeMap<String, Value> {
        let mut scope: BTreeMap<String, Value> = binding.clone();
        for (name, value) in &self.vars {
            // A var that mentions an axis this stage does not bind stays out of scope; using it
            // would have bound the axis.
            if let Ok(v) = vars::interpolate(value, &scope) {
                scope.insert(name.clone(), v);
            }
        }
        scope
    }

    fn bindings(&self, axes: &[String]) -> Vec<Binding> {
        let mut out = vec![Binding::new()];
        for (axis, values) in self.axes.iter().filter(|(a, _)| axes.contains(a)) {
            out = out
                .into_iter()
                .flat_map(|b| {
                    values.iter().map(move |v| {
                        let mut b = b.clone();
                        b.insert(axis.clone(), v.clone());
                        b
                    })
                })
                .collect();
        }
        out
    }

    fn interpolated_inputs(
        &self,
        template: &str,
        scope: &BTreeMap<String, Value>,
    ) -> Result<Vec<(String, Vec<String>, bool)>, SpecError> {
        let spec = &self
            .merged
            .stages
            .get(template)
            .expect("template exists")
            .value;
        let mut out = Vec::new();
        for (slot, input) in spec.inputs.iter() {
            let mut refs = Vec::new();
            for s in input_strings(input) {
                match vars::interpolate_str(s, scope) {
                    Ok(Value::String(r)) => refs.push(r),
                    Ok(Value::Array(items)) => refs.extend(
                        items
                            .iter()
                            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned)),
                    ),
                    Ok(other) => refs.push(other.to_string()),
                    Err(name) => {
                        return Err(self.unknown_var(template, &["inputs", slot], &name, scope))
                    }
                }
            }
            out.push((slot.clone(), refs, matches!(input, InputSpec::Many(_))));
        }
        Ok(out)
    }

    pub(super) fn unknown_var(
        &self,
        template: &str,
        path: &[&str],
        name: &str,
        scope: &BTreeMap<String, Value>,
    ) -> SpecError {
        let e = self.err(template, path, format!("unknown variable `${{{name}}}`"));
        match closest(name, scope.keys().map(String::as_str)) {
            Some(best) => e.help(format!("did you mean `${{{best}}}`?")),
            None => e.help(format!(
                "declare it under `vars:` or `matrix:`; a shell variable is written `${name}` or `$${{{name}}}`"
            )),
        }
    }

    /// Orders the templates so each comes after those it references; a cycle is an error that
    /// prints its path.
    fn template_order(&self) -> Result<Vec<String>, SpecError> {
        let mut graph: DiGraph<String, ()> = DiGraph::new();
        let nodes: HashMap<&str, NodeIndex> = self
            .merged
            .stages
            .keys()
            .map(|k| (k, graph.add_node(k.to_owned())))
            .collect();
        for template in self.merged.stages.keys() {
            for binding in self.bindings(&self.own_axes(template)) {
                let scope = self.scope(&binding);
                for (slot, refs, _) in self.interpolated_inputs(template, &scope)? {
                    for r in &refs {
                        match parse_ref(r) {
                            Ref::Stage {
                                template: target, ..
                            } => {
                                let Some(&to) = nodes.get(target) else {
                                    let e = self.err(template, &["inputs", &slot], format!("input `{slot}` refers to `{r}`, but there is no stage `{target}`"));
                                    let e = e.suggest(target, self.merged.stages.keys());
                                    return Err(if e.help.is_some() {
                                        e
                                    } else {
                                        e.help("refer to a stage (`name` or `name.output`), `data.NAME`, or `file:PATH`")
                                    });
                                };
                                graph.update_edge(to, nodes[template], ());
                            }
                            Ref::Data(_) | Ref::File(_) => {}
                        }
                    }
                }
            }
        }
        match petgraph::algo::toposort(&graph, None) {
            Ok(_) => Ok(declaration_order_topo(&graph)),
            Err(cycle) => {
                let path = cycle_path(&graph, cycle.node_id());
                let names: Vec<&str> = path.iter().map(|&n| graph[n].as_str()).collect();
                Err(self.err(names[0], &["inputs"], format!("dependency cycle: {}", names.join(" -> ")))
                    .help("a stage cannot read its own output, directly or through others; remove one of these inputs"))
            }
        }
    }

    fn expand(&mut self, template: &str) -> Result<(), SpecError> {
        let spec = self
            .merged
            .stages
            .get(template)
            .expect("template exists")
            .value
            .clone();
        let axes = self.instance_axes(template)?;
        let mut instances = Vec::new();
        for binding in self.bindings(&axes) {
            let stage = self.instance(template, &spec, &axes, &binding)?;
            instances.push((binding, self.stages.len()));
            self.stages.push(stage);
        }
        self.expanded.insert(template.to_owned(), (axes, instances));
        Ok(())
    }

    /// The axes each instance of `template` binds, in matrix order: its own, plus those of every
    /// stage it reads without `@*` (one instance per upstream instance).
    fn instance_axes(&self, template: &str) -> Result<Vec<String>, SpecError> {
        let own = self.own_axes(template);
        let mut axes: BTreeSet<String> = own.iter().cloned().collect();
        for binding in self.bindings(&own) {
            let scope = self.scope(&binding);
            for (_, refs, _) in self.interpolated_inputs(template, &scope)? {
                for r in &refs {
                    if let Ref::Stage {
                        template: t,
                        instance: None,
                        gather: false,
                        ..
                    } = parse_ref(r)
                    {
                        axes.extend(self.expanded[t].0.iter().cloned());
                    }
                }
            }
        }
        Ok(self
            .axes
            .iter()
            .map(|(a, _)| a.clone())
            .filter(|a| axes.contains(a))
            .collect())
    }

    /// One concrete stage: `template` with `binding`'s values in its params and inputs.
    fn instance(
        &mut self,
        template: &str,
        spec: &StageSpec,
        axes: &[String],
        binding: &Binding,
    ) -> Result<PlannedStage, SpecError> {
        let entry = *self.catalog.get(&spec.kind).expect("kinds checked");
        let scope = self.scope(binding);
        let params = self.params(template, &spec.params, spec.run.as_deref(), &scope)?;
        let params = (entry.normalize)(params).map_err(|msg| {
            let e = self.err(
                template,
                &["params"],
                format!("invalid params for `{}` stage: {msg}", spec.kind),
            );
            match unknown_field(&msg) {
                Some((wrong, expected)) => e.suggest(&wrong, expected.iter().map(String::as_str)),
                None => e,
            }
        })?;
        let slots = (entry.inputs)(&params);
        let inputs = self.instance_inputs(template, slots.as_deref(), &scope, binding)?;
        for slot in slots.iter().flatten().filter(|s| s.required) {
            if !inputs.contains_key(slot.name) {
                return Err(self
                    .err(
                        template,
                        &["inputs"],
                        format!(
                            "`{}` stage `{template}` needs input `{}` ({})",
                            spec.kind, slot.name, slot.doc
                        ),
                    )
                    .help(format!(
                        "add `{}: <stage>.<output>` or `data.<name>` under `inputs:`",
                        slot.name
                    )));
            }
        }
        let mut deps: Vec<usize> = inputs
            .values()
            .flat_map(|i| i.refs().iter())
            .filter_map(|r| match r {
                InputRef::Stage { stage, .. } => Some(*stage),
                InputRef::Data { .. } => None,
            })
            .collect();
        deps.sort_unstable();
        deps.dedup();
        let (file, line) = self.declared_at(template);
        Ok(PlannedStage {
            name: instance_name(template, axes, binding),
            template: template.to_owned(),
            kind: spec.kind.clone(),
            version: entry.version,
            warnings: (entry.lint)(&params),
            params,
            inputs,
            resources: spec.resources.clone(),
            deps,
            binding: axes
                .iter()
                .map(|a| (a.clone(), binding[a].clone()))
                .collect(),
            file,
            line,
        })
    }

    fn instance_inputs(
        &self,
        template: &str,
        slots: Option<&[InputSlot]>,
        scope: &BTreeMap<String, Value>,
        binding: &Binding,
    ) -> Result<BTreeMap<String, PlannedInput>, SpecError> {
        let mut inputs = BTreeMap::new();
        for (slot, refs, many) in self.interpolated_inputs(template, scope)? {
            let declared = self.check_slot(template, &slot, slots, many, refs.len())?;
            let mut resolved = Vec::new();
            for r in &refs {
                resolved.extend(self.resolve(template, &slot, r, binding)?);
            }
            let input = if declared.is_some_and(|s| s.many) || many || resolved.len() != 1 {
                PlannedInput::Many(resolved)
            } else {
                PlannedInput::One(resolved.pop().expect("one ref"))
            };
            inputs.insert(slot, input);
        }
        Ok(inputs)
    }

    /// The file a template was declared in and its line there (looked up once per file).
    fn declared_at(&mut self, template: &str) -> (PathBuf, Option<usize>) {
        let source = self.merged.stages.get(template).expect("exists").source;
        let text = &self.merged.sources[source].text;
        let line = self
            .stage_lines
            .entry(source)
            .or_insert_with(|| super::diagnostic::locate_children(text, &["stages"]))
            .get(template)
            .map(|&(l, _)| l);
        (self.merged.sources[source].path.clone(), line)
    }

    fn params(
        &self,
        template: &str,
        params: &Map<String, Value>,
        run: Option<&str>,
        scope: &BTreeMap<String, Value>,
    ) -> Result<Value, SpecError> {
        let mut out = Map::new();
        for (k, v) in params {
            let v = vars::interpolate(v, scope)
                .map_err(|name| self.unknown_var(template, &["params", k], &name, scope))?;
            out.insert(k.clone(), v);
        }
        if let Some(run) = run {
            if out.contains_key("run") {
                return Err(self.err(
                    template,
                    &["run"],
                    "`run` is given twice, as a field and as a param",
                ));
            }
            let run = vars::interpolate_shell(run, scope)
                .map_err(|name| self.unknown_var(template, &["run"], &name, scope))?;
            out.insert("run".into(), run);
        }
        Ok(Value::Object(out))
    }

    fn check_slot<'s>(
        &self,
        template: &str,
        slot: &str,
        slots: Option<&'s [InputSlot]>,
        many: bool,
        count: usize,
    ) -> Result<Option<&'s InputSlot>, SpecError> {
        let Some(slots) = slots else { return Ok(None) };
        let Some(declared) = slots.iter().find(|s| s.name == slot) else {
            let names: Vec<&str> = slots.iter().map(|s| s.name).collect();
            let e = self.err(
                template,
                &["inputs", slot],
                format!("unknown input `{slot}`"),
            );
            return Err(match closest(slot, names.iter().copied()) {
                Some(best) => e.help(format!(
                    "did you mean `{best}`? this kind takes: {}",
                    names.join(", ")
                )),
                None => e.help(format!("this kind takes: {}", list_or_none(&names))),
            });
        };
        if !declared.many && (many || count != 1) {
            return Err(self.err(
                template,
                &["inputs", slot],
                format!("input `{slot}` takes exactly one reference"),
            ));
        }
        Ok(Some(declared))
    }
}

fn set_var(vars: &mut Vec<(String, Value)>, name: &str, value: Value) {
    match vars.iter_mut().find(|(k, _)| k == name) {
        Some(slot) => slot.1 = value,
        None => vars.push((name.to_owned(), value)),
    }
}

pub(super) fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

fn input_strings(input: &InputSpec) -> Vec<&str> {
    match input {
        InputSpec::One(s) => vec![s.as_str()],
        InputSpec::Many(items) => items.iter().map(String::as_str).collect(),
    }
}

/// `finetune@vit-seed1`: strings as written, numbers and booleans after their axis name.
fn instance_name(template: &str, axes: &[String], binding: &Binding) -> String {
    if axes.is_empty() {
        return template.to_owned();
    }
    let parts: Vec<String> = axes
        .iter()
        .map(|a| match &binding[a] {
            Value::String(s) => s
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect(),
            other => format!("{a}{other}"),
        })
        .collect();
    format!("{template}@{}", parts.join("-"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::{OutputSlot, TaskEntry};

    /// A kind that takes any params and inputs and declares one output, so the tests exercise
    /// expansion alone.
    fn catalog() -> Catalog {
        Catalog::new(vec![TaskEntry {
            kind: "echo",
            version: 1,
            summary: "",
            trains: false,
            normalize: Ok,
            inputs: |_| None,
            outputs: |_| {
                vec![OutputSlot {
                    name: "out",
                    path: "out",
                    doc: "",
                }]
            },
            run: |_, _, _| Ok(Value::Null),
            schema: || Value::Null,
            lint: |_| Vec::new(),
            preflight: |_, _| Ok(()),
            headline: None,
        }])
    }

    fn plan(yaml: &str, opts: LoadOptions) -> Result<Plan, SpecError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, yaml).unwrap();
        super::super::plan::load_plan(&file, &catalog(), &opts)
    }

    fn names(plan: &Plan) -> Vec<&str> {
        plan.stages.iter().map(|s| s.name.as_str()).collect()
    }

    fn deps(plan: &Plan, name: &str) -> Vec<String> {
        let stage = &plan.stages[plan.index_of(name).unwrap()];
        stage
            .deps
            .iter()
            .map(|&d| plan.stages[d].name.clone())
            .collect()
    }

    const TWO_AXES: &str = "
matrix: { model: [vit, resnet18], seed: [0, 1] }
stages:
  prep: { kind: echo }
  train: { kind: echo, inputs: { x: prep }, params: { m: '${model}', s: '${seed}' } }
  eval: { kind: echo, inputs: { x: train.out } }
  report: { kind: echo, inputs: { all: 'eval@*' } }
";

    #[test]
    fn a_stage_gets_one_instance_per_binding_of_the_axes_it_uses() {
        let plan = plan(TWO_AXES, LoadOptions::default()).unwrap();
        assert_eq!(
            names(&plan),
            [
                "prep",
                "train@vit-seed0",
                "train@vit-seed1",
                "train@resnet18-seed0",
                "train@resnet18-seed1",
                "eval@vit-seed0",
                "eval@vit-seed1",
                "eval@resnet18-seed0",
                "eval@resnet18-seed1",
                "report",
            ]
        );
        let train = &plan.stages[1];
        assert_eq!(train.params["m"], "vit");
        assert_eq!(train.params["s"], 0);
        assert_eq!(
            train.binding,
            [("model".into(), "vit".into()), ("seed".into(), 0.into())]
        );
    }

    #[test]
    fn a_plain_reference_inherits_the_axes_and_pairs_instances() {
        let plan = plan(TWO_AXES, LoadOptions::default()).unwrap();
        assert_eq!(deps(&plan, "eval@resnet18-seed1"), ["train@resnet18-seed1"]);
        assert_eq!(deps(&plan, "train@vit-seed0"), ["prep"]);
    }

    #[test]
    fn a_gather_reads_every_instance() {
        let plan = plan(TWO_AXES, LoadOptions::default()).unwrap();
        assert_eq!(deps(&plan, "report").len(), 4);
    }

    #[test]
    fn a_gather_inside_an_axis_keeps_to_the_instances_that_agree() {
        let yaml = "
matrix: { model: [vit, cnn], seed: [0, 1] }
stages:
  train: { kind: echo, params: { m: '${model}', s: '${seed}' } }
  per_model: { kind: echo, inputs: { all: 'train@*' }, params: { m: '${model}' } }
";
        let plan = plan(yaml, LoadOptions::default()).unwrap();
        assert_eq!(
            deps(&plan, "per_model@cnn"),
            ["train@cnn-seed0", "train@cnn-seed1"]
        );
    }

    #[test]
    fn a_var_that_mentions_an_axis_binds_it() {
        let yaml = "
vars: { run_name: 'run-${seed}' }
matrix: { seed: [3, 4] }
stages:
  a: { kind: echo, params: { name: '${run_name}' } }
";
        let plan = plan(yaml, LoadOptions::default()).unwrap();
        assert_eq!(names(&plan), ["a@seed3", "a@seed4"]);
        assert_eq!(plan.stages[1].params["name"], "run-4");
    }

    #[test]
    fn set_pins_an_axis_and_a_profile_overrides_a_var() {
        let yaml = "
vars: { epochs: 10 }
matrix: { seed: [0, 1, 2] }
profiles: { smoke: { epochs: 1 } }
stages:
  a: { kind: echo, params: { e: '${epochs}', s: '${seed}' } }
";
        let opts = LoadOptions {
            profile: Some("smoke".into()),
            set: vec![("seed".into(), 2.into())],
        };
        let plan = plan(yaml, opts).unwrap();
        assert_eq!(names(&plan), ["a@seed2"]);
        assert_eq!(plan.stages[0].params["e"], 1);
    }

    #[test]
    fn set_pins_an_axis_to_a_list_of_values_unless_the_axis_holds_lists() {
        let yaml = "
matrix: { seed: [0, 1, 2], dims: [[96, 4], [192, 12]] }
stages:
  a: { kind: echo, params: { s: '${seed}', d: '${dims}' } }
";
        let opts = |set: Vec<(String, Value)>| LoadOptions { profile: None, set };
        let both = vec![
            ("seed".into(), serde_json::json!([0, 2])),
            ("dims".into(), serde_json::json!([96, 4])),
        ];
        let pinned = plan(yaml, opts(both)).unwrap();
        assert_eq!(pinned.stages.len(), 2);
        assert_eq!(pinned.stages[0].params["s"], 0);
        assert_eq!(pinned.stages[1].params["s"], 2);
        assert_eq!(pinned.stages[1].params["d"], serde_json::json!([96, 4]));
        let none = vec![("seed".into(), serde_json::json!([]))];
        let err = plan(yaml, opts(none)).unwrap_err().to_string();
        assert!(err.contains("leaves the axis no values"), "{err}");
    }

    #[test]
    fn naming_an_instance_that_does_not_exist_suggests_one_that_does() {
        let yaml = "
matrix: { seed: [0, 1] }
stages:
  a: { kind: echo, params: { s: '${seed}' } }
  b: { kind: echo, inputs: { x: 'a@seed7' } }
";
        let err = plan(yaml, LoadOptions::default()).unwrap_err().to_string();
        assert!(err.contains("no stage instance `a@seed7`"), "{err}");
        assert!(err.contains("did you mean `a@seed1`?"), "{err}");
    }

    #[test]
    fn an_empty_axis_is_an_error() {
        let yaml = "matrix: { seed: [] }\nstages:\n  a: { kind: echo }\n";
        let err = plan(yaml, LoadOptions::default()).unwrap_err().to_string();
        assert!(err.contains("matrix axis `seed` has no values"), "{err}");
    }
}
