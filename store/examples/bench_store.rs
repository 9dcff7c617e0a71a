//! Store benchmark on real activations (see scripts/bench_store.py, which drives it).
//!
//!   bench_store write ACTS_DIR DATASET_URL [--zstd-level N] [--row-group-rows N] [--shard-mib N] [--dtype bf16|f16|f32]
//!                     [--encode-threads N] [--passes N]
//!       ACTS_DIR holds acts.npy (rows x d float32), tokens.u32 and meta.json (from
//!       scripts/gen_activations.py). Writes the rows --passes times (1), as new sequences each
//!       time. Prints one JSON line: bytes per element, write time, and the CPU time this
//!       process spent writing (every thread), from which MB/s per core follows.
//!   bench_store read DATASET_URL HOOK [--shuffle] [--batch N] [--threads N] [--prefetch N] [--repeat N]
//!       Reads every row into one (rows, d) float32 array, like the pyarrow snippet in
//!       docs/format.md. With --repeat N, the best of N reads in this process. Prints one JSON
//!       line: seconds, rows/s, MB/s of f32, checksum.

use std::time::Instant;

// Like pyarrow, which allocates its buffers from mimalloc (or jemalloc): glibc's malloc maps and
// unmaps every large buffer, and the page faults then cost more than the decoding.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use store::reader::{OutputDtype, Reader, ReaderOptions};
use store::*;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn read_npy_f32(path: &std::path::Path) -> (Vec<f32>, usize, usize) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "not a .npy file");
    let (hlen, hstart) = if bytes[6] == 1 {
        (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
    } else {
        (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12)
    };
    let header = std::str::from_utf8(&bytes[hstart..hstart + hlen]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"), "{header}");
    let shape = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let dims: Vec<usize> = shape.split(',').filter_map(|s| s.trim().parse().ok()).collect();
    let data = &bytes[hstart + hlen..];
    let v: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(v.len(), dims[0] * dims[1]);
    (v, dims[0], dims[1])
}

/// User plus system CPU time of this process so far, every thread included (from
/// /proc/self/stat, in the kernel's clock ticks of 1/100 s).
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which is in parentheses and may hold spaces): state is
    // field 3, utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("a command name") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("write") => write(&args),
        Some("read") => read(&args),
        _ => {
            eprintln!("usage: bench_store write ACTS_DIR URL [...] | bench_store read URL HOOK [...]");
            std::process::exit(2);
        }
    }
}

fn write(args: &[String]) {
    let dir = std::path::PathBuf::from(&args[1]);
    let url = &args[2];
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap();
    let hook = meta["hook"].as_str().unwrap().to_string();
    let ctx = meta["ctx"].as_u64().unwrap() as usize;
    let (acts, rows, d) = read_npy_f32(&dir.join("acts.npy"));
    let tokens: Vec<u32> = std::fs::read(dir.join("tokens.u32"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(tokens.len(), rows);
    let opts = WriterOptions {
        dtype: Dtype::parse(&arg(args, "--dtype").unwrap_or("bf16".into())).unwrap(),
        zstd_level: arg(args, "--zstd-level").map(|s| s.parse().unwrap()).unwrap_or(1),
        row_group_rows: arg(args, "--row-group-rows").map(|s| s.parse().unwrap()).unwrap_or(4096),
        shard_mib: arg(args, "--shard-mib").map(|s| s.parse().unwrap()).unwrap_or(256),
        encode_threads: arg(args, "--encode-threads")
            .map(|s| s.parse().unwrap())
            .unwrap_or_else(default_encode_threads),
        ..Default::default()
    };
    let passes: usize = arg(args, "--passes").map(|s| s.parse().unwrap()).unwrap_or(1);
    let seqs_per_pass = rows.div_ceil(ctx);
    let header = DatasetHeader {
        model: ModelIdentity { name: meta["model"].as_str().unwrap_or("").into(), file_sha256: String::new() },
        tokenizer: TokenizerIdentity::default(),
        hooks: vec![HookSpec { name: hook.clone(), d_model: d }],
        context_len: ctx,
        corpus: CorpusIdentity {
            name: meta["corpus"].as_str().unwrap_or("").into(),
            sha256: String::new(),
            detail: String::new(),
        },
        created: CreatedInfo::from_process(),
    };
    let cpu_before = process_cpu_seconds();
    let t = Instant::now();
    let mut w = DatasetWriter::create(url, header, opts.clone()).unwrap();
    let chunk = 8 * ctx;
    for pass in 0..passes {
        let first_seq = (pass * seqs_per_pass) as u64;
        for start in (0..rows).step_by(chunk) {
            let n = chunk.min(rows - start);
            w.append(RowBatch {
                sequence_id: (start..start + n).map(|r| first_seq + (r / ctx) as u64).collect(),
                position: (start..start + n).map(|r| (r % ctx) as u32).collect(),
                token_id: tokens[start..start + n].to_vec(),
                activations: vec![(hook.clone(), acts[start * d..(start + n) * d].to_vec())],
            })
            .unwrap();
        }
    }
    let m = w.finish().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let cpu_seconds = process_cpu_seconds() - cpu_before;
    let act_bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    println!(
        "{}",
        serde_json::json!({
            "rows": m.tokens, "d": d, "dtype": m.dtype, "zstd_level": opts.zstd_level,
            "row_group_rows": opts.row_group_rows, "shards": m.shards.len(), "bytes": act_bytes,
            "bytes_per_element": m.bytes_per_element(), "write_seconds": secs,
            "encode_threads": opts.encode_threads, "cpu_seconds": cpu_seconds,
        })
    );
}

fn read(args: &[String]) {
    let url = &args[1];
    let hook = &args[2];
    let mut o = ReaderOptions::new(hook, arg(args, "--batch").map(|s| s.parse().unwrap()).unwrap_or(4096));
    o.shuffle = args.iter().any(|a| a == "--shuffle");
    o.drop_last = o.shuffle;
    o.epochs = Some(1);
    o.output = OutputDtype::F32;
    if let Some(t) = arg(args, "--threads") {
        o.decode_threads = t.parse().unwrap();
    }
    if let Some(p) = arg(args, "--prefetch") {
        o.prefetch_row_groups = p.parse().unwrap();
    }
    let repeat: usize = arg(args, "--repeat").map(|s| s.parse().unwrap()).unwrap_or(1);
    let mut best = f64::INFINITY;
    let (mut out, mut rows, mut d) = (Vec::new(), 0usize, 0usize);
    for _ in 0..repeat {
        drop(std::mem::take(&mut out));
        let t = Instant::now();
        let reader = Reader::open(url, o.clone()).unwrap();
        d = reader.d_model();
        let rows_total = reader.manifest().unwrap().tokens as usize;
        // The same result as the pyarrow snippet: one (rows, d) float32 array.
        out = Vec::with_capacity(rows_total * d * 4);
        rows = 0;
        let mut reader = reader;
        while let Some(b) = reader.next() {
            let b = b.unwrap();
            rows += b.rows;
            out.extend_from_slice(&b.bytes);
            reader.recycle(b);
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    let secs = best;
    let checksum: f64 = out.chunks_exact(4).step_by(97).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).sum();
    println!(
        "{}",
        serde_json::json!({
            "rows": rows, "d": d, "seconds": secs, "rows_per_s": rows as f64 / secs,
            "f32_mb_per_s": (rows * d * 4) as f64 / secs / 1e6, "checksum_every_97th": checksum,
        })
    );
}
