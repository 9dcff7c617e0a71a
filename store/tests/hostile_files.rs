//! Damaged and hostile dataset files: a mutated `manifest.json`, `header.json`, commit record or
//! Parquet shard gives a clear error or a correct result, never a panic, an abort or an
//! allocation beyond [`ALLOCATION_LIMIT`].
//!
//! The property tests mutate a small valid dataset (written once per test) and read it back with
//! `info`, `verify` and the reader. Case counts are small and fixed (see each `cases`), so the
//! file runs in seconds.

mod common;

use std::path::Path;
use std::sync::OnceLock;

use common::*;
use proptest::prelude::*;
use store::reader::{Reader, ReaderOptions};
use store::{DatasetWriter, Error, StoreOptions, WriterOptions};
use testkit::CountingAllocator;

/// No single allocation made while reading a damaged dataset may exceed this: the dataset is a
/// few hundred KB, so anything near it was sized from a forged field.
const ALLOCATION_LIMIT: usize = 64 << 20;
/// Records the largest allocation, and refuses any over 1 GiB (see `testkit::alloc`).
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const HOOK: &str = "blocks.3.hook_resid_post";
const D_MODEL: usize = 16;
const CTX: usize = 32;
const SEQUENCES: usize = 12;

/// A small finished dataset, written once: 384 rows in a few shards.
fn pristine() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = TempDir::new("hostile-pristine");
        let opts = WriterOptions { row_group_rows: 50, shard_bytes: Some(4_000), ..Default::default() };
        let url = dir.path().to_str().unwrap().to_string();
        let mut w = DatasetWriter::create(&url, header(&[(HOOK, D_MODEL)], CTX), opts).unwrap();
        w.append(synth(0, SEQUENCES, CTX, &[(HOOK, D_MODEL)])).unwrap();
        let m = w.finish().unwrap();
        assert!(m.shards.len() >= 2, "{} shards", m.shards.len());
        dir
    })
    .path()
}

/// The pristine dataset's rows as the reader returns them, in order.
fn pristine_values() -> &'static Vec<f32> {
    static VALUES: OnceLock<Vec<f32>> = OnceLock::new();
    VALUES.get_or_init(|| read_all(pristine().to_str().unwrap()).expect("the pristine dataset reads"))
}

/// A fresh copy of the pristine dataset, to damage.
fn copy_of_pristine() -> TempDir {
    let copy = TempDir::new("hostile-case");
    copy_dir(pristine(), copy.path());
    copy
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Every file of the dataset under `dir/sub`, sorted.
fn files_under(dir: &Path, sub: &str) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = walk(&dir.join(sub));
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flat_map(|e| {
            let path = e.unwrap().path();
            if path.is_dir() {
                walk(&path)
            } else {
                vec![path]
            }
        })
        .collect()
}

/// Every row of the dataset at `url`, in stored order, as f32.
fn read_all(url: &str) -> store::Result<Vec<f32>> {
    let mut opts = ReaderOptions::one_pass_in_order(HOOK, 64);
    opts.decode_threads = 1;
    opts.prefetch_row_groups = 2;
    opts.max_bytes_in_flight = 4 << 20;
    let mut values = Vec::new();
    for batch in Reader::open(url, opts)? {
        values.extend(batch?.to_f32());
    }
    Ok(values)
}

/// What reading a damaged dataset gave.
struct Outcome {
    info: store::Result<store::DatasetInfo>,
    verified: store::Result<store::VerifyReport>,
    read: store::Result<Vec<f32>>,
}

/// Reads the dataset at `dir` every way a user can, checking that no allocation went over
/// the limit meanwhile.
fn read_every_way(dir: &Path) -> Outcome {
    let url = dir.to_str().unwrap();
    CountingAllocator::reset();
    let outcome = Outcome {
        info: store::info(url, &StoreOptions::default()),
        verified: store::verify(url, &StoreOptions::default(), 2),
        read: read_all(url),
    };
    let largest = CountingAllocator::largest();
    assert!(largest <= ALLOCATION_LIMIT, "an allocation of {largest} bytes while reading a damaged dataset");
    outcome
}

/// Errors about a damaged object must say which one.
fn assert_names_an_object(err: &Error, dir: &Path) {
    let text = err.to_string();
    let names_it = text.contains(dir.to_str().unwrap())
        || text.contains(".json")
        || text.contains(".parquet")
        || text.contains("shard");
    assert!(names_it, "the error names no object: {text}");
}

/// Mutations of a JSON record: one numeric leaf set to an extreme, one field removed, the text
/// truncated, or a byte overwritten.
#[derive(Clone, Debug)]
enum JsonMutation {
    SetNumber { leaf: usize, value: serde_json::Value },
    RemoveField { leaf: usize },
    Truncate { at: usize },
    OverwriteByte { at: usize, byte: u8 },
}

