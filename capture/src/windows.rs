//! Token windows: a corpus tokenized in parallel and packed into fixed-length windows, in an
//! order that never depends on the number of threads.
//!
//! The token stream is every document's tokens followed by EOS: `d0 EOS d1 EOS d2 EOS ...`.
//! Window `w` holds `context_len` consecutive tokens of that stream; when the tokenizer adds BOS
//! (`add_bos_token`), each window is BOS followed by `context_len - 1` stream tokens instead, and
//! the BOS that `encode` puts before each document is taken out of the stream, so a window never
//! holds two BOS in a row. SmolLM2 does not add BOS, so its windows are plain stream slices.
//! The last, partial window is dropped.
//!
//! [`WindowStream`] is a bounded pipeline: a background thread reads documents in chunks,
//! tokenizes each chunk in parallel (rayon, results collected in document order), packs the
//! tokens and sends the windows through a bounded channel. The consumer (the model) can start on
//! the first window while the rest of the corpus is still being read, and the reader stays at
//! most [`WindowOptions::queue_windows`] windows plus one chunk ahead.
//!
//! Resuming at window `W` ([`WindowOptions::start_window`]) re-reads and re-tokenizes the corpus
//! from the start and drops the first `W` windows without sending them: the packing of window `W`
//! depends on the length of every document before it, and re-tokenizing is cheap next to the
//! model (about a second per million tokens per core).

use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use rayon::prelude::*;

use crate::corpus::{Corpus, DocId, Document, ReadStats};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::TextTokenizer;

/// Tokens per window when none is given.
pub const DEFAULT_CONTEXT_LEN: usize = 256;

/// `context_len` tokens of the corpus, and its place in the global window order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Index of the window in the corpus's window order (0, 1, 2, ...), whatever window the
    /// stream started at.
    pub sequence_id: u64,
    pub tokens: Vec<u32>,
    /// The documents the window's tokens come from, in order: (index in `tokens` of the first
    /// of the document's tokens in this window, the document). A document's EOS separator
    /// belongs to it; the BOS a window starts with (`add_bos_token`) belongs to none.
    pub documents: Vec<(u32, DocId)>,
}

impl Window {
    /// First position whose activation is stored: 1 by default, since position 0 is an
    /// attention-sink outlier whatever its token; 0 with `keep_first_position`.
    pub fn first_stored_position(keep_first_position: bool) -> usize {
        usize::from(!keep_first_position)
    }

    /// The tokens whose activations are stored, from [`Window::first_stored_position`] on.
    pub fn stored_tokens(&self, keep_first_position: bool) -> &[u32] {
        &self.tokens[Self::first_stored_position(keep_first_position)..]
    }

    /// The document token `index` of the window comes from (the first one for a leading BOS).
    pub fn document_at(&self, index: usize) -> Option<DocId> {
        let at = self.documents.partition_point(|(start, _)| *start as usize <= index);
        self.documents.get(at.saturating_sub(1)).map(|(_, id)| *id)
    }
}

/// The number of windows whose stored positions cover `max_tokens`: `ceil(max_tokens / s)` with
/// `s` stored positions per window (`context_len`, or `context_len - 1` when position 0 is not
/// stored). The last window may hold more than needed; the caller may store only part of it.
pub fn windows_for_tokens(max_tokens: u64, context_len: usize, keep_first_position: bool) -> u64 {
    let stored = (context_len - Window::first_stored_position(keep_first_position)).max(1) as u64;
    max_tokens.div_ceil(stored)
}

/// How to cut and deliver windows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowOptions {
    /// Tokens per window ([`DEFAULT_CONTEXT_LEN`] by default).
    pub context_len: usize,
    /// First window to deliver (to resume); the ones before are packed but not delivered.
    pub start_window: u64,
    /// Index of the window to stop before: windows `start_window..end_window` are delivered
    /// (`None`: to the end of the corpus). An index in the window order, not a count.
    pub end_window: Option<u64>,
    /// Documents read and tokenized together, in parallel. Does not change the windows.
    pub chunk_documents: usize,
    /// Windows held ready ahead of the consumer.
    pub queue_windows: usize,
    /// Tokenizer threads: `None` uses rayon's global pool. Does not change the windows.
    pub threads: Option<usize>,
}

impl Default for WindowOptions {
    fn default() -> Self {
        WindowOptions {
            context_len: DEFAULT_CONTEXT_LEN,
            start_window: 0,
            end_window: None,
            chunk_documents: 1024,
            queue_windows: 256,
            threads: None,
        }
    }
}

