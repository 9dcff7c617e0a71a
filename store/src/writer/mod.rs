//! The dataset writer: rows in, Parquet shards out, one commit record per shard, and a manifest
//! merged from the commit records and created last.
//!
//! Commit protocol (no renames, which S3 lacks):
//! 1. `header.json` is created with `PutMode::Create` (or found equal, to resume or to join as
//!    another worker).
//! 2. Each shard is streamed to `shards/<worker>-<seq>-<nonce>.parquet` by multipart upload. The
//!    object becomes visible only when the upload completes; a failed upload is aborted.
//! 3. The shard is committed by creating `commits/<worker>/<seq>.json` with `PutMode::Create`.
//!    Only then does it belong to the dataset.
//! 4. [`finalize`] merges every commit record, in (worker, seq) order, into `manifest.json`,
//!    created with `PutMode::Create`, and deletes every object under `shards/` that the manifest
//!    does not list (complete shards of a writer killed before its commit).

mod commit;
mod encoder;
mod finalize;
mod options;
mod planar;
mod pool;
mod row_group;

use std::hash::{BuildHasher, Hasher};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::runtime::Runtime;

use encoder::Encoder;
pub(crate) use finalize::finalize_async;
pub use finalize::{finalize, finalize_at, PartRecord, STALE_STAGING_AGE};
use options::validate;
pub use options::{default_encode_threads, RowBatch, WriterOptions};

use crate::error::{Error, Result};
use crate::format;
use crate::location::{open_store_with, Location};
use crate::manifest::{
    CommitRecord, DatasetHeader, Encoding, HeaderFile, Manifest, FORMAT_VERSION, HEADER_KEY, MANIFEST_KEY, PARTS_DIR,
};
use crate::records::{commit_key, list_commits, read_header};
use crate::runtime::runtime;

/// What a writer has committed so far (resumed shards included), for progress displays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterProgress {
    pub shards: u64,
    pub bytes: u64,
    pub rows: u64,
}

#[derive(Default)]
struct ProgressCounters {
    shards: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
    rows: std::sync::atomic::AtomicU64,
}

