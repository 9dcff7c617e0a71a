//! Write then read back on memory://, file:// and S3 (moto_server on loopback).

mod common;

use std::collections::BTreeSet;

use common::*;
use store::reader::{OutputDtype, Reader, ReaderOptions};
use store::{finalize, info, verify, DatasetWriter, Dtype, Error, Manifest, WriterOptions};

const HOOKS: [(&str, usize); 2] = [("blocks.3.hook_resid_post", 16), ("blocks.5.hook_resid_post", 24)];
const CTX: usize = 32;

fn list_parquet(url: &str, opts: &store::StoreOptions) -> BTreeSet<String> {
    list_keys(url, opts).into_iter().filter(|k| k.ends_with(".parquet")).collect()
}

#[test]
fn roundtrip_on_every_backend() {
    for b in backends("roundtrip") {
        eprintln!("backend {}", b.name);
        let m = write_dataset(&b);
        check_hook_statistics(&m);
        read_back_f32_with_tokens(&b);
        read_back_stored_dtype(&b);
        check_info_verify_and_finality(&b, &m);
    }
}

/// Rows in the round-trip dataset: `NSEQ` sequences of `CTX` tokens.
const NSEQ: usize = 40;
const ROWS: u64 = (NSEQ * CTX) as u64;

/// Writes the round-trip dataset in appends of 3 sequences; its shards tile the rows and are
/// exactly the `.parquet` objects.
fn write_dataset(b: &Backend) -> Manifest {
    let opts = WriterOptions {
        row_group_rows: 100, // does not divide the context length: row groups straddle sequences
        shard_bytes: Some(6_000),
        store: b.opts.clone(),
        ..Default::default()
    };
    let mut w = DatasetWriter::create(&b.url, header(&HOOKS, CTX), opts).unwrap();
    for s in (0..NSEQ).step_by(3) {
        w.append(synth(s as u64, 3.min(NSEQ - s), CTX, &HOOKS)).unwrap();
    }
    let m = w.finish().unwrap();
    assert_eq!(m.tokens, ROWS, "{}", b.name);
    assert!(m.shards.len() >= 3, "{}: {} shards", b.name, m.shards.len());
    let mut first = 0;
    for s in &m.shards {
        assert_eq!(s.first_row, first);
        assert_eq!(s.row_groups.iter().sum::<u64>(), s.rows);
        first += s.rows;
    }
    // The .parquet objects are exactly the listed shards.
    let listed: BTreeSet<String> = m.shards.iter().map(|s| s.key.clone()).collect();
    assert_eq!(list_parquet(&b.url, &b.opts), listed, "{}", b.name);
    m
}

/// The manifest's per-hook mean and mean squared norm, over the stored (bf16) values.
fn check_hook_statistics(m: &Manifest) {
    for (hi, (name, d)) in HOOKS.iter().enumerate() {
        let mut sum = vec![0f64; *d];
        let mut sq = 0f64;
        for s in 0..NSEQ as u64 {
            for p in 0..CTX as u32 {
                let v = stored_values(Dtype::Bf16, hi, s, p, *d);
                for (a, x) in sum.iter_mut().zip(&v) {
                    *a += *x as f64;
                }
                sq += v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
            }
        }
        let h = m.hook(name).unwrap();
        assert_eq!(h.d_model, *d);
        for (a, b) in h.mean.iter().zip(&sum) {
            assert!((a - b / ROWS as f64).abs() < 1e-9, "mean {a} vs {}", b / ROWS as f64);
        }
        assert!((h.mean_sq_norm - sq / ROWS as f64).abs() < 1e-6 * sq / ROWS as f64);
    }
}

/// Reads back in stored order, f32, with tokens; a batch size that divides nothing.
fn read_back_f32_with_tokens(b: &Backend) {
    let mut ro = ReaderOptions::new(HOOKS[1].0, 77);
    ro.shuffle = false;
    ro.drop_last = false;
    ro.epochs = Some(1);
    ro.output = OutputDtype::F32;
    ro.with_tokens = true;
    ro.store = b.opts.clone();
    let reader = Reader::open(&b.url, ro).unwrap();
    assert_eq!(reader.d_model(), 24);
    let mut n = 0u64;
    for batch in reader {
        let batch = batch.unwrap();
        assert_eq!(batch.d, 24);
        assert_eq!(batch.dtype, Dtype::F32);
        let vals = f32s(&batch.bytes);
        let t = batch.tokens.as_ref().unwrap();
        for r in 0..batch.rows {
            let (seq, pos) = ((n / CTX as u64), (n % CTX as u64) as u32);
            assert_eq!((t.sequence_id[r], t.position[r]), (seq, pos), "row {n}");
            assert_eq!(t.token_id[r], ((seq * 31 + pos as u64 * 7) % 49152) as u32);
            assert_eq!(&vals[r * 24..(r + 1) * 24], &stored_values(Dtype::Bf16, 1, seq, pos, 24)[..], "row {n}");
            n += 1;
        }
    }
    assert_eq!(n, ROWS, "{}", b.name);
}

/// Reads back in the stored dtype: the raw bf16 bytes.
fn read_back_stored_dtype(b: &Backend) {
    let mut ro = ReaderOptions::new(HOOKS[0].0, 640);
    ro.shuffle = false;
    ro.epochs = Some(1);
    ro.store = b.opts.clone();
    let first = Reader::open(&b.url, ro).unwrap().next().unwrap().unwrap();
    assert_eq!((first.rows, first.d, first.dtype), (640, 16, Dtype::Bf16));
    let mut want = Vec::new();
    for r in 0..640u64 {
        Dtype::Bf16.encode_f32(&row_values(0, r / CTX as u64, (r % CTX as u64) as u32, 16), &mut want);
    }
    assert_eq!(first.bytes, want);
}

