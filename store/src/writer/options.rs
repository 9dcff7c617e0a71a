//! What a writer is asked to write, and how: the storage settings and tuning of a dataset, and
//! the rows appended to it, checked against its header.

use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::location::StoreOptions;
use crate::manifest::HeaderFile;

/// Storage settings of a dataset, plus writer tuning.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Stored dtype of the activations (default bf16).
    pub dtype: Dtype,
    /// zstd level (default 1: the high bytes compress as well as at level 3, the low bytes not at all).
    pub zstd_level: i32,
    /// Target shard size in MiB (default 256). A shard is closed after the first row group that
    /// takes it past this size.
    pub shard_mib: u64,
    /// Overrides `shard_mib` with a size in bytes (tests use small shards).
    pub shard_bytes: Option<u64>,
    /// Rows per Parquet row group (default 4096). The row group is the reader's unit of work.
    pub row_group_rows: usize,
    /// This writer's worker id (default "w0"). Several workers with distinct ids may write the
    /// same dataset concurrently; [`finalize`](super::finalize) merges them.
    pub worker: String,
    /// Multipart parts uploaded concurrently (default 4).
    pub upload_concurrency: usize,
    /// Appended batches queued for the writer before `append` blocks (default 2).
    pub queue_batches: usize,
    /// Threads that convert and encode row groups, several row groups at once (default
    /// [`default_encode_threads`]). The shards are the same bytes whatever the count: row groups
    /// are written to the shard in order.
    pub encode_threads: usize,
    pub store: StoreOptions,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            dtype: Dtype::Bf16,
            zstd_level: 1,
            shard_mib: 256,
            shard_bytes: None,
            row_group_rows: 4096,
            worker: "w0".into(),
            upload_concurrency: 4,
            queue_batches: 2,
            encode_threads: default_encode_threads(),
            store: StoreOptions::default(),
        }
    }
}

/// The default count of encoding threads: the cores this process may use, at most 4. One core
/// encodes a few hundred MB/s of bf16 (see BENCHMARKS.md); a CPU model leaves the rest to itself.
pub fn default_encode_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(4)
}

impl WriterOptions {
    pub(super) fn shard_target(&self) -> u64 {
        self.shard_bytes.unwrap_or(self.shard_mib.saturating_mul(1 << 20)).max(1)
    }
}

/// Rows to append: one row per token. `activations` holds, for every hook of the dataset, a
/// row-major `rows x d_model` f32 buffer, converted to the stored dtype by the writer.
#[derive(Clone, Debug, Default)]
pub struct RowBatch {
    pub sequence_id: Vec<u64>,
    pub position: Vec<u32>,
    pub token_id: Vec<u32>,
    pub activations: Vec<(String, Vec<f32>)>,
}

impl RowBatch {
    pub fn rows(&self) -> usize {
        self.sequence_id.len()
    }
}

pub(super) fn validate(h: &HeaderFile, b: &RowBatch) -> Result<()> {
    let n = b.sequence_id.len();
    if b.position.len() != n || b.token_id.len() != n {
        return Err(Error::invalid(format!(
            "row batch columns disagree: {} sequence ids, {} positions, {} token ids",
            n,
            b.position.len(),
            b.token_id.len()
        )));
    }
    if b.activations.len() != h.header.hooks.len() {
        return Err(Error::invalid(format!(
            "row batch has {} activation buffers, the dataset has {} hooks",
            b.activations.len(),
            h.header.hooks.len()
        )));
    }
    for spec in &h.header.hooks {
        let (_, v) = b
            .activations
            .iter()
            .find(|(name, _)| name == &spec.name)
            .ok_or_else(|| Error::invalid(format!("row batch lacks hook `{}`", spec.name)))?;
        if v.len() != n * spec.d_model {
            return Err(Error::invalid(format!(
                "hook `{}`: {} values for {} rows of d_model {}",
                spec.name,
                v.len(),
                n,
                spec.d_model
            )));
        }
    }
    Ok(())
}