impl WindowOptions {
    pub fn new(context_len: usize) -> Self {
        WindowOptions { context_len, ..Self::default() }
    }

    /// Stops once the stored positions cover `max_tokens` (see [`windows_for_tokens`]).
    pub fn max_tokens(mut self, max_tokens: u64, keep_first_position: bool) -> Self {
        self.end_window = Some(windows_for_tokens(max_tokens, self.context_len, keep_first_position));
        self
    }

    pub fn start_window(mut self, window: u64) -> Self {
        self.start_window = window;
        self
    }

    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads);
        self
    }
}

/// What a finished [`WindowStream`] read and delivered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WindowStats {
    /// Windows delivered (from `start_window` on).
    pub windows: u64,
    /// Windows packed, delivered or not: the sequence id after the last one.
    pub windows_packed: u64,
    /// The `end_window` asked for (so the windows asked for, counted from window 0, the ones
    /// before `start_window` included).
    pub windows_requested: Option<u64>,
    /// Whether the corpus ended before `end_window` (always true without `end_window`).
    pub corpus_exhausted: bool,
    /// Documents tokenized.
    pub documents: u64,
    /// Stream tokens produced by those documents, EOS separators included.
    pub stream_tokens: u64,
    /// Files read and skipped. With `end_window`, only the files needed were read.
    pub read: ReadStats,
}

impl WindowStats {
    /// How many requested windows the corpus could not fill (0 without `end_window`), so the
    /// caller can warn.
    pub fn windows_missing(&self) -> u64 {
        self.windows_requested.map_or(0, |n| n.saturating_sub(self.windows_packed))
    }
}

enum Message {
    Window(Window),
    Done(WindowStats),
    Failed(Error),
}

/// Windows of a corpus, in order, produced by a background thread (see the module docs).
/// Yields `Err` once if reading or tokenizing fails, then ends. After the last window,
/// [`WindowStream::stats`] holds the counts.
pub struct WindowStream {
    receiver: Receiver<Message>,
    stats: Option<WindowStats>,
    finished: bool,
}

impl WindowStream {
    /// Starts reading `corpus`. Fails at once on bad options or a tokenizer without EOS; an
    /// empty corpus (no documents, or fewer tokens than one window) is the stream's first error.
    pub fn start(corpus: Corpus, tokenizer: Arc<TextTokenizer>, options: WindowOptions) -> Result<Self> {
        if options.context_len < 2 {
            return Err(Error::ContextTooShort { context_len: options.context_len });
        }
        let eos = tokenizer.eos_id.ok_or(Error::NoEos)?;
        let bos = match (tokenizer.add_bos, tokenizer.bos_id) {
            (true, Some(bos)) => Some(bos),
            (true, None) => return Err(Error::NoBosId),
            (false, _) => None,
        };
        let pool = match options.threads {
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n.max(1))
                    .thread_name(|i| format!("tokenize-{i}"))
                    .build()?,
            ),
            None => None,
        };
        let (sender, receiver) = sync_channel(options.queue_windows.max(1));
        let packer = Packer::new(options.context_len, bos, eos);
        let producer = Producer { corpus, tokenizer, options, packer, pool, sender };
        std::thread::Builder::new()
            .name("corpus-windows".into())
            .spawn(move || producer.run())
            .map_err(|source| Error::StartTokenizerThread { source })?;
        Ok(WindowStream { receiver, stats: None, finished: false })
    }

    /// The counts, once the stream has ended without error.
    pub fn stats(&self) -> Option<&WindowStats> {
        self.stats.as_ref()
    }
}

impl Iterator for WindowStream {
    type Item = Result<Window>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        match self.receiver.recv() {
            Ok(Message::Window(w)) => Some(Ok(w)),
            Ok(Message::Done(stats)) => {
                self.stats = Some(stats);
                self.finished = true;
                None
            }
            Ok(Message::Failed(e)) => {
                self.finished = true;
                Some(Err(e))
            }
            Err(_) => {
                self.finished = true;
                Some(Err(Error::TokenizerThreadDied))
            }
        }
    }
}

struct Producer {
    corpus: Corpus,
    tokenizer: Arc<TextTokenizer>,
    options: WindowOptions,
    packer: Packer,
    pool: Option<rayon::ThreadPool>,
    sender: SyncSender<Message>,
}

impl Producer {
    fn run(mut self) {
        let sender = self.sender.clone();
        let message = match self.pack_all() {
            Ok(Some(stats)) => Message::Done(stats),
            Ok(None) => return, // the consumer hung up
            Err(e) => Message::Failed(e),
        };
        let _ = sender.send(message);
    }

