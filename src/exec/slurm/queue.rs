//! Talking to the queue: what `sbatch` is asked for, and what `squeue`, `scontrol`, `sacct` and
//! `scancel` are asked and answer.

use super::SlurmConfig;
use crate::pipeline::spec::Resources;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// A job's place in the queue as `squeue -o '%i|%T|%r'` prints it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct QueueState {
    pub state: String,
    pub reason: String,
}

impl QueueState {
    pub fn is_final(&self) -> bool {
        !matches!(
            self.state.as_str(),
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "SUSPENDED"
                | "REQUEUED"
                | "RESIZING"
                | "SIGNALING"
                | "STAGE_OUT"
                | "STOPPED"
        )
    }

    /// A pending job that will never start: what is wrong and how to fix it.
    pub fn never_starts(&self) -> Option<&'static str> {
        if self.state != "PENDING" {
            return None;
        }
        Some(match self.reason.as_str() {
            "DependencyNeverSatisfied" => "an upstream job failed",
            "PartitionConfig" | "PartitionNodeLimit" | "BadConstraints" => {
                "it asks for more than any node of the partition has: lower the stage's \
                 resources (cpu, gpu, mem) or choose another partition"
            }
            "PartitionTimeLimit" => {
                "its resources.time is above the partition's limit: lower it or choose another \
                 partition"
            }
            "InvalidAccount" | "InvalidQOS" | "AccountNotAllowed" | "QOSNotAllowed" => {
                "the account or QOS is not valid for this partition: check executor.account/qos"
            }
            _ => return None,
        })
    }
}

/// The `sbatch` flags of one stage's job. `after` are the job ids of its stale upstream stages.
pub(super) fn sbatch_flags(
    config: &SlurmConfig,
    res: &Resources,
    stage: &str,
    job_dir: &Path,
    workdir: &Path,
    after: &[String],
) -> Vec<String> {
    let mut flags = vec![
        "--parsable".to_owned(),
        format!("--job-name=pretext:{stage}"),
        format!("--output={}", job_dir.join("slurm-%j.out").display()),
        format!("--chdir={}", workdir.display()),
        "--kill-on-invalid-dep=yes".to_owned(),
        format!("--cpus-per-task={}", res.cpu.unwrap_or(1).max(1)),
    ];
    if let Some(gpus) = res.gpu.filter(|&g| g > 0) {
        flags.push(format!("--gres=gpu:{gpus}"));
    }
    if let Some(mem) = &res.mem {
        flags.push(format!("--mem={mem}"));
    }
    if let Some(time) = &res.time {
        flags.push(format!("--time={time}"));
    }
    if let Some(p) = res.partition.as_ref().or(config.partition.as_ref()) {
        flags.push(format!("--partition={p}"));
    }
    if let Some(a) = res.account.as_ref().or(config.account.as_ref()) {
        flags.push(format!("--account={a}"));
    }
    if let Some(q) = &config.qos {
        flags.push(format!("--qos={q}"));
    }
    if !after.is_empty() {
        flags.push(format!("--dependency=afterok:{}", after.join(":")));
    }
    flags.extend(config.sbatch_args.iter().cloned());
    flags.extend(res.sbatch_args.iter().cloned());
    flags
}

/// Submits one job; returns its id.
pub(super) fn submit(flags: &[String], script: &Path) -> Result<String> {
    let out = Command::new("sbatch")
        .args(flags)
        .arg(script)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::anyhow!(
                "`sbatch` is not on PATH: the Slurm executor runs where Slurm's client commands \
                 are (a login node), or use --executor local"
            ),
            _ => anyhow::anyhow!("running sbatch: {e}"),
        })?;
    if !out.status.success() {
        bail!(
            "sbatch refused the job: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // `--parsable` prints `id` or `id;cluster`.
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().split(';').next().unwrap_or("").to_owned();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        bail!("sbatch printed no job id: `{}`", text.trim());
    }
    Ok(id)
}

/// States of `ids` still known to the controller. A job missing from the answer has left the
/// queue (or never existed); the caller falls back to [`final_state`].
pub(super) fn query(ids: &[&str]) -> Result<HashMap<String, QueueState>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let out = Command::new("squeue")
        .args(["-h", "-t", "all", "-o", "%i|%T|%r", "-j", &ids.join(",")])
        .output()
        .context("running squeue")?;
    if out.status.success() {
        return Ok(parse_squeue(&String::from_utf8_lossy(&out.stdout)));
    }
    // squeue refuses the whole list when one id has been purged: ask one by one.
    let mut states = HashMap::new();
    for id in ids {
        let out = Command::new("scontrol")
            .args(["-o", "show", "job", id])
            .output()
            .context("running scontrol")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("Unable to contact") {
            bail!("the Slurm controller does not answer: {}", err.trim());
        }
        if let Some(st) = text.lines().next().and_then(parse_scontrol) {
            states.insert((*id).to_owned(), st);
        }
    }
    Ok(states)
}

