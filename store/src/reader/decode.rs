//! Decoding a fetched row group on the decoding pool: the activation column through the
//! byte-planar fast path when its pages have the shape this crate writes, through Arrow
//! otherwise, and the token columns through Arrow.

use std::sync::Arc;

use arrow_array::{Array, FixedSizeBinaryArray};
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use parquet::basic::Encoding as ParquetEncoding;
use parquet::column::page::Page;
use parquet::file::reader::{ChunkReader, Length};
use parquet::file::serialized_reader::SerializedPageReader;

use super::fetch::{Ctx, ShardMeta};
use super::plan::RgRef;
use super::unsplit::unsplit_planar;
use super::TokenColumns;
use crate::error::{Error, Result};
use crate::format;

impl Ctx {
    /// The fast path for the activation column as this crate writes it: BYTE_STREAM_SPLIT pages
    /// without levels, un-split straight into the output layout (one pass, no Arrow array).
    /// Returns None when a page has another shape; the Arrow path then handles it.
    pub(super) fn decode_acts_fast(&self, meta: &ShardMeta, rg: RgRef, chunks: Chunks) -> Result<Option<Vec<u8>>> {
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
                // Dictionary pages, other encodings, pages with levels: the Arrow path.
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

    pub(super) fn decode(
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
                t.extend_from_arrow(&b)
                    .ok_or_else(|| Error::corrupt(&meta.key, "token columns have unexpected types"))?;
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

    pub(super) fn acts_from_arrow(
        &self,
        meta: &ShardMeta,
        b: &arrow_array::RecordBatch,
        acts: &mut Vec<u8>,
    ) -> Result<()> {
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

/// The fetched byte ranges of a shard, served to the Parquet decoder.
#[derive(Clone)]
pub(super) struct Chunks {
    pub(super) parts: Vec<(u64, Bytes)>,
    pub(super) len: u64,
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
    pub(super) fn find(&self, start: u64, length: usize) -> parquet::errors::Result<(u64, &Bytes)> {
        self.parts
            .iter()
            .find(|(off, b)| start >= *off && start + length as u64 <= off + b.len() as u64)
            .map(|(o, b)| (*o, b))
            .ok_or_else(|| parquet::errors::ParquetError::General(format!("range {start}+{length} was not fetched")))
    }
}
