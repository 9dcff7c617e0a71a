//! The streaming reader: batches of rows of one hook, as plain buffers.
//!
//! * The unit of work is the row group. Each epoch, the row groups are permuted (seed, epoch),
//!   then dealt to ranks longest-first onto the least-loaded rank, so ranks get disjoint row
//!   groups balanced by rows, and every rank yields the same number of batches per epoch
//!   (the floor of the smallest rank's rows over the batch size; the rest is dropped).
//! * Within a rank, rows are permuted within windows of `window_row_groups` consecutive row
//!   groups, so rows from different shards mix. The order is a pure function of
//!   (seed, epoch, rank, world), so the position is just a [`Cursor`] (epoch, batch).
//! * Row groups are fetched ahead (`prefetch_row_groups` concurrent range reads on a tokio
//!   runtime), checked against their CRC-32C, and decoded on a thread pool. Decoded bytes in
//!   flight are bounded by `max_bytes_in_flight`.
//! * Follow mode reads a dataset that is still being written: it picks up shards as their commit
//!   records appear and ends once `manifest.json` exists and every listed shard was read.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow_array::{Array, FixedSizeBinaryArray, UInt32Array, UInt64Array};
use bytes::Bytes;
use futures::StreamExt;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use parquet::basic::{Encoding as ParquetEncoding, Type as PhysicalType};
use parquet::column::page::Page;
use parquet::file::metadata::ParquetMetaDataReader;
use parquet::file::reader::{ChunkReader, Length};
use parquet::file::serialized_reader::SerializedPageReader;
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, OnceCell, Semaphore};

use crate::error::{panic_message, Error, Result};
use crate::format::{self, Dtype};
use crate::location::{open_store_with, Location, StoreOptions};
use crate::manifest::{limits, parse_versioned, Manifest, ShardEntry, HEADER_KEY, MANIFEST_KEY};
use crate::rng::{permutation, SplitMix64};
use crate::writer::{list_commits, read_header, runtime};

/// The reader's position: the next batch to yield is batch `batch` of epoch `epoch`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub batch: u64,
}

/// The element type of [`Batch::bytes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputDtype {
    /// The dataset's stored dtype (bf16 by default): no conversion, half the bytes.
    #[default]
    Stored,
    /// f32, converted exactly on the decoding threads.
    F32,
}

/// Token columns of the rows of a batch, in the batch's row order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenColumns {
    pub sequence_id: Vec<u64>,
    pub position: Vec<u32>,
    pub token_id: Vec<u32>,
}

/// A batch of rows of one hook: `rows x d` values of `dtype`, row-major, little-endian.
#[derive(Clone, Debug)]
pub struct Batch {
    pub hook: String,
    pub dtype: Dtype,
    pub rows: usize,
    pub d: usize,
    pub bytes: Vec<u8>,
    /// Present when [`ReaderOptions::with_tokens`] is set.
    pub tokens: Option<TokenColumns>,
    /// The cursor of this batch.
    pub cursor: Cursor,
    /// The cursor to save to resume after this batch.
    pub next: Cursor,
}

impl Batch {
    /// The values as f32 (exact for every stored dtype).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.d);
        self.dtype.decode_to_f32(&self.bytes, &mut out);
        out
    }
}

#[derive(Clone, Debug)]
pub struct FollowOptions {
    /// How often to list new commit records.
    pub poll: Duration,
    /// Give up when nothing new was committed for this long (None: wait forever).
    pub idle_timeout: Option<Duration>,
    /// Shard keys in the order an earlier reader of the same run discovered them
    /// ([`Reader::shard_order`] as a checkpoint saved it). They are read first, in that order,
    /// so that a resumed reader sees the rows in the order the interrupted one did.
    pub replay: Vec<String>,
}

impl Default for FollowOptions {
    fn default() -> Self {
        FollowOptions { poll: Duration::from_secs(2), idle_timeout: None, replay: Vec::new() }
    }
}

#[derive(Clone, Debug)]
pub struct ReaderOptions {
    /// The hook to read.
    pub hook: String,
    /// If set, the hook must have this `d_model`.
    pub d_model: Option<usize>,
    /// Rows per batch.
    pub batch_rows: usize,
    pub shuffle: bool,
    pub seed: u64,
    /// Rows are permuted within windows of this many consecutive row groups (default 8).
    pub window_row_groups: usize,
    pub rank: usize,
    pub world: usize,
    /// Where to start.
    pub start: Cursor,
    /// Stop after this many epochs in total (counting from epoch 0). None: loop for ever.
    pub epochs: Option<u64>,
    /// Drop the rows that do not fill a last batch (default true; required when world > 1).
    pub drop_last: bool,
    pub output: OutputDtype,
    /// Also return sequence_id, position and token_id of every row.
    pub with_tokens: bool,
    /// Row groups fetched and decoded concurrently (default 8).
    pub prefetch_row_groups: usize,
    /// Threads decoding row groups (default: available parallelism).
    pub decode_threads: usize,
    /// Bound on decoded bytes held by the reader (default 1 GiB). Must hold one window.
    pub max_bytes_in_flight: usize,
    /// Read a dataset still being written (see the module docs).
    pub follow: Option<FollowOptions>,
    pub store: StoreOptions,
}

impl ReaderOptions {
    pub fn new(hook: &str, batch_rows: usize) -> Self {
        ReaderOptions {
            hook: hook.to_string(),
            d_model: None,
            batch_rows,
            shuffle: true,
            seed: 0,
            window_row_groups: 8,
            rank: 0,
            world: 1,
            start: Cursor::default(),
            epochs: None,
            drop_last: true,
            output: OutputDtype::Stored,
            with_tokens: false,
            prefetch_row_groups: 8,
            decode_threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            max_bytes_in_flight: 1 << 30,
            follow: None,
            store: StoreOptions::default(),
        }
    }

    /// One pass over every row in stored order, decoded to f32, the last batch kept even when
    /// short: what evaluation and feature statistics read.
    pub fn one_pass_in_order(hook: &str, batch_rows: usize) -> Self {
        let mut opts = ReaderOptions::new(hook, batch_rows);
        opts.shuffle = false;
        opts.epochs = Some(1);
        opts.drop_last = false;
        opts.output = OutputDtype::F32;
        opts
    }
}

/// A row group of the dataset, in global order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RgRef {
    pub shard: u32,
    pub rg: u32,
    pub rows: u64,
}

/// The row groups of one rank for one epoch, in reading order: a pure function of
/// (seed, epoch, rank, world).
pub(crate) fn rank_row_groups(
    all: &[RgRef],
    seed: u64,
    epoch: u64,
    rank: usize,
    world: usize,
    shuffle: bool,
) -> Vec<RgRef> {
    let order: Vec<u32> = if shuffle {
        permutation(all.len(), &mut SplitMix64::keyed(&[seed, epoch, 0x7267]))
    } else {
        (0..all.len() as u32).collect()
    };
    // Longest first (stable: equal sizes keep the permuted order), onto the least loaded rank.
    let mut by_size: Vec<u32> = order.clone();
    by_size.sort_by(|a, b| all[*b as usize].rows.cmp(&all[*a as usize].rows));
    let mut loads = vec![0u64; world];
    let mut mine = HashSet::new();
    for i in by_size {
        let r = (0..world).min_by_key(|&r| (loads[r], r)).unwrap();
        loads[r] += all[i as usize].rows;
        if r == rank {
            mine.insert(i);
        }
    }
    order.into_iter().filter(|i| mine.contains(i)).map(|i| all[i as usize]).collect()
}

/// Rows of every rank (epoch-invariant: LPT only depends on the multiset of sizes).
fn rank_loads(all: &[RgRef], world: usize) -> Vec<u64> {
    let mut sizes: Vec<u64> = all.iter().map(|r| r.rows).collect();
    sizes.sort_by(|a, b| b.cmp(a));
    let mut loads = vec![0u64; world];
    for s in sizes {
        let r = (0..world).min_by_key(|&r| (loads[r], r)).unwrap();
        loads[r] += s;
    }
    loads
}

