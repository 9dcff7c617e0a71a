//! S3 specifics against real servers on loopback: retries through a fault-injecting proxy,
//! giving up clearly, and SigV4 credentials checked by s3s-fs.

mod common;

use common::*;
use store::reader::{Reader, ReaderOptions};
use store::{info, verify, DatasetWriter, WriterOptions};

const HOOKS: [(&str, usize); 1] = [("h", 32)];

fn write(url: &str, store: &store::StoreOptions, nseq: u64) -> store::Result<store::Manifest> {
    let opts =
        WriterOptions { row_group_rows: 64, shard_bytes: Some(8_000), store: store.clone(), ..Default::default() };
    let mut w = DatasetWriter::create(url, header(&HOOKS, 16), opts)?;
    w.append(synth(0, nseq as usize, 16, &HOOKS))?;
    w.finish()
}

fn read_all(url: &str, store: &store::StoreOptions) -> store::Result<u64> {
    let mut o = ReaderOptions::new("h", 64);
    o.shuffle = false;
    o.epochs = Some(1);
    o.drop_last = false;
    o.store = store.clone();
    let mut n = 0;
    for b in Reader::open(url, o)? {
        n += b?.rows as u64;
    }
    Ok(n)
}

#[test]
fn retries_get_past_503s_and_dropped_connections() {
    let proxy = Proxy::start(moto().port);
    let store = s3_options(&proxy.endpoint(), "test", "test", 3);
    let url = moto().url("retry");
    // Two 503s on the first requests (header creation), then two more on PUTs mid-write.
    proxy.set(Fault::Http503(2), None);
    let mut w = DatasetWriter::create(
        &url,
        header(&HOOKS, 16),
        WriterOptions { row_group_rows: 64, shard_bytes: Some(8_000), store: store.clone(), ..Default::default() },
    )
    .unwrap();
    assert_eq!(proxy.injected(), 2);
    proxy.set(Fault::Http503(2), Some("PUT"));
    w.append(synth(0, 40, 16, &HOOKS)).unwrap();
    let m = w.finish().unwrap();
    assert_eq!(proxy.injected(), 4);
    assert_eq!(m.tokens, 640);
    // Dropped connections on reads (range GETs are idempotent, so they are retried).
    proxy.set(Fault::Drop(3), Some("GET"));
    assert_eq!(read_all(&url, &store).unwrap(), 640);
    assert_eq!(proxy.injected(), 7);
    assert!(verify(&url, &store, 2).unwrap().ok);
}

#[test]
fn giving_up_is_reported_clearly() {
    let proxy = Proxy::start(moto().port);
    let store = s3_options(&proxy.endpoint(), "test", "test", 2);
    let url = moto().url("giveup");
    write(&url, &moto().options(2), 20).unwrap();
    // Every request fails: opening reports the manifest, the status and the retries.
    proxy.set(Fault::Http503(usize::MAX), None);
    let e = info(&url, &store).unwrap_err().to_string();
    eprintln!("gave up: {e}");
    assert!(e.contains("manifest.json") && e.contains("503") && e.contains("after 2 retries"), "{e}");
    // Reads that start fine and then fail name the shard.
    proxy.set(Fault::Pass, None);
    let mut o = ReaderOptions::new("h", 64);
    o.store = store.clone();
    let r = Reader::open(&url, o).unwrap();
    proxy.set(Fault::Http503(usize::MAX), None);
    let e = r.take(3).find_map(|b| b.err()).expect("must fail").to_string();
    assert!(e.contains("shards/w0-") && e.contains("503"), "{e}");
    // A writer whose uploads keep failing reports the shard and gives up.
    let url2 = moto().url("giveup-write");
    proxy.set(Fault::Pass, None);
    let mut w = DatasetWriter::create(
        &url2,
        header(&HOOKS, 16),
        WriterOptions { row_group_rows: 64, store: store.clone(), ..Default::default() },
    )
    .unwrap();
    proxy.set(Fault::Http503(usize::MAX), Some("PUT"));
    w.append(synth(0, 10, 16, &HOOKS)).unwrap();
    let e = w.finish().unwrap_err().to_string();
    eprintln!("writer gave up: {e}");
    assert!(e.contains("503") && e.contains("shards/w0-00000000"), "{e}");
    // The failed shard's multipart upload was aborted: none is left open on the server.
    let prefix = url2.rsplit('/').next().unwrap();
    let uploads = http_response(moto().port, "GET", &format!("/{}?uploads", moto().bucket));
    assert!(uploads.contains("ListMultipartUploadsResult"), "{uploads}");
    assert!(!uploads.contains(&format!("<Key>{prefix}/")), "an upload was left open: {uploads}");
}

