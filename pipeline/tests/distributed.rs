//! Data-parallel training over c10d (Gloo on CPU) with real processes on loopback: two ranks
//! equal one process on the concatenated batches, torchrun runs resume exactly, and a dead peer
//! is a clear error instead of a hang.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

mod common;
use common::{
    free_port, metrics_without_timing, newest_checkpoint, scratch, sigkill_tree, stderr, venv_bin, wait_until_gone,
};

const SAE: &str = env!("CARGO_BIN_EXE_sae");

/// 8,000 real layer-15 rows in row groups of 512, captured once.
fn dataset() -> &'static str {
    static DATA: OnceLock<String> = OnceLock::new();
    DATA.get_or_init(|| {
        let dir = scratch("dataset").display().to_string();
        let out = Command::new(SAE)
            .args(["capture", "--out", &dir, "--max-tokens", "8000", "--context-len", "64", "--batch-size", "4"])
            .args(["--threads", "2", "--row-group-rows", "512"])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "capture failed: {}", stderr(&out));
        dir
    })
}

fn train_args<'a>(out: &'a str, arch: &'a str, batch: &'a str, tokens: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        dataset(),
        "--out",
        out,
        "--arch",
        arch,
        "--latents",
        "1152",
        "--k",
        "16",
        "--batch-size",
        batch,
        "--max-tokens",
        tokens,
        "--lr",
        "1e-3",
        "--threads",
        "1",
        "--log-every",
        "2",
        "--no-eval",
        "--quiet",
        "--json",
    ]
}

/// Rank `rank` of `world`, started directly (not under torchrun) with torchrun's variables.
fn spawn_rank(args: &[&str], rank: usize, world: usize, port: u16) -> Child {
    Command::new(SAE)
        .args(args)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn weights(dir: &Path) -> std::collections::BTreeMap<String, Tensor> {
    let bytes = std::fs::read(dir.join("sae_weights.safetensors")).unwrap();
    trainer::tensors::from_bytes(&bytes, &dir.display().to_string()).unwrap().0
}

#[test]
fn two_ranks_equal_one_process_on_the_concatenated_batches() {
    for arch in ["topk", "relu"] {
        // Unshuffled, with batches of one row group per rank: rank r's batch i is row group
        // 2i + r, so the single process's batch i of two row groups is their concatenation.
        let single = scratch(&format!("{arch}-single"));
        let mut args = train_args(single.to_str().unwrap(), arch, "1024", "4096");
        args.push("--no-shuffle");
        let out = Command::new(SAE).args(&args).env("RUST_LOG", "warn").output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));

        let parallel = scratch(&format!("{arch}-two-ranks"));
        let mut args = train_args(parallel.to_str().unwrap(), arch, "512", "4096");
        args.extend(["--no-shuffle", "--dist-timeout", "60"]);
        let port = free_port();
        let ranks: Vec<Child> = (0..2).map(|r| spawn_rank(&args, r, 2, port)).collect();
        let outputs: Vec<Output> = ranks.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        for (rank, out) in outputs.iter().enumerate() {
            assert!(out.status.success(), "rank {rank}: {}", stderr(out));
        }
        // Only rank 0 prints the result.
        let summary: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&outputs[0].stdout).lines().last().unwrap()).unwrap();
        assert_eq!(summary["world_size"], 2);
        assert_eq!(summary["steps"], 4);
        assert!(outputs[1].stdout.is_empty(), "rank 1 printed: {}", String::from_utf8_lossy(&outputs[1].stdout));

        let (a, b) = (weights(&single), weights(&parallel));
        for (name, x) in &a {
            let y = &b[name];
            // Relative difference ‖x − y‖ / ‖x‖: the two sum the gradients in different orders,
            // and Adam's first steps magnify rounding in coordinates whose gradient is near 0.
            let scale = x.norm().double_value(&[]).max(1e-12);
            let diff = (x - y).norm().double_value(&[]);
            assert!(diff / scale <= 1e-5, "{arch} {name}: ‖Δ‖ {diff} vs ‖x‖ {scale}");
        }
        // Checked against an untrained SAE, the comparison could not fail: training moved it.
        let first: f64 = serde_json::from_str::<serde_json::Value>(
            std::fs::read_to_string(parallel.join("metrics.jsonl")).unwrap().lines().next().unwrap(),
        )
        .unwrap()["loss"]
            .as_f64()
            .unwrap();
        assert!(first.is_finite());
        assert!(a["W_dec"].to_kind(Kind::Float).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}

