//! Bad pipeline files: exit code 2, file:line:column, what was expected, the closest valid name.

use crate::util::Project;

fn error_of(yaml: &str) -> String {
    let p = Project::new();
    p.write("data/d/x", "x");
    p.write("pipelines/bad.yaml", yaml);
    let r = p.run(&["run", "pipelines/bad.yaml"]);
    assert_eq!(
        r.code, 2,
        "expected exit 2 for:\n{yaml}\nstderr:\n{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    r.stderr
}

#[test]
fn unknown_field_names_position_and_suggests() {
    let e = error_of("stages:\n  a:\n    kind: command\n    run: 'true'\n    inptus: {}\n");
    assert!(e.contains("bad.yaml:5:"), "{e}");
    assert!(e.contains("unknown field `inptus`"), "{e}");
    assert!(e.contains("did you mean `inputs`?"), "{e}");
}

#[test]
fn unknown_kind_suggests_closest() {
    let e = error_of("stages:\n  a:\n    kind: comand\n    run: 'true'\n");
    assert!(
        e.contains("bad.yaml:3:5")
            && e.contains("unknown stage kind `comand`")
            && e.contains("did you mean `command`?"),
        "{e}"
    );
}

#[test]
fn wrong_type_is_located() {
    let e = error_of(
        "stages:\n  a:\n    kind: command\n    run: 'true'\n    resources: { gpu: many }\n",
    );
    assert!(e.contains("bad.yaml:5:"), "{e}");
    assert!(
        e.contains("invalid type") || e.contains("invalid value"),
        "{e}"
    );
}

#[test]
fn missing_upstream_stage_suggests() {
    let e = error_of("stages:\n  prep:\n    kind: command\n    run: 'true'\n  train:\n    kind: command\n    run: 'true'\n    inputs: { x: prp.out }\n");
    assert!(
        e.contains("bad.yaml:8:15")
            && e.contains("no stage `prp`")
            && e.contains("did you mean `prep`?"),
        "{e}"
    );
}

#[test]
fn unknown_output_lists_outputs() {
    let e = error_of("stages:\n  prep:\n    kind: command\n    run: 'true'\n  train:\n    kind: command\n    run: 'true'\n    inputs: { x: prep.model }\n");
    assert!(
        e.contains("has no output `model`") && e.contains("out"),
        "{e}"
    );
}

#[test]
fn missing_data_entry_suggests() {
    let e = error_of("data:\n  chest: { path: data/d }\nstages:\n  a:\n    kind: command\n    run: 'true'\n    inputs: { x: data.chets }\n");
    assert!(
        e.contains("no data entry `chets`") && e.contains("did you mean `chest`?"),
        "{e}"
    );
}

#[test]
fn missing_data_blocks_its_stages_and_the_rest_runs() {
    let p = Project::new();
    p.write("pipelines/m.yaml", "data:\n  chest: { path: data/nowhere }\nstages:\n  a:\n    kind: command\n    run: 'true'\n    inputs: { x: data.chest }\n  after_a:\n    kind: command\n    run: 'true'\n    inputs: { x: a.out }\n  b:\n    kind: command\n    run: echo b > $PRETEXT_OUT/b\n");
    let r = p.run(&["run", "pipelines/m.yaml"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("skipped  a: blocked")
            && r.stderr.contains("nowhere")
            && r.stderr.contains("m.yaml:4"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("skipped  after_a: blocked: upstream `a` is blocked"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("done     b"), "{}", r.stderr);
    let st = p.run(&["status", "pipelines/m.yaml"]);
    assert!(
        st.stdout.contains("blocked") && st.stdout.contains("nowhere"),
        "{}",
        st.stdout
    );
}

#[test]
fn duplicate_stage_names_are_rejected() {
    let e = error_of("stages:\n  a:\n    kind: command\n    run: 'true'\n  a:\n    kind: command\n    run: 'false'\n");
    assert!(e.contains("duplicate") && e.contains("bad.yaml:"), "{e}");
}

#[test]
fn a_cycle_prints_its_path() {
    let e = error_of("stages:\n  a:\n    kind: command\n    run: 'true'\n    inputs: { x: c.out }\n  b:\n    kind: command\n    run: 'true'\n    inputs: { x: a.out }\n  c:\n    kind: command\n    run: 'true'\n    inputs: { x: b.out }\n");
    assert!(e.contains("dependency cycle:"), "{e}");
    let path = e.lines().find(|l| l.contains("dependency cycle")).unwrap();
    for s in ["a", "b", "c"] {
        assert!(path.contains(s), "{path}");
    }
}

#[test]
fn unknown_variable_suggests() {
    let e =
        error_of("vars: { epochs: 3 }\nstages:\n  a:\n    kind: command\n    run: echo ${epoch}\n");
    assert!(
        e.contains("unknown variable `${epoch}`") && e.contains("did you mean `${epochs}`?"),
        "{e}"
    );
}

#[test]
fn conflicting_included_definitions_are_rejected() {
    let p = Project::new();
    p.write(
        "pipelines/a.yaml",
        "stages:\n  s:\n    kind: command\n    run: 'true'\n",
    );
    p.write(
        "pipelines/b.yaml",
        "include: [a.yaml]\nstages:\n  s:\n    kind: command\n    run: 'false'\n",
    );
    let r = p.run(&["status", "pipelines/b.yaml"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("defined differently"), "{}", r.stderr);
}

#[test]
fn bad_flags_exit_2_and_help_teaches() {
    let p = Project::new();
    assert_eq!(p.run(&["run"]).code, 2);
    assert_eq!(p.run(&["frobnicate"]).code, 2);
    let help = p.run(&["--help"]);
    assert_eq!(help.code, 0);
    assert!(
        help.stdout
            .contains("pretext run pipelines/chest_mae_proxy_shoulder.yaml")
            && help.stdout.contains("Exit codes")
    );
    let missing = p.run(&["run", "pipelines/nope.yaml"]);
    assert_eq!(missing.code, 2);
    assert!(
        missing.stderr.contains("cannot read pipeline file"),
        "{}",
        missing.stderr
    );
}

#[test]
fn a_bad_device_is_a_usage_error_and_cuda_without_cuda_says_how_to_build() {
    let p = Project::new();
    p.write("data/imgs/x", "x");
    p.write(
        "pipelines/d.yaml",
        "data:\n  imgs: { path: data/imgs }\nstages:\n  m:\n    kind: mae\n    inputs: { images: data.imgs }\n",
    );
    let bad = p.run(&["run", "pipelines/d.yaml", "--device", "gpu0"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(
        bad.stderr.contains("unknown device `gpu0`"),
        "{}",
        bad.stderr
    );
    if !cfg!(feature = "cuda") {
        let r = p.run(&["run", "pipelines/d.yaml", "--device", "cuda:0"]);
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert!(
            r.stderr.contains("built without CUDA") && r.stderr.contains("--features cuda"),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn a_var_that_shadows_a_matrix_axis_is_refused() {
    // The var used to win silently: every `seed` instance got the same key.
    let e = error_of("vars:\n  seed: 0\nmatrix:\n  seed: [0, 1]\nstages:\n  a:\n    kind: command\n    run: 'echo ${seed}'\n");
    assert!(
        e.contains("bad.yaml:4:")
            && e.contains("`seed` is both a var and a matrix axis")
            && e.contains("remove `seed` from `vars:`"),
        "{e}"
    );
}

#[test]
fn values_no_run_could_use_are_refused_before_any_stage_runs() {
    let p = Project::new();
    p.write("data/d/x.png", "x");
    p.write(
        "pipelines/m.yaml",
        "vars:\n  patch: 8\n  batch: 32\n  dims: [16, 1, 2]\ndata:\n  d: { path: data/d }\nstages:\n  first:\n    kind: command\n    run: echo ran >> first.txt\n  mae:\n    kind: mae\n    inputs: { images: data.d }\n    params: { model: vit, vit_dims: \"${dims}\", patch: \"${patch}\", batch: \"${batch}\" }\n",
    );
    for (set, says) in [
        ("patch=0", "`patch` must be at least 1"),
        ("patch=7", "`img_size` 64 is not a multiple of `patch` 7"),
        ("batch=0", "`batch` must be at least 1"),
        (
            "dims=[0,1,1]",
            "`vit_dims[0] (embed dim)` must be at least 1",
        ),
        ("dims=[16,1,3]", "3 heads do not divide the embed dim 16"),
    ] {
        let r = p.run(&["run", "pipelines/m.yaml", "--set", set]);
        assert_eq!(r.code, 2, "--set {set}: {}", r.stderr);
        assert!(
            r.stderr.contains(says) && r.stderr.contains("m.yaml:"),
            "--set {set}: {}",
            r.stderr
        );
        assert!(
            !p.path().join("first.txt").exists(),
            "a stage ran before the check"
        );
    }
    let r = p.run(&["run", "pipelines/m.yaml", "--jobs", "100000"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--jobs"), "{}", r.stderr);
}

#[test]
fn kinds_document_every_param_and_the_shipped_schema_is_current() {
    let p = Project::new();
    let all = p.run(&["kinds"]);
    all.ok();
    for kind in [
        "command", "mae", "finetune", "proxy", "evaluate", "gradcam", "report",
    ] {
        assert!(
            all.stdout.contains(&format!("{kind} (version")),
            "{}",
            all.stdout
        );
    }
    let ft = p.run(&["kinds", "finetune"]);
    ft.ok();
    assert!(
        ft.stdout.contains("layer_decay")
            && ft
                .stdout
                .contains("0.75 when starting from pretrained weights"),
        "{}",
        ft.stdout
    );
    let v: serde_json::Value = serde_json::from_str(&p.run(&["kinds", "--json"]).stdout).unwrap();
    for kind in v.as_array().unwrap() {
        for (name, param) in kind["params"]["properties"].as_object().unwrap() {
            assert!(
                param["description"].as_str().is_some_and(|d| d.len() > 10),
                "{}: param `{name}` has no documentation",
                kind["kind"]
            );
        }
    }
    let bad = p.run(&["kinds", "finetuen"]);
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("no stage kind `finetuen`"),
        "{}",
        bad.stderr
    );
    let schema = p.run(&["schema"]);
    schema.ok();
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/pipeline.schema.json"),
    )
    .unwrap();
    assert_eq!(
        schema.stdout, shipped,
        "regenerate: pretext schema > docs/pipeline.schema.json"
    );
}
