//! A temporary project folder and a way to run `pretext` in it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Project {
    pub dir: tempfile::TempDir,
}

pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "pretext failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

impl Project {
    pub fn new() -> Project {
        let p = Project {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        std::fs::create_dir_all(p.path().join("pipelines")).unwrap();
        std::fs::create_dir_all(p.path().join("counts")).unwrap();
        p
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pretext"));
        cmd.args(args)
            .current_dir(self.path())
            .env("COUNTS", self.path().join("counts"))
            .env_remove("PRETEXT_CACHE");
        cmd
    }
    pub fn run(&self, args: &[&str]) -> Ran {
        let out: Output = self.command(args).output().expect("pretext starts");
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
    /// How many times stages ran `count NAME` (a line appended per run).
    pub fn count(&self, name: &str) -> usize {
        std::fs::read_to_string(self.path().join("counts").join(name))
            .map_or(0, |s| s.lines().count())
    }
    /// `status --json` as (stage, state, key).
    pub fn status(&self, file: &str) -> Vec<(String, String, String)> {
        let r = self.run(&["status", file, "--json"]);
        r.ok();
        let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("status json");
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["stage"].as_str().unwrap().to_owned(),
                    s["state"].as_str().unwrap().to_owned(),
                    s["key"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }
    pub fn entries(&self, kind: &str) -> usize {
        std::fs::read_dir(self.path().join("cache").join(kind)).map_or(0, |d| d.count())
    }
}

/// A command that records its run under `counts/NAME` and writes one output file.
pub fn counted(name: &str, extra: &str) -> String {
    format!("echo run >> \"$COUNTS/{name}\"; echo {name} {extra} > \"$PRETEXT_OUT/{name}.txt\"")
}
