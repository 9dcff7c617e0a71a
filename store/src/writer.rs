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

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use arrow_array::{ArrayRef, FixedSizeBinaryArray, RecordBatch, UInt32Array, UInt64Array};
use arrow_buffer::Buffer;
use arrow_schema::SchemaRef;
use bytes::Bytes;
use object_store::{ObjectStoreExt, WriteMultipart};
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;

use crate::error::{Error, Result};
use crate::format::{self, Dtype};
use crate::location::{open_store_with, Location, StoreOptions};
use crate::manifest::{
    build_manifest, limits, parse_versioned, CommitRecord, DatasetHeader, Encoding, HeaderFile, HookStats, Manifest,
    ShardEntry, COMMITS_DIR, FORMAT_VERSION, HEADER_KEY, MANIFEST_KEY, PARTS_DIR, SHARDS_DIR,
};

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

/// `parts/<worker>.json`: one worker of `workers` has committed its whole share. [`finalize`]
/// refuses while fewer than `workers` parts exist, so a dataset is never finalized with a
/// worker's share missing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartRecord {
    pub format_version: u32,
    pub dataset_id: String,
    pub worker: String,
    /// How many workers share the dataset.
    pub workers: usize,
    /// Rows and shards this worker committed.
    pub rows: u64,
    pub shards: usize,
}

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
    /// same dataset concurrently; [`finalize`] merges them.
    pub worker: String,
    /// Multipart parts uploaded concurrently (default 4).
    pub upload_concurrency: usize,
    /// Appended batches queued for the encoding thread before `append` blocks (default 2).
    pub queue_batches: usize,
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
            store: StoreOptions::default(),
        }
    }
}

