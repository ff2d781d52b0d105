//! The Slurm executor against a real cluster: `tools/slurm/up.sh` starts a single-node one
//! (`.ci/run` does, with two fake GPUs). Without a cluster these tests say so and pass, unless
//! `PRETEXT_REQUIRE_SLURM=1` (set by `.ci/run`) makes that a failure.

use crate::science::{tiny_data, TINY_FT};
use crate::util::Project;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn cluster() -> bool {
    let idle = Command::new("sinfo")
        .args(["-h", "-o", "%T"])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| ["idle", "mixed", "allocated"].contains(&l.trim()))
        });
    if !idle {
        assert!(
            std::env::var("PRETEXT_REQUIRE_SLURM").as_deref() != Ok("1"),
            "PRETEXT_REQUIRE_SLURM=1 but no Slurm cluster answers `sinfo`: run tools/slurm/up.sh"
        );
        eprintln!("SKIP: no Slurm cluster here (tools/slurm/up.sh starts one)");
    }
    idle
}

fn node_gpus() -> usize {
    let out = Command::new("scontrol")
        .args(["-o", "show", "node"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("Gres=gpu:"))
        .and_then(|n| n.split(['(', ',']).next()?.parse().ok())
        .unwrap_or(0)
}

fn events(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn event<'a>(events: &'a [Value], kind: &str, stage: &str) -> Option<&'a Value> {
    events
        .iter()
        .find(|e| e["type"] == kind && e["stage"] == stage)
}

fn job_state(id: &str) -> String {
    let out = Command::new("scontrol")
        .args(["-o", "show", "job", id])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("JobState="))
        .unwrap_or("GONE")
        .to_owned()
}

fn entry_file(p: &Project, rel: &str) -> String {
    let dirs: Vec<_> = std::fs::read_dir(p.path().join("cache/command"))
        .unwrap()
        .map(|e| e.unwrap().path().join("out").join(rel))
        .filter(|f| f.is_file())
        .collect();
    assert_eq!(dirs.len(), 1, "one entry holds {rel}");
    std::fs::read_to_string(&dirs[0]).unwrap().trim().to_owned()
}

#[test]
fn stages_become_dependent_jobs_failures_are_explained_and_reruns_submit_nothing() {
    if !cluster() {
        return;
    }
    let p = Project::new();
    let gpus = node_gpus();
    let gpu_stage = if gpus >= 2 {
        r#"
  on_gpus:
    kind: command
    run: echo "$CUDA_VISIBLE_DEVICES $PRETEXT_DEVICE" > "$PRETEXT_OUT/gpus"
    resources: { gpu: 2 }"#
    } else {
        ""
    };
    p.write(
        "pipelines/s.yaml",
        &format!(
            r#"
stages:
  first:
    kind: command
    run: echo from-first > "$PRETEXT_OUT/first"
  second:
    kind: command
    run: cat "$PRETEXT_IN_UP/out/first" > "$PRETEXT_OUT/second"; hostname >> "$PRETEXT_OUT/second"
    inputs: {{ up: first }}
  broken:
    kind: command
    run: echo "about to fail"; exit 3
  after_broken:
    kind: command
    run: "true"
    inputs: {{ up: broken }}
  too_big:
    kind: command
    run: "true"
    resources: {{ cpu: 512 }}{gpu_stage}
"#
        ),
    );
    let r = p.run(&[
        "run",
        "pipelines/s.yaml",
        "--executor",
        "slurm",
        "--keep-going",
        "--json",
    ]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let ev = events(&r.stdout);
    for stage in ["first", "second", "broken", "after_broken", "too_big"] {
        assert!(
            event(&ev, "stage_submitted", stage).is_some(),
            "{stage} was not submitted: {}",
            r.stdout
        );
    }
    // `second` ran after `first`, in a job, and read its output.
    assert!(entry_file(&p, "second").starts_with("from-first"));
    assert!(event(&ev, "stage_done", "second").is_some());
    let failed = event(&ev, "stage_failed", "broken").expect("broken fails");
    assert!(
        failed["error"].as_str().unwrap().contains("code 3"),
        "{failed}"
    );
    let skipped = event(&ev, "stage_skipped", "after_broken").expect("its downstream is skipped");
    assert!(skipped["reason"]
        .as_str()
        .unwrap()
        .contains("`broken` failed"));
    let never = event(&ev, "stage_failed", "too_big").expect("an impossible request fails");
    let msg = never["error"].as_str().unwrap();
    assert!(
        msg.contains("never start") && msg.contains("PartitionConfig") && msg.contains("resources"),
        "{msg}"
    );
    if gpus >= 2 {
        assert_eq!(entry_file(&p, "gpus"), "0,1 cuda:0");
    }
    // The job's script, frozen stage and output stay beside the cache for a post-mortem.
    let job_dirs: Vec<_> = std::fs::read_dir(p.path().join("cache/jobs"))
        .unwrap()
        .flat_map(|run| std::fs::read_dir(run.unwrap().path()).unwrap())
        .map(|d| d.unwrap().path())
        .collect();
    let broken_dir = job_dirs
        .iter()
        .find(|d| d.to_string_lossy().ends_with("-broken"))
        .unwrap();
    assert!(broken_dir.join("job.sh").is_file() && broken_dir.join("job.json").is_file());
    assert_eq!(
        std::fs::read_to_string(broken_dir.join("exitcode"))
            .unwrap()
            .trim(),
        "1",
        "the job wrote its own exit code"
    );

    // Everything that succeeded is cached: a rerun of it submits no job.
    let again = p.run(&[
        "run",
        "pipelines/s.yaml",
        "--executor",
        "slurm",
        "--stage",
        "second",
        "--json",
    ]);
    again.ok();
    let ev = events(&again.stdout);
    assert!(
        !ev.iter().any(|e| e["type"] == "stage_submitted"),
        "{}",
        again.stdout
    );
    assert_eq!(ev[0]["cached"], 2);
}

#[test]
fn a_real_stage_on_slurm_computes_what_it_computes_locally() {
    if !cluster() {
        return;
    }
    let p = Project::new();
    tiny_data(&p, 4, 2, 8);
    p.write("pipelines/ft.yaml", TINY_FT);
    let slurm = p.run(&["run", "pipelines/ft.yaml", "--executor", "slurm"]);
    slurm.ok();
    let local = p
        .command(&["run", "pipelines/ft.yaml", "--cache", "cache-local"])
        .output()
        .unwrap();
    assert!(local.status.success());
    let metrics = |cache: &str| {
        let out = p
            .command(&[
                "show",
                "eval",
                "--pipeline",
                "pipelines/ft.yaml",
                "--cache",
                cache,
                "--json",
            ])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["cached"], true, "{cache}: {v}");
        (
            v["key"].clone(),
            v["manifest"]["metrics"]["accuracy"].clone(),
        )
    };
    let (slurm_key, slurm_acc) = metrics("cache");
    let (local_key, local_acc) = metrics("cache-local");
    assert_eq!(slurm_key, local_key, "the executor is not part of a key");
    assert!(slurm_acc.is_f64());
    assert_eq!(
        slurm_acc, local_acc,
        "the same stage computes the same result"
    );
}

