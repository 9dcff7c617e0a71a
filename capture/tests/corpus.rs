//! Corpus readers and token windows, on real data: Debian's fortunes and SmolLM2's tokenizer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use capture::corpus::{Corpus, CorpusFormat, CorpusSpec, DocId, Document, FORTUNES_DIR};
use capture::tokenizer::TextTokenizer;
use capture::windows::{load_tokenizer, Window, WindowOptions, WindowStats, WindowStream};

/// Documents in the 43 top-level English fortune files: the sum of the record counts in their
/// strfile `.dat` headers, which `default_corpus_matches_strfile_counts` also checks file by file.
/// (The 20,889 of earlier notes also counted the Chinese files: + 5263 + 313 + 95 records.)
const ENGLISH_FORTUNES: u64 = 15_217;
/// SmolLM2 tokens of those documents, one EOS after each included, measured with this crate's
/// tokenizer and checked once against transformers' tokenizer for the same GGUF
/// (`add_special_tokens=False`, same splitting). The 1.84M tokens of earlier notes also counted
/// the Chinese files (all 46 top-level files: 20,888 documents, 1,836,233 tokens).
const ENGLISH_FORTUNE_TOKENS: u64 = 699_175;

fn tokenizer() -> Arc<TextTokenizer> {
    static TOKENIZER: OnceLock<Arc<TextTokenizer>> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| {
            let path = capture::model::default_model_path();
            Arc::new(load_tokenizer(&path).unwrap_or_else(|e| {
                panic!("cannot load the tokenizer of {} (run `make setup`): {e:#}", path.display())
            }))
        })
        .clone()
}

fn default_corpus() -> Corpus {
    Corpus::open(CorpusSpec::default_fortunes().expect("fortunes installed (run `make setup`)")).unwrap()
}

/// Every window of `corpus` with `options`, and the stream's counts.
fn collect(corpus: &Corpus, options: WindowOptions) -> (Vec<Window>, WindowStats) {
    let mut stream = WindowStream::start(corpus.clone(), tokenizer(), options).unwrap();
    let windows = stream.by_ref().collect::<capture::Result<Vec<_>>>().unwrap();
    (windows, stream.stats().expect("stats after the end").clone())
}

fn write(dir: &Path, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, content).unwrap();
    path
}

fn texts(docs: &[Document]) -> Vec<&str> {
    docs.iter().map(|d| d.text.as_str()).collect()
}

fn spec(input: &Path, format: CorpusFormat) -> CorpusSpec {
    CorpusSpec::new([input.display().to_string()], format)
}

/// The record count in a strfile `.dat` header (big-endian u32 after the version).
fn strfile_count(dat: &Path) -> u64 {
    let header = std::fs::read(dat).unwrap();
    u32::from_be_bytes(header[4..8].try_into().unwrap()) as u64
}

#[test]
fn default_corpus_is_the_top_level_english_fortune_files() {
    let spec = CorpusSpec::default_fortunes().unwrap();
    assert_eq!(spec.format, CorpusFormat::Fortune);
    let corpus = Corpus::open(spec).unwrap();
    let names: Vec<&str> = corpus.files().iter().map(|f| f.rel_path.as_str()).collect();
    assert_eq!(names.len(), 43, "{names:?}");
    assert!(names.windows(2).all(|p| p[0] < p[1]), "sorted and unique: {names:?}");
    for excluded in ["chinese", "tang300", "song100"] {
        assert!(!names.contains(&excluded), "{excluded} is not English");
    }
    assert!(names.iter().all(|n| !n.ends_with(".dat") && !n.ends_with(".u8") && !n.contains('/')), "{names:?}");
    for expected in ["art", "computers", "fortunes", "zippy"] {
        assert!(names.contains(&expected), "{expected} missing");
    }
    assert!(corpus.files().iter().all(|f| f.named && f.size > 0));
}

