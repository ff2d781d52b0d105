//! `kind: command`: runs any program, so pretext can drive a PyTorch script or a converter and be
//! measured against other orchestrators on the same pipelines.
//!
//! The command runs under `sh -c` in the project root with these environment variables:
//!
//! | variable | value |
//! |---|---|
//! | `PRETEXT_OUT` | the folder to write outputs into (published atomically on exit code 0) |
//! | `PRETEXT_CHECKPOINT` | a folder that survives a failed or killed attempt, for resuming |
//! | `PRETEXT_IN_<SLOT>` | the path of input `<slot>` (upper-cased); a list is joined with `:` |
//! | `PRETEXT_PARAMS` | every param of the stage as one JSON object |
//! | `PRETEXT_PARAM_<NAME>` | each scalar param, upper-cased name |
//! | `PRETEXT_STAGE` | the stage's name |
//! | `PRETEXT_DEVICE` | `cpu` or `cuda:N` |
//!
//! The command runs in a process group of its own, under a guard (this binary's hidden
//! `command-guard`, see [`guard`]) that kills the whole group when the stage is cancelled, when
//! pretext gets SIGINT or SIGTERM, and when pretext dies, `kill -9` included: `sh -c 'python3
//! x.py'` forks, so killing `sh` alone would leave the script writing into a folder a later
//! attempt publishes.
//!
//! A line `::progress DONE/TOTAL message` on stdout moves the stage's progress bar. A
//! `$PRETEXT_OUT/metrics.json` is copied into the cache entry's manifest. The key covers the
//! command text, the params and the content of every declared input, not files the command reads
//! without declaring them: declare scripts as inputs (`script: file:tools/train.py`).

use crate::stage::{InputSlot, InputValue, Inputs, OutputSlot, StageCtx, Task};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command as Process, Stdio};
use std::time::Duration;

