//! Text corpora for capture: which files, in which order, split into which documents.
//!
//! A corpus is one or more inputs, each a local path or an object-store URL (`file://`, `s3://`,
//! `memory://`, parsed by [`store::open_store`]). An input is a file or a folder read
//! recursively. Every file of a corpus is in one [`CorpusFormat`].
//!
//! Reading rules, so that the same corpus always gives the same documents in the same order:
//! - inputs are taken in the order given; the files of a folder in sorted order of their path
//!   relative to the folder (byte order);
//! - symlinks are skipped, since Debian's fortunes folder holds a `.u8` symlink beside each file
//!   and a file must never be read twice; `*.dat` files (strfile indexes) are skipped too;
//! - in folders, `jsonl` reads only `*.jsonl`/`*.json`/`*.ndjson` files and `parquet` only
//!   `*.parquet` files, so a Hugging Face dataset folder's README and `.gitattributes` are left
//!   out; a file named as an input is read whatever its name;
//! - a file found in a folder that cannot be read, or is not UTF-8, is skipped with a warning and
//!   counted in [`ReadStats::skipped`]; a file named as an input is an error instead, since the
//!   user asked for it;
//! - a malformed record (bad JSON, a missing text field or column) is an error naming the file.
//!
//! Document ids ([`DocId`]) are (index of the file in the corpus listing, index of the record in
//! the file); skipped files and empty records keep their numbers, so the id of a document does
//! not depend on whether its neighbours could be read.

use std::fmt;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};

use parquet_text::{ParquetRecords, PARQUET_BATCH_ROWS};
use ranged_object::RangedObject;

mod parquet_text;
mod ranged_object;

/// Debian's fortunes folder (packages `fortunes`, `fortunes-de`, `fortunes-es`, `fortunes-zh`).
pub const FORTUNES_DIR: &str = "/usr/share/games/fortunes";

/// Top-level files of [`FORTUNES_DIR`] that are not English (from `fortunes-zh`).
const NON_ENGLISH_FORTUNE_FILES: &[&str] = &["chinese", "tang300", "song100"];

/// The JSONL key or Parquet column read when none is given.
pub const DEFAULT_TEXT_FIELD: &str = "text";

/// How the files of a corpus are split into documents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CorpusFormat {
    /// A file is one document.
    #[default]
    Text,
    /// Documents separated by lines holding only `%` (the `fortune` program's format).
    Fortune,
    /// One JSON object per line; the document is its text field.
    Jsonl,
    /// Parquet files with a string column (the layout of Hugging Face datasets).
    Parquet,
}

impl CorpusFormat {
    pub fn name(self) -> &'static str {
        match self {
            CorpusFormat::Text => "text",
            CorpusFormat::Fortune => "fortune",
            CorpusFormat::Jsonl => "jsonl",
            CorpusFormat::Parquet => "parquet",
        }
    }

    /// Whether a file met while walking a folder belongs to the corpus. (`.dat` is excluded
    /// before this is asked.)
    fn takes_from_folder(self, name: &str) -> bool {
        match self {
            CorpusFormat::Text | CorpusFormat::Fortune => true,
            CorpusFormat::Jsonl => [".jsonl", ".json", ".ndjson"].iter().any(|e| name.ends_with(e)),
            CorpusFormat::Parquet => name.ends_with(".parquet"),
        }
    }

    /// Whether the text field setting changes the documents.
    fn uses_text_field(self) -> bool {
        matches!(self, CorpusFormat::Jsonl | CorpusFormat::Parquet)
    }
}

impl fmt::Display for CorpusFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CorpusFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "text" => Ok(CorpusFormat::Text),
            "fortune" => Ok(CorpusFormat::Fortune),
            "jsonl" => Ok(CorpusFormat::Jsonl),
            "parquet" => Ok(CorpusFormat::Parquet),
            _ => bail!("unknown corpus format `{s}` (expected text, fortune, jsonl or parquet)"),
        }
    }
}

/// What to read: the inputs, their format and, for JSONL and Parquet, the field holding the text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorpusSpec {
    /// Local paths or object-store URLs, each a file or a folder.
    pub inputs: Vec<String>,
    pub format: CorpusFormat,
    /// JSONL key or Parquet column holding the text ([`DEFAULT_TEXT_FIELD`] by default).
    pub text_field: String,
    /// A short description for messages and the dataset manifest (the inputs, by default).
    pub name: String,
}

