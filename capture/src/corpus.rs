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

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

mod documents;
mod listing;
mod mix;
mod object_reader;
mod parquet_text;
mod ranged_object;
mod records;

pub use documents::Documents;
pub use mix::{Mix, MixError, MixGroup, CHINESE_FORTUNE_FILES, FORTUNE_CYCLE};
pub use records::split_fortunes;

use documents::Cursor;
use listing::{list_local, list_object_store};
use object_reader::ObjectReader;
use parquet_text::{ParquetRecords, PARQUET_BATCH_ROWS};
use ranged_object::RangedObject;
use records::{check_utf8, FileError, FileRecords, FortuneRecords, JsonlRecords, TextPieces};

/// Debian's fortunes folder (packages `fortunes`, `fortunes-de`, `fortunes-es`, `fortunes-zh`).
pub const FORTUNES_DIR: &str = "/usr/share/games/fortunes";

/// Top-level files of [`FORTUNES_DIR`] that are not English (from `fortunes-zh`).
const NON_ENGLISH_FORTUNE_FILES: &[&str] = &["chinese", "tang300", "song100"];

/// The JSONL key or Parquet column read when none is given.
pub const DEFAULT_TEXT_FIELD: &str = "text";

/// How the files of a corpus are split into documents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CorpusFormat {
    /// A file is one document (a file over [`TEXT_PIECE_BYTES`]: one per piece of about that
    /// size, cut at paragraph breaks).
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
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "text" => Ok(CorpusFormat::Text),
            "fortune" => Ok(CorpusFormat::Fortune),
            "jsonl" => Ok(CorpusFormat::Jsonl),
            "parquet" => Ok(CorpusFormat::Parquet),
            _ => Err(Error::UnknownCorpusFormat { name: s.to_string() }),
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
    /// Interleave the documents of groups of inputs in a fixed cycle (see [`Mix`]); `None`
    /// reads the inputs one after the other.
    pub mix: Option<Mix>,
}

impl CorpusSpec {
    pub fn new(inputs: impl IntoIterator<Item = impl Into<String>>, format: CorpusFormat) -> Self {
        let inputs: Vec<String> = inputs.into_iter().map(Into::into).collect();
        // The name goes into messages and the dataset manifest: never with credentials.
        let name = store::redact_urls_in(&inputs.join(" "));
        CorpusSpec { inputs, format, text_field: DEFAULT_TEXT_FIELD.to_string(), name, mix: None }
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
        let entries =
            std::fs::read_dir(dir).map_err(|source| Error::NoFortunesFolder { dir: dir.to_path_buf(), source })?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| Error::ListFortunes { dir: dir.to_path_buf(), source })?;
            let file_type = entry.file_type().map_err(|source| Error::Stat { path: entry.path(), source })?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if file_type.is_file() && !name.ends_with(".dat") && !NON_ENGLISH_FORTUNE_FILES.contains(&name) {
                files.push(entry.path().display().to_string());
            }
        }
        if files.is_empty() {
            return Err(Error::NoEnglishFortunes { dir: dir.to_path_buf() });
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
    /// Hex sha256 over the format, the text field (JSONL and Parquet only), the mix (mixed
    /// corpora only), and for each file in
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
            return Err(Error::NoCorpusInput);
        }
        if let Some(mix) = &spec.mix {
            mix.check(spec.inputs.len())?;
        }
        let mut files = Vec::new();
        let mut skipped = Vec::new();
        let mut runtime: Option<Arc<tokio::runtime::Runtime>> = None;
        for (input, url) in spec.inputs.iter().enumerate() {
            let location = store::open_store(url)
                .map_err(|source| Error::BadCorpusInput { input: store::redact_urls_in(url), source })?;
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
            return Err(Error::NoCorpusFiles {
                format: spec.format,
                inputs: store::redact_urls_in(&spec.inputs.join(", ")),
                skipped: skipped.len(),
            });
        }
        if files.len() > u32::MAX as usize {
            return Err(Error::TooManyFiles { files: files.len() });
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

    /// The documents, file after file (group after group in cycles for a mixed corpus), read lazily: a file's records are read as they are
    /// needed (Parquet a record batch at a time, by ranged GETs on an object store), so memory
    /// holds a few records, not a file; only a `text` file, being one document, is held whole (up to [`TEXT_PIECE_BYTES`]).
    pub fn documents(&self) -> Documents {
        let (cursors, per_cycle) = match &self.spec.mix {
            None => (vec![Cursor::new((0..self.files.len()).collect())], vec![u32::MAX]),
            Some(mix) => mix
                .groups
                .iter()
                .map(|g| {
                    let files = (0..self.files.len()).filter(|&i| g.inputs.contains(&self.files[i].input)).collect();
                    (Cursor::new(files), g.documents_per_cycle)
                })
                .unzip(),
        };
        Documents {
            corpus: self.clone(),
            cursors,
            per_cycle,
            turn: 0,
            taken: 0,
            failed: false,
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
        if let Some(mix) = &self.spec.mix {
            hasher.update(mix.fingerprint_line());
        }
        let mut bytes = 0;
        for file in self.files.iter() {
            let content_hash = match self.hash_file(file) {
                Ok((hash, size)) => {
                    bytes += size;
                    format!("{size} {hash}")
                }
                Err(e) => format!("unreadable ({})", error_with_causes(&e)),
            };
            // Length-prefixed, so that no two listings hash the same bytes.
            hasher.update(format!("{}\t{}:{}\t{}\n", file.input, file.rel_path.len(), file.rel_path, content_hash));
        }
        Ok(CorpusFingerprint { sha256: hex(&hasher.finalize()), files: self.files.len(), bytes })
    }

    fn hash_file(&self, file: &CorpusFile) -> std::io::Result<(String, u64)> {
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
            CorpusFormat::Text if file.size > TEXT_PIECE_BYTES as u64 => {
                tracing::info!(
                    file = %file.location,
                    bytes = file.size,
                    "a text file over {} MiB is read as documents cut at paragraph breaks",
                    TEXT_PIECE_BYTES >> 20
                );
                FileRecords::TextPieces(TextPieces {
                    lines: reader,
                    piece_bytes: TEXT_PIECE_BYTES,
                    next_record: 0,
                    done: false,
                })
            }
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

/// A `text` file larger than this is not one document but pieces of about this size cut at
/// paragraph breaks, so that a file larger than memory can be read. A smaller one is one
/// document, tokenized by one `encode` call (a tokenizer may give other tokens for pieces).
pub const TEXT_PIECE_BYTES: usize = 64 << 20;

/// Bytes read at a time from a corpus file (local reads and object-store range requests).
const STREAM_BUFFER_BYTES: usize = 8 << 20;

fn redacted_io_error(e: &std::io::Error) -> String {
    store::redact_urls_in(&e.to_string())
}

fn new_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|source| Error::StartRuntime { source })
}

/// `error: cause: cause...`, every cause of the chain in turn. A file's fingerprint holds this
/// text when the file cannot be read, so it must not change: fingerprints are compared.
fn error_with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
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
