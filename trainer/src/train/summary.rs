//! The end of a run: each member's summary, and (on rank 0) its finished outputs, `result.json`
//! last.

use serde::{Deserialize, Serialize};

use super::data::DataStats;
use super::{MemberRun, RunSettings, TrainError, TrainSummary, CURVES_FILE, METRICS_FILE, RESULT_FILE};
use crate::checkpoint;
use crate::export::{self, ExportInfo};
use crate::metrics;
use crate::plots::{self, CurvePoint};
use crate::sae::SaeConfig;

/// `result.json`: the configuration of the finished run and its summary.
#[derive(Serialize, Deserialize)]
pub(super) struct ResultFile {
    pub(super) config: serde_json::Value,
    pub(super) summary: TrainSummary,
}

/// How the run ended: the same for every member.
#[derive(Clone, Copy)]
pub(super) struct RunTotals {
    /// Steps completed.
    pub(super) steps: u64,
    /// Tokens seen, over all ranks.
    pub(super) tokens: u64,
    /// Share of this session's wall time spent waiting for data.
    pub(super) data_wait_fraction: f64,
    /// The step this session resumed from (0: a fresh run).
    pub(super) start_step: u64,
    pub(super) session_seconds: f64,
}

/// `run`'s summary; on rank 0 also writes its outputs (SAELens files, metrics, curves, then
/// `result.json`) and removes its checkpoints.
pub(super) fn finish(
    run: &mut MemberRun,
    stats: &DataStats,
    settings: &RunSettings,
    totals: &RunTotals,
    leader: bool,
) -> Result<TrainSummary, TrainError> {
    let config = run.sae.config().clone();
    let summary = summarize(run, &config, settings, totals);
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
        tokens: totals.tokens,
    };
    let (cfg, weights) = export::export_files(&run.sae, &info);
    run.dir.put(export::WEIGHTS_FILE, weights)?;
    run.dir.put(export::CFG_FILE, cfg)?;
    run.dir.put(METRICS_FILE, metrics::to_jsonl(&run.rows))?;
    let points: Vec<CurvePoint> = run
        .rows
        .iter()
        .map(|r| CurvePoint { tokens: r.tokens, loss: r.loss, l0: r.l0, fvu: r.fvu, dead_fraction: r.dead_fraction })
        .collect();
    match plots::training_curves(&format!("{} ({})", run.name, config.arch.name()), &points) {
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

fn summarize(run: &MemberRun, config: &SaeConfig, settings: &RunSettings, totals: &RunTotals) -> TrainSummary {
    let last = run.rows.last().cloned();
    let RunTotals { steps, tokens, data_wait_fraction, start_step, session_seconds } = *totals;
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
