//! What a researcher reads after runs: the end-of-run headline, `pretext results` (table, CSV,
//! JSON, seeds grouped, filters, diffs), on a real tiny training chain.

use crate::science::tiny_data;
use crate::util::Project;

const TWO_SEEDS: &str = r#"
matrix:
  seed: [0, 1]
data:
  shoulder: { path: data/shoulder }
stages:
  ft:
    kind: finetune
    inputs: { data: data.shoulder }
    params: { model: vit, vit_dims: [16, 1, 2], img_size: 16, patch: 4, epochs: 2, batch: 8, val_fraction: 0.25, seed: "${seed}" }
  eval:
    kind: evaluate
    inputs: { model: ft.model, data: data.shoulder }
    params: { bootstrap: 20 }
"#;

fn project() -> Project {
    let p = Project::new();
    tiny_data(&p, 6, 3, 0);
    p.write("pipelines/two.yaml", TWO_SEEDS);
    p
}

#[test]
fn a_run_ends_with_each_evaluation_s_headline() {
    let p = project();
    let r = p.run(&["run", "pipelines/two.yaml"]);
    r.ok();
    for seed in ["seed0", "seed1"] {
        let line = r
            .stderr
            .lines()
            .find(|l| l.starts_with(&format!("eval@{seed}")))
            .unwrap_or_else(|| panic!("no headline for {seed}:\n{}", r.stderr));
        // eval@seed0  acc 0.417 [0.17, 0.67]  F1 0.300  AUC 0.514 [0.23, 0.79]  majority 0.250
        let parts: Vec<&str> = line.split("  ").collect();
        let labels: Vec<&str> = parts[1..]
            .iter()
            .map(|p| p.split(' ').next().unwrap())
            .collect();
        assert_eq!(labels, ["acc", "F1", "AUC", "majority"], "{line}");
        for p in &parts[1..] {
            let numbers = p
                .split(' ')
                .skip(1)
                .map(|n| n.trim_matches(|c| "[],".contains(c)));
            assert!(
                numbers.clone().count() >= 1 && numbers.clone().all(|n| n.parse::<f64>().is_ok()),
                "{line}"
            );
        }
        assert!(
            parts[1].contains('[') && parts[3].contains('['),
            "CIs shown: {line}"
        );
    }
    // A second run reuses both entries and prints the same headlines.
    let again = p.run(&["run", "pipelines/two.yaml"]);
    assert!(again.stderr.contains("eval@seed1  acc"), "{}", again.stderr);
}