impl ProgressCounters {
    fn add(&self, shards: u64, bytes: u64, rows: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.shards.fetch_add(shards, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
        self.rows.fetch_add(rows, Relaxed);
    }
}

enum Msg {
    Rows(RowBatch),
    Finish,
}

/// Writes one worker's share of a dataset. A blocking API: it owns a small tokio runtime for its
/// uploads, a thread of its own and its encoding threads, so do not call it from inside an async
/// runtime.
pub struct DatasetWriter {
    rt: Arc<Runtime>,
    loc: Location,
    header: HeaderFile,
    resumed: Vec<CommitRecord>,
    tx: Option<SyncSender<Msg>>,
    thread: Option<JoinHandle<Result<Vec<CommitRecord>>>>,
    failed: Option<String>,
    worker: String,
    progress: Arc<ProgressCounters>,
    conditional_create: bool,
}

fn random_hex() -> String {
    let mut out = String::new();
    for i in 0..2u32 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(i);
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// Whether the store honours conditional create (`PutMode::Create`, S3's `If-None-Match: *`),
/// probed with a throw-away object under `probes/`. Commit records, part records and the
/// manifest rely on it: where it is ignored, a duplicate worker or a second finalize overwrites
/// them silently.
async fn honours_conditional_create(loc: &Location) -> Result<bool> {
    let key = format!("probes/{}", random_hex());
    let first = loc.put_create(&key, Bytes::from_static(b"probe")).await?;
    let second = loc.put_create(&key, Bytes::from_static(b"probe")).await?;
    loc.delete(&key).await?;
    Ok(first && !second)
}

impl DatasetWriter {
    /// Create the dataset at `url`, or join it: if `header.json` exists with the same header and
    /// encoding, this writer resumes after the shards its worker id already committed (see
    /// [`DatasetWriter::committed`]). Fails if the dataset is already final or differs.
    pub fn create(url: &str, header: DatasetHeader, opts: WriterOptions) -> Result<Self> {
        let loc = open_store_with(url, &opts.store)?;
        Self::create_at(loc, header, opts)
    }

    /// [`DatasetWriter::create`] on an already opened location.
    pub fn create_at(loc: Location, header: DatasetHeader, opts: WriterOptions) -> Result<Self> {
        check_options(&header, &opts)?;
        let encoding = Encoding {
            dtype: opts.dtype,
            compression: "zstd".into(),
            zstd_level: opts.zstd_level,
            row_group_rows: opts.row_group_rows,
            shard_bytes: opts.shard_target(),
            activation_encoding: "BYTE_STREAM_SPLIT".into(),
        };
        // Validate the level now rather than in the encoding thread.
        format::writer_properties(&header.hooks, opts.zstd_level, opts.row_group_rows, 1 << 20)?;
        let rt = Arc::new(runtime()?);
        let (header_file, resumed) = rt.block_on(async {
            let header_file = create_or_join(&loc, header, encoding).await?;
            let resumed = list_commits(&loc, Some(&opts.worker)).await?;
            Ok::<_, Error>((header_file, resumed))
        })?;
        let conditional_create = rt.block_on(honours_conditional_create(&loc))?;
        if !conditional_create {
            tracing::warn!(
                "{} ignores conditional create (If-None-Match: *): two writers with one worker id, or two finalizes, would overwrite each other's records without an error; give every worker its own id and finalize once",
                loc.url
            );
        }
        for r in &resumed {
            if r.dataset_id != header_file.dataset_id {
                return Err(Error::BadMetadata {
                    location: loc.display(&commit_key(&r.worker, r.seq)),
                    detail: format!("belongs to dataset {}, not {}", r.dataset_id, header_file.dataset_id),
                });
            }
        }
        let next_seq = resumed.last().map(|r| r.seq + 1).unwrap_or(0);
        let worker = opts.worker.clone();
        let progress = Arc::new(ProgressCounters::default());
        progress.add(
            resumed.len() as u64,
            resumed.iter().map(|r| r.shard.bytes).sum(),
            resumed.iter().map(|r| r.shard.rows).sum(),
        );
        let (tx, rx) = sync_channel(opts.queue_batches.max(1));
        let mut enc = Encoder::new(rt.clone(), loc.clone(), header_file.clone(), opts, next_seq)?;
        enc.progress = progress.clone();
        let thread = std::thread::Builder::new()
            .name("sae-store-write".into())
            .spawn(move || enc.run(rx))
            .map_err(|e| Error::Start { what: "the writer thread", cause: e.to_string() })?;
        Ok(DatasetWriter {
            conditional_create,
            rt,
            loc,
            header: header_file,
            resumed,
            tx: Some(tx),
            thread: Some(thread),
            failed: None,
            worker,
            progress,
        })
    }

    /// Shards this worker had committed before this writer was created (when resuming).
    pub fn committed(&self) -> &[CommitRecord] {
        &self.resumed
    }

    /// Shards, bytes and rows committed so far by this worker, resumed ones included.
    pub fn progress(&self) -> WriterProgress {
        use std::sync::atomic::Ordering::Relaxed;
        WriterProgress {
            shards: self.progress.shards.load(Relaxed),
            bytes: self.progress.bytes.load(Relaxed),
            rows: self.progress.rows.load(Relaxed),
        }
    }

    /// Rows this worker had committed before this writer was created.
    pub fn committed_rows(&self) -> u64 {
        self.resumed.iter().map(|r| r.shard.rows).sum()
    }

    /// Whether the store honours conditional create (probed when the writer was created; a
    /// warning was logged if not).
    pub fn conditional_create_honoured(&self) -> bool {
        self.conditional_create
    }

    pub fn dataset_id(&self) -> &str {
        &self.header.dataset_id
    }

    pub fn location(&self) -> &Location {
        &self.loc
    }

    /// Queue rows for encoding. Blocks when `queue_batches` batches are already waiting, which
    /// bounds the writer's memory. Errors of earlier shards surface here.
    pub fn append(&mut self, batch: RowBatch) -> Result<()> {
        validate(&self.header, &batch)?;
        if batch.rows() == 0 {
            return Ok(());
        }
        let sent = self.tx.as_ref().map(|tx| tx.send(Msg::Rows(batch)).is_ok()).unwrap_or(false);
        if !sent {
            return Err(self.join_error());
        }
        Ok(())
    }

    fn failed_earlier(&self, detail: String) -> Error {
        Error::WriterFailed { url: self.loc.url.clone(), detail }
    }

    fn join_error(&mut self) -> Error {
        if let Some(f) = &self.failed {
            return self.failed_earlier(f.clone());
        }
        self.tx = None;
        let msg = match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => e.to_string(),
            Some(Ok(Ok(_))) => "the writer was already finished".into(),
            Some(Err(_)) => "the encoding thread panicked".into(),
            None => "the writer was already finished".into(),
        };
        self.failed = Some(msg.clone());
        self.failed_earlier(msg)
    }

    /// Write the last (partial) shard and commit it; do not write the manifest. Use this when
    /// several workers write one dataset, then call [`finalize`] once. Returns every commit
    /// record of this worker, resumed ones included.
    pub fn finish_worker(mut self) -> Result<Vec<CommitRecord>> {
        let tx = self.tx.take().ok_or_else(|| self.failed_earlier("already finished".into()))?;
        let _ = tx.send(Msg::Finish);
        drop(tx);
        let new = match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r?,
            Some(Err(_)) => return Err(self.failed_earlier("the encoding thread panicked".into())),
            None => return Err(self.failed_earlier("already finished".into())),
        };
        let mut all = std::mem::take(&mut self.resumed);
        all.extend(new);
        Ok(all)
    }