/// One row group to fetch, with where it sits in the rank's stream.
#[derive(Clone, Debug)]
struct Job {
    epoch: u64,
    window: u64,
    /// Row index (within the rank's epoch) of the window's first row.
    window_row_start: u64,
    window_rows: u64,
    window_len: usize,
    rg: RgRef,
}

/// The static part of a plan: the dataset's row groups and the batch arithmetic.
struct Plan {
    all: Vec<RgRef>,
    rank: usize,
    world: usize,
    shuffle: bool,
    seed: u64,
    window: usize,
    batch_rows: u64,
    /// Rows yielded per epoch by this rank (= batches_per_epoch * batch_rows with drop_last).
    epoch_rows: u64,
    batches_per_epoch: u64,
}

impl Plan {
    fn new(all: Vec<RgRef>, o: &ReaderOptions) -> Result<Plan> {
        if o.world == 0 || o.rank >= o.world {
            return Err(Error::invalid(format!("rank {} is not in a world of {}", o.rank, o.world)));
        }
        if o.batch_rows == 0 {
            return Err(Error::invalid("batch_rows must be > 0"));
        }
        if !o.drop_last && o.world > 1 {
            return Err(Error::invalid("drop_last = false needs world = 1 (every rank must yield the same batches)"));
        }
        if all.len() < o.world {
            return Err(Error::invalid(format!(
                "the dataset has {} row groups, fewer than the {} ranks: every rank needs at least one (write smaller row groups)",
                all.len(),
                o.world
            )));
        }
        let loads = rank_loads(&all, o.world);
        let min_rows = *loads.iter().min().unwrap();
        let b = o.batch_rows as u64;
        let (batches_per_epoch, epoch_rows) =
            if o.drop_last { (min_rows / b, (min_rows / b) * b) } else { (min_rows.div_ceil(b), min_rows) };
        if batches_per_epoch == 0 {
            return Err(Error::invalid(format!(
                "rank {} gets {} rows per epoch, less than one batch of {}",
                o.rank, min_rows, o.batch_rows
            )));
        }
        Ok(Plan {
            all,
            rank: o.rank,
            world: o.world,
            shuffle: o.shuffle,
            seed: o.seed,
            window: o.window_row_groups.max(1),
            batch_rows: b,
            epoch_rows,
            batches_per_epoch,
        })
    }

    /// The jobs of one epoch, starting with the window that holds row `from_row`.
    fn epoch_jobs(&self, epoch: u64, from_row: u64) -> Vec<Job> {
        let rgs = rank_row_groups(&self.all, self.seed, epoch, self.rank, self.world, self.shuffle);
        let mut jobs = Vec::new();
        let mut row = 0u64;
        for (w, chunk) in rgs.chunks(self.window).enumerate() {
            let rows: u64 = chunk.iter().map(|r| r.rows).sum();
            let start = row;
            row += rows;
            if row <= from_row || start >= self.epoch_rows {
                continue;
            }
            for rg in chunk {
                jobs.push(Job {
                    epoch,
                    window: w as u64,
                    window_row_start: start,
                    window_rows: rows,
                    window_len: chunk.len(),
                    rg: *rg,
                });
            }
        }
        jobs
    }

    fn window_perm(&self, epoch: u64, window: u64, rows: usize) -> Option<Vec<u32>> {
        self.shuffle.then(|| {
            permutation(
                rows,
                &mut SplitMix64::keyed(&[self.seed, epoch, self.rank as u64, self.world as u64, window, 0x726f77]),
            )
        })
    }
}

/// What the reader learned of a shard from its footer.
struct ShardMeta {
    key: String,
    arrow: ArrowReaderMetadata,
    /// Leaf column indices: the hook, then sequence_id, position, token_id.
    cols: [usize; 4],
    crcs: Vec<Vec<u32>>,
    file_len: u64,
}

/// The decoded rows of one row group, holding its share of the bytes-in-flight budget.
struct Decoded {
    job: Job,
    acts: Vec<u8>,
    tokens: Option<TokenColumns>,
    rows: usize,
    _permit: tokio::sync::OwnedSemaphorePermit,
    buffers: Arc<BufPool>,
}

impl Drop for Decoded {
    fn drop(&mut self) {
        self.buffers.put(std::mem::take(&mut self.acts));
    }
}

/// Recycled row group buffers: fresh multi-megabyte buffers cost page faults and zeroing, which
/// cost more than decoding into them.
struct BufPool {
    bufs: Mutex<Vec<Vec<u8>>>,
    max: usize,
}

impl BufPool {
    /// A buffer of exactly `len` bytes, with unspecified contents.
    fn get(&self, len: usize) -> Vec<u8> {
        let mut bufs = self.bufs.lock().unwrap();
        match bufs.iter().position(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = bufs.swap_remove(i);
                drop(bufs);
                b.resize(len, 0);
                b
            }
            None => vec![0u8; len],
        }
    }

    fn put(&self, b: Vec<u8>) {
        if b.capacity() == 0 {
            return;
        }
        let mut bufs = self.bufs.lock().unwrap();
        if bufs.len() < self.max {
            bufs.push(b);
        }
    }
}

struct Ctx {
    loc: Location,
    hook: String,
    d: usize,
    dtype: Dtype,
    out_dtype: Dtype,
    with_tokens: bool,
    shards: Mutex<Vec<ShardEntry>>,
    metas: Mutex<HashMap<u32, Arc<OnceCell<Arc<ShardMeta>>>>>,
    pool: rayon::ThreadPool,
    buffers: Arc<BufPool>,
}

impl Ctx {
    fn shard(&self, i: u32) -> ShardEntry {
        self.shards.lock().unwrap()[i as usize].clone()
    }

    async fn meta(&self, i: u32) -> Result<Arc<ShardMeta>> {
        let cell = self.metas.lock().unwrap().entry(i).or_default().clone();
        cell.get_or_try_init(|| self.load_meta(i)).await.cloned()
    }

    async fn load_meta(&self, i: u32) -> Result<Arc<ShardMeta>> {
        let s = self.shard(i);
        let footer = self.loc.get_range(&s.key, s.bytes - s.footer_len..s.bytes).await?;
        let meta = parse_footer(&s, &footer)?;
        let cols = check_schema(&s, &meta, &self.hook, self.d, self.dtype)?;
        let crcs = chunk_crcs(&s, &meta)?;
        let arrow = ArrowReaderMetadata::try_new(Arc::new(meta), ArrowReaderOptions::new())
            .map_err(|e| Error::Parquet { key: s.key.clone(), source: e })?;
        Ok(Arc::new(ShardMeta { key: s.key, arrow, cols, crcs, file_len: s.bytes }))
    }

