//! The training loop: one pass over a stream of batches trains every SAE of a sweep on the same
//! batches, with checkpoints that resume bit for bit.
//!
//! Each idea has one home: the SAE and its losses in [`crate::sae`], the optimizer in
//! [`crate::adam`], schedules in [`crate::schedule`], dead latents in [`crate::dead`], the data
//! in [`crate::loader`], checkpoints in [`crate::checkpoint`], the SAELens export in
//! [`crate::export`]. This module wires them together and owns the output folder's layout:
//!
//! ```text
//! <out>/cfg.json, sae_weights.safetensors   the finished SAE (SAELens layout)
//! <out>/metrics.jsonl                        one line per logged step
//! <out>/training_curves.png                  loss, L0 and FVU against tokens
//! <out>/result.json                          written last: the run is finished
//! <out>/checkpoints/step-<n>.safetensors     the newest checkpoints
//! ```
//!
//! A sweep puts one such folder per SAE under `<out>/<name>/`.

mod collectives;
mod data;
mod error;
mod resume;
mod steps;
mod summary;
#[cfg(test)]
mod tests;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use store::reader::{Cursor, Reader};
use store::{ObjectDir, StoreOptions};
use tch::{Device, Kind, Tensor};

use crate::adam::Adam;
use crate::checkpoint::{self, Normalization};
use crate::dead::DeadLatents;
use crate::dist::ProcessGroup;
use crate::loader::{Loader, Preparation};
use crate::metrics::{MetricsRow, StepAccumulator};
use crate::sae::{self, Architecture, AuxK, Sae, SaeConfig, DEFAULT_AUXK_COEFF};
use crate::schedule::LrSchedule;
use collectives::Collectives;
use data::DataStats;
pub use error::TrainError;
use steps::{Loop, Progress};
use summary::RunTotals;

/// Written last in an SAE's folder: the run is finished.
pub const RESULT_FILE: &str = "result.json";
/// One line per logged step.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Loss, L0 and FVU against tokens.
pub const CURVES_FILE: &str = "training_curves.png";

/// The settings shared by every SAE of a run. Together with the dataset id and the SAE's own
/// [`SaeConfig`] they are the run's *configuration*: a checkpoint resumes only a run with an
/// equal one. Device, logging, checkpoint frequency and output flags are deliberately not here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    pub hook: String,
    /// Training tokens over all ranks.
    pub max_tokens: u64,
    /// Rows per step on each rank.
    pub batch_size: usize,
    pub world_size: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    /// The learning rate decays linearly to zero over this last fraction of the steps.
    pub lr_decay_fraction: f64,
    /// ReLU's L1 and JumpReLU's L0 coefficients ramp up from zero over these steps.
    pub sparsity_warmup_steps: u64,
    /// Gradients are clipped to this global L2 norm (0: no clipping).
    pub grad_clip: f64,
    pub adam_betas: (f64, f64),
    pub adam_eps: f64,
    /// Seeds the weights' initialization and the data order.
    pub seed: u64,
    /// A latent is dead after this many tokens without firing (capped at the run's length).
    pub dead_window: u64,
    /// Read a dataset that capture is still writing.
    pub follow: bool,
    /// Shuffle the data (off only to pin the data order, e.g. to compare a data-parallel run
    /// with one process on the concatenated batches).
    #[serde(default = "default_true")]
    pub shuffle: bool,
    /// Rows are shuffled within windows of this many consecutive row groups of each rank's share
    /// of an epoch (as many as the dataset has: the whole epoch at once). Runs from before the
    /// setting used the reader's default window.
    #[serde(default = "default_shuffle_window")]
    pub shuffle_window: usize,
    /// Run the SAE's large matrix products in bf16 (f32 master weights). Meant for GPUs; it
    /// changes the numerics, so it is part of the configuration.
    #[serde(default)]
    pub bf16_autocast: bool,
    /// Leave out of training the rows whose norm exceeds this multiple of their batch's median
    /// (each rank's share of it in a data-parallel run; None: train on every row). Absent from the configuration when off, so runs from before
    /// the flag resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_norm_multiple: Option<f64>,
    /// How a fresh TopK or BatchTopK SAE's decoder starts (ReLU and JumpReLU always start at
    /// random directions). Runs from before the setting started at random directions.
    #[serde(default = "random_directions")]
    pub decoder_init: DecoderInit,
}

/// How a fresh SAE's decoder rows start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecoderInit {
    /// Random unit directions, W_enc = W_decᵀ (OpenAI's and sparsify's start).
    Random,
    /// Directions of distinct dataset rows, read before the first step (see
    /// [`Sae::init_from_rows`]).
    Data,
}

fn random_directions() -> DecoderInit {
    DecoderInit::Random
}