#[test]
fn default_corpus_matches_strfile_counts() {
    let corpus = default_corpus();
    let (docs, stats) = corpus.read_all().unwrap();
    assert_eq!(stats.documents, ENGLISH_FORTUNES);
    assert_eq!(docs.len() as u64, ENGLISH_FORTUNES);
    assert_eq!(stats.files_read, 43);
    assert!(stats.skipped.is_empty(), "{:?}", stats.skipped);
    assert_eq!(stats.bytes, corpus.bytes());
    // Per file, our `%` splitting finds exactly the records strfile indexed.
    let mut per_file: BTreeMap<u32, u64> = BTreeMap::new();
    for doc in &docs {
        *per_file.entry(doc.id.file).or_default() += 1;
    }
    for (index, file) in corpus.files().iter().enumerate() {
        let dat = Path::new(FORTUNES_DIR).join(format!("{}.dat", file.rel_path));
        assert_eq!(per_file.get(&(index as u32)).copied().unwrap_or(0), strfile_count(&dat), "{}", file.rel_path);
    }
    // Ids are (file, record), increasing; no document is blank or holds a separator line.
    assert!(docs.windows(2).all(|p| p[0].id < p[1].id));
    assert!(docs.iter().all(|d| !d.text.trim().is_empty() && !d.text.lines().any(|l| l == "%")));
    let first = &docs[0];
    assert_eq!(first.id, DocId { file: 0, record: 0 });
    assert!(std::fs::read_to_string(Path::new(FORTUNES_DIR).join("art")).unwrap().starts_with(&first.text));
}

#[test]
fn folder_walk_skips_symlinks_and_dat_files_in_sorted_order() {
    let corpus = Corpus::open(CorpusSpec::new([FORTUNES_DIR], CorpusFormat::Fortune)).unwrap();
    let names: Vec<&str> = corpus.files().iter().map(|f| f.rel_path.as_str()).collect();
    assert!(names.windows(2).all(|p| p[0] < p[1]), "sorted and unique");
    assert!(names.iter().all(|n| !n.ends_with(".dat") && !n.ends_with(".u8")), "{names:?}");
    // Each listed file is a regular file, not a link, and nothing regular is missed.
    let mut expected = Vec::new();
    let mut stack = vec![PathBuf::from(FORTUNES_DIR)];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() && !entry.file_name().to_str().unwrap().ends_with(".dat") {
                expected.push(entry.path().strip_prefix(FORTUNES_DIR).unwrap().display().to_string());
            }
        }
    }
    expected.sort();
    assert_eq!(names, expected);
    assert!(names.contains(&"de/anekdoten") && names.contains(&"es/vida.fortunes") && names.contains(&"chinese"));
    assert!(names
        .iter()
        .all(|n| !std::fs::symlink_metadata(Path::new(FORTUNES_DIR).join(n)).unwrap().file_type().is_symlink()));
}

#[test]
fn fortune_format_splits_on_lines_holding_only_percent() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "quotes",
        "A fortune\nof two lines.\n%\n100% sure\n% not a separator\n%\n\n%\n   indented art\n%\n",
    );
    let (docs, stats) = Corpus::open(spec(&file, CorpusFormat::Fortune)).unwrap().read_all().unwrap();
    assert_eq!(texts(&docs), ["A fortune\nof two lines.", "100% sure\n% not a separator", "   indented art"]);
    // The blank record keeps its number: ids are record indexes in the file.
    assert_eq!(docs.iter().map(|d| d.id.record).collect::<Vec<_>>(), [0, 1, 3]);
    assert_eq!(stats.documents, 3);
    // The same file as `text` is one document.
    let (docs, _) = Corpus::open(spec(&file, CorpusFormat::Text)).unwrap().read_all().unwrap();
    assert_eq!(docs.len(), 1);
    assert!(docs[0].text.contains("\n%\n"));
}