    async fn fetch(self: Arc<Self>, job: Job, sem: Arc<Semaphore>) -> Result<Decoded> {
        let out_size = self.out_dtype.size();
        let kib = ((job.rg.rows as usize * self.d * out_size) >> 10).max(1) as u32;
        let permit = sem.acquire_many_owned(kib).await.expect("semaphore never closed");
        let meta = self.meta(job.rg.shard).await?;
        let rg_meta = meta.arrow.metadata().row_group(job.rg.rg as usize);
        let ncols = if self.with_tokens { 4 } else { 1 };
        let ranges: Vec<Range<u64>> = meta.cols[..ncols]
            .iter()
            .map(|&c| {
                let (start, len) = rg_meta.column(c).byte_range();
                start..start + len
            })
            .collect();
        let path = self.loc.path(&meta.key);
        let parts = self
            .loc
            .store
            .get_ranges(&path, &ranges)
            .await
            .map_err(|e| Error::store("GET (ranges)", self.loc.display(&meta.key), e))?;
        for (k, (&c, part)) in meta.cols[..ncols].iter().zip(&parts).enumerate() {
            let want = meta.crcs[job.rg.rg as usize][c];
            let got = crc32c::crc32c(part);
            if got != want || part.len() as u64 != ranges[k].end - ranges[k].start {
                return Err(Error::corrupt(
                    &meta.key,
                    format!("row group {} column {c}: CRC-32C {got:08x}, the footer says {want:08x}", job.rg.rg),
                ));
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let ctx = self.clone();
        let chunks = Chunks { parts: ranges.iter().map(|r| r.start).zip(parts).collect(), len: meta.file_len };
        let meta2 = meta.clone();
        let rg = job.rg;
        self.pool.spawn(move || {
            // A panic on a rayon thread would abort the process; it is an error of this shard.
            let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                #[cfg(test)]
                failpoints::hit("decode", &ctx.loc.url);
                ctx.decode(&meta2, rg, chunks, ncols)
            }))
            .unwrap_or_else(|payload| {
                Err(Error::corrupt(
                    &meta2.key,
                    format!("decoding row group {} panicked: {}", rg.rg, panic_message(&*payload)),
                ))
            });
            let _ = tx.send(decoded);
        });
        let (acts, tokens) = rx
            .await
            .map_err(|_| Error::corrupt(&meta.key, format!("row group {}: its decoding thread died", job.rg.rg)))??;
        Ok(Decoded { job, acts, tokens, rows: rg.rows as usize, _permit: permit, buffers: self.buffers.clone() })
    }

    /// The fast path for the activation column as this crate writes it: BYTE_STREAM_SPLIT pages
    /// without levels, un-split straight into the output layout (one pass, no Arrow array).
    /// Returns None when a page has another shape; the Arrow path then handles it.
    fn decode_acts_fast(&self, meta: &ShardMeta, rg: RgRef, chunks: Chunks) -> Result<Option<Vec<u8>>> {
        let pq = |e| Error::Parquet { key: meta.key.clone(), source: e };
        let rgm = meta.arrow.metadata().row_group(rg.rg as usize);
        let pages = SerializedPageReader::new(Arc::new(chunks), rgm.column(meta.cols[0]), rg.rows as usize, None)
            .map_err(pq)?;
        let (rows, d, s, os) = (rg.rows as usize, self.d, self.dtype.size(), self.out_dtype.size());
        // Every byte is written below, so a recycled buffer needs no clearing.
        let mut out = self.buffers.get(rows * d * os);
        let mut row0 = 0usize;
        for page in pages {
            let (buf, n) = match page.map_err(pq)? {
                Page::DataPage { buf, num_values, encoding: ParquetEncoding::BYTE_STREAM_SPLIT, .. } => {
                    (buf, num_values as usize)
                }
                Page::DataPageV2 {
                    buf,
                    num_values,
                    encoding: ParquetEncoding::BYTE_STREAM_SPLIT,
                    def_levels_byte_len: 0,
                    rep_levels_byte_len: 0,
                    num_nulls: 0,
                    ..
                } => (buf, num_values as usize),
                Page::DictionaryPage { .. } => return Ok(None),
                _ => return Ok(None),
            };
            if buf.len() != n * d * s || row0 + n > rows {
                return Err(Error::corrupt(
                    &meta.key,
                    format!("row group {}: a page of {} bytes for {n} values", rg.rg, buf.len()),
                ));
            }
            unsplit_planar(self.dtype, self.out_dtype, &buf, n, d, &mut out[row0 * d * os..(row0 + n) * d * os]);
            row0 += n;
        }
        if row0 != rows {
            return Err(Error::corrupt(
                &meta.key,
                format!("row group {} has {row0} rows, the manifest says {rows}", rg.rg),
            ));
        }
        Ok(Some(out))
    }

    fn decode(
        &self,
        meta: &ShardMeta,
        rg: RgRef,
        chunks: Chunks,
        ncols: usize,
    ) -> Result<(Vec<u8>, Option<TokenColumns>)> {
        let pq = |e| Error::Parquet { key: meta.key.clone(), source: e };
        let fast = self.decode_acts_fast(meta, rg, chunks.clone())?;
        let fast = match fast {
            Some(acts) if ncols == 1 => return Ok((acts, None)),
            other => other,
        };
        let cols: Vec<usize> = if fast.is_some() { meta.cols[1..ncols].to_vec() } else { meta.cols[..ncols].to_vec() };
        let mask = ProjectionMask::leaves(meta.arrow.parquet_schema(), cols);
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(chunks, meta.arrow.clone())
            .with_row_groups(vec![rg.rg as usize])
            .with_projection(mask)
            .with_batch_size(rg.rows as usize)
            .build()
            .map_err(pq)?;
        let have_acts = fast.is_some();
        let mut acts = fast.unwrap_or_else(|| Vec::with_capacity(rg.rows as usize * self.d * self.out_dtype.size()));
        let mut tokens = (ncols == 4).then(TokenColumns::default);
        let mut rows = 0usize;
        for b in reader {
            let b = b.map_err(|e| pq(e.into()))?;
            rows += b.num_rows();
            if !have_acts {
                self.acts_from_arrow(meta, &b, &mut acts)?;
            }
            if let Some(t) = tokens.as_mut() {
                let u64col =
                    |n: &str| b.column_by_name(n).and_then(|c| c.as_any().downcast_ref::<UInt64Array>().cloned());
                let u32col =
                    |n: &str| b.column_by_name(n).and_then(|c| c.as_any().downcast_ref::<UInt32Array>().cloned());
                let bad = || Error::corrupt(&meta.key, "token columns have unexpected types");
                t.sequence_id.extend(u64col(format::COL_SEQUENCE_ID).ok_or_else(bad)?.values().iter());
                t.position.extend(u32col(format::COL_POSITION).ok_or_else(bad)?.values().iter());
                t.token_id.extend(u32col(format::COL_TOKEN_ID).ok_or_else(bad)?.values().iter());
            }
        }
        if rows as u64 != rg.rows {
            return Err(Error::corrupt(
                &meta.key,
                format!("row group {} has {rows} rows, the manifest says {}", rg.rg, rg.rows),
            ));
        }
        Ok((acts, tokens))
    }

    fn acts_from_arrow(&self, meta: &ShardMeta, b: &arrow_array::RecordBatch, acts: &mut Vec<u8>) -> Result<()> {
        let width = self.d * self.dtype.size();
        {
            let col = b
                .column_by_name(&self.hook)
                .and_then(|c| c.as_any().downcast_ref::<FixedSizeBinaryArray>())
                .ok_or_else(|| Error::corrupt(&meta.key, format!("column `{}` is not fixed-size binary", self.hook)))?;
            let data = &col.value_data()[col.offset() * width..(col.offset() + col.len()) * width];
            if self.out_dtype == self.dtype {
                format::from_planar(data, self.d, self.dtype.size(), acts);
            } else {
                format::planar_to_f32_bytes(self.dtype, data, self.d, acts);
            }
        }
        Ok(())
    }
}

/// Un-split one BYTE_STREAM_SPLIT page of `n` byte-planar rows straight into little-endian
/// output rows. Stream `b * d + j` holds byte `b` of element `j` of every row.
pub(crate) fn unsplit_planar(dtype: Dtype, out_dtype: Dtype, buf: &[u8], n: usize, d: usize, out: &mut [u8]) {
    assert_eq!(buf.len(), n * d * dtype.size());
    assert_eq!(out.len(), n * d * out_dtype.size());
    match (dtype.size(), out_dtype.size()) {
        (2, 4) if dtype == Dtype::F16 => {
            let mut tmp = vec![0u8; n * d * 2];
            unsplit_blocks::<2, 2>(buf, n, d, &mut tmp);
            for (o, c) in out.chunks_exact_mut(4).zip(tmp.chunks_exact(2)) {
                o.copy_from_slice(&half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32().to_le_bytes());
            }
        }
        (2, 4) => unsplit_blocks::<2, 4>(buf, n, d, out), // bf16 -> f32: the top two bytes
        (2, 2) => unsplit_blocks::<2, 2>(buf, n, d, out),
        (4, 4) => unsplit_blocks::<4, 4>(buf, n, d, out),
        other => unreachable!("element sizes {other:?}"),
    }
}

const UNSPLIT_TILE: usize = 8;

/// The 4 bytes of `x` spread to the even bytes of a u64.
#[inline(always)]
fn spread_bytes(x: u32) -> u64 {
    let mut v = x as u64;
    v = (v | (v << 16)) & 0x0000_FFFF_0000_FFFF;
    (v | (v << 8)) & 0x00FF_00FF_00FF_00FF
}