    /// `Ok(None)` when the consumer dropped the stream.
    fn pack_all(&mut self) -> Result<Option<WindowStats>> {
        let mut documents = self.corpus.documents();
        let mut stats = WindowStats { windows_requested: self.options.end_window, ..WindowStats::default() };
        let chunk_len = self.options.chunk_documents.max(1);
        let done = |packed: u64| self.options.end_window.is_some_and(|max| packed >= max);
        let mut finished_early = done(0);
        while !finished_early {
            let chunk: Vec<Document> = documents.by_ref().take(chunk_len).collect::<Result<_>>()?;
            if chunk.is_empty() {
                break;
            }
            let tokenizer = &self.tokenizer;
            let encode = || -> Result<Vec<Vec<u32>>> {
                chunk
                    .par_iter()
                    .map(|doc| {
                        tokenizer.encode(&doc.text).map_err(|e| Error::Tokenize {
                            record: doc.id.record,
                            file: documents_file_location(&self.corpus, doc),
                            source: Box::new(e),
                        })
                    })
                    .collect()
            };
            // `collect` keeps the documents' order whatever the threads: packing is sequential.
            let encoded = match &self.pool {
                Some(pool) => pool.install(encode)?,
                None => encode()?,
            };
            for (ids, doc) in encoded.into_iter().zip(&chunk) {
                stats.documents += 1;
                stats.stream_tokens += self.packer.push_document(&ids, doc.id) as u64;
                while let Some(window) = self.packer.next_window() {
                    if window.sequence_id >= self.options.start_window {
                        stats.windows += 1;
                        if self.sender.send(Message::Window(window)).is_err() {
                            return Ok(None);
                        }
                    }
                    if done(self.packer.windows_packed) {
                        finished_early = true;
                        break;
                    }
                }
                if finished_early {
                    break;
                }
            }
        }
        stats.windows_packed = self.packer.windows_packed;
        stats.corpus_exhausted = !finished_early;
        stats.read = documents.stats().clone();
        // Only a corpus read to its end can be too small (`end_window: Some(0)` reads nothing).
        if stats.corpus_exhausted && stats.documents == 0 {
            let read = &stats.read;
            return Err(Error::NoDocuments {
                inputs: self.corpus.spec().inputs.join(", "),
                files_read: read.files_read,
                skipped: read.skipped.len(),
            });
        }
        if stats.corpus_exhausted && stats.windows_packed == 0 {
            return Err(Error::ShorterThanOneWindow {
                documents: stats.documents,
                tokens: stats.stream_tokens,
                context_len: self.options.context_len,
            });
        }
        if stats.corpus_exhausted && stats.windows_missing() > 0 {
            tracing::warn!(
                windows = stats.windows_packed,
                requested = stats.windows_requested,
                "the corpus ended before the requested number of windows"
            );
        }
        Ok(Some(stats))
    }
}

fn documents_file_location(corpus: &Corpus, doc: &Document) -> String {
    corpus.files().get(doc.id.file as usize).map_or_else(|| format!("file {}", doc.id.file), |f| f.location.clone())
}

/// Packs the token stream into windows (see the module docs). Sequential: the only place where
/// order is decided.
struct Packer {
    context_len: usize,
    bos: Option<u32>,
    eos: u32,
    /// Stream tokens not yet in a window.
    pending: std::collections::VecDeque<u32>,
    /// Where documents start in the stream (stream index, document), from the one the pending
    /// tokens start in.
    starts: std::collections::VecDeque<(u64, DocId)>,
    /// Stream tokens already in windows.
    taken: u64,
    windows_packed: u64,
}

impl Packer {
    fn new(context_len: usize, bos: Option<u32>, eos: u32) -> Self {
        Packer {
            context_len,
            bos,
            eos,
            pending: Default::default(),
            starts: Default::default(),
            taken: 0,
            windows_packed: 0,
        }
    }

    /// Appends a document's tokens and its EOS; returns how many stream tokens that added.
    fn push_document(&mut self, ids: &[u32], id: DocId) -> usize {
        // `encode` starts documents with BOS when the model adds it; windows get theirs instead.
        let ids = match (self.bos, ids.first()) {
            (Some(bos), Some(&first)) if first == bos => &ids[1..],
            _ => ids,
        };
        self.starts.push_back((self.taken + self.pending.len() as u64, id));
        self.pending.extend(ids);
        self.pending.push_back(self.eos);
        ids.len() + 1
    }

