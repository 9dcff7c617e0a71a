//! Reader behaviour: rank split, shuffle, cursor resume, epochs, errors.

mod common;

use std::collections::HashSet;

use common::*;
use store::reader::{Batch, Cursor, FollowOptions, OutputDtype, Reader, ReaderOptions};
use store::{DatasetWriter, WriterOptions};

const CTX: usize = 25;

/// 3 shards of 4 row groups of 50 rows (the last shard shorter), one hook of d=8.
fn dataset(name: &str) -> String {
    let url = format!("memory://{}/ds", unique(name));
    let hooks = [("h", 8)];
    let opts = WriterOptions { row_group_rows: 50, shard_bytes: Some(2_400), ..Default::default() };
    let mut w = DatasetWriter::create(&url, header(&hooks, CTX), opts).unwrap();
    for s in 0..22 {
        w.append(synth(s, 1, CTX, &hooks)).unwrap();
    }
    let m = w.finish().unwrap();
    assert!(m.shards.len() >= 3, "{} shards", m.shards.len());
    assert_eq!(m.tokens, 22 * CTX as u64);
    url
}

fn opts(batch: usize) -> ReaderOptions {
    let mut o = ReaderOptions::new("h", batch);
    o.with_tokens = true;
    o.seed = 1234;
    o.window_row_groups = 3;
    o.prefetch_row_groups = 3;
    o
}

fn ids(b: &Batch) -> Vec<(u64, u32)> {
    let t = b.tokens.as_ref().unwrap();
    t.sequence_id.iter().copied().zip(t.position.iter().copied()).collect()
}

fn take(url: &str, o: ReaderOptions, n: usize) -> Vec<Batch> {
    Reader::open(url, o).unwrap().take(n).map(|b| b.unwrap()).collect()
}

#[test]
fn ranks_are_disjoint_balanced_and_shuffled() {
    let url = dataset("ranks");
    let world = 3;
    let mut all = HashSet::new();
    let mut bpe = None;
    for rank in 0..world {
        let mut o = opts(40);
        o.rank = rank;
        o.world = world;
        let r = Reader::open(&url, o.clone()).unwrap();
        let n = r.batches_per_epoch().unwrap();
        assert!(bpe.is_none() || bpe == Some(n), "every rank yields the same batches per epoch");
        bpe = Some(n);
        let batches: Vec<Batch> = r.take(n as usize).map(|b| b.unwrap()).collect();
        let mut mine = HashSet::new();
        for b in &batches {
            assert_eq!(b.rows, 40);
            // Rows are checked against the values written for them.
            assert_eq!(b.dtype, store::Dtype::Bf16);
            let vals = b.to_f32();
            for (i, (s, p)) in ids(b).into_iter().enumerate() {
                assert_eq!(&vals[i * 8..i * 8 + 8], &stored_values(store::Dtype::Bf16, 0, s, p, 8)[..]);
                assert!(mine.insert((s, p)), "row repeated within an epoch");
                assert!(all.insert((s, p)), "row given to two ranks");
            }
        }
        // Shuffled: a batch mixes sequences from far apart (different row groups).
        let seqs: HashSet<u64> = ids(&batches[0]).iter().map(|x| x.0).collect();
        assert!(seqs.len() > 3, "batch 0 of rank {rank} has sequences {seqs:?}");
    }
    let total = 22 * CTX;
    assert!(all.len() as u64 == world as u64 * bpe.unwrap() * 40 && all.len() <= total);
    assert!(all.len() >= total - world * 40 - 2 * 50, "too many rows dropped: {} of {total}", all.len());
}

