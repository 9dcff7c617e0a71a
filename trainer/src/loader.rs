//! The data loader: a thread that pulls batches from the store reader, turns them into f32
//! tensors on the training device, scaled, and keeps a few ready ahead of the trainer.

use std::sync::mpsc::{sync_channel, Receiver};
use std::time::{Duration, Instant};

use store::reader::{Cursor, Reader};
use tch::{Device, Kind, Tensor};

/// A batch ready for the trainer.
pub struct LoadedBatch {
    /// [rows, d_in] f32 on the training device, already multiplied by the activation scale.
    pub x: Tensor,
    /// The reader's cursor after this batch: what a checkpoint saves to resume after it.
    pub next: Cursor,
}

/// Batches arrive in the reader's order; the loader runs `depth` batches ahead.
pub struct Loader {
    rx: Receiver<Result<LoadedBatch, store::Error>>,
    /// Total time the trainer spent blocked in [`Loader::next`].
    pub waited: Duration,
}

impl Loader {
    pub fn start(mut reader: Reader, scale: f64, device: Device, depth: usize) -> Loader {
        let (tx, rx) = sync_channel(depth.max(1));
        // The thread is not joined: dropping the receiver makes its next send fail, so it stops
        // after at most one more batch (in follow mode it may be waiting for a writer).
        std::thread::Builder::new()
            .name("sae-train-loader".into())
            .spawn(move || {
                while let Some(item) = reader.next() {
                    let item = item.map(|batch| {
                        let values = batch.to_f32();
                        let x = Tensor::from_slice(&values).view([batch.rows as i64, batch.d as i64]);
                        let x = if device == Device::Cpu {
                            x * scale
                        } else {
                            // Pinned memory lets the copy to the GPU run asynchronously.
                            x.pin_memory(device).to_device_(device, Kind::Float, true, false) * scale
                        };
                        let next = batch.next;
                        reader.recycle(batch);
                        LoadedBatch { x, next }
                    });
                    let failed = item.is_err();
                    if tx.send(item).is_err() || failed {
                        return; // the trainer stopped listening, or the reader failed
                    }
                }
            })
            .expect("spawn the loader thread");
        Loader { rx, waited: Duration::ZERO }
    }

    /// The next batch, `None` when the reader is exhausted.
    pub fn next(&mut self) -> Option<Result<LoadedBatch, store::Error>> {
        let started = Instant::now();
        let item = self.rx.recv().ok();
        self.waited += started.elapsed();
        item
    }
}
