//! The data loader: a thread that pulls batches from the store reader, turns them into f32
//! tensors on the training device, scaled (and, when asked, without the rows whose norm is far
//! above the batch's median), and keeps a few ready ahead of the trainer.
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
    /// [rows, d_in] f32 on the training device, already multiplied by the activation scale. With
    /// a norm filter it may hold fewer rows than the reader's batch.
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

/// How the loader turns the reader's rows into training inputs.
#[derive(Clone, Copy, Debug)]
pub struct Preparation {
    /// Every row is multiplied by this (the activation scale).
    pub scale: f64,
    /// Rows whose L2 norm exceeds this multiple of their batch's median norm (the batch this
    /// loader reads: one rank's share in a data-parallel run) are left out of training (dictionary_learning's `max_activation_norm_multiple`); None keeps every row.
    pub max_norm_multiple: Option<f64>,
}

impl Loader {
    pub fn start(reader: Reader, prep: Preparation, device: Device, depth: usize) -> Loader {
        let shard_order = reader.shard_order();
        let mut loader = Self::spawn(reader, move |batch| to_tensor(batch, prep, device), depth);
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

fn to_tensor(batch: Batch, prep: Preparation, device: Device) -> LoadedBatch {
    let values = batch.to_f32();
    let x = Tensor::from_slice(&values).view([batch.rows as i64, batch.d as i64]);
    let x = if device == Device::Cpu {
        x * prep.scale
    } else {
        // Pinned memory lets the copy to the GPU run asynchronously.
        x.pin_memory(device).to_device_(device, Kind::Float, true, false) * prep.scale
    };
    let x = match prep.max_norm_multiple {
        Some(multiple) => drop_rows_above(&x, multiple),
        None => x,
    };
    LoadedBatch { x, next: batch.next }
}

/// The rows of `x` [rows, d] whose norm is at most `multiple` × the batch's median norm. The
/// threshold is a function of the batch alone, so a resumed run filters exactly as before; with
/// `multiple` ≥ 1 the median row itself always stays.
fn drop_rows_above(x: &Tensor, multiple: f64) -> Tensor {
    let _guard = tch::no_grad_guard();
    let norms = x.norm_scalaropt_dim(2, [1i64].as_slice(), false); // [rows]
    let limit = norms.median() * multiple;
    let keep = norms.le_tensor(&limit).nonzero().squeeze_dim(1); // [kept]
    x.index_select(0, &keep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::reader::Batch;
    use store::Dtype;

    fn scale_only(scale: f64) -> Preparation {
        Preparation { scale, max_norm_multiple: None }
    }

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
        let mut loader = Loader::spawn(batches, |b| to_tensor(b, scale_only(1.0), Device::Cpu), 1);
        assert!(loader.next_batch().unwrap().is_some());
        assert!(loader.next_batch().unwrap().is_some());
        let err = loader.next_batch().err().expect("an error, not the end").to_string();
        assert!(err.contains("panicked: boom in the reader"), "{err}");
    }

    #[test]
    fn an_exhausted_reader_is_the_end() {
        let mut loader = Loader::spawn(std::iter::once(Ok(batch())), |b| to_tensor(b, scale_only(2.0), Device::Cpu), 1);
        let first = loader.next_batch().unwrap().unwrap();
        assert_eq!(Vec::<f32>::try_from(first.x.view([-1])).unwrap(), vec![2.0, 4.0]);
        assert!(loader.next_batch().unwrap().is_none());
    }

    #[test]
    fn the_norm_filter_drops_only_rows_far_above_the_median() {
        // Norms 1, 2, 3, 4 and 100: the median is 3, so with a multiple of 2 the limit is 6.
        let rows = [[1f32, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, -4.0], [60.0, 80.0]];
        let x = Tensor::from_slice(rows.as_flattened()).view([5, 2]);
        let kept = drop_rows_above(&x, 2.0);
        assert_eq!(kept.size(), [4, 2]);
        assert_eq!(Vec::<f32>::try_from(kept.view([-1])).unwrap(), rows[..4].as_flattened());
        let all = drop_rows_above(&x, 40.0);
        assert_eq!(all.size(), [5, 2]);
    }
}