/// The 2 u16 of `x` spread to the low halves of the two u32 lanes of a u64.
#[inline(always)]
fn spread_u16s(x: u32) -> u64 {
    let v = x as u64;
    (v | (v << 16)) & 0x0000_FFFF_0000_FFFF
}

/// Transpose an 8x8 byte matrix held as 8 little-endian u64 rows.
#[inline(always)]
fn transpose8(m: [u64; 8]) -> [u64; 8] {
    let mut m = m;
    for r in 0..4 {
        let (a, b) = (m[r], m[r + 4]);
        m[r] = (a & 0x0000_0000_FFFF_FFFF) | (b << 32);
        m[r + 4] = (a >> 32) | (b & 0xFFFF_FFFF_0000_0000);
    }
    for r in [0, 1, 4, 5] {
        let (a, b) = (m[r], m[r + 2]);
        m[r] = (a & 0x0000_FFFF_0000_FFFF) | ((b & 0x0000_FFFF_0000_FFFF) << 16);
        m[r + 2] = ((a >> 16) & 0x0000_FFFF_0000_FFFF) | (b & 0xFFFF_0000_FFFF_0000);
    }
    for r in [0, 2, 4, 6] {
        let (a, b) = (m[r], m[r + 1]);
        m[r] = (a & 0x00FF_00FF_00FF_00FF) | ((b & 0x00FF_00FF_00FF_00FF) << 8);
        m[r + 1] = ((a >> 8) & 0x00FF_00FF_00FF_00FF) | (b & 0xFF00_FF00_FF00_FF00);
    }
    m
}

/// `S`-byte planar elements to `OS`-byte little-endian elements (the `S` bytes go to the top
/// of each output element), in blocks of 8 rows x 8 elements transposed in registers.
fn unsplit_blocks<const S: usize, const OS: usize>(buf: &[u8], n: usize, d: usize, out: &mut [u8]) {
    let shift = OS - S;
    let (n8, d8) = (n / 8 * 8, d / 8 * 8);
    // Tiles of UNSPLIT_TILE elements: their streams are read sequentially over all rows (few
    // enough for the prefetcher), and each row's tile of output is a cache line or two.
    for jt in (0..d8).step_by(UNSPLIT_TILE) {
        for i0 in (0..n8).step_by(8) {
            for j0 in (jt..(jt + UNSPLIT_TILE).min(d8)).step_by(8) {
                let mut planes = [[0u64; 8]; S];
                for (b, plane) in planes.iter_mut().enumerate() {
                    let mut m = [0u64; 8];
                    for (jj, w) in m.iter_mut().enumerate() {
                        let off = (b * d + j0 + jj) * n + i0;
                        *w = u64::from_le_bytes(buf[off..off + 8].try_into().unwrap());
                    }
                    *plane = transpose8(m);
                }
                if S == 2 && OS == 4 {
                    // bf16 -> f32: interleave low and high bytes into u16 pairs, then place each pair
                    // in the top half of a u32 lane, two lanes per u64 store.
                    for (ii, (&lo, &hi)) in planes[0].iter().zip(&planes[1]).enumerate() {
                        let o = ((i0 + ii) * d + j0) * 4;
                        let row = &mut out[o..o + 32];
                        for half_ in 0..2 {
                            let pairs = spread_bytes((lo >> (32 * half_)) as u32)
                                | (spread_bytes((hi >> (32 * half_)) as u32) << 8);
                            for q in 0..2 {
                                let two = spread_u16s((pairs >> (32 * q)) as u32) << 16;
                                let at = half_ * 16 + q * 8;
                                row[at..at + 8].copy_from_slice(&two.to_le_bytes());
                            }
                        }
                    }
                    continue;
                }
                for ii in 0..8 {
                    let o = ((i0 + ii) * d + j0) * OS;
                    let row = &mut out[o..o + 8 * OS];
                    for k in 0..8 {
                        for (b, plane) in planes.iter().enumerate() {
                            row[k * OS + shift + b] = (plane[ii] >> (8 * k)) as u8;
                        }
                    }
                }
            }
        }
    }
    // Edges: rows past the last multiple of 8, and elements past the last multiple of 8.
    let mut scalar = |i: usize, j: usize| {
        let o = (i * d + j) * OS;
        out[o..o + shift].fill(0);
        for b in 0..S {
            out[o + shift + b] = buf[(b * d + j) * n + i];
        }
    };
    for i in n8..n {
        for j in 0..d {
            scalar(i, j);
        }
    }
    for i in 0..n8 {
        for j in d8..d {
            scalar(i, j);
        }
    }
}

/// The fetched byte ranges of a shard, served to the Parquet decoder.
#[derive(Clone)]
struct Chunks {
    parts: Vec<(u64, Bytes)>,
    len: u64,
}

impl Length for Chunks {
    fn len(&self) -> u64 {
        self.len
    }
}

impl ChunkReader for Chunks {
    type T = bytes::buf::Reader<Bytes>;
    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        use bytes::Buf;
        // At least one byte must lie in the part: fetched ranges are often adjacent.
        let (off, b) = self.find(start, 1)?;
        Ok(b.slice((start - off) as usize..).reader())
    }
    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let (off, b) = self.find(start, length)?;
        let lo = (start - off) as usize;
        Ok(b.slice(lo..lo + length))
    }
}

impl Chunks {
    fn find(&self, start: u64, length: usize) -> parquet::errors::Result<(u64, &Bytes)> {
        self.parts
            .iter()
            .find(|(off, b)| start >= *off && start + length as u64 <= off + b.len() as u64)
            .map(|(o, b)| (*o, b))
            .ok_or_else(|| parquet::errors::ParquetError::General(format!("range {start}+{length} was not fetched")))
    }
}

pub(crate) fn parse_footer(s: &ShardEntry, footer: &[u8]) -> Result<parquet::file::metadata::ParquetMetaData> {
    let crc = crc32c::crc32c(footer);
    if crc != s.footer_crc32c {
        return Err(Error::corrupt(
            &s.key,
            format!("footer CRC-32C {crc:08x}, the manifest says {:08x}", s.footer_crc32c),
        ));
    }
    if footer.len() < 8 || &footer[footer.len() - 4..] != b"PAR1" {
        return Err(Error::corrupt(&s.key, "no Parquet footer"));
    }
    ParquetMetaDataReader::decode_metadata(&footer[..footer.len() - 8])
        .map_err(|e| Error::Parquet { key: s.key.clone(), source: e })
}

/// Check the shard's schema and row groups against the manifest; return the leaf column indices
/// of the hook and of sequence_id, position, token_id.
pub(crate) fn check_schema(
    s: &ShardEntry,
    meta: &parquet::file::metadata::ParquetMetaData,
    hook: &str,
    d: usize,
    dtype: Dtype,
) -> Result<[usize; 4]> {
    let schema = meta.file_metadata().schema_descr();
    let find = |name: &str| (0..schema.num_columns()).find(|&i| schema.column(i).path().parts() == [name.to_string()]);
    let bad = |detail: String| Error::corrupt(&s.key, detail);
    let h = find(hook).ok_or_else(|| bad(format!("no column `{hook}`")))?;
    let c = schema.column(h);
    if c.physical_type() != PhysicalType::FIXED_LEN_BYTE_ARRAY || c.type_length() as usize != d * dtype.size() {
        return Err(bad(format!(
            "column `{hook}` is {:?}({}), expected FIXED_LEN_BYTE_ARRAY({}) for d_model {d} in {}",
            c.physical_type(),
            c.type_length(),
            d * dtype.size(),
            dtype.name()
        )));
    }
    let mut cols = [h, 0, 0, 0];
    for (k, (name, ty)) in [
        (format::COL_SEQUENCE_ID, PhysicalType::INT64),
        (format::COL_POSITION, PhysicalType::INT32),
        (format::COL_TOKEN_ID, PhysicalType::INT32),
    ]
    .into_iter()
    .enumerate()
    {
        let i = find(name).ok_or_else(|| bad(format!("no column `{name}`")))?;
        if schema.column(i).physical_type() != ty {
            return Err(bad(format!("column `{name}` is {:?}, expected {ty:?}", schema.column(i).physical_type())));
        }
        cols[k + 1] = i;
    }
    let rgs: Vec<u64> = meta.row_groups().iter().map(|r| r.num_rows() as u64).collect();
    if rgs != s.row_groups {
        return Err(bad(format!("row groups of {:?} rows, the manifest says {:?}", rgs, s.row_groups)));
    }
    let rows: u64 = rgs.iter().sum();
    if rows != s.rows {
        return Err(bad(format!("{rows} rows, the manifest says {}", s.rows)));
    }
    Ok(cols)
}

