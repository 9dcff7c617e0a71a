//! Helpers shared by the pipeline's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)] // each test binary uses a part of these
pub use testkit::{free_port, venv_bin, S3Server};

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The last line of stdout, parsed as JSON (what `--json` prints).
pub fn last_json(out: &Output) -> serde_json::Value {
    let text = stdout(out);
    let line = text.lines().last().unwrap_or_else(|| panic!("no stdout; stderr: {}", stderr(out)));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

/// The default model on the CPU in the CLI's default compute dtype there (bf16 where the CPU has
/// native bf16, else f32), 2 threads, loaded once per test binary and shared.
pub fn model() -> std::sync::MutexGuard<'static, capture::Model> {
    static MODEL: std::sync::OnceLock<std::sync::Mutex<capture::Model>> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            tch::set_num_threads(2);
            let path = capture::model::default_model_path();
            let kind = capture::device::parse_dtype(None, tch::Device::Cpu).unwrap();
            std::sync::Mutex::new(capture::Model::load(&path, tch::Device::Cpu, kind).unwrap())
        })
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Runs the `sae` program with `args` (logging warnings only) and waits for its output.
pub fn sae(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sae")).args(args).env("RUST_LOG", "warn").output().expect("cannot run sae")
}

/// Runs `sae` with `args` followed by the whitespace-separated `flags` (flag values without
/// spaces), and waits for its output.
pub fn sae_with(args: &[&str], flags: &str) -> Output {
    sae(&[args, &flags.split_whitespace().collect::<Vec<_>>()].concat())
}

/// A fresh path `name` under this test binary's scratch folder (`<binary>-tests` in cargo's
/// folder for test files): its parent exists, it does not.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-tests", env!("CARGO_CRATE_NAME"))).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    dir
}

/// Starts the `sae` program with `args`, its output discarded.
pub fn spawn_sae(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sae"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot run sae")
}

/// Waits until `ready()` holds while `child` runs; fails the test if `child` exits first or no
/// `what` appears within 300 s.
pub fn wait_while_running(child: &mut Child, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !ready() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("sae ended ({status}) before {what}");
        }
        assert!(Instant::now() < deadline, "no {what} after 300 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The rows of a run's `dir/metrics.jsonl` without the fields that measure time, which differ
/// between any two runs.
pub fn metrics_without_timing(dir: &Path) -> Vec<serde_json::Value> {
    metrics_text_without_timing(&std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap())
}

/// [`metrics_without_timing`] of the text of a `metrics.jsonl`.
pub fn metrics_text_without_timing(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| {
            let mut row: serde_json::Value = serde_json::from_str(l).unwrap();
            for key in ["data_wait_fraction", "tokens_per_s"] {
                row[key] = serde_json::Value::Null;
            }
            row
        })
        .collect()
}

/// The file name of the newest checkpoint in an SAE's output folder, if any.
pub fn newest_checkpoint(dir: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    names.pop()
}

/// Reading a test S3 server from inside the test process.
pub trait S3Objects {
    /// Store options that reach this server (the `sae` processes get the same settings through
    /// [`S3Server::env`]).
    fn store_options(&self) -> store::StoreOptions;
    /// The object `key` under the folder URL `folder` on this server, if it exists.
    fn object(&self, folder: &str, key: &str) -> Option<Vec<u8>>;
}

impl S3Objects for S3Server {
    fn store_options(&self) -> store::StoreOptions {
        store::StoreOptions { s3_config: self.s3_config(), ..Default::default() }
    }

    fn object(&self, folder: &str, key: &str) -> Option<Vec<u8>> {
        store::ObjectDir::open(folder, &self.store_options()).unwrap().get(key).unwrap().map(|b| b.to_vec())
    }
}

/// Every row of `hook` in a dataset, in stored order: (sequence_id, position, token_id) and the
/// f32 values, for comparing two datasets row for row.
pub fn dataset_rows(url: &str, hook: &str, store: &store::StoreOptions) -> (Vec<(u64, u32, u32)>, Vec<f32>) {
    let mut opts = store::reader::ReaderOptions::one_pass_in_order(hook, 1000);
    opts.with_tokens = true;
    opts.store = store.clone();
    let mut rows = Vec::new();
    let mut values = Vec::new();
    for batch in store::reader::Reader::open(url, opts).unwrap() {
        let batch = batch.unwrap();
        let t = batch.tokens.as_ref().unwrap();
        rows.extend((0..batch.rows).map(|i| (t.sequence_id[i], t.position[i], t.token_id[i])));
        values.extend(batch.to_f32());
    }
    (rows, values)
}

/// Every live descendant of `pid` (children first listed, then theirs), from /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for task in tasks.flatten() {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                found.push(c);
                queue.push(c);
            }
        }
    }
    found
}

/// SIGKILLs `pid` and every descendant at once, as a lost node or a batch system's hard kill
/// would (torchrun starts its ranks in sessions of their own, so a process group would miss
/// them); returns the descendants, for [`wait_until_gone`]. The caller reaps `pid` itself.
pub fn sigkill_tree(pid: u32) -> Vec<u32> {
    let descendants = descendants(pid);
    for p in std::iter::once(pid).chain(descendants.iter().copied()) {
        // A process may have ended a moment ago; `wait_until_gone` is the check.
        let _ = Command::new("kill").args(["-KILL", &p.to_string()]).stderr(Stdio::null()).status();
    }
    descendants
}

/// Waits until none of `pids` is alive, failing after 30 s.
pub fn wait_until_gone(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids.iter().any(|&pid| alive(pid)) {
        assert!(Instant::now() < deadline, "processes {pids:?} outlived SIGKILL");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Alive and not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) != Some("Z"))
        .unwrap_or(false)
}
