//! The loop over the batches: one optimizer step of every member per batch, with the logging,
//! the checkpoints and the stop on a signal that happen between steps.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use store::reader::Cursor;
use tch::Tensor;

use super::collectives::Collectives;
use super::{MemberRun, RunSettings, TrainError, TrainRequest, METRICS_FILE};
use crate::adam::clip_grad_norm;
use crate::checkpoint::{self, CheckpointState, Normalization, RngState};
use crate::loader::Loader;
use crate::metrics::{self, MetricsRow};
use crate::sae::{total_loss, ForwardOutput};
use crate::schedule::{warmed_up, LrSchedule};

/// How far the run has got: what the loop advances.
#[derive(Clone, Copy)]
pub(super) struct Progress {
    /// Steps completed.
    pub(super) step: u64,
    /// Tokens seen, over all ranks.
    pub(super) tokens: u64,
    /// The reader's position: the next batch to train on.
    pub(super) cursor: Cursor,
}

/// What the loop needs besides the SAEs and the data; the same for every step.
pub(super) struct Loop<'a> {
    pub(super) req: &'a TrainRequest,
    pub(super) settings: &'a RunSettings,
    pub(super) collectives: Collectives<'a>,
    pub(super) schedule: LrSchedule,
    /// Rank 0, which alone writes outputs.
    pub(super) leader: bool,
    pub(super) normalization: Normalization,
    pub(super) tokens_per_step: u64,
}

/// Where the loop ended: its progress and the loader's waiting time at the last logged step.
pub(super) struct LoopEnd {
    pub(super) at: Progress,
    pub(super) waited: Duration,
}

/// The previous logged step: when it was, the loader's waiting time then, and tokens by then.
struct LastLog {
    at: Instant,
    waited: Duration,
    tokens: u64,
}

impl Loop<'_> {
    /// Trains every member of `runs` from `at` to the run's last step or the data's end. A stop
    /// request (on any rank) checkpoints and returns [`TrainError::Interrupted`].
    pub(super) fn run(
        &self,
        runs: &mut [MemberRun],
        loader: &mut Loader,
        mut at: Progress,
    ) -> Result<LoopEnd, TrainError> {
        let (req, settings) = (self.req, self.settings);
        let total_steps = self.schedule.total_steps;
        let progress = progress_bar(req.progress && self.leader, total_steps * self.tokens_per_step, at.tokens);
        let mut last_log = LastLog { at: Instant::now(), waited: loader.waited, tokens: at.tokens };
        let ctx = StepContext { settings, collectives: self.collectives };
        while at.step < total_steps {
            // A signal may reach the ranks at different steps: they stop together, at the first
            // step where any of them has it.
            if self.collectives.any(req.stop.load(Ordering::SeqCst))? {
                self.checkpoint(runs, &at, loader)?;
                progress.abandon();
                return Err(TrainError::Interrupted { step: at.step });
            }
            let batch = match loader.next_batch()? {
                Some(batch) => batch,
                None => {
                    let tokens = at.tokens;
                    tracing::warn!("the dataset ended after {tokens} tokens, before --max-tokens; finishing early");
                    break;
                }
            };
            let lr = self.schedule.at(at.step);
            let step_tokens = batch.x.size()[0] as u64 * settings.world_size as u64;
            for run in runs.iter_mut() {
                train_step(run, &batch.x, at.step, lr, step_tokens, &ctx)?;
            }
            at.step += 1;
            at.tokens += step_tokens;
            at.cursor = batch.next;
            progress.set_position(at.tokens);

            if at.step.is_multiple_of(req.log_every.max(1)) || at.step == total_steps {
                self.log(runs, &at, lr, &mut last_log, loader, &progress)?;
            }
            if req.checkpoint_every > 0 && at.step.is_multiple_of(req.checkpoint_every) && at.step < total_steps {
                self.checkpoint(runs, &at, loader)?;
                if self.leader {
                    write_metrics(runs)?;
                }
            }
        }
        progress.finish_and_clear();
        Ok(LoopEnd { at, waited: last_log.waited })
    }

    /// Logs a row of metrics for every member, covering the steps since `last_log`.
    fn log(
        &self,
        runs: &mut [MemberRun],
        at: &Progress,
        lr: f64,
        last_log: &mut LastLog,
        loader: &Loader,
        progress: &indicatif::ProgressBar,
    ) -> Result<(), TrainError> {
        let wall = last_log.at.elapsed().as_secs_f64().max(1e-9);
        let wait_fraction = (loader.waited - last_log.waited).as_secs_f64() / wall;
        let tokens_per_s = (at.tokens - last_log.tokens) as f64 / wall;
        for run in runs.iter_mut() {
            self.collectives.mean_pending_metrics(run)?;
            log_row(run, at.step, at.tokens, lr, wait_fraction, tokens_per_s, self.normalization.variance);
        }
        if let Some(row) = runs.first().and_then(|r| r.rows.last()) {
            progress.set_message(format!(
                "fvu {:.3} · L0 {:.1} · dead {:.1}% · waiting {:.1}%",
                row.fvu,
                row.l0,
                100.0 * row.dead_fraction,
                100.0 * row.data_wait_fraction
            ));
        }
        *last_log = LastLog { at: Instant::now(), waited: loader.waited, tokens: at.tokens };
        Ok(())
    }

    /// Checkpoints every member at `at` (rank 0 writes).
    fn checkpoint(&self, runs: &mut [MemberRun], at: &Progress, loader: &Loader) -> Result<(), TrainError> {
        // Every rank's unlogged sums go into the checkpoint, each rank's own.
        let pending =
            runs.iter().map(|run| self.collectives.gather_pending_metrics(run)).collect::<Result<Vec<_>, _>>()?;
        if self.leader {
            let follow_shards = if self.settings.follow { loader.shard_order() } else { Vec::new() };
            let position = Position { at: *at, normalization: self.normalization, follow_shards };
            save_checkpoints(runs, &pending, self.settings, &position)?;
        }
        Ok(())
    }
}

