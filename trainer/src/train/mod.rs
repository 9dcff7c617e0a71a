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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use store::reader::{Cursor, FollowOptions, OutputDtype, Reader, ReaderOptions};
use store::{HookSummary, Manifest, ObjectDir, StoreOptions};
use tch::{Device, Kind, Tensor};

use crate::adam::{clip_grad_norm, Adam};
use crate::checkpoint::{self, Checkpoint, CheckpointError, CheckpointState, Normalization, RngState};
use crate::dead::DeadLatents;
use crate::dist::{DistError, ProcessGroup};
use crate::export::{self, ExportInfo};
use crate::loader::{Loader, LoaderError};
use crate::metrics::{self, MetricsRow, StepAccumulator};
use crate::sae::{Architecture, AuxK, Sae, SaeConfig, SaeError, DEFAULT_AUXK_COEFF};
use crate::schedule::{warmed_up, LrSchedule};

pub const RESULT_FILE: &str = "result.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
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
    /// Run the SAE's large matrix products in bf16 (f32 master weights). Meant for GPUs; it
    /// changes the numerics, so it is part of the configuration.
    #[serde(default)]
    pub bf16_autocast: bool,
}

fn default_true() -> bool {
    true
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

#[derive(Serialize, Deserialize)]
struct ResultFile {
    config: serde_json::Value,
    summary: TrainSummary,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("SAE `{name}`: {source}")]
    Sae { name: String, source: SaeError },
    #[error("{0}")]
    Invalid(String),
    #[error("interrupted at step {step}; a checkpoint was saved: run the same command again to resume")]
    Interrupted { step: u64 },
    #[error(transparent)]
    Dist(#[from] DistError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
}

fn invalid(msg: impl Into<String>) -> TrainError {
    TrainError::Invalid(msg.into())
}

/// The statistics of the trained hook, and what follows from them.
struct DataStats {
    hook: HookSummary,
    manifest: Manifest,
    /// Inputs are multiplied by this so that E‖x‖² = d_in.
    scale: f64,
    /// Per-feature variance of the scaled inputs: the FVU's denominator.
    variance: f64,
}

fn data_stats(req: &TrainRequest) -> Result<DataStats, TrainError> {
    let url = &req.data_url;
    let deadline = Instant::now() + Duration::from_secs(600);
    let (manifest, is_final) = loop {
        let (manifest, is_final) = store::load_manifest(url, &req.store)?;
        if is_final || !req.settings.follow || manifest.tokens > 0 || Instant::now() > deadline {
            break (manifest, is_final);
        }
        tracing::info!("waiting for the first shard of {url}");
        std::thread::sleep(Duration::from_secs(2));
    };
    if !is_final && !req.settings.follow {
        return Err(invalid(format!(
            "dataset `{url}` is not final (no manifest.json): finish it with `sae dataset finalize`, or train on it while it is written with --follow"
        )));
    }
    let hook = match &req.hook {
        Some(name) => manifest.hook(name).cloned().ok_or_else(|| {
            let have: Vec<String> = manifest.hooks.iter().map(|h| h.name.clone()).collect();
            invalid(format!("dataset `{url}` has no hook `{name}`; it has: {}", have.join(", ")))
        })?,
        None => match manifest.hooks.as_slice() {
            [only] => only.clone(),
            hooks => {
                let have: Vec<String> = hooks.iter().map(|h| h.name.clone()).collect();
                return Err(invalid(format!(
                    "dataset `{url}` holds several hooks ({}); choose one with --hook",
                    have.join(", ")
                )));
            }
        },
    };
    if manifest.tokens == 0 {
        return Err(invalid(format!("dataset `{url}` holds no tokens")));
    }
    let d = hook.d_model as f64;
    let mean_norm_sq: f64 = hook.mean.iter().map(|m| m * m).sum();
    if !(hook.mean_sq_norm.is_finite() && hook.mean_sq_norm > 0.0) {
        return Err(invalid(format!(
            "dataset `{url}`: hook `{}` has mean squared norm {}, cannot normalize",
            hook.name, hook.mean_sq_norm
        )));
    }
    let scale = (d / hook.mean_sq_norm).sqrt();
    let variance = ((hook.mean_sq_norm - mean_norm_sq) * scale * scale / d).max(f64::MIN_POSITIVE);
    Ok(DataStats { hook, manifest, scale, variance })
}

/// A member of the run and what its output folder holds.
struct Planned<'a> {
    member: &'a Member,
    config: SaeConfig,
    dir: ObjectDir,
    json: serde_json::Value,
    found: Found,
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

enum Found {
    Fresh,
    Finished(TrainSummary),
    Checkpoints(Vec<u64>),
}

fn config_json(dataset_id: &str, settings: &RunSettings, sae: &SaeConfig) -> serde_json::Value {
    serde_json::json!({ "dataset_id": dataset_id, "settings": settings, "sae": sae })
}

/// What `dir` holds for a run of `config`; any run of another configuration is an error.
fn inspect_output(dir: &ObjectDir, config: &serde_json::Value) -> Result<Found, TrainError> {
    let differs = |what: &str, theirs: &serde_json::Value| {
        invalid(format!(
            "`{}` holds a {what} of another configuration (differences: {}); use another --out, or the same settings to resume",
            dir.url(),
            differences(theirs, config).join("; ")
        ))
    };
    if let Some(bytes) = dir.get(RESULT_FILE)? {
        let result: ResultFile = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(format!("`{}` is damaged: {e}", dir.display(RESULT_FILE))))?;
        if &result.config != config {
            return Err(differs("finished run", &result.config));
        }
        return Ok(Found::Finished(result.summary));
    }
    let steps = checkpoint::list_steps(dir)?;
    if steps.is_empty() {
        return Ok(Found::Fresh);
    }
    // The newest checkpoint whose state can be read decides; damaged ones are skipped here and
    // reported when the run picks the checkpoint to resume from.
    for &step in steps.iter().rev() {
        match checkpoint::load_state(dir, step) {
            Ok(state) if &state.config != config => return Err(differs("checkpoint", &state.config)),
            Ok(_) => return Ok(Found::Checkpoints(steps)),
            Err(e) if e.is_damage() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Found::Checkpoints(steps))
}

/// The newest step that every member has an intact checkpoint of, with those checkpoints. A
/// damaged checkpoint is reported and the previous step is tried; when a step exists but none
/// is intact, the run refuses rather than start afresh over them.
fn newest_intact(plans: &[Planned]) -> Result<Option<(u64, Vec<Checkpoint>)>, TrainError> {
    let mut common: Option<Vec<u64>> = None;
    for plan in plans {
        let steps = match &plan.found {
            Found::Checkpoints(steps) => steps.clone(),
            _ => vec![],
        };
        common = Some(match common {
            None => steps,
            Some(c) => c.into_iter().filter(|x| steps.contains(x)).collect(),
        });
    }
    let common = common.unwrap_or_default();
    let mut damage = Vec::new();
    'steps: for &step in common.iter().rev() {
        let mut loaded = Vec::new();
        for plan in plans {
            match checkpoint::load(&plan.dir, step) {
                Ok(c) => loaded.push(c),
                Err(e) if e.is_damage() => {
                    tracing::warn!("{e}; falling back to the previous checkpoint");
                    damage.push(e.to_string());
                    continue 'steps;
                }
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(Some((step, loaded)));
    }
    if !damage.is_empty() {
        return Err(invalid(format!(
            "no intact checkpoint to resume from ({}); remove the checkpoints to start afresh",
            damage.join("; ")
        )));
    }
    Ok(None)
}

/// `path: ours vs theirs` for every leaf that differs between two JSON values.
fn differences(theirs: &serde_json::Value, ours: &serde_json::Value) -> Vec<String> {
    fn walk(path: String, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let null = serde_json::Value::Null;
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    walk(p, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), out);
                }
            }
            _ if a != b => out.push(format!("{path}: there {a}, here {b}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(String::new(), theirs, ours, &mut out);
    out
}

/// Trains every member of `req` (or reports them again when already finished).
pub fn train(req: &TrainRequest) -> Result<Vec<TrainSummary>, TrainError> {
    let s = &req.settings;
    if req.members.is_empty() {
        return Err(invalid("nothing to train: no SAE configured"));
    }
    if s.batch_size == 0 {
        return Err(invalid("--batch-size must be at least 1"));
    }
    let rank = req.group.as_ref().map_or(0, |g| g.rank());
    let group_size = req.group.as_ref().map_or(1, |g| g.world_size());
    if s.world_size != group_size {
        return Err(invalid(format!(
            "the run is configured for a world of {} but the process group has {group_size} ranks",
            s.world_size
        )));
    }
    let leader = rank == 0;
    let collectives = Collectives { group: req.group.as_ref(), device: req.device };
    let stats = data_stats(req)?;
    let d_in = stats.hook.d_model;
    let settings = RunSettings { hook: stats.hook.name.clone(), ..s.clone() };
    let tokens_per_step = (settings.batch_size * settings.world_size) as u64;
    let total_steps = settings.max_tokens.div_ceil(tokens_per_step);
    if total_steps == 0 {
        return Err(invalid("--max-tokens must be at least 1"));
    }
    let dead_window = settings.dead_window.min(total_steps * tokens_per_step).max(1);

    let root = ObjectDir::open(&req.out_url, &req.store)?;
    let mut names = std::collections::BTreeSet::new();
    let mut plans = Vec::new();
    for member in &req.members {
        if !names.insert(member.name.clone()) {
            return Err(invalid(format!("two SAEs of the sweep share the name `{}`", member.name)));
        }
        let config = member.config(d_in);
        config.validate().map_err(|source| TrainError::Sae { name: display_name(&member.name), source })?;
        let dir =
            if member.name.is_empty() { ObjectDir::open(&req.out_url, &req.store)? } else { root.child(&member.name)? };
        let json = config_json(&stats.manifest.dataset_id, &settings, &config);
        let found = inspect_output(&dir, &json)?;
        plans.push(Planned { member, config, dir, json, found });
    }
    let (finished_plans, plans): (Vec<Planned>, Vec<Planned>) =
        plans.into_iter().partition(|p| matches!(p.found, Found::Finished(_)));
    let finished: Vec<TrainSummary> = finished_plans
        .into_iter()
        .map(|p| match p.found {
            Found::Finished(summary) => TrainSummary { already_finished: true, ..summary },
            _ => unreachable!("partitioned on Finished"),
        })
        .collect();
    if plans.is_empty() {
        return Ok(finished); // every member is finished: report again, train nothing
    }

    // Resume from the newest step that every unfinished member has an intact checkpoint of.
    // Every rank reads the same --out (it must be shared storage); rank 0's view decides.
    let newest = newest_intact(&plans)?;
    let start_step = collectives.agree(newest.as_ref().map_or(0, |(step, _)| *step))?;
    let saved: Vec<Option<Checkpoint>> = match newest {
        Some((step, checkpoints)) if step == start_step => checkpoints.into_iter().map(Some).collect(),
        _ if start_step == 0 => plans.iter().map(|_| None).collect(),
        _ => plans.iter().map(|p| checkpoint::load(&p.dir, start_step).map(Some)).collect::<Result<_, _>>()?,
    };
    if start_step == 0 && plans.iter().any(|p| matches!(p.found, Found::Checkpoints(_))) {
        tracing::warn!("the SAEs' checkpoints share no step; starting every SAE afresh");
    }
    // A resumed run normalizes as it did when it started (follow mode's statistics grow).
    let resumed_state = saved.first().and_then(|c| c.as_ref()).map(|c| c.state.clone());
    let normalization = resumed_state
        .as_ref()
        .and_then(|s| s.normalization)
        .unwrap_or(Normalization { scale: stats.scale, variance: stats.variance });
    let stats = DataStats { scale: normalization.scale, variance: normalization.variance, ..stats };

    let mean = Tensor::from_slice(&stats.hook.mean).to_kind(Kind::Float) * stats.scale;
    let mut runs = Vec::new();
    let mut cursor = Cursor::default();
    let mut tokens = 0u64;
    for (plan, saved) in plans.into_iter().zip(saved) {
        let Planned { member, config, dir, json, .. } = plan;
        let name = display_name(&member.name);
        let sae_error = |source| TrainError::Sae { name: name.clone(), source };
        // Seeding right before each SAE makes a sweep member identical to a separate run.
        tch::manual_seed(settings.seed as i64);
        let mut sae = Sae::new(config.clone(), req.device).map_err(sae_error)?;
        sae.set_decoder_bias(&mean).map_err(sae_error)?;
        sae.set_bf16_autocast(settings.bf16_autocast);
        let mut adam = Adam::new(settings.adam_betas.0, settings.adam_betas.1, settings.adam_eps);
        let mut dead = DeadLatents::new(config.d_sae, dead_window, req.device);
        let mut rows = Vec::new();
        let mut acc = StepAccumulator::default();
        if let Some(saved) = saved {
            sae.load_state_tensors(&saved.sae).map_err(sae_error)?;
            adam.load_state(saved.state.adam_steps, &saved.adam).map_err(|detail| {
                TrainError::Checkpoint(CheckpointError::Bad {
                    location: dir.display(checkpoint::CHECKPOINT_DIR),
                    detail,
                })
            })?;
            dead = DeadLatents::from_counters(saved.dead_counters, dead_window, req.device);
            rows = saved.state.metrics;
            acc = StepAccumulator::restore(saved.pending_metrics, saved.state.pending_metric_steps, req.device);
            cursor = saved.state.cursor;
            tokens = saved.state.tokens;
            tracing::info!("{name}: resuming from step {start_step} ({tokens} tokens)");
        }
        // Rank 0's weights are everyone's (they are equal anyway: same seed, same checkpoint).
        collectives.broadcast(&sae.state_tensors())?;
        runs.push(MemberRun { name, dir, config_json: json, sae, adam, dead, acc, rows });
    }

    let mut opts = ReaderOptions::new(&settings.hook, settings.batch_size);
    opts.d_model = Some(d_in);
    opts.seed = settings.seed;
    opts.rank = rank;
    opts.shuffle = settings.shuffle;
    opts.world = settings.world_size;
    opts.start = cursor;
    opts.output = OutputDtype::F32;
    opts.store = req.store.clone();
    if settings.follow {
        opts.follow = Some(FollowOptions {
            poll: Duration::from_secs(2),
            idle_timeout: Some(Duration::from_secs(600)),
            replay: resumed_state.map(|s| s.follow_shards).unwrap_or_default(),
        });
    }
    let reader = Reader::open(&req.data_url, opts)?;
    let mut loader = Loader::start(reader, stats.scale, req.device, 4);

    let schedule = LrSchedule {
        lr: settings.lr,
        warmup_steps: settings.warmup_steps,
        decay_fraction: settings.lr_decay_fraction,
        total_steps,
    };
    let progress = progress_bar(req.progress && leader, total_steps * tokens_per_step, tokens);
    let session_start = Instant::now();
    let mut last_log = (Instant::now(), loader.waited, tokens);
    let mut step = start_step;
    let mut cursor_after = cursor;
    let ctx = StepContext { settings: &settings, collectives };
    let position = |step, tokens, cursor, loader: &Loader| Position {
        step,
        tokens,
        cursor,
        normalization,
        follow_shards: if settings.follow { loader.shard_order() } else { Vec::new() },
    };
    while step < total_steps {
        // A signal may reach the ranks at different steps: they stop together, at the first
        // step where any of them has it.
        if collectives.any(req.stop.load(Ordering::SeqCst))? {
            for run in runs.iter_mut() {
                collectives.mean_pending_metrics(run)?;
            }
            if leader {
                save_checkpoints(&runs, &settings, &position(step, tokens, cursor_after, &loader))?;
            }
            progress.abandon();
            return Err(TrainError::Interrupted { step });
        }
        let batch = match loader.next_batch()? {
            Some(batch) => batch,
            None => {
                tracing::warn!("the dataset ended after {tokens} tokens, before --max-tokens; finishing early");
                break;
            }
        };
        let lr = schedule.at(step);
        let step_tokens = batch.x.size()[0] as u64 * settings.world_size as u64;
        for run in runs.iter_mut() {
            train_step(run, &batch.x, step, lr, step_tokens, &ctx)?;
        }
        step += 1;
        tokens += step_tokens;
        cursor_after = batch.next;
        progress.set_position(tokens);

        if step % req.log_every.max(1) == 0 || step == total_steps {
            let (at, waited, tokens_before) = last_log;
            let wall = at.elapsed().as_secs_f64().max(1e-9);
            let wait_fraction = (loader.waited - waited).as_secs_f64() / wall;
            let tokens_per_s = (tokens - tokens_before) as f64 / wall;
            for run in runs.iter_mut() {
                collectives.mean_pending_metrics(run)?;
                log_row(run, step, tokens, lr, wait_fraction, tokens_per_s, stats.variance);
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
            last_log = (Instant::now(), loader.waited, tokens);
        }
        if req.checkpoint_every > 0 && step % req.checkpoint_every == 0 && step < total_steps {
            // The unlogged sums are averaged first, so the checkpoint holds every rank's share.
            for run in runs.iter_mut() {
                collectives.mean_pending_metrics(run)?;
            }
            if leader {
                save_checkpoints(&runs, &settings, &position(step, tokens, cursor_after, &loader))?;
                write_metrics(&runs)?;
            }
        }
    }
    progress.finish_and_clear();
    drop(loader);

    let session_seconds = session_start.elapsed().as_secs_f64();
    let waited_fraction = if session_seconds > 0.0 { last_log.1.as_secs_f64() / session_seconds } else { 0.0 };
    let mut summaries = Vec::new();
    for run in runs.iter_mut() {
        // A run stopped early by the data logs its last partial interval here.
        if run.rows.last().map(|r| r.step) != Some(step) {
            collectives.mean_pending_metrics(run)?;
            log_row(run, step, tokens, schedule.at(step.saturating_sub(1)), waited_fraction, 0.0, stats.variance);
        }
        summaries.push(finish(
            run,
            &stats,
            &settings,
            step,
            tokens,
            waited_fraction,
            start_step,
            session_seconds,
            leader,
        )?);
    }
    summaries.extend(finished);
    Ok(summaries)
}

struct StepContext<'a> {
    settings: &'a RunSettings,
    collectives: Collectives<'a>,
}

/// The data-parallel collectives the loop needs; without a group (one process) each is the
/// identity.
#[derive(Clone, Copy)]
struct Collectives<'a> {
    group: Option<&'a ProcessGroup>,
    /// Where the small flag tensors live (NCCL takes CUDA tensors only).
    device: Device,
}

impl Collectives<'_> {
    /// Averages the gradients of `params` over the ranks, so every rank takes the same step.
    fn mean_gradients(&self, params: &[(String, Tensor)]) -> Result<(), TrainError> {
        let Some(group) = self.group else { return Ok(()) };
        let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
        group.all_reduce_mean(&grads.iter().collect::<Vec<_>>())?;
        Ok(())
    }

    fn mean(&self, tensors: &[&Tensor]) -> Result<(), TrainError> {
        if let Some(group) = self.group {
            group.all_reduce_mean(tensors)?;
        }
        Ok(())
    }

    /// [d_sae] Bool: fired on any rank.
    fn any_fired(&self, fired: Tensor) -> Result<Tensor, TrainError> {
        let Some(group) = self.group else { return Ok(fired) };
        let counts = fired.to_kind(Kind::Float);
        group.all_reduce_sum(&[&counts])?;
        Ok(counts.gt(0.0))
    }

    /// Whether `flag` holds on any rank.
    fn any(&self, flag: bool) -> Result<bool, TrainError> {
        let Some(group) = self.group else { return Ok(flag) };
        let t = Tensor::from_slice(&[flag as i64]).to_device(self.device);
        group.all_reduce_sum(&[&t])?;
        Ok(t.int64_value(&[0]) > 0)
    }

    /// Rank 0's value of `value` on every rank.
    fn agree(&self, value: u64) -> Result<u64, TrainError> {
        let Some(group) = self.group else { return Ok(value) };
        let t = Tensor::from_slice(&[value as i64]).to_device(self.device);
        group.broadcast(&[&t], 0)?;
        Ok(t.int64_value(&[0]) as u64)
    }

    fn broadcast(&self, named: &[(String, Tensor)]) -> Result<(), TrainError> {
        let Some(group) = self.group else { return Ok(()) };
        group.broadcast(&named.iter().map(|(_, t)| t).collect::<Vec<_>>(), 0)?;
        Ok(())
    }

    /// Averages the unlogged metric sums over ranks, so the logged means cover every rank's rows.
    fn mean_pending_metrics(&self, run: &mut MemberRun) -> Result<(), TrainError> {
        if let (Some(_), (Some(sums), _)) = (self.group, run.acc.pending()) {
            self.mean(&[&sums])?;
            run.acc.replace_sums(sums);
        }
        Ok(())
    }
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
    let loss = &out.mse + &out.sparsity * sparsity_coeff + &out.auxk * run.sae.config().auxk.coeff;
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
    let logged = crate::sae::ForwardOutput { total: loss.detach(), ..out };
    run.acc.add(&logged);
    Ok(())
}

