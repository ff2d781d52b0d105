//! Walks the stage DAG: runs a stage once all its upstream stages are done, several at once up to
//! `jobs` and the GPU tokens, and stops scheduling after a failure unless told to keep going.
//! It knows nothing of caching or tasks: `runner` does the work and says what happened.

use super::cached::Outcome;
use super::events::{Event, EventSink};
use std::sync::mpsc;
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct WalkOptions {
    pub jobs: usize,
    /// GPU tokens on this machine. With none, GPU requests are ignored and stages run on the CPU.
    pub gpus: u32,
    /// CPU tokens (cores). A stage takes its `cpus`, at most all of them, so two training stages
    /// never fight over the same cores while light stages still run beside each other.
    pub cpus: u32,
    pub keep_going: bool,
    /// Set on SIGINT / SIGTERM: no further stage starts (running ones see it as their cancel
    /// flag and stop).
    pub interrupted: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    NotSelected,
    Pending,
    Done(Outcome),
    Skipped(String),
}

impl Status {
    /// Before a run: the selected stages pending, the rest not selected.
    pub fn initial(selected: &[bool]) -> Vec<Status> {
        selected
            .iter()
            .map(|&s| {
                if s {
                    Status::Pending
                } else {
                    Status::NotSelected
                }
            })
            .collect()
    }
}

/// One node: its dependencies (indices) and what it needs of the machine.
pub struct Node<'a> {
    pub name: &'a str,
    pub deps: &'a [usize],
    pub gpus: u32,
    pub cpus: u32,
}

