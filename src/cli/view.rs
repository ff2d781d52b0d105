//! Showing a run to a person (live bars on a terminal, plain lines elsewhere) or to a script
//! (`--json`: the events of [`crate::exec::events`] as JSON lines on stdout).

use crate::exec::events::{Event, EventSink};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::{HashMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines of a stage's output kept to show when it fails.
const TAIL: usize = 20;

pub struct JsonLines;

impl EventSink for JsonLines {
    fn emit(&self, event: Event) {
        let mut out = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut out, &event);
        let _ = writeln!(out);
    }
}

pub struct Human {
    verbose: bool,
    state: Mutex<HumanState>,
}

struct HumanState {
    bars: Option<MultiProgress>,
    overall: Option<ProgressBar>,
    running: HashMap<String, (ProgressBar, Instant)>,
    tails: HashMap<String, VecDeque<String>>,
    last_plain_progress: HashMap<String, Instant>,
}

impl Human {
    pub fn new(verbose: bool) -> Human {
        let tty = std::io::stderr().is_terminal();
        let bars =
            tty.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8)));
        Human {
            verbose,
            state: Mutex::new(HumanState {
                bars,
                overall: None,
                running: HashMap::new(),
                tails: HashMap::new(),
                last_plain_progress: HashMap::new(),
            }),
        }
    }
}

fn say(st: &HumanState, line: String) {
    match &st.bars {
        Some(bars) => {
            let _ = bars.println(line);
        }
        None => eprintln!("{line}"),
    }
}

fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

impl EventSink for Human {
    fn emit(&self, event: Event) {
        let mut st = self.state.lock().expect("view lock");
        match event {
            Event::Plan {
                stages,
                cached,
                to_run,
            } => {
                say(
                    &st,
                    format!("{stages} stages: {cached} cached, {to_run} to run"),
                );
                if let Some(bars) = &st.bars {
                    let bar = bars.add(ProgressBar::new(stages as u64));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{bar:30.cyan/blue} {pos}/{len} stages  {elapsed_precise}",
                        )
                        .expect("template"),
                    );
                    st.overall = Some(bar);
                }
            }
            Event::StageCached {
                stage,
                key,
                saved_s,
            } => {
                if let Some(o) = &st.overall {
                    o.inc(1);
                }
                if self.verbose || st.bars.is_none() {
                    say(
                        &st,
                        format!("  cached   {stage} ({}, saved {saved_s:.1}s)", short(&key)),
                    );
                }
            }
            Event::StageSubmitted { stage, job } => {
                say(&st, format!("  submit   {stage} as Slurm job {job}"));
            }
            Event::StageQueue {
                stage,
                job,
                state,
                reason,
            } => {
                // RUNNING is shown by the stage's own start line.
                if state != "RUNNING" {
                    let why = if reason.is_empty() || reason == "None" {
                        String::new()
                    } else {
                        format!(" ({reason})")
                    };
                    say(&st, format!("  slurm    {stage}: job {job} {state}{why}"));
                }
            }
            Event::StageWaitLock { stage, .. } => {
                say(
                    &st,
                    format!("  waiting  {stage}: another pretext run is computing it"),
                );
            }
            Event::StageStart { stage, key } => match &st.bars {
                Some(bars) => {
                    let bar = bars.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template(
                            "  {spinner} {prefix:.bold} {wide_msg} {elapsed}",
                        )
                        .expect("template"),
                    );
                    bar.set_prefix(stage.clone());
                    bar.enable_steady_tick(Duration::from_millis(120));
                    st.running.insert(stage, (bar, Instant::now()));
                }
                None => eprintln!("  run      {stage} ({})", short(&key)),
            },
            Event::StageProgress {
                stage,
                done,
                total,
                message,
            } => {
                if let Some((bar, _)) = st.running.get(&stage) {
                    bar.set_message(format!("[{done}/{total}] {message}"));
                } else if st.bars.is_none() {
                    // One line every 10 s at most: Slurm logs stay readable.
                    let now = Instant::now();
                    let due = st
                        .last_plain_progress
                        .get(&stage)
                        .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(10));
                    if due || done == total {
                        st.last_plain_progress.insert(stage.clone(), now);
                        eprintln!("           {stage} [{done}/{total}] {message}");
                    }
                }
            }
            Event::StageLog { stage, line } => {
                if self.verbose {
                    say(&st, format!("  [{stage}] {line}"));
                } else if let Some((bar, _)) = st.running.get(&stage) {
                    bar.set_message(line.clone());
                }
                let tail = st.tails.entry(stage).or_default();
                if tail.len() == TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            Event::StageDone {
                stage, key, wall_s, ..
            } => {
                if let Some((bar, _)) = st.running.remove(&stage) {
                    bar.finish_and_clear();
                }
                if let Some(o) = &st.overall {
                    o.inc(1);
                }
                st.tails.remove(&stage);
                say(
                    &st,
                    format!("  done     {stage} ({}) in {wall_s:.1}s", short(&key)),
                );
            }
            Event::StageFailed { stage, key, error } => {
                if let Some((bar, _)) = st.running.remove(&stage) {
                    bar.finish_and_clear();
                }
                if let Some(o) = &st.overall {
                    o.inc(1);
                }
                let mut text = format!("  FAILED   {stage} ({}): {error}", short(&key));
                if let Some(tail) = st.tails.remove(&stage) {
                    if !self.verbose && !tail.is_empty() {
                        text.push_str("\n           last output:");
                        for l in tail {
                            text.push_str(&format!("\n           | {l}"));
                        }
                    }
                }
                say(&st, text);
            }
            Event::StageSkipped { stage, reason } => {
                if let Some(o) = &st.overall {
                    o.inc(1);
                }
                say(&st, format!("  skipped  {stage}: {reason}"));
            }
            Event::RunEnd {
                ran,
                cached,
                failed,
                skipped,
                wall_s,
            } => {
                if let Some(o) = st.overall.take() {
                    o.finish_and_clear();
                }
                say(&st, format!("{ran} ran, {cached} cached, {failed} failed, {skipped} skipped in {wall_s:.2}s"));
            }
        }
    }
}