#[test]
fn jsonl_reads_the_chosen_text_field() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "b.jsonl", "{\"body\": \"third\"}\n");
    write(
        dir.path(),
        "a.jsonl",
        "{\"id\": 1, \"body\": \"first\"}\n\n{\"id\": 2, \"body\": null}\n{\"id\": 3, \"body\": \"second \\u00e9\"}\n",
    );
    write(dir.path(), "notes.txt", "not part of a jsonl corpus");
    let corpus = Corpus::open(spec(dir.path(), CorpusFormat::Jsonl).with_text_field("body")).unwrap();
    assert_eq!(corpus.files().iter().map(|f| f.rel_path.as_str()).collect::<Vec<_>>(), ["a.jsonl", "b.jsonl"]);
    let (docs, _) = corpus.read_all().unwrap();
    assert_eq!(texts(&docs), ["first", "second é", "third"]);
    assert_eq!(docs.iter().map(|d| (d.id.file, d.id.record)).collect::<Vec<_>>(), [(0, 0), (0, 3), (1, 0)]);
}

#[test]
fn jsonl_without_the_text_field_is_an_error_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "data.jsonl", "{\"content\": \"x\", \"id\": 1}\n");
    let err = Corpus::open(spec(&file, CorpusFormat::Jsonl)).unwrap().read_all().unwrap_err().to_string();
    assert!(
        err.contains("data.jsonl:1")
            && err.contains("`text`")
            && err.contains("content")
            && err.contains("--text-field"),
        "{err}"
    );
    let file = write(dir.path(), "num.jsonl", "{\"text\": 5}\n");
    let err = Corpus::open(spec(&file, CorpusFormat::Jsonl)).unwrap().read_all().unwrap_err().to_string();
    assert!(err.contains("num.jsonl:1") && err.contains("a number"), "{err}");
    let file = write(dir.path(), "broken.jsonl", "{\"text\": \"ok\"}\n{oops\n");
    let err = format!("{:#}", Corpus::open(spec(&file, CorpusFormat::Jsonl)).unwrap().read_all().unwrap_err());
    assert!(err.contains("broken.jsonl:2") && err.contains("not a JSON line"), "{err}");
}

fn write_parquet(path: &Path, texts: &[Option<&str>], compression: parquet::basic::Compression) {
    use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(0..texts.len() as i64));
    let text: ArrayRef = Arc::new(StringArray::from(texts.to_vec()));
    let batch = RecordBatch::try_from_iter([("id", ids), ("text", text)]).unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(compression)
        .set_max_row_group_row_count(Some(2))
        .build();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), Some(props))
            .unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn parquet_reads_the_text_column_of_a_hugging_face_layout() {
    use parquet::basic::{Compression, ZstdLevel};
    let dir = tempfile::tempdir().unwrap();
    // data/train-0000x-of-00002.parquet beside a README, as the Hub lays datasets out.
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    write_parquet(
        &dir.path().join("data/train-00000-of-00002.parquet"),
        &[Some("alpha"), None, Some("gamma"), Some("  ")],
        Compression::SNAPPY,
    );
    write_parquet(
        &dir.path().join("data/train-00001-of-00002.parquet"),
        &[Some("delta")],
        Compression::ZSTD(ZstdLevel::default()),
    );
    write(dir.path(), "README.md", "# a dataset card");
    let corpus = Corpus::open(spec(dir.path(), CorpusFormat::Parquet)).unwrap();
    assert_eq!(corpus.files().len(), 2, "only the .parquet files");
    let (docs, stats) = corpus.read_all().unwrap();
    assert_eq!(texts(&docs), ["alpha", "gamma", "delta"]);
    // Row numbers survive nulls, blanks and row-group boundaries.
    assert_eq!(docs.iter().map(|d| (d.id.file, d.id.record)).collect::<Vec<_>>(), [(0, 0), (0, 2), (1, 0)]);
    assert_eq!(stats.files_read, 2);

    let err = Corpus::open(spec(dir.path(), CorpusFormat::Parquet).with_text_field("content"))
        .unwrap()
        .read_all()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train-00000-of-00002.parquet") && err.contains("`content`") && err.contains("id, text"),
        "{err}"
    );
    let err = Corpus::open(spec(dir.path(), CorpusFormat::Parquet).with_text_field("id"))
        .unwrap()
        .read_all()
        .unwrap_err()
        .to_string();
    assert!(err.contains("`id`") && err.contains("Int64"), "{err}");
}