fn torchrun<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Command {
    let mut cmd = Command::new(venv_bin("torchrun"));
    cmd.args(["--no-python", "--nproc-per-node", "2", "--master-port", &free_port().to_string(), SAE]).args(args);
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// The resume tests' torchrun run: 30 steps of 2 × 256 rows, a metrics row every 4 steps and a
/// checkpoint every 3, so an interruption at a checkpoint mostly falls between metrics rows.
fn resume_args(out: &Path) -> Vec<String> {
    let mut args: Vec<String> =
        train_args(out.to_str().unwrap(), "topk", "256", "15360").into_iter().map(String::from).collect();
    let log_every = args.iter().position(|a| a == "--log-every").unwrap() + 1;
    args[log_every] = "4".into();
    args.extend(["--checkpoint-every".into(), "3".into()]);
    args
}

/// The uninterrupted torchrun run the resume tests compare with, trained once.
fn torchrun_whole() -> &'static Path {
    static WHOLE: OnceLock<std::path::PathBuf> = OnceLock::new();
    WHOLE.get_or_init(|| {
        let whole = scratch("torchrun-whole");
        let out = torchrun(&resume_args(&whole)).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        whole
    })
}

/// Starts the run and waits for its first checkpoint.
fn start_until_first_checkpoint(args: &[String], out: &Path) -> Child {
    let mut child = torchrun(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while newest_checkpoint(out).is_none() {
        assert!(child.try_wait().unwrap().is_none(), "training ended before its first checkpoint");
        assert!(Instant::now() < deadline, "no checkpoint after 300 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

/// Runs the interrupted run to its end and checks it against [`torchrun_whole`]: the same
/// weights file and the same metrics rows but for timing. Returns the step it resumed from.
fn resume_and_compare(args: &[String], resumed: &Path) -> u64 {
    assert!(!resumed.join("result.json").exists(), "the run finished before it was interrupted");
    let out = torchrun(args).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    let from = summary["resumed_from_step"].as_u64().unwrap_or_else(|| panic!("not resumed: {summary}"));
    let whole = torchrun_whole();
    assert!(
        std::fs::read(resumed.join("sae_weights.safetensors")).unwrap()
            == std::fs::read(whole.join("sae_weights.safetensors")).unwrap(),
        "the torchrun run resumed from step {from} has other weights than the uninterrupted one"
    );
    assert_eq!(metrics_without_timing(resumed), metrics_without_timing(whole), "resumed from step {from}");
    from
}

#[test]
fn a_torchrun_run_interrupted_and_resumed_equals_an_uninterrupted_one_bitwise() {
    let resumed = scratch("torchrun-resumed");
    let args = resume_args(&resumed);
    let mut child = start_until_first_checkpoint(&args, &resumed);
    // torchrun passes SIGTERM on to its workers, which checkpoint and stop at the same step.
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert!(!child.wait().unwrap().success());
    assert!(resume_and_compare(&args, &resumed) >= 3);
}

/// Killed outright right after a checkpoint between two metrics rows, every rank resumes its own
/// unlogged metric sums, so the next row has the bits an uninterrupted run logs. (This run does
/// not tell that fix from the code before it, where each rank resumed the ranks' mean sums: here
/// the two round alike, with checkpoints every 2, 3, 5 or 7 steps; the faults campaign's longer
/// torchrun runs are where they differed.)
#[test]
fn a_torchrun_run_killed_between_metrics_rows_logs_the_same_rows_when_resumed() {
    let resumed = scratch("torchrun-killed");
    let args = resume_args(&resumed);
    let mut child = start_until_first_checkpoint(&args, &resumed);
    let ranks = sigkill_tree(child.id());
    assert!(!child.wait().unwrap().success());
    wait_until_gone(&ranks);
    let from = resume_and_compare(&args, &resumed);
    assert!(
        !from.is_multiple_of(4),
        "resumed from step {from}, on a metrics row: this test covers the steps between rows"
    );
}

#[test]
fn a_dead_peer_is_a_clear_error_not_a_hang() {
    let dir = scratch("dead-peer");
    let mut args = train_args(dir.to_str().unwrap(), "topk", "256", "2000000");
    args.extend(["--dist-timeout", "10", "--checkpoint-every", "2"]);
    let port = free_port();
    let mut rank0 = spawn_rank(&args, 0, 2, port);
    let mut rank1 = spawn_rank(&args, 1, 2, port);
    // Wait until training runs (a checkpoint exists), then kill rank 1.
    let deadline = Instant::now() + Duration::from_secs(300);
    while newest_checkpoint(&dir).is_none() {
        assert!(rank0.try_wait().unwrap().is_none(), "rank 0 ended early");
        assert!(Instant::now() < deadline, "no checkpoint after 300 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    let killed_at = Instant::now();
    let out = loop {
        if rank0.try_wait().unwrap().is_some() {
            break rank0.wait_with_output().unwrap();
        }
        assert!(killed_at.elapsed() < Duration::from_secs(120), "rank 0 still running 120 s after its peer died");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("rank 0 of 2") && err.contains("peer"), "{err}");
}

#[test]
fn follow_is_refused_with_several_ranks() {
    let dir = scratch("follow-ranks");
    let mut args = train_args(dir.to_str().unwrap(), "topk", "256", "2048");
    args.push("--follow");
    let out = spawn_rank(&args, 0, 2, free_port()).wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--follow trains in one process only"), "{}", stderr(&out));
}
