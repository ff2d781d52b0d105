//! The loader must never panic. `fuzz/` holds a cargo-fuzz target for long runs on nightly; this
//! test replays its corpus and a few thousand deterministic mutations of it on stable, in CI.

use pretext::pipeline::{load_plan, LoadOptions};
use std::path::Path;

fn corpus() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/pipeline");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz corpus exists")
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// xorshift: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const TOKENS: &[&[u8]] = &[
    b"${",
    b"}",
    b"@*",
    b".out",
    b": ",
    b"\n  ",
    b"- ",
    b"{",
    b"[",
    b"'",
    b"\"",
    b"data.",
    b"file:",
    b"include: [a.yaml]\n",
    b"\t",
    b"\xff",
    b"&a ",
    b"*a",
    b"!!",
];

fn mutate(input: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(5) {
            0 if !v.is_empty() => {
                let end = (at + rng.below(8)).min(v.len());
                v.drain(at.min(end)..end);
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                v.splice(at..at, t.iter().copied());
            }
            2 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            3 => v.truncate(at),
            _ => {
                let a = rng.below(v.len() + 1);
                let b = (a + rng.below(40)).min(v.len());
                let chunk = v[a..b].to_vec();
                v.splice(at.min(v.len())..at.min(v.len()), chunk);
            }
        }
    }
    v
}

#[test]
fn loader_never_panics_on_mutated_pipelines() {
    let dir = tempfile::tempdir().unwrap();
    let pipelines = dir.path().join("pipelines");
    std::fs::create_dir_all(&pipelines).unwrap();
    std::fs::write(
        pipelines.join("a.yaml"),
        "stages:\n  inc:\n    kind: command\n    run: 'true'\n",
    )
    .unwrap();
    let file = pipelines.join("fuzz.yaml");
    let catalog = pretext::tasks::catalog();
    let seeds = corpus();
    assert!(seeds.len() >= 5);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut loaded = 0;
    for round in 0..3000 {
        let seed = &seeds[round % seeds.len()];
        let input = if round < seeds.len() {
            seed.clone()
        } else {
            mutate(seed, &mut rng)
        };
        std::fs::write(&file, &input).unwrap();
        let result =
            std::panic::catch_unwind(|| load_plan(&file, &catalog, &LoadOptions::default()));
        match result {
            Ok(Ok(_)) => loaded += 1,
            Ok(Err(e)) => assert!(!e.message.is_empty()),
            Err(_) => panic!(
                "loader panicked on input (round {round}):\n{}",
                String::from_utf8_lossy(&input)
            ),
        }
    }
    assert!(loaded >= seeds.len(), "the unmutated corpus loads");
}
