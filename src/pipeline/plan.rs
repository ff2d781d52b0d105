//! From merged definitions to a [`Plan`]: interpolation, matrix expansion, reference resolution and
//! validation against the task [`Catalog`]. Stages come out in dependency order.

use super::diagnostic::{closest, SpecError};
use super::load::{self, unknown_field, Merged};
use super::spec::{ExecutorSpec, InputSpec, Resources};
use super::vars;
use crate::stage::{Catalog, InputSlot};
use petgraph::graph::{DiGraph, NodeIndex};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// A pipeline with every stage concrete: what the cache keys and the scheduler work on.
#[derive(Debug)]
pub struct Plan {
    pub file: PathBuf,
    /// Relative paths in the pipeline resolve against this folder (see [`project_root`]).
    pub root: PathBuf,
    /// In dependency order: every stage comes after the stages it reads.
    pub stages: Vec<PlannedStage>,
    /// The pipeline's `executor:` block (its includes' under it).
    pub executor: ExecutorSpec,
    /// The profiles the file declares (its includes' too), by name.
    pub profiles: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct PlannedStage {
    /// `finetune@vit-seed1` for a matrix instance, the template name otherwise.
    pub name: String,
    pub template: String,
    pub kind: String,
    pub version: u32,
    /// With defaults applied (the task's canonical form).
    pub params: Value,
    pub inputs: BTreeMap<String, PlannedInput>,
    pub resources: Resources,
    /// Indices into `Plan::stages`, sorted, unique.
    pub deps: Vec<usize>,
    /// Matrix values this instance was made with, in axis order.
    pub binding: Vec<(String, Value)>,
    pub file: PathBuf,
    pub line: Option<usize>,
    /// What the kind's lint says of the params (values that run, but probably not as meant).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum PlannedInput {
    One(InputRef),
    Many(Vec<InputRef>),
}

impl PlannedInput {
    pub fn refs(&self) -> &[InputRef] {
        match self {
            PlannedInput::One(r) => std::slice::from_ref(r),
            PlannedInput::Many(rs) => rs,
        }
    }
}

#[derive(Debug, Clone)]
pub enum InputRef {
    /// Another stage's whole output folder (`output: None`) or one named output.
    Stage {
        stage: usize,
        output: Option<OutputRef>,
    },
    /// A data folder or file, fingerprinted by content.
    Data {
        path: PathBuf,
        options: Map<String, Value>,
    },
}

#[derive(Debug, Clone)]
pub struct OutputRef {
    pub name: String,
    /// Relative to the upstream stage's output folder.
    pub path: String,
}

#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    pub profile: Option<String>,
    /// `--set name=value`: overrides a var, or pins a matrix axis to one value.
    pub set: Vec<(String, Value)>,
}

impl Plan {
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    /// The stages named (instance names or template names) and everything upstream of them.
    pub fn select(&self, names: &[String]) -> Result<Vec<bool>, String> {
        let mut keep = vec![names.is_empty(); self.stages.len()];
        for name in names {
            let hits: Vec<usize> = (0..self.stages.len())
                .filter(|&i| self.stages[i].name == *name || self.stages[i].template == *name)
                .collect();
            if hits.is_empty() {
                let mut msg = format!("no stage named `{name}` in {}", self.file.display());
                if let Some(best) = closest(name, self.stages.iter().map(|s| s.name.as_str())) {
                    msg.push_str(&format!("; did you mean `{best}`?"));
                }
                return Err(msg);
            }
            hits.into_iter().for_each(|i| keep[i] = true);
        }
        for i in (0..self.stages.len()).rev() {
            if keep[i] {
                for &d in &self.stages[i].deps {
                    keep[d] = true;
                }
            }
        }
        Ok(keep)
    }
}

/// The folder relative paths resolve against: the parent of the nearest enclosing `pipelines/`
/// folder, else the pipeline file's own folder. So `pipelines/x.yaml` reads `data/...` from the
/// project root, wherever `pretext` is started.
pub fn project_root(file: &Path) -> PathBuf {
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    dir.ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "pipelines"))
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or(dir)
}

pub fn load_plan(file: &Path, catalog: &Catalog, opts: &LoadOptions) -> Result<Plan, SpecError> {
    let merged = load::load(file)?;
    Expander::new(file, &merged, catalog, opts)?.run()
}