fn json_mutation() -> impl Strategy<Value = JsonMutation> {
    let extreme = prop_oneof![
        Just(serde_json::json!(0)),
        Just(serde_json::json!(1)),
        Just(serde_json::json!(-1)),
        Just(serde_json::json!(u32::MAX)),
        Just(serde_json::json!(1u64 << 32)),
        Just(serde_json::json!(1u64 << 40)),
        Just(serde_json::json!(1u64 << 62)),
        Just(serde_json::json!(u64::MAX)),
        Just(serde_json::json!(1e300)),
        Just(serde_json::json!("x")),
        Just(serde_json::json!([])),
    ];
    prop_oneof![
        (any::<usize>(), extreme).prop_map(|(leaf, value)| JsonMutation::SetNumber { leaf, value }),
        any::<usize>().prop_map(|leaf| JsonMutation::RemoveField { leaf }),
        any::<usize>().prop_map(|at| JsonMutation::Truncate { at }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| JsonMutation::OverwriteByte { at, byte }),
    ]
}

/// Paths (object keys and array indices) of every number in `value`, and of every object field.
fn leaves(
    value: &serde_json::Value,
    path: &mut Vec<serde_json::Value>,
    numbers: &mut Vec<Vec<serde_json::Value>>,
    fields: &mut Vec<Vec<serde_json::Value>>,
) {
    match value {
        serde_json::Value::Number(_) => numbers.push(path.clone()),
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                path.push(serde_json::json!(k));
                fields.push(path.clone());
                leaves(v, path, numbers, fields);
                path.pop();
            }
        }
        // Long arrays of sums: visit only the first items, so that the counts and sizes are
        // picked as often as the statistics.
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate().take(3) {
                path.push(serde_json::json!(i));
                leaves(v, path, numbers, fields);
                path.pop();
            }
        }
        _ => {}
    }
}

fn at_path<'a>(value: &'a mut serde_json::Value, path: &[serde_json::Value]) -> &'a mut serde_json::Value {
    path.iter().fold(value, |v, step| match step {
        serde_json::Value::String(k) => &mut v[k.as_str()],
        serde_json::Value::Number(i) => &mut v[i.as_u64().unwrap() as usize],
        _ => unreachable!(),
    })
}

fn mutate_json(bytes: &[u8], mutation: &JsonMutation) -> Vec<u8> {
    let mut value: serde_json::Value = serde_json::from_slice(bytes).unwrap();
    let (mut numbers, mut fields) = (Vec::new(), Vec::new());
    leaves(&value, &mut Vec::new(), &mut numbers, &mut fields);
    match mutation {
        JsonMutation::SetNumber { leaf, value: new } => {
            *at_path(&mut value, &numbers[leaf % numbers.len()]) = new.clone();
            serde_json::to_vec(&value).unwrap()
        }
        JsonMutation::RemoveField { leaf } => {
            let path = &fields[leaf % fields.len()];
            let (last, parent) = path.split_last().unwrap();
            if let Some(map) = at_path(&mut value, parent).as_object_mut() {
                map.remove(last.as_str().unwrap());
            }
            serde_json::to_vec(&value).unwrap()
        }
        JsonMutation::Truncate { at } => bytes[..at % bytes.len()].to_vec(),
        JsonMutation::OverwriteByte { at, byte } => {
            let mut out = bytes.to_vec();
            let at = at % out.len();
            out[at] = *byte;
            out
        }
    }
}