pub(crate) fn chunk_crcs(s: &ShardEntry, meta: &parquet::file::metadata::ParquetMetaData) -> Result<Vec<Vec<u32>>> {
    let kv = meta.file_metadata().key_value_metadata().and_then(|kv| kv.iter().find(|k| k.key == format::KV_CHUNK_CRC));
    let crcs: Vec<Vec<u32>> = kv
        .and_then(|k| k.value.as_deref())
        .and_then(|v| serde_json::from_str(v).ok())
        .ok_or_else(|| Error::corrupt(&s.key, format!("no `{}` metadata", format::KV_CHUNK_CRC)))?;
    if crcs.len() != meta.num_row_groups()
        || crcs.iter().any(|r| r.len() != meta.file_metadata().schema_descr().num_columns())
    {
        return Err(Error::corrupt(&s.key, "column chunk CRC table does not match the row groups"));
    }
    Ok(crcs)
}

enum Source {
    /// A final dataset: jobs are planned from the manifest.
    Final(Plan),
    /// Follow mode: row groups arrive as shards are committed.
    Follow,
}

/// What the fetch task sends the reader: decoded row groups in order, then `End` once the data
/// is exhausted. A channel that closes without `End` means the task died.
enum Fetched {
    RowGroup(Decoded),
    End,
}

/// Streams [`Batch`]es. A blocking iterator: it owns a small tokio runtime and a decoding pool,
/// so do not use it from inside an async runtime.
pub struct Reader {
    rt: Arc<Runtime>,
    rx: mpsc::Receiver<Result<Fetched>>,
    /// The fetch task, joined to report how it died when the channel closes without `End`.
    producer: Option<tokio::task::JoinHandle<()>>,
    /// The fetch task said `End`.
    ended: bool,
    ctx: Arc<Ctx>,
    source: Arc<Source>,
    opts: ReaderOptions,
    cursor: Cursor,
    /// Row of the rank's epoch stream that the next batch starts at.
    row: u64,
    window: Option<Window>,
    done: bool,
    manifest: Option<Manifest>,
}

/// The shards a reader has discovered, in order. The list only grows, so any reading of it
/// covers every row read before: in follow mode it is what a checkpoint saves as
/// [`FollowOptions::replay`], so that a resumed run reads the rows in the same order.
pub struct ShardOrder(Arc<Ctx>);

impl ShardOrder {
    pub fn keys(&self) -> Vec<String> {
        let shards = self.0.shards.lock().unwrap();
        shards.iter().map(|s| s.key.clone()).collect()
    }
}

struct Window {
    epoch: u64,
    start: u64,
    rgs: Vec<Decoded>,
    /// Window row -> (row group index in `rgs`, row in it), in reading order.
    order: Vec<(u32, u32)>,
}

impl Reader {
    /// Open the dataset at `url` for reading.
    pub fn open(url: &str, opts: ReaderOptions) -> Result<Reader> {
        let loc = open_store_with(url, &opts.store)?;
        Self::open_at(loc, opts)
    }

    pub fn open_at(loc: Location, opts: ReaderOptions) -> Result<Reader> {
        let rt = Arc::new(runtime()?);
        let (manifest, header) = rt.block_on(async {
            let m = match loc.get_bounded(MANIFEST_KEY, limits::MAX_METADATA_BYTES).await? {
                Some(b) => Some(parse_versioned::<Manifest>(&b, &loc.display(MANIFEST_KEY), &loc.url)?),
                None => None,
            };
            let h = if m.is_none() { read_header(&loc).await? } else { None };
            Ok::<_, Error>((m, h))
        })?;
        let (hooks, dtype): (Vec<(String, usize)>, Dtype) = match (&manifest, &header) {
            (Some(m), _) => (m.hooks.iter().map(|h| (h.name.clone(), h.d_model)).collect(), m.dtype),
            (None, Some(h)) if opts.follow.is_some() => {
                (h.header.hooks.iter().map(|h| (h.name.clone(), h.d_model)).collect(), h.encoding.dtype)
            }
            (None, Some(_)) => {
                return Err(Error::NotFound {
                    url: loc.url.clone(),
                    what: format!("the dataset is not final (no {MANIFEST_KEY}); read it in follow mode"),
                })
            }
            (None, None) => {
                return Err(Error::NotFound {
                    url: loc.url.clone(),
                    what: format!("no {MANIFEST_KEY} or {HEADER_KEY}"),
                })
            }
        };
        let d = match hooks.iter().find(|(n, _)| n == &opts.hook) {
            None => {
                let have: Vec<String> = hooks.iter().map(|(n, d)| format!("{n} (d_model {d})")).collect();
                return Err(Error::invalid(format!(
                    "dataset `{}` has no hook `{}`; it has: {}",
                    loc.url,
                    opts.hook,
                    have.join(", ")
                )));
            }
            Some((_, d)) => *d,
        };
        if let Some(want) = opts.d_model {
            if want != d {
                return Err(Error::invalid(format!(
                    "hook `{}` of dataset `{}` has d_model {d}, not the {want} asked for",
                    opts.hook, loc.url
                )));
            }
        }
        let out_dtype = match opts.output {
            OutputDtype::Stored => dtype,
            OutputDtype::F32 => Dtype::F32,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.decode_threads.max(1))
            .thread_name(|i| format!("sae-store-decode-{i}"))
            .build()
            .map_err(|e| Error::invalid(format!("cannot start decoding threads: {e}")))?;
        // Follow mode registers shards as it discovers them (its jobs index that list), even
        // when the manifest is already there.
        let shards = match &opts.follow {
            None => manifest.as_ref().map(|m| m.shards.clone()).unwrap_or_default(),
            Some(_) => Vec::new(),
        };
        let ctx = Arc::new(Ctx {
            loc,
            hook: opts.hook.clone(),
            d,
            dtype,
            out_dtype,
            with_tokens: opts.with_tokens,
            shards: Mutex::new(shards.clone()),
            metas: Mutex::new(HashMap::new()),
            pool,
            buffers: Arc::new(BufPool {
                bufs: Mutex::new(Vec::new()),
                max: opts.prefetch_row_groups + opts.window_row_groups + 4,
            }),
        });
        let max_rg =
            manifest.iter().flat_map(|m| &m.shards).flat_map(|s| s.row_groups.iter().copied()).max().unwrap_or(0)
                as usize;
        let window_bytes = max_rg * d * out_dtype.size() * opts.window_row_groups.max(1);
        if window_bytes > opts.max_bytes_in_flight {
            return Err(Error::invalid(format!(
                "max_bytes_in_flight {} cannot hold a window of {} row groups ({} bytes); raise it or lower window_row_groups",
                opts.max_bytes_in_flight, opts.window_row_groups, window_bytes
            )));
        }
        let source = Arc::new(match (&manifest, &opts.follow) {
            (Some(_), None) => {
                let all: Vec<RgRef> = shards
                    .iter()
                    .enumerate()
                    .flat_map(|(si, s)| {
                        s.row_groups.iter().enumerate().map(move |(ri, &rows)| RgRef {
                            shard: si as u32,
                            rg: ri as u32,
                            rows,
                        })
                    })
                    .collect();
                let plan = Plan::new(all, &opts)?;
                if opts.start.batch >= plan.batches_per_epoch {
                    return Err(Error::invalid(format!(
                        "cursor {:?} is past the end of an epoch of {} batches (was it saved with another batch size, world or dataset?)",
                        opts.start, plan.batches_per_epoch
                    )));
                }
                Source::Final(plan)
            }
            _ => {
                if opts.world > 1 && opts.rank >= opts.world {
                    return Err(Error::invalid("rank out of range"));
                }
                Source::Follow
            }
        });
        let (tx, rx) = mpsc::channel(2);
        let sem = Arc::new(Semaphore::new((opts.max_bytes_in_flight >> 10).max(1)));
        let cursor = opts.start;
        let producer = match &*source {
            Source::Final(_) => {
                let (ctx2, src2, o2) = (ctx.clone(), source.clone(), opts.clone());
                rt.spawn(async move { produce_final(ctx2, src2, o2, tx, sem).await })
            }
            Source::Follow => {
                let (ctx2, o2) = (ctx.clone(), opts.clone());
                rt.spawn(async move { produce_follow(ctx2, o2, tx, sem).await })
            }
        };
        let row = cursor.batch * opts.batch_rows as u64;
        Ok(Reader {
            rt,
            rx,
            producer: Some(producer),
            ended: false,
            ctx,
            source,
            opts,
            cursor,
            row,
            window: None,
            done: false,
            manifest,
        })
    }