impl CorpusSpec {
    pub fn new(inputs: impl IntoIterator<Item = impl Into<String>>, format: CorpusFormat) -> Self {
        let inputs: Vec<String> = inputs.into_iter().map(Into::into).collect();
        // The name goes into messages and the dataset manifest: never with credentials.
        let name = store::redact_urls_in(&inputs.join(" "));
        CorpusSpec { inputs, format, text_field: DEFAULT_TEXT_FIELD.to_string(), name }
    }

    pub fn with_text_field(mut self, field: impl Into<String>) -> Self {
        self.text_field = field.into();
        self
    }

    /// The default demo corpus: the top-level English fortune files of [`FORTUNES_DIR`].
    pub fn default_fortunes() -> Result<Self> {
        Self::english_fortunes_in(Path::new(FORTUNES_DIR))
    }

    /// The top-level English fortune files of `dir`, named one by one, in sorted order: the
    /// sub-folders (`de/`, `es/`, `off/`) are not entered, the Chinese files (`chinese`,
    /// `tang300`, `song100`), the `.dat` indexes and the `.u8` symlinks are left out.
    pub fn english_fortunes_in(dir: &Path) -> Result<Self> {
        let entries = std::fs::read_dir(dir).with_context(|| {
            format!("cannot list the fortunes folder {} (install Debian's `fortunes` package)", dir.display())
        })?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list the fortunes folder {}", dir.display()))?;
            let file_type = entry.file_type().with_context(|| format!("cannot stat {}", entry.path().display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if file_type.is_file() && !name.ends_with(".dat") && !NON_ENGLISH_FORTUNE_FILES.contains(&name) {
                files.push(entry.path().display().to_string());
            }
        }
        if files.is_empty() {
            bail!(
                "the fortunes folder {} holds no English fortune files (install Debian's `fortunes` package)",
                dir.display()
            );
        }
        files.sort();
        let name = format!("English fortunes of {} ({} files)", dir.display(), files.len());
        Ok(CorpusSpec { name, ..CorpusSpec::new(files, CorpusFormat::Fortune) })
    }
}

/// A document's stable id: the index of its file in the corpus listing ([`Corpus::files`]) and
/// the index of its record in the file (fortune: the `%`-separated entry, JSONL: the line,
/// Parquet: the row, text: 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocId {
    pub file: u32,
    pub record: u32,
}

impl DocId {
    /// `file << 32 | record`: ordered like the documents.
    pub fn as_u64(self) -> u64 {
        (u64::from(self.file) << 32) | u64::from(self.record)
    }
}

/// One document of a corpus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    pub id: DocId,
    pub text: String,
}

/// A file left out of a corpus, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedFile {
    pub location: String,
    pub reason: String,
}

/// Counts from reading a corpus. `skipped` holds the files left out (unreadable, not UTF-8, a
/// name that is not UTF-8); each was also reported with `tracing::warn!`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub files_read: usize,
    pub documents: u64,
    /// Bytes of the files read.
    pub bytes: u64,
    pub skipped: Vec<SkippedFile>,
}

/// One file of a corpus, as listed by [`Corpus::open`].
#[derive(Clone, Debug)]
pub struct CorpusFile {
    /// Index of the input (in [`CorpusSpec::inputs`]) the file was found under.
    pub input: usize,
    /// Path relative to its input folder, with `/` separators; the file name when the input is
    /// the file itself. Two copies of a corpus at different places have the same `rel_path`s.
    pub rel_path: String,
    /// The file's path or URL, for messages.
    pub location: String,
    pub size: u64,
    /// Whether the file was named as an input (an error if unreadable) rather than found in a
    /// folder (skipped with a warning if unreadable).
    pub named: bool,
    source: Source,
}

#[derive(Clone, Debug)]
enum Source {
    Local(PathBuf),
    Object { store: Arc<dyn ObjectStore>, path: ObjectPath },
}

/// A hash of a corpus's content, for the corpus identity of a dataset manifest: equal for two
/// copies of the same files wherever they are, different as soon as one byte, a name, the format
/// or the text field differs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorpusFingerprint {
    /// Hex sha256 over the format, the text field (JSONL and Parquet only), and for each file in
    /// order: its input index, relative path, size and the sha256 of its bytes.
    pub sha256: String,
    pub files: usize,
    pub bytes: u64,
}

impl CorpusFingerprint {
    /// The corpus identity a dataset manifest records (the fingerprint's hash, the spec's
    /// name); `detail` says how windows were cut.
    pub fn to_manifest(&self, spec: &CorpusSpec, detail: impl Into<String>) -> store::CorpusIdentity {
        store::CorpusIdentity { name: spec.name.clone(), sha256: self.sha256.clone(), detail: detail.into() }
    }
}

