//! The writer's own thread: appended rows cut into row groups, which the encoding threads
//! convert and encode several at once; their column chunks are appended to the shard in order
//! and the shard's bytes streamed to its multipart upload.

use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use arrow_schema::SchemaRef;
use bytes::Bytes;
use object_store::{ObjectStoreExt, WriteMultipart};
use parquet::arrow::arrow_writer::ArrowRowGroupWriterFactory;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;

use super::pool::EncodePool;
use super::row_group::{EncodedRowGroup, RowGroupEncoder, RowGroupRows};
use super::{random_hex, Msg, ProgressCounters, RowBatch, WriterOptions};
use crate::error::{Error, Result};
use crate::format;
use crate::location::Location;
use crate::manifest::{CommitRecord, HeaderFile, HookStats, SHARDS_DIR};

pub(super) struct Shard {
    pub(super) seq: u64,
    pub(super) key: String,
    pub(super) file: SerializedFileWriter<Vec<u8>>,
    pub(super) upload: WriteMultipart,
    pub(super) sha: Sha256,
    pub(super) written: u64,
    pub(super) crcs: Vec<Vec<u32>>,
    pub(super) row_groups: Vec<u64>,
    pub(super) rows: u64,
    pub(super) seq_range: [u64; 2],
    pub(super) stats: Vec<HookStats>,
}

pub(super) struct Encoder {
    pub(super) rt: Arc<Runtime>,
    pub(super) loc: Location,
    pub(super) header: HeaderFile,
    pub(super) opts: WriterOptions,
    pub(super) schema: SchemaRef,
    pub(super) props: WriterProperties,
    /// Column writers for each row group: the same for every shard, as they depend only on the
    /// schema and properties.
    pub(super) column_writers: ArrowRowGroupWriterFactory,
    pub(super) pool: EncodePool,
    /// Row groups submitted to the pool so far.
    pub(super) submitted: u64,
    pub(super) next_seq: u64,
    /// Appended rows that do not fill a row group yet.
    pub(super) pending: RowGroupRows,
    pub(super) shard: Option<Shard>,
    pub(super) committed: Vec<CommitRecord>,
    pub(super) progress: Arc<ProgressCounters>,
}

impl Encoder {
    pub(super) fn new(
        rt: Arc<Runtime>,
        loc: Location,
        header: HeaderFile,
        opts: WriterOptions,
        next_seq: u64,
    ) -> Result<Self> {
        let hooks = &header.header.hooks;
        let schema = format::shard_schema(hooks, opts.dtype);
        // One page per row group per column: BYTE_STREAM_SPLIT then sees long streams.
        let rg_bytes = opts.row_group_rows * hooks.iter().map(|h| h.d_model).max().unwrap_or(1) * opts.dtype.size();
        let props = format::writer_properties(hooks, opts.zstd_level, opts.row_group_rows, rg_bytes + 1)?;
        let first_shard = format!("{SHARDS_DIR}/{}-{next_seq:08}", opts.worker);
        let (_, column_writers) =
            new_shard_file(&schema, &props).map_err(|e| Error::Parquet { key: first_shard, source: e })?;
        let encoder = RowGroupEncoder { hooks: hooks.clone(), dtype: opts.dtype, schema: schema.clone() };
        let pool = EncodePool::new(opts.encode_threads, encoder, &loc.url)?;
        let pending = RowGroupRows { acts: vec![Vec::new(); hooks.len()], ..Default::default() };
        Ok(Encoder {
            rt,
            loc,
            header,
            opts,
            schema,
            props,
            column_writers,
            pool,
            submitted: 0,
            next_seq,
            pending,
            shard: None,
            committed: Vec::new(),
            progress: Arc::default(),
        })
    }

    pub(super) fn run(mut self, rx: Receiver<Msg>) -> Result<Vec<CommitRecord>> {
        let r = self.run_inner(&rx);
        if r.is_err() {
            self.abort();
        }
        r?;
        Ok(self.committed)
    }

