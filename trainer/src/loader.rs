//! The data loader: a thread that pulls batches from the store reader, turns them into f32
//! tensors on the training device, scaled, and keeps a few ready ahead of the trainer.
//!
//! The thread says when the data ended; a thread that dies (a panic anywhere in the data path)
//! closes its channel without saying so, and [`Loader::next_batch`] reports that as an error, never as
//! the end of the data.

use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use store::reader::{Batch, Cursor, Reader, ShardOrder};
use tch::{Device, Kind, Tensor};

/// A batch ready for the trainer.
pub struct LoadedBatch {
    /// [rows, d_in] f32 on the training device, already multiplied by the activation scale.
    pub x: Tensor,
    /// The reader's cursor after this batch: what a checkpoint saves to resume after it.
    pub next: Cursor,
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("the data loader thread died: {0}")]
    Died(String),
}

/// `Ok(None)` is the loader thread's word that the reader is exhausted.
type Item = Result<Option<LoadedBatch>, store::Error>;

/// Batches arrive in the reader's order; the loader runs `depth` batches ahead.
pub struct Loader {
    rx: Receiver<Item>,
    thread: Option<JoinHandle<()>>,
    shard_order: Option<ShardOrder>,
    /// Total time the trainer spent blocked in [`Loader::next_batch`].
    pub waited: Duration,
}

impl Loader {
    pub fn start(reader: Reader, scale: f64, device: Device, depth: usize) -> Loader {
        let shard_order = reader.shard_order();
        let mut loader = Self::spawn(reader, move |batch| to_tensor(batch, scale, device), depth);
        loader.shard_order = Some(shard_order);
        loader
    }

    /// Runs `batches` on the loader thread, converting each with `convert`.
    fn spawn<I, F>(batches: I, convert: F, depth: usize) -> Loader
    where
        I: Iterator<Item = store::Result<Batch>> + Send + 'static,
        F: Fn(Batch) -> LoadedBatch + Send + 'static,
    {
        let (tx, rx) = sync_channel(depth.max(1));
        // Dropping the receiver makes the thread's next send fail, so it stops after at most one
        // more batch (in follow mode it may be waiting for a writer): it is never joined on drop.
        let thread = std::thread::Builder::new()
            .name("sae-train-loader".into())
            .spawn(move || {
                for item in batches {
                    let item = item.map(|batch| Some(convert(batch)));
                    let failed = item.is_err();
                    if tx.send(item).is_err() || failed {
                        return; // the trainer stopped listening, or the reader failed
                    }
                }
                let _ = tx.send(Ok(None));
            })
            .expect("spawn the loader thread");
        Loader { rx, thread: Some(thread), shard_order: None, waited: Duration::ZERO }
    }

    /// The next batch; `Ok(None)` when the reader is exhausted.
    pub fn next_batch(&mut self) -> Result<Option<LoadedBatch>, LoaderError> {
        let started = Instant::now();
        let item = self.rx.recv();
        self.waited += started.elapsed();
        match item {
            Ok(item) => Ok(item?),
            Err(_) => Err(LoaderError::Died(self.death())),
        }
    }

    /// The shard keys the reader has discovered so far, in order (see [`ShardOrder`]).
    pub fn shard_order(&self) -> Vec<String> {
        self.shard_order.as_ref().map(ShardOrder::keys).unwrap_or_default()
    }

    fn death(&mut self) -> String {
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(payload)) => format!("panicked: {}", store::panic_message(&*payload)),
            Some(Ok(())) => "it stopped without an error or the end of the data".into(),
            None => "it had already stopped".into(),
        }
    }
}

fn to_tensor(batch: Batch, scale: f64, device: Device) -> LoadedBatch {
    let values = batch.to_f32();
    let x = Tensor::from_slice(&values).view([batch.rows as i64, batch.d as i64]);
    let x = if device == Device::Cpu {
        x * scale
    } else {
        // Pinned memory lets the copy to the GPU run asynchronously.
        x.pin_memory(device).to_device_(device, Kind::Float, true, false) * scale
    };
    LoadedBatch { x, next: batch.next }
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::reader::Batch;
    use store::Dtype;

    fn batch() -> Batch {
        Batch {
            hook: "h".into(),
            dtype: Dtype::F32,
            rows: 1,
            d: 2,
            bytes: [1f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect(),
            tokens: None,
            cursor: Cursor::default(),
            next: Cursor::default(),
        }
    }

    #[test]
    fn a_panicking_data_path_is_an_error_not_the_end() {
        let mut served = 0;
        let batches = std::iter::from_fn(move || {
            served += 1;
            if served > 2 {
                panic!("boom in the reader");
            }
            Some(Ok(batch()))
        });
        let mut loader = Loader::spawn(batches, |b| to_tensor(b, 1.0, Device::Cpu), 1);
        assert!(loader.next_batch().unwrap().is_some());
        assert!(loader.next_batch().unwrap().is_some());
        let err = loader.next_batch().err().expect("an error, not the end").to_string();
        assert!(err.contains("panicked: boom in the reader"), "{err}");
    }

    #[test]
    fn an_exhausted_reader_is_the_end() {
        let mut loader = Loader::spawn(std::iter::once(Ok(batch())), |b| to_tensor(b, 2.0, Device::Cpu), 1);
        let first = loader.next_batch().unwrap().unwrap();
        assert_eq!(Vec::<f32>::try_from(first.x.view([-1])).unwrap(), vec![2.0, 4.0]);
        assert!(loader.next_batch().unwrap().is_none());
    }
}
