//! The streaming reader: batches of rows of one hook, as plain buffers.
//!
//! * The unit of work is the row group. Each epoch, the row groups are permuted (seed, epoch),
//!   then dealt to ranks longest-first onto the least-loaded rank, so ranks get disjoint row
//!   groups balanced by rows, and every rank yields the same number of batches per epoch
//!   (the floor of the smallest rank's rows over the batch size; the rest is dropped).
//! * Within a rank, rows are permuted within windows of `window_row_groups` consecutive row
//!   groups, so rows from different shards mix. The order is a pure function of
//!   (seed, epoch, rank, world), so the position is just a [`Cursor`] (epoch, batch).
//! * Row groups are fetched ahead (`prefetch_row_groups` concurrent range reads on a tokio
//!   runtime), checked against their CRC-32C, and decoded on a thread pool. Decoded bytes in
//!   flight are bounded by `max_bytes_in_flight`.
//! * Follow mode reads a dataset that is still being written: it picks up shards as their commit
//!   records appear and ends once `manifest.json` exists and every listed shard was read.

mod batch;
mod decode;
mod fetch;
mod follow;
mod footer;
mod open;
mod options;
mod plan;
mod unsplit;
mod window;

use std::sync::Arc;

use tokio::runtime::Runtime;
use tokio::sync::mpsc;

pub use batch::{Batch, Cursor, TokenColumns};
use fetch::{Ctx, Decoded};
pub(crate) use footer::{check_schema, chunk_crcs, parse_footer};
pub use open::window_budget;
pub use options::{FollowOptions, OutputDtype, ReaderOptions, DEFAULT_WINDOW_ROW_GROUPS};
use plan::Plan;
use window::{copy_rows, Window};

use crate::error::{panic_message, Error, Result};
use crate::manifest::Manifest;

enum Source {
    /// A final dataset: jobs are planned from the manifest.
    Final(Plan),
    /// Follow mode: row groups arrive as shards are committed.
    Follow,
}

/// What the fetch task sends the reader: decoded row groups in order, then `End` once the data
/// is exhausted. A channel that closes without `End` means the task died.
enum Fetched {
    RowGroup(Decoded),
    End,
}

/// Streams [`Batch`]es. A blocking iterator: it owns a small tokio runtime and a decoding pool,
/// so do not use it from inside an async runtime.
pub struct Reader {
    rt: Arc<Runtime>,
    rx: mpsc::Receiver<Result<Fetched>>,
    /// The fetch task, joined to report how it died when the channel closes without `End`.
    producer: Option<tokio::task::JoinHandle<()>>,
    /// The fetch task said `End`.
    ended: bool,
    ctx: Arc<Ctx>,
    source: Arc<Source>,
    opts: ReaderOptions,
    cursor: Cursor,
    /// Row of the rank's epoch stream that the next batch starts at.
    row: u64,
    window: Option<Window>,
    done: bool,
    manifest: Option<Manifest>,
}

/// The shards a reader has discovered, in order. The list only grows, so any reading of it
/// covers every row read before: in follow mode it is what a checkpoint saves as
/// [`FollowOptions::replay`], so that a resumed run reads the rows in the same order.
pub struct ShardOrder(Arc<Ctx>);

impl ShardOrder {
    pub fn keys(&self) -> Vec<String> {
        let shards = self.0.shards.lock().unwrap();
        shards.iter().map(|s| s.key.clone()).collect()
    }
}

impl Reader {
    /// The manifest (None in follow mode before the dataset is final).
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// `d_model` of the hook read.
    pub fn d_model(&self) -> usize {
        self.ctx.d
    }

    /// Batches every rank yields per epoch (None in follow mode).
    pub fn batches_per_epoch(&self) -> Option<u64> {
        match &*self.source {
            Source::Final(p) => Some(p.batches_per_epoch),
            Source::Follow => None,
        }
    }

    /// The cursor of the next batch.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Hand a consumed batch's buffer back for reuse (optional). Reading into recycled buffers
    /// avoids the page faults and zeroing of fresh multi-megabyte allocations.
    pub fn recycle(&self, batch: Batch) {
        self.ctx.buffers.put(batch.bytes);
    }