pub struct Command;

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Params {
    /// The shell command (the stage's `run:` field).
    pub run: String,
    /// Any other params: part of the key, and exported as `PRETEXT_PARAM_<NAME>`.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Task for Command {
    const KIND: &'static str = "command";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "runs a shell command with its inputs and output folder in PRETEXT_* variables";
    type Params = Params;

    fn inputs(_: &Params) -> Option<Vec<InputSlot>> {
        None
    }

    fn outputs(_: &Params) -> Vec<OutputSlot> {
        vec![OutputSlot {
            name: "out",
            path: "out",
            doc: "the folder the command wrote ($PRETEXT_OUT)",
        }]
    }

    fn run(p: &Params, inputs: &Inputs, ctx: &mut StageCtx) -> Result<Value> {
        let out = ctx.out_dir.join("out");
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let exe =
            std::env::current_exe().context("finding the pretext binary for the command guard")?;
        let mut cmd = Process::new(exe);
        cmd.arg("command-guard")
            .arg("--parent")
            .arg(std::process::id().to_string())
            .current_dir(&ctx.workdir);
        cmd.env("PRETEXT_OUT", &out)
            .env("PRETEXT_CHECKPOINT", &ctx.checkpoint_dir)
            .env("PRETEXT_STAGE", ctx.stage)
            .env("PRETEXT_DEVICE", ctx.device.to_string())
            .env("PRETEXT_PARAMS", serde_json::to_string(&p.extra)?);
        for (name, value) in &p.extra {
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(_) | Value::Bool(_) => value.to_string(),
                _ => continue,
            };
            cmd.env(format!("PRETEXT_PARAM_{}", env_name(name)), text);
        }
        for (slot, value) in &inputs.0 {
            let joined = match value {
                InputValue::One(item) => item.path.display().to_string(),
                InputValue::Many(items) => items
                    .iter()
                    .map(|i| i.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":"),
            };
            cmd.env(format!("PRETEXT_IN_{}", env_name(slot)), joined);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(fd) = ctx.lease {
            // The guard inherits the stage's lease and holds it until the command's whole group
            // is gone: a rerun after pretext died waits for the cleanup instead of racing it.
            cmd.arg("--hold-fd").arg(fd.to_string());
            // SAFETY: fcntl is async-signal-safe; it clears close-on-exec on a descriptor this
            // process owns, in the forked child only.
            unsafe {
                cmd.pre_exec(move || {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.arg("--").arg(&p.run);
        let mut child = cmd.spawn().context("starting the command guard")?;
        let pid = child.id() as libc::pid_t;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let (reaped_tx, reaped_rx) = std::sync::mpsc::channel::<()>();
        let (status, rusage) = std::thread::scope(|scope| {
            let ctx = &*ctx;
            scope.spawn(move || stream(stdout, ctx, true));
            scope.spawn(move || stream(stderr, ctx, false));
            scope.spawn(move || {
                // Wakes when the child is reaped, or every 50 ms to look at the cancel flag.
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    reaped_rx.recv_timeout(Duration::from_millis(50))
                {
                    if ctx.cancelled() {
                        // The guard stops the command's whole process group.
                        // SAFETY: the child is not reaped yet (no message came), so pid is still ours.
                        unsafe { libc::kill(pid, libc::SIGTERM) };
                        return;
                    }
                }
            });
            let result = wait_with_rusage(pid);
            let _ = reaped_tx.send(());
            result
        })?;
        // The child was reaped by wait4 above; forget the std handle so it does not wait again.
        drop(child);
        ctx.peak_rss_kib = Some(rusage.ru_maxrss as u64);
        if ctx.cancelled() {
            bail!("interrupted: the command and every process it started were stopped");
        }
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            let code = libc::WEXITSTATUS(status);
            let how = if libc::WIFSIGNALED(status) {
                format!("was killed by signal {}", libc::WTERMSIG(status))
            } else if code > 128 {
                format!("was killed by signal {}", code - 128)
            } else {
                format!("exited with code {code}")
            };
            bail!("command {how}: {}", clip(&p.run, 300));
        }
        let metrics_file = out.join("metrics.json");
        if metrics_file.is_file() {
            let text = std::fs::read_to_string(&metrics_file)?;
            return serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", metrics_file.display()));
        }
        Ok(Value::Object(Map::new()))
    }
}

/// The first `max` characters of `text`, with `...` when cut (error messages quote commands).
fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

/// `pretext command-guard --parent PID [--hold-fd FD] -- RUN`: runs `sh -c RUN` in a new process
/// group and stays beside it until it exits, then kills whatever the command left running in its
/// group. SIGTERM, SIGINT or SIGHUP to the guard, or the death of `parent` (delivered as SIGTERM
/// by `PR_SET_PDEATHSIG`), stop the whole group: SIGTERM, then SIGKILL after a grace period.
/// `hold` (the stage's lease) stays open in the guard alone until it exits.
/// Returns the command's exit code, or 128 + the signal that ended it.
pub fn guard(
    parent: libc::pid_t,
    hold: Option<std::os::fd::RawFd>,
    run: &std::ffi::OsStr,
) -> Result<i32> {
    if let Some(fd) = hold {
        // SAFETY: marks an inherited descriptor close-on-exec, so `sh` does not inherit it.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: plain libc calls on values this function owns; no other thread exists yet, so the
    // mask applies to the signal thread spawned below and is reset by `spawn` for `sh`.
    let set = unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    // pretext may have died before the prctl above took effect.
    // SAFETY: getppid cannot fail.
    if unsafe { libc::getppid() } != parent {
        return Ok(128 + libc::SIGTERM);
    }
    let child = Process::new("sh")
        .arg("-c")
        .arg(run)
        .process_group(0)
        .spawn()
        .context("starting `sh`")?;
    let group = child.id() as libc::pid_t;
    std::thread::spawn(move || {
        let mut signal = 0;
        // SAFETY: `set` is initialised and blocked in this thread.
        if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
            stop_group(group);
        }
    });
    let (status, _) = wait_with_rusage(group)?;
    // Background processes the command started and did not wait for must not outlive it: the
    // stage's output is final once pretext sees the command end.
    // SAFETY: signals a process group this function created.
    unsafe { libc::kill(-group, libc::SIGKILL) };
    drop(child);
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
}

/// SIGTERM to the group, then SIGKILL if anything is left after five seconds.
fn stop_group(group: libc::pid_t) {
    // SAFETY: signals a process group the guard created; kill with signal 0 only tests it.
    unsafe {
        libc::kill(-group, libc::SIGTERM);
        for _ in 0..50 {
            if libc::kill(-group, 0) != 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        libc::kill(-group, libc::SIGKILL);
    }
}

fn env_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn stream(pipe: impl Read, ctx: &StageCtx, parse_progress: bool) {
    for line in BufReader::new(pipe).lines().map_while(Result::ok) {
        if parse_progress {
            if let Some(progress) = line
                .strip_prefix("::progress ")
                .and_then(parse_progress_line)
            {
                (ctx.progress)(progress);
                continue;
            }
        }
        ctx.log(&line);
    }
}

fn parse_progress_line(rest: &str) -> Option<crate::stage::Progress> {
    let (counts, message) = rest.split_once(' ').unwrap_or((rest, ""));
    let (done, total) = counts.split_once('/')?;
    Some(crate::stage::Progress {
        done: done.parse().ok()?,
        total: total.parse().ok()?,
        message: message.to_owned(),
    })
}

fn wait_with_rusage(pid: libc::pid_t) -> Result<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: rusage is plain old data that wait4 fills in.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waits for our own child; the pointers are valid for the call.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
        if r == pid {
            return Ok((status, rusage));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("waiting for the command");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_parse() {
        assert_eq!(
            parse_progress_line("3/10 loss 0.5"),
            Some(crate::stage::Progress {
                done: 3,
                total: 10,
                message: "loss 0.5".into()
            })
        );
        assert_eq!(parse_progress_line("x/10"), None);
        assert_eq!(env_name("lr-max.x"), "LR_MAX_X");
    }
}
