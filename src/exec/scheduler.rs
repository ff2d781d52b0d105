//! Walks the stage DAG: runs a stage once all its upstream stages are done, several at once up to
//! `jobs` and the GPU tokens, and stops scheduling after a failure unless told to keep going.
//! It knows nothing of caching or tasks: `runner` does the work and says what happened.

use super::cached::Outcome;
use super::events::{Event, EventSink};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
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
    pub interrupted: Option<Arc<AtomicBool>>,
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

/// Why the stages still waiting are skipped once a stage failed without `--keep-going` (the
/// local and the Slurm executor say the same).
pub(super) const STOPPED: &str = "the run stopped after a failure (use --keep-going to continue)";

/// Why a stage cannot run because of an upstream stage, if it cannot: the first of `deps` that
/// failed or was skipped (the local and the Slurm executor say the same).
pub(super) fn upstream_trouble<'a>(
    deps: &[usize],
    status: &[Status],
    name: impl Fn(usize) -> &'a str,
) -> Option<String> {
    deps.iter().find_map(|&d| match &status[d] {
        Status::Done(Outcome::Failed { .. }) => Some(format!("upstream `{}` failed", name(d))),
        Status::Skipped(_) => Some(format!("upstream `{}` was skipped", name(d))),
        _ => None,
    })
}

/// One node: its dependencies (indices) and what it needs of the machine.
pub struct Node<'a> {
    pub name: &'a str,
    pub deps: &'a [usize],
    pub gpus: u32,
    pub cpus: u32,
}

/// A stage handed to a worker, with the GPUs it was given.
type Started = (usize, Vec<u32>);

pub fn walk(
    nodes: &[Node],
    selected: &[bool],
    opts: &WalkOptions,
    runner: &(dyn Fn(usize, &[u32]) -> Outcome + Sync),
    sink: &dyn EventSink,
) -> Vec<Status> {
    let started = Instant::now();
    let mut books = Books::new(nodes, selected, opts);
    let (done_tx, done_rx) = mpsc::channel::<(usize, Outcome)>();
    // A fixed pool of `jobs` workers: the cost per stage stays flat however large the DAG is
    // (no thread per stage), and cache hits never wait for a thread to start.
    let (queue_tx, queue_rx) = mpsc::channel::<Started>();
    let queue_rx = Mutex::new(queue_rx);
    std::thread::scope(|scope| {
        // More workers than stages would only be idle threads.
        for _ in 0..opts.jobs.clamp(1, nodes.len().max(1)) {
            let (done, queue) = (done_tx.clone(), &queue_rx);
            scope.spawn(move || work(queue, done, nodes, runner, sink));
        }
        loop {
            books.skip_blocked(sink);
            books.start_ready(&queue_tx);
            if books.running == 0 {
                break;
            }
            let (i, outcome) = done_rx.recv().expect("a running stage reports");
            books.finish(i, outcome);
        }
        // Closing the queue ends the workers.
        drop(queue_tx);
    });

    emit_run_end(&books.status, started, sink);
    books.status
}

/// One worker: runs the stages it takes off the queue until the queue closes.
fn work(
    queue: &Mutex<Receiver<Started>>,
    done: Sender<(usize, Outcome)>,
    nodes: &[Node],
    runner: &(dyn Fn(usize, &[u32]) -> Outcome + Sync),
    sink: &dyn EventSink,
) {
    loop {
        // The lock is held only while waiting for a stage, never while running one.
        let next = queue.lock().expect("job queue").recv();
        let Ok((i, gpus)) = next else { return };
        // The cache layer turns a task's panic into a failure; this catches one in pretext's own
        // code, so a worker never dies with a stage running.
        let outcome = crate::panics::catch(|| runner(i, &gpus)).unwrap_or_else(|msg| {
            let error = format!("pretext panicked running this stage: {msg}");
            sink.emit(Event::StageFailed {
                stage: nodes[i].name.to_owned(),
                key: String::new(),
                error: error.clone(),
            });
            Outcome::Failed { error }
        });
        if done.send((i, outcome)).is_err() {
            return;
        }
    }
}

/// The walk's books: where each stage stands and which of the machine's tokens are free.
struct Books<'a> {
    nodes: &'a [Node<'a>],
    opts: &'a WalkOptions,
    status: Vec<Status>,
    /// Handed to a worker; its status stays `Pending` until its outcome comes back.
    started: Vec<bool>,
    running: usize,
    cpus_free: u32,
    /// Which cards are taken: a stage gets particular GPUs, so two stages never share one.
    gpu_taken: Vec<bool>,
    gpus_of: Vec<Vec<u32>>,
    /// A stage failed and `keep_going` is off: nothing more starts.
    stop: bool,
}