#[test]
fn s3s_fs_with_sigv4_roundtrip_and_wrong_credentials() {
    let srv = s3s_fs();
    let url = srv.url("sigv4");
    let good = srv.options(2);
    let m = write(&url, &good, 300).unwrap();
    assert!(m.shards.len() > 1);
    assert_eq!(read_all(&url, &good).unwrap(), 300 * 16);
    assert!(verify(&url, &good, 2).unwrap().ok);

    let secret = "definitely-the-wrong-secret";
    let bad = s3_options(&srv.endpoint, &srv.access_key, secret, 1);
    let e = info(&url, &bad).unwrap_err().to_string();
    eprintln!("wrong secret: {e}");
    assert!(e.contains("403") || e.contains("SignatureDoesNotMatch"), "{e}");
    assert!(!e.contains(secret), "the secret leaked into: {e}");
    let e = write(&srv.url("sigv4-bad"), &bad, 2).unwrap_err().to_string();
    assert!(e.contains("403") || e.contains("SignatureDoesNotMatch"), "{e}");
    assert!(!e.contains(secret));
    let unknown = s3_options(&srv.endpoint, "NOSUCHKEY", secret, 1);
    let e = info(&url, &unknown).unwrap_err().to_string();
    assert!(e.contains("403") || e.contains("InvalidAccessKeyId"), "{e}");
}

#[test]
fn large_shards_use_multipart_on_both_servers() {
    for (name, srv) in [("moto", moto()), ("s3s-fs", s3s_fs())] {
        let url = srv.url("multipart");
        let hooks = [("h", 1024)];
        let opts = WriterOptions {
            row_group_rows: 1024,
            shard_bytes: Some(11 << 20),
            store: srv.options(2),
            ..Default::default()
        };
        let mut w = DatasetWriter::create(&url, header(&hooks, 128), opts).unwrap();
        for s in 0..72 {
            w.append(synth(s, 1, 128, &hooks)).unwrap(); // 72 x 128 rows of 1024 values, ~1.5 B each: ~14 MiB
        }
        let m = w.finish().unwrap();
        assert!(m.shards[0].bytes > 10 << 20, "{name}: shard of {} bytes", m.shards[0].bytes);
        let v = verify(&url, &srv.options(2), 2).unwrap();
        assert!(v.ok, "{name}: {v:?}");
        let mut o = ReaderOptions::new("h", 1000);
        o.store = srv.options(2);
        let b = Reader::open(&url, o).unwrap().next().unwrap().unwrap();
        assert_eq!(b.rows, 1000);
    }
}

#[test]
fn large_objects_are_put_as_multipart_uploads() {
    use object_store::ObjectStoreExt;
    let url = moto().url("objects-multipart");
    let dir = store::ObjectDir::open(&url, &moto().options(2)).unwrap().with_multipart_threshold(1 << 20);
    let big: Vec<u8> = (0..(6u32 << 20)).map(|i| (i % 251) as u8).collect();
    dir.put("big.bin", big.clone()).unwrap();
    dir.put("small.bin", vec![7u8; 1000]).unwrap();
    assert_eq!(dir.get("big.bin").unwrap().unwrap().as_ref(), big.as_slice());
    // S3 gives a multipart object an ETag of the form "<md5 of the parts' md5s>-<parts>".
    let loc = store::open_store_with(&url, &moto().options(2)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let etag = |key: &str| rt.block_on(loc.store.head(&loc.path(key))).unwrap().e_tag.unwrap();
    assert!(etag("big.bin").contains('-'), "{}", etag("big.bin"));
    assert!(!etag("small.bin").contains('-'), "{}", etag("small.bin"));
}
