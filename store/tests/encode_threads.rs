//! Several encoding threads write the same bytes as one: the same rows written with 1 and with N
//! threads give identical shard files, commit records and manifest.
//!
//! Two datasets never share their dataset id (random, and written into every shard's footer) or
//! their shard keys' nonces, so the second dataset's are replaced by the first's before the
//! comparison; both are fixed-length hex, so no byte moves. The checksums in the commit records
//! and manifest are then recomputed from the replaced bytes.

mod common;

use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use store::{DatasetWriter, Dtype, Manifest, StoreOptions, WriterOptions};

/// Every object of the dataset at `url`, by key.
fn objects(url: &str) -> BTreeMap<String, Vec<u8>> {
    let loc = store::open_store_with(url, &StoreOptions::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    list_keys(url, &StoreOptions::default())
        .into_iter()
        .map(|k| {
            let bytes = rt.block_on(async {
                use object_store::ObjectStoreExt;
                loc.store.get(&loc.path(&k)).await.unwrap().bytes().await.unwrap()
            });
            (k, bytes.to_vec())
        })
        .collect()
}

fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = haystack.to_vec();
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
    out
}

/// The objects of `b` with its dataset id, shard keys and checksums replaced by those of `a`
/// (shard for shard, in manifest order), after checking that each of `b`'s checksums was right.
fn as_if_written_by(a: &Manifest, b: &Manifest, b_objects: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, Vec<u8>> {
    assert_eq!(a.shards.len(), b.shards.len(), "shard counts differ");
    let mut swaps: Vec<(String, String)> = vec![(b.dataset_id.clone(), a.dataset_id.clone())];
    for (sa, sb) in a.shards.iter().zip(&b.shards) {
        let digest = format!("sha256:{:x}", Sha256::digest(&b_objects[&sb.key]));
        assert_eq!(digest, sb.checksum, "{}: the checksum must match the object", sb.key);
        swaps.push((sb.key.clone(), sa.key.clone()));
        swaps.push((sb.checksum.clone(), sa.checksum.clone()));
        swaps.push((
            format!("\"footer_crc32c\": {},", sb.footer_crc32c),
            format!("\"footer_crc32c\": {},", sa.footer_crc32c),
        ));
        swaps.push((
            format!("\"footer_crc32c\":{},", sb.footer_crc32c),
            format!("\"footer_crc32c\":{},", sa.footer_crc32c),
        ));
    }
    let swap = |bytes: &[u8]| {
        swaps.iter().fold(bytes.to_vec(), |acc, (from, to)| {
            if from.len() == to.len() {
                replace_all(&acc, from.as_bytes(), to.as_bytes())
            } else {
                // Only the footer CRCs' decimal text can differ in length.
                String::from_utf8(acc).unwrap().replace(from.as_str(), to).into_bytes()
            }
        })
    };
    b_objects
        .iter()
        .filter(|(k, _)| !k.starts_with("probes/"))
        .map(|(k, v)| {
            let key = swaps.iter().fold(k.clone(), |acc, (from, to)| acc.replace(from.as_str(), to));
            // Shard files are binary: only the dataset id is replaced in them.
            let body = if k.ends_with(".parquet") {
                replace_all(v, b.dataset_id.as_bytes(), a.dataset_id.as_bytes())
            } else {
                swap(v)
            };
            (key, body)
        })
        .collect()
}

struct Case {
    hooks: Vec<(&'static str, usize)>,
    ctx: usize,
    batches: Vec<usize>,
    row_group_rows: usize,
    shard_bytes: u64,
    dtype: Dtype,
}

fn write(url: &str, case: &Case, threads: usize) -> Manifest {
    let opts = WriterOptions {
        dtype: case.dtype,
        row_group_rows: case.row_group_rows,
        shard_bytes: Some(case.shard_bytes),
        encode_threads: threads,
        ..Default::default()
    };
    let mut w = DatasetWriter::create(url, header(&case.hooks, case.ctx), opts).unwrap();
    let mut seq = 0;
    for &nseq in &case.batches {
        w.append(synth(seq, nseq, case.ctx, &case.hooks)).unwrap();
        seq += nseq as u64;
    }
    w.finish().unwrap()
}

/// Writes `case` with 1 and with `threads` threads and asserts the two datasets are the same bytes.
fn assert_same_bytes(one_url: &str, many_url: &str, case: &Case, threads: usize) -> usize {
    let one = write(one_url, case, 1);
    let many = write(many_url, case, threads);
    let one_objects: BTreeMap<_, _> = objects(one_url).into_iter().filter(|(k, _)| !k.starts_with("probes/")).collect();
    let many_objects = as_if_written_by(&one, &many, &objects(many_url));
    assert_eq!(one_objects.keys().collect::<Vec<_>>(), many_objects.keys().collect::<Vec<_>>());
    for (key, bytes) in &one_objects {
        assert!(&many_objects[key] == bytes, "{key} differs between 1 and {threads} encoding threads");
    }
    one.shards.len()
}

#[test]
fn one_and_four_encoding_threads_write_identical_shards_and_manifest() {
    let dir = TempDir::new("encode-threads");
    let case = Case {
        hooks: vec![("blocks.1.hook_resid_post", 48), ("blocks.2.hook_resid_post", 20)],
        ctx: 33,
        // Batches that do not line up with row groups, and a last row group that is partial.
        batches: vec![3, 1, 7, 2, 11, 5, 1, 9],
        row_group_rows: 40,
        shard_bytes: 9_000,
        dtype: Dtype::Bf16,
    };
    let url = |name: &str| format!("file://{}/{name}", dir.path().display());
    let shards = assert_same_bytes(&url("one"), &url("four"), &case, 4);
    assert!(shards >= 3, "several shards, so that row groups cross shard boundaries: {shards}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn any_thread_count_writes_the_same_bytes(
        batches in proptest::collection::vec(1usize..6, 1..8),
        row_group_rows in 1usize..50,
        shard_bytes in 500u64..20_000,
        threads in 2usize..6,
        dtype in prop_oneof![Just(Dtype::Bf16), Just(Dtype::F16), Just(Dtype::F32)],
    ) {
        let case = Case { hooks: vec![("h", 16)], ctx: 9, batches, row_group_rows, shard_bytes, dtype };
        let id = unique("threads");
        assert_same_bytes(&format!("memory://{id}/one"), &format!("memory://{id}/many"), &case, threads);
    }
}