impl std::str::FromStr for DecoderInit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(DecoderInit::Random),
            "data" => Ok(DecoderInit::Data),
            _ => Err(format!("`{s}` is not a decoder initialization (data or random)")),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_shuffle_window() -> usize {
    store::reader::DEFAULT_WINDOW_ROW_GROUPS
}

/// One SAE of a run: where it goes and what it is.
#[derive(Clone, Debug)]
pub struct Member {
    /// Sub-folder of the output (empty: the output's root).
    pub name: String,
    pub d_sae: usize,
    pub arch: Architecture,
    /// AuxK's k (None: d_in / 2) and coefficient.
    pub k_aux: Option<usize>,
    pub auxk_coeff: f64,
}

impl Member {
    /// The folder name of a sweep member, e.g. `topk-l4608-k32`.
    pub fn sweep_name(d_sae: usize, arch: &Architecture) -> String {
        match arch {
            Architecture::TopK { k } | Architecture::BatchTopK { k } => format!("{}-l{d_sae}-k{k}", arch.name()),
            Architecture::Relu { l1 } => format!("relu-l{d_sae}-l1_{l1}"),
            Architecture::JumpRelu { l0_coeff, .. } => format!("jumprelu-l{d_sae}-l0_{l0_coeff}"),
        }
    }

    fn config(&self, d_in: usize) -> SaeConfig {
        SaeConfig {
            d_in,
            d_sae: self.d_sae,
            arch: self.arch.clone(),
            auxk: AuxK { k_aux: self.k_aux.unwrap_or((d_in / 2).max(1)), coeff: self.auxk_coeff },
        }
    }
}

impl Default for Member {
    fn default() -> Self {
        Member {
            name: String::new(),
            d_sae: 0,
            arch: Architecture::TopK { k: 32 },
            k_aux: None,
            auxk_coeff: DEFAULT_AUXK_COEFF,
        }
    }
}

/// Everything a training run needs.
pub struct TrainRequest {
    pub data_url: String,
    pub out_url: String,
    /// `None`: the dataset's only hook.
    pub hook: Option<String>,
    pub settings: RunSettings,
    pub members: Vec<Member>,
    pub device: Device,
    pub store: StoreOptions,
    /// The data-parallel process group, when there are several ranks. Every rank runs `train`
    /// with the same request; rank 0 alone writes outputs. `settings.world_size` must match.
    pub group: Option<ProcessGroup>,
    /// Write a checkpoint every this many steps (0: only when stopped by a signal).
    pub checkpoint_every: u64,
    /// Log metrics every this many steps (the last step is always logged).
    pub log_every: u64,
    /// Set (by a signal handler) to checkpoint and stop at the next step.
    pub stop: Arc<AtomicBool>,
    pub progress: bool,
}

/// What a finished run reports, also stored in `result.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub name: String,
    pub out_url: String,
    pub architecture: String,
    pub d_in: usize,
    pub d_sae: usize,
    pub steps: u64,
    pub tokens: u64,
    pub world_size: usize,
    /// Means over the last logged interval.
    pub mse: f64,
    pub fvu: f64,
    pub l0: f64,
    pub dead_fraction: f64,
    /// Share of the whole run's wall time spent waiting for data (of this process's last
    /// session, when resumed).
    pub data_wait_fraction: f64,
    pub tokens_per_s: f64,
    /// Set when this call found the run already finished and trained nothing.
    #[serde(default)]
    pub already_finished: bool,
    /// The step this call resumed from, if it resumed.
    #[serde(default)]
    pub resumed_from_step: Option<u64>,
}

/// The state of one SAE being trained.
struct MemberRun {
    name: String,
    dir: ObjectDir,
    config_json: serde_json::Value,
    sae: Sae,
    adam: Adam,
    dead: DeadLatents,
    acc: StepAccumulator,
    rows: Vec<MetricsRow>,
}

/// The checks of a request that need no data: at least one SAE, a batch, the group's world.
fn check_request(req: &TrainRequest) -> Result<(), TrainError> {
    let s = &req.settings;
    if req.members.is_empty() {
        return Err(TrainError::NoMembers);
    }
    if s.batch_size == 0 {
        return Err(TrainError::ZeroBatchSize);
    }
    if s.shuffle_window == 0 {
        return Err(TrainError::ZeroShuffleWindow);
    }
    if let Some(multiple) = s.max_norm_multiple.filter(|m| m.is_nan() || *m < 1.0) {
        return Err(TrainError::MaxNormMultipleBelowOne(multiple));
    }
    let group_size = req.group.as_ref().map_or(1, |g| g.world_size());
    if s.world_size != group_size {
        return Err(TrainError::WorldMismatch { configured: s.world_size, group: group_size });
    }
    Ok(())
}