#[test]
fn non_utf8_file_in_a_folder_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.txt", "first document");
    let latin1 = write(dir.path(), "b.txt", b"caf\xe9 in Latin-1".as_slice());
    write(dir.path(), "c.txt", "second document");
    let (docs, stats) = Corpus::open(spec(dir.path(), CorpusFormat::Text)).unwrap().read_all().unwrap();
    assert_eq!(texts(&docs), ["first document", "second document"]);
    // c.txt keeps its file index 2: ids do not shift when a neighbour is skipped.
    assert_eq!(docs[1].id, DocId { file: 2, record: 0 });
    assert_eq!(stats.files_read, 2);
    assert_eq!(stats.skipped.len(), 1);
    assert!(
        stats.skipped[0].location.ends_with("b.txt") && stats.skipped[0].reason.contains("not UTF-8"),
        "{:?}",
        stats.skipped
    );
    // Named on its own, the same file is an error: the user asked for it.
    let err = Corpus::open(spec(&latin1, CorpusFormat::Text)).unwrap().read_all().unwrap_err().to_string();
    assert!(err.contains("b.txt") && err.contains("not UTF-8"), "{err}");
}

#[test]
fn unreadable_file_in_a_folder_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.txt", "kept");
    let gone = write(dir.path(), "b.txt", "listed, then removed before it is read");
    let corpus = Corpus::open(spec(dir.path(), CorpusFormat::Text)).unwrap();
    std::fs::remove_file(&gone).unwrap();
    let (docs, stats) = corpus.read_all().unwrap();
    assert_eq!(texts(&docs), ["kept"]);
    assert_eq!(stats.skipped.len(), 1);
    assert!(stats.skipped[0].location.ends_with("b.txt"), "{:?}", stats.skipped);

    // Permission bits stop everyone but root (and root ignores them, so the check needs a user).
    let locked = write(dir.path(), "c.txt", "locked");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::read(&locked).is_err() {
        let (docs, stats) = Corpus::open(spec(dir.path(), CorpusFormat::Text)).unwrap().read_all().unwrap();
        assert_eq!(texts(&docs), ["kept"]);
        assert!(
            stats.skipped[0].location.ends_with("c.txt") && stats.skipped[0].reason.contains("ermission"),
            "{:?}",
            stats.skipped
        );
    }

    // A named file that cannot be read is an error naming it.
    let named = write(dir.path(), "named.txt", "x");
    let corpus = Corpus::open(spec(&named, CorpusFormat::Text)).unwrap();
    std::fs::remove_file(&named).unwrap();
    let err = corpus.read_all().unwrap_err().to_string();
    assert!(err.contains("cannot read corpus file") && err.contains("named.txt"), "{err}");
}

#[test]
fn empty_corpus_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Corpus::open(spec(dir.path(), CorpusFormat::Text)).unwrap_err().to_string();
    assert!(err.contains("empty corpus") && err.contains(&dir.path().display().to_string()), "{err}");

    let missing = dir.path().join("nowhere");
    let err = format!("{:#}", Corpus::open(spec(&missing, CorpusFormat::Text)).unwrap_err());
    assert!(err.contains("nowhere") && err.contains("does not exist"), "{err}");

    // Files, but only blank documents: the window stream's first item says so.
    write(dir.path(), "blank.txt", "  \n\n");
    write(dir.path(), "only-separators", "%\n%\n");
    let corpus = Corpus::open(spec(dir.path(), CorpusFormat::Fortune)).unwrap();
    let mut stream = WindowStream::start(corpus, tokenizer(), WindowOptions::default()).unwrap();
    let err = stream.next().unwrap().unwrap_err().to_string();
    assert!(err.contains("empty corpus") && err.contains("2 files read"), "{err}");
    assert!(stream.next().is_none());

    // Documents, but fewer tokens than one window.
    write(dir.path(), "short.txt", "Too short for a window.");
    let corpus = Corpus::open(spec(dir.path(), CorpusFormat::Text)).unwrap();
    let err = WindowStream::start(corpus, tokenizer(), WindowOptions::new(64))
        .unwrap()
        .next()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("shorter than one window") && err.contains("64"), "{err}");
}