/// A listed corpus: its files, in reading order. Cheap to clone.
#[derive(Clone)]
pub struct Corpus {
    spec: Arc<CorpusSpec>,
    files: Arc<[CorpusFile]>,
    listing_skipped: Arc<[SkippedFile]>,
    runtime: Option<Arc<tokio::runtime::Runtime>>,
}

impl fmt::Debug for Corpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Corpus").field("spec", &self.spec).field("files", &self.files.len()).finish()
    }
}

impl Corpus {
    /// Lists the files of `spec`. Fails when an input does not exist or when no file is found;
    /// reads no file content.
    pub fn open(spec: CorpusSpec) -> Result<Self> {
        if spec.inputs.is_empty() {
            bail!("no corpus input given");
        }
        let mut files = Vec::new();
        let mut skipped = Vec::new();
        let mut runtime: Option<Arc<tokio::runtime::Runtime>> = None;
        for (input, url) in spec.inputs.iter().enumerate() {
            let location =
                store::open_store(url).with_context(|| format!("bad corpus input `{}`", store::redact_urls_in(url)))?;
            let found_before = files.len();
            match &location.local_dir {
                Some(path) => list_local(input, path, spec.format, &mut files, &mut skipped)?,
                None => {
                    let rt = match &runtime {
                        Some(rt) => rt.clone(),
                        None => runtime.insert(Arc::new(new_runtime()?)).clone(),
                    };
                    list_object_store(&rt, input, &location, spec.format, &mut files)?;
                }
            }
            if files.len() == found_before {
                tracing::warn!(input = %store::redact_urls_in(url), "corpus input holds no {} files", spec.format);
            }
        }
        if files.is_empty() {
            let skipped_note = if skipped.is_empty() { String::new() } else { format!(" ({} skipped)", skipped.len()) };
            bail!(
                "empty corpus: no {} files found in {}{skipped_note}",
                spec.format,
                store::redact_urls_in(&spec.inputs.join(", "))
            );
        }
        if files.len() > u32::MAX as usize {
            bail!("corpus has {} files; document ids allow at most {}", files.len(), u32::MAX);
        }
        Ok(Corpus { spec: Arc::new(spec), files: files.into(), listing_skipped: skipped.into(), runtime })
    }

    pub fn spec(&self) -> &CorpusSpec {
        &self.spec
    }

    /// The files, in reading order; [`DocId::file`] indexes this slice.
    pub fn files(&self) -> &[CorpusFile] {
        &self.files
    }

    /// Total size of the listed files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The documents, file after file, read lazily: a file's records are read as they are
    /// needed (Parquet a record batch at a time, by ranged GETs on an object store), so memory
    /// holds a few records, not a file; only a `text` file, being one document, is held whole.
    pub fn documents(&self) -> Documents {
        Documents {
            corpus: self.clone(),
            next_file: 0,
            pending: None,
            stats: ReadStats { skipped: self.listing_skipped.to_vec(), ..ReadStats::default() },
        }
    }

    /// Every document, with the read counts. For tests and small corpora.
    pub fn read_all(&self) -> Result<(Vec<Document>, ReadStats)> {
        let mut docs = self.documents();
        let all = docs.by_ref().collect::<Result<Vec<_>>>()?;
        Ok((all, docs.stats().clone()))
    }

    /// Hashes every file's bytes (one read of the whole corpus). Files that cannot be read enter
    /// the hash as unreadable, so the fingerprint is defined whenever the corpus can be listed.
    pub fn fingerprint(&self) -> Result<CorpusFingerprint> {
        let mut hasher = Sha256::new();
        hasher.update(b"sae-pipeline corpus v1\n");
        hasher.update(format!("format={}\n", self.spec.format));
        if self.spec.format.uses_text_field() {
            hasher.update(format!("text_field={}\n", self.spec.text_field));
        }
        let mut bytes = 0;
        for file in self.files.iter() {
            let content_hash = match self.hash_file(file) {
                Ok((hash, size)) => {
                    bytes += size;
                    format!("{size} {hash}")
                }
                Err(e) => format!("unreadable ({e:#})"),
            };
            // Length-prefixed, so that no two listings hash the same bytes.
            hasher.update(format!("{}\t{}:{}\t{}\n", file.input, file.rel_path.len(), file.rel_path, content_hash));
        }
        Ok(CorpusFingerprint { sha256: hex(&hasher.finalize()), files: self.files.len(), bytes })
    }

