//! Failure behaviour: a killed writer, a flipped byte, an unknown format version.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use store::reader::{Reader, ReaderOptions};
use store::{info, open_store_with, verify, DatasetWriter, StoreOptions, WriterOptions};

fn list_all(url: &str, opts: &StoreOptions) -> BTreeSet<String> {
    list_keys(url, opts)
}

const KILL_HOOKS: [(&str, usize); 1] = [("h", 512)];
const KILL_CTX: usize = 128;

fn kill_opts(store: StoreOptions) -> WriterOptions {
    // 6 MiB shards of ~1 KiB rows (bf16 noise hardly compresses): the shard in progress when
    // the writer is killed has already sent a 5 MiB multipart part.
    WriterOptions { row_group_rows: 1024, shard_bytes: Some(6 << 20), store, ..Default::default() }
}

/// Run as a child process by `killed_writer_leaves_nothing_incomplete_referenced`: writes one
/// full shard and most of a second one, announces it, then waits to be killed.
#[test]
#[ignore]
fn child_writer() {
    let Ok(url) = std::env::var("SAE_TEST_CHILD_URL") else {
        return;
    };
    let marker = std::env::var("SAE_TEST_CHILD_MARKER").unwrap();
    let store = match std::env::var("SAE_TEST_CHILD_S3") {
        Ok(endpoint) => s3_options(&endpoint, "test", "test", 3),
        Err(_) => StoreOptions::default(),
    };
    let mut w = DatasetWriter::create(&url, header(&KILL_HOOKS, KILL_CTX), kill_opts(store)).unwrap();
    // ~1.02 KiB per stored row: 6 MiB + 1 row group commits shard 0; 5.5 MiB more fills a part.
    let seqs = (6 << 20) / (KILL_CTX * 1040) + 8 + (11 << 19) / (KILL_CTX * 1040);
    for s in 0..seqs {
        w.append(synth(s as u64, 1, KILL_CTX, &KILL_HOOKS)).unwrap();
    }
    std::thread::sleep(Duration::from_secs(2)); // let the encoder and uploads catch up
    std::fs::write(&marker, seqs.to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn killed_writer_leaves_nothing_incomplete_referenced() {
    let dir = TempDir::new("killed");
    let cases = [
        ("file", format!("file://{}/ds", dir.path().display()), StoreOptions::default(), None),
        ("s3-moto", moto().url("killed"), moto().options(3), Some(moto().endpoint.clone())),
    ];
    for (name, url, store, s3) in cases {
        let marker = dir.path().join(format!("marker-{name}"));
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["child_writer", "--exact", "--ignored", "--nocapture"])
            .env("SAE_TEST_CHILD_URL", &url)
            .env("SAE_TEST_CHILD_MARKER", &marker);
        if let Some(e) = &s3 {
            cmd.env("SAE_TEST_CHILD_S3", e);
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !marker.exists() {
            assert!(Instant::now() < deadline, "{name}: child writer never got mid-shard");
            assert!(child.try_wait().unwrap().is_none(), "{name}: child writer exited early");
            std::thread::sleep(Duration::from_millis(100));
        }
        child.kill().unwrap(); // SIGKILL, mid-shard
        child.wait().unwrap();
        let written_seqs: u64 = std::fs::read_to_string(&marker).unwrap().parse().unwrap();
        // Prove the kill came mid-shard: an upload with a part sent was in progress.
        if name == "file" {
            let files: Vec<String> = std::fs::read_dir(dir.path().join("ds/shards"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert!(files.iter().any(|f| f.starts_with("w0-00000001-") && f.contains(".parquet#")), "{files:?}");
            // Make the killed upload's staging files as old as a real abandoned upload's, so
            // finalize takes them for dead rather than in flight.
            let long_ago = std::time::SystemTime::now() - store::STALE_STAGING_AGE - Duration::from_secs(60);
            for f in files.iter().filter(|f| f.contains(".parquet#")) {
                let file = std::fs::File::options().write(true).open(dir.path().join("ds/shards").join(f)).unwrap();
                file.set_modified(long_ago).unwrap();
            }
        } else {
            let uploads = http_response(moto().port, "GET", &format!("/{}?uploads", moto().bucket));
            let prefix = url.rsplit('/').next().unwrap();
            assert!(uploads.contains(&format!("<Key>{prefix}/shards/w0-00000001-")), "{uploads}");
        }

        // Killed: not final, one committed shard; no .parquet object besides committed ones.
        let i = info(&url, &store).unwrap();
        assert!(!i.is_final, "{name}");
        assert_eq!(i.shards, 1, "{name}: exactly the first shard was committed");
        let objects = list_all(&url, &store);
        let parquet: Vec<_> = objects.iter().filter(|k| k.ends_with(".parquet")).collect();
        assert_eq!(parquet.len(), 1, "{name}: {objects:?}");
        assert!(
            Reader::open(&url, ReaderOptions::new("h", 16)).is_err(),
            "a plain reader refuses a dataset that is not final"
        );

        // Resume: the same worker id continues after its committed shard.
        let mut w = DatasetWriter::create(&url, header(&KILL_HOOKS, KILL_CTX), kill_opts(store.clone())).unwrap();
        assert_eq!(w.committed().len(), 1);
        let committed_rows = w.committed_rows();
        assert!(committed_rows > 0 && committed_rows < written_seqs * KILL_CTX as u64);
        let next = w.committed()[0].shard.sequence_ids[1] + 1;
        for s in next..next + 3 {
            w.append(synth(s, 1, KILL_CTX, &KILL_HOOKS)).unwrap();
        }
        let m = w.finish().unwrap();
        assert_eq!(m.tokens, committed_rows + 3 * KILL_CTX as u64, "{name}");
        let v = verify(&url, &store, 2).unwrap();
        assert!(v.ok, "{name}: {v:?}");
        let listed: BTreeSet<String> = m.shards.iter().map(|s| s.key.clone()).collect();
        let parquet: BTreeSet<String> =
            list_all(&url, &store).into_iter().filter(|k| k.ends_with(".parquet")).collect();
        assert_eq!(parquet, listed, "{name}");
        if name == "file" {
            // finalize also removed the local staging file of the killed upload.
            let files = std::fs::read_dir(dir.path().join("ds/shards")).unwrap().count();
            assert_eq!(files, listed.len());
        }
        // And the data read back is exactly what the manifest says.
        let mut o = ReaderOptions::new("h", 128);
        o.shuffle = false;
        o.epochs = Some(1);
        o.drop_last = false;
        o.with_tokens = true;
        o.store = store.clone();
        let rows: u64 = Reader::open(&url, o).unwrap().map(|b| b.unwrap().rows as u64).sum();
        assert_eq!(rows, m.tokens);
    }
}

#[test]
fn finalize_removes_uncommitted_shard_objects() {
    for b in backends("orphans") {
        let hooks = [("h", 8)];
        let mut w = DatasetWriter::create(
            &b.url,
            header(&hooks, 10),
            WriterOptions { store: b.opts.clone(), ..Default::default() },
        )
        .unwrap();
        w.append(synth(0, 5, 10, &hooks)).unwrap();
        // A complete shard whose writer died before committing it.
        let loc = open_store_with(&b.url, &b.opts).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            use object_store::ObjectStoreExt;
            loc.store
                .put(&loc.path("shards/w7-00000000-deadbeef.parquet"), bytes::Bytes::from_static(b"PAR1 orphan").into())
                .await
                .unwrap();
        });
        let m = w.finish().unwrap();
        let parquet: Vec<_> = list_all(&b.url, &b.opts).into_iter().filter(|k| k.ends_with(".parquet")).collect();
        assert_eq!(parquet, m.shards.iter().map(|s| s.key.clone()).collect::<Vec<_>>(), "{}", b.name);
    }
}

#[test]
fn a_flipped_byte_fails_verify_and_read_naming_the_shard() {
    let dir = TempDir::new("flip");
    let url = format!("file://{}/ds", dir.path().display());
    let hooks = [("h", 64)];
    let mut w = DatasetWriter::create(
        &url,
        header(&hooks, 32),
        WriterOptions { row_group_rows: 64, shard_bytes: Some(20_000), ..Default::default() },
    )
    .unwrap();
    w.append(synth(0, 40, 32, &hooks)).unwrap();
    let m = w.finish().unwrap();
    assert!(m.shards.len() >= 3);
    let bad = &m.shards[1];
    for (what, offset) in [("data", bad.bytes / 2), ("footer", bad.bytes - bad.footer_len / 2)] {
        let path = dir.path().join("ds").join(&bad.key);
        let mut data = std::fs::read(&path).unwrap();
        data[offset as usize] ^= 0x10;
        std::fs::write(&path, &data).unwrap();

        let v = verify(&url, &StoreOptions::default(), 2).unwrap();
        assert!(!v.ok, "{what}");
        assert_eq!(v.bad_shards.len(), 1, "{what}: {v:?}");
        assert_eq!(v.bad_shards[0].key, bad.key);
        assert!(v.bad_shards[0].problems.iter().any(|p| p.contains("checksum")), "{what}: {v:?}");

        let mut o = ReaderOptions::new("h", 64);
        o.shuffle = false;
        o.epochs = Some(1);
        o.with_tokens = true; // every column is read, so every data byte is checked
        let err = Reader::open(&url, o).unwrap().find_map(|b| b.err()).expect("reading must fail");
        let msg = err.to_string();
        assert!(msg.contains(&bad.key) && msg.contains("CRC-32C"), "{what}: {msg}");

        data[offset as usize] ^= 0x10; // repair for the next case
        std::fs::write(&path, &data).unwrap();
        assert!(verify(&url, &StoreOptions::default(), 2).unwrap().ok);
    }
}

#[test]
fn an_unknown_format_version_is_refused_clearly() {
    let dir = TempDir::new("version");
    let url = format!("file://{}/ds", dir.path().display());
    let hooks = [("h", 8)];
    let mut w = DatasetWriter::create(&url, header(&hooks, 10), WriterOptions::default()).unwrap();
    w.append(synth(0, 2, 10, &hooks)).unwrap();
    w.finish().unwrap();
    let path = dir.path().join("ds/manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"format_version\": 1"));
    std::fs::write(&path, text.replacen("\"format_version\": 1", "\"format_version\": 7", 1)).unwrap();
    for e in [
        Reader::open(&url, ReaderOptions::new("h", 4)).err().unwrap().to_string(),
        info(&url, &StoreOptions::default()).err().unwrap().to_string(),
        verify(&url, &StoreOptions::default(), 1).err().unwrap().to_string(),
    ] {
        assert!(e.contains("format_version 7") && e.contains("only version 1"), "{e}");
    }
}
