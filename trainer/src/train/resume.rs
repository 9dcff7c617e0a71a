//! What the output folder already holds, and how the run picks up from it: a finished run is
//! reported again, a run of another configuration refused, and an unfinished one resumed from
//! the newest step that every member has an intact checkpoint of.

use std::collections::BTreeSet;

use serde::Deserialize;
use store::ObjectDir;
use tch::Tensor;

use super::collectives::Collectives;
use super::data::DataStats;
use super::summary::ResultFile;
use super::{display_name, Member, MemberRun, RunSettings, TrainError, TrainRequest, TrainSummary, RESULT_FILE};
use crate::adam::Adam;
use crate::checkpoint::{self, Checkpoint, CheckpointError, RngState};
use crate::dead::DeadLatents;
use crate::metrics::StepAccumulator;
use crate::sae::{self, Sae, SaeConfig};

/// A member of the run and what its output folder holds.
pub(super) struct Planned<'a> {
    pub(super) member: &'a Member,
    pub(super) config: SaeConfig,
    pub(super) dir: ObjectDir,
    pub(super) json: serde_json::Value,
    pub(super) found: Found,
}

pub(super) enum Found {
    Fresh,
    Finished(TrainSummary),
    Checkpoints(Vec<u64>),
}

fn config_json(dataset_id: &str, settings: &RunSettings, sae: &SaeConfig) -> serde_json::Value {
    serde_json::json!({ "dataset_id": dataset_id, "settings": settings, "sae": sae })
}

/// A saved configuration as this version writes it: settings added since it was saved take the
/// values that runs had before them (their serde defaults), so an older run resumes when given
/// those values. One this version cannot read is returned as it is (and then differs).
fn as_written_now(saved: &serde_json::Value) -> serde_json::Value {
    #[derive(serde::Deserialize)]
    struct Saved {
        dataset_id: String,
        settings: RunSettings,
        sae: SaeConfig,
    }
    match Saved::deserialize(saved) {
        Ok(s) => config_json(&s.dataset_id, &s.settings, &s.sae),
        Err(_) => saved.clone(),
    }
}

/// Every member of `req`, with its configuration and what its output folder holds.
pub(super) fn plan_members<'a>(
    req: &'a TrainRequest,
    stats: &DataStats,
    settings: &RunSettings,
) -> Result<Vec<Planned<'a>>, TrainError> {
    let d_in = stats.hook.d_model;
    let root = ObjectDir::open(&req.out_url, &req.store)?;
    let mut names = BTreeSet::new();
    let mut plans = Vec::new();
    for member in &req.members {
        if !names.insert(member.name.clone()) {
            return Err(TrainError::DuplicateName { name: member.name.clone() });
        }
        let config = member.config(d_in);
        config.validate().map_err(|source| TrainError::Sae { name: display_name(&member.name), source })?;
        let dir =
            if member.name.is_empty() { ObjectDir::open(&req.out_url, &req.store)? } else { root.child(&member.name)? };
        let json = config_json(&stats.manifest.dataset_id, settings, &config);
        let found = inspect_output(&dir, &json)?;
        plans.push(Planned { member, config, dir, json, found });
    }
    Ok(plans)
}

/// The summaries of the finished members (marked as such), and the members left to train.
pub(super) fn split_finished(plans: Vec<Planned>) -> (Vec<TrainSummary>, Vec<Planned>) {
    let (finished_plans, plans): (Vec<Planned>, Vec<Planned>) =
        plans.into_iter().partition(|p| matches!(p.found, Found::Finished(_)));
    let finished = finished_plans
        .into_iter()
        .map(|p| match p.found {
            Found::Finished(summary) => TrainSummary { already_finished: true, ..summary },
            _ => unreachable!("partitioned on Finished"),
        })
        .collect();
    (finished, plans)
}

/// What `dir` holds for a run of `config`; any run of another configuration is an error.
fn inspect_output(dir: &ObjectDir, config: &serde_json::Value) -> Result<Found, TrainError> {
    // Saved configurations are read as this version writes them before they are compared.
    let same_or_refused = |what: &'static str, saved: &serde_json::Value| {
        let theirs = as_written_now(saved);
        if &theirs == config {
            return Ok(());
        }
        Err(TrainError::OtherConfiguration {
            url: dir.url().to_string(),
            what,
            differences: store::compare::differences(&theirs, config).join("; "),
        })
    };
    if let Some(bytes) = dir.get(RESULT_FILE)? {
        let result: ResultFile = serde_json::from_slice(&bytes)
            .map_err(|e| TrainError::DamagedResult { location: dir.display(RESULT_FILE), detail: e.to_string() })?;
        same_or_refused("finished run", &result.config)?;
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
            Ok(state) => {
                same_or_refused("checkpoint", &state.config)?;
                return Ok(Found::Checkpoints(steps));
            }
            Err(e) if e.is_damage() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Found::Checkpoints(steps))
}

/// Where the run starts: `step` 0 with nothing `saved`, or a step with every member's
/// checkpoint (in the order of the plans).
pub(super) struct Start {
    pub(super) step: u64,
    pub(super) saved: Vec<Option<Checkpoint>>,
}