    fn hash_file(&self, file: &CorpusFile) -> Result<(String, u64)> {
        match &file.source {
            Source::Local(path) => {
                let mut f = std::fs::File::open(path)?;
                let mut hasher = Sha256::new();
                let mut buf = vec![0u8; 1 << 20];
                let mut size = 0u64;
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    size += n as u64;
                    hasher.update(&buf[..n]);
                }
                Ok((hex(&hasher.finalize()), size))
            }
            Source::Object { .. } => {
                let mut reader = self.open_file(file)?;
                let mut hasher = Sha256::new();
                let size = std::io::copy(&mut reader, &mut hasher)?;
                Ok((hex(&hasher.finalize()), size))
            }
        }
    }

    /// A reader over a file's bytes that holds at most a buffer of them: corpus files may be
    /// larger than memory.
    fn open_file(&self, file: &CorpusFile) -> std::io::Result<Box<dyn BufRead + Send>> {
        match &file.source {
            Source::Local(path) => {
                Ok(Box::new(BufReader::with_capacity(STREAM_BUFFER_BYTES, std::fs::File::open(path)?)))
            }
            Source::Object { store, path } => {
                let runtime = self.runtime.clone().expect("a corpus with object-store files has a runtime");
                Ok(Box::new(ObjectReader {
                    store: store.clone(),
                    path: path.clone(),
                    runtime,
                    size: file.size,
                    next: 0,
                    chunk: Bytes::new(),
                }))
            }
        }
    }

    /// The documents of one file, as (record index, text), read as they are needed;
    /// `Err(Unreadable)` when the file cannot be read or is not UTF-8 (checked in a first pass
    /// over the file, so that a file with a bad byte near its end gives no document at all, as
    /// when files were read whole).
    fn read_file(&self, file: &CorpusFile) -> Result<FileRecords, FileError> {
        let format = self.spec.format;
        let unreadable = |e: std::io::Error| FileError::Unreadable(redacted_io_error(&e));
        if format == CorpusFormat::Parquet {
            let (location, column) = (&file.location, &self.spec.text_field);
            let records = match &file.source {
                Source::Local(path) => {
                    let f = std::fs::File::open(path).map_err(unreadable)?;
                    ParquetRecords::open(f, location, column, PARQUET_BATCH_ROWS)?
                }
                Source::Object { store, path } => {
                    let runtime = self.runtime.clone().expect("a corpus with object-store files has a runtime");
                    let object = RangedObject::new(store.clone(), path.clone(), runtime, file.size);
                    ParquetRecords::open(object, location, column, PARQUET_BATCH_ROWS)?
                }
            };
            return Ok(FileRecords::Parquet(Box::new(records)));
        }
        check_utf8(self.open_file(file).map_err(unreadable)?)?;
        let reader = self.open_file(file).map_err(unreadable)?;
        Ok(match format {
            CorpusFormat::Text => {
                // A text file is one document, so it is held whole: it is tokenized by one `encode`
                // call, and a model's tokenizer (any `tokenizer.json`: normalizers, a prefix space
                // added to the text's start) may give other tokens for pieces of it.
                let mut text = String::new();
                let mut reader = reader;
                reader.read_to_string(&mut text).map_err(unreadable)?;
                FileRecords::Collected(vec![(0, text)].into_iter())
            }
            CorpusFormat::Fortune => {
                FileRecords::Fortunes(FortuneRecords { lines: reader, next_record: 0, done: false })
            }
            CorpusFormat::Jsonl => FileRecords::Jsonl(JsonlRecords {
                lines: reader,
                next_line: 0,
                location: file.location.clone(),
                field: self.spec.text_field.clone(),
            }),
            CorpusFormat::Parquet => unreachable!("handled above"),
        })
    }
}

/// Bytes read at a time from a corpus file (local reads and object-store range requests).
const STREAM_BUFFER_BYTES: usize = 8 << 20;

