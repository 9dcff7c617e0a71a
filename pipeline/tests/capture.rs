//! `sae capture` on the real model and the real fortunes: round trip against the model's own
//! hooks, a real S3 server on loopback, resume after SIGKILL, workers, and bad inputs.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use capture::corpus::{Corpus, CorpusSpec};
use capture::windows::{WindowOptions, WindowStream};
use capture::{HookPoint, Hooks};
use store::reader::{Reader, ReaderOptions};
use tch::{Kind, Tensor};

mod common;
use common::{last_json, model, sae, spawn_sae, stderr, wait_while_running, S3Server};

const SAE: &str = env!("CARGO_BIN_EXE_sae");
/// Small windows and batches keep the captures short on 2 cores.
const SMALL: &[&str] = &["--context-len", "64", "--batch-size", "4", "--threads", "2", "--row-group-rows", "128"];

fn capture(out: &str, extra: &[&str]) -> Output {
    let mut args = vec!["capture", "--out", out];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    sae(&args)
}

/// Every row of `hook`, in dataset order: (sequence_id, position, token_id) and f32 values.
fn read_all(url: &str, hook: &str) -> (Vec<(u64, u32, u32)>, Vec<f32>) {
    let mut opts = ReaderOptions::one_pass_in_order(hook, 1000);
    opts.with_tokens = true;
    let mut rows = Vec::new();
    let mut values = Vec::new();
    for batch in Reader::open(url, opts).unwrap() {
        let batch = batch.unwrap();
        let t = batch.tokens.as_ref().unwrap();
        rows.extend((0..batch.rows).map(|i| (t.sequence_id[i], t.position[i], t.token_id[i])));
        values.extend(batch.to_f32());
    }
    (rows, values)
}

#[test]
fn captured_rows_equal_the_models_own_hooks_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = ["blocks.3.hook_resid_post", "blocks.15.hook_resid_post"];
    let f32_url = dir.path().join("f32").display().to_string();
    let bf16_url = dir.path().join("bf16").display().to_string();
    for (url, dtype) in [(&f32_url, "f32"), (&bf16_url, "bf16")] {
        let out =
            capture(url, &["--max-tokens", "600", "--hook", hooks[0], "--hook", hooks[1], "--store-dtype", dtype]);
        assert!(out.status.success(), "{}", stderr(&out));
    }

    // The same windows, batched the same way (batch b = windows [4b, 4b+4)), through the model.
    let model = model();
    let corpus = Corpus::open(CorpusSpec::default_fortunes().unwrap()).unwrap();
    let opts = WindowOptions { end_window: Some(10), ..WindowOptions::new(64) };
    let windows: Vec<_> = WindowStream::start(corpus, std::sync::Arc::new(model.tokenizer.clone()), opts)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for hook_name in hooks {
        let hook = HookPoint::parse(hook_name, 30).unwrap();
        let mut expected_rows = Vec::new();
        let mut expected = Vec::new();
        for batch in windows.chunks(4) {
            let flat: Vec<i64> = batch.iter().flat_map(|w| w.tokens.iter().map(|&t| t as i64)).collect();
            let tokens = Tensor::from_slice(&flat).view([batch.len() as i64, 64]);
            let out = model.network.forward(&tokens, None, &mut Hooks::new().capture([hook]), false).unwrap();
            expected.push(out.hooks[&hook].narrow(1, 1, 63).reshape([-1, 576]).to_kind(Kind::Float));
            for w in batch {
                expected_rows.extend((1..64).map(|p| (w.sequence_id, p as u32, w.tokens[p])));
            }
        }
        let expected = Tensor::cat(&expected, 0).narrow(0, 0, 600); // --max-tokens 600
        expected_rows.truncate(600);

        let (rows, values) = read_all(&f32_url, hook_name);
        assert_eq!(rows, expected_rows, "{hook_name}: token columns differ");
        let stored = Tensor::from_slice(&values).view([-1, 576]);
        assert!(stored.equal(&expected), "{hook_name}: f32-stored rows are not bit-for-bit the model's");

        let (rows, values) = read_all(&bf16_url, hook_name);
        assert_eq!(rows, expected_rows);
        let stored = Tensor::from_slice(&values).view([-1, 576]);
        let rounded = expected.to_kind(Kind::BFloat16).to_kind(Kind::Float);
        assert!(stored.equal(&rounded), "{hook_name}: bf16 rows are not the model's rows rounded to bf16");
    }
}