#[test]
fn windows_pack_documents_separated_by_eos_without_bos() {
    let tok = tokenizer();
    assert!(!tok.add_bos, "SmolLM2 does not add BOS");
    let eos = tok.eos_id.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let docs = [
        "The first document.",
        "A second, somewhat longer document with more words in it.",
        "Third!",
        "And a fourth one to end.",
    ];
    for (i, d) in docs.iter().enumerate() {
        write(dir.path(), &format!("{i}.txt"), d);
    }
    let mut stream_tokens = Vec::new();
    for d in docs {
        stream_tokens.extend(tok.encode(d).unwrap());
        stream_tokens.push(eos);
    }
    let context_len = 8;
    let corpus = Corpus::open(spec(dir.path(), CorpusFormat::Text)).unwrap();
    let (windows, stats) = collect(&corpus, WindowOptions::new(context_len));
    let expected: Vec<&[u32]> = stream_tokens.chunks_exact(context_len).collect();
    assert!(stream_tokens.len() % context_len != 0, "the test needs a partial last window to drop");
    assert_eq!(windows.len(), expected.len());
    for (i, (w, e)) in windows.iter().zip(&expected).enumerate() {
        assert_eq!(w.sequence_id, i as u64);
        assert_eq!(w.tokens.as_slice(), *e);
    }
    assert_eq!(
        windows[0].tokens[..tok.encode(docs[0]).unwrap().len()],
        tok.encode(docs[0]).unwrap()[..],
        "no BOS before the first document"
    );
    assert_eq!(stats.documents, 4);
    assert_eq!(stats.stream_tokens, stream_tokens.len() as u64);
    assert_eq!(stats.windows_packed, (stream_tokens.len() / context_len) as u64);
    assert!(stats.corpus_exhausted);
    assert_eq!(stats.windows_missing(), 0);
    // The stored positions leave out position 0 unless asked.
    assert_eq!(windows[1].stored_tokens(false), &windows[1].tokens[1..]);
    assert_eq!(windows[1].stored_tokens(true).len(), context_len);
}

#[test]
fn default_corpus_token_count() {
    let (windows, stats) =
        collect(&default_corpus(), WindowOptions { queue_windows: 1 << 16, ..WindowOptions::default() });
    eprintln!(
        "default corpus: {} documents, {} tokens, {} windows of 256",
        stats.documents, stats.stream_tokens, stats.windows_packed
    );
    assert_eq!(stats.documents, ENGLISH_FORTUNES);
    assert_eq!(stats.stream_tokens, ENGLISH_FORTUNE_TOKENS);
    assert_eq!(stats.windows_packed, ENGLISH_FORTUNE_TOKENS / 256);
    assert_eq!(windows.len() as u64, stats.windows_packed);
    let eos = tokenizer().eos_id.unwrap();
    let eos_count: usize = windows.iter().map(|w| w.tokens.iter().filter(|&&t| t == eos).count()).sum();
    // Every document ends with one EOS; the dropped tail holds the last few.
    assert!(eos_count as u64 <= ENGLISH_FORTUNES && eos_count as u64 > ENGLISH_FORTUNES - 10, "{eos_count}");
    assert!(windows.iter().all(|w| w.tokens.len() == 256));
}