/// An object read by range requests of [`STREAM_BUFFER_BYTES`], in order.
struct ObjectReader {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    runtime: Arc<tokio::runtime::Runtime>,
    size: u64,
    /// Offset of the first byte not fetched yet.
    next: u64,
    /// Fetched bytes not consumed yet.
    chunk: Bytes,
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
                .map_err(|e| std::io::Error::other(redacted_store_error(e).to_string()))?;
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

/// An object store's error as a message, with any credential in the URLs it quotes removed.
fn redacted_store_error(e: object_store::Error) -> anyhow::Error {
    anyhow!(store::redact_urls_in(&store::error_chain(&e)))
}

fn redacted_io_error(e: &std::io::Error) -> String {
    store::redact_urls_in(&e.to_string())
}

/// Reads `reader` to its end, failing as `std::str::from_utf8` would on the whole file (the
/// same message, with the index counted from the start of the file).
fn check_utf8(mut reader: Box<dyn BufRead + Send>) -> Result<(), FileError> {
    let mut offset = 0usize;
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let buf = reader.fill_buf().map_err(|e| FileError::Unreadable(redacted_io_error(&e)))?;
        if buf.is_empty() {
            break;
        }
        let n = buf.len();
        carry.extend_from_slice(buf);
        reader.consume(n);
        match std::str::from_utf8(&carry) {
            Ok(_) => {
                offset += carry.len();
                carry.clear();
            }
            Err(e) if e.error_len().is_none() => {
                // A character cut by the buffer's end: keep its first bytes for the next read.
                let valid = e.valid_up_to();
                offset += valid;
                carry.drain(..valid);
            }
            Err(e) => {
                let len = e.error_len().unwrap_or(0);
                return Err(FileError::Unreadable(format!(
                    "not UTF-8 (invalid utf-8 sequence of {len} bytes from index {})",
                    offset + e.valid_up_to()
                )));
            }
        }
    }
    if !carry.is_empty() {
        return Err(FileError::Unreadable(format!("not UTF-8 (incomplete utf-8 byte sequence from index {offset})")));
    }
    Ok(())
}

/// The records of one file, produced as they are read.
enum FileRecords {
    Collected(std::vec::IntoIter<(u32, String)>),
    Fortunes(FortuneRecords),
    Jsonl(JsonlRecords),
    Parquet(Box<ParquetRecords>),
}

impl Iterator for FileRecords {
    type Item = Result<(u32, String), FileError>;

    /// The next non-blank record.
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let record = match self {
                FileRecords::Collected(records) => records.next().map(Ok),
                FileRecords::Fortunes(records) => records.next(),
                FileRecords::Jsonl(records) => records.next(),
                FileRecords::Parquet(records) => records.next(),
            }?;
            match record {
                Ok((_, text)) if text.trim().is_empty() => continue,
                other => return Some(other),
            }
        }
    }
}

/// One line of `lines` (with its `\n`, if any) appended to `line`; false at the end of the file.
fn read_line(lines: &mut dyn BufRead, line: &mut String) -> Result<bool, FileError> {
    line.clear();
    let n = lines.read_line(line).map_err(|e| FileError::Unreadable(redacted_io_error(&e)))?;
    Ok(n > 0)
}

/// [`split_fortunes`], a line at a time: every record, blank ones included (the caller drops
/// them), each trimmed as `split_fortunes` trims it.
struct FortuneRecords {
    lines: Box<dyn BufRead + Send>,
    next_record: u32,
    done: bool,
}

impl FortuneRecords {
    fn next(&mut self) -> Option<Result<(u32, String), FileError>> {
        if self.done {
            return None;
        }
        let mut record = String::new();
        let mut line = String::new();
        loop {
            match read_line(&mut *self.lines, &mut line) {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok(false) => {
                    self.done = true;
                    break;
                }
                Ok(true) if line.trim_end_matches(['\n', '\r']) == "%" => break,
                Ok(true) => record.push_str(&line),
            }
        }
        let index = self.next_record;
        self.next_record = self.next_record.wrapping_add(1);
        Some(Ok((index, record.trim_start_matches(['\n', '\r']).trim_end().to_string())))
    }
}

/// [`jsonl_documents`], a line at a time.
struct JsonlRecords {
    lines: Box<dyn BufRead + Send>,
    next_line: usize,
    location: String,
    field: String,
}

impl JsonlRecords {
    fn next(&mut self) -> Option<Result<(u32, String), FileError>> {
        let mut line = String::new();
        loop {
            match read_line(&mut *self.lines, &mut line) {
                Err(e) => return Some(Err(e)),
                Ok(false) => return None,
                Ok(true) => {}
            }
            let index = self.next_line;
            self.next_line += 1;
            // As `str::lines`: without its `\n`, and then without one `\r`.
            let text = line.strip_suffix('\n').map_or(line.as_str(), |l| l.strip_suffix('\r').unwrap_or(l));
            match jsonl_record(text, index, &self.location, &self.field) {
                Ok(Some(text)) => return Some(Ok((index as u32, text))),
                Ok(None) => continue,
                Err(e) => return Some(Err(FileError::Bad(e))),
            }
        }
    }
}