#[test]
fn order_is_a_pure_function_of_seed_epoch_rank_world() {
    let url = dataset("pure");
    let a = take(&url, opts(30), 40);
    let b = take(&url, opts(30), 40);
    assert_eq!(a.iter().map(ids).collect::<Vec<_>>(), b.iter().map(ids).collect::<Vec<_>>());
    assert_eq!(a.iter().map(|b| &b.bytes).collect::<Vec<_>>(), b.iter().map(|b| &b.bytes).collect::<Vec<_>>());
    let mut o = opts(30);
    o.seed = 99;
    let c = take(&url, o, 1);
    assert_ne!(ids(&a[0]), ids(&c[0]), "another seed, another order");
    // Epoch 1 is another permutation of the same rows.
    let bpe = Reader::open(&url, opts(30)).unwrap().batches_per_epoch().unwrap() as usize;
    assert!(40 > 2 * bpe, "the test reads past two epochs");
    assert_eq!(a[bpe].cursor, Cursor { epoch: 1, batch: 0 });
    assert_ne!(ids(&a[0]), ids(&a[bpe]));
    let e0: HashSet<_> = a[..bpe].iter().flat_map(ids).collect();
    let e1: HashSet<_> = a[bpe..2 * bpe].iter().flat_map(ids).collect();
    assert_eq!(e0.len(), bpe * 30);
    assert!(e0.intersection(&e1).count() > e0.len() / 2);
}

#[test]
fn a_reader_rebuilt_from_a_cursor_continues_exactly() {
    let url = dataset("cursor");
    for world in [1, 2] {
        let mut o = opts(35);
        o.world = world;
        o.rank = world - 1;
        let bpe = Reader::open(&url, o.clone()).unwrap().batches_per_epoch().unwrap() as usize;
        assert!(bpe >= 3, "bpe {bpe}");
        let full = take(&url, o.clone(), 3 * bpe + 8);
        // Resume at the start, mid-window, at an epoch boundary, and in a later epoch.
        for k in [0, 1, 4, bpe - 1, bpe, bpe + 2, 2 * bpe + 1] {
            let cursor = if k == 0 { Cursor::default() } else { full[k - 1].next };
            // The cursor serializes to a small value.
            let json = serde_json::to_string(&cursor).unwrap();
            let back: Cursor = serde_json::from_str(&json).unwrap();
            let mut o2 = o.clone();
            o2.start = back;
            let resumed = take(&url, o2, 5);
            for (i, b) in resumed.iter().enumerate() {
                assert_eq!(b.cursor, full[k + i].cursor, "world {world} k {k}");
                assert_eq!(ids(b), ids(&full[k + i]), "world {world} resume at {k}, batch {i}");
                assert_eq!(b.bytes, full[k + i].bytes);
            }
        }
    }
}

#[test]
fn epochs_loop_or_stop() {
    let url = dataset("epochs");
    let mut o = opts(50);
    o.epochs = Some(2);
    let r = Reader::open(&url, o).unwrap();
    let bpe = r.batches_per_epoch().unwrap();
    assert_eq!(r.count() as u64, 2 * bpe);
    // Without a limit it keeps going past the dataset's size.
    let n = Reader::open(&url, opts(50)).unwrap().take(5 * bpe as usize).filter(|b| b.is_ok()).count();
    assert_eq!(n as u64, 5 * bpe);
}

#[test]
fn unshuffled_single_pass_reads_every_row_in_order() {
    let url = dataset("inorder");
    let mut o = opts(64);
    o.shuffle = false;
    o.drop_last = false;
    o.epochs = Some(1);
    o.output = OutputDtype::F32;
    let rows: Vec<(u64, u32)> = Reader::open(&url, o).unwrap().flat_map(|b| ids(&b.unwrap())).collect();
    let want: Vec<(u64, u32)> = (0..22u64).flat_map(|s| (0..CTX as u32).map(move |p| (s, p))).collect();
    assert_eq!(rows, want);
}