/// Parses `squeue -h -t all -o '%i|%T|%r'` output.
fn parse_squeue(text: &str) -> HashMap<String, QueueState> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.trim().splitn(3, '|');
            let id = parts.next()?.trim();
            let state = parts.next()?.trim();
            let reason = parts.next().unwrap_or("").trim();
            (!id.is_empty() && !state.is_empty()).then(|| {
                (
                    id.to_owned(),
                    QueueState {
                        state: state.to_owned(),
                        reason: reason.to_owned(),
                    },
                )
            })
        })
        .collect()
}

/// `JobState=` and `Reason=` of a `scontrol -o show job` line.
fn parse_scontrol(line: &str) -> Option<QueueState> {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(str::to_owned)
    };
    Some(QueueState {
        state: field("JobState=")?,
        reason: field("Reason=").unwrap_or_default(),
    })
}

/// The end of a job the controller has forgotten: the completion log (`sacct -c`, works without
/// slurmdbd), then plain accounting, then the exit code file the batch script wrote.
pub(super) fn final_state(id: &str, exit_code_file: &Path) -> QueueState {
    for args in [
        vec!["-c", "-j", id, "-n", "-P", "-X", "-o", "State"],
        vec!["-j", id, "-n", "-P", "-X", "-o", "State"],
    ] {
        if let Ok(out) = Command::new("sacct").args(&args).output() {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(state) = text.lines().map(str::trim).find(|l| !l.is_empty()) {
                if out.status.success() {
                    return QueueState {
                        // `CANCELLED by 0` -> `CANCELLED`
                        state: state.split_whitespace().next().unwrap_or(state).to_owned(),
                        reason: String::new(),
                    };
                }
            }
        }
    }
    match std::fs::read_to_string(exit_code_file) {
        Ok(code) if code.trim() == "0" => QueueState {
            state: "COMPLETED".into(),
            reason: String::new(),
        },
        Ok(code) => QueueState {
            state: "FAILED".into(),
            reason: format!("exit code {}", code.trim()),
        },
        Err(_) => QueueState {
            state: "VANISHED".into(),
            reason: "the controller forgot the job and it left no exit code file".into(),
        },
    }
}

pub(super) fn cancel(ids: &[&str]) {
    if !ids.is_empty() {
        // Best effort: a job that already ended is not an error worth stopping for.
        let _ = Command::new("scancel").args(ids).output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    fn config() -> SlurmConfig {
        SlurmConfig {
            partition: Some("gpu".into()),
            account: Some("lab".into()),
            qos: None,
            sbatch_args: vec!["--constraint=a100".into()],
            poll: Duration::from_secs(1),
            pretext: PathBuf::from("/opt/pretext"),
        }
    }

    #[test]
    fn resources_map_onto_sbatch_flags_and_the_stage_wins() {
        let res = Resources {
            cpu: Some(8),
            gpu: Some(2),
            mem: Some("32G".into()),
            time: Some("90".into()),
            partition: Some("a100".into()),
            account: None,
            sbatch_args: vec!["--exclusive".into()],
        };
        let flags = sbatch_flags(
            &config(),
            &res,
            "finetune@vit-seed1",
            Path::new("/c/jobs/x"),
            Path::new("/proj"),
            &["11".into(), "12".into()],
        );
        for want in [
            "--parsable",
            "--job-name=pretext:finetune@vit-seed1",
            "--output=/c/jobs/x/slurm-%j.out",
            "--chdir=/proj",
            "--kill-on-invalid-dep=yes",
            "--cpus-per-task=8",
            "--gres=gpu:2",
            "--mem=32G",
            "--time=90",
            "--partition=a100",
            "--account=lab",
            "--dependency=afterok:11:12",
            "--constraint=a100",
            "--exclusive",
        ] {
            assert!(flags.iter().any(|f| f == want), "{want} missing: {flags:?}");
        }
        let plain = sbatch_flags(
            &config(),
            &Resources::default(),
            "s",
            Path::new("/j"),
            Path::new("/p"),
            &[],
        );
        assert!(plain.contains(&"--cpus-per-task=1".to_owned()));
        assert!(plain.contains(&"--partition=gpu".to_owned()));
        assert!(!plain.iter().any(|f| f.starts_with("--dependency")
            || f.starts_with("--gres")
            || f.starts_with("--mem")));
    }

    #[test]
    fn queue_states_parse_and_classify() {
        let q = parse_squeue(
            "101|PENDING|DependencyNeverSatisfied\n102|RUNNING|None\n103|COMPLETED|None\n\n",
        );
        assert_eq!(q.len(), 3);
        assert!(q["101"].never_starts().is_some());
        assert!(!q["101"].is_final());
        assert!(q["102"].never_starts().is_none() && !q["102"].is_final());
        assert!(q["103"].is_final());
        let pending_for_resources = QueueState {
            state: "PENDING".into(),
            reason: "Resources".into(),
        };
        assert!(pending_for_resources.never_starts().is_none());
        let st = parse_scontrol(
            "JobId=7 JobName=x UserId=root(0) JobState=TIMEOUT Reason=TimeLimit Dependency=(null) ExitCode=0:15",
        )
        .unwrap();
        assert_eq!(st.state, "TIMEOUT");
        assert_eq!(st.reason, "TimeLimit");
    }
}