/// Why a file gave no documents: unreadable (skipped or an error, by [`CorpusFile::named`]) or
/// malformed (always an error).
enum FileError {
    Unreadable(String),
    Bad(anyhow::Error),
}

/// The documents of a corpus, in order. After the last one, [`Documents::stats`] holds the
/// counts. Yields an error for a malformed file or an unreadable named file, then stops.
pub struct Documents {
    corpus: Corpus,
    next_file: usize,
    /// The file being read (its index in the listing) and its records still to come.
    pending: Option<(u32, FileRecords)>,
    stats: ReadStats,
}

impl Documents {
    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }

    pub fn corpus(&self) -> &Corpus {
        &self.corpus
    }
}

impl Iterator for Documents {
    type Item = Result<Document>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((file_id, records)) = &mut self.pending {
                match records.next() {
                    Some(Ok((record, text))) => {
                        self.stats.documents += 1;
                        return Some(Ok(Document { id: DocId { file: *file_id, record }, text }));
                    }
                    Some(Err(e)) => {
                        // A file that passed its UTF-8 pass but failed later (a malformed record,
                        // or an I/O error mid-file) ends the corpus with an error.
                        let location = self.corpus.files[*file_id as usize].location.clone();
                        self.pending = None;
                        self.next_file = self.corpus.files.len();
                        return Some(Err(match e {
                            FileError::Bad(e) => e,
                            FileError::Unreadable(reason) => anyhow!("cannot read corpus file {location}: {reason}"),
                        }));
                    }
                    None => self.pending = None,
                }
            }
            let index = self.next_file;
            let file = self.corpus.files.get(index)?.clone();
            self.next_file += 1;
            match self.corpus.read_file(&file) {
                Ok(records) => {
                    self.stats.files_read += 1;
                    self.stats.bytes += file.size;
                    self.pending = Some((index as u32, records));
                }
                Err(FileError::Unreadable(reason)) if !file.named => {
                    tracing::warn!(file = %file.location, %reason, "skipping corpus file");
                    self.stats.skipped.push(SkippedFile { location: file.location.clone(), reason });
                }
                Err(FileError::Unreadable(reason)) => {
                    self.next_file = self.corpus.files.len();
                    return Some(Err(anyhow!("cannot read corpus file {}: {reason}", file.location)));
                }
                Err(FileError::Bad(e)) => {
                    self.next_file = self.corpus.files.len();
                    return Some(Err(e));
                }
            }
        }
    }
}

/// The fortunes of `text`, as (record index, text): records are separated by lines holding only
/// `%` (a trailing `\r` allowed); each loses its leading blank lines and trailing whitespace, and
/// blank records are dropped (their indexes are kept by the others).
pub fn split_fortunes(text: &str) -> impl Iterator<Item = (u32, &str)> {
    let mut records = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end_matches(['\n', '\r']) == "%" {
            records.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    records.push(&text[start..]);
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| (i as u32, r.trim_start_matches(['\n', '\r']).trim_end()))
        .filter(|(_, r)| !r.is_empty())
}

/// The text field of each JSONL line, as (line index, text). Blank lines and `null` texts give no
/// document; a line that is not a JSON object, lacks the field or holds a non-string is an error.
/// The records of a whole JSONL text: what [`JsonlRecords`] must produce a line at a time.
#[cfg(test)]
fn jsonl_documents(text: &str, location: &str, field: &str) -> Result<Vec<(u32, String)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(text) = jsonl_record(line, i, location, field)? {
            out.push((i as u32, text));
        }
    }
    Ok(out)
}