#[test]
fn windows_do_not_depend_on_threads_or_chunks() {
    let corpus = default_corpus();
    let base = WindowOptions::default().max_tokens(150_000, false);
    let (one_thread, stats) =
        collect(&corpus, WindowOptions { threads: Some(1), chunk_documents: 1000, ..base.clone() });
    let (four_threads, _) =
        collect(&corpus, WindowOptions { threads: Some(4), chunk_documents: 37, queue_windows: 3, ..base.clone() });
    let (global_pool, _) = collect(&corpus, WindowOptions { chunk_documents: 1, ..base.clone() });
    assert_eq!(one_thread.len() as u64, 150_000u64.div_ceil(255));
    assert!(one_thread == four_threads && one_thread == global_pool);
    assert!(!stats.corpus_exhausted && stats.windows_missing() == 0);
    // The stream reads lazily: it stopped at the file that completed the last window.
    assert!(stats.read.files_read < corpus.files().len(), "{} files read", stats.read.files_read);
    let last = one_thread.last().unwrap();
    assert!(last.tokens.len() == 256 && stats.windows_packed == last.sequence_id + 1);
    assert_eq!(
        one_thread.iter().map(|w| w.sequence_id).collect::<Vec<_>>(),
        (0..one_thread.len() as u64).collect::<Vec<_>>()
    );
}

#[test]
fn resume_from_window_w_equals_the_tail_of_a_full_run() {
    let corpus = default_corpus();
    let options = WindowOptions { end_window: Some(300), ..WindowOptions::new(128) };
    let (full, _) = collect(&corpus, options.clone());
    assert_eq!(full.len(), 300);
    for start in [0, 1, 123, 299] {
        let (tail, stats) = collect(&corpus, options.clone().start_window(start).threads(2));
        assert_eq!(tail.as_slice(), &full[start as usize..], "resumed at {start}");
        assert_eq!(stats.windows, 300 - start);
        assert_eq!(stats.windows_packed, 300);
    }
    let (none, stats) = collect(&corpus, options.start_window(300));
    assert!(none.is_empty() && stats.windows == 0);
    let (none, stats) = collect(&corpus, WindowOptions { end_window: Some(0), ..WindowOptions::default() });
    assert!(none.is_empty() && !stats.corpus_exhausted && stats.documents == 0, "{stats:?}");
}

#[test]
fn a_corpus_shorter_than_max_tokens_returns_what_there_is() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(Path::new(FORTUNES_DIR).join("pratchett")).unwrap();
    let file = write(dir.path(), "pratchett", text);
    let corpus = Corpus::open(spec(&file, CorpusFormat::Fortune)).unwrap();
    let (all, all_stats) = collect(&corpus, WindowOptions::new(16));
    let (windows, stats) = collect(&corpus, WindowOptions::new(16).max_tokens(1_000_000, false));
    assert_eq!(windows, all);
    assert!(stats.corpus_exhausted);
    assert_eq!(stats.windows_requested, Some(1_000_000u64.div_ceil(15)));
    assert_eq!(stats.windows_missing(), 1_000_000u64.div_ceil(15) - all_stats.windows_packed);
    assert!(!windows.is_empty() && windows.len() as u64 == all_stats.stream_tokens / 16);
}

/// Copies `dir`'s files (symlinks and `.dat` files left out) to `memory://name/prefix`.
fn upload(dir: &Path, url: &str) {
    use object_store::ObjectStoreExt;
    let location = store::open_store(url).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            let name = entry.file_name().into_string().unwrap();
            let bytes = std::fs::read(entry.path()).unwrap();
            rt.block_on(location.store.put(&location.path(&name), bytes.into())).unwrap();
        }
    }
}