    /// The manifest (None in follow mode before the dataset is final).
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// `d_model` of the hook read.
    pub fn d_model(&self) -> usize {
        self.ctx.d
    }

    /// Batches every rank yields per epoch (None in follow mode).
    pub fn batches_per_epoch(&self) -> Option<u64> {
        match &*self.source {
            Source::Final(p) => Some(p.batches_per_epoch),
            Source::Follow => None,
        }
    }

    /// The cursor of the next batch.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Hand a consumed batch's buffer back for reuse (optional). Reading into recycled buffers
    /// avoids the page faults and zeroing of fresh multi-megabyte allocations.
    pub fn recycle(&self, batch: Batch) {
        self.ctx.buffers.put(batch.bytes);
    }

    /// The order in which this reader discovers shards, readable from another thread.
    pub fn shard_order(&self) -> ShardOrder {
        ShardOrder(self.ctx.clone())
    }

    /// The next decoded row group, `None` once the fetch task says the data is exhausted. A
    /// channel that closes without that word is an error, never an end.
    fn recv(&mut self) -> Result<Option<Decoded>> {
        if self.ended {
            return Ok(None);
        }
        match self.rt.block_on(self.rx.recv()) {
            Some(Ok(Fetched::RowGroup(d))) => Ok(Some(d)),
            Some(Ok(Fetched::End)) => {
                self.ended = true;
                Ok(None)
            }
            Some(Err(e)) => Err(e),
            None => Err(self.producer_failure()),
        }
    }

    /// Why the fetch task stopped without finishing.
    fn producer_failure(&mut self) -> Error {
        let why = match self.producer.take().map(|task| self.rt.block_on(task)) {
            Some(Err(e)) if e.is_panic() => {
                format!("panicked: {}", panic_message(&*e.into_panic()))
            }
            Some(Err(e)) => format!("was cancelled: {e}"),
            Some(Ok(())) => "stopped before the data ended".to_string(),
            None => "had already stopped".to_string(),
        };
        Error::ReaderFailed { url: self.ctx.loc.url.clone(), detail: format!("the fetch task {why}") }
    }

    fn next_final(&mut self) -> Result<Option<Batch>> {
        let (bpe, epoch_rows, b) = match &*self.source {
            Source::Final(p) => (p.batches_per_epoch, p.epoch_rows, p.batch_rows),
            Source::Follow => unreachable!(),
        };
        if self.opts.epochs.is_some_and(|n| self.cursor.epoch >= n) {
            return Ok(None);
        }
        let want = b.min(epoch_rows - self.row) as usize;
        let mut batch = self.new_batch(want);
        let mut filled = 0usize;
        while filled < want {
            let need_window = match &self.window {
                Some(w) => w.epoch != self.cursor.epoch || self.row >= w.start + w.order.len() as u64,
                None => true,
            };
            if need_window {
                self.window = None; // release its bytes before waiting for the next
                self.window = Some(self.next_window()?);
                let w = self.window.as_ref().unwrap();
                if w.epoch != self.cursor.epoch || self.row < w.start || self.row >= w.start + w.order.len() as u64 {
                    return Err(Error::invalid(format!(
                        "reader out of step: window of epoch {} rows {}..{}, wanted epoch {} row {}",
                        w.epoch,
                        w.start,
                        w.start + w.order.len() as u64,
                        self.cursor.epoch,
                        self.row
                    )));
                }
            }
            let row_bytes = self.ctx.d * self.ctx.out_dtype.size();
            let w = self.window.as_mut().unwrap();
            let from = (self.row - w.start) as usize;
            let n = (want - filled).min(w.order.len() - from);
            copy_rows(w, from, n, &mut batch, row_bytes);
            filled += n;
            self.row += n as u64;
        }
        batch.cursor = self.cursor;
        self.cursor.batch += 1;
        if self.cursor.batch >= bpe {
            self.cursor = Cursor { epoch: self.cursor.epoch + 1, batch: 0 };
            self.row = 0;
            self.window = None;
        }
        batch.next = self.cursor;
        Ok(Some(batch))
    }

    fn new_batch(&self, rows: usize) -> Batch {
        Batch {
            hook: self.opts.hook.clone(),
            dtype: self.ctx.out_dtype,
            rows,
            d: self.ctx.d,
            bytes: Vec::new(), // sized on the first copy, or taken whole from a row group
            tokens: self.opts.with_tokens.then(TokenColumns::default),
            cursor: self.cursor,
            next: self.cursor,
        }
    }

    fn next_window(&mut self) -> Result<Window> {
        let mut rgs: Vec<Decoded> = Vec::new();
        loop {
            let d = self.recv()?.ok_or_else(|| Error::ReaderFailed {
                url: self.ctx.loc.url.clone(),
                detail: "the fetch task ended before the planned row groups".into(),
            })?;
            let len = d.job.window_len;
            rgs.push(d);
            if rgs.len() == len {
                break;
            }
        }
        let j = rgs[0].job.clone();
        let plan = match &*self.source {
            Source::Final(p) => p,
            Source::Follow => unreachable!(),
        };
        let mut flat: Vec<(u32, u32)> = Vec::with_capacity(j.window_rows as usize);
        for (i, d) in rgs.iter().enumerate() {
            flat.extend((0..d.rows as u32).map(|r| (i as u32, r)));
        }
        let order = match plan.window_perm(j.epoch, j.window, flat.len()) {
            Some(p) => p.into_iter().map(|i| flat[i as usize]).collect(),
            None => flat,
        };
        Ok(Window { epoch: j.epoch, start: j.window_row_start, rgs, order })
    }

    /// Follow mode: row groups in commit order, rows shuffled within windows; single pass.
    fn next_follow(&mut self) -> Result<Option<Batch>> {
        let b = self.opts.batch_rows;
        let mut batch = self.new_batch(b);
        let mut filled = 0usize;
        let row_bytes = self.ctx.d * self.ctx.out_dtype.size();
        while filled < b {
            if self.window.as_ref().is_none_or(|w| self.row >= w.end()) {
                match self.next_follow_window()? {
                    Some(w) => self.window = Some(w),
                    None => break,
                }
            }
            let w = self.window.as_mut().unwrap();
            let from = (self.row - w.start) as usize;
            let n = (b - filled).min(w.order.len() - from);
            copy_rows(w, from, n, &mut batch, row_bytes);
            filled += n;
            self.row += n as u64;
        }
        if filled == 0 || (filled < b && self.opts.drop_last) {
            return Ok(None);
        }
        batch.rows = filled;
        batch.cursor = self.cursor;
        self.cursor.batch += 1;
        batch.next = self.cursor;
        Ok(Some(batch))
    }