fn log_row(run: &mut MemberRun, step: u64, tokens: u64, lr: f64, wait_fraction: f64, tokens_per_s: f64, variance: f64) {
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
    step: u64,
    tokens: u64,
    cursor: Cursor,
    normalization: Normalization,
    follow_shards: Vec<String>,
}

fn save_checkpoints(runs: &[MemberRun], settings: &RunSettings, at: &Position) -> Result<(), TrainError> {
    for run in runs {
        let (pending, pending_metric_steps) = run.acc.pending();
        let state = CheckpointState {
            format_version: checkpoint::FORMAT_VERSION,
            step: at.step,
            tokens: at.tokens,
            cursor: at.cursor,
            adam_steps: run.adam.steps,
            config: run.config_json.clone(),
            rng: RngState { torch_seed: settings.seed, reader_seed: settings.seed },
            metrics: run.rows.clone(),
            pending_metric_steps,
            normalization: Some(at.normalization),
            follow_shards: at.follow_shards.clone(),
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

#[allow(clippy::too_many_arguments)]
fn finish(
    run: &mut MemberRun,
    stats: &DataStats,
    settings: &RunSettings,
    steps: u64,
    tokens: u64,
    data_wait_fraction: f64,
    start_step: u64,
    session_seconds: f64,
    leader: bool,
) -> Result<TrainSummary, TrainError> {
    let config = run.sae.config().clone();
    let summary = summarize(run, &config, settings, steps, tokens, data_wait_fraction, start_step, session_seconds);
    if !leader {
        return Ok(summary); // rank 0 writes the outputs
    }
    let info = ExportInfo {
        hook_name: settings.hook.clone(),
        model_name: stats.manifest.model.name.clone(),
        model_sha256: stats.manifest.model.file_sha256.clone(),
        dataset_id: stats.manifest.dataset_id.clone(),
        context_len: stats.manifest.context_len,
        activation_scale: stats.scale,
        trained: config.clone(),
        tokens,
    };
    let (cfg, weights) = export::export_files(&run.sae, &info);
    run.dir.put(export::WEIGHTS_FILE, weights)?;
    run.dir.put(export::CFG_FILE, cfg)?;
    run.dir.put(METRICS_FILE, metrics::to_jsonl(&run.rows))?;
    let points: Vec<crate::plots::CurvePoint> = run
        .rows
        .iter()
        .map(|r| crate::plots::CurvePoint {
            tokens: r.tokens,
            loss: r.loss,
            l0: r.l0,
            fvu: r.fvu,
            dead_fraction: r.dead_fraction,
        })
        .collect();
    match crate::plots::training_curves(&format!("{} ({})", run.name, config.arch.name()), &points) {
        Ok(png) => run.dir.put(CURVES_FILE, png)?,
        Err(e) => tracing::warn!("no training-curve plot for {}: {e}", run.name),
    }
    let result = ResultFile { config: run.config_json.clone(), summary: summary.clone() };
    let mut bytes = serde_json::to_vec_pretty(&result).expect("result.json");
    bytes.push(b'\n');
    // Written last: its presence means every other output is complete.
    run.dir.put(RESULT_FILE, bytes)?;
    checkpoint::remove_all(&run.dir)?;
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    run: &MemberRun,
    config: &SaeConfig,
    settings: &RunSettings,
    steps: u64,
    tokens: u64,
    data_wait_fraction: f64,
    start_step: u64,
    session_seconds: f64,
) -> TrainSummary {
    let last = run.rows.last().cloned();
    TrainSummary {
        name: run.name.clone(),
        out_url: run.dir.url().to_string(),
        architecture: config.arch.name().to_string(),
        d_in: config.d_in,
        d_sae: config.d_sae,
        steps,
        tokens,
        world_size: settings.world_size,
        mse: last.as_ref().map_or(f64::NAN, |r| r.mse),
        fvu: last.as_ref().map_or(f64::NAN, |r| r.fvu),
        l0: last.as_ref().map_or(f64::NAN, |r| r.l0),
        dead_fraction: run.dead.fraction().double_value(&[]),
        data_wait_fraction,
        tokens_per_s: if session_seconds > 0.0 {
            (steps - start_step) as f64 * (settings.batch_size * settings.world_size) as f64 / session_seconds
        } else {
            0.0
        },
        already_finished: false,
        resumed_from_step: (start_step > 0).then_some(start_step),
    }
}

fn display_name(name: &str) -> String {
    if name.is_empty() {
        "sae".to_string()
    } else {
        name.to_string()
    }
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
