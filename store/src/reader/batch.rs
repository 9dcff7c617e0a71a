//! What the reader yields: batches of rows, their token columns, and the cursor that resumes
//! after them.

use arrow_array::{Array, RecordBatch, UInt32Array, UInt64Array};
use serde::{Deserialize, Serialize};

use crate::format::{self, Dtype};

/// The reader's position: the next batch to yield is batch `batch` of epoch `epoch`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub batch: u64,
}

/// Token columns of the rows of a batch, in the batch's row order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenColumns {
    pub sequence_id: Vec<u64>,
    pub position: Vec<u32>,
    pub token_id: Vec<u32>,
}

impl TokenColumns {
    /// Appends the token columns of an Arrow batch; `None` when one is missing or not of the
    /// type this crate writes.
    pub(crate) fn extend_from_arrow(&mut self, batch: &RecordBatch) -> Option<()> {
        let column = |name: &str| batch.column_by_name(name).map(|c| c.as_any());
        let sequence_id = column(format::COL_SEQUENCE_ID)?.downcast_ref::<UInt64Array>()?;
        let position = column(format::COL_POSITION)?.downcast_ref::<UInt32Array>()?;
        let token_id = column(format::COL_TOKEN_ID)?.downcast_ref::<UInt32Array>()?;
        self.sequence_id.extend(sequence_id.values().iter());
        self.position.extend(position.values().iter());
        self.token_id.extend(token_id.values().iter());
        Some(())
    }
}

/// A batch of rows of one hook: `rows x d` values of `dtype`, row-major, little-endian.
#[derive(Clone, Debug)]
pub struct Batch {
    pub hook: String,
    pub dtype: Dtype,
    pub rows: usize,
    pub d: usize,
    pub bytes: Vec<u8>,
    /// Present when [`ReaderOptions::with_tokens`](super::ReaderOptions::with_tokens) is set.
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