#[test]
fn clear_errors_for_bad_requests() {
    let url = dataset("errors");
    let e = Reader::open(&url, ReaderOptions::new("blocks.9.hook_resid_post", 10)).err().unwrap().to_string();
    assert!(e.contains("no hook `blocks.9.hook_resid_post`") && e.contains("h (d_model 8)"), "{e}");
    let mut o = ReaderOptions::new("h", 10);
    o.d_model = Some(576);
    let e = Reader::open(&url, o).err().unwrap().to_string();
    assert!(e.contains("d_model 8, not the 576"), "{e}");
    let mut o = ReaderOptions::new("h", 10);
    o.world = 100;
    o.rank = 3;
    let e = Reader::open(&url, o).err().unwrap().to_string();
    assert!(e.contains("fewer than the 100 ranks"), "{e}");
    for (world, rank, follow) in [(0, 0, false), (0, 0, true), (2, 2, true)] {
        let mut o = ReaderOptions::new("h", 10);
        (o.world, o.rank) = (world, rank);
        o.follow = follow.then(FollowOptions::default);
        let e = Reader::open(&url, o).err().unwrap().to_string();
        assert!(e.contains(&format!("rank {rank} is not in a world of {world}")), "{e}");
    }
    let mut o = ReaderOptions::new("h", 10);
    o.max_bytes_in_flight = 1000;
    let e = Reader::open(&url, o).err().unwrap().to_string();
    assert!(e.contains("max_bytes_in_flight"), "{e}");
    let e = Reader::open(&format!("memory://{}/nothing", unique("none")), ReaderOptions::new("h", 10))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no manifest.json"), "{e}");
    let mut o = ReaderOptions::new("h", 10);
    o.start = Cursor { epoch: 0, batch: 10_000 };
    let e = Reader::open(&url, o).err().unwrap().to_string();
    assert!(e.contains("past the end of an epoch"), "{e}");
}