#[test]
fn url_inputs_read_like_the_local_folder() {
    // A copy of a few fortune files, with their `.dat` and `.u8` neighbours.
    let dir = tempfile::tempdir().unwrap();
    for name in ["computers", "linux", "pets"] {
        std::fs::copy(Path::new(FORTUNES_DIR).join(name), dir.path().join(name)).unwrap();
        std::fs::copy(Path::new(FORTUNES_DIR).join(format!("{name}.dat")), dir.path().join(format!("{name}.dat")))
            .unwrap();
        std::os::unix::fs::symlink(name, dir.path().join(format!("{name}.u8"))).unwrap();
    }
    let local = Corpus::open(spec(dir.path(), CorpusFormat::Fortune)).unwrap();
    assert_eq!(local.files().len(), 3);
    let (local_docs, _) = local.read_all().unwrap();
    let local_fingerprint = local.fingerprint().unwrap();

    let file_url = format!("file://{}", dir.path().display());
    let by_file_url = Corpus::open(CorpusSpec::new([file_url], CorpusFormat::Fortune)).unwrap();
    assert_eq!(by_file_url.read_all().unwrap().0, local_docs);
    assert_eq!(by_file_url.fingerprint().unwrap(), local_fingerprint);

    // The in-memory store holds no links; the `.dat` files are skipped there too.
    upload(dir.path(), "memory://corpus-tests/fortunes");
    let remote = Corpus::open(CorpusSpec::new(["memory://corpus-tests/fortunes"], CorpusFormat::Fortune)).unwrap();
    assert_eq!(
        remote.files().iter().map(|f| (f.rel_path.as_str(), f.size, f.named)).collect::<Vec<_>>(),
        local.files().iter().map(|f| (f.rel_path.as_str(), f.size, f.named)).collect::<Vec<_>>()
    );
    let (remote_docs, remote_stats) = remote.read_all().unwrap();
    assert_eq!(remote_docs, local_docs);
    assert!(remote_stats.skipped.is_empty());
    assert_eq!(remote.fingerprint().unwrap(), local_fingerprint);
    assert_eq!(remote.files()[0].location, "memory://corpus-tests/fortunes/computers");
    // Windows are the same too.
    let options = WindowOptions::new(64);
    assert_eq!(collect(&remote, options.clone()).0, collect(&local, options).0);

    // One object named by its URL.
    let single = Corpus::open(CorpusSpec::new(["memory://corpus-tests/fortunes/pets"], CorpusFormat::Fortune)).unwrap();
    assert_eq!(single.files().len(), 1);
    assert!(single.files()[0].named);
    let pets: Vec<_> = local_docs.iter().filter(|d| d.id.file == 2).map(|d| d.text.clone()).collect();
    assert_eq!(single.read_all().unwrap().0.into_iter().map(|d| d.text).collect::<Vec<_>>(), pets);
    let err = Corpus::open(CorpusSpec::new(["memory://corpus-tests/nothing-here"], CorpusFormat::Text))
        .unwrap_err()
        .to_string();
    assert!(err.contains("memory://corpus-tests/nothing-here") && err.contains("does not exist"), "{err}");
}

#[test]
fn fingerprint_follows_content_names_and_format() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", "one\n%\ntwo\n");
    write(dir.path(), "b", "three\n");
    let fingerprint = |format| Corpus::open(spec(dir.path(), format)).unwrap().fingerprint().unwrap();
    let base = fingerprint(CorpusFormat::Fortune);
    assert_eq!(base.sha256.len(), 64);
    assert_eq!((base.files, base.bytes), (2, 16));
    assert_eq!(fingerprint(CorpusFormat::Fortune), base, "deterministic");
    assert_ne!(fingerprint(CorpusFormat::Text).sha256, base.sha256, "format");
    write(dir.path(), "b", "threE\n");
    assert_ne!(fingerprint(CorpusFormat::Fortune).sha256, base.sha256, "one byte");
    write(dir.path(), "b", "three\n");
    assert_eq!(fingerprint(CorpusFormat::Fortune), base);
    std::fs::rename(dir.path().join("b"), dir.path().join("c")).unwrap();
    assert_ne!(fingerprint(CorpusFormat::Fortune).sha256, base.sha256, "name");
    let jsonl = |field: &str| {
        Corpus::open(spec(dir.path(), CorpusFormat::Text).with_text_field(field)).unwrap().fingerprint().unwrap()
    };
    assert_eq!(jsonl("x"), jsonl("y"), "the text field does not matter for text files");
    let manifest = base.to_manifest(&CorpusSpec::default_fortunes().unwrap(), "windows of 256 tokens");
    assert_eq!(manifest.sha256, base.sha256);
    assert!(manifest.name.contains("English fortunes"), "{}", manifest.name);
}