    /// The order in which this reader discovers shards, readable from another thread.
    pub fn shard_order(&self) -> ShardOrder {
        ShardOrder(self.ctx.clone())
    }

    /// The next decoded row group, `None` once the fetch task says the data is exhausted. A
    /// channel that closes without that word is an error, never an end.
    fn recv(&mut self) -> Result<Option<Decoded>> {
        if self.ended {
            return Ok(None);
        }
        match self.rt.block_on(self.rx.recv()) {
            Some(Ok(Fetched::RowGroup(d))) => Ok(Some(d)),
            Some(Ok(Fetched::End)) => {
                self.ended = true;
                Ok(None)
            }
            Some(Err(e)) => Err(e),
            None => Err(self.producer_failure()),
        }
    }

    /// Why the fetch task stopped without finishing.
    fn producer_failure(&mut self) -> Error {
        let why = match self.producer.take().map(|task| self.rt.block_on(task)) {
            Some(Err(e)) if e.is_panic() => {
                format!("panicked: {}", panic_message(&*e.into_panic()))
            }
            Some(Err(e)) => format!("was cancelled: {e}"),
            Some(Ok(())) => "stopped before the data ended".to_string(),
            None => "had already stopped".to_string(),
        };
        Error::ReaderFailed { url: self.ctx.loc.url.clone(), detail: format!("the fetch task {why}") }
    }

    fn next_final(&mut self) -> Result<Option<Batch>> {
        let (bpe, epoch_rows, b) = match &*self.source {
            Source::Final(p) => (p.batches_per_epoch, p.epoch_rows, p.batch_rows),
            Source::Follow => unreachable!(),
        };
        if self.opts.epochs.is_some_and(|n| self.cursor.epoch >= n) {
            return Ok(None);
        }
        let want = b.min(epoch_rows - self.row) as usize;
        let mut batch = self.new_batch(want);
        let mut filled = 0usize;
        while filled < want {
            let need_window = match &self.window {
                Some(w) => w.epoch != self.cursor.epoch || self.row >= w.end(),
                None => true,
            };
            if need_window {
                self.window = None; // release its bytes before waiting for the next
                self.window = Some(self.next_window()?);
                let w = self.window.as_ref().unwrap();
                if w.epoch != self.cursor.epoch || self.row < w.start || self.row >= w.end() {
                    return Err(Error::OutOfStep {
                        url: self.ctx.loc.url.clone(),
                        detail: format!(
                            "window of epoch {} rows {}..{}, wanted epoch {} row {}",
                            w.epoch,
                            w.start,
                            w.end(),
                            self.cursor.epoch,
                            self.row
                        ),
                    });
                }
            }
            filled += self.copy_from_window(&mut batch, want - filled);
        }
        batch.cursor = self.cursor;
        self.cursor.batch += 1;
        if self.cursor.batch >= bpe {
            self.cursor = Cursor { epoch: self.cursor.epoch + 1, batch: 0 };
            self.row = 0;
            self.window = None;
        }
        batch.next = self.cursor;
        Ok(Some(batch))
    }

    /// Copies up to `max` rows of the current window, from row `self.row` on, into `batch`;
    /// returns how many.
    fn copy_from_window(&mut self, batch: &mut Batch, max: usize) -> usize {
        let row_bytes = self.ctx.d * self.ctx.out_dtype.size();
        let w = self.window.as_mut().unwrap();
        let from = (self.row - w.start) as usize;
        let n = max.min(w.order.len() - from);
        copy_rows(w, from, n, batch, row_bytes);
        self.row += n as u64;
        n
    }

    fn new_batch(&self, rows: usize) -> Batch {
        Batch {
            hook: self.opts.hook.clone(),
            dtype: self.ctx.out_dtype,
            rows,
            d: self.ctx.d,
            bytes: Vec::new(), // sized on the first copy, or taken whole from a row group
            tokens: self.opts.with_tokens.then(TokenColumns::default),
            cursor: self.cursor,
            next: self.cursor,
        }
    }

