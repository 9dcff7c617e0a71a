//! The text column of a Parquet file, read a record batch at a time: memory holds about a page
//! and a batch of the column, never the whole file.

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use parquet::file::reader::ChunkReader;

use super::FileError;
use crate::error::Error;

/// Rows decoded at a time. Does not change the documents, only how much of the column is held.
pub(super) const PARQUET_BATCH_ROWS: usize = 1024;

/// The rows of a Parquet file's text column, as (row index, text), nulls left out (blank texts
/// are yielded; the caller drops them).
pub(super) struct ParquetRecords {
    batches: ParquetRecordBatchReader,
    /// The batch being read; `None` before the first one and after the last.
    batch: Option<ArrayRef>,
    /// Index in `batch` of the next row.
    next_in_batch: usize,
    /// Row index (in the file) of `batch`'s first row.
    batch_start: u64,
}

impl ParquetRecords {
    /// Opens the text column `column` of the Parquet file `reader`, reading `batch_rows` rows at
    /// a time. A file that is not Parquet is unreadable; a missing or non-string column, or more
    /// rows than document ids allow, is an error.
    pub(super) fn open<R: ChunkReader + 'static>(
        reader: R,
        location: &str,
        column: &str,
        batch_rows: usize,
    ) -> Result<Self, FileError> {
        let unreadable =
            |e: parquet::errors::ParquetError| FileError::Unreadable(format!("not a readable Parquet file ({e})"));
        let builder = ParquetRecordBatchReaderBuilder::try_new(reader).map_err(unreadable)?;
        let fields = builder.schema().fields().clone();
        let Some(index) = fields.iter().position(|f| f.name() == column) else {
            let columns = fields.iter().map(|f| f.name().clone()).collect();
            return Err(FileError::Bad(Error::NoTextColumn {
                location: location.into(),
                column: column.into(),
                columns,
            }));
        };
        let data_type = fields[index].data_type().clone();
        if !matches!(data_type, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
            return Err(FileError::Bad(Error::TextColumnNotStrings {
                location: location.into(),
                column: column.into(),
                data_type,
            }));
        }
        let rows = builder.metadata().file_metadata().num_rows();
        if rows > i64::from(u32::MAX) {
            return Err(FileError::Bad(Error::TooManyRows { location: location.into(), rows }));
        }
        // Top-level fields of an Arrow-written file map one to one onto the Parquet root columns.
        let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
        let batches = builder.with_projection(mask).with_batch_size(batch_rows.max(1)).build().map_err(unreadable)?;
        Ok(ParquetRecords { batches, batch: None, next_in_batch: 0, batch_start: 0 })
    }

    pub(super) fn next(&mut self) -> Option<Result<(u32, String), FileError>> {
        loop {
            if let Some(array) = &self.batch {
                while self.next_in_batch < array.len() {
                    let i = self.next_in_batch;
                    self.next_in_batch += 1;
                    if let Some(text) = string_at(array.as_ref(), i) {
                        return Some(Ok(((self.batch_start + i as u64) as u32, text.to_string())));
                    }
                }
                self.batch_start += array.len() as u64;
            }
            match self.batches.next()? {
                Ok(batch) => {
                    self.batch = Some(batch.column(0).clone());
                    self.next_in_batch = 0;
                }
                Err(e) => {
                    self.batch = None;
                    return Some(Err(FileError::Unreadable(format!("cannot decode Parquet ({e})"))));
                }
            }
        }
    }
}

/// Row `i` of a string column (`Utf8`, `LargeUtf8` or `Utf8View`); `None` for a null.
fn string_at(array: &dyn Array, i: usize) -> Option<&str> {
    if !array.is_valid(i) {
        return None;
    }
    if let Some(a) = array.as_string_opt::<i32>() {
        Some(a.value(i))
    } else if let Some(a) = array.as_string_opt::<i64>() {
        Some(a.value(i))
    } else {
        array.as_string_view_opt().map(|a| a.value(i))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, LargeStringArray, RecordBatch, StringArray, StringViewArray};
    use bytes::Bytes;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;

    /// The whole text column at once, as (row index, text) without nulls and blanks: how files
    /// were read before they were streamed, kept to check that streaming changes nothing.
    fn collected(bytes: Bytes) -> Vec<(u32, String)> {
        let batches = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap();
        let mut out = Vec::new();
        let mut row = 0u64;
        for batch in batches {
            let batch = batch.unwrap();
            let array = batch.column_by_name("text").unwrap();
            for i in 0..array.len() {
                if let Some(text) = string_at(array.as_ref(), i).filter(|t| !t.trim().is_empty()) {
                    out.push(((row + i as u64) as u32, text.to_string()));
                }
            }
            row += array.len() as u64;
        }
        out
    }

    fn streamed(bytes: Bytes, batch_rows: usize) -> Vec<(u32, String)> {
        let mut records = ParquetRecords::open(bytes, "test.parquet", "text", batch_rows).unwrap_or_else(|e| match e {
            FileError::Bad(e) => panic!("{e:#}"),
            FileError::Unreadable(e) => panic!("{e}"),
        });
        std::iter::from_fn(|| records.next())
            .map(|r| r.unwrap_or_else(|_| panic!("decode error")))
            .filter(|(_, t)| !t.trim().is_empty())
            .collect()
    }

    /// A Parquet file with an `id` column and `text`, in row groups of 7 rows.
    fn parquet_file(text: ArrayRef) -> Bytes {
        let ids: ArrayRef = Arc::new(arrow_array::Int64Array::from_iter_values(0..text.len() as i64));
        let batch = RecordBatch::try_from_iter([("id", ids), ("text", text)]).unwrap();
        let props = parquet::file::properties::WriterProperties::builder().set_max_row_group_row_count(Some(7)).build();
        let mut out = Vec::new();
        let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        out.into()
    }

    #[test]
    fn streamed_rows_equal_the_whole_column_read() {
        let texts: Vec<Option<String>> = (0..50)
            .map(|i| match i % 6 {
                0 => None,
                1 => Some("  \n".to_string()),
                _ => Some(format!("row {i}: ∂ö 中 {}", "x".repeat(i))),
            })
            .collect();
        let arrays: [ArrayRef; 3] = [
            Arc::new(StringArray::from(texts.clone())),
            Arc::new(LargeStringArray::from(texts.clone())),
            Arc::new(StringViewArray::from(texts.iter().map(|t| t.as_deref()).collect::<Vec<_>>())),
        ];
        for array in arrays {
            let file = parquet_file(array);
            let whole = collected(file.clone());
            assert_eq!(whole.len(), 50 - 9 - 9, "nulls and blanks left out");
            // Batches smaller than, equal to and larger than the row groups, and than the file.
            for batch_rows in [1, 3, 7, 10, PARQUET_BATCH_ROWS] {
                assert_eq!(streamed(file.clone(), batch_rows), whole, "{batch_rows} rows a batch");
            }
        }
    }
}