/// A damaged record is either refused naming an object, or (when the damage left it valid)
/// read in full: never a panic (proptest reports one as a failure), an abort or a huge
/// allocation (checked in [`read_every_way`]).
fn check_damaged_dataset(dir: &Path) {
    let outcome = read_every_way(dir);
    for err in [outcome.info.as_ref().err(), outcome.verified.as_ref().err(), outcome.read.as_ref().err()]
        .into_iter()
        .flatten()
    {
        assert_names_an_object(err, dir);
    }
    if let (Ok(info), Ok(values)) = (&outcome.info, &outcome.read) {
        // A read that succeeds returns what the manifest promises.
        assert_eq!(values.len() as u64, info.tokens * D_MODEL as u64, "rows read differ from the manifest's count");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn damaged_manifest_is_an_error_or_a_correct_read(mutation in json_mutation()) {
        let dir = copy_of_pristine();
        let path = dir.path().join("manifest.json");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, mutate_json(&bytes, &mutation)).unwrap();
        check_damaged_dataset(dir.path());
    }

    #[test]
    fn damaged_commit_record_or_header_is_an_error_or_a_correct_read(mutation in json_mutation(), pick in any::<usize>()) {
        // Without manifest.json the dataset is read from its header and commit records, as a
        // follow-mode reader and `info` of a dataset being written do.
        let dir = copy_of_pristine();
        std::fs::remove_file(dir.path().join("manifest.json")).unwrap();
        let mut records = files_under(dir.path(), "commits");
        records.push(dir.path().join("header.json"));
        let path = &records[pick % records.len()];
        let bytes = std::fs::read(path).unwrap();
        std::fs::write(path, mutate_json(&bytes, &mutation)).unwrap();
        let outcome = read_every_way(dir.path());
        if let Err(err) = &outcome.info {
            assert_names_an_object(err, dir.path());
        }
        let (manifest, _) = match store::load_manifest(dir.path().to_str().unwrap(), &StoreOptions::default()) {
            Ok(loaded) => loaded,
            Err(err) => {
                assert_names_an_object(&err, dir.path());
                return Ok(());
            }
        };
        prop_assert_eq!(manifest.shards.iter().map(|s| s.rows).sum::<u64>(), manifest.tokens);
    }

    #[test]
    fn damaged_shard_is_an_error_or_the_same_rows(pick in any::<usize>(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8), truncate in prop::option::of(any::<usize>())) {
        let dir = copy_of_pristine();
        let shards = files_under(dir.path(), "shards");
        let path = &shards[pick % shards.len()];
        let mut bytes = std::fs::read(path).unwrap();
        // Half the flips land in the last 256 bytes, where the Parquet footer is.
        for (i, (at, byte)) in flips.iter().enumerate() {
            let at = if i % 2 == 0 { at % bytes.len() } else { bytes.len() - 1 - at % 256.min(bytes.len()) };
            bytes[at] ^= byte | 1;
        }
        if let Some(at) = truncate {
            bytes.truncate(at % bytes.len());
        }
        std::fs::write(path, &bytes).unwrap();
        let outcome = read_every_way(dir.path());
        let info = outcome.info.expect("the manifest is intact");
        prop_assert_eq!(info.tokens, (SEQUENCES * CTX) as u64);
        match outcome.verified {
            Ok(report) => prop_assert!(!report.ok, "verify missed a damaged shard"),
            Err(err) => assert_names_an_object(&err, dir.path()),
        }
        match outcome.read {
            // Damage the reader cannot see (it trusts the stored checksums of what it decodes)
            // must not change a single value.
            Ok(values) => prop_assert!(values == *pristine_values(), "a damaged shard was read as different rows without an error"),
            Err(err) => assert_names_an_object(&err, dir.path()),
        }
    }
}

#[test]
fn forged_hook_width_in_the_header_is_refused_before_allocating() {
    let dir = copy_of_pristine();
    std::fs::remove_file(dir.path().join("manifest.json")).unwrap();
    let path = dir.path().join("header.json");
    let mut header: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    header["hooks"][0]["d_model"] = serde_json::json!(1u64 << 60);
    std::fs::write(&path, serde_json::to_vec(&header).unwrap()).unwrap();
    let err = store::info(dir.path().to_str().unwrap(), &StoreOptions::default()).unwrap_err();
    assert!(matches!(err, Error::BadMetadata { .. }), "{err}");
    assert!(err.to_string().contains("header.json") && err.to_string().contains("d_model"), "{err}");
}

#[test]
fn manifest_whose_shards_overflow_the_row_count_is_refused() {
    let dir = copy_of_pristine();
    let path = dir.path().join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for shard in manifest["shards"].as_array_mut().unwrap() {
        shard["rows"] = serde_json::json!(u64::MAX / 2 + 1);
    }
    std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let err = store::info(dir.path().to_str().unwrap(), &StoreOptions::default()).unwrap_err();
    assert!(err.to_string().contains("manifest.json"), "{err}");
}

#[test]
fn commit_record_with_a_key_outside_the_dataset_is_refused() {
    let dir = copy_of_pristine();
    std::fs::remove_file(dir.path().join("manifest.json")).unwrap();
    let path = files_under(dir.path(), "commits").remove(0);
    let mut record: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    record["shard"]["key"] = serde_json::json!("../../../etc/passwd");
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
    let err = store::info(dir.path().to_str().unwrap(), &StoreOptions::default()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("commits/") && text.contains("not a file under shards/"), "{text}");
}

#[test]
fn oversized_metadata_is_refused() {
    let dir = copy_of_pristine();
    let path = dir.path().join("manifest.json");
    // A sparse file just past the limit: refused by its size, before it is read.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(store::limits::MAX_METADATA_BYTES + 1)
        .unwrap();
    CountingAllocator::reset();
    let err = store::info(dir.path().to_str().unwrap(), &StoreOptions::default()).unwrap_err();
    assert!(CountingAllocator::largest() <= ALLOCATION_LIMIT, "the oversized manifest was read");
    assert!(err.to_string().contains("manifest.json") && err.to_string().contains("bytes"), "{err}");
}
