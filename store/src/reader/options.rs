//! What a reader is asked to read, and how.

use std::time::Duration;

use super::Cursor;
use crate::location::StoreOptions;

/// Row groups whose rows are shuffled together by default: 8 × 4096 rows of a default capture.
pub const DEFAULT_WINDOW_ROW_GROUPS: usize = 8;

/// The element type of [`Batch::bytes`](super::Batch::bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputDtype {
    /// The dataset's stored dtype (bf16 by default): no conversion, half the bytes.
    #[default]
    Stored,
    /// f32, converted exactly on the decoding threads.
    F32,
}

#[derive(Clone, Debug)]
pub struct FollowOptions {
    /// How often to list new commit records.
    pub poll: Duration,
    /// Give up when nothing new was committed for this long (None: wait forever).
    pub idle_timeout: Option<Duration>,
    /// Shard keys in the order an earlier reader of the same run discovered them
    /// ([`Reader::shard_order`](super::Reader::shard_order) as a checkpoint saved it). They are
    /// read first, in that order, so that a resumed reader sees the rows in the order the
    /// interrupted one did.
    pub replay: Vec<String>,
}

impl Default for FollowOptions {
    fn default() -> Self {
        FollowOptions { poll: Duration::from_secs(2), idle_timeout: None, replay: Vec::new() }
    }
}

#[derive(Clone, Debug)]
pub struct ReaderOptions {
    /// The hook to read.
    pub hook: String,
    /// If set, the hook must have this `d_model`.
    pub d_model: Option<usize>,
    /// Rows per batch.
    pub batch_rows: usize,
    pub shuffle: bool,
    pub seed: u64,
    /// Rows are permuted within windows of this many consecutive row groups (default
    /// [`DEFAULT_WINDOW_ROW_GROUPS`]); a window as large as the rank's row groups shuffles the
    /// whole epoch at once.
    pub window_row_groups: usize,
    pub rank: usize,
    pub world: usize,
    /// Where to start.
    pub start: Cursor,
    /// Stop after this many epochs in total (counting from epoch 0). None: loop for ever.
    pub epochs: Option<u64>,
    /// Drop the rows that do not fill a last batch (default true; required when world > 1).
    pub drop_last: bool,
    pub output: OutputDtype,
    /// Also return sequence_id, position and token_id of every row.
    pub with_tokens: bool,
    /// Row groups fetched and decoded concurrently (default 8).
    pub prefetch_row_groups: usize,
    /// Threads decoding row groups (default: available parallelism).
    pub decode_threads: usize,
    /// Bound on decoded bytes held by the reader (default 1 GiB). Must hold one window.
    pub max_bytes_in_flight: usize,
    /// Read a dataset still being written (see the module docs).
    pub follow: Option<FollowOptions>,
    pub store: StoreOptions,
}

impl ReaderOptions {
    pub fn new(hook: &str, batch_rows: usize) -> Self {
        ReaderOptions {
            hook: hook.to_string(),
            d_model: None,
            batch_rows,
            shuffle: true,
            seed: 0,
            window_row_groups: DEFAULT_WINDOW_ROW_GROUPS,
            rank: 0,
            world: 1,
            start: Cursor::default(),
            epochs: None,
            drop_last: true,
            output: OutputDtype::Stored,
            with_tokens: false,
            prefetch_row_groups: 8,
            decode_threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            max_bytes_in_flight: 1 << 30,
            follow: None,
            store: StoreOptions::default(),
        }
    }

    /// One pass over every row in stored order, decoded to f32, the last batch kept even when
    /// short: what evaluation and feature statistics read.
    pub fn one_pass_in_order(hook: &str, batch_rows: usize) -> Self {
        let mut opts = ReaderOptions::new(hook, batch_rows);
        opts.shuffle = false;
        opts.epochs = Some(1);
        opts.drop_last = false;
        opts.output = OutputDtype::F32;
        opts
    }
}