struct StepContext<'a> {
    settings: &'a RunSettings,
    collectives: Collectives<'a>,
}

/// One optimizer step of one SAE on the scaled batch `x` [rows, d_in].
fn train_step(
    run: &mut MemberRun,
    x: &Tensor,
    step: u64,
    lr: f64,
    tokens: u64,
    ctx: &StepContext,
) -> Result<(), TrainError> {
    let arch = run.sae.config().arch.clone();
    let params = run.sae.parameters();
    for (_, p) in &params {
        let mut grad = p.grad();
        if grad.defined() {
            let _ = grad.zero_();
        }
    }
    let dead_mask = arch.uses_auxk().then(|| run.dead.mask());
    let out =
        run.sae.forward(x, dead_mask.as_ref()).map_err(|source| TrainError::Sae { name: run.name.clone(), source })?;
    let sparsity_coeff = warmed_up(arch.sparsity_coeff(), step, ctx.settings.sparsity_warmup_steps);
    let loss = total_loss(&out.mse, &out.sparsity, sparsity_coeff, &out.auxk, run.sae.config().auxk.coeff);
    loss.backward();
    ctx.collectives.mean_gradients(&params)?;
    if let Some(threshold) = run.sae.batchtopk_threshold_tensor() {
        // BatchTopK's threshold follows each rank's own batch; keep the ranks' copies equal.
        ctx.collectives.mean(&[&threshold])?;
    }
    if arch.unit_norm_decoder() {
        run.sae.project_decoder_grad();
    }
    if ctx.settings.grad_clip > 0.0 {
        let _ = clip_grad_norm(&params, ctx.settings.grad_clip);
    }
    run.adam.step(&params, lr);
    if arch.unit_norm_decoder() {
        run.sae.normalize_decoder();
    }
    let _guard = tch::no_grad_guard();
    let fired = ctx.collectives.any_fired(out.latents.ne(0.0).any_dim(0, false))?;
    run.dead.update(&fired, tokens);
    let logged = ForwardOutput { total: loss.detach(), ..out };
    run.acc.add(&logged);
    Ok(())
}

/// Appends the means of the steps accumulated since the last row to `run`'s metrics.
pub(super) fn log_row(
    run: &mut MemberRun,
    step: u64,
    tokens: u64,
    lr: f64,
    wait_fraction: f64,
    tokens_per_s: f64,
    variance: f64,
) {
    let Some(means) = run.acc.take() else { return };
    run.rows.push(MetricsRow {
        step,
        tokens,
        loss: means.loss,
        mse: means.mse,
        fvu: means.mse / variance,
        l0: means.l0,
        auxk: means.auxk,
        sparsity: means.sparsity,
        lr,
        dead_fraction: run.dead.fraction().double_value(&[]),
        data_wait_fraction: wait_fraction,
        tokens_per_s,
    });
}

/// Where a run stands: what a checkpoint records besides the members' own state.
struct Position {
    at: Progress,
    normalization: Normalization,
    follow_shards: Vec<String>,
}

/// `pending`: each run's unlogged metric sums of every rank (see `gather_pending_metrics`).
fn save_checkpoints(
    runs: &[MemberRun],
    pending: &[Option<Tensor>],
    settings: &RunSettings,
    position: &Position,
) -> Result<(), TrainError> {
    for (run, pending) in runs.iter().zip(pending) {
        let (_, pending_metric_steps) = run.acc.pending();
        let state = CheckpointState {
            format_version: checkpoint::FORMAT_VERSION,
            step: position.at.step,
            tokens: position.at.tokens,
            cursor: position.at.cursor,
            adam_steps: run.adam.steps,
            config: run.config_json.clone(),
            rng: RngState::from_seed(settings.seed),
            metrics: run.rows.clone(),
            pending_metric_steps,
            normalization: Some(position.normalization),
            follow_shards: position.follow_shards.clone(),
        };
        checkpoint::save(
            &run.dir,
            &state,
            &run.sae.state_tensors(),
            &run.adam.state(),
            run.dead.counters(),
            pending.as_ref(),
        )?;
    }
    Ok(())
}

fn write_metrics(runs: &[MemberRun]) -> Result<(), TrainError> {
    for run in runs {
        run.dir.put(METRICS_FILE, metrics::to_jsonl(&run.rows))?;
    }
    Ok(())
}

fn progress_bar(show: bool, total_tokens: u64, done: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total_tokens).with_position(done);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "train {bar:30} {human_pos}/{human_len} tokens · {per_sec} · ETA {eta} · {msg}",
        )
        .expect("progress template"),
    );
    bar
}