#[test]
fn ctrl_c_cancels_the_runs_jobs_and_leaves_no_entry() {
    if !cluster() {
        return;
    }
    let p = Project::new();
    p.write(
        "pipelines/slow.yaml",
        r#"
stages:
  slow:
    kind: command
    run: sleep 300; touch "$PRETEXT_OUT/done"
  later:
    kind: command
    run: "true"
    inputs: { up: slow }
"#,
    );
    let mut child = p
        .command(&[
            "run",
            "pipelines/slow.yaml",
            "--executor",
            "slurm",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "the job never started");
        let line = lines
            .next()
            .expect("events until the stage starts")
            .unwrap();
        let e: Value = serde_json::from_str(&line).unwrap();
        if e["type"] == "stage_submitted" {
            ids.push(e["job"].as_str().unwrap().to_owned());
        }
        if e["type"] == "stage_start" && e["stage"] == "slow" {
            break;
        }
    }
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let waited = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "Ctrl-C did not end the run"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, Some(130));
    for id in &ids {
        let st = job_state(id);
        assert!(
            st == "CANCELLED" || st == "GONE",
            "job {id} is {st} after Ctrl-C"
        );
    }
    assert_eq!(p.entries("command"), 0);
}

#[test]
fn a_job_killed_by_its_time_limit_leaves_no_entry_and_the_next_one_resumes() {
    if !cluster() {
        return;
    }
    // Slurm's shortest limit is one minute and the kill comes up to a minute after it; the
    // stage needs 150 s, so the first job is always killed.
    let p = Project::new();
    let pipeline = |time: u32| {
        format!(
            r#"
stages:
  long:
    kind: command
    run: |
      n=$(cat "$PRETEXT_CHECKPOINT/n" 2>/dev/null || echo 0)
      echo "$n" >> "$PRETEXT_CHECKPOINT/starts"
      while [ "$n" -lt 300 ]; do
        n=$((n + 1)); echo "$n" > "$PRETEXT_CHECKPOINT/n.tmp"; mv "$PRETEXT_CHECKPOINT/n.tmp" "$PRETEXT_CHECKPOINT/n"
        sleep 0.5
      done
      cp "$PRETEXT_CHECKPOINT/starts" "$PRETEXT_OUT/starts"
    resources: {{ time: {time} }}
"#
        )
    };
    p.write("pipelines/t.yaml", &pipeline(1));
    let r = p.run(&["run", "pipelines/t.yaml", "--executor", "slurm", "--json"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let ev = events(&r.stdout);
    let failed = event(&ev, "stage_failed", "long").expect("the time limit fails the stage");
    assert!(
        failed["error"].as_str().unwrap().contains("TIMEOUT"),
        "{failed}"
    );
    assert_eq!(p.entries("command"), 0, "a killed job publishes nothing");

    // The limit is not part of the key: the same entry, resumed.
    p.write("pipelines/t.yaml", &pipeline(10));
    p.run(&["run", "pipelines/t.yaml", "--executor", "slurm"])
        .ok();
    let starts: Vec<u32> = entry_file(&p, "starts")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert!(
        starts[0] == 0 && starts[1] > 50,
        "the second job went on from the first one's checkpoint: {starts:?}"
    );
}
