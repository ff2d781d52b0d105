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
    running: HashMap<String, ProgressBar>,
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
            } => st.plan(stages, cached, to_run),
            Event::StageCached {
                stage,
                key,
                saved_s,
            } => {
                st.tick_overall();
                if self.verbose || st.bars.is_none() {
                    let line = format!("  cached   {stage} ({}, saved {saved_s:.1}s)", short(&key));
                    say(&st, line);
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
            } => st.queue(&stage, &job, &state, &reason),
            Event::StageWaitLock { stage, .. } => {
                let line = format!("  waiting  {stage}: another pretext run is computing it");
                say(&st, line);
            }
            Event::StageStart { stage, key } => st.start(stage, &key),
            Event::StageProgress {
                stage,
                done,
                total,
                message,
            } => st.progress(stage, done, total, &message),
            Event::StageLog { stage, line } => st.log(stage, line, self.verbose),
            Event::StageDone {
                stage, key, wall_s, ..
            } => {
                st.finish(&stage);
                st.tails.remove(&stage);
                say(
                    &st,
                    format!("  done     {stage} ({}) in {wall_s:.1}s", short(&key)),
                );
            }
            Event::StageFailed { stage, key, error } => {
                st.finish(&stage);
                let mut text = format!("  FAILED   {stage} ({}): {error}", short(&key));
                let tail = st.tails.remove(&stage).unwrap_or_default();
                if !self.verbose && !tail.is_empty() {
                    text.push_str("\n           last output:");
                    for l in tail {
                        text.push_str(&format!("\n           | {l}"));
                    }
                }
                say(&st, text);
            }
            Event::StageSkipped { stage, reason } => {
                st.tick_overall();
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
                let line = format!(
                    "{ran} ran, {cached} cached, {failed} failed, {skipped} skipped in {wall_s:.2}s"
                );
                say(&st, line);
            }
        }
    }
}

impl HumanState {
    fn plan(&mut self, stages: usize, cached: usize, to_run: usize) {
        say(
            self,
            format!("{stages} stages: {cached} cached, {to_run} to run"),
        );
        if let Some(bars) = &self.bars {
            let bar = bars.add(ProgressBar::new(stages as u64));
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} stages  {elapsed_precise}",
                )
                .expect("template"),
            );
            // The clock moves while a long stage runs, not only when one ends.
            bar.enable_steady_tick(Duration::from_secs(1));
            self.overall = Some(bar);
        }
    }

    fn tick_overall(&self) {
        if let Some(o) = &self.overall {
            o.inc(1);
        }
    }

    fn queue(&self, stage: &str, job: &str, state: &str, reason: &str) {
        // RUNNING is shown by the stage's own start line.
        if state != "RUNNING" {
            let why = if reason.is_empty() || reason == "None" {
                String::new()
            } else {
                format!(" ({reason})")
            };
            say(self, format!("  slurm    {stage}: job {job} {state}{why}"));
        }
    }

    fn start(&mut self, stage: String, key: &str) {
        match &self.bars {
            Some(bars) => {
                let bar = bars.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("  {spinner} {prefix:.bold} {wide_msg} {elapsed}")
                        .expect("template"),
                );
                bar.set_prefix(stage.clone());
                bar.enable_steady_tick(Duration::from_millis(120));
                self.running.insert(stage, bar);
            }
            None => eprintln!("  run      {stage} ({})", short(key)),
        }
    }

    /// On a terminal the stage's spinner becomes a bar with an ETA once it knows its steps;
    /// elsewhere one line every 10 s at most, so that Slurm logs stay readable.
    fn progress(&mut self, stage: String, done: u64, total: u64, message: &str) {
        if let Some(bar) = self.running.get(&stage) {
            if total > 0 && bar.length() != Some(total) {
                bar.set_length(total);
                bar.set_style(
                    ProgressStyle::with_template(
                        "  {prefix:.bold} {bar:20.cyan/blue} {pos}/{len} {wide_msg} {elapsed}<{eta}",
                    )
                    .expect("template"),
                );
            }
            bar.set_position(done);
            bar.set_message(message.to_owned());
        } else if self.bars.is_none() {
            let now = Instant::now();
            let due = self
                .last_plain_progress
                .get(&stage)
                .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(10));
            if due || done == total {
                eprintln!("           {stage} [{done}/{total}] {message}");
                self.last_plain_progress.insert(stage, now);
            }
        }
    }

    fn log(&mut self, stage: String, line: String, verbose: bool) {
        if verbose || line.starts_with("warning:") || line.starts_with("note:") {
            say(self, format!("  [{stage}] {line}"));
        }
        let tail = self.tails.entry(stage).or_default();
        if tail.len() == TAIL {
            tail.pop_front();
        }
        tail.push_back(line);
    }

    fn finish(&mut self, stage: &str) {
        if let Some(bar) = self.running.remove(stage) {
            bar.finish_and_clear();
        }
        self.tick_overall();
    }
}