    fn next_window(&mut self) -> Option<Window> {
        let from_stream = self.context_len - usize::from(self.bos.is_some());
        if self.pending.len() < from_stream {
            return None;
        }
        let mut tokens = Vec::with_capacity(self.context_len);
        tokens.extend(self.bos);
        tokens.extend(self.pending.drain(..from_stream));
        let (start, end) = (self.taken, self.taken + from_stream as u64);
        let lead = u64::from(self.bos.is_some());
        let documents = self
            .starts
            .iter()
            .take_while(|(at, _)| *at < end)
            .map(|&(at, id)| ((at.max(start) - start + lead) as u32, id))
            .collect();
        // Keep the last document that started by `end`: it may go on in the next window.
        while self.starts.len() > 1 && self.starts[1].0 <= end {
            self.starts.pop_front();
        }
        self.taken = end;
        let window = Window { sequence_id: self.windows_packed, tokens, documents };
        self.windows_packed += 1;
        Some(window)
    }
}

/// The tokenizer of a model, without its weights: from a `.gguf` file's metadata or a Hugging
/// Face folder's `tokenizer.json`.
pub fn load_tokenizer(model_path: &Path) -> Result<TextTokenizer> {
    if model_path.is_dir() {
        TextTokenizer::from_hf_dir(model_path)
    } else {
        let file =
            GgufFile::open(model_path).map_err(|source| Error::OpenModel { path: model_path.to_path_buf(), source })?;
        TextTokenizer::from_gguf(&file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(record: u32) -> DocId {
        DocId { file: 0, record }
    }

    fn drain(p: &mut Packer) -> Vec<Vec<u32>> {
        std::iter::from_fn(|| p.next_window()).map(|w| w.tokens).collect()
    }

    #[test]
    fn packs_documents_with_eos_and_no_bos() {
        let mut p = Packer::new(4, None, 0);
        p.push_document(&[1, 2, 3], doc(0));
        p.push_document(&[4, 5], doc(1));
        assert_eq!(drain(&mut p), vec![vec![1, 2, 3, 0]]);
        p.push_document(&[6], doc(2));
        assert_eq!(drain(&mut p), vec![vec![4, 5, 0, 6]]);
        assert_eq!(p.pending.len(), 1, "the trailing EOS waits for the next window");
    }

    #[test]
    fn bos_starts_every_window_and_is_not_repeated() {
        let mut p = Packer::new(4, Some(9), 0);
        p.push_document(&[9, 1, 2], doc(0));
        p.push_document(&[9, 3, 4, 5, 6], doc(1));
        assert_eq!(drain(&mut p), vec![vec![9, 1, 2, 0], vec![9, 3, 4, 5]]);
        assert_eq!(p.windows_packed, 2);
    }

    #[test]
    fn windows_know_which_document_each_token_comes_from() {
        // Windows of the stream: 1 2 3 E | 4 5 E 6 | E 7 7 7 | 7 7 7 E (E = EOS 0).
        let mut p = Packer::new(4, None, 0);
        for (i, ids) in [vec![1, 2, 3], vec![4, 5], vec![6], vec![7; 6]].iter().enumerate() {
            p.push_document(ids, doc(i as u32));
        }
        let windows: Vec<Window> = std::iter::from_fn(|| p.next_window()).collect();
        let docs: Vec<Vec<(u32, u32)>> =
            windows.iter().map(|w| w.documents.iter().map(|(at, d)| (*at, d.record)).collect()).collect();
        assert_eq!(docs, vec![vec![(0, 0)], vec![(0, 1), (3, 2)], vec![(0, 2), (1, 3)], vec![(0, 3)]]);
        let at: Vec<u32> = (0..4).map(|i| windows[1].document_at(i).unwrap().record).collect();
        assert_eq!(at, vec![1, 1, 1, 2]);
        // With BOS, index 0 is the window's own BOS: counted with the first document.
        let mut p = Packer::new(4, Some(9), 0);
        p.push_document(&[9, 1, 2], doc(0));
        p.push_document(&[9, 3, 4, 5, 6], doc(1));
        let windows: Vec<Window> = std::iter::from_fn(|| p.next_window()).collect();
        assert_eq!(windows[0].documents, vec![(1, doc(0))]);
        assert_eq!(windows[1].documents, vec![(1, doc(1))]);
        assert_eq!(windows[0].document_at(0), Some(doc(0)));
    }

    #[test]
    fn windows_for_tokens_counts_stored_positions() {
        assert_eq!(windows_for_tokens(255, 256, false), 1);
        assert_eq!(windows_for_tokens(256, 256, false), 2);
        assert_eq!(windows_for_tokens(256, 256, true), 1);
        assert_eq!(windows_for_tokens(0, 256, true), 0);
    }
}
