//! The encoding thread: appended rows, converted to the stored dtype, cut into row groups,
//! encoded to Parquet and streamed to the shard's multipart upload.

use std::sync::mpsc::Receiver;
use std::sync::Arc;

use arrow_array::{ArrayRef, FixedSizeBinaryArray, RecordBatch, UInt32Array, UInt64Array};
use arrow_buffer::Buffer;
use arrow_schema::SchemaRef;
use bytes::Bytes;
use object_store::{ObjectStoreExt, WriteMultipart};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;

use super::planar::encode_rows_planar;
use super::{random_hex, Msg, ProgressCounters, RowBatch, WriterOptions};
use crate::error::{Error, Result};
use crate::format;
use crate::location::Location;
use crate::manifest::{CommitRecord, HeaderFile, HookStats, SHARDS_DIR};

/// Rows waiting to fill a row group, already converted to the stored dtype.
pub(super) struct Pending {
    pub(super) sequence_id: Vec<u64>,
    pub(super) position: Vec<u32>,
    pub(super) token_id: Vec<u32>,
    /// Per hook (in header order): stored bytes, byte-planar rows.
    pub(super) acts: Vec<Vec<u8>>,
    /// Stats per future row group (slot k covers pending rows k*R..(k+1)*R), per hook.
    pub(super) stats: std::collections::VecDeque<Vec<HookStats>>,
}

pub(super) struct Shard {
    pub(super) seq: u64,
    pub(super) key: String,
    pub(super) arrow: ArrowWriter<Vec<u8>>,
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
    pub(super) next_seq: u64,
    pub(super) pending: Pending,
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

    pub(super) fn abort(&mut self) {
        if let Some(s) = self.shard.take() {
            let key = s.key.clone();
            if let Err(e) = self.rt.block_on(s.upload.abort()) {
                tracing::warn!("aborting the upload of {key}: {e}");
            }
        }
    }

    pub(super) fn push(&mut self, b: RowBatch) {
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

    pub(super) fn open_shard(&mut self) -> Result<Shard> {
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
    pub(super) fn write_row_group(&mut self, n: usize) -> Result<()> {
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