    /// The follow-mode window after the current one that holds row `self.row` (None: the data
    /// ended). A resumed reader starts past row 0: the windows before its row are formed exactly
    /// as the first reader formed them, then dropped.
    fn next_follow_window(&mut self) -> Result<Option<Window>> {
        let mut start = self.window.take().map_or(0, |w| w.end());
        loop {
            let mut rgs = Vec::new();
            while rgs.len() < self.opts.window_row_groups.max(1) {
                match self.recv()? {
                    Some(d) => rgs.push(d),
                    None => break,
                }
            }
            if rgs.is_empty() {
                return Ok(None);
            }
            let rows: u64 = rgs.iter().map(|d| d.rows as u64).sum();
            if start + rows <= self.row {
                start += rows;
                continue;
            }
            let mut flat: Vec<(u32, u32)> = Vec::with_capacity(rows as usize);
            for (i, d) in rgs.iter().enumerate() {
                flat.extend((0..d.rows as u32).map(|r| (i as u32, r)));
            }
            let order = if self.opts.shuffle {
                // The window's first row is unique per window: it keys the permutation.
                let p = permutation(
                    flat.len(),
                    &mut SplitMix64::keyed(&[
                        self.opts.seed,
                        0,
                        self.opts.rank as u64,
                        self.opts.world as u64,
                        start,
                        0x666f6c,
                    ]),
                );
                p.into_iter().map(|i| flat[i as usize]).collect()
            } else {
                flat
            };
            return Ok(Some(Window { epoch: 0, start, rgs, order }));
        }
    }
}

impl Window {
    /// One past the window's last row.
    fn end(&self) -> u64 {
        self.start + self.order.len() as u64
    }
}

/// Append rows `from..from + n` of the window to the batch, copying runs of consecutive rows
/// at once. A batch that is exactly one whole row group (unshuffled reading with the batch size
/// equal to the row group size) takes that row group's buffer without copying.
fn copy_rows(w: &mut Window, from: usize, n: usize, batch: &mut Batch, row_bytes: usize) {
    let end = from + n;
    let mut k = from;
    while k < end {
        let (rg, r0) = w.order[k];
        let mut len = 1;
        while k + len < end && w.order[k + len] == (rg, r0 + len as u32) {
            len += 1;
        }
        let d = &mut w.rgs[rg as usize];
        let r0 = r0 as usize;
        if batch.bytes.is_empty() && r0 == 0 && len == d.rows && len == batch.rows && d.acts.len() == len * row_bytes {
            batch.bytes = std::mem::take(&mut d.acts);
            if batch.tokens.is_some() {
                batch.tokens = d.tokens.take();
            }
        } else {
            if batch.bytes.is_empty() {
                batch.bytes.reserve_exact(batch.rows * row_bytes);
            }
            batch.bytes.extend_from_slice(&d.acts[r0 * row_bytes..(r0 + len) * row_bytes]);
            if let (Some(t), Some(src)) = (batch.tokens.as_mut(), d.tokens.as_ref()) {
                t.sequence_id.extend_from_slice(&src.sequence_id[r0..r0 + len]);
                t.position.extend_from_slice(&src.position[r0..r0 + len]);
                t.token_id.extend_from_slice(&src.token_id[r0..r0 + len]);
            }
        }
        k += len;
    }
}