/// The text field of line `index` of a JSONL file: `None` for a blank line or a `null` text.
fn jsonl_record(line: &str, index: usize, location: &str, field: &str) -> Result<Option<String>> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let line_no = index + 1;
    let value: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("{location}:{line_no}: not a JSON line"))?;
    let object = value.as_object().ok_or_else(|| anyhow!("{location}:{line_no}: not a JSON object"))?;
    match object.get(field) {
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Null) => Ok(None),
        Some(other) => bail!("{location}:{line_no}: text field `{field}` holds {}, not a string", json_kind(other)),
        None => {
            let keys: Vec<&str> = object.keys().map(String::as_str).collect();
            bail!(
                "{location}:{line_no}: no text field `{field}` (fields: {}); choose one with --text-field",
                keys.join(", ")
            )
        }
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Lists a local input: the file itself, or the files under the folder (sorted, symlinks and
/// `.dat` skipped).
fn list_local(
    input: usize,
    path: &Path,
    format: CorpusFormat,
    files: &mut Vec<CorpusFile>,
    skipped: &mut Vec<SkippedFile>,
) -> Result<()> {
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("corpus input {} does not exist or cannot be read", path.display()))?;
    // A named input may be a symlink (the user asked for it): follow it once.
    let meta = if meta.file_type().is_symlink() {
        std::fs::metadata(path).with_context(|| format!("corpus input {} is a broken symlink", path.display()))?
    } else {
        meta
    };
    if meta.is_file() {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        files.push(CorpusFile {
            input,
            rel_path: name,
            location: path.display().to_string(),
            size: meta.len(),
            named: true,
            source: Source::Local(path.to_path_buf()),
        });
        return Ok(());
    }
    if !meta.is_dir() {
        bail!("corpus input {} is neither a file nor a folder", path.display());
    }
    let mut found = Vec::new();
    walk_local(path, path, format, &mut found, skipped)
        .with_context(|| format!("cannot list corpus folder {}", path.display()))?;
    found.sort_by(|a: &CorpusFile, b: &CorpusFile| a.rel_path.cmp(&b.rel_path));
    files.extend(found.into_iter().map(|f| CorpusFile { input, ..f }));
    Ok(())
}

fn walk_local(
    root: &Path,
    dir: &Path,
    format: CorpusFormat,
    out: &mut Vec<CorpusFile>,
    skipped: &mut Vec<SkippedFile>,
) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // The root must be listable; a sub-folder that is not is skipped like an unreadable file.
        Err(e) if dir != root => {
            let location = dir.display().to_string();
            tracing::warn!(folder = %location, error = %e, "skipping corpus folder");
            skipped.push(SkippedFile { location, reason: e.to_string() });
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let file_type = entry.file_type()?;
        if file_type.is_symlink() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            let location = path.display().to_string();
            tracing::warn!(file = %location, "skipping corpus file with a non-UTF-8 name");
            skipped.push(SkippedFile { location, reason: "name is not UTF-8".into() });
            continue;
        };
        if file_type.is_dir() {
            walk_local(root, &path, format, out, skipped)?;
        } else if file_type.is_file() && !name.ends_with(".dat") && format.takes_from_folder(&name) {
            let rel = path.strip_prefix(root).expect("walked paths are under the root");
            let rel_path = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            out.push(CorpusFile {
                input: 0,
                rel_path,
                location: path.display().to_string(),
                size,
                named: false,
                source: Source::Local(path),
            });
        }
    }
    Ok(())
}

/// Lists an object-store input: every object under the prefix (sorted, `.dat` skipped), or the
/// object at the prefix itself.
fn list_object_store(
    rt: &tokio::runtime::Runtime,
    input: usize,
    location: &store::Location,
    format: CorpusFormat,
    files: &mut Vec<CorpusFile>,
) -> Result<()> {
    let (store, prefix) = (location.store.clone(), location.prefix.clone());
    let listed: Vec<object_store::ObjectMeta> = {
        let (store, prefix) = (store.clone(), prefix.clone());
        block_on(rt, async move { store.list(Some(&prefix)).try_collect().await })
            .map_err(redacted_store_error)
            .with_context(|| format!("cannot list corpus input {}", location.url))?
    };
    let url = location.url.trim_end_matches('/');
    if listed.is_empty() {
        let (s, p) = (store.clone(), prefix.clone());
        return match block_on(rt, async move { s.head(&p).await }) {
            Ok(meta) => {
                let name = prefix.filename().unwrap_or_default().to_string();
                files.push(CorpusFile {
                    input,
                    rel_path: name,
                    location: url.to_string(),
                    size: meta.size,
                    named: true,
                    source: Source::Object { store, path: prefix },
                });
                Ok(())
            }
            Err(object_store::Error::NotFound { .. }) => {
                bail!("corpus input {url} does not exist (no object there or under it)")
            }
            Err(e) => Err(redacted_store_error(e).context(format!("cannot read corpus input {url}"))),
        };
    }
    let mut found: Vec<CorpusFile> = listed
        .into_iter()
        .filter_map(|meta| {
            let rel_path: String = match meta.location.prefix_match(&prefix) {
                Some(parts) => parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"),
                None => meta.location.to_string(),
            };
            let name = meta.location.filename().unwrap_or_default();
            (!name.ends_with(".dat") && format.takes_from_folder(name)).then(|| CorpusFile {
                input,
                location: format!("{url}/{rel_path}"),
                rel_path,
                size: meta.size,
                named: false,
                source: Source::Object { store: store.clone(), path: meta.location },
            })
        })
        .collect();
    found.sort_by(|a, b| a.rel_path.cmp(&b.rel_path));
    files.extend(found);
    Ok(())
}