#[test]
fn follow_mode_reads_a_dataset_while_it_is_written() {
    let dir = TempDir::new("follow");
    let url = format!("file://{}/ds", dir.path().display());
    let hooks = [("h", 8)];
    let wopts = WriterOptions { row_group_rows: 50, shard_bytes: Some(1_000), ..Default::default() };
    let mut w = DatasetWriter::create(&url, header(&hooks, CTX), wopts).unwrap();
    w.append(synth(0, 4, CTX, &hooks)).unwrap();
    // Not final: a plain reader refuses, pointing at follow mode.
    let e = Reader::open(&url, ReaderOptions::new("h", 10)).err().unwrap().to_string();
    assert!(e.contains("follow mode"), "{e}");
    let mut o = opts(20);
    o.follow = Some(FollowOptions {
        poll: std::time::Duration::from_millis(50),
        idle_timeout: Some(std::time::Duration::from_secs(30)),
        ..Default::default()
    });
    o.drop_last = false;
    let reader =
        std::thread::spawn(move || Reader::open(&url, o).unwrap().map(|b| ids(&b.unwrap())).collect::<Vec<_>>());
    std::thread::sleep(std::time::Duration::from_millis(300));
    for s in 4..12 {
        w.append(synth(s, 1, CTX, &hooks)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    w.finish().unwrap();
    let batches = reader.join().unwrap();
    let rows: Vec<(u64, u32)> = batches.iter().flatten().copied().collect();
    let set: HashSet<_> = rows.iter().copied().collect();
    assert_eq!(rows.len(), 12 * CTX, "every row once");
    assert_eq!(set.len(), 12 * CTX);
}

#[test]
fn a_budget_of_one_window_still_streams() {
    let url = dataset("budget");
    let mut o = opts(30);
    o.prefetch_row_groups = 8;
    // One window of 3 row groups of 50 rows x 8 bf16 values: 2400 bytes, 2 KiB of permits.
    o.max_bytes_in_flight = 3 * 50 * 8 * 2 + 1023;
    let bpe = Reader::open(&url, o.clone()).unwrap().batches_per_epoch().unwrap() as usize;
    let tight: Vec<Batch> = take(&url, o.clone(), 2 * bpe + 1);
    let loose = take(&url, opts(30), 2 * bpe + 1);
    assert_eq!(tight.iter().map(ids).collect::<Vec<_>>(), loose.iter().map(ids).collect::<Vec<_>>());
    o.max_bytes_in_flight = 3 * 50 * 8 * 2 - 1;
    assert!(Reader::open(&url, o).is_err(), "a budget below one window is refused");
}

#[test]
fn a_window_larger_than_the_dataset_shuffles_each_epoch_whole() {
    let url = dataset("whole-epoch");
    let mut o = opts(40);
    o.window_row_groups = 1000;
    // The budget must hold the dataset's 11 row groups (50 rows of 8 bf16 values, each counted
    // as at least one KiB), not 1000.
    o.max_bytes_in_flight = 10 << 10;
    let e = Reader::open(&url, o.clone()).err().expect("a budget one KiB short of a window would wait for itself");
    assert!(e.to_string().contains("cannot hold a window"), "{e}");
    o.max_bytes_in_flight = 11 << 10;
    let r = Reader::open(&url, o.clone()).unwrap();
    // The budget a caller asks the store for covers that window plus the row groups fetched ahead.
    let row_bytes = r.d_model() * 2; // stored bf16
    let budget = store::reader::window_budget(r.manifest(), row_bytes, &o);
    assert_eq!(budget, (11 + o.prefetch_row_groups) << 10);
    let n = r.batches_per_epoch().unwrap() as usize;
    let batches: Vec<Batch> = r.take(n).map(|b| b.unwrap()).collect();
    let rows: Vec<(u64, u32)> = batches.iter().flat_map(ids).collect();
    assert_eq!(rows.iter().collect::<HashSet<_>>().len(), rows.len(), "a row read twice in one epoch");
    // Stored order puts rows of 2 sequences in a row group; a window of 3 row groups (the
    // `opts` default) could not put rows of more than 3 of them in one batch.
    let row_groups =
        |b: &Batch| ids(b).iter().map(|&(seq, pos)| (seq * CTX as u64 + pos as u64) / 50).collect::<HashSet<_>>();
    assert!(row_groups(&batches[0]).len() > 6, "{:?}", row_groups(&batches[0]));
}

#[test]
fn follow_mode_splits_ranks_by_row_group_identity() {
    let url = dataset("follow-ranks");
    let mut seen = HashSet::new();
    let mut total = 0;
    for rank in 0..2 {
        let mut o = opts(16);
        o.rank = rank;
        o.world = 2;
        o.drop_last = false;
        o.follow = Some(FollowOptions {
            poll: std::time::Duration::from_millis(20),
            idle_timeout: None,
            ..Default::default()
        });
        for b in Reader::open(&url, o).unwrap() {
            for id in ids(&b.unwrap()) {
                assert!(seen.insert(id), "row {id:?} read by two ranks");
                total += 1;
            }
        }
    }
    assert_eq!(total, 22 * CTX, "the ranks together read every row once");
}

#[test]
fn follow_mode_yields_the_same_values_as_the_final_reader() {
    let url = dataset("follow-values");
    let rows_by_id = |follow: bool, output: OutputDtype| {
        let mut o = opts(16);
        o.drop_last = false;
        o.epochs = Some(1);
        o.output = output;
        if follow {
            o.follow = Some(FollowOptions {
                poll: std::time::Duration::from_millis(20),
                idle_timeout: None,
                ..Default::default()
            });
        }
        let mut out = std::collections::BTreeMap::new();
        for b in Reader::open(&url, o).unwrap() {
            let b = b.unwrap();
            let values = b.to_f32();
            for (i, id) in ids(&b).into_iter().enumerate() {
                out.insert(id, values[i * b.d..(i + 1) * b.d].to_vec());
            }
        }
        out
    };
    let reference = rows_by_id(false, OutputDtype::Stored);
    assert_eq!(reference.len(), 22 * CTX);
    for (follow, output) in [(false, OutputDtype::F32), (true, OutputDtype::Stored), (true, OutputDtype::F32)] {
        assert!(rows_by_id(follow, output) == reference, "follow {follow}, {output:?}: values differ");
    }
}