/// Polls `dir/commits/<worker>/` until it holds at least `n` commit records.
fn wait_for_commits(dir: &Path, n: usize, child: &mut Child) {
    let commits = dir.join("commits/w00000");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let count = std::fs::read_dir(&commits)
            .map(|d| d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().ends_with(".json")).count())
            .unwrap_or(0);
        if count >= n {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("capture ended ({status}) before {n} commits");
        }
        assert!(Instant::now() < deadline, "no {n} commits after 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_capture_killed_twice_resumes_to_exactly_the_uninterrupted_rows() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole").display().to_string();
    // Shards of about 1 MiB (~1300 bf16 rows): kills land between commits.
    let settings = ["--max-tokens", "4500", "--shard-mib", "1"];
    let out = capture(&whole, &settings);
    assert!(out.status.success(), "{}", stderr(&out));

    let killed = dir.path().join("killed");
    let killed_url = killed.display().to_string();
    for commits in [1, 2] {
        let mut args = vec!["capture", "--out", killed_url.as_str()];
        args.extend_from_slice(SMALL);
        args.extend_from_slice(&settings);
        let mut child = Command::new(SAE).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        wait_for_commits(&killed, commits, &mut child);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(!killed.join("manifest.json").exists(), "the kill came too late to test resume");
    }
    let out = capture(&killed_url, &settings);
    assert!(out.status.success(), "{}", stderr(&out));

    let hook = "blocks.15.hook_resid_post";
    let (rows_a, values_a) = read_all(&whole, hook);
    let (rows_b, values_b) = read_all(&killed_url, hook);
    assert_eq!(rows_a.len(), 4500);
    assert_eq!(rows_a, rows_b, "token columns differ after resume");
    assert!(
        values_a.iter().zip(&values_b).all(|(a, b)| a.to_bits() == b.to_bits()) && values_a.len() == values_b.len(),
        "activations differ after resume"
    );
    let verify = sae(&["dataset", "verify", &killed_url]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));

    // A finished dataset is reported, not captured again.
    let again = capture(&killed_url, &settings);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("already a finished dataset"));
}

#[test]
fn two_workers_and_finalize_equal_one_worker() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single").display().to_string();
    let split = dir.path().join("split").display().to_string();
    let settings = ["--max-tokens", "1500"];
    let out = capture(&single, &settings);
    assert!(out.status.success(), "{}", stderr(&out));
    for worker in ["1", "0"] {
        let mut args = settings.to_vec();
        args.extend(["--worker", worker, "--workers", "2"]);
        let out = capture(&split, &args);
        assert!(out.status.success(), "{}", stderr(&out));
        if worker == "1" {
            // Worker 0 has not run: finalize must refuse.
            let out = sae(&["dataset", "finalize", &split]);
            assert!(!out.status.success());
            assert!(stderr(&out).contains("only 1 of 2 workers have finished"), "{}", stderr(&out));
        }
    }
    assert!(!Path::new(&split).join("manifest.json").exists());
    let out = sae(&["dataset", "finalize", &split]);
    assert!(out.status.success(), "{}", stderr(&out));
    let hook = "blocks.15.hook_resid_post";
    let (rows_a, values_a) = read_all(&single, hook);
    let (rows_b, values_b) = read_all(&split, hook);
    assert_eq!(rows_a.len(), 1500);
    assert_eq!(rows_a, rows_b);
    assert_eq!(values_a, values_b);
}

/// The shards' bytes, in the order of their names (`<worker>-<sequence>-<random>.parquet`), with
/// the dataset's id (random per dataset, in each shard's footer) blanked out.
fn shards(dataset: &str) -> Vec<Vec<u8>> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(dataset).join("manifest.json")).unwrap()).unwrap();
    let id = manifest["dataset_id"].as_str().unwrap().as_bytes().to_vec();
    let mut paths: Vec<_> =
        std::fs::read_dir(Path::new(dataset).join("shards")).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    let blank = |mut bytes: Vec<u8>| {
        let at = bytes.windows(id.len()).position(|w| w == id).expect("the shard's footer names its dataset");
        bytes[at..at + id.len()].fill(b'-');
        bytes
    };
    paths.iter().map(|p| blank(std::fs::read(p).unwrap())).collect()
}

