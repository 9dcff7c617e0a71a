//! Activation datasets: sharded Parquet on any object store (`file://`, `s3://`, `memory://`),
//! committed atomically by a manifest written last, and read back by a streaming, shuffled,
//! resumable reader.
//!
//! This crate knows nothing of models or of `tch`: it moves rows of activations as plain buffers.
//!
//! * [`open_store`] turns a dataset URL into an object store and a prefix.
//! * [`DatasetWriter`] writes shards, one commit record per shard, and [`finalize`] merges the
//!   commit records into `manifest.json` (created with `PutMode::Create`, last).
//! * [`reader::Reader`] streams batches of rows: sharded across ranks by row group, shuffled as a
//!   pure function of (seed, epoch, rank, world), resumable from a [`reader::Cursor`].
//! * [`ObjectDir`] is a folder of plain objects (the trainer's checkpoints and outputs), and
//!   [`load_manifest`] / [`shard_tokens`] read a dataset's statistics and stored token ids.
//! * [`info`] and [`verify`] back `sae dataset info` and `sae dataset verify`.
//!
//! The on-store format is specified in `docs/format.md`.

pub mod compare;
mod error;
#[cfg(test)]
mod failpoints;
mod format;
mod inspect;
mod location;
mod manifest;
mod objects;
pub mod reader;
mod records;
mod rng;
mod runtime;
mod writer;

pub use error::{error_chain, panic_message, Error, Result, StoreFailure};
pub use format::Dtype;
pub use inspect::{info, verify, DatasetInfo, HookInfo, ShardProblem, VerifyReport};
pub use location::{has_user_info, open_store, open_store_with, redact_url, redact_urls_in, Location, StoreOptions};
pub use manifest::{
    limits, CommitRecord, CorpusIdentity, CreatedInfo, DatasetHeader, HookSpec, HookStats, HookSummary, Manifest,
    ModelIdentity, ShardEntry, TokenizerIdentity, Validate, FORMAT_VERSION,
};
pub use objects::{load_manifest, shard_tokens, ObjectDir};
pub use rng::SplitMix64;
pub use writer::{
    default_encode_threads, finalize, finalize_at, DatasetWriter, PartRecord, RowBatch, WriterOptions, WriterProgress,
    STALE_STAGING_AGE,
};

/// Re-exported so callers can tune retries without depending on `object_store` themselves.
pub use object_store::{BackoffConfig, ClientOptions, RetryConfig};
