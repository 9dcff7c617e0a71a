//! The encoding threads: several row groups converted and encoded at once, their results taken
//! back in the order they were submitted, so that a shard's bytes do not depend on the number of
//! threads.
//!
//! Every row group has its own result channel. A thread that fails returns an error through it;
//! one that panics has the panic turned into an error; and a channel closed without a result is
//! an error too, never taken for the end of the work.

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use parquet::arrow::arrow_writer::ArrowColumnWriter;

use super::row_group::{EncodedRowGroup, RowGroupEncoder, RowGroupRows};
use crate::error::{panic_message, Error, Result};

/// What an encoding thread sends back: the encoded row group, or why there is none.
type Outcome = std::result::Result<EncodedRowGroup, String>;

pub(super) struct EncodePool {
    pool: rayon::ThreadPool,
    encoder: Arc<RowGroupEncoder>,
    /// Submitted row groups, oldest first: (ordinal, result channel).
    in_flight: VecDeque<(u64, Receiver<Outcome>)>,
    /// Row groups submitted or encoded but not yet taken; bounds the memory they hold.
    max_in_flight: usize,
    /// The dataset, for errors.
    url: String,
}

impl EncodePool {
    pub(super) fn new(threads: usize, encoder: RowGroupEncoder, url: &str) -> Result<Self> {
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("sae-store-encode-{i}"))
            // Without a handler a panic that escapes a job aborts the process; with it the job's
            // result channel closes, which `next_in_order` reports as an error.
            .panic_handler(|payload| tracing::error!("an encoding thread panicked: {}", panic_message(&*payload)))
            .build()
            .map_err(|e| Error::Start { what: "encoding threads", cause: e.to_string() })?;
        Ok(EncodePool {
            pool,
            encoder: Arc::new(encoder),
            in_flight: VecDeque::new(),
            // Each thread has a row group queued behind the one it encodes.
            max_in_flight: 2 * threads,
            url: url.to_string(),
        })
    }

    /// Whether as many row groups are in flight as may be: take one before submitting another.
    pub(super) fn is_full(&self) -> bool {
        self.in_flight.len() >= self.max_in_flight
    }

    /// Starts encoding `rows`, the `ordinal`-th row group of this writer, with `writers`.
    pub(super) fn submit(&mut self, ordinal: u64, rows: RowGroupRows, writers: Vec<ArrowColumnWriter>) {
        let (tx, rx) = sync_channel(1);
        let encoder = self.encoder.clone();
        #[cfg(test)]
        let url = self.url.clone();
        self.pool.spawn(move || {
            #[cfg(test)]
            crate::failpoints::hit("encode_thread_dies", &url);
            // A panic on a rayon thread would abort the process; here it is this row group's error.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                #[cfg(test)]
                crate::failpoints::hit("encode_row_group", &url);
                encoder.encode(rows, writers).map_err(|e| e.to_string())
            }))
            .unwrap_or_else(|payload| Err(format!("its encoding thread panicked: {}", panic_message(&*payload))));
            // The receiver is gone only when the writer already stopped on an earlier error.
            let _ = tx.send(outcome);
        });
        self.in_flight.push_back((ordinal, rx));
    }

    /// The oldest submitted row group, encoded, waiting for it; `None` when none is in flight.
    pub(super) fn next_in_order(&mut self) -> Option<Result<EncodedRowGroup>> {
        let (ordinal, rx) = self.in_flight.pop_front()?;
        let outcome = rx.recv().unwrap_or_else(|_| Err("its encoding thread stopped without a result".into()));
        Some(outcome.map_err(|detail| Error::Encode { url: self.url.clone(), row_group: ordinal, detail }))
    }
}

#[cfg(test)]
mod tests {
    use crate::failpoints;
    use crate::manifest::*;
    use crate::{DatasetWriter, Error, RowBatch, WriterOptions};

    fn header() -> DatasetHeader {
        DatasetHeader {
            model: ModelIdentity { name: "m".into(), file_sha256: "00".repeat(32) },
            tokenizer: TokenizerIdentity { name: "t".into(), sha256: "11".repeat(32) },
            hooks: vec![HookSpec { name: "h".into(), d_model: 8 }],
            context_len: 16,
            corpus: CorpusIdentity { name: "c".into(), sha256: "22".repeat(32), detail: String::new() },
            created: CreatedInfo { version: "test".into(), command_line: vec![] },
        }
    }

    fn rows(n: usize) -> RowBatch {
        RowBatch {
            sequence_id: (0..n as u64).map(|r| r / 16).collect(),
            position: (0..n as u32).map(|r| r % 16).collect(),
            token_id: vec![3; n],
            activations: vec![("h".into(), (0..n * 8).map(|v| v as f32 * 0.5).collect())],
        }
    }

    /// Writes until the writer reports an error (from `append` or `finish`) and returns it,
    /// checking that nothing was committed.
    fn write_until_failure(url: &str) -> Error {
        let opts = WriterOptions { row_group_rows: 16, encode_threads: 3, ..Default::default() };
        let mut w = DatasetWriter::create(url, header(), opts).unwrap();
        let mut first = None;
        for _ in 0..20 {
            if let Err(e) = w.append(rows(64)) {
                first = Some(e);
                break;
            }
        }
        let err = match first {
            Some(e) => {
                // Every later call reports the same failure rather than carrying on.
                let again = w.append(rows(16)).unwrap_err().to_string();
                assert!(again.contains("failed earlier") && again.contains("row group 0"), "{again}");
                e
            }
            None => w.finish().unwrap_err(),
        };
        let info = crate::info(url, &Default::default()).unwrap();
        assert_eq!((info.is_final, info.shards), (false, 0), "nothing may be committed after a failed encoding");
        err
    }

    #[test]
    fn a_panic_while_encoding_is_an_error_naming_the_row_group() {
        let url = "memory://failpoints/encode-panic";
        failpoints::arm("encode_row_group", url);
        let err = write_until_failure(url).to_string();
        assert!(err.contains("row group 0") && err.contains("panicked: failpoint"), "{err}");
    }

    #[test]
    fn a_dead_encoding_thread_is_an_error_not_the_end() {
        let url = "memory://failpoints/encode-dies";
        failpoints::arm("encode_thread_dies", url);
        let err = write_until_failure(url).to_string();
        assert!(err.contains("row group 0") && err.contains("stopped without a result"), "{err}");
    }
}