enum Ref<'a> {
    Data(&'a str),
    File(&'a str),
    Stage {
        template: &'a str,
        instance: Option<&'a str>,
        gather: bool,
        output: Option<&'a str>,
    },
}

fn parse_ref(s: &str) -> Ref<'_> {
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

type Binding = BTreeMap<String, Value>;

struct Expander<'a> {
    file: &'a Path,
    root: PathBuf,
    merged: &'a Merged,
    catalog: &'a Catalog,
    axes: Vec<(String, Vec<Value>)>,
    vars: Vec<(String, Value)>,
    stages: Vec<PlannedStage>,
    /// Per template: its axes, and its instances with their bindings.
    expanded: HashMap<String, (Vec<String>, Vec<(Binding, usize)>)>,
    /// Per source file: the line of each stage, found in one pass when first needed.
    stage_lines: HashMap<usize, HashMap<String, (usize, usize)>>,
}

impl<'a> Expander<'a> {
    fn new(
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
                axis.1 = vec![value.clone()];
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

    fn err(&self, template: &str, path: &[&str], message: impl Into<String>) -> SpecError {
        let source = self.merged.stages.get(template).map_or(0, |s| s.source);
        let mut full = vec!["stages", template];
        full.extend_from_slice(path);
        self.merged.error(source, &full, message)
    }

    fn run(mut self) -> Result<Plan, SpecError> {
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

    fn scope(&self, binding: &Binding) -> BTreeMap<String, Value> {
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

    fn unknown_var(
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
        let entry = *self.catalog.get(&spec.kind).expect("kinds checked");
        let own = self.own_axes(template);
        // Inherit the axes of every stage read without `@*`.
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
        let axes: Vec<String> = self
            .axes
            .iter()
            .map(|(a, _)| a.clone())
            .filter(|a| axes.contains(a))
            .collect();
        let mut instances = Vec::new();
        for binding in self.bindings(&axes) {
            let scope = self.scope(&binding);
            let name = instance_name(template, &axes, &binding);
            let params = self.params(template, &spec.params, spec.run.as_deref(), &scope)?;
            let params = (entry.normalize)(params).map_err(|msg| {
                let e = self.err(
                    template,
                    &["params"],
                    format!("invalid params for `{}` stage: {msg}", spec.kind),
                );
                match unknown_field(&msg) {
                    Some((wrong, expected)) => {
                        e.suggest(&wrong, expected.iter().map(String::as_str))
                    }
                    None => e,
                }
            })?;
            let slots = (entry.inputs)(&params);
            let mut inputs = BTreeMap::new();
            for (slot, refs, many) in self.interpolated_inputs(template, &scope)? {
                let declared =
                    self.check_slot(template, &slot, slots.as_deref(), many, refs.len())?;
                let mut resolved = Vec::new();
                for r in &refs {
                    resolved.extend(self.resolve(template, &slot, r, &binding)?);
                }
                let input = if declared.is_some_and(|s| s.many) || many || resolved.len() != 1 {
                    PlannedInput::Many(resolved)
                } else {
                    PlannedInput::One(resolved.pop().expect("one ref"))
                };
                inputs.insert(slot, input);
            }
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
            let source = self.merged.stages.get(template).expect("exists").source;
            let text = &self.merged.sources[source].text;
            let line = self
                .stage_lines
                .entry(source)
                .or_insert_with(|| super::diagnostic::locate_children(text, &["stages"]))
                .get(template)
                .map(|&(l, _)| l);
            let index = self.stages.len();
            let warnings = (entry.lint)(&params);
            self.stages.push(PlannedStage {
                name,
                template: template.to_owned(),
                kind: spec.kind.clone(),
                version: entry.version,
                params,
                inputs,
                resources: spec.resources.clone(),
                deps,
                binding: axes
                    .iter()
                    .map(|a| (a.clone(), binding[a].clone()))
                    .collect(),
                file: self.merged.sources[source].path.clone(),
                line,
                warnings,
            });
            instances.push((binding, index));
        }
        self.expanded.insert(template.to_owned(), (axes, instances));
        Ok(())
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

    fn resolve(
        &self,
        template: &str,
        slot: &str,
        r: &str,
        binding: &Binding,
    ) -> Result<Vec<InputRef>, SpecError> {
        match parse_ref(r) {
            Ref::Data(name) => {
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
                    Err(var) => {
                        return Err(self.unknown_var(template, &["inputs", slot], &var, &scope))
                    }
                };
                let options =
                    match vars::interpolate(&Value::Object(data.value.options.clone()), &scope) {
                        Ok(Value::Object(m)) => m,
                        _ => data.value.options.clone(),
                    };
                Ok(vec![InputRef::Data {
                    path: self.root.join(path),
                    options,
                }])
            }
            Ref::File(path) => Ok(vec![InputRef::Data {
                path: self.root.join(path),
                options: Map::new(),
            }]),
            Ref::Stage {
                template: target,
                instance,
                gather,
                output,
            } => {
                let (target_axes, instances) = &self.expanded[target];
                let chosen: Vec<usize> = if let Some(instance) = instance {
                    match instances
                        .iter()
                        .find(|(_, i)| self.stages[*i].name == instance)
                    {
                        Some((_, i)) => vec![*i],
                        None => {
                            let names: Vec<&str> = instances
                                .iter()
                                .map(|(_, i)| self.stages[*i].name.as_str())
                                .collect();
                            return Err(self
                                .err(
                                    template,
                                    &["inputs", slot],
                                    format!("no stage instance `{instance}`"),
                                )
                                .suggest(instance, names));
                        }
                    }
                } else if gather {
                    instances
                        .iter()
                        .filter(|(b, _)| {
                            b.iter()
                                .all(|(a, v)| binding.get(a).is_none_or(|mine| mine == v))
                        })
                        .map(|(_, i)| *i)
                        .collect()
                } else {
                    let wanted: Binding = target_axes
                        .iter()
                        .map(|a| (a.clone(), binding[a].clone()))
                        .collect();
                    instances
                        .iter()
                        .filter(|(b, _)| *b == wanted)
                        .map(|(_, i)| *i)
                        .collect()
                };
                chosen
                    .into_iter()
                    .map(|index| {
                        let upstream = &self.stages[index];
                        let output = match output {
                            None => None,
                            Some(name) => {
                                let outputs =
                                    (self.catalog.get(&upstream.kind).expect("known").outputs)(
                                        &upstream.params,
                                    );
                                match outputs.iter().find(|o| o.name == name) {
                                    Some(o) => Some(OutputRef {
                                        name: name.to_owned(),
                                        path: o.path.to_owned(),
                                    }),
                                    None => {
                                        let names: Vec<&str> =
                                            outputs.iter().map(|o| o.name).collect();
                                        let e = self.err(
                                            template,
                                            &["inputs", slot],
                                            format!(
                                                "stage `{target}` ({}) has no output `{name}`",
                                                upstream.kind
                                            ),
                                        );
                                        return Err(match closest(name, names.iter().copied()) {
                                            Some(best) => e.help(format!(
                                                "did you mean `{best}`? outputs: {}",
                                                names.join(", ")
                                            )),
                                            None => e.help(format!(
                                                "outputs of `{}`: {}",
                                                upstream.kind,
                                                list_or_none(&names)
                                            )),
                                        });
                                    }
                                }
                            }
                        };
                        Ok(InputRef::Stage {
                            stage: index,
                            output,
                        })
                    })
                    .collect()
            }
        }
    }
}

fn set_var(vars: &mut Vec<(String, Value)>, name: &str, value: Value) {
    match vars.iter_mut().find(|(k, _)| k == name) {
        Some(slot) => slot.1 = value,
        None => vars.push((name.to_owned(), value)),
    }
}

fn list_or_none(names: &[&str]) -> String {
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

/// A topological order that keeps declaration order wherever the edges allow (Kahn's algorithm,
/// always taking the earliest-declared ready stage), so listings follow the file.
fn declaration_order_topo(graph: &DiGraph<String, ()>) -> Vec<String> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut indegree: Vec<usize> = graph
        .node_indices()
        .map(|n| {
            graph
                .neighbors_directed(n, petgraph::Direction::Incoming)
                .count()
        })
        .collect();
    let mut ready: BinaryHeap<Reverse<usize>> = graph
        .node_indices()
        .filter(|n| indegree[n.index()] == 0)
        .map(|n| Reverse(n.index()))
        .collect();
    let mut order = Vec::with_capacity(indegree.len());
    while let Some(Reverse(i)) = ready.pop() {
        let node = NodeIndex::new(i);
        order.push(graph[node].clone());
        for next in graph.neighbors(node) {
            indegree[next.index()] -= 1;
            if indegree[next.index()] == 0 {
                ready.push(Reverse(next.index()));
            }
        }
    }
    order
}

/// A cycle through `start`, as a path that ends where it began.
fn cycle_path(graph: &DiGraph<String, ()>, start: NodeIndex) -> Vec<NodeIndex> {
    let scc = petgraph::algo::tarjan_scc(graph)
        .into_iter()
        .find(|c| c.contains(&start))
        .unwrap_or_else(|| vec![start]);
    // Walk inside the strongly connected component until a node repeats.
    let mut path = vec![start];
    let mut current = start;
    loop {
        let next = graph
            .neighbors(current)
            .find(|n| scc.contains(n))
            .unwrap_or(start);
        if let Some(pos) = path.iter().position(|&n| n == next) {
            let mut cycle = path[pos..].to_vec();
            cycle.push(next);
            return cycle;
        }
        path.push(next);
        current = next;
    }
}