fn new_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the I/O runtime for object-store corpus inputs")
}

/// Runs `fut` on `rt`; from inside another tokio runtime (where `block_on` would panic), on a
/// scoped thread.
fn block_on<F>(rt: &tokio::runtime::Runtime, fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| s.spawn(|| rt.block_on(fut)).join().expect("object-store I/O thread panicked"))
    } else {
        rt.block_on(fut)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fortunes_split_on_percent_lines_only() {
        let text = "first\nline two\n%\n\n%\n  indented\n50% off\n%\r\nlast\n";
        let docs: Vec<_> = split_fortunes(text).collect();
        assert_eq!(docs, vec![(0, "first\nline two"), (2, "  indented\n50% off"), (3, "last")]);
    }

    /// A reader that returns at most 3 bytes at a time, so records and characters straddle reads.
    fn tiny_reads(text: &[u8]) -> Box<dyn BufRead + Send> {
        Box::new(BufReader::with_capacity(3, std::io::Cursor::new(text.to_vec())))
    }

    fn collect(records: FileRecords) -> Vec<(u32, String)> {
        records
            .map(|r| match r {
                Ok(record) => record,
                Err(FileError::Bad(e)) => panic!("{e:#}"),
                Err(FileError::Unreadable(e)) => panic!("{e}"),
            })
            .collect()
    }

    const TRICKY_FORTUNES: &[&str] = &[
        "",
        "%",
        "%\n",
        "one",
        "\n\none\n%\r\r\n\n%\n%%\n two \n\n%\nlast ∂ö 中\n\n",
        "a\r\n%\r\nb\r\n%",
        "  \n%\n  \n",
    ];

    #[test]
    fn streamed_fortunes_equal_the_whole_file_split() {
        for text in TRICKY_FORTUNES {
            let whole: Vec<(u32, String)> =
                split_fortunes(text).map(|(i, r)| (i, r.to_string())).filter(|(_, r)| !r.trim().is_empty()).collect();
            let streamed = collect(FileRecords::Fortunes(FortuneRecords {
                lines: tiny_reads(text.as_bytes()),
                next_record: 0,
                done: false,
            }));
            assert_eq!(streamed, whole, "{text:?}");
        }
    }

    #[test]
    fn streamed_jsonl_equals_the_whole_file_read() {
        let text = "{\"text\": \"a\"}\r\n\n  \n{\"text\": null}\n{\"text\": \"b ∂\", \"x\": 1}\n{\"text\": \" \"}\n{\"text\": \"c\"}\r";
        let whole: Vec<(u32, String)> = jsonl_documents(text, "f.jsonl", "text")
            .unwrap()
            .into_iter()
            .filter(|(_, t)| !t.trim().is_empty())
            .collect();
        let records = JsonlRecords {
            lines: tiny_reads(text.as_bytes()),
            next_line: 0,
            location: "f.jsonl".into(),
            field: "text".into(),
        };
        assert_eq!(collect(FileRecords::Jsonl(records)), whole);
        assert_eq!(whole.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 4, 6]);
    }

    #[test]
    fn utf8_is_checked_across_reads_with_the_whole_file_message() {
        assert!(check_utf8(tiny_reads("ab∂ö中€".as_bytes())).is_ok());
        for bad in [&b"abcd\xffef"[..], b"ab\xe2\x88", b"\xe2\x88xyz", b"abcdefg\xc3"] {
            let expected = format!("not UTF-8 ({})", std::str::from_utf8(bad).unwrap_err());
            match check_utf8(tiny_reads(bad)) {
                Err(FileError::Unreadable(message)) => assert_eq!(message, expected, "{bad:?}"),
                _ => panic!("{bad:?} passed"),
            }
        }
    }

    #[test]
    fn doc_ids_order_like_documents() {
        let a = DocId { file: 1, record: u32::MAX };
        let b = DocId { file: 2, record: 0 };
        assert!(a < b && a.as_u64() < b.as_u64());
        assert_eq!(b.as_u64(), 1 << 33);
    }

    #[test]
    fn formats_parse_and_print() {
        for f in [CorpusFormat::Text, CorpusFormat::Fortune, CorpusFormat::Jsonl, CorpusFormat::Parquet] {
            assert_eq!(f.name().parse::<CorpusFormat>().unwrap(), f);
        }
        let e = "csv".parse::<CorpusFormat>().unwrap_err().to_string();
        assert!(e.contains("csv") && e.contains("fortune"), "{e}");
    }
}