impl Iterator for Reader {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        if self.done {
            return None;
        }
        let r = match &*self.source {
            Source::Final(_) => self.next_final(),
            Source::Follow => self.next_follow(),
        };
        match r {
            Ok(Some(b)) => Some(Ok(b)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

async fn produce_final(
    ctx: Arc<Ctx>,
    source: Arc<Source>,
    o: ReaderOptions,
    tx: mpsc::Sender<Result<Fetched>>,
    sem: Arc<Semaphore>,
) {
    let Source::Final(plan) = &*source else {
        return;
    };
    let start = o.start;
    let jobs = (start.epoch..o.epochs.unwrap_or(u64::MAX)).flat_map(move |epoch| {
        let from = if epoch == start.epoch { start.batch * plan.batch_rows } else { 0 };
        plan.epoch_jobs(epoch, from)
    });
    if pump(jobs, &ctx, &sem, o.prefetch_row_groups, &tx).await {
        let _ = tx.send(Ok(Fetched::End)).await;
    }
}

/// Fetches and decodes `jobs` with up to `prefetch` in flight, forwarding each result in order;
/// stops at the first error or when the consumer has gone. Returns false in either case.
async fn pump(
    jobs: impl IntoIterator<Item = Job>,
    ctx: &Arc<Ctx>,
    sem: &Arc<Semaphore>,
    prefetch: usize,
    tx: &mpsc::Sender<Result<Fetched>>,
) -> bool {
    let mut stream =
        futures::stream::iter(jobs).map(|job| ctx.clone().fetch(job, sem.clone())).buffered(prefetch.max(1));
    while let Some(item) = stream.next().await {
        let failed = item.is_err();
        if tx.send(item.map(Fetched::RowGroup)).await.is_err() || failed {
            return false;
        }
    }
    true
}

/// Every shard of a dataset being written, from its manifest once there is one (then the list is
/// complete) or else from the commit records so far. Returns (final, shards).
async fn list_shards(ctx: &Ctx) -> Result<(bool, Vec<ShardEntry>)> {
    if let Some(b) = ctx.loc.get_bounded(MANIFEST_KEY, limits::MAX_METADATA_BYTES).await? {
        let m: Manifest = parse_versioned(&b, &ctx.loc.display(MANIFEST_KEY), &ctx.loc.url)?;
        return Ok((true, m.shards));
    }
    let commits = list_commits(&ctx.loc, None).await?;
    Ok((false, commits.into_iter().map(|c| c.shard).collect()))
}

/// Registers a newly discovered shard and returns the jobs of its row groups that this rank owns.
fn follow_jobs(ctx: &Ctx, s: ShardEntry, o: &ReaderOptions) -> Vec<Job> {
    let idx = {
        let mut v = ctx.shards.lock().unwrap();
        v.push(s.clone());
        v.len() - 1
    };
    let mut jobs = Vec::new();
    for (ri, &rows) in s.row_groups.iter().enumerate() {
        // Ranks may discover commits in different orders, so the owner of a row group depends
        // only on its identity: (shard key, row group index).
        let owner =
            crc32c::crc32c_append(crc32c::crc32c(s.key.as_bytes()), &(ri as u64).to_le_bytes()) as u64 % o.world as u64;
        if owner == o.rank as u64 {
            jobs.push(Job {
                epoch: 0,
                window: 0,
                window_row_start: 0,
                window_rows: rows,
                window_len: 1,
                rg: RgRef { shard: idx as u32, rg: ri as u32, rows },
            });
        }
    }
    jobs
}

/// The jobs of the shards an interrupted reader had discovered, in its order.
async fn replay_jobs(ctx: &Ctx, o: &ReaderOptions, replay: &[String]) -> Result<Vec<Job>> {
    let (_, shards) = list_shards(ctx).await?;
    let mut by_key: HashMap<String, ShardEntry> = shards.into_iter().map(|s| (s.key.clone(), s)).collect();
    let mut jobs = Vec::new();
    for key in replay {
        let s = by_key.remove(key).ok_or_else(|| Error::ReaderFailed {
            url: ctx.loc.url.clone(),
            detail: format!(
                "shard `{key}`, read before the run was interrupted, is no longer committed; the run cannot resume in the same order"
            ),
        })?;
        jobs.extend(follow_jobs(ctx, s, o));
    }
    Ok(jobs)
}

async fn produce_follow(ctx: Arc<Ctx>, o: ReaderOptions, tx: mpsc::Sender<Result<Fetched>>, sem: Arc<Semaphore>) {
    let fo = o.follow.clone().unwrap_or_default();
    let mut seen: HashSet<String> = fo.replay.iter().cloned().collect();
    if !fo.replay.is_empty() {
        let jobs = match replay_jobs(&ctx, &o, &fo.replay).await {
            Ok(jobs) => jobs,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        if !pump(jobs, &ctx, &sem, o.prefetch_row_groups, &tx).await {
            return;
        }
    }
    let mut last_new = tokio::time::Instant::now();
    loop {
        #[cfg(test)]
        failpoints::hit("follow_poll", &ctx.loc.url);
        let (is_final, shards) = match list_shards(&ctx).await {
            Ok(x) => x,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let new: Vec<ShardEntry> = shards.into_iter().filter(|s| !seen.contains(&s.key)).collect();
        if !new.is_empty() {
            last_new = tokio::time::Instant::now();
        }
        let mut jobs = Vec::new();
        for s in new {
            seen.insert(s.key.clone());
            jobs.extend(follow_jobs(&ctx, s, &o));
        }
        if !pump(jobs, &ctx, &sem, o.prefetch_row_groups, &tx).await {
            return;
        }
        if is_final {
            let _ = tx.send(Ok(Fetched::End)).await;
            return;
        }
        if fo.idle_timeout.is_some_and(|t| last_new.elapsed() > t) {
            let _ = tx
                .send(Err(Error::invalid(format!(
                    "follow mode: nothing new was committed to `{}` for {:?} and it is not final",
                    ctx.loc.url,
                    fo.idle_timeout.unwrap()
                ))))
                .await;
            return;
        }
        tokio::time::sleep(fo.poll).await;
    }
}

/// Test-only panics at named points, armed per dataset URL so that tests running side by side
/// do not trip each other's.
#[cfg(test)]
pub(crate) mod failpoints {
    use std::sync::Mutex;

    static ARMED: Mutex<Vec<(&'static str, String)>> = Mutex::new(Vec::new());

    pub fn arm(point: &'static str, url: &str) {
        ARMED.lock().unwrap().push((point, url.to_string()));
    }

    pub fn hit(point: &'static str, url: &str) {
        let armed = ARMED.lock().unwrap().iter().any(|(p, u)| *p == point && u == url);
        if armed {
            panic!("failpoint `{point}` hit for {url}");
        }
    }
}

#[allow(dead_code)]
fn _assert_send() {
    fn is_send<T: Send>() {}
    is_send::<Reader>();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rgs(sizes: &[u64]) -> Vec<RgRef> {
        sizes.iter().enumerate().map(|(i, &rows)| RgRef { shard: 0, rg: i as u32, rows }).collect()
    }

    #[test]
    fn ranks_get_disjoint_balanced_row_groups() {
        let all = rgs(&[100, 100, 100, 100, 100, 37, 100, 100, 100, 12]);
        for epoch in 0..3 {
            let mut seen = HashSet::new();
            let mut loads = Vec::new();
            for rank in 0..3 {
                let mine = rank_row_groups(&all, 9, epoch, rank, 3, true);
                loads.push(mine.iter().map(|r| r.rows).sum::<u64>());
                for r in mine {
                    assert!(seen.insert(r.rg), "row group {} dealt twice", r.rg);
                }
            }
            assert_eq!(seen.len(), all.len());
            let (lo, hi) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
            assert!(hi - lo <= 100, "{loads:?}");
            assert_eq!(rank_loads(&all, 3).iter().sum::<u64>(), loads.iter().sum::<u64>());
        }
        // Epochs differ, the same epoch is reproducible.
        assert_ne!(rank_row_groups(&all, 9, 0, 0, 1, true), rank_row_groups(&all, 9, 1, 0, 1, true));
        assert_eq!(rank_row_groups(&all, 9, 1, 0, 1, true), rank_row_groups(&all, 9, 1, 0, 1, true));
        assert_eq!(rank_row_groups(&all, 9, 1, 0, 1, false), all);
    }

    #[test]
    fn unsplit_matches_the_naive_transpose() {
        for (dt, odt) in
            [(Dtype::Bf16, Dtype::F32), (Dtype::Bf16, Dtype::Bf16), (Dtype::F32, Dtype::F32), (Dtype::F16, Dtype::F16)]
        {
            for (n, d) in [(8, 8), (21, 13), (64, 24), (3, 5), (16, 16), (35, 40), (48, 17)] {
                let s = dt.size();
                // Planar rows, then BYTE_STREAM_SPLIT: stream p holds byte p of every row.
                let rows_le: Vec<u8> = (0..n * d * s).map(|i| (i * 31 % 253) as u8).collect();
                let mut planar = Vec::new();
                format::to_planar(&rows_le, d, s, &mut planar);
                let w = d * s;
                let mut split = vec![0u8; n * w];
                for i in 0..n {
                    for p in 0..w {
                        split[p * n + i] = planar[i * w + p];
                    }
                }
                let mut out = vec![0u8; n * d * odt.size()];
                unsplit_planar(dt, odt, &split, n, d, &mut out);
                let want = if odt == dt {
                    rows_le.clone()
                } else {
                    let mut f = Vec::new();
                    format::planar_to_f32_bytes(dt, &planar, d, &mut f);
                    f
                };
                assert_eq!(out, want, "{dt:?}->{odt:?} n {n} d {d}");
            }
        }
    }

    #[test]
    fn plan_refuses_more_ranks_than_row_groups() {
        let mut o = ReaderOptions::new("h", 10);
        o.world = 4;
        o.rank = 1;
        let e = Plan::new(rgs(&[100, 100, 100]), &o).err().unwrap().to_string();
        assert!(e.contains("3 row groups, fewer than the 4 ranks"), "{e}");
    }

    fn small_dataset(url: &str, rows: usize) {
        use crate::manifest::*;
        let header = DatasetHeader {
            model: ModelIdentity { name: "m".into(), file_sha256: "00".repeat(32) },
            tokenizer: TokenizerIdentity { name: "t".into(), sha256: "11".repeat(32) },
            hooks: vec![HookSpec { name: "h".into(), d_model: 4 }],
            context_len: 8,
            corpus: CorpusIdentity { name: "c".into(), sha256: "22".repeat(32), detail: String::new() },
            created: CreatedInfo { version: "test".into(), command_line: vec![] },
        };
        let opts = crate::WriterOptions { row_group_rows: 16, shard_bytes: Some(256), ..Default::default() };
        let mut w = crate::DatasetWriter::create(url, header, opts).unwrap();
        let batch = crate::RowBatch {
            sequence_id: (0..rows as u64).map(|r| r / 8).collect(),
            position: (0..rows as u32).map(|r| r % 8).collect(),
            token_id: vec![7; rows],
            activations: vec![("h".into(), (0..rows * 4).map(|v| v as f32).collect())],
        };
        w.append(batch).unwrap();
        w.finish().unwrap();
    }

    fn read_all(url: &str, opts: ReaderOptions) -> Result<Vec<Vec<f32>>> {
        Reader::open(url, opts)?.map(|b| b.map(|b| b.to_f32())).collect()
    }

    #[test]
    fn a_decoding_panic_is_an_error_naming_the_shard() {
        let url = "memory://failpoints/decode";
        small_dataset(url, 64);
        failpoints::arm("decode", url);
        let err = read_all(url, ReaderOptions::one_pass_in_order("h", 16)).unwrap_err().to_string();
        assert!(err.contains("corrupt shard `shards/") && err.contains("panicked"), "{err}");
    }

    #[test]
    fn a_dead_follow_task_is_an_error_not_the_end() {
        let url = "memory://failpoints/follow";
        small_dataset(url, 64);
        failpoints::arm("follow_poll", url);
        let mut opts = ReaderOptions::one_pass_in_order("h", 16);
        opts.follow = Some(FollowOptions::default());
        let err = read_all(url, opts).unwrap_err();
        assert!(matches!(err, Error::ReaderFailed { .. }), "{err}");
        assert!(err.to_string().contains("panicked: failpoint"), "{err}");
    }

    #[test]
    fn a_resumed_follow_reader_continues_where_the_first_stopped() {
        let url = "memory://follow-resume/a";
        small_dataset(url, 640);
        let mut opts = ReaderOptions::new("h", 24);
        opts.output = OutputDtype::F32;
        opts.window_row_groups = 3;
        opts.follow = Some(FollowOptions::default());
        let mut first = Reader::open(url, opts.clone()).unwrap();
        let whole: Vec<Vec<f32>> = first.by_ref().map(|b| b.unwrap().to_f32()).collect();
        assert_eq!(whole.len(), 640 / 24);
        // Resume past the first windows (3 row groups of 16 rows = 48 rows each).
        for at in [1u64, 5, 17] {
            let mut o = opts.clone();
            o.start = Cursor { epoch: 0, batch: at };
            o.follow.as_mut().unwrap().replay = first.shard_order().keys();
            let rest = read_all(url, o).unwrap();
            assert_eq!(rest, whole[at as usize..], "resumed at batch {at}");
        }
    }
}
