//! What can stop a training run, one variant per kind of failure.

use crate::checkpoint::{CheckpointError, RngState};
use crate::dist::DistError;
use crate::loader::LoaderError;
use crate::sae::SaeError;

/// Why [`super::train`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("SAE `{name}`: {source}")]
    Sae { name: String, source: SaeError },
    #[error("interrupted at step {step}; a checkpoint was saved: run the same command again to resume")]
    Interrupted { step: u64 },
    #[error(transparent)]
    Dist(#[from] DistError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("nothing to train: no SAE configured")]
    NoMembers,
    #[error("--batch-size must be at least 1")]
    ZeroBatchSize,
    #[error("--shuffle-window must be at least 1 row group")]
    ZeroShuffleWindow,
    #[error("--max-tokens must be at least 1")]
    ZeroMaxTokens,
    #[error(
        "--max-norm-multiple must be at least 1 (it keeps the rows up to that multiple of the median norm), not {0}"
    )]
    MaxNormMultipleBelowOne(f64),
    #[error("the run is configured for a world of {configured} but the process group has {group} ranks")]
    WorldMismatch { configured: usize, group: usize },
    #[error("two SAEs of the sweep share the name `{name}`")]
    DuplicateName { name: String },
    #[error(
        "dataset `{url}` is not final (no manifest.json): finish it with `sae dataset finalize`, or train on it while it is written with --follow"
    )]
    NotFinal { url: String },
    /// `have`: the dataset's hooks, comma-separated.
    #[error("dataset `{url}` has no hook `{hook}`; it has: {have}")]
    NoSuchHook { url: String, hook: String, have: String },
    #[error("dataset `{url}` holds several hooks ({have}); choose one with --hook")]
    SeveralHooks { url: String, have: String },
    #[error("dataset `{url}` holds no tokens")]
    NoTokens { url: String },
    #[error("dataset `{url}`: hook `{hook}` has mean squared norm {mean_sq_norm}, cannot normalize")]
    CannotNormalize { url: String, hook: String, mean_sq_norm: f64 },
    /// The output folder holds a run of another configuration.
    #[error(
        "`{url}` holds a {what} of another configuration (differences: {differences}); use another --out, or the same settings to resume"
    )]
    OtherConfiguration { url: String, what: &'static str, differences: String },
    /// A finished run's `result.json` cannot be read.
    #[error("`{location}` is damaged: {detail}")]
    DamagedResult { location: String, detail: String },
    /// Checkpoints exist, but none of the newest common step is intact.
    #[error("no intact checkpoint to resume from ({damage}); remove the checkpoints to start afresh")]
    NoIntactCheckpoint { damage: String },
    /// A checkpoint's recorded seeds are not the run's (its configuration says one seed, its
    /// random state another).
    #[error(
        "checkpoint `{location}` records the seeds {saved:?}, but this run's seed is {seed}; remove the checkpoints to start afresh"
    )]
    SeedMismatch { location: String, saved: RngState, seed: u64 },
}
