//! Random access to an object-store file by ranged GETs, for Parquet: the reader asks for the
//! footer, then for the pages of the text column, and never needs the whole object.

use std::io::Read;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::errors::ParquetError;
use parquet::file::reader::{ChunkReader, Length};
use store::StoreFailure;

use super::{block_on, STREAM_BUFFER_BYTES};

/// An object read by ranged GETs. Each GET reads at least [`STREAM_BUFFER_BYTES`] (or to the end
/// of the object) and the last one is kept, so the many small reads of a page reader (a header,
/// then its page) cost few requests. Cheap to clone: clones share the kept range.
#[derive(Clone)]
pub(super) struct RangedObject(Arc<Inner>);

struct Inner {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    runtime: Arc<tokio::runtime::Runtime>,
    size: u64,
    /// The last range fetched: its offset in the object and its bytes.
    kept: Mutex<(u64, Bytes)>,
}

impl RangedObject {
    pub(super) fn new(
        store: Arc<dyn ObjectStore>,
        path: ObjectPath,
        runtime: Arc<tokio::runtime::Runtime>,
        size: u64,
    ) -> Self {
        RangedObject(Arc::new(Inner { store, path, runtime, size, kept: Mutex::new((0, Bytes::new())) }))
    }

    /// `length` bytes from `start`, from the kept range or a new GET.
    fn bytes(&self, start: u64, length: usize) -> Result<Bytes, ParquetError> {
        let end = start + length as u64;
        if end > self.0.size {
            return Err(ParquetError::EOF(format!("bytes {start}..{end} asked of an object of {} bytes", self.0.size)));
        }
        let mut kept = self.0.kept.lock().unwrap_or_else(|e| e.into_inner());
        let (kept_start, kept_bytes) = &*kept;
        if start >= *kept_start && end <= kept_start + kept_bytes.len() as u64 {
            let from = (start - kept_start) as usize;
            return Ok(kept_bytes.slice(from..from + length));
        }
        let fetch_end = self.0.size.min(end.max(start + STREAM_BUFFER_BYTES as u64));
        let (store, path) = (self.0.store.clone(), self.0.path.clone());
        let fetched = block_on(&self.0.runtime, async move { store.get_range(&path, start..fetch_end).await })
            .map_err(|e| ParquetError::General(StoreFailure::new(&e).to_string()))?;
        if (fetched.len() as u64) < end - start {
            return Err(ParquetError::EOF("the object is shorter than listed".into()));
        }
        let wanted = fetched.slice(..length);
        *kept = (start, fetched);
        Ok(wanted)
    }
}

impl Length for RangedObject {
    fn len(&self) -> u64 {
        self.0.size
    }
}

impl ChunkReader for RangedObject {
    type T = RangedRead;

    fn get_read(&self, start: u64) -> Result<RangedRead, ParquetError> {
        Ok(RangedRead { object: self.clone(), position: start })
    }

    fn get_bytes(&self, start: u64, length: usize) -> Result<Bytes, ParquetError> {
        self.bytes(start, length)
    }
}

/// The bytes of a [`RangedObject`] from an offset on (for page headers, whose length is only
/// known once they are parsed).
pub(super) struct RangedRead {
    object: RangedObject,
    position: u64,
}

/// Bytes a [`RangedRead`] hands out per call: page headers are small.
const READ_STEP: usize = 64 << 10;

impl Read for RangedRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.object.0.size.saturating_sub(self.position);
        let n = buf.len().min(READ_STEP).min(usize::try_from(left).unwrap_or(usize::MAX));
        if n == 0 {
            return Ok(0);
        }
        let bytes = self.object.bytes(self.position, n).map_err(std::io::Error::other)?;
        buf[..n].copy_from_slice(&bytes);
        self.position += n as u64;
        Ok(n)
    }
}