/// `info` and `verify` agree with the manifest; a final dataset is neither finalized nor
/// written again.
fn check_info_verify_and_finality(b: &Backend, m: &Manifest) {
    let i = info(&b.url, &b.opts).unwrap();
    assert!(i.is_final);
    assert_eq!((i.tokens, i.shards, i.bytes, i.dtype), (ROWS, m.shards.len(), m.bytes, Dtype::Bf16));
    assert_eq!(i.hooks.iter().map(|h| (h.name.as_str(), h.d_model)).collect::<Vec<_>>(), HOOKS.to_vec());
    let json = serde_json::to_value(&i).unwrap();
    for k in ["tokens", "hooks", "dtype", "shards", "bytes"] {
        assert!(json.get(k).is_some(), "info JSON lacks {k}");
    }
    let v = verify(&b.url, &b.opts, 4).unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.shards_checked, m.shards.len());

    // The manifest is created once: a second finalize is refused.
    match finalize(&b.url, &b.opts, None) {
        Err(Error::AlreadyExists { location, .. }) => {
            assert!(location.ends_with("manifest.json"))
        }
        other => panic!("{}: second finalize: {other:?}", b.name),
    }
    // ... and so is writing into a final dataset.
    let e = DatasetWriter::create(
        &b.url,
        header(&HOOKS, CTX),
        WriterOptions { store: b.opts.clone(), ..Default::default() },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("already final"), "{e}");
}

#[test]
fn every_dtype_roundtrips_exactly() {
    for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
        let url = format!("memory://{}/ds", unique("dtypes"));
        let hooks = [("h", 40)];
        let opts = WriterOptions { dtype, row_group_rows: 64, ..Default::default() };
        let mut w = DatasetWriter::create(&url, header(&hooks, 16), opts).unwrap();
        w.append(synth(0, 10, 16, &hooks)).unwrap();
        let m = w.finish().unwrap();
        assert_eq!(m.dtype, dtype);
        let mut ro = ReaderOptions::new("h", 160);
        ro.shuffle = false;
        ro.epochs = Some(1);
        ro.output = OutputDtype::F32;
        let got: Vec<f32> = Reader::open(&url, ro).unwrap().flat_map(|b| f32s(&b.unwrap().bytes)).collect();
        let mut want = Vec::new();
        for s in 0..10 {
            for p in 0..16 {
                want.extend(stored_values(dtype, 0, s, p, 40));
            }
        }
        assert_eq!(got, want, "{dtype:?}");
        if dtype == Dtype::F32 {
            // f32 is lossless against the input.
            assert_eq!(&got[..40], &row_values(0, 0, 0, 40)[..]);
        }
    }
}

#[test]
fn several_workers_merge_into_one_manifest() {
    for b in backends("workers") {
        let hooks = [("h", 8)];
        let mut counts = 0u64;
        for (wi, worker) in ["wa", "wb", "wc"].iter().enumerate() {
            let opts = WriterOptions {
                worker: worker.to_string(),
                row_group_rows: 50,
                shard_bytes: Some(1500),
                store: b.opts.clone(),
                ..Default::default()
            };
            let mut w = DatasetWriter::create(&b.url, header(&hooks, 20), opts).unwrap();
            w.append(synth(wi as u64 * 1000, 5 + wi, 20, &hooks)).unwrap();
            counts += ((5 + wi) * 20) as u64;
            let recs = w.finish_part(3).unwrap();
            assert!(recs.iter().all(|r| &r.worker == worker));
            assert_eq!(recs.iter().map(|r| r.shard.rows).sum::<u64>(), ((5 + wi) * 20) as u64);
        }
        // Not final yet: info reports the committed shards.
        let i = info(&b.url, &b.opts).unwrap();
        assert!(!i.is_final);
        assert_eq!(i.tokens, counts);
        let m = finalize(&b.url, &b.opts, Some(3)).unwrap();
        assert_eq!(m.tokens, counts);
        let seqs: Vec<u64> = m.shards.iter().map(|s| s.sequence_ids[0]).collect();
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(seqs, sorted, "shards are merged in (worker, seq) order");
        assert!(verify(&b.url, &b.opts, 2).unwrap().ok);
    }
}

#[test]
fn two_writers_with_one_worker_id_cannot_both_commit() {
    for b in backends("race") {
        let hooks = [("h", 8)];
        let mk = || {
            DatasetWriter::create(
                &b.url,
                header(&hooks, 20),
                WriterOptions { row_group_rows: 50, store: b.opts.clone(), ..Default::default() },
            )
            .unwrap()
        };
        let (mut w1, mut w2) = (mk(), mk());
        w1.append(synth(0, 3, 20, &hooks)).unwrap();
        w2.append(synth(100, 3, 20, &hooks)).unwrap();
        w1.finish_part(1).unwrap();
        let e = w2.finish_worker().unwrap_err().to_string();
        assert!(e.contains("already exists") && e.contains("worker id `w0`"), "{}: {e}", b.name);
        // Finalize keeps the first writer's shard and removes the loser's orphaned object.
        let m = finalize(&b.url, &b.opts, None).unwrap();
        assert_eq!(m.shards.len(), 1);
        assert_eq!(m.shards[0].sequence_ids, [0, 2]);
        assert_eq!(list_parquet(&b.url, &b.opts).len(), 1, "{}", b.name);
    }
}