/// The newest step that every member has an intact checkpoint of, agreed by every rank (rank
/// 0's view decides; every rank reads the same --out, which must be shared storage).
pub(super) fn start_point(plans: &[Planned], collectives: &Collectives) -> Result<Start, TrainError> {
    let newest = newest_intact(plans)?;
    let step = collectives.agree(newest.as_ref().map_or(0, |intact| intact.step))?;
    let saved: Vec<Option<Checkpoint>> = match newest {
        Some(intact) if intact.step == step => intact.checkpoints.into_iter().map(Some).collect(),
        _ if step == 0 => plans.iter().map(|_| None).collect(),
        _ => plans.iter().map(|p| checkpoint::load(&p.dir, step).map(Some)).collect::<Result<_, _>>()?,
    };
    if step == 0 && plans.iter().any(|p| matches!(p.found, Found::Checkpoints(_))) {
        tracing::warn!("the SAEs' checkpoints share no step; starting every SAE afresh");
    }
    Ok(Start { step, saved })
}

/// A step with an intact checkpoint of every member.
struct Intact {
    step: u64,
    checkpoints: Vec<Checkpoint>,
}

/// The newest step that every member has an intact checkpoint of, with those checkpoints. A
/// damaged checkpoint is reported and the previous step is tried; when a step exists but none
/// is intact, the run refuses rather than start afresh over them.
fn newest_intact(plans: &[Planned]) -> Result<Option<Intact>, TrainError> {
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
        let mut checkpoints = Vec::new();
        for plan in plans {
            match checkpoint::load(&plan.dir, step) {
                Ok(c) => checkpoints.push(c),
                Err(e) if e.is_damage() => {
                    tracing::warn!("{e}; falling back to the previous checkpoint");
                    damage.push(e.to_string());
                    continue 'steps;
                }
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(Some(Intact { step, checkpoints }));
    }
    if !damage.is_empty() {
        return Err(TrainError::NoIntactCheckpoint { damage: damage.join("; ") });
    }
    Ok(None)
}

/// What every member is built from besides its plan and checkpoint.
pub(super) struct MemberSetup<'a> {
    pub(super) req: &'a TrainRequest,
    pub(super) settings: &'a RunSettings,
    /// The scaled dataset mean: the decoder bias of a fresh SAE.
    pub(super) mean: &'a Tensor,
    /// Scaled data rows that fresh SAEs start from (`--decoder-init data`; see
    /// [`super::data::init_rows`]).
    pub(super) init_rows: Option<&'a Tensor>,
    pub(super) dead_window: u64,
    /// The step the run resumes from (for the log).
    pub(super) start_step: u64,
    pub(super) collectives: Collectives<'a>,
}

/// One member's SAE, optimizer and counters: fresh, or as `saved` left them.
pub(super) fn restore_member(
    plan: Planned,
    saved: Option<Checkpoint>,
    setup: &MemberSetup,
) -> Result<MemberRun, TrainError> {
    let MemberSetup { req, settings, .. } = *setup;
    let Planned { member, config, dir, json, .. } = plan;
    let name = display_name(&member.name);
    let sae_error = |source| TrainError::Sae { name: name.clone(), source };
    // Seeding right before each SAE makes a sweep member identical to a separate run.
    tch::manual_seed(settings.seed as i64);
    let mut sae = Sae::new(config.clone(), req.device).map_err(sae_error)?;
    sae.set_decoder_bias(setup.mean).map_err(sae_error)?;
    if let (None, Some(rows)) = (&saved, setup.init_rows) {
        if config.arch.starts_from_data() {
            // The first rows a separate run of this SAE would read: a sweep member is that run.
            let own = rows.narrow(0, 0, rows.size()[0].min(sae::rows_to_read(config.d_sae) as i64));
            let from_data = sae.init_from_rows(&own).map_err(sae_error)?;
            tracing::info!("{name}: {from_data} of {} latents start from data rows", config.d_sae);
        }
    }
    sae.set_bf16_autocast(settings.bf16_autocast);
    let mut adam = Adam::new(settings.adam_betas.0, settings.adam_betas.1, settings.adam_eps);
    let mut dead = DeadLatents::new(config.d_sae, setup.dead_window, req.device);
    let mut rows = Vec::new();
    let mut acc = StepAccumulator::default();
    if let Some(saved) = saved {
        let location = || dir.display(checkpoint::CHECKPOINT_DIR);
        if saved.state.rng != RngState::from_seed(settings.seed) {
            return Err(TrainError::SeedMismatch { location: location(), saved: saved.state.rng, seed: settings.seed });
        }
        sae.load_state_tensors(&saved.sae).map_err(sae_error)?;
        adam.load_state(saved.state.adam_steps, &saved.adam)
            .map_err(|detail| TrainError::Checkpoint(CheckpointError::Bad { location: location(), detail }))?;
        dead = DeadLatents::from_counters(saved.dead_counters, setup.dead_window, req.device);
        rows = saved.state.metrics;
        // [world, 5]: each rank's own sums; [5] (one process, or checkpoints from before): as is.
        let rank = req.group.as_ref().map_or(0, |g| g.rank()) as i64;
        let pending = saved.pending_metrics.map(|p| if p.dim() == 2 { p.get(rank) } else { p });
        acc = StepAccumulator::restore(pending, saved.state.pending_metric_steps, req.device);
        let (step, tokens) = (setup.start_step, saved.state.tokens);
        tracing::info!("{name}: resuming from step {step} ({tokens} tokens)");
    }
    // Rank 0's weights are everyone's (they are equal anyway: same seed, same checkpoint).
    setup.collectives.broadcast(&sae.state_tensors())?;
    Ok(MemberRun { name, dir, config_json: json, sae, adam, dead, acc, rows })
}