    fn next_window(&mut self) -> Result<Window> {
        let mut rgs: Vec<Decoded> = Vec::new();
        loop {
            let d = self.recv()?.ok_or_else(|| Error::ReaderFailed {
                url: self.ctx.loc.url.clone(),
                detail: "the fetch task ended before the planned row groups".into(),
            })?;
            let len = d.job.window_len;
            rgs.push(d);
            if rgs.len() == len {
                break;
            }
        }
        let j = rgs[0].job.clone();
        let plan = match &*self.source {
            Source::Final(p) => p,
            Source::Follow => unreachable!(),
        };
        Ok(Window::new(j.epoch, j.window_row_start, rgs, |rows| plan.window_perm(j.epoch, j.window, rows)))
    }
}

impl Iterator for Reader {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        if self.done {
            return None;
        }
        let r = match &*self.source {
            Source::Final(_) => self.next_final(),
            Source::Follow => self.next_follow(),
        };
        match r {
            Ok(Some(b)) => Some(Ok(b)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[allow(dead_code)]
fn _assert_send() {
    fn is_send<T: Send>() {}
    is_send::<Reader>();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failpoints;

    fn small_dataset(url: &str, rows: usize) {
        use crate::manifest::*;
        let header = DatasetHeader {
            model: ModelIdentity { name: "m".into(), file_sha256: "00".repeat(32) },
            tokenizer: TokenizerIdentity { name: "t".into(), sha256: "11".repeat(32) },
            hooks: vec![HookSpec { name: "h".into(), d_model: 4 }],
            context_len: 8,
            corpus: CorpusIdentity { name: "c".into(), sha256: "22".repeat(32), detail: String::new() },
            created: CreatedInfo { version: "test".into(), command_line: vec![] },
        };
        let opts = crate::WriterOptions { row_group_rows: 16, shard_bytes: Some(256), ..Default::default() };
        let mut w = crate::DatasetWriter::create(url, header, opts).unwrap();
        let batch = crate::RowBatch {
            sequence_id: (0..rows as u64).map(|r| r / 8).collect(),
            position: (0..rows as u32).map(|r| r % 8).collect(),
            token_id: vec![7; rows],
            activations: vec![("h".into(), (0..rows * 4).map(|v| v as f32).collect())],
        };
        w.append(batch).unwrap();
        w.finish().unwrap();
    }

    fn read_all(url: &str, opts: ReaderOptions) -> Result<Vec<Vec<f32>>> {
        Reader::open(url, opts)?.map(|b| b.map(|b| b.to_f32())).collect()
    }

    #[test]
    fn a_decoding_panic_is_an_error_naming_the_shard() {
        let url = "memory://failpoints/decode";
        small_dataset(url, 64);
        failpoints::arm("decode", url);
        let err = read_all(url, ReaderOptions::one_pass_in_order("h", 16)).unwrap_err().to_string();
        assert!(err.contains("corrupt shard `shards/") && err.contains("panicked"), "{err}");
    }

    #[test]
    fn a_dead_follow_task_is_an_error_not_the_end() {
        let url = "memory://failpoints/follow";
        small_dataset(url, 64);
        failpoints::arm("follow_poll", url);
        let mut opts = ReaderOptions::one_pass_in_order("h", 16);
        opts.follow = Some(FollowOptions::default());
        let err = read_all(url, opts).unwrap_err();
        assert!(matches!(err, Error::ReaderFailed { .. }), "{err}");
        assert!(err.to_string().contains("panicked: failpoint"), "{err}");
    }

    #[test]
    fn a_resumed_follow_reader_continues_where_the_first_stopped() {
        let url = "memory://follow-resume/a";
        small_dataset(url, 640);
        let mut opts = ReaderOptions::new("h", 24);
        opts.output = OutputDtype::F32;
        opts.window_row_groups = 3;
        opts.follow = Some(FollowOptions::default());
        let mut first = Reader::open(url, opts.clone()).unwrap();
        let whole: Vec<Vec<f32>> = first.by_ref().map(|b| b.unwrap().to_f32()).collect();
        assert_eq!(whole.len(), 640 / 24);
        // Resume past the first windows (3 row groups of 16 rows = 48 rows each).
        for at in [1u64, 5, 17] {
            let mut o = opts.clone();
            o.start = Cursor { epoch: 0, batch: at };
            o.follow.as_mut().unwrap().replay = first.shard_order().keys();
            let rest = read_all(url, o).unwrap();
            assert_eq!(rest, whole[at as usize..], "resumed at batch {at}");
        }
    }
}