#[test]
fn encode_threads_change_nothing_in_the_shards() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n).display().to_string();
    let (one, three) = (path("one"), path("three"));
    for (out, threads) in [(&one, "1"), (&three, "3")] {
        let out = capture(out, &["--max-tokens", "1200", "--encode-threads", threads]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let (a, b) = (shards(&one), shards(&three));
    assert!(!a.is_empty() && a.iter().all(|bytes| !bytes.is_empty()));
    assert!(a == b, "the shards differ between 1 and 3 encoding threads");
    let out = capture(&path("zero"), &["--max-tokens", "100", "--encode-threads", "0"]);
    assert!(!out.status.success() && stderr(&out).contains("--encode-threads"), "{}", stderr(&out));
}

#[test]
fn capture_to_a_real_s3_server() {
    let server = S3Server::moto("acts");
    let url = "s3://acts/smollm2/l15";
    let mut args = vec!["capture", "--out", url, "--max-tokens", "500"];
    args.extend_from_slice(SMALL);
    let with_env = |cmd: &mut Command| {
        cmd.env("AWS_ENDPOINT", &server.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("RUST_LOG", "warn");
    };
    let mut cmd = Command::new(SAE);
    cmd.args(&args);
    with_env(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let mut info = Command::new(SAE);
    info.args(["dataset", "info", url, "--json"]);
    with_env(&mut info);
    let out = info.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["tokens"], 500);
    assert_eq!(info["hooks"][0]["name"], "blocks.15.hook_resid_post");
    assert_eq!(info["final"], true);

    let mut verify = Command::new(SAE);
    verify.args(["dataset", "verify", url]);
    with_env(&mut verify);
    assert!(verify.output().unwrap().status.success());
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out_url = dir.path().join("ds").display().to_string();

    let empty = dir.path().join("empty-corpus");
    std::fs::create_dir(&empty).unwrap();
    let out = capture(&out_url, &["--corpus", empty.to_str().unwrap(), "--max-tokens", "100"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("empty corpus"), "{}", stderr(&out));

    let out = capture(&out_url, &["--hook", "blocks.99.hook_resid_post", "--max-tokens", "100"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("blocks.99.hook_resid_post"), "{}", stderr(&out));

    let missing = dir.path().join("no-such-file.txt");
    let out = capture(&out_url, &["--corpus", missing.to_str().unwrap(), "--max-tokens", "100"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no-such-file.txt"), "{}", stderr(&out));

    // A destination that holds a different capture is refused, naming the difference.
    let out = capture(&out_url, &["--max-tokens", "100"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = capture(&out_url, &["--max-tokens", "100", "--hook", "blocks.14.hook_resid_post"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("different capture") && err.contains("blocks.14.hook_resid_post"), "{err}");
    let out = capture(&out_url, &["--max-tokens", "200"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("corpus.detail.max_tokens: there 100, here 200"), "{}", stderr(&out));
}

#[test]
fn several_corpus_inputs_follow_one_flag_or_repeat_it() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let out_url = dir.path().join("out").display().to_string();
    // Both folders are empty: the corpus error names both inputs, so both were taken.
    let expected = format!("no text files found in {a}, {b}");
    for flags in [vec!["--corpus", a, b], vec!["--corpus", a, "--corpus", b]] {
        let mut args = flags.clone();
        args.extend(["--max-tokens", "100"]);
        let out = capture(&out_url, &args);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(&expected), "{flags:?}: {}", stderr(&out));
    }
}

#[test]
fn a_corpus_shorter_than_max_tokens_ends_cleanly_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("short.txt");
    // About 300 tokens: 4 windows of 64, the last partial window dropped.
    let text = "The quick brown fox jumps over the lazy dog, and then it naps in the sun. ".repeat(18);
    std::fs::write(&corpus, &text).unwrap();
    let url = dir.path().join("ds").display().to_string();
    let out = Command::new(SAE)
        .args(["capture", "--out", &url, "--corpus", corpus.to_str().unwrap(), "--max-tokens", "100000", "--json"])
        .args(SMALL)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("the corpus ended before --max-tokens"), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    let model = model();
    let stream_tokens = model.tokenizer.encode(&text).unwrap().len() + 1; // + EOS
    let windows = (stream_tokens / 64) as u64;
    assert_eq!(summary["tokens"], windows * 63, "{summary}");
    let (rows, _) = read_all(&url, "blocks.15.hook_resid_post");
    assert_eq!(rows.len() as u64, windows * 63);
}

#[test]
fn dataset_verify_names_a_corrupted_shard_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("ds").display().to_string();
    let out = capture(&url, &["--max-tokens", "300"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ok = sae(&["dataset", "verify", &url]);
    assert!(ok.status.success(), "{}", stderr(&ok));

    let shard = std::fs::read_dir(dir.path().join("ds/shards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "parquet"))
        .unwrap();
    let mut bytes = std::fs::read(&shard).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&shard, bytes).unwrap();
    let bad = sae(&["dataset", "verify", &url]);
    assert!(!bad.status.success());
    let key = format!("shards/{}", shard.file_name().unwrap().to_string_lossy());
    assert!(stderr(&bad).contains(&key), "stderr does not name {key}: {}", stderr(&bad));
    assert!(String::from_utf8_lossy(&bad.stdout).contains(&format!("BAD {key}")));
}

#[test]
fn finalize_refuses_a_worker_killed_after_its_first_commit() {
    let dir = tempfile::tempdir().unwrap();
    let split = dir.path().join("split").display().to_string();
    // Worker 0 of 2, with small shards so that its first commit comes early; killed right after.
    let mut args = vec!["capture", "--out", &split, "--max-tokens", "60000", "--worker", "0", "--workers", "2"];
    args.extend_from_slice(SMALL);
    args.extend(["--shard-mib", "1"]);
    let mut child = spawn_sae(&args);
    let commits = Path::new(&split).join("commits/w00000");
    wait_while_running(&mut child, "its first commit", || {
        std::fs::read_dir(&commits).is_ok_and(|mut d| d.next().is_some())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    // Worker 1 never ran. Finalize must not make a dataset of worker 0's first shard.
    for extra in [&[][..], &["--workers", "2"][..]] {
        let mut args = vec!["dataset", "finalize", &split];
        args.extend_from_slice(extra);
        let out = sae(&args);
        assert!(!out.status.success(), "finalize succeeded on an unfinished capture");
        assert!(stderr(&out).contains("w00000") && stderr(&out).contains("never finished"), "{}", stderr(&out));
    }
    assert!(!Path::new(&split).join("manifest.json").exists());
    assert!(std::fs::read_dir(&commits).unwrap().next().is_some(), "the committed shard must stay");
}

/// `sae capture --fortune-languages en,de,es,zh`: the dataset's rows, read back and traced to
/// their documents by packing the corpus again, hold every language, in the cycle's order
/// (16 English, 8 German, 12 Spanish, 1 Chinese documents per cycle); a second capture gives
/// the same tokens. Prints the per-language token counts.
#[test]
fn multilingual_capture_mixes_the_languages_in_a_fixed_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let languages = ["en", "de", "es", "zh"].map(String::from);
    let hook = "blocks.0.hook_resid_post";
    let urls: Vec<String> = ["a", "b"].iter().map(|n| dir.path().join(n).display().to_string()).collect();
    for url in &urls {
        let out = capture(url, &["--fortune-languages", "en,de,es,zh", "--max-tokens", "20000", "--hook", hook]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let (rows, _) = read_all(&urls[0], hook);
    assert_eq!(rows.len(), 20000);
    assert_eq!(rows, read_all(&urls[1], hook).0, "two captures of the mix differ");

    let spec = CorpusSpec::multilingual_fortunes(&languages).unwrap();
    let corpus = Corpus::open(spec.clone()).unwrap();
    let (manifest, _) = store::load_manifest(&urls[0], &Default::default()).unwrap();
    assert_eq!(manifest.corpus.sha256, corpus.fingerprint().unwrap().sha256);
    assert!(manifest.corpus.name.contains("en 16, de 8, es 12, zh 1"), "{}", manifest.corpus.name);
    let mix = spec.mix.as_ref().unwrap();
    let group_of_file: Vec<usize> =
        corpus.files().iter().map(|f| mix.groups.iter().position(|g| g.inputs.contains(&f.input)).unwrap()).collect();
    let last = rows.iter().map(|r| r.0).max().unwrap();
    let opts = WindowOptions { end_window: Some(last + 1), ..WindowOptions::new(64) };
    let windows: Vec<_> = WindowStream::start(corpus, std::sync::Arc::new(model().tokenizer.clone()), opts)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut tokens = [0u64; 4];
    let mut documents: Vec<(u32, u32)> = Vec::new();
    for &(sequence, position, token) in &rows {
        let window = &windows[sequence as usize];
        assert_eq!(window.tokens[position as usize], token, "window {sequence} position {position}");
        let doc = window.document_at(position as usize).unwrap();
        tokens[group_of_file[doc.file as usize]] += 1;
        if documents.last() != Some(&(doc.file, doc.record)) {
            documents.push((doc.file, doc.record));
        }
    }
    let total: u64 = tokens.iter().sum();
    let shares: Vec<String> = languages
        .iter()
        .zip(tokens)
        .map(|(l, n)| format!("{l} {n} ({:.1}%)", 100.0 * n as f64 / total as f64))
        .collect();
    println!("per-language tokens of the first {total} rows: {}", shares.join(", "));
    assert!(tokens.iter().all(|&n| n > 0), "a language is missing: {shares:?}");
    // The first cycle: 16 English documents, then 8 German, 12 Spanish, 1 Chinese.
    let first_cycle: Vec<usize> = documents.iter().take(37).map(|&(file, _)| group_of_file[file as usize]).collect();
    let want: Vec<usize> = [(0, 16), (1, 8), (2, 12), (3, 1)].iter().flat_map(|&(g, n)| vec![g; n]).collect();
    assert_eq!(first_cycle, want);
}

/// The compute dtype a capture ran in is reported, defaults to the CPU's (bf16 where it is
/// native), and belongs to the capture's configuration: the same dataset asked for in another
/// dtype is refused, naming it, and what was committed stays readable.
#[test]
fn the_compute_dtype_is_reported_and_part_of_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("ds").display().to_string();
    let default = capture::device::dtype_name(capture::device::parse_dtype(None, tch::Device::Cpu).unwrap());
    let out = capture(&url, &["--max-tokens", "300", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(last_json(&out)["compute_dtype"], default.as_str());

    let other = if default == "f32" { "bf16" } else { "f32" };
    let refused = capture(&url, &["--max-tokens", "300", "--dtype", other]);
    assert!(!refused.status.success(), "a capture in {other} over a {default} dataset was accepted");
    let err = stderr(&refused);
    assert!(err.contains("compute_dtype") && err.contains(&url), "{err}");
    let verify = sae(&["dataset", "verify", &url]);
    assert!(verify.status.success(), "{}", stderr(&verify));
}

/// Without `--dtype`, a capture continues in the dtype its dataset was computed in (a job
/// requeued onto a CPU whose default differs): a finished dataset is reported, and a second
/// worker joins a capture that the first ran in the other dtype.
#[test]
fn without_dtype_a_capture_continues_in_the_dtype_it_was_begun_in() {
    let dir = tempfile::tempdir().unwrap();
    let default = capture::device::dtype_name(capture::device::parse_dtype(None, tch::Device::Cpu).unwrap());
    let other = if default == "f32" { "bf16" } else { "f32" };

    let finished = dir.path().join("finished").display().to_string();
    let out = capture(&finished, &["--max-tokens", "300", "--dtype", other]);
    assert!(out.status.success(), "{}", stderr(&out));
    let again = capture(&finished, &["--max-tokens", "300", "--json"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(last_json(&again)["already_finished"], true, "{}", String::from_utf8_lossy(&again.stdout));

    let workers = dir.path().join("workers").display().to_string();
    let worker = |index: &str, extra: &[&str]| {
        let mut args = vec!["--max-tokens", "600", "--workers", "2", "--worker", index];
        args.extend_from_slice(extra);
        let out = capture(&workers, &args);
        assert!(out.status.success(), "worker {index}: {}", stderr(&out));
    };
    worker("0", &["--dtype", other]);
    worker("1", &[]);
    let finalize = sae(&["dataset", "finalize", &workers, "--workers", "2"]);
    assert!(finalize.status.success(), "{}", stderr(&finalize));
    let verify = sae(&["dataset", "verify", &workers]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("workers/manifest.json")).unwrap()).unwrap();
    let config: serde_json::Value = serde_json::from_str(manifest["corpus"]["detail"].as_str().unwrap()).unwrap();
    let kind = if other == "f32" { "Float" } else { "BFloat16" };
    assert_eq!(config["compute_dtype"], kind, "{config}");
}
