//! One row group's encoding, the part of writing that runs on the encoding threads: f32 rows
//! converted to the stored dtype (byte-planar, with their statistics in the same pass), then
//! Parquet-encoded and compressed into column chunks. The shard appends the chunks in order
//! (`ArrowColumnChunk::append_to_row_group`), which is what `ArrowWriter` does with the column
//! writers of its own row groups, so the file's bytes are the same as `ArrowWriter`'s.

use std::sync::Arc;

use arrow_array::{ArrayRef, FixedSizeBinaryArray, UInt32Array, UInt64Array};
use arrow_buffer::Buffer;
use arrow_schema::SchemaRef;
use parquet::arrow::arrow_writer::{compute_leaves, ArrowColumnChunk, ArrowColumnWriter};
use parquet::errors::ParquetError;

use super::planar::encode_rows_planar;
use crate::format::Dtype;
use crate::manifest::{HookSpec, HookStats};

/// The rows of one row group, as appended (f32 activations, not yet converted).
#[derive(Default)]
pub(super) struct RowGroupRows {
    pub(super) sequence_id: Vec<u64>,
    pub(super) position: Vec<u32>,
    pub(super) token_id: Vec<u32>,
    /// Per hook, in header order: `rows x d_model` f32, row-major.
    pub(super) acts: Vec<Vec<f32>>,
}

impl RowGroupRows {
    pub(super) fn rows(&self) -> usize {
        self.sequence_id.len()
    }
}

/// One row group, encoded: its column chunks, in schema order, and what the shard's commit
/// record needs of it.
pub(super) struct EncodedRowGroup {
    pub(super) rows: u64,
    pub(super) chunks: Vec<ArrowColumnChunk>,
    /// Per hook, in header order: sums over the stored (rounded) values.
    pub(super) stats: Vec<HookStats>,
    /// Smallest and largest `sequence_id`.
    pub(super) sequence_ids: [u64; 2],
}

/// What every row group of a dataset is encoded with; shared, read-only, by the encoding threads.
pub(super) struct RowGroupEncoder {
    pub(super) hooks: Vec<HookSpec>,
    pub(super) dtype: Dtype,
    pub(super) schema: SchemaRef,
}

impl RowGroupEncoder {
    /// Converts and encodes `rows` with `writers`, the column writers of one row group (from the
    /// shard's `ArrowRowGroupWriterFactory`, one per leaf column in schema order).
    pub(super) fn encode(
        &self,
        rows: RowGroupRows,
        mut writers: Vec<ArrowColumnWriter>,
    ) -> Result<EncodedRowGroup, ParquetError> {
        let n = rows.rows();
        let sequence_ids = [
            rows.sequence_id.iter().copied().min().unwrap_or(u64::MAX),
            rows.sequence_id.iter().copied().max().unwrap_or(0),
        ];
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from(rows.sequence_id)),
            Arc::new(UInt32Array::from(rows.position)),
            Arc::new(UInt32Array::from(rows.token_id)),
        ];
        let mut stats = Vec::with_capacity(self.hooks.len());
        for (hook, acts) in self.hooks.iter().zip(&rows.acts) {
            let mut hook_stats = HookStats::new(hook.d_model);
            let mut planar = Vec::with_capacity(n * hook.d_model * self.dtype.size());
            encode_rows_planar(self.dtype, acts, hook.d_model, &mut planar, &mut hook_stats);
            let width = (hook.d_model * self.dtype.size()) as i32;
            cols.push(Arc::new(FixedSizeBinaryArray::new(width, Buffer::from_vec(planar), None)));
            stats.push(hook_stats);
        }
        // As ArrowWriter feeds its row group's writers: the leaves of each field, in order.
        let mut next_writer = writers.iter_mut();
        for (field, col) in self.schema.fields().iter().zip(&cols) {
            for leaf in compute_leaves(field, col)? {
                let writer = next_writer
                    .next()
                    .ok_or_else(|| ParquetError::General("fewer column writers than leaf columns".into()))?;
                writer.write(&leaf)?;
            }
        }
        let chunks = writers.into_iter().map(ArrowColumnWriter::close).collect::<Result<Vec<_>, _>>()?;
        Ok(EncodedRowGroup { rows: n as u64, chunks, stats, sequence_ids })
    }
}

