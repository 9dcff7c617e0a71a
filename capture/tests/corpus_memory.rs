//! Corpus files larger than memory: a Parquet corpus is read a record batch at a time, from a
//! local file or an object store, and never held whole. A counting allocator measures the peak of
//! live allocations while the documents are read.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use capture::corpus::{Corpus, CorpusFormat, CorpusSpec};

struct CountingAllocator;

/// Bytes allocated and not yet freed.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The most `LIVE` has been since it was last reset.
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= layout.size() {
            grew(new_size - layout.size());
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

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
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
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
    PEAK.load(Ordering::Relaxed).saturating_sub(before)
}

#[test]
fn parquet_corpora_are_streamed_in_bounded_memory() {
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
