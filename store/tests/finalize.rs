//! Fan-out commits cannot lose rows: finalize waits for every worker, a late commit fails, and a
//! store that ignores conditional create is named at start-up.

mod common;

use common::*;
use store::{finalize, info, verify, DatasetWriter, Error, WriterOptions};

const HOOKS: [(&str, usize); 1] = [("h", 8)];

fn writer(b: &Backend, worker: &str) -> DatasetWriter {
    writer_with_shards_of(b, worker, 500)
}

fn writer_with_shards_of(b: &Backend, worker: &str, shard_bytes: u64) -> DatasetWriter {
    let opts = WriterOptions {
        worker: worker.to_string(),
        row_group_rows: 20,
        shard_bytes: Some(shard_bytes),
        store: b.opts.clone(),
        ..Default::default()
    };
    DatasetWriter::create(&b.url, header(&HOOKS, 20), opts).unwrap()
}

fn refused(b: &Backend, workers: Option<usize>) -> String {
    match finalize(&b.url, &b.opts, workers) {
        Err(e @ Error::FinalizeRefused { .. }) => e.to_string(),
        other => panic!("{}: finalize should refuse, got {other:?}", b.name),
    }
}

#[test]
fn a_worker_that_committed_but_never_finished_blocks_finalize() {
    for b in backends("unfinished") {
        // Worker 0 of 2 commits a few shards, then dies (dropped without finishing); worker 1
        // never runs.
        let mut w0 = writer(&b, "w0");
        w0.append(synth(0, 10, 20, &HOOKS)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(w0);
        let before = info(&b.url, &b.opts).unwrap();
        assert!(before.shards > 0 && !before.is_final, "{}", b.name);
        for workers in [None, Some(2)] {
            let msg = refused(&b, workers);
            assert!(msg.contains("w0") && msg.contains("never finished"), "{}: {msg}", b.name);
        }
        // Nothing was touched: the committed shards are all still there.
        let after = info(&b.url, &b.opts).unwrap();
        assert_eq!((after.shards, after.tokens, after.is_final), (before.shards, before.tokens, false));
    }
}

#[test]
fn finalize_waits_for_every_declared_worker() {
    for b in backends("declared") {
        let mut w0 = writer(&b, "w0");
        w0.append(synth(0, 3, 20, &HOOKS)).unwrap();
        w0.finish_part(2).unwrap();
        let msg = refused(&b, None);
        assert!(msg.contains("only 1 of 2 workers"), "{}: {msg}", b.name);
        let msg = refused(&b, Some(3));
        assert!(msg.contains("not the 3"), "{}: {msg}", b.name);
        let mut w1 = writer(&b, "w1");
        w1.append(synth(100, 2, 20, &HOOKS)).unwrap();
        w1.finish_part(2).unwrap();
        let m = finalize(&b.url, &b.opts, Some(2)).unwrap();
        assert_eq!(m.tokens, 5 * 20, "{}", b.name);
    }
}

#[test]
fn a_worker_that_commits_after_finalize_fails_and_its_shard_stays() {
    for b in backends("late") {
        // Large shards: the late worker's rows stay in its open shard until it finishes.
        let mut late = writer_with_shards_of(&b, "w1", 1 << 20);
        late.append(synth(100, 4, 20, &HOOKS)).unwrap();
        let mut w0 = writer_with_shards_of(&b, "w0", 1 << 20);
        w0.append(synth(0, 3, 20, &HOOKS)).unwrap();
        w0.finish_part(1).unwrap();
        let m = finalize(&b.url, &b.opts, None).unwrap();
        assert_eq!(m.tokens, 3 * 20);
        let err = late.finish_part(1).unwrap_err().to_string();
        assert!(
            err.contains("manifest.json") && err.contains("finalized before worker `w1` committed"),
            "{}: {err}",
            b.name
        );
        // The dataset is exactly as finalized: the late worker withdrew its commit and its shard.
        assert_eq!(info(&b.url, &b.opts).unwrap().tokens, 3 * 20);
        let keys = list_keys(&b.url, &b.opts);
        let parquet = keys.iter().filter(|k| k.ends_with(".parquet")).count();
        assert_eq!(parquet, m.shards.len(), "{}: {keys:?}", b.name);
        assert!(keys.iter().all(|k| !k.starts_with("commits/w1/")), "{}: {keys:?}", b.name);
        let v = verify(&b.url, &b.opts, 2).unwrap();
        assert!(v.ok, "{}: {v:?}", b.name);
    }
}

#[test]
fn a_store_that_ignores_conditional_create_is_named_at_start_up() {
    let direct =
        writer(&Backend { name: "s3-moto", url: moto().url("probe-ok"), opts: moto().options(3), _dir: None }, "w0");
    assert!(direct.conditional_create_honoured());
    let proxy = Proxy::start(moto().port);
    proxy.strip_header("If-None-Match");
    let opts = s3_options(&proxy.endpoint(), "test", "test", 3);
    let url = moto().url("probe-ignored");
    let ignoring = writer(&Backend { name: "s3-ignoring", url: url.clone(), opts, _dir: None }, "w0");
    assert!(!ignoring.conditional_create_honoured());
    // The probe cleans up after itself.
    let keys = list_keys(&url, &moto().options(3));
    assert!(keys.iter().all(|k| !k.contains("probes/")), "{keys:?}");
}

#[test]
fn a_worker_asking_for_another_dataset_is_refused_naming_each_difference() {
    for b in backends("join") {
        let mut w0 = writer(&b, "w0");
        w0.append(synth(0, 2, 20, &HOOKS)).unwrap();
        let opts =
            WriterOptions { worker: "w1".into(), row_group_rows: 10, store: b.opts.clone(), ..Default::default() };
        let err = match DatasetWriter::create(&b.url, header(&HOOKS, 30), opts) {
            Err(e @ Error::AlreadyExists { .. }) => e.to_string(),
            Err(other) => panic!("{}: another error: {other}", b.name),
            Ok(_) => panic!("{}: a worker joined a different dataset", b.name),
        };
        assert!(err.contains("context_len: there 20, here 30"), "{}: {err}", b.name);
        assert!(err.contains("encoding.row_group_rows: there 20, here 10"), "{}: {err}", b.name);
        w0.finish().unwrap();
        assert_eq!(info(&b.url, &b.opts).unwrap().tokens, 2 * 20, "{}", b.name);
    }
}