    pub(super) fn run_inner(&mut self, rx: &Receiver<Msg>) -> Result<()> {
        loop {
            // New rows first; while none are waiting, write the oldest row group in flight, so
            // that encoded row groups reach the upload without waiting for more rows.
            let msg = match rx.try_recv() {
                Ok(msg) => Ok(msg),
                Err(TryRecvError::Empty) => match self.pool.next_in_order() {
                    Some(encoded) => {
                        self.write_row_group(encoded?)?;
                        continue;
                    }
                    None => rx.recv().map_err(|_| TryRecvError::Disconnected),
                },
                Err(e) => Err(e),
            };
            match msg {
                Ok(Msg::Rows(b)) => {
                    self.push(b);
                    while self.pending.rows() >= self.opts.row_group_rows {
                        self.submit(self.opts.row_group_rows)?;
                    }
                }
                Ok(Msg::Finish) => {
                    let n = self.pending.rows();
                    if n > 0 {
                        self.submit(n)?;
                    }
                    while let Some(encoded) = self.pool.next_in_order() {
                        self.write_row_group(encoded?)?;
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

    pub(super) fn abort(&mut self) {
        if let Some(s) = self.shard.take() {
            let key = s.key.clone();
            if let Err(e) = self.rt.block_on(s.upload.abort()) {
                tracing::warn!("aborting the upload of {key}: {e}");
            }
        }
    }

    pub(super) fn push(&mut self, b: RowBatch) {
        let p = &mut self.pending;
        for (spec, acts) in self.header.header.hooks.iter().zip(&mut p.acts) {
            let (_, v) = b.activations.iter().find(|(n, _)| n == &spec.name).expect("validated");
            acts.extend_from_slice(v);
        }
        p.sequence_id.extend_from_slice(&b.sequence_id);
        p.position.extend_from_slice(&b.position);
        p.token_id.extend_from_slice(&b.token_id);
    }

    /// Hands the first `n` pending rows to the encoding threads as one row group, first writing
    /// the oldest encoded row group to the shard if as many are in flight as may be.
    pub(super) fn submit(&mut self, n: usize) -> Result<()> {
        if self.pool.is_full() {
            let encoded = self.pool.next_in_order().expect("a full pool has row groups in flight");
            self.write_row_group(encoded?)?;
        }
        let p = &mut self.pending;
        let mut rows = RowGroupRows {
            sequence_id: p.sequence_id.drain(..n).collect(),
            position: p.position.drain(..n).collect(),
            token_id: p.token_id.drain(..n).collect(),
            acts: Vec::with_capacity(p.acts.len()),
        };
        for (spec, acts) in self.header.header.hooks.iter().zip(&mut p.acts) {
            let rest = acts.split_off(n * spec.d_model);
            rows.acts.push(std::mem::replace(acts, rest));
        }
        // The column writers hold no state of the shard a row group will land in (no
        // encryption), so they can be made before it is known which shard that is.
        let writers = self.column_writers.create_column_writers(self.submitted as usize).map_err(|e| {
            Error::Encode { url: self.loc.url.clone(), row_group: self.submitted, detail: e.to_string() }
        })?;
        self.pool.submit(self.submitted, rows, writers);
        self.submitted += 1;
        Ok(())
    }

    pub(super) fn open_shard(&mut self) -> Result<Shard> {
        let seq = self.next_seq;
        let key = format!("{SHARDS_DIR}/{}-{seq:08}-{}.parquet", self.opts.worker, &random_hex()[..8]);
        let path = self.loc.path(&key);
        let upload = self
            .rt
            .block_on(self.loc.store.put_multipart(&path))
            .map_err(|e| Error::store("start multipart upload", self.loc.display(&key), e))?;
        let (file, _) =
            new_shard_file(&self.schema, &self.props).map_err(|e| Error::Parquet { key: key.clone(), source: e })?;
        Ok(Shard {
            seq,
            key,
            file,
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

    /// Appends an encoded row group to the shard (opening one if none is open), sends its bytes
    /// to the upload, and closes the shard once it has reached its target size.
    pub(super) fn write_row_group(&mut self, encoded: EncodedRowGroup) -> Result<()> {
        if self.shard.is_none() {
            let s = self.open_shard()?;
            self.shard = Some(s);
        }
        let shard = self.shard.as_mut().unwrap();
        let key = shard.key.clone();
        let pq = |e| Error::Parquet { key: key.clone(), source: e };
        let mut row_group = shard.file.next_row_group().map_err(pq)?;
        for chunk in encoded.chunks {
            chunk.append_to_row_group(&mut row_group).map_err(pq)?;
        }
        row_group.close().map_err(pq)?;
        shard.file.flush().map_err(|e| pq(e.into()))?;
        let buf = std::mem::take(shard.file.inner_mut());
        let base = shard.written;
        let rg = shard.file.flushed_row_groups().last().expect("a row group was flushed");
        let mut crcs = Vec::with_capacity(rg.num_columns());
        for c in rg.columns() {
            let (start, len) = c.byte_range();
            let lo = (start - base) as usize;
            crcs.push(crc32c::crc32c(&buf[lo..lo + len as usize]));
        }
        shard.crcs.push(crcs);
        shard.row_groups.push(encoded.rows);
        shard.rows += encoded.rows;
        shard.seq_range[0] = shard.seq_range[0].min(encoded.sequence_ids[0]);
        shard.seq_range[1] = shard.seq_range[1].max(encoded.sequence_ids[1]);
        for (a, b) in shard.stats.iter_mut().zip(&encoded.stats) {
            a.merge(b);
        }
        self.send(buf)?;
        let shard = self.shard.as_ref().unwrap();
        if shard.written >= self.opts.shard_target() {
            self.close_shard()?;
        }
        Ok(())
    }

    pub(super) fn send(&mut self, buf: Vec<u8>) -> Result<()> {
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
}

/// A shard's Parquet file, started in memory as `ArrowWriter` starts one (the Arrow schema in
/// its key-value metadata), and the factory of column writers for its row groups.
pub(super) fn new_shard_file(
    schema: &SchemaRef,
    props: &WriterProperties,
) -> parquet::errors::Result<(SerializedFileWriter<Vec<u8>>, ArrowRowGroupWriterFactory)> {
    ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props.clone()))?.into_serialized_writer()
}