    /// [`DatasetWriter::finish_worker`], then records that this worker's share of a dataset split
    /// over `workers` workers is complete (`parts/<worker>.json`, created with `PutMode::Create`;
    /// a worker that finishes again finds its record and leaves it).
    pub fn finish_part(self, workers: usize) -> Result<Vec<CommitRecord>> {
        let rt = self.rt.clone();
        let loc = self.loc.clone();
        let dataset_id = self.header.dataset_id.clone();
        let worker = self.worker.clone();
        let records = self.finish_worker()?;
        let part = PartRecord {
            format_version: FORMAT_VERSION,
            dataset_id,
            worker: worker.clone(),
            workers,
            rows: records.iter().map(|r| r.shard.rows).sum(),
            shards: records.len(),
        };
        let key = format!("{PARTS_DIR}/{worker}.json");
        let body = serde_json::to_vec_pretty(&part).expect("part serializes");
        rt.block_on(loc.put_create(&key, body.into()))?;
        Ok(records)
    }

    /// [`DatasetWriter::finish_part`] as the only worker, then [`finalize`]: for a single writer.
    pub fn finish(self) -> Result<Manifest> {
        let rt = self.rt.clone();
        let loc = self.loc.clone();
        self.finish_part(1)?;
        rt.block_on(finalize_async(&loc, None))
    }
}

impl Drop for DatasetWriter {
    fn drop(&mut self) {
        // Dropping without finish: the encoding thread sees the channel close and aborts the
        // shard in progress (its multipart upload); committed shards stay committed.
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The checks of a new writer's header and options that need no store.
fn check_options(header: &DatasetHeader, opts: &WriterOptions) -> Result<()> {
    if opts.row_group_rows == 0 {
        return Err(Error::invalid("row_group_rows must be > 0"));
    }
    if header.hooks.is_empty() {
        return Err(Error::invalid("a dataset needs at least one hook"));
    }
    let mut names: Vec<&str> = header.hooks.iter().map(|h| h.name.as_str()).collect();
    names.sort();
    names.dedup();
    if names.len() != header.hooks.len()
        || header.hooks.iter().any(|h| {
            h.d_model == 0
                || [format::COL_SEQUENCE_ID, format::COL_POSITION, format::COL_TOKEN_ID].contains(&h.name.as_str())
        })
    {
        return Err(Error::invalid("hook names must be distinct, non-reserved, with d_model > 0"));
    }
    if opts.worker.is_empty() || !opts.worker.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(Error::invalid(format!("worker id `{}` must be non-empty [A-Za-z0-9_-]", opts.worker)));
    }
    Ok(())
}

/// Creates `header.json`, or finds it there with the same header and encoding (a resumed or
/// another worker). Fails if the dataset is final or a different one is being written here.
async fn create_or_join(loc: &Location, header: DatasetHeader, encoding: Encoding) -> Result<HeaderFile> {
    if loc.get(MANIFEST_KEY).await?.is_some() {
        return Err(Error::AlreadyExists {
            location: loc.display(MANIFEST_KEY),
            what: "the dataset is already final".into(),
        });
    }
    let fresh = HeaderFile { format_version: FORMAT_VERSION, dataset_id: random_hex(), header, encoding };
    let body = serde_json::to_vec_pretty(&fresh).expect("header serializes");
    if loc.put_create(HEADER_KEY, body.into()).await? {
        return Ok(fresh);
    }
    let existing = read_header(loc).await?.ok_or_else(|| Error::BadMetadata {
        location: loc.display(HEADER_KEY),
        detail: "exists but cannot be read".into(),
    })?;
    let mut differences = existing.header.differences(&fresh.header);
    let encoding = |e: &Encoding| serde_json::json!({ "encoding": e });
    differences.extend(crate::compare::differences(&encoding(&existing.encoding), &encoding(&fresh.encoding)));
    if !differences.is_empty() {
        return Err(Error::AlreadyExists {
            location: loc.display(HEADER_KEY),
            what: format!("a different dataset is being written here: {}", differences.join("; ")),
        });
    }
    Ok(existing)
}