pub fn walk(
    nodes: &[Node],
    selected: &[bool],
    opts: &WalkOptions,
    runner: &(dyn Fn(usize, &[u32]) -> Outcome + Sync),
    sink: &dyn EventSink,
) -> Vec<Status> {
    let started = Instant::now();
    let mut status = Status::initial(selected);
    let mut running = 0usize;
    let mut gpus_free = opts.gpus;
    // Which cards are taken: a stage gets particular GPUs, so two stages never share one.
    let mut gpu_taken = vec![false; opts.gpus as usize];
    let mut gpus_of: Vec<Vec<u32>> = vec![Vec::new(); nodes.len()];
    let mut cpus_free = opts.cpus.max(1);
    let cpu_need = |i: usize| nodes[i].cpus.clamp(1, opts.cpus.max(1));
    let mut stop = false;
    let (tx, rx) = mpsc::channel::<(usize, Outcome)>();
    let mut started_flags = vec![false; nodes.len()];
    let gpu_need = |i: usize| if opts.gpus == 0 { 0 } else { nodes[i].gpus };
    let interrupted = || {
        opts.interrupted
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
    };

    // A fixed pool of `jobs` workers: the cost per stage stays flat however large the DAG is
    // (no thread per stage), and cache hits never wait for a thread to start.
    let (job_tx, job_rx) = mpsc::channel::<(usize, Vec<u32>)>();
    let job_rx = std::sync::Mutex::new(job_rx);
    std::thread::scope(|scope| {
        // More workers than stages would only be idle threads.
        for _ in 0..opts.jobs.clamp(1, nodes.len().max(1)) {
            let (tx, job_rx) = (tx.clone(), &job_rx);
            scope.spawn(move || loop {
                let next = job_rx.lock().expect("job queue").recv();
                match next {
                    Ok((i, gpus)) => {
                        // The cache layer turns a task's panic into a failure; this catches one
                        // in pretext's own code, so a worker never dies with a stage running.
                        let outcome =
                            crate::panics::catch(|| runner(i, &gpus)).unwrap_or_else(|msg| {
                                let error = format!("pretext panicked running this stage: {msg}");
                                sink.emit(Event::StageFailed {
                                    stage: nodes[i].name.to_owned(),
                                    key: String::new(),
                                    error: error.clone(),
                                });
                                Outcome::Failed { error }
                            });
                        if tx.send((i, outcome)).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            });
        }
        loop {
            // Skip what can no longer run.
            for i in 0..nodes.len() {
                if status[i] != Status::Pending || started_flags[i] {
                    continue;
                }
                let bad = nodes[i].deps.iter().find(|&&d| {
                    matches!(
                        status[d],
                        Status::Done(Outcome::Failed { .. }) | Status::Skipped(_)
                    )
                });
                if let Some(&d) = bad {
                    let reason = match &status[d] {
                        Status::Skipped(_) => format!("upstream `{}` was skipped", nodes[d].name),
                        _ => format!("upstream `{}` failed", nodes[d].name),
                    };
                    sink.emit(Event::StageSkipped {
                        stage: nodes[i].name.to_owned(),
                        reason: reason.clone(),
                    });
                    status[i] = Status::Skipped(reason);
                } else if stop || interrupted() {
                    let reason = if interrupted() {
                        "the run was interrupted".to_owned()
                    } else {
                        "the run stopped after a failure (use --keep-going to continue)".to_owned()
                    };
                    sink.emit(Event::StageSkipped {
                        stage: nodes[i].name.to_owned(),
                        reason: reason.clone(),
                    });
                    status[i] = Status::Skipped(reason);
                } else if gpu_need(i) > opts.gpus {
                    let reason = format!(
                        "needs {} GPUs, this machine has {}",
                        nodes[i].gpus, opts.gpus
                    );
                    status[i] = Status::Done(Outcome::Failed {
                        error: reason.clone(),
                    });
                    sink.emit(Event::StageFailed {
                        stage: nodes[i].name.to_owned(),
                        key: String::new(),
                        error: reason,
                    });
                    stop = !opts.keep_going;
                }
            }
            // Start what is ready, in plan order.
            for i in 0..nodes.len() {
                if running >= opts.jobs.max(1) {
                    break;
                }
                let ready = status[i] == Status::Pending
                    && !started_flags[i]
                    && nodes[i].deps.iter().all(|&d| {
                        matches!(
                            status[d],
                            Status::Done(Outcome::Cached { .. } | Outcome::Ran { .. })
                        )
                    })
                    && gpu_need(i) <= gpus_free
                    && cpu_need(i) <= cpus_free;
                if ready {
                    started_flags[i] = true;
                    running += 1;
                    gpus_free -= gpu_need(i);
                    cpus_free -= cpu_need(i);
                    let ids: Vec<u32> = (0..gpu_taken.len())
                        .filter(|&g| !gpu_taken[g])
                        .take(gpu_need(i) as usize)
                        .map(|g| g as u32)
                        .collect();
                    ids.iter().for_each(|&g| gpu_taken[g as usize] = true);
                    gpus_of[i] = ids.clone();
                    job_tx.send((i, ids)).expect("workers are alive");
                }
            }
            if running == 0 {
                break;
            }
            let (i, outcome) = rx.recv().expect("a running stage reports");
            running -= 1;
            gpus_free += gpu_need(i);
            cpus_free += cpu_need(i);
            gpus_of[i]
                .drain(..)
                .for_each(|g| gpu_taken[g as usize] = false);
            match &outcome {
                Outcome::Failed { .. } => stop = stop || !opts.keep_going,
                Outcome::Cached { .. } | Outcome::Ran { .. } => {}
            }
            status[i] = Status::Done(outcome);
        }
        drop(job_tx);
    });

    emit_run_end(&status, started, sink);
    status
}

/// The closing event of a run, counted from the statuses (the local and the Slurm executor).
pub fn emit_run_end(status: &[Status], started: Instant, sink: &dyn EventSink) {
    let count = |f: fn(&Status) -> bool| status.iter().filter(|s| f(s)).count();
    sink.emit(Event::RunEnd {
        ran: count(|s| matches!(s, Status::Done(Outcome::Ran { .. }))),
        cached: count(|s| matches!(s, Status::Done(Outcome::Cached { .. }))),
        failed: count(|s| matches!(s, Status::Done(Outcome::Failed { .. }))),
        skipped: count(|s| matches!(s, Status::Skipped(_))),
        wall_s: started.elapsed().as_secs_f64(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::events::Recorder;
    use std::sync::Mutex;

    fn chain() -> Vec<Node<'static>> {
        // a -> b -> c, and d independent
        vec![
            Node {
                name: "a",
                deps: &[],
                gpus: 0,
                cpus: 1,
            },
            Node {
                name: "b",
                deps: &[0],
                gpus: 0,
                cpus: 1,
            },
            Node {
                name: "c",
                deps: &[1],
                gpus: 0,
                cpus: 1,
            },
            Node {
                name: "d",
                deps: &[],
                gpus: 0,
                cpus: 1,
            },
        ]
    }

    #[test]
    fn a_panicking_stage_fails_with_its_message_and_the_walk_ends() {
        let runner = |i: usize, _: &[u32]| {
            if i == 1 {
                let zero = std::hint::black_box(0usize);
                let _ = 1 / zero;
            }
            Outcome::Ran { wall_s: 0.0 }
        };
        let opts = WalkOptions {
            jobs: 2,
            cpus: 2,
            keep_going: true,
            ..Default::default()
        };
        let status = walk(&chain(), &[true; 4], &opts, &runner, &Recorder::default());
        match &status[1] {
            Status::Done(Outcome::Failed { error }) => {
                assert!(error.contains("divide by zero"), "{error}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(status[2], Status::Skipped(_)));
    }

    #[test]
    fn runs_in_dependency_order() {
        let order = Mutex::new(Vec::new());
        let runner = |i: usize, _: &[u32]| {
            order.lock().unwrap().push(i);
            Outcome::Ran { wall_s: 0.0 }
        };
        let opts = WalkOptions {
            jobs: 1,
            gpus: 0,
            cpus: 2,
            keep_going: false,
            ..Default::default()
        };
        let status = walk(&chain(), &[true; 4], &opts, &runner, &Recorder::default());
        assert!(status
            .iter()
            .all(|s| matches!(s, Status::Done(Outcome::Ran { .. }))));
        let order = order.into_inner().unwrap();
        let pos = |x| order.iter().position(|&i| i == x).unwrap();
        assert!(pos(0) < pos(1) && pos(1) < pos(2));
    }

    #[test]
    fn failure_skips_downstream_and_keep_going_runs_the_rest() {
        let runner = |i: usize, _: &[u32]| {
            if i == 0 {
                Outcome::Failed {
                    error: "boom".into(),
                }
            } else {
                Outcome::Ran { wall_s: 0.0 }
            }
        };
        let opts = WalkOptions {
            jobs: 1,
            gpus: 0,
            cpus: 2,
            keep_going: true,
            ..Default::default()
        };
        let status = walk(&chain(), &[true; 4], &opts, &runner, &Recorder::default());
        assert!(matches!(status[1], Status::Skipped(_)));
        assert!(matches!(status[2], Status::Skipped(_)));
        assert_eq!(status[3], Status::Done(Outcome::Ran { wall_s: 0.0 }));
    }

    #[test]
    fn cpu_tokens_keep_heavy_stages_apart_and_let_light_ones_share() {
        let nodes = vec![
            Node {
                name: "train1",
                deps: &[],
                gpus: 0,
                cpus: u32::MAX,
            },
            Node {
                name: "train2",
                deps: &[],
                gpus: 0,
                cpus: u32::MAX,
            },
            Node {
                name: "light1",
                deps: &[],
                gpus: 0,
                cpus: 1,
            },
            Node {
                name: "light2",
                deps: &[],
                gpus: 0,
                cpus: 1,
            },
        ];
        let running = Mutex::new(Vec::<usize>::new());
        let overlaps = Mutex::new(Vec::<(usize, usize)>::new());
        let runner = |i: usize, _: &[u32]| {
            {
                let mut r = running.lock().unwrap();
                for &j in r.iter() {
                    overlaps.lock().unwrap().push((i.min(j), i.max(j)));
                }
                r.push(i);
            }
            std::thread::sleep(std::time::Duration::from_millis(30));
            running.lock().unwrap().retain(|&j| j != i);
            Outcome::Ran { wall_s: 0.0 }
        };
        let opts = WalkOptions {
            jobs: 4,
            gpus: 0,
            cpus: 2,
            keep_going: false,
            ..Default::default()
        };
        walk(&nodes, &[true; 4], &opts, &runner, &Recorder::default());
        let overlaps = overlaps.into_inner().unwrap();
        assert!(
            overlaps.iter().all(|&(a, b)| a >= 2 && b >= 2),
            "a training stage shared the cores: {overlaps:?}"
        );
        assert!(
            overlaps.contains(&(2, 3)),
            "light stages ran one after the other: {overlaps:?}"
        );
    }

    #[test]
    fn gpu_tokens_serialise_gpu_stages() {
        let nodes = vec![
            Node {
                name: "g1",
                deps: &[],
                gpus: 1,
                cpus: 1,
            },
            Node {
                name: "g2",
                deps: &[],
                gpus: 1,
                cpus: 1,
            },
        ];
        let busy = Mutex::new((0, 0));
        let cards = Mutex::new(Vec::new());
        let runner = |_: usize, gpus: &[u32]| {
            {
                let mut b = busy.lock().unwrap();
                b.0 += 1;
                b.1 = b.1.max(b.0);
            }
            cards.lock().unwrap().push(gpus.to_vec());
            std::thread::sleep(std::time::Duration::from_millis(30));
            busy.lock().unwrap().0 -= 1;
            Outcome::Ran { wall_s: 0.0 }
        };
        let opts = WalkOptions {
            jobs: 4,
            gpus: 1,
            cpus: 2,
            keep_going: false,
            ..Default::default()
        };
        walk(&nodes, &[true, true], &opts, &runner, &Recorder::default());
        assert_eq!(
            busy.into_inner().unwrap().1,
            1,
            "two GPU stages shared one GPU"
        );
        assert_eq!(cards.into_inner().unwrap(), vec![vec![0], vec![0]]);
    }

    #[test]
    fn gpu_stages_on_two_cards_get_different_cards() {
        let nodes: Vec<Node> = ["g1", "g2"]
            .into_iter()
            .map(|name| Node {
                name,
                deps: &[],
                gpus: 1,
                cpus: 1,
            })
            .collect();
        let cards = Mutex::new(Vec::new());
        let runner = |_: usize, gpus: &[u32]| {
            cards.lock().unwrap().push(gpus.to_vec());
            std::thread::sleep(std::time::Duration::from_millis(30));
            Outcome::Ran { wall_s: 0.0 }
        };
        let opts = WalkOptions {
            jobs: 4,
            gpus: 2,
            cpus: 2,
            keep_going: false,
            ..Default::default()
        };
        walk(&nodes, &[true, true], &opts, &runner, &Recorder::default());
        let mut got = cards.into_inner().unwrap();
        got.sort();
        assert_eq!(got, vec![vec![0], vec![1]]);
    }
}
