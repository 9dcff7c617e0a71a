//! An object-store file read in order by range requests, holding at most one range: corpus
//! files may be larger than memory.

use std::io::{BufRead, Read};
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use store::StoreFailure;

use super::{block_on, STREAM_BUFFER_BYTES};

/// An object read by range requests of [`STREAM_BUFFER_BYTES`], in order.
pub(super) struct ObjectReader {
    pub(super) store: Arc<dyn ObjectStore>,
    pub(super) path: ObjectPath,
    pub(super) runtime: Arc<tokio::runtime::Runtime>,
    pub(super) size: u64,
    /// Offset of the first byte not fetched yet.
    pub(super) next: u64,
    /// Fetched bytes not consumed yet.
    pub(super) chunk: Bytes,
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ObjectReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.chunk.is_empty() && self.next < self.size {
            let range = self.next..self.size.min(self.next + STREAM_BUFFER_BYTES as u64);
            let (store, path) = (self.store.clone(), self.path.clone());
            let fetched = block_on(&self.runtime, async move { store.get_range(&path, range).await })
                .map_err(|e| std::io::Error::other(StoreFailure::new(&e).to_string()))?;
            if fetched.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the object is shorter than listed",
                ));
            }
            self.next += fetched.len() as u64;
            self.chunk = fetched;
        }
        Ok(&self.chunk)
    }

    fn consume(&mut self, amount: usize) {
        let _ = self.chunk.split_to(amount.min(self.chunk.len()));
    }
}
