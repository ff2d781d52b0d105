//! Records the git commit pretext was built from (`PRETEXT_COMMIT`, "unknown" outside a git
//! checkout, with "-dirty" when the tree had changes), so every cache entry and report says which
//! code computed it.

fn main() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    println!(
        "cargo:rustc-env=PRETEXT_COMMIT={commit}{}",
        if dirty { "-dirty" } else { "" }
    );
    // Rebuild the stamp when HEAD or the index moves, not on every build.
    for f in [".git/HEAD", ".git/index"] {
        if std::path::Path::new(f).exists() {
            println!("cargo:rerun-if-changed={f}");
        }
    }
}
