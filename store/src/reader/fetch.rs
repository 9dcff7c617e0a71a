//! Fetching row groups ahead: each shard's footer once, then each row group's column chunks by
//! range, checked against their CRC-32C and handed to the decoding pool, within the
//! bytes-in-flight budget.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use tokio::sync::{mpsc, OnceCell, Semaphore};

use super::decode::Chunks;
use super::footer::{check_schema, chunk_crcs, parse_footer};
use super::plan::Job;
use super::{Fetched, ReaderOptions, Source, TokenColumns};
use crate::error::{panic_message, Error, Result};
use crate::format::Dtype;
use crate::location::Location;
use crate::manifest::ShardEntry;

/// What the reader learned of a shard from its footer.
pub(super) struct ShardMeta {
    pub(super) key: String,
    pub(super) arrow: ArrowReaderMetadata,
    /// Leaf column indices: the hook, then sequence_id, position, token_id.
    pub(super) cols: [usize; 4],
    pub(super) crcs: Vec<Vec<u32>>,
    pub(super) file_len: u64,
}

/// The decoded rows of one row group, holding its share of the bytes-in-flight budget.
pub(super) struct Decoded {
    pub(super) job: Job,
    pub(super) acts: Vec<u8>,
    pub(super) tokens: Option<TokenColumns>,
    pub(super) rows: usize,
    pub(super) _permit: tokio::sync::OwnedSemaphorePermit,
    pub(super) buffers: Arc<BufPool>,
}

impl Drop for Decoded {
    fn drop(&mut self) {
        self.buffers.put(std::mem::take(&mut self.acts));
    }
}

/// Recycled row group buffers: fresh multi-megabyte buffers cost page faults and zeroing, which
/// cost more than decoding into them.
pub(super) struct BufPool {
    pub(super) bufs: Mutex<Vec<Vec<u8>>>,
    pub(super) max: usize,
}

impl BufPool {
    /// A buffer of exactly `len` bytes, with unspecified contents.
    pub(super) fn get(&self, len: usize) -> Vec<u8> {
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

    pub(super) fn put(&self, b: Vec<u8>) {
        if b.capacity() == 0 {
            return;
        }
        let mut bufs = self.bufs.lock().unwrap();
        if bufs.len() < self.max {
            bufs.push(b);
        }
    }
}

pub(super) struct Ctx {
    pub(super) loc: Location,
    pub(super) hook: String,
    pub(super) d: usize,
    pub(super) dtype: Dtype,
    pub(super) out_dtype: Dtype,
    pub(super) with_tokens: bool,
    pub(super) shards: Mutex<Vec<ShardEntry>>,
    pub(super) metas: Mutex<HashMap<u32, Arc<OnceCell<Arc<ShardMeta>>>>>,
    pub(super) pool: rayon::ThreadPool,
    pub(super) buffers: Arc<BufPool>,
}

impl Ctx {
    pub(super) fn shard(&self, i: u32) -> ShardEntry {
        self.shards.lock().unwrap()[i as usize].clone()
    }

    pub(super) async fn meta(&self, i: u32) -> Result<Arc<ShardMeta>> {
        let cell = self.metas.lock().unwrap().entry(i).or_default().clone();
        cell.get_or_try_init(|| self.load_meta(i)).await.cloned()
    }

    pub(super) async fn load_meta(&self, i: u32) -> Result<Arc<ShardMeta>> {
        let s = self.shard(i);
        let footer = self.loc.get_range(&s.key, s.bytes - s.footer_len..s.bytes).await?;
        let meta = parse_footer(&s, &footer)?;
        let cols = check_schema(&s, &meta, &self.hook, self.d, self.dtype)?;
        let crcs = chunk_crcs(&s, &meta)?;
        let arrow = ArrowReaderMetadata::try_new(Arc::new(meta), ArrowReaderOptions::new())
            .map_err(|e| Error::Parquet { key: s.key.clone(), source: e })?;
        Ok(Arc::new(ShardMeta { key: s.key, arrow, cols, crcs, file_len: s.bytes }))
    }

    pub(super) async fn fetch(self: Arc<Self>, job: Job, sem: Arc<Semaphore>) -> Result<Decoded> {
        let out_size = self.out_dtype.size();
        let kib = kib_permits(job.rg.rows as usize * self.d * out_size) as u32;
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
                crate::failpoints::hit("decode", &ctx.loc.url);
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
}

pub(super) async fn produce_final(
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
pub(super) async fn pump(
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

/// The semaphore permits (KiB, at least one) that `bytes` of decoded rows hold while in flight:
/// the one unit in which the reader's budget is both checked and spent.
pub(super) fn kib_permits(bytes: usize) -> usize {
    (bytes >> 10).max(1)
}
