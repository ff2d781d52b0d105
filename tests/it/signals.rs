//! Kills and signals: a stopped run leaves no process of its stages behind (checked by PID), no
//! half entry, and exits as Unix tools do (130 on SIGINT, 143 on SIGTERM).

use crate::util::Project;
use std::path::Path;
use std::time::{Duration, Instant};

/// A command stage whose real work is a grandchild of `sh` (`sh -c '...'` forks, as `sh -c
/// 'python3 x.py'` does): it writes the worker's PID, which appends its PID to an output every
/// 50 ms for 4 s.
const FORKING: &str = r#"
stages:
  slow:
    kind: command
    run: |
      sh -c 'for i in $(seq 80); do echo $$ >> "$PRETEXT_OUT/a.txt"; sleep 0.05; done' &
      echo $! > worker.pid
      wait
"#;

/// Running, not a zombie that init has yet to reap.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|rest| rest.trim_start().to_owned())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

fn wait_for(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "the stage never started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn gone_soon(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn stop_with(signal: i32) -> (i32, i32, Project) {
    let p = Project::new();
    p.write("pipelines/k.yaml", FORKING);
    let mut child = p
        .command(&["run", "pipelines/k.yaml"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let worker = wait_for(&p.path().join("worker.pid"));
    assert!(alive(worker));
    // SAFETY: signals the pretext process this test started.
    unsafe { libc::kill(child.id() as i32, signal) };
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or(128 + status.signal().unwrap_or(0));
    (code, worker, p)
}

#[test]
fn kill_9_of_pretext_takes_the_command_s_grandchildren_with_it() {
    let (code, worker, p) = stop_with(libc::SIGKILL);
    assert_eq!(code, 128 + libc::SIGKILL);
    assert!(
        gone_soon(worker),
        "worker {worker} outlived a killed pretext"
    );
    assert_eq!(p.entries("command"), 0, "nothing was published");
}

#[test]
fn sigterm_and_sigint_stop_every_process_and_exit_143_and_130() {
    for (signal, expected) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let (code, worker, p) = stop_with(signal);
        assert_eq!(code, expected, "exit code after signal {signal}");
        assert!(!alive(worker), "worker {worker} survived signal {signal}");
        assert_eq!(p.entries("command"), 0, "nothing was published");
    }
}

#[test]
fn a_rerun_after_a_kill_publishes_only_its_own_output() {
    let (_, _, p) = stop_with(libc::SIGKILL);
    // At once, as a scheduler would restart it: an orphan of the first attempt would append its
    // own PID to the output the rerun publishes.
    p.run(&["run", "pipelines/k.yaml"]).ok();
    let out = std::fs::read_dir(p.path().join("cache/command"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("out/a.txt");
    let text = std::fs::read_to_string(out).unwrap();
    let pids: std::collections::BTreeSet<&str> = text.lines().collect();
    assert_eq!(pids.len(), 1, "writers: {pids:?}");
}

/// A fine-tune stopped by Ctrl-C resumes from its last whole epoch. Its default checkpoint rule
/// (best validation accuracy, ties keep the earliest) used to write a tie-breaker JSON could not
/// read back, so every such stage silently started over.
#[test]
fn an_interrupted_fine_tune_resumes_from_its_last_epoch() {
    let p = Project::new();
    crate::science::tiny_data(&p, 6, 3, 0);
    p.write(
        "pipelines/ft.yaml",
        r#"
data:
  shoulder: { path: data/shoulder }
stages:
  ft:
    kind: finetune
    inputs: { data: data.shoulder }
    params: { model: vit, vit_dims: [16, 1, 2], img_size: 16, patch: 4, epochs: 300, batch: 8, val_fraction: 0.25 }
"#,
    );
    let mut child = p
        .command(&["run", "pipelines/ft.yaml"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let tmp = p.path().join("cache/tmp");
    let deadline = Instant::now() + Duration::from_secs(60);
    let epochs_done = || {
        std::fs::read_dir(&tmp)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("log.txt")).ok())
            .map(|log| log.matches(" train loss ").count())
            .max()
            .unwrap_or(0)
    };
    while epochs_done() < 3 {
        assert!(
            Instant::now() < deadline,
            "the fine-tune never got to epoch 3"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signals the pretext process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert_eq!(
        p.entries("finetune"),
        0,
        "an interrupted stage publishes nothing"
    );

    p.run(&["run", "pipelines/ft.yaml"]).ok();
    let log = std::fs::read_dir(p.path().join("cache/finetune"))
        .unwrap()
        .flatten()
        .find_map(|e| std::fs::read_to_string(e.path().join("log.txt")).ok())
        .expect("the rerun published the entry");
    assert!(!log.contains("unreadable"), "{log}");
    let resumed = log
        .lines()
        .find_map(|l| l.strip_prefix("resuming after epoch "))
        .and_then(|rest| rest.split(' ').next()?.parse::<usize>().ok());
    assert!(
        resumed.is_some_and(|n| n >= 3),
        "the rerun started over instead of resuming:\n{log}"
    );
}