#[cfg(test)]
mod tests {
    use arrow_array::RecordBatch;
    use parquet::arrow::ArrowWriter;
    use parquet::file::metadata::KeyValue;

    use super::*;
    use crate::format;
    use crate::writer::encoder::new_shard_file;

    fn rows(first: usize, n: usize, hooks: &[HookSpec]) -> RowGroupRows {
        let r = first..first + n;
        RowGroupRows {
            sequence_id: r.clone().map(|i| (i / 10) as u64).collect(),
            position: r.clone().map(|i| (i % 10) as u32).collect(),
            token_id: r.clone().map(|i| (i * 7 % 50) as u32).collect(),
            acts: hooks
                .iter()
                .map(|h| (first * h.d_model..(first + n) * h.d_model).map(|i| (i as f32 * 0.37).sin() * 90.0).collect())
                .collect(),
        }
    }

    /// The row group as the single-threaded writer built it: one RecordBatch for `ArrowWriter`.
    fn record_batch(rows: &RowGroupRows, hooks: &[HookSpec], dtype: Dtype, schema: &SchemaRef) -> RecordBatch {
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from(rows.sequence_id.clone())),
            Arc::new(UInt32Array::from(rows.position.clone())),
            Arc::new(UInt32Array::from(rows.token_id.clone())),
        ];
        for (h, acts) in hooks.iter().zip(&rows.acts) {
            let mut planar = Vec::new();
            encode_rows_planar(dtype, acts, h.d_model, &mut planar, &mut HookStats::new(h.d_model));
            let width = (h.d_model * dtype.size()) as i32;
            cols.push(Arc::new(FixedSizeBinaryArray::new(width, Buffer::from_vec(planar), None)));
        }
        RecordBatch::try_new(schema.clone(), cols).unwrap()
    }

    #[test]
    fn chunks_encoded_in_any_order_and_appended_in_order_are_arrow_writers_bytes() {
        let hooks = vec![HookSpec { name: "a".into(), d_model: 8 }, HookSpec { name: "b".into(), d_model: 5 }];
        let sizes = [16, 16, 16, 7];
        for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            let schema = format::shard_schema(&hooks, dtype);
            let props = format::writer_properties(&hooks, 1, 16, 16 * 8 * dtype.size() + 1).unwrap();
            let starts: Vec<usize> = sizes.iter().scan(0, |s, &n| Some(std::mem::replace(s, *s + n))).collect();
            let kv = KeyValue::new("k".into(), "v".to_string());

            let mut reference = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props.clone())).unwrap();
            for (&first, &n) in starts.iter().zip(&sizes) {
                reference.write(&record_batch(&rows(first, n, &hooks), &hooks, dtype, &schema)).unwrap();
                reference.flush().unwrap();
            }
            reference.append_key_value_metadata(kv.clone());
            reference.finish().unwrap();
            let want = std::mem::take(reference.inner_mut());

            let (mut file, factory) = new_shard_file(&schema, &props).unwrap();
            let encoder = RowGroupEncoder { hooks: hooks.clone(), dtype, schema: schema.clone() };
            // Encoded last to first, as threads may finish them, with the writers of their ordinal.
            let mut encoded: Vec<EncodedRowGroup> = (0..sizes.len())
                .rev()
                .map(|i| encoder.encode(rows(starts[i], sizes[i], &hooks), factory.create_column_writers(i).unwrap()))
                .collect::<Result<_, _>>()
                .unwrap();
            encoded.reverse();
            for (rg, &n) in encoded.into_iter().zip(&sizes) {
                assert_eq!(rg.rows, n as u64);
                assert_eq!(rg.stats.iter().map(|s| s.count).collect::<Vec<_>>(), vec![n as u64; 2]);
                let mut row_group = file.next_row_group().unwrap();
                for chunk in rg.chunks {
                    chunk.append_to_row_group(&mut row_group).unwrap();
                }
                row_group.close().unwrap();
            }
            file.append_key_value_metadata(kv);
            file.finish().unwrap();
            let got = std::mem::take(file.inner_mut());
            assert!(want.len() > 1000, "{dtype:?}: a real file");
            assert!(got == want, "{dtype:?}: {} bytes against ArrowWriter's {}", got.len(), want.len());
        }
    }
}
