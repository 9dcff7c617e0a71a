//! The training data: the trained hook's statistics (the inputs' normalization) and the reader
//! that streams its rows.

use std::time::{Duration, Instant};

use store::reader::{window_budget, Cursor, FollowOptions, OutputDtype, Reader, ReaderOptions};
use store::{HookSummary, Manifest};

use tch::Tensor;

use super::{RunSettings, TrainError, TrainRequest};

/// The statistics of the trained hook, and what follows from them.
pub(super) struct DataStats {
    pub(super) hook: HookSummary,
    pub(super) manifest: Manifest,
    /// Inputs are multiplied by this so that E‖x‖² = d_in.
    pub(super) scale: f64,
    /// Per-feature variance of the scaled inputs: the FVU's denominator.
    pub(super) variance: f64,
}

pub(super) fn data_stats(req: &TrainRequest) -> Result<DataStats, TrainError> {
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
        return Err(TrainError::NotFinal { url: url.clone() });
    }
    let hook_names = |hooks: &[HookSummary]| hooks.iter().map(|h| h.name.clone()).collect::<Vec<_>>().join(", ");
    let hook = match &req.hook {
        Some(name) => manifest.hook(name).cloned().ok_or_else(|| TrainError::NoSuchHook {
            url: url.clone(),
            hook: name.clone(),
            have: hook_names(&manifest.hooks),
        })?,
        None => match manifest.hooks.as_slice() {
            [only] => only.clone(),
            hooks => return Err(TrainError::SeveralHooks { url: url.clone(), have: hook_names(hooks) }),
        },
    };
    if manifest.tokens == 0 {
        return Err(TrainError::NoTokens { url: url.clone() });
    }
    let d = hook.d_model as f64;
    let mean_norm_sq: f64 = hook.mean.iter().map(|m| m * m).sum();
    if !(hook.mean_sq_norm.is_finite() && hook.mean_sq_norm > 0.0) {
        return Err(TrainError::CannotNormalize {
            url: url.clone(),
            hook: hook.name.clone(),
            mean_sq_norm: hook.mean_sq_norm,
        });
    }
    let scale = (d / hook.mean_sq_norm).sqrt();
    let variance = ((hook.mean_sq_norm - mean_norm_sq) * scale * scale / d).max(f64::MIN_POSITIVE);
    Ok(DataStats { hook, manifest, scale, variance })
}

/// How this rank reads the data: its share of each batch, from `start`, in f32; in follow mode
/// replaying the shard order `replay` that a resumed run had discovered.
pub(super) fn reader_options(
    req: &TrainRequest,
    settings: &RunSettings,
    stats: &DataStats,
    rank: usize,
    start: Cursor,
    replay: Vec<String>,
) -> ReaderOptions {
    let mut opts = ReaderOptions::new(&settings.hook, settings.batch_size);
    opts.d_model = Some(stats.hook.d_model);
    opts.seed = settings.seed;
    opts.rank = rank;
    opts.shuffle = settings.shuffle;
    opts.window_row_groups = settings.shuffle_window;
    let row_bytes = stats.hook.d_model * std::mem::size_of::<f32>();
    opts.max_bytes_in_flight = opts.max_bytes_in_flight.max(window_budget(Some(&stats.manifest), row_bytes, &opts));
    opts.world = settings.world_size;
    opts.start = start;
    opts.output = OutputDtype::F32;
    opts.store = req.store.clone();
    if settings.follow {
        opts.follow =
            Some(FollowOptions { poll: Duration::from_secs(2), idle_timeout: Some(Duration::from_secs(600)), replay });
    }
    opts
}

/// The first `rows` rows of the data in a one-process order of the run's seed, scaled as
/// training scales them [≤ rows, d]: what fresh SAEs start from (`--decoder-init data`). Every
/// rank reads the same rows, and the first n of them are the same for any `rows` ≥ n, so a
/// sweep member starts as a separate run of it would. In follow mode only the rows committed by
/// now are read (the rest may come much later, e.g. from a capture worker not yet started).
pub(super) fn init_rows(
    req: &TrainRequest,
    settings: &RunSettings,
    stats: &DataStats,
    rows: usize,
) -> Result<Tensor, TrainError> {
    let mut opts = reader_options(req, settings, stats, 0, Cursor::default(), Vec::new());
    opts.world = 1;
    opts.epochs = Some(1);
    opts.drop_last = false;
    opts.batch_rows = rows;
    if let Some(follow) = &mut opts.follow {
        // Stop at the first poll that finds nothing new; read row group by row group so that
        // what was committed is not held back in a window or a batch that never fills.
        follow.idle_timeout = Some(Duration::ZERO);
        follow.poll = Duration::from_millis(50);
        opts.window_row_groups = 1;
        opts.batch_rows = rows.min(256);
    }
    let d = stats.hook.d_model;
    let mut values = Vec::with_capacity(rows * d);
    for batch in Reader::open(&req.data_url, opts)? {
        match batch {
            Ok(batch) => values.extend(batch.to_f32()),
            Err(store::Error::FollowIdle { .. }) => break,
            Err(e) => return Err(e.into()),
        }
        if values.len() >= rows * d {
            break;
        }
    }
    values.truncate(rows * d);
    Ok(Tensor::from_slice(&values).view([(values.len() / d) as i64, d as i64]) * stats.scale)
}
