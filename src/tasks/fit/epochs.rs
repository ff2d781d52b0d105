//! The one epoch loop of the training kinds (`mae`, `proxy`, `finetune`): each gives its batches,
//! the loss of a batch and its end-of-epoch work; the loop does the rest, the same way for all.

use super::checkpoint;
use super::{scalar, Optim};
use crate::data::loader::Batch;
use crate::nn::params::ParamStore;
use crate::rng::Rng;
use crate::stage::StageCtx;
use crate::train::optim::clip_grad_norm;
use crate::train::schedule::WarmupCosine;
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{de::DeserializeOwned, Serialize};

/// What a training kind gives the one epoch loop ([`run_epochs`]): its batches, the loss of a
/// batch, and its end-of-epoch work. Everything else (the schedule, backward, gradient clipping,
/// the optimiser, progress, the NaN guard, cancellation, checkpoints and resuming) is the loop's.
pub trait Step {
    /// What the stage remembers per epoch; saved with each checkpoint and restored on resume.
    type History: Default + Serialize + DeserializeOwned;
    fn batches(&self, epoch: usize) -> crate::data::loader::Batches;
    /// The loss of one batch; `rng` is the epoch's stream for DropPath and masks.
    fn loss(&mut self, batch: &Batch, epoch: usize, step: usize, rng: &mut Rng) -> Result<Tensor>;
    /// After an epoch's steps: validation, history, the log line.
    fn end_epoch(
        &mut self,
        epoch: usize,
        done: &EpochDone,
        history: &mut Self::History,
        ctx: &StageCtx,
    ) -> Result<()>;
    /// What the live progress line shows after the loss, from the epochs done so far (a
    /// fine-tune's validation accuracy); empty by default.
    fn progress_note(_history: &Self::History) -> String {
        String::new()
    }
}

/// How the loop runs: epochs, steps, the schedule, clipping, and the stream the per-step draws
/// come from (each kind keeps its own, so results do not depend on the loop's code).
pub struct Schedule {
    pub epochs: usize,
    pub steps_per_epoch: usize,
    pub lr: WarmupCosine,
    pub clip_grad: Option<f64>,
    pub seed: u64,
    pub stream: u64,
}

/// An epoch as the loop saw it.
pub struct EpochDone {
    pub mean_loss: f64,
    pub images: usize,
    /// The lr of the epoch's last step.
    pub last_lr: f64,
}

/// The one epoch loop of every training kind: resumes from the stage's checkpoint, runs the
/// remaining epochs, checkpoints after each.
pub fn run_epochs<S: Step>(
    kind: &mut S,
    plan: &Schedule,
    params: &ParamStore,
    opt: &mut Optim,
    ctx: &StageCtx,
) -> Result<S::History> {
    let (start, mut history) = match checkpoint::resume::<S::History>(ctx, params, opt)? {
        Some((done, h)) => {
            ctx.log(&format!("resuming after epoch {done} from the checkpoint"));
            (done, h)
        }
        None => (0, S::History::default()),
    };
    let steps = plan.steps_per_epoch;
    for epoch in start..plan.epochs {
        let mut epoch_loss = EpochLoss::new(epoch, plan.epochs, steps);
        epoch_loss.note = S::progress_note(&history);
        let mut rng = Rng::stream(plan.seed, epoch as u64, plan.stream);
        let mut lr = 0.0;
        for (step, b) in kind.batches(epoch).enumerate() {
            check_cancelled(ctx, epoch)?;
            let loss = kind.loss(&b, epoch, step, &mut rng)?;
            let value = finite(scalar(&loss)?, epoch, step, &b.x, params)?;
            let mut grads = loss.backward()?;
            if let Some(max) = plan.clip_grad {
                clip_grad_norm(&mut grads, opt.vars().iter(), max)?;
            }
            lr = plan.lr.lr(epoch as f64 + step as f64 / steps as f64);
            opt.step(&grads, lr)?;
            epoch_loss.add(ctx, step, value, b.n);
        }
        let done = EpochDone {
            mean_loss: epoch_loss.mean(),
            images: epoch_loss.images(),
            last_lr: lr,
        };
        kind.end_epoch(epoch, &done, &mut history, ctx)?;
        checkpoint::save(&ctx.checkpoint_dir, params, opt, &history, epoch + 1)?;
    }
    Ok(history)
}

/// An epoch's training loss, averaged over images as batches come, and shown as the stage's
/// progress (`epoch 3/20 loss 0.8123`): one place for what every training kind reports.
struct EpochLoss {
    epoch: usize,
    epochs: usize,
    steps: usize,
    sum: f64,
    images: usize,
    /// Shown after the loss: the kind's word on the epochs before this one.
    note: String,
}

impl EpochLoss {
    /// `epoch` counts from 0; `steps` is the number of batches in an epoch.
    pub fn new(epoch: usize, epochs: usize, steps: usize) -> EpochLoss {
        EpochLoss {
            epoch,
            epochs,
            steps,
            sum: 0.0,
            images: 0,
            note: String::new(),
        }
    }

    /// Adds batch `step`'s mean loss over its `n` images and reports progress.
    pub fn add(&mut self, ctx: &StageCtx, step: usize, loss: f64, n: usize) {
        self.sum += loss * n as f64;
        self.images += n;
        ctx.report(
            (self.epoch * self.steps + step + 1) as u64,
            (self.epochs * self.steps) as u64,
            format!(
                "epoch {}/{} loss {:.4}{}",
                self.epoch + 1,
                self.epochs,
                self.sum / self.images as f64,
                self.note
            ),
        );
    }

    pub fn images(&self) -> usize {
        self.images
    }

    /// The epoch's mean loss (0 for an epoch without images).
    pub fn mean(&self) -> f64 {
        self.sum / self.images.max(1) as f64
    }
}

/// Ends a training stage that was cancelled (SIGINT / SIGTERM to pretext): at a step boundary,
/// keeping the checkpoint of the last whole epoch, which the next attempt resumes from.
fn check_cancelled(ctx: &StageCtx, epoch: usize) -> Result<()> {
    if ctx.cancelled() {
        bail!(
            "interrupted during epoch {}; the checkpoint after epoch {epoch} is kept and the next run resumes from it",
            epoch + 1
        );
    }
    Ok(())
}

/// Stops training on a non-finite loss, naming where and the likely cause: pixels that are not
/// numbers, weights that are not (an `init` checkpoint holding NaN), or else the step size.
fn finite(loss: f64, epoch: usize, step: usize, batch: &[f32], params: &ParamStore) -> Result<f64> {
    if loss.is_finite() {
        return Ok(loss);
    }
    let at = format!("the loss became {loss} at epoch {}, step {step}", epoch + 1);
    if batch.iter().any(|v| !v.is_finite()) {
        bail!("{at}: the batch holds pixels that are not numbers (an image with no contrast normalised by a standard deviation of 0?)");
    }
    let bad: Vec<String> = params
        .named()
        .into_iter()
        .filter(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .and_then(|t| t.to_dtype(candle_core::DType::F32))
                .and_then(|t| t.to_vec1::<f32>())
                .is_ok_and(|v| v.iter().any(|x| !x.is_finite()))
        })
        .map(|(n, _)| n)
        .take(5)
        .collect();
    if !bad.is_empty() {
        bail!("{at}: weights are not finite ({}); if this stage starts from an `init` checkpoint, check it", bad.join(", "));
    }
    bail!("{at}: lower the learning rate (`lr`, `blr`) or set `clip_grad`")
}