impl WriterOptions {
    fn shard_target(&self) -> u64 {
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

enum Msg {
    Rows(RowBatch),
    Finish,
}

/// Writes one worker's share of a dataset. A blocking API: it owns a small tokio runtime for its
/// uploads and an encoding thread, so do not call it from inside an async runtime.
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

pub(crate) fn runtime() -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sae-store-io")
        .enable_all()
        .build()
        .map_err(|e| Error::invalid(format!("cannot start the I/O runtime: {e}")))
}

pub(crate) async fn read_header(loc: &Location) -> Result<Option<HeaderFile>> {
    match loc.get_bounded(HEADER_KEY, limits::MAX_METADATA_BYTES).await? {
        None => Ok(None),
        Some(b) => parse_versioned(&b, &loc.display(HEADER_KEY), &loc.url).map(Some),
    }
}

pub(crate) async fn list_commits(loc: &Location, worker: Option<&str>) -> Result<Vec<CommitRecord>> {
    let dir = match worker {
        Some(w) => format!("{COMMITS_DIR}/{w}"),
        None => COMMITS_DIR.to_string(),
    };
    let mut out = Vec::new();
    for (key, _) in loc.list(&dir).await? {
        if !key.ends_with(".json") {
            continue;
        }
        let bytes = loc
            .get_bounded(&key, limits::MAX_METADATA_BYTES)
            .await?
            .ok_or_else(|| Error::BadMetadata { location: loc.display(&key), detail: "listed but vanished".into() })?;
        let rec: CommitRecord = parse_versioned(&bytes, &loc.display(&key), &loc.url)?;
        out.push(rec);
    }
    out.sort_by(|a, b| (&a.worker, a.seq).cmp(&(&b.worker, b.seq)));
    Ok(out)
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

fn commit_key(worker: &str, seq: u64) -> String {
    format!("{COMMITS_DIR}/{worker}/{seq:08}.json")
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
            if loc.get(MANIFEST_KEY).await?.is_some() {
                return Err(Error::AlreadyExists {
                    location: loc.display(MANIFEST_KEY),
                    what: "the dataset is already final".into(),
                });
            }
            let fresh = HeaderFile { format_version: FORMAT_VERSION, dataset_id: random_hex(), header, encoding };
            let body = serde_json::to_vec_pretty(&fresh).expect("header serializes");
            let header_file = if loc.put_create(HEADER_KEY, body.into()).await? {
                fresh
            } else {
                let existing = read_header(&loc).await?.ok_or_else(|| Error::BadMetadata {
                    location: loc.display(HEADER_KEY),
                    detail: "exists but cannot be read".into(),
                })?;
                let mut differences = existing.header.differences(&fresh.header);
                if existing.encoding != fresh.encoding {
                    differences.push(format!("encoding {:?} here, {:?} asked", existing.encoding, fresh.encoding));
                }
                if !differences.is_empty() {
                    return Err(Error::AlreadyExists {
                        location: loc.display(HEADER_KEY),
                        what: format!("a different dataset is being written here: {}", differences.join("; ")),
                    });
                }
                existing
            };
            let resumed = list_commits(&loc, Some(&opts.worker)).await?;
            Ok((header_file, resumed))
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
            .name("sae-store-encode".into())
            .spawn(move || enc.run(rx))
            .map_err(|e| Error::invalid(format!("cannot start the encoding thread: {e}")))?;
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

    fn join_error(&mut self) -> Error {
        if let Some(f) = &self.failed {
            return Error::WriterFailed(f.clone());
        }
        self.tx = None;
        let msg = match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => e.to_string(),
            Some(Ok(Ok(_))) => "the writer was already finished".into(),
            Some(Err(_)) => "the encoding thread panicked".into(),
            None => "the writer was already finished".into(),
        };
        self.failed = Some(msg.clone());
        Error::WriterFailed(msg)
    }

    /// Write the last (partial) shard and commit it; do not write the manifest. Use this when
    /// several workers write one dataset, then call [`finalize`] once. Returns every commit
    /// record of this worker, resumed ones included.
    pub fn finish_worker(mut self) -> Result<Vec<CommitRecord>> {
        let tx = self.tx.take().ok_or_else(|| Error::WriterFailed("already finished".into()))?;
        let _ = tx.send(Msg::Finish);
        drop(tx);
        let new = match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r?,
            Some(Err(_)) => return Err(Error::WriterFailed("the encoding thread panicked".into())),
            None => return Err(Error::WriterFailed("already finished".into())),
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

fn validate(h: &HeaderFile, b: &RowBatch) -> Result<()> {
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

/// Rows waiting to fill a row group, already converted to the stored dtype.
struct Pending {
    sequence_id: Vec<u64>,
    position: Vec<u32>,
    token_id: Vec<u32>,
    /// Per hook (in header order): stored bytes, byte-planar rows.
    acts: Vec<Vec<u8>>,
    /// Stats per future row group (slot k covers pending rows k*R..(k+1)*R), per hook.
    stats: std::collections::VecDeque<Vec<HookStats>>,
}

struct Shard {
    seq: u64,
    key: String,
    arrow: ArrowWriter<Vec<u8>>,
    upload: WriteMultipart,
    sha: Sha256,
    written: u64,
    crcs: Vec<Vec<u32>>,
    row_groups: Vec<u64>,
    rows: u64,
    seq_range: [u64; 2],
    stats: Vec<HookStats>,
}

struct Encoder {
    rt: Arc<Runtime>,
    loc: Location,
    header: HeaderFile,
    opts: WriterOptions,
    schema: SchemaRef,
    props: WriterProperties,
    next_seq: u64,
    pending: Pending,
    shard: Option<Shard>,
    committed: Vec<CommitRecord>,
    progress: Arc<ProgressCounters>,
}

impl Encoder {
    fn new(rt: Arc<Runtime>, loc: Location, header: HeaderFile, opts: WriterOptions, next_seq: u64) -> Result<Self> {
        let hooks = &header.header.hooks;
        let schema = format::shard_schema(hooks, opts.dtype);
        // One page per row group per column: BYTE_STREAM_SPLIT then sees long streams.
        let rg_bytes = opts.row_group_rows * hooks.iter().map(|h| h.d_model).max().unwrap_or(1) * opts.dtype.size();
        let props = format::writer_properties(hooks, opts.zstd_level, opts.row_group_rows, rg_bytes + 1)?;
        let pending = Pending {
            sequence_id: Vec::new(),
            position: Vec::new(),
            token_id: Vec::new(),
            acts: vec![Vec::new(); hooks.len()],
            stats: Default::default(),
        };
        Ok(Encoder {
            rt,
            loc,
            header,
            opts,
            schema,
            props,
            next_seq,
            pending,
            shard: None,
            committed: Vec::new(),
            progress: Arc::default(),
        })
    }

    fn run(mut self, rx: Receiver<Msg>) -> Result<Vec<CommitRecord>> {
        let r = self.run_inner(&rx);
        if r.is_err() {
            self.abort();
        }
        r?;
        Ok(self.committed)
    }

    fn run_inner(&mut self, rx: &Receiver<Msg>) -> Result<()> {
        loop {
            match rx.recv() {
                Ok(Msg::Rows(b)) => {
                    self.push(b);
                    while self.pending.sequence_id.len() >= self.opts.row_group_rows {
                        self.write_row_group(self.opts.row_group_rows)?;
                    }
                }
                Ok(Msg::Finish) => {
                    let n = self.pending.sequence_id.len();
                    if n > 0 {
                        self.write_row_group(n)?;
                    }
                    if self.shard.is_some() {
                        self.close_shard()?;
                    }
                    return Ok(());
                }
                Err(_) => {
                    // The writer was dropped without finish: abandon the shard in progress.
                    self.abort();
                    return Ok(());
                }
            }
        }
    }

    fn abort(&mut self) {
        if let Some(s) = self.shard.take() {
            let key = s.key.clone();
            if let Err(e) = self.rt.block_on(s.upload.abort()) {
                tracing::warn!("aborting the upload of {key}: {e}");
            }
        }
    }

    fn push(&mut self, b: RowBatch) {
        let dtype = self.opts.dtype;
        let r = self.opts.row_group_rows;
        let hooks = &self.header.header.hooks;
        let p = &mut self.pending;
        let base = p.sequence_id.len();
        let n = b.rows();
        let slots_needed = (base + n).div_ceil(r);
        while p.stats.len() < slots_needed {
            p.stats.push_back(hooks.iter().map(|h| HookStats::new(h.d_model)).collect());
        }
        for (i, spec) in hooks.iter().enumerate() {
            let (_, v) = b.activations.iter().find(|(n, _)| n == &spec.name).expect("validated");
            let d = spec.d_model;
            // Rows in segments that each fall into one future row group's stats slot.
            let mut row = 0;
            while row < n {
                let slot = (base + row) / r;
                let end = n.min((slot + 1) * r - base);
                encode_rows_planar(dtype, &v[row * d..end * d], d, &mut p.acts[i], &mut p.stats[slot][i]);
                row = end;
            }
        }
        p.sequence_id.extend_from_slice(&b.sequence_id);
        p.position.extend_from_slice(&b.position);
        p.token_id.extend_from_slice(&b.token_id);
    }

    fn open_shard(&mut self) -> Result<Shard> {
        let seq = self.next_seq;
        let key = format!("{SHARDS_DIR}/{}-{seq:08}-{}.parquet", self.opts.worker, &random_hex()[..8]);
        let path = self.loc.path(&key);
        let upload = self
            .rt
            .block_on(self.loc.store.put_multipart(&path))
            .map_err(|e| Error::store("start multipart upload", self.loc.display(&key), e))?;
        let arrow = ArrowWriter::try_new(Vec::new(), self.schema.clone(), Some(self.props.clone()))
            .map_err(|e| Error::Parquet { key: key.clone(), source: e })?;
        Ok(Shard {
            seq,
            key,
            arrow,
            upload: WriteMultipart::new(upload),
            sha: Sha256::new(),
            written: 0,
            crcs: Vec::new(),
            row_groups: Vec::new(),
            rows: 0,
            seq_range: [u64::MAX, 0],
            stats: self.header.header.hooks.iter().map(|h| HookStats::new(h.d_model)).collect(),
        })
    }

    /// Encode the first `n` pending rows as one row group and send its bytes to the upload.
    fn write_row_group(&mut self, n: usize) -> Result<()> {
        if self.shard.is_none() {
            let s = self.open_shard()?;
            self.shard = Some(s);
        }
        let hooks = self.header.header.hooks.clone();
        let dtype = self.opts.dtype;
        let p = &mut self.pending;
        let seq_ids: Vec<u64> = p.sequence_id.drain(..n).collect();
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from(seq_ids.clone())),
            Arc::new(UInt32Array::from(p.position.drain(..n).collect::<Vec<_>>())),
            Arc::new(UInt32Array::from(p.token_id.drain(..n).collect::<Vec<_>>())),
        ];
        // Row groups are cut at multiples of R (or take all that is left): slot 0 is theirs.
        let rg_stats = p.stats.pop_front().expect("a stats slot per pending row group");
        for (i, h) in hooks.iter().enumerate() {
            let width = h.d_model * dtype.size();
            let rest = p.acts[i].split_off(n * width);
            let mine = std::mem::replace(&mut p.acts[i], rest);
            cols.push(Arc::new(FixedSizeBinaryArray::new(width as i32, Buffer::from_vec(mine), None)));
        }
        let batch = RecordBatch::try_new(self.schema.clone(), cols).expect("schema matches columns");
        let shard = self.shard.as_mut().unwrap();
        let key = shard.key.clone();
        let pq = |e| Error::Parquet { key: key.clone(), source: e };
        shard.arrow.write(&batch).map_err(pq)?;
        shard.arrow.flush().map_err(pq)?;
        shard.arrow.sync().map_err(|e| pq(e.into()))?;
        let buf = std::mem::take(shard.arrow.inner_mut());
        let base = shard.written;
        let rg = shard.arrow.flushed_row_groups().last().expect("a row group was flushed");
        let mut crcs = Vec::with_capacity(rg.num_columns());
        for c in rg.columns() {
            let (start, len) = c.byte_range();
            let lo = (start - base) as usize;
            crcs.push(crc32c::crc32c(&buf[lo..lo + len as usize]));
        }
        shard.crcs.push(crcs);
        shard.row_groups.push(n as u64);
        shard.rows += n as u64;
        shard.seq_range[0] = shard.seq_range[0].min(*seq_ids.iter().min().unwrap());
        shard.seq_range[1] = shard.seq_range[1].max(*seq_ids.iter().max().unwrap());
        for (a, b) in shard.stats.iter_mut().zip(&rg_stats) {
            a.merge(b);
        }
        self.send(buf)?;
        let shard = self.shard.as_ref().unwrap();
        if shard.written >= self.opts.shard_target() {
            self.close_shard()?;
        }
        Ok(())
    }

    fn send(&mut self, buf: Vec<u8>) -> Result<()> {
        let shard = self.shard.as_mut().unwrap();
        shard.sha.update(&buf);
        shard.written += buf.len() as u64;
        let conc = self.opts.upload_concurrency.max(1);
        let loc = &self.loc;
        let key = &shard.key;
        self.rt.block_on(async {
            shard
                .upload
                .wait_for_capacity(conc)
                .await
                .map_err(|e| Error::store("upload part of", loc.display(key), e))?;
            shard.upload.put(Bytes::from(buf));
            Ok(())
        })
    }

    fn close_shard(&mut self) -> Result<()> {
        let shard = self.shard.as_mut().unwrap();
        let key = shard.key.clone();
        let pq = |e| Error::Parquet { key: key.clone(), source: e };
        shard.arrow.append_key_value_metadata(KeyValue::new(
            format::KV_CHUNK_CRC.to_string(),
            serde_json::to_string(&shard.crcs).unwrap(),
        ));
        shard.arrow.append_key_value_metadata(KeyValue::new(
            format::KV_DATASET_ID.to_string(),
            self.header.dataset_id.clone(),
        ));
        shard.arrow.finish().map_err(pq)?;
        shard.arrow.sync().map_err(|e| pq(e.into()))?;
        let tail = std::mem::take(shard.arrow.inner_mut());
        // The file ends with: metadata, its length (u32 LE), "PAR1".
        if tail.len() < 8 || &tail[tail.len() - 4..] != b"PAR1" {
            return Err(Error::corrupt(&key, "the writer produced no footer"));
        }
        let meta_len = u32::from_le_bytes(tail[tail.len() - 8..tail.len() - 4].try_into().unwrap()) as usize;
        let footer_len = meta_len + 8;
        if footer_len > tail.len() {
            return Err(Error::corrupt(&key, "footer split across row group flushes"));
        }
        let footer_crc32c = crc32c::crc32c(&tail[tail.len() - footer_len..]);
        self.send(tail)?;
        let shard = self.shard.take().unwrap();
        let bytes = shard.written;
        let checksum = format!("sha256:{:x}", shard.sha.finalize());
        let upload = shard.upload;
        let loc = &self.loc;
        let rt = &self.rt;
        rt.block_on(async {
            match upload.finish().await {
                Ok(_) => Ok(()),
                Err(e) => Err(Error::store("complete upload of", loc.display(&key), e)),
            }
        })?;
        let stats: BTreeMap<String, HookStats> =
            self.header.header.hooks.iter().map(|h| h.name.clone()).zip(shard.stats).collect();
        let rec = CommitRecord {
            format_version: FORMAT_VERSION,
            dataset_id: self.header.dataset_id.clone(),
            worker: self.opts.worker.clone(),
            seq: shard.seq,
            shard: ShardEntry {
                key: key.clone(),
                rows: shard.rows,
                bytes,
                checksum,
                first_row: 0,
                row_groups: shard.row_groups,
                footer_len: footer_len as u64,
                footer_crc32c,
                sequence_ids: shard.seq_range,
                stats,
            },
        };
        let ckey = commit_key(&self.opts.worker, shard.seq);
        let body = serde_json::to_vec(&rec).expect("commit record serializes");
        if !rt.block_on(loc.put_create(&ckey, body.into()))? {
            // No record names this writer's object (its key is its own): remove it, so the
            // dataset holds nothing that is not committed.
            rt.block_on(loc.delete(&key))?;
            return Err(Error::AlreadyExists {
                location: loc.display(&ckey),
                what: format!("another writer with worker id `{}` committed this shard first", self.opts.worker),
            });
        }
        // A finalize may have run around this commit. If its manifest lists the shard, the rows
        // are in the dataset; if not, they are not, which must be an error here rather than a
        // success that loses them. The commit and the object are then withdrawn, so the dataset
        // stays exactly as finalized.
        if let Some(bytes) = rt.block_on(loc.get_bounded(MANIFEST_KEY, limits::MAX_METADATA_BYTES))? {
            let manifest: Manifest = parse_versioned(&bytes, &loc.display(MANIFEST_KEY), &loc.url)?;
            if !manifest.shards.iter().any(|s| s.key == key) {
                rt.block_on(loc.delete(&ckey))?;
                rt.block_on(loc.delete(&key))?;
                return Err(Error::AlreadyExists {
                    location: loc.display(MANIFEST_KEY),
                    what: format!(
                        "the dataset was finalized before worker `{}` committed shard {} ({} rows); those rows are not in it, and the shard was removed",
                        self.opts.worker, shard.seq, rec.shard.rows
                    ),
                });
            }
        }
        self.next_seq += 1;
        self.progress.add(1, rec.shard.bytes, rec.shard.rows);
        self.committed.push(rec);
        Ok(())
    }
}

/// Encode f32 rows into byte-planar rows of `dtype` (see `format::to_planar`), adding the
/// stored (rounded) values to `st` in f64.
pub(crate) fn encode_rows_planar(dtype: Dtype, src: &[f32], d: usize, out: &mut Vec<u8>, st: &mut HookStats) {
    let s = dtype.size();
    let start = out.len();
    out.resize(start + src.len() * s, 0);
    for (row, dst) in src.chunks_exact(d).zip(out[start..].chunks_exact_mut(d * s)) {
        let mut sq = 0f64;
        match dtype {
            Dtype::Bf16 | Dtype::F16 => {
                let (lo, hi) = dst.split_at_mut(d);
                for (j, &x) in row.iter().enumerate() {
                    let (bits, v) = if dtype == Dtype::Bf16 {
                        let h = half::bf16::from_f32(x);
                        (h.to_bits(), h.to_f32())
                    } else {
                        let h = half::f16::from_f32(x);
                        (h.to_bits(), h.to_f32())
                    };
                    lo[j] = bits as u8;
                    hi[j] = (bits >> 8) as u8;
                    let v = v as f64;
                    st.sum[j] += v;
                    sq += v * v;
                }
            }
            Dtype::F32 => {
                for (j, &x) in row.iter().enumerate() {
                    for (b, byte) in x.to_le_bytes().into_iter().enumerate() {
                        dst[b * d + j] = byte;
                    }
                    let v = x as f64;
                    st.sum[j] += v;
                    sq += v * v;
                }
            }
        }
        st.sum_sq_norm += sq;
        st.count += 1;
    }
}

/// Add rows of stored values (row-major, `d` per row) to `st`, in f64. (The reference for
/// `encode_rows_planar`'s fused statistics.)
#[cfg(test)]
pub(crate) fn accumulate_stats(dtype: Dtype, bytes: &[u8], d: usize, st: &mut HookStats) {
    let row_bytes = d * dtype.size();
    let mut row = Vec::with_capacity(d);
    for r in bytes.chunks_exact(row_bytes) {
        row.clear();
        dtype.decode_to_f32(r, &mut row);
        let mut sq = 0f64;
        for (s, &v) in st.sum.iter_mut().zip(&row) {
            let v = v as f64;
            *s += v;
            sq += v * v;
        }
        st.sum_sq_norm += sq;
        st.count += 1;
    }
}

/// Merge every commit record of the dataset at `url` into `manifest.json` (created with
/// `PutMode::Create`: a second finalize fails with [`Error::AlreadyExists`]), then delete the
/// objects under `shards/` that no commit record names.
///
/// Refuses unless every worker has finished: each worker that committed a shard must have its
/// part record ([`DatasetWriter::finish_part`]), the part records must agree on the number of
/// workers and all of them must be there, and that number must be `workers` when given.
pub fn finalize(url: &str, store: &StoreOptions, workers: Option<usize>) -> Result<Manifest> {
    let loc = open_store_with(url, store)?;
    finalize_at(&loc, workers)
}

/// [`finalize`] on an opened location.
pub fn finalize_at(loc: &Location, workers: Option<usize>) -> Result<Manifest> {
    runtime()?.block_on(finalize_async(loc, workers))
}

/// Every worker that committed, and every worker of the declared count, has recorded its part.
async fn check_parts(
    loc: &Location,
    dataset_id: &str,
    commits: &[CommitRecord],
    declared: Option<usize>,
) -> Result<()> {
    let mut parts = Vec::new();
    for (key, _) in loc.list(PARTS_DIR).await? {
        let bytes = loc
            .get_bounded(&key, limits::MAX_METADATA_BYTES)
            .await?
            .ok_or_else(|| Error::BadMetadata { location: loc.display(&key), detail: "listed but vanished".into() })?;
        let part: PartRecord = parse_versioned(&bytes, &loc.display(&key), &loc.url)?;
        if part.dataset_id != dataset_id {
            return Err(Error::BadMetadata {
                location: loc.display(&key),
                detail: format!("belongs to dataset {}", part.dataset_id),
            });
        }
        parts.push(part);
    }
    let refuse = |why: String| Err(Error::invalid(format!("cannot finalize {}: {why}", loc.url)));
    let finished: BTreeSet<&str> = parts.iter().map(|p| p.worker.as_str()).collect();
    let unfinished: BTreeSet<&str> =
        commits.iter().map(|c| c.worker.as_str()).filter(|w| !finished.contains(w)).collect();
    if !unfinished.is_empty() {
        let names: Vec<&str> = unfinished.into_iter().collect();
        return refuse(format!(
            "worker(s) {} committed shards but never finished (no part record); run them again to finish their share",
            names.join(", ")
        ));
    }
    let Some(workers) = parts.first().map(|p| p.workers) else {
        return refuse("no worker has finished (no part records under parts/)".into());
    };
    if let Some(odd) = parts.iter().find(|p| p.workers != workers) {
        return refuse(format!("worker {} was run with {} workers, another with {workers}", odd.worker, odd.workers));
    }
    if let Some(declared) = declared.filter(|&d| d != workers) {
        return refuse(format!("it was written by {workers} workers, not the {declared} given with --workers"));
    }
    if parts.len() < workers {
        return refuse(format!(
            "only {} of {workers} workers have finished ({}); run the missing workers first",
            parts.len(),
            finished.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(())
}

pub(crate) async fn finalize_async(loc: &Location, workers: Option<usize>) -> Result<Manifest> {
    let header = read_header(loc).await?.ok_or_else(|| Error::NotFound {
        url: loc.url.clone(),
        what: format!("no {HEADER_KEY}: nothing was written here"),
    })?;
    let commits = list_commits(loc, None).await?;
    check_parts(loc, &header.dataset_id, &commits, workers).await?;
    let objects: BTreeMap<String, u64> = loc.list(SHARDS_DIR).await?.into_iter().map(|(k, m)| (k, m.size)).collect();
    for c in &commits {
        let where_ = loc.display(&commit_key(&c.worker, c.seq));
        if c.dataset_id != header.dataset_id {
            return Err(Error::BadMetadata {
                location: where_,
                detail: format!("belongs to dataset {}", c.dataset_id),
            });
        }
        match objects.get(&c.shard.key) {
            Some(&size) if size == c.shard.bytes => {}
            Some(&size) => {
                return Err(Error::corrupt(
                    &c.shard.key,
                    format!("committed with {} bytes, the object has {size}", c.shard.bytes),
                ))
            }
            None => return Err(Error::corrupt(&c.shard.key, "committed but missing from the store")),
        }
    }
    let manifest = build_manifest(&header, &commits);
    let body = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    if !loc.put_create(MANIFEST_KEY, body.into()).await? {
        return Err(Error::AlreadyExists {
            location: loc.display(MANIFEST_KEY),
            what: "the dataset was already finalized".into(),
        });
    }
    // A commit that landed after the listing above is not in the manifest; its worker fails (it
    // finds the manifest after committing), and its object is left alone: finalize never
    // deletes an object that a commit record names.
    let mut keep: BTreeSet<String> = manifest.shards.iter().map(|s| s.key.clone()).collect();
    for late in list_commits(loc, None).await? {
        if keep.insert(late.shard.key.clone()) {
            tracing::warn!(
                "{} was committed after the manifest was written; its rows are not in the dataset",
                loc.display(&late.shard.key)
            );
        }
    }
    for key in objects.keys() {
        if !keep.contains(key.as_str()) {
            tracing::info!("removing {} (not committed)", loc.display(key));
            loc.delete(key).await?;
        }
    }
    remove_stale_staging_files(loc);
    Ok(manifest)
}

/// A local staging file untouched for this long belongs to a killed upload, not one in flight.
pub const STALE_STAGING_AGE: std::time::Duration = std::time::Duration::from_secs(300);

/// A local multipart upload that was killed leaves a staging file `<key>#<n>`, which the object
/// store API does not list; those older than [`STALE_STAGING_AGE`] are removed. Younger ones may
/// belong to an upload still in flight in another process (a duplicate worker), which must fail
/// on its own terms, not because its file vanished. (On S3, an abandoned multipart upload stays
/// invisible and is reclaimed by the bucket's AbortIncompleteMultipartUpload lifecycle rule.)
fn remove_stale_staging_files(loc: &Location) {
    let Some(dir) = &loc.local_dir else { return };
    let Ok(entries) = std::fs::read_dir(dir.join(SHARDS_DIR)) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some((base, n)) = name.rsplit_once('#') else { continue };
        if !(base.ends_with(".parquet") && n.chars().all(|c| c.is_ascii_digit())) {
            continue;
        }
        let age = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if age.is_some_and(|age| age >= STALE_STAGING_AGE) {
            let _ = std::fs::remove_file(e.path());
        } else {
            tracing::info!("leaving {} (an upload that may still be in flight)", e.path().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_encoding_matches_encode_then_planarize() {
        let d = 7;
        let src: Vec<f32> = (0..5 * d).map(|i| (i as f32 * 0.731).sin() * 40.0).collect();
        for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            let mut fused = Vec::new();
            let mut st = HookStats::new(d);
            encode_rows_planar(dtype, &src, d, &mut fused, &mut st);
            let mut le = Vec::new();
            dtype.encode_f32(&src, &mut le);
            let mut planar = Vec::new();
            format::to_planar(&le, d, dtype.size(), &mut planar);
            assert_eq!(fused, planar, "{dtype:?}");
            let mut want = HookStats::new(d);
            accumulate_stats(dtype, &le, d, &mut want);
            assert_eq!(st, want, "{dtype:?}");
        }
    }
}