#[test]
fn results_lists_groups_filters_and_diffs_evaluations() {
    let p = project();
    p.run(&["run", "pipelines/two.yaml"]).ok();
    let csv = p.run(&["results", "--format", "csv", "--sort", "stage"]);
    csv.ok();
    let lines: Vec<&str> = csv.stdout.lines().collect();
    assert_eq!(
        lines[0],
        "stage,route,seed,accuracy [95% CI],macro-F1,AUC [95% CI],kappa,majority,date,wall,command"
    );
    assert_eq!(lines.len(), 3, "{}", csv.stdout);
    assert!(
        lines[1].starts_with("eval@seed0,scratch > ft,0,"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains("pretext") && lines[2].contains("run pipelines/two.yaml"),
        "{}",
        lines[2]
    );

    let grouped = p.run(&["results", "--group-seeds", "--format", "json"]);
    grouped.ok();
    let g: serde_json::Value = serde_json::from_str(&grouped.stdout).unwrap();
    assert_eq!(g.as_array().unwrap().len(), 1, "{g}");
    assert_eq!(g[0]["seeds"].as_array().unwrap().len(), 2);
    assert!(g[0]["metrics"]["accuracy"][0].as_f64().is_some());

    let only = p.run(&["results", "--where", "seed=1", "--format", "json"]);
    only.ok();
    let rows: serde_json::Value = serde_json::from_str(&only.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(rows[0]["stage"], "eval@seed1");
    assert_eq!(rows[0]["params"]["epochs"], 2);

    let pipe = p.run(&[
        "results",
        "--pipeline",
        "pipelines/two.yaml",
        "--format",
        "md",
    ]);
    pipe.ok();
    assert!(
        pipe.stdout.starts_with("| stage | route | seed |"),
        "{}",
        pipe.stdout
    );

    let diff = p.run(&["results", "--diff", "eval@seed0", "eval@seed1"]);
    diff.ok();
    assert!(diff.stdout.contains("seed*"), "{}", diff.stdout);
    assert!(!diff.stdout.contains("epochs*"), "{}", diff.stdout);
    let bad = p.run(&["results", "--diff", "eval@seed0", "nope"]);
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("no evaluation named `nope`"),
        "{}",
        bad.stderr
    );
}

#[test]
fn test_time_views_are_a_separate_scoring_of_the_same_models() {
    let p = project();
    let with_flip = format!(
        "{TWO_SEEDS}  eval_flip:\n    kind: evaluate\n    inputs: {{ model: ft.model, data: data.shoulder }}\n    params: {{ bootstrap: 20, tta: flip }}\n"
    );
    p.write("pipelines/tta.yaml", &with_flip);
    p.run(&["run", "pipelines/tta.yaml"]).ok();
    let grouped = p.run(&["results", "--group-seeds", "--format", "json"]);
    grouped.ok();
    let g: serde_json::Value = serde_json::from_str(&grouped.stdout).unwrap();
    let groups = g.as_array().unwrap();
    assert_eq!(groups.len(), 2, "one group per scoring: {g}");
    let tta: Vec<&serde_json::Value> = groups.iter().map(|x| &x["params"]["eval.tta"]).collect();
    assert!(tta.contains(&&serde_json::json!("flip")), "{g}");
    // The mirror image changes what a (barely trained) model says about most images.
    let read = |stage: &str| {
        let shown = p.run(&["show", stage, "--pipeline", "pipelines/tta.yaml", "--json"]);
        shown.ok();
        let v: serde_json::Value = serde_json::from_str(&shown.stdout).unwrap();
        let dir = std::path::PathBuf::from(v["dir"].as_str().unwrap());
        std::fs::read_to_string(dir.join("predictions.csv")).unwrap()
    };
    let (plain, flipped) = (read("eval@seed0"), read("eval_flip@seed0"));
    assert_eq!(plain.lines().count(), flipped.lines().count());
    assert_ne!(plain, flipped);
}

/// TWO_SEEDS with its stages renamed (`tune`, `score`), so the same keys under other names,
/// and `extra` stages after them.
fn renamed_copy(extra: &str) -> String {
    TWO_SEEDS
        .replace("  ft:", "  tune:")
        .replace("ft.model", "tune.model")
        .replace("  eval:", "  score:")
        + extra
}

#[test]
fn results_of_a_pipeline_include_entries_another_pipeline_shares() {
    let p = project();
    p.run(&["run", "pipelines/two.yaml"]).ok();
    // The same stages under other names: the same keys, so every stage is a cache hit, and
    // this pipeline is now the latest to name them.
    p.write("pipelines/copy.yaml", &renamed_copy(""));
    let copy = p.run(&["run", "pipelines/copy.yaml"]);
    copy.ok();
    assert!(copy.stderr.contains("0 ran, 4 cached"), "{}", copy.stderr);
    for (file, name) in [
        ("pipelines/two.yaml", "eval"),
        ("pipelines/copy.yaml", "score"),
    ] {
        let r = p.run(&[
            "results",
            "--pipeline",
            file,
            "--format",
            "json",
            "--sort",
            "stage",
        ]);
        r.ok();
        let rows: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let column = |name: &str| -> Vec<String> {
            rows.as_array()
                .unwrap()
                .iter()
                .map(|r| r[name].as_str().unwrap().to_owned())
                .collect()
        };
        let stages = column("stage");
        assert_eq!(
            stages,
            [format!("{name}@seed0"), format!("{name}@seed1")],
            "{file}"
        );
        // Computed by the run of two.yaml, whichever pipeline lists them.
        let commands = column("invocation");
        assert!(
            commands
                .iter()
                .all(|c| c.ends_with("run pipelines/two.yaml")),
            "{file}: {commands:?}"
        );
    }
}

#[test]
fn a_report_names_shared_entries_as_its_own_pipeline_does() {
    let p = project();
    p.run(&["run", "pipelines/two.yaml"]).ok();
    let report_stage = "  report:\n    kind: report\n    inputs: { results: [\"score@*\"] }\n";
    p.write("pipelines/copy.yaml", &renamed_copy(report_stage));
    p.run(&["run", "pipelines/copy.yaml"]).ok();
    let report = p.run(&[
        "show",
        "report",
        "--pipeline",
        "pipelines/copy.yaml",
        "--json",
    ]);
    report.ok();
    let shown: serde_json::Value = serde_json::from_str(&report.stdout).unwrap();
    let dir = std::path::PathBuf::from(shown["dir"].as_str().unwrap());
    let csv = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    // The evaluations were computed by two.yaml as `eval@seed*`; this report reads them as
    // copy.yaml's `score@seed*`.
    assert!(csv.contains("\nscore,") && !csv.contains("eval"), "{csv}");
}