/// Trains every member of `req` (or reports them again when already finished). The order of
/// the steps below is part of the bit-exact results: every SAE is seeded as it is built, and
/// data, checkpoints and outputs are read and written in this order.
pub fn train(req: &TrainRequest) -> Result<Vec<TrainSummary>, TrainError> {
    check_request(req)?;
    let rank = req.group.as_ref().map_or(0, |g| g.rank());
    let leader = rank == 0;
    let collectives = Collectives { group: req.group.as_ref(), device: req.device };
    let stats = data::data_stats(req)?;
    let settings = RunSettings { hook: stats.hook.name.clone(), ..req.settings.clone() };
    let tokens_per_step = (settings.batch_size * settings.world_size) as u64;
    let total_steps = settings.max_tokens.div_ceil(tokens_per_step);
    if total_steps == 0 {
        return Err(TrainError::ZeroMaxTokens);
    }
    let dead_window = settings.dead_window.min(total_steps * tokens_per_step).max(1);

    let (finished, plans) = resume::split_finished(resume::plan_members(req, &stats, &settings)?);
    if plans.is_empty() {
        return Ok(finished); // every member is finished: report again, train nothing
    }
    // Resume from the newest step that every unfinished member has an intact checkpoint of.
    let start = resume::start_point(&plans, &collectives)?;
    // A resumed run normalizes as it did when it started (follow mode's statistics grow).
    let resumed_state = start.saved.first().and_then(|c| c.as_ref()).map(|c| c.state.clone());
    let normalization = resumed_state
        .as_ref()
        .and_then(|s| s.normalization)
        .unwrap_or(Normalization { scale: stats.scale, variance: stats.variance });
    let stats = DataStats { scale: normalization.scale, variance: normalization.variance, ..stats };

    let mean = Tensor::from_slice(&stats.hook.mean).to_kind(Kind::Float) * stats.scale;
    let init_rows = match widest_fresh_from_data(&settings, &plans, &start.saved) {
        Some(widest) => Some(data::init_rows(req, &settings, &stats, sae::rows_to_read(widest))?),
        None => None,
    };
    let setup = resume::MemberSetup {
        req,
        settings: &settings,
        mean: &mean,
        init_rows: init_rows.as_ref(),
        dead_window,
        start_step: start.step,
        collectives,
    };
    let mut runs = Vec::new();
    let mut at = Progress { step: start.step, tokens: 0, cursor: Cursor::default() };
    for (plan, saved) in plans.into_iter().zip(start.saved) {
        if let Some(saved) = &saved {
            at.cursor = saved.state.cursor;
            at.tokens = saved.state.tokens;
        }
        runs.push(resume::restore_member(plan, saved, &setup)?);
    }

    let replay = resumed_state.map(|s| s.follow_shards).unwrap_or_default();
    let reader = Reader::open(&req.data_url, data::reader_options(req, &settings, &stats, rank, at.cursor, replay))?;
    let prep = Preparation { scale: stats.scale, max_norm_multiple: settings.max_norm_multiple };
    let mut loader = Loader::start(reader, prep, req.device, 4);
    let schedule = LrSchedule {
        lr: settings.lr,
        warmup_steps: settings.warmup_steps,
        decay_fraction: settings.lr_decay_fraction,
        total_steps,
    };
    let session_start = Instant::now();
    let steps = Loop { req, settings: &settings, collectives, schedule, leader, normalization, tokens_per_step };
    let end = steps.run(&mut runs, &mut loader, at)?;
    drop(loader);

    let session_seconds = session_start.elapsed().as_secs_f64();
    let waited_fraction = if session_seconds > 0.0 { end.waited.as_secs_f64() / session_seconds } else { 0.0 };
    let totals = RunTotals {
        steps: end.at.step,
        tokens: end.at.tokens,
        data_wait_fraction: waited_fraction,
        start_step: start.step,
        session_seconds,
    };
    let mut summaries = Vec::new();
    for run in runs.iter_mut() {
        // A run stopped early by the data logs its last partial interval here.
        if run.rows.last().map(|r| r.step) != Some(end.at.step) {
            collectives.mean_pending_metrics(run)?;
            let lr = steps.schedule.at(end.at.step.saturating_sub(1));
            steps::log_row(run, end.at.step, end.at.tokens, lr, waited_fraction, 0.0, stats.variance);
        }
        summaries.push(summary::finish(run, &stats, &settings, &totals, leader)?);
    }
    summaries.extend(finished);
    Ok(summaries)
}

/// The widest of the members that start fresh from data rows, if any does.
fn widest_fresh_from_data(
    settings: &RunSettings,
    plans: &[resume::Planned],
    saved: &[Option<checkpoint::Checkpoint>],
) -> Option<usize> {
    if settings.decoder_init != DecoderInit::Data {
        return None;
    }
    let fresh = plans.iter().zip(saved).filter(|(plan, saved)| saved.is_none() && plan.config.arch.starts_from_data());
    fresh.map(|(plan, _)| plan.config.d_sae).max()
}

fn display_name(name: &str) -> String {
    if name.is_empty() {
        "sae".to_string()
    } else {
        name.to_string()
    }
}
