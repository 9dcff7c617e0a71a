//! Corpus files larger than memory: a Parquet corpus is read a record batch at a time, from a
//! local file or an object store, and a large text file a piece at a time; neither is held whole. A counting allocator measures the peak of
//! live allocations while the documents are read.

use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use capture::corpus::{Corpus, CorpusFormat, CorpusSpec, TEXT_PIECE_BYTES};
use testkit::CountingAllocator;

/// Counts live bytes and their peak (see `testkit::alloc`).
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The allocator's counts are process-wide and tests run on parallel threads: each test holds
/// this lock so that it measures only its own reading.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Rows of the generated file, about 2 KB of text each: 250 MiB of text in all.
const ROWS: usize = 128 * 1024;
const ROWS_PER_WRITE: usize = 8 * 1024;
/// The most that reading may hold above what was live before: far below the file's size, a
/// few batches and pages of the column.
const PEAK_LIMIT: usize = 64 << 20;

fn row_text(i: usize) -> String {
    let filler = "All work and no play makes Jack a dull boy. ".repeat(45);
    format!("document {i}: {filler}")
}

/// Writes the test corpus: an `id` column and a `text` column, uncompressed (so that the file is
/// as large as its text), in row groups of 16,384 rows (about 32 MiB).
fn write_big_parquet(path: &std::path::Path) -> u64 {
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::UNCOMPRESSED)
        .set_dictionary_enabled(false)
        .set_max_row_group_row_count(Some(16 * 1024))
        .build();
    let mut writer = None;
    for start in (0..ROWS).step_by(ROWS_PER_WRITE) {
        let ids: ArrayRef =
            Arc::new(arrow_array::Int64Array::from_iter_values((start..start + ROWS_PER_WRITE).map(|i| i as i64)));
        let text: ArrayRef = Arc::new(StringArray::from_iter_values((start..start + ROWS_PER_WRITE).map(row_text)));
        let batch = RecordBatch::try_from_iter([("id", ids), ("text", text)]).unwrap();
        let writer = writer.get_or_insert_with(|| {
            let file = std::fs::File::create(path).unwrap();
            parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props.clone())).unwrap()
        });
        writer.write(&batch).unwrap();
    }
    writer.unwrap().close().unwrap();
    std::fs::metadata(path).unwrap().len()
}

/// Reads every document of `input` (one Parquet file) and checks each; returns the peak of live
/// allocations above what was live when reading started.
fn read_and_measure(input: &str) -> usize {
    let before = CountingAllocator::reset_peak();
    let corpus = Corpus::open(CorpusSpec::new([input], CorpusFormat::Parquet)).unwrap();
    let mut documents = corpus.documents();
    let mut count = 0usize;
    for doc in documents.by_ref() {
        let doc = doc.unwrap();
        assert_eq!((doc.id.file, doc.id.record as usize), (0, count));
        if count.is_multiple_of(9973) {
            assert_eq!(doc.text, row_text(count));
        }
        count += 1;
    }
    assert_eq!(count, ROWS);
    assert_eq!(documents.stats().documents, ROWS as u64);
    drop(documents);
    drop(corpus);
    CountingAllocator::peak().saturating_sub(before)
}

#[test]
fn parquet_corpora_are_streamed_in_bounded_memory() {
    let _measuring = MEASURING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.parquet");
    let size = write_big_parquet(&path);
    assert!(size > 250 << 20, "{size} bytes");

    let peak = read_and_measure(&path.display().to_string());
    eprintln!("local file of {} MiB: peak {} MiB above the start", size >> 20, peak >> 20);
    assert!(peak < PEAK_LIMIT, "reading a {size}-byte local file held {peak} bytes at its peak");

    // The same file on an object store: read by ranged GETs, not fetched whole. (The store's
    // own copy was live before reading started, so it is not counted.)
    {
        use object_store::ObjectStoreExt;
        let location = store::open_store("memory://corpus-memory").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(location.store.put(&location.path("big.parquet"), bytes.into())).unwrap();
    }
    let peak = read_and_measure("memory://corpus-memory/big.parquet");
    eprintln!("object of {} MiB: peak {} MiB above the start", size >> 20, peak >> 20);
    assert!(peak < PEAK_LIMIT, "reading a {size}-byte object held {peak} bytes at its peak");
}

#[test]
fn text_files_over_the_piece_size_are_read_a_piece_at_a_time() {
    let _measuring = MEASURING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.txt");
    // Paragraphs of about 2 KB: 4 pieces' worth of text.
    let paragraph = format!("{}\n\n", "All work and no play makes Jack a dull boy. ".repeat(45).trim_end());
    let paragraphs = 4 * TEXT_PIECE_BYTES / paragraph.len() + 1;
    {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for _ in 0..paragraphs {
            file.write_all(paragraph.as_bytes()).unwrap();
        }
    }
    let size = std::fs::metadata(&path).unwrap().len() as usize;
    let before = CountingAllocator::reset_peak();
    let corpus = Corpus::open(CorpusSpec::new([path.display().to_string()], CorpusFormat::Text)).unwrap();
    let mut lengths = Vec::new();
    for doc in corpus.documents() {
        let doc = doc.unwrap();
        assert_eq!(doc.id.record as usize, lengths.len());
        assert!(doc.text.ends_with("\n\n") && doc.text.starts_with("All work"), "pieces are cut at paragraph breaks");
        lengths.push(doc.text.len());
    }
    drop(corpus);
    let peak = CountingAllocator::peak().saturating_sub(before);
    eprintln!("text file of {} MiB: pieces {lengths:?}, peak {} MiB above the start", size >> 20, peak >> 20);
    assert_eq!(lengths.iter().sum::<usize>(), size, "the pieces are the whole file");
    assert!(lengths.len() >= 4);
    let whole_pieces = &lengths[..lengths.len() - 1];
    assert!(whole_pieces.iter().all(|&n| n >= TEXT_PIECE_BYTES && n < TEXT_PIECE_BYTES + paragraph.len()));
    // A piece is built in a String that doubles as it grows: at most 4 pieces' size at once,
    // and the file is 4 pieces and a bit; held whole it would need the file and a copy.
    assert!(peak < 3 * TEXT_PIECE_BYTES, "reading a {size}-byte text file held {peak} bytes at its peak");
}
