//! Caching, invalidation, sharing, crashes and concurrency, through the real `pretext` binary.

use crate::util::{counted, Project};
use std::time::{Duration, Instant};

fn chain(epochs: u32) -> String {
    format!(
        r#"
data:
  raw: {{ path: data/raw }}
stages:
  prep:
    kind: command
    run: {prep}
    inputs: {{ src: data.raw }}
  train:
    kind: command
    run: {train}
    params: {{ epochs: {epochs} }}
    inputs: {{ prep: prep.out }}
  eval:
    kind: command
    run: {eval}
    inputs: {{ model: train.out }}
  side:
    kind: command
    run: {side}
"#,
        prep = serde_json::to_string(&counted("prep", "")).unwrap(),
        train = serde_json::to_string(&counted("train", "$PRETEXT_PARAM_EPOCHS")).unwrap(),
        eval = serde_json::to_string(&counted("eval", "")).unwrap(),
        side = serde_json::to_string(&counted("side", "")).unwrap(),
    )
}

fn project_with_data() -> Project {
    let p = Project::new();
    p.write("data/raw/a.txt", "alpha");
    p
}

#[test]
fn changed_param_reruns_the_stage_and_its_downstream_only() {
    let p = project_with_data();
    p.write("pipelines/c.yaml", &chain(1));
    p.run(&["run", "pipelines/c.yaml"]).ok();
    assert_eq!(
        [
            p.count("prep"),
            p.count("train"),
            p.count("eval"),
            p.count("side")
        ],
        [1, 1, 1, 1]
    );

    p.write("pipelines/c.yaml", &chain(2));
    let st = p.status("pipelines/c.yaml");
    let states: Vec<&str> = st.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(states, ["cached", "stale", "stale", "cached"]);
    let r = p.run(&["status", "pipelines/c.yaml"]);
    assert!(
        r.stdout.contains("params.epochs: 1 -> 2"),
        "status names the changed field:\n{}",
        r.stdout
    );

    p.run(&["run", "pipelines/c.yaml"]).ok();
    assert_eq!(
        [
            p.count("prep"),
            p.count("train"),
            p.count("eval"),
            p.count("side")
        ],
        [1, 2, 2, 1]
    );

    // Reverting restores the old entries without running anything.
    p.write("pipelines/c.yaml", &chain(1));
    let r = p.run(&["run", "pipelines/c.yaml", "--json"]);
    r.ok();
    assert!(r.stdout.contains(r#""ran":0"#), "{}", r.stdout);
    assert_eq!(
        [p.count("prep"), p.count("train"), p.count("eval")],
        [1, 2, 2]
    );
}

#[test]
fn changed_data_reruns_its_readers() {
    let p = project_with_data();
    p.write("pipelines/c.yaml", &chain(1));
    p.run(&["run", "pipelines/c.yaml"]).ok();
    p.write("data/raw/a.txt", "ALPHA");
    let r = p.run(&["status", "pipelines/c.yaml"]);
    assert!(
        r.stdout.contains("input `src`: data changed"),
        "{}",
        r.stdout
    );
    p.run(&["run", "pipelines/c.yaml"]).ok();
    assert_eq!(
        [p.count("prep"), p.count("train"), p.count("side")],
        [2, 2, 1]
    );
}

#[test]
fn key_ignores_names_order_comments_and_pipeline_file() {
    let p = project_with_data();
    let a = r#"
stages:
  first:
    kind: command
    run: echo same > $PRETEXT_OUT/x
    params: { a: 1, b: [1, 2] }
"#;
    let b = r#"
# another file, another name, other key order
stages:
  renamed:
    params:
      b: [1, 2]   # comment
      a: 1
    run: echo same > $PRETEXT_OUT/x
    kind: command
"#;
    p.write("pipelines/a.yaml", a);
    p.write("pipelines/b.yaml", b);
    let ka = &p.status("pipelines/a.yaml")[0].2;
    let kb = &p.status("pipelines/b.yaml")[0].2;
    assert_eq!(ka, kb);
    p.run(&["run", "pipelines/a.yaml"]).ok();
    assert_eq!(
        p.status("pipelines/b.yaml")[0].1,
        "cached",
        "one entry serves both pipelines"
    );
}

#[test]
fn a_stage_shared_by_two_pipelines_runs_once() {
    let p = project_with_data();
    let shared = format!(
        "stages:\n  prep:\n    kind: command\n    run: {}\n",
        serde_json::to_string(&counted("prep", "")).unwrap()
    );
    p.write("pipelines/shared.yaml", &shared);
    for (file, name) in [("pipelines/x.yaml", "x"), ("pipelines/y.yaml", "y")] {
        p.write(file, &format!(
            "include: [shared.yaml]\nstages:\n  {name}:\n    kind: command\n    run: {}\n    inputs: {{ p: prep.out }}\n",
            serde_json::to_string(&counted(name, "")).unwrap()
        ));
    }
    p.run(&["run", "pipelines/x.yaml"]).ok();
    p.run(&["run", "pipelines/y.yaml"]).ok();
    assert_eq!([p.count("prep"), p.count("x"), p.count("y")], [1, 1, 1]);
}

#[test]
fn matrix_expands_with_readable_names_and_gathers() {
    let p = project_with_data();
    p.write(
        "pipelines/m.yaml",
        r#"
vars: { base: 10 }
matrix:
  model: [vit, resnet]
  seed: [1, 2]
stages:
  pre:
    kind: command
    run: echo "$PRETEXT_STAGE ${model}" > $PRETEXT_OUT/p
  ft:
    kind: command
    run: echo "${seed} ${base}" > $PRETEXT_OUT/f
    inputs: { init: pre.out }
  report:
    kind: command
    run: echo "$PRETEXT_IN_ALL" > $PRETEXT_OUT/r
    inputs: { all: ft@*.out }
"#,
    );
    let names: Vec<String> = p
        .status("pipelines/m.yaml")
        .into_iter()
        .map(|s| s.0)
        .collect();
    assert_eq!(
        names,
        [
            "pre@vit",
            "pre@resnet",
            "ft@vit-seed1",
            "ft@vit-seed2",
            "ft@resnet-seed1",
            "ft@resnet-seed2",
            "report"
        ]
    );
    p.run(&["run", "pipelines/m.yaml"]).ok();
    let dag = p.run(&["dag", "pipelines/m.yaml"]);
    assert!(
        dag.stdout
            .contains("ft@resnet-seed2 [command] <- pre@resnet"),
        "{}",
        dag.stdout
    );
    // Pinning an axis from the command line.
    let pinned: Vec<String> = {
        let r = p.run(&["status", "pipelines/m.yaml", "--set", "seed=2", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["stage"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(
        pinned.contains(&"ft@vit-seed2".to_owned()) && !pinned.contains(&"ft@vit-seed1".to_owned())
    );
}

#[test]
fn failure_exits_1_is_not_cached_and_keep_going_runs_the_rest() {
    let p = project_with_data();
    p.write(
        "pipelines/f.yaml",
        r#"
stages:
  bad:
    kind: command
    run: echo about to fail; exit 3
  after:
    kind: command
    run: echo x > $PRETEXT_OUT/x
    inputs: { b: bad.out }
  other:
    kind: command
    run: echo ok > $PRETEXT_OUT/ok
"#,
    );
    let r = p.run(&["run", "pipelines/f.yaml", "--keep-going", "--jobs", "1"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("exited with code 3") && r.stderr.contains("about to fail"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("skipped  after: upstream `bad` failed"),
        "{}",
        r.stderr
    );
    assert_eq!(p.entries("command"), 1, "only `other` is cached");
}

#[test]
fn a_failed_attempt_keeps_its_checkpoint_for_the_next() {
    let p = project_with_data();
    p.write("pipelines/r.yaml", r#"
stages:
  resumable:
    kind: command
    run: |
      if [ -f "$PRETEXT_CHECKPOINT/epoch1" ]; then echo resumed > "$PRETEXT_OUT/state"; else touch "$PRETEXT_CHECKPOINT/epoch1"; exit 1; fi
"#);
    assert_eq!(p.run(&["run", "pipelines/r.yaml"]).code, 1);
    p.run(&["run", "pipelines/r.yaml"]).ok();
    let out = std::fs::read_dir(p.path().join("cache/command"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        std::fs::read_to_string(out.join("out/state"))
            .unwrap()
            .trim(),
        "resumed"
    );
    assert!(
        !out.join("checkpoint").exists(),
        "checkpoints are not published"
    );
}

#[test]
fn kill_9_leaves_no_entry_and_the_rerun_completes() {
    let p = project_with_data();
    p.write(
        "pipelines/k.yaml",
        r#"
stages:
  slow:
    kind: command
    run: |
      echo partial > "$PRETEXT_OUT/partial"
      if [ -f "$PRETEXT_CHECKPOINT/half" ]; then echo done > "$PRETEXT_OUT/final"; exit 0; fi
      touch "$PRETEXT_CHECKPOINT/half"; echo started >> "$COUNTS/slow"; sleep 30
"#,
    );
    let mut child = p
        .command(&["run", "pipelines/k.yaml"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.count("slow") == 0 {
        assert!(Instant::now() < deadline, "stage never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(p.entries("command"), 0, "a killed stage leaves no entry");
    let r = p.run(&["run", "pipelines/k.yaml"]);
    r.ok();
    assert_eq!(p.entries("command"), 1);
    assert_eq!(
        p.count("slow"),
        1,
        "the rerun resumed from the checkpoint instead of starting over"
    );
}

#[test]
fn two_concurrent_runs_compute_each_stage_once() {
    let p = project_with_data();
    let mut yaml = String::from("stages:\n");
    for i in 0..4 {
        let dep = if i > 0 {
            format!("\n    inputs: {{ up: s{}.out }}", i - 1)
        } else {
            String::new()
        };
        yaml.push_str(&format!(
            "  s{i}:\n    kind: command\n    run: {}{dep}\n",
            serde_json::to_string(&format!("sleep 0.2; {}", counted(&format!("s{i}"), "")))
                .unwrap()
        ));
    }
    p.write("pipelines/c.yaml", &yaml);
    let first = p.command(&["run", "pipelines/c.yaml"]).spawn().unwrap();
    let second = p.command(&["run", "pipelines/c.yaml"]).spawn().unwrap();
    for mut c in [first, second] {
        assert!(c.wait().unwrap().success());
    }
    for i in 0..4 {
        assert_eq!(
            p.count(&format!("s{i}")),
            1,
            "stage s{i} ran more than once"
        );
    }
}

#[test]
fn gc_removes_unreached_entries_and_verify_finds_corruption() {
    let p = project_with_data();
    p.write("pipelines/c.yaml", &chain(1));
    p.run(&["run", "pipelines/c.yaml"]).ok();
    p.write("pipelines/c.yaml", &chain(2));
    p.run(&["run", "pipelines/c.yaml"]).ok();
    assert_eq!(p.entries("command"), 6);
    // Both runs are in the journal of the last 30 days: nothing goes by default.
    let dry = p.run(&["gc", "--dry-run"]);
    dry.ok();
    assert!(
        dry.stdout.contains("6 of 6 entries kept, 0 would remove"),
        "{}",
        dry.stdout
    );
    let dry = p.run(&["gc", "--dry-run", "--keep-days", "0"]);
    dry.ok();
    assert_eq!(
        dry.stdout.matches("would remove command/").count(),
        2,
        "{}",
        dry.stdout
    );
    assert!(
        dry.stdout.contains("4 of 6 entries kept, 2 would remove"),
        "{}",
        dry.stdout
    );
    assert_eq!(p.entries("command"), 6);
    // Slurm job folders: an old run goes, a recent one stays.
    for run in ["100-1", "200-2"] {
        p.write(&format!("cache/jobs/{run}/0000-a/job.json"), "{}");
    }
    let old = p.path().join("cache/jobs/100-1");
    let aged = std::process::Command::new("touch")
        .args(["-d", "10 days ago"])
        .arg(&old)
        .arg(old.join("0000-a"))
        .arg(old.join("0000-a/job.json"))
        .status()
        .unwrap();
    assert!(aged.success());
    p.run(&["gc", "--keep-days", "0"]).ok();
    assert_eq!(p.entries("command"), 4);
    assert!(!old.exists(), "a 10-day-old job folder is removed");
    assert!(p.path().join("cache/jobs/200-2/0000-a/job.json").is_file());
    assert_eq!(
        p.status("pipelines/c.yaml")
            .iter()
            .filter(|s| s.1 == "cached")
            .count(),
        4
    );

    p.run(&["verify"]).ok();
    let entry = std::fs::read_dir(p.path().join("cache/command"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let file = std::fs::read_dir(entry.join("out"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&file, "tampered").unwrap();
    let r = p.run(&["verify"]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("content changed"), "{}", r.stdout);
    p.run(&["verify", "--remove"]).ok();
    p.run(&["verify"]).ok();
}

#[test]
fn show_reports_params_lineage_and_files() {
    let p = project_with_data();
    p.write("pipelines/c.yaml", &chain(3));
    p.run(&["run", "pipelines/c.yaml"]).ok();
    let r = p.run(&["show", "train", "--pipeline", "pipelines/c.yaml", "--json"]);
    r.ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["params"]["epochs"], 3);
    assert_eq!(v["upstream"][0]["stage"], "prep");
    assert!(v["manifest"]["outputs"]["out/train.txt"].is_string());
    // By key prefix, and by name through the journal, without the pipeline.
    let key = v["key"].as_str().unwrap();
    assert!(p
        .run(&["show", &key[..10]])
        .ok()
        .stdout
        .contains("stage    train"));
    assert!(p.run(&["show", "train"]).ok().stdout.contains(&key[..12]));
}

#[test]
fn stage_selection_and_force() {
    let p = project_with_data();
    p.write("pipelines/c.yaml", &chain(1));
    p.run(&["run", "pipelines/c.yaml", "--stage", "train"]).ok();
    assert_eq!(
        [
            p.count("prep"),
            p.count("train"),
            p.count("eval"),
            p.count("side")
        ],
        [1, 1, 0, 0]
    );
    p.run(&[
        "run",
        "pipelines/c.yaml",
        "--stage",
        "train",
        "--force",
        "train",
    ])
    .ok();
    assert_eq!([p.count("prep"), p.count("train")], [1, 2]);
    let r = p.run(&["run", "pipelines/c.yaml", "--stage", "trian"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("did you mean `train`?"), "{}", r.stderr);
}

#[test]
fn a_param_at_its_default_is_the_same_key_as_leaving_it_out() {
    let p = project_with_data();
    let with = |params: &str| {
        format!("data:\n  d: {{ path: data/raw }}\nstages:\n  ft:\n    kind: finetune\n    inputs: {{ data: data.d }}\n{params}")
    };
    p.write("pipelines/bare.yaml", &with(""));
    p.write(
        "pipelines/explicit.yaml",
        &with(
            "    params: { epochs: 60, drop_path: 0.1, randaug_magnitude: 0, label_smoothing: 0.0, select: accuracy }\n",
        ),
    );
    p.write(
        "pipelines/changed.yaml",
        &with("    params: { epochs: 61 }\n"),
    );
    let key = |f: &str| p.status(f)[0].2.clone();
    assert_eq!(key("pipelines/bare.yaml"), key("pipelines/explicit.yaml"));
    assert_ne!(key("pipelines/bare.yaml"), key("pipelines/changed.yaml"));
}