impl<'a> Books<'a> {
    fn new(nodes: &'a [Node<'a>], selected: &[bool], opts: &'a WalkOptions) -> Books<'a> {
        Books {
            nodes,
            opts,
            status: Status::initial(selected),
            started: vec![false; nodes.len()],
            running: 0,
            cpus_free: opts.cpus.max(1),
            gpu_taken: vec![false; opts.gpus as usize],
            gpus_of: vec![Vec::new(); nodes.len()],
            stop: false,
        }
    }

    fn cpu_need(&self, i: usize) -> u32 {
        self.nodes[i].cpus.clamp(1, self.opts.cpus.max(1))
    }

    /// Without GPU tokens, GPU requests are ignored (see [`WalkOptions::gpus`]).
    fn gpu_need(&self, i: usize) -> u32 {
        if self.opts.gpus == 0 {
            0
        } else {
            self.nodes[i].gpus
        }
    }

    fn gpus_free(&self) -> u32 {
        self.gpu_taken.iter().filter(|&&t| !t).count() as u32
    }

    fn interrupted(&self) -> bool {
        self.opts
            .interrupted
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Relaxed))
    }

    /// Settles the waiting stages that can no longer run: an upstream stage failed or was
    /// skipped, the run stopped or was interrupted, or the stage needs more GPUs than there are.
    fn skip_blocked(&mut self, sink: &dyn EventSink) {
        let nodes = self.nodes;
        for i in 0..nodes.len() {
            if self.status[i] != Status::Pending || self.started[i] {
                continue;
            }
            let trouble = upstream_trouble(nodes[i].deps, &self.status, |d| nodes[d].name);
            let stopped = (self.stop || self.interrupted()).then(|| {
                if self.interrupted() {
                    "the run was interrupted".to_owned()
                } else {
                    STOPPED.to_owned()
                }
            });
            if let Some(reason) = trouble.or(stopped) {
                sink.emit(Event::StageSkipped {
                    stage: nodes[i].name.to_owned(),
                    reason: reason.clone(),
                });
                self.status[i] = Status::Skipped(reason);
            } else if self.gpu_need(i) > self.opts.gpus {
                let error = format!(
                    "needs {} GPUs, this machine has {}",
                    nodes[i].gpus, self.opts.gpus
                );
                sink.emit(Event::StageFailed {
                    stage: nodes[i].name.to_owned(),
                    key: String::new(),
                    error: error.clone(),
                });
                self.status[i] = Status::Done(Outcome::Failed { error });
                self.stop = !self.opts.keep_going;
            }
        }
    }

    /// Hands the stages whose upstream stages are done to the workers, in plan order, while
    /// `jobs` and the CPU and GPU tokens allow.
    fn start_ready(&mut self, queue: &Sender<Started>) {
        for i in 0..self.nodes.len() {
            if self.running >= self.opts.jobs.max(1) {
                break;
            }
            let upstream_done = self.nodes[i].deps.iter().all(|&d| {
                matches!(
                    self.status[d],
                    Status::Done(Outcome::Cached { .. } | Outcome::Ran { .. })
                )
            });
            let ready = self.status[i] == Status::Pending
                && !self.started[i]
                && upstream_done
                && self.gpu_need(i) <= self.gpus_free()
                && self.cpu_need(i) <= self.cpus_free;
            if !ready {
                continue;
            }
            self.started[i] = true;
            self.running += 1;
            self.cpus_free -= self.cpu_need(i);
            let cards: Vec<u32> = (0..self.gpu_taken.len())
                .filter(|&g| !self.gpu_taken[g])
                .take(self.gpu_need(i) as usize)
                .map(|g| g as u32)
                .collect();
            for &g in &cards {
                self.gpu_taken[g as usize] = true;
            }
            self.gpus_of[i] = cards.clone();
            queue.send((i, cards)).expect("workers are alive");
        }
    }

    /// Records a stage's outcome and gives its tokens back.
    fn finish(&mut self, i: usize, outcome: Outcome) {
        self.running -= 1;
        self.cpus_free += self.cpu_need(i);
        for g in self.gpus_of[i].drain(..) {
            self.gpu_taken[g as usize] = false;
        }
        if matches!(outcome, Outcome::Failed { .. }) {
            self.stop = self.stop || !self.opts.keep_going;
        }
        self.status[i] = Status::Done(outcome);
    }
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
