//! `sae train` and `sae eval` on real activations of the real model: every architecture learns,
//! sweeps equal separate runs bit for bit, SIGTERM/SIGKILL plus resume equals an uninterrupted
//! run bit for bit (also with the norm filter and another shuffle window, in plain and follow
//! mode), SAELens loads what we export, S3 outputs work, and bad inputs are clear errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use store::reader::{OutputDtype, Reader, ReaderOptions};
use tch::{Device, Tensor};

mod common;
use common::{
    last_json, metrics_without_timing, newest_checkpoint, sae, sae_with, scratch, spawn_sae, stderr, venv_bin,
    wait_while_running, S3Server,
};

const SAE: &str = env!("CARGO_BIN_EXE_sae");
const HOOK: &str = "blocks.15.hook_resid_post";
/// A small run: 80 steps of 256 rows, one thread (so results are reproducible bit for bit and two
/// tests can run side by side on 2 cores).
const RUN: &[&str] = &[
    "--latents",
    "1152",
    "--k",
    "16",
    "--batch-size",
    "256",
    "--max-tokens",
    "20480",
    "--lr",
    "1e-3",
    "--threads",
    "1",
    "--log-every",
    "5",
    "--no-eval",
    "--quiet",
];

/// 16,000 rows of real layer-15 activations of SmolLM2 over the English fortunes, captured once.
fn dataset() -> &'static str {
    static DATA: OnceLock<String> = OnceLock::new();
    DATA.get_or_init(|| {
        let dir = scratch("dataset").display().to_string();
        let out = sae_with(
            &["capture", "--out", &dir],
            "--max-tokens 16000 --context-len 64 --batch-size 4 --threads 2 --row-group-rows 512",
        );
        assert!(out.status.success(), "capture failed: {}", stderr(&out));
        dir
    })
}

fn train(out: &str, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--data", dataset(), "--out", out, "--json"];
    args.extend_from_slice(RUN);
    args.extend_from_slice(extra);
    sae(&args)
}

/// One sweep over the four architectures (k and width shared).
fn arch_sweep() -> &'static Path {
    static SWEEP: OnceLock<PathBuf> = OnceLock::new();
    SWEEP.get_or_init(|| {
        let dir = scratch("arch-sweep");
        let out = train(dir.to_str().unwrap(), &["--sweep", "arch=relu,topk,batchtopk,jumprelu"]);
        assert!(out.status.success(), "sweep failed: {}", stderr(&out));
        dir
    })
}

/// The TopK member of the sweep, trained alone.
fn topk_alone() -> &'static Path {
    static ALONE: OnceLock<PathBuf> = OnceLock::new();
    ALONE.get_or_init(|| {
        let dir = scratch("topk-alone");
        let out = train(dir.to_str().unwrap(), &[]);
        assert!(out.status.success(), "training failed: {}", stderr(&out));
        dir
    })
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("sae_weights.safetensors")).unwrap()
}

#[test]
fn every_architecture_lowers_its_loss_and_topk_keeps_its_l0() {
    let sweep = arch_sweep();
    for name in ["relu-l1152-l1_0.01", "topk-l1152-k16", "batchtopk-l1152-k16", "jumprelu-l1152-l0_0.001"] {
        let dir = sweep.join(name);
        let rows = metrics(&dir);
        assert_eq!(rows.len(), 16, "{name}: 80 steps logged every 5");
        // Rare outlier rows (norms 100x the median) make single intervals spike, so compare the
        // median of the last four intervals with an early one: for relu and jumprelu the second
        // (the first after the sparsity coefficients' warm-up, 4 steps here); the TopK family
        // starts from data rows (FVU about 0.07 in its first interval, not about 1), so its first
        // interval, and it has less left to gain.
        let from_data = name.contains("topk");
        let first = rows[usize::from(!from_data)]["loss"].as_f64().unwrap();
        let mut tail: Vec<f64> = rows[rows.len() - 4..].iter().map(|r| r["loss"].as_f64().unwrap()).collect();
        tail.sort_by(f64::total_cmp);
        let last = (tail[1] + tail[2]) / 2.0;
        let factor = if from_data { 0.85 } else { 0.8 };
        assert!(last < factor * first, "{name}: loss went from {first} to {last}");
        for row in &rows {
            let l0 = row["l0"].as_f64().unwrap();
            match name {
                n if n.starts_with("topk") => assert!(l0 <= 16.0 + 1e-9, "{name}: L0 {l0} > k"),
                // BatchTopK keeps k·batch activations per batch: the mean L0 is k exactly.
                n if n.starts_with("batchtopk") => assert!((l0 - 16.0).abs() < 1e-6, "{name}: mean L0 {l0} != k"),
                _ => {}
            }
        }
        for file in ["cfg.json", "sae_weights.safetensors", "result.json", "training_curves.png"] {
            assert!(dir.join(file).exists(), "{name}: no {file}");
        }
        assert!(!dir.join("checkpoints").exists() || std::fs::read_dir(dir.join("checkpoints")).unwrap().count() == 0);
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sweep.join("batchtopk-l1152-k16/cfg.json")).unwrap()).unwrap();
    assert_eq!(cfg["architecture"], "jumprelu", "BatchTopK is saved as a JumpReLU");
    assert_eq!(cfg["metadata"]["hook_name"], HOOK);
}

#[test]
fn a_sweep_member_equals_a_separate_run_bitwise() {
    let member = arch_sweep().join("topk-l1152-k16");
    assert_eq!(weights(&member), weights(topk_alone()), "sweep member and separate run differ");
    assert_eq!(metrics(&member).last().unwrap()["fvu"], metrics(topk_alone()).last().unwrap()["fvu"]);
}

/// A narrower member of a width sweep starts from the same data rows as a run of it alone (the
/// sweep reads rows for its widest member, each member uses the first rows its own width needs).
#[test]
fn a_narrower_member_of_a_width_sweep_equals_a_separate_run_bitwise() {
    let sweep = scratch("width-sweep");
    let out = train(sweep.to_str().unwrap(), &["--sweep", "latents=576,1152"]);
    assert!(out.status.success(), "sweep failed: {}", stderr(&out));
    let alone = scratch("narrow-alone");
    let out = train(alone.to_str().unwrap(), &["--latents", "576"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(weights(&sweep.join("topk-l576-k16")), weights(&alone), "sweep member and separate run differ");
    assert_eq!(weights(&sweep.join("topk-l1152-k16")), weights(topk_alone()), "the widest member differs");
}

/// Starts a run that checkpoints every 5 steps and waits until a checkpoint newer than `after`
/// exists, then sends `signal`. Returns the exit status.
fn interrupt(dir: &Path, after: Option<String>, signal: &str) -> std::process::ExitStatus {
    interrupt_with(dir, &[], after, signal)
}

/// [`interrupt`] with more arguments for `sae train` (they override `RUN`'s).
fn interrupt_with(dir: &Path, extra: &[&str], after: Option<String>, signal: &str) -> std::process::ExitStatus {
    let mut args = vec!["train", "--data", dataset(), "--out", dir.to_str().unwrap(), "--checkpoint-every", "5"];
    args.extend_from_slice(RUN);
    args.extend_from_slice(extra);
    let mut child = spawn_sae(&args);
    wait_while_running(&mut child, "a new checkpoint", || {
        let newest = newest_checkpoint(dir);
        newest.is_some() && newest > after
    });
    let pid = child.id().to_string();
    assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert!(!dir.join("result.json").exists(), "the run finished before it was interrupted; make RUN longer");
    status
}

#[test]
fn sigterm_then_sigkill_then_resume_equals_the_uninterrupted_run_bitwise() {
    let dir = scratch("interrupted");
    // SIGTERM: a checkpoint at the current step, then exit code 130.
    let status = interrupt(&dir, None, "-TERM");
    assert_eq!(status.code(), Some(130), "SIGTERM should checkpoint and exit 130");
    let after_term = newest_checkpoint(&dir);
    // SIGKILL: whatever was not checkpointed is lost.
    interrupt(&dir, after_term, "-KILL");
    // Resume (automatically: same configuration) to the end.
    let out = train(dir.to_str().unwrap(), &[]);
    assert!(out.status.success(), "resume failed: {}", stderr(&out));
    let summary = last_json(&out);
    assert!(summary["resumed_from_step"].as_u64().unwrap() >= 10, "{summary}");
    assert_eq!(weights(&dir), weights(topk_alone()), "resumed weights differ from the uninterrupted run's");
    assert_eq!(metrics_without_timing(&dir), metrics_without_timing(topk_alone()));

    // A finished run reports again without training.
    let again = train(dir.to_str().unwrap(), &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    let again = last_json(&again);
    assert_eq!(again["already_finished"], true);
    assert_eq!(again["fvu"], summary["fvu"]);
}

/// A run with `flags` changes the SAE from the default run's (`unchanged`: what it would mean if
/// not), SIGKILL plus resume gives the uninterrupted run's bits, and resuming without the flags is
/// refused naming `config_difference`. `name` keeps the scratch folders apart.
fn assert_setting_resumes_bitwise_and_is_configured(
    name: &str,
    flags: &[&str],
    unchanged: &str,
    config_difference: &str,
) {
    let whole = scratch(&format!("{name}-whole"));
    let out = train(whole.to_str().unwrap(), flags);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(weights(&whole), weights(topk_alone()), "{unchanged}");

    let dir = scratch(&format!("{name}-killed"));
    interrupt_with(&dir, flags, None, "-KILL");
    let out = train(dir.to_str().unwrap(), flags);
    assert!(out.status.success(), "resume failed: {}", stderr(&out));
    assert!(last_json(&out)["resumed_from_step"].as_u64().unwrap() >= 5);
    assert_eq!(weights(&dir), weights(&whole), "resumed weights differ from the uninterrupted run's");

    let without = train(dir.to_str().unwrap(), &[]);
    assert!(!without.status.success());
    let err = stderr(&without);
    assert!(err.contains("another configuration") && err.contains(config_difference), "{err}");
}

/// The norm filter is a mode of training: it changes what is trained on, a killed run resumes to
/// the uninterrupted run's bits, it is part of the configuration, and a multiple below 1 is refused.
#[test]
fn a_norm_filtered_run_resumes_bitwise_and_is_part_of_the_configuration() {
    // The real activations have attention-sink rows far above 3 × the median: leaving them out
    // changes the SAE.
    let filter = ["--max-norm-multiple", "3"];
    assert_setting_resumes_bitwise_and_is_configured(
        "norm-filter",
        &filter,
        "the filter left every row in",
        "max_norm_multiple",
    );

    let below_one = train(scratch("norm-filter-bad").to_str().unwrap(), &["--max-norm-multiple", "0.5"]);
    assert!(!below_one.status.success());
    let err = stderr(&below_one);
    assert!(err.contains("--max-norm-multiple must be at least 1") && err.contains("0.5"), "{err}");
}

#[test]
fn a_whole_epoch_shuffle_resumes_bitwise_and_is_part_of_the_configuration() {
    // The dataset has 32 row groups of 512 rows: a window of 1000 shuffles each epoch whole.
    let whole_epoch = ["--shuffle-window", "1000"];
    let unchanged = "the window did not change the data order";
    assert_setting_resumes_bitwise_and_is_configured(
        "shuffle-window",
        &whole_epoch,
        unchanged,
        "shuffle_window: there 1000, here 8",
    );

    let zero = train(scratch("shuffle-window-zero").to_str().unwrap(), &["--shuffle-window", "0"]);
    assert!(!zero.status.success());
    assert!(stderr(&zero).contains("--shuffle-window must be at least 1"), "{}", stderr(&zero));
}

#[test]
fn resume_with_no_checkpoint_starts_fresh_and_another_config_is_refused() {
    let dir = scratch("refused");
    let out = train(dir.to_str().unwrap(), &["--max-tokens", "2560"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(last_json(&out)["resumed_from_step"].is_null());
    let out = train(dir.to_str().unwrap(), &["--max-tokens", "2560", "--k", "8"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("another configuration") && err.contains("sae.arch.k: there 16, here 8"), "{err}");
}

/// Rows of the dataset as an f32 tensor [n, 576].
fn rows(n: usize) -> Tensor {
    let mut opts = ReaderOptions::new(HOOK, n);
    opts.shuffle = false;
    opts.output = OutputDtype::F32;
    let batch = Reader::open(dataset(), opts).unwrap().next().unwrap().unwrap();
    Tensor::from_slice(&batch.to_f32()).view([n as i64, 576])
}

#[test]
fn sae_lens_loads_our_exports_and_agrees_with_our_encode_and_decode() {
    let python = venv_bin("python3");
    let x = rows(256);
    for name in ["relu-l1152-l1_0.01", "topk-l1152-k16", "batchtopk-l1152-k16", "jumprelu-l1152-l0_0.001"] {
        let dir = arch_sweep().join(name);
        let cfg = std::fs::read(dir.join("cfg.json")).unwrap();
        let w = std::fs::read(dir.join("sae_weights.safetensors")).unwrap();
        let loaded = trainer::export::load(&cfg, &w, dir.to_str().unwrap(), Device::Cpu).unwrap();
        let latents = loaded.sae.encode(&x).unwrap();
        let x_hat = loaded.sae.decode(&latents).unwrap();
        let inputs = dir.join("check-inputs.safetensors");
        let named =
            [("x".to_string(), x.shallow_clone()), ("latents".to_string(), latents), ("x_hat".to_string(), x_hat)];
        std::fs::write(&inputs, trainer::tensors::to_bytes(&named, None)).unwrap();
        let out = Command::new(&python)
            .args(["scripts/saelens_check.py", "--sae", dir.to_str().unwrap(), "--inputs", inputs.to_str().unwrap()])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: saelens_check failed: {}", stderr(&out));
        let report = last_json(&out);
        assert_eq!(report["ok"], true, "{name}: SAELens disagrees: {report}");
        assert_eq!(report["hook_name"], HOOK);
    }
}

#[test]
fn eval_scores_a_trained_sae_above_an_untrained_one() {
    let untrained = scratch("untrained");
    let out = train(untrained.to_str().unwrap(), &["--lr", "0", "--max-tokens", "256"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let eval = |dir: &Path| {
        let out = sae_with(
            &["eval", "--sae", dir.to_str().unwrap(), "--data", dataset()],
            "--eval-tokens 1024 --density-tokens 4096 --threads 1 --json",
        );
        assert!(out.status.success(), "{}", stderr(&out));
        last_json(&out)
    };
    let trained = eval(topk_alone());
    let before = eval(&untrained);
    for key in ["fvu", "fvu_inliers", "l0", "dead_fraction", "ce_loss_score", "delta_ce", "ce_clean", "mse", "rows"] {
        assert!(trained[key].is_number(), "{key} missing: {trained}");
    }
    let (t, u) = (trained["ce_loss_score"].as_f64().unwrap(), before["ce_loss_score"].as_f64().unwrap());
    assert!(t > u, "trained CE-loss score {t} is not above the untrained {u}");
    assert!(t > 0.5 && t <= 1.0, "trained CE-loss score {t}");
    assert!(trained["fvu"].as_f64().unwrap() < before["fvu"].as_f64().unwrap());
    assert!(trained["l0"].as_f64().unwrap() <= 16.0 + 1e-9);
    assert!(topk_alone().join("eval.json").exists() && topk_alone().join("feature_density.png").exists());
}

#[test]
fn training_writes_checkpoints_and_the_sae_to_a_real_s3_server() {
    let server = S3Server::moto("saes");
    let url = "s3://saes/runs/topk";
    let run = |args: &[&str]| {
        let mut cmd = Command::new(SAE);
        cmd.args(args).env("RUST_LOG", "warn");
        server.env(&mut cmd);
        cmd.output().unwrap()
    };
    let mut args = vec!["train", "--data", dataset(), "--out", url, "--checkpoint-every", "4", "--json"];
    args.extend_from_slice(RUN);
    args.extend_from_slice(&["--max-tokens", "5120"]);
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(last_json(&out)["steps"], 20);
    let out = run(&[
        "eval",
        "--sae",
        url,
        "--data",
        dataset(),
        "--eval-tokens",
        "512",
        "--density-tokens",
        "2048",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(last_json(&out)["ce_loss_score"].is_number());
}

#[test]
fn follow_trains_on_a_dataset_while_capture_writes_it() {
    let dir = scratch("followed");
    let url = dir.to_str().unwrap();
    // Shards of about 1 MiB (~1300 rows), so several commits arrive one after another.
    let mut capture = Command::new(SAE)
        .args(["capture", "--out", url, "--max-tokens", "6000", "--context-len", "64", "--batch-size", "4"])
        .args(["--threads", "1", "--row-group-rows", "256", "--shard-mib", "1"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Start training as soon as the first shard is committed, while capture goes on.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !dir.join("commits").exists() {
        assert!(capture.try_wait().unwrap().is_none(), "capture ended before its first commit");
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!dir.join("manifest.json").exists(), "capture finished too fast to test --follow");
    let mut args = vec!["train", "--data", url, "--out", "", "--follow", "--json"];
    let out_dir = scratch("followed-sae");
    args[4] = out_dir.to_str().unwrap();
    args.extend_from_slice(RUN);
    args.extend_from_slice(&["--max-tokens", "5120"]);
    let out = sae(&args);
    assert!(capture.wait().unwrap().success());
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = last_json(&out);
    assert_eq!(summary["tokens"], 5120, "{summary}");
    assert_eq!(summary["steps"], 20, "{summary}");
    // Rows arrive in commit order, so single intervals can be dominated by the rare outlier rows;
    // the loss must still come down over the run.
    let rows = metrics(&out_dir);
    assert_eq!(rows.len(), 4);
    let losses: Vec<f64> = rows.iter().map(|r| r["loss"].as_f64().unwrap()).collect();
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(out_dir.join("sae_weights.safetensors").exists() && dir.join("manifest.json").exists());
}

/// The step of a checkpoint file name, `step-000000025.safetensors`.
fn checkpoint_step(name: &str) -> u64 {
    name.trim_start_matches("step-").trim_end_matches(".safetensors").parse().unwrap()
}

/// The state JSON a checkpoint keeps in its safetensors header.
fn checkpoint_state(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    serde_json::from_str(header["__metadata__"]["checkpoint"].as_str().unwrap()).unwrap()
}

#[test]
fn follow_resumes_past_its_first_window_and_a_damaged_checkpoint_falls_back() {
    // 50 steps of 256 rows; a follow window is 8 row groups of 512 rows (16 steps).
    let follow: &[&str] = &["--follow", "--max-tokens", "12800"];
    let whole = scratch("follow-whole");
    let out = train(whole.to_str().unwrap(), follow);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(last_json(&out)["tokens"], 12800);

    // Killed past the first window (the resumed reader used to underflow there and the dead
    // loader thread read as the end of the data, finishing a third-trained SAE with exit 0).
    let dir = scratch("follow-killed");
    let mut newest = None;
    while newest.as_deref().map_or(0, checkpoint_step) < 25 {
        interrupt_with(&dir, follow, newest.clone(), "-KILL");
        newest = newest_checkpoint(&dir);
    }
    // Damage the newest checkpoint: one flipped bit in its last tensor byte.
    let newest = newest.unwrap();
    let path = dir.join("checkpoints").join(&newest);
    let mut bytes = std::fs::read(&path).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&path, bytes).unwrap();

    let out = train(dir.to_str().unwrap(), follow);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&newest) && err.contains("falling back to the previous checkpoint"), "{err}");
    let summary = last_json(&out);
    assert_eq!(summary["tokens"], 12800, "{summary}");
    assert_eq!(summary["resumed_from_step"].as_u64().unwrap(), checkpoint_step(&newest) - 5, "{summary}");
    assert_eq!(weights(&dir), weights(&whole), "resumed follow run differs from the uninterrupted one");
    assert_eq!(metrics_without_timing(&dir), metrics_without_timing(&whole));
}

#[test]
fn a_follow_run_with_the_norm_filter_and_its_own_window_resumes_bitwise() {
    // Both data settings in follow mode: windows of 3 row groups of 512 rows (6 steps) read in
    // commit order, and the filter's per-batch median.
    let follow: &[&str] = &["--follow", "--max-tokens", "12800", "--shuffle-window", "3", "--max-norm-multiple", "3"];
    let whole = scratch("follow-filtered-whole");
    let out = train(whole.to_str().unwrap(), follow);
    assert!(out.status.success(), "{}", stderr(&out));

    let dir = scratch("follow-filtered-killed");
    let mut newest = None;
    while newest.as_deref().map_or(0, checkpoint_step) < 15 {
        interrupt_with(&dir, follow, newest.clone(), "-KILL");
        newest = newest_checkpoint(&dir);
    }
    let out = train(dir.to_str().unwrap(), follow);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(last_json(&out)["resumed_from_step"].as_u64().unwrap() >= 15);
    assert_eq!(weights(&dir), weights(&whole), "resumed follow run differs from the uninterrupted one");
}

#[test]
fn a_resumed_follow_run_keeps_the_normalization_it_started_with() {
    // The first of two capture workers writes a dataset that is not final yet.
    let data = scratch("follow-growing");
    let data_url = data.to_str().unwrap();
    let capture = |worker: &str| {
        let out = sae_with(
            &["capture", "--out", data_url, "--worker", worker],
            "--max-tokens 6000 --context-len 64 --batch-size 4 --threads 2 --row-group-rows 256 --workers 2",
        );
        assert!(out.status.success(), "capture worker {worker}: {}", stderr(&out));
    };
    capture("0");
    let dir = scratch("follow-growing-sae");
    let mut args =
        vec!["train", "--data", data_url, "--out", dir.to_str().unwrap(), "--follow", "--checkpoint-every", "5"];
    args.extend_from_slice(RUN);
    args.extend_from_slice(&["--max-tokens", "5120"]);
    let mut child = spawn_sae(&args);
    wait_while_running(&mut child, "a checkpoint", || newest_checkpoint(&dir).is_some());
    child.kill().unwrap();
    child.wait().unwrap();
    let first = checkpoint_state(&dir.join("checkpoints").join(newest_checkpoint(&dir).unwrap()));
    let started_with = first["normalization"]["scale"].as_f64().unwrap();

    // The dataset grows to its final size (its statistics change), then the run resumes.
    capture("1");
    assert!(sae(&["dataset", "finalize", data_url, "--workers", "2"]).status.success());
    let out = sae(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("cfg.json")).unwrap()).unwrap();
    let exported = cfg["metadata"]["sae_pipeline"]["activation_scale"].as_f64().unwrap();
    assert_eq!(exported, started_with, "the resumed run changed its normalization");

    // A run started on the final dataset normalizes differently, so the check above can fail.
    let fresh = scratch("follow-growing-fresh");
    let mut fresh_args = args.clone();
    fresh_args[4] = fresh.to_str().unwrap();
    assert!(sae(&fresh_args).status.success());
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(fresh.join("cfg.json")).unwrap()).unwrap();
    assert_ne!(cfg["metadata"]["sae_pipeline"]["activation_scale"].as_f64().unwrap(), started_with);
}

/// A small synthetic dataset with d_model 64 under the same hook name.
fn narrow_dataset() -> String {
    let dir = scratch("narrow").display().to_string();
    let header = store::DatasetHeader {
        model: store::ModelIdentity { name: "synthetic".into(), file_sha256: String::new() },
        tokenizer: Default::default(),
        hooks: vec![store::HookSpec { name: HOOK.into(), d_model: 64 }],
        context_len: 8,
        corpus: Default::default(),
        created: Default::default(),
    };
    let mut writer = store::DatasetWriter::create(&dir, header, store::WriterOptions::default()).unwrap();
    let n = 512;
    let values: Vec<f32> = (0..n * 64).map(|i| ((i * 7919) % 113) as f32 / 10.0 - 5.0).collect();
    writer
        .append(store::RowBatch {
            sequence_id: (0..n as u64).map(|i| i / 7).collect(),
            position: (0..n as u32).map(|i| 1 + i % 7).collect(),
            token_id: (0..n as u32).collect(),
            activations: vec![(HOOK.into(), values)],
        })
        .unwrap();
    writer.finish().unwrap();
    dir
}

#[test]
fn bad_inputs_are_clear_errors() {
    let out_dir = scratch("bad");
    let out = out_dir.to_str().unwrap();
    let fails = |args: &[&str], needle: &str| {
        let result = sae(args);
        assert!(!result.status.success(), "{args:?} succeeded");
        let err = stderr(&result);
        assert!(err.contains(needle), "{args:?}: expected `{needle}` in: {err}");
    };
    fails(&["train", "--data", "/nonexistent/acts", "--out", out], "/nonexistent/acts");
    let data = dataset();
    fails(
        &["train", "--data", data, "--out", out, "--hook", "blocks.3.hook_resid_post"],
        "has no hook `blocks.3.hook_resid_post`",
    );
    fails(&["train", "--data", data, "--out", out, "--k", "0"], "k = 0");
    fails(&["train", "--data", data, "--out", out, "--latents", "0"], "width");
    fails(
        &["train", "--data", data, "--out", out, "--latents", "64", "--k", "65"],
        "k = 65 exceeds the SAE width d_sae = 64",
    );
    fails(&["train", "--data", data, "--out", out, "--arch", "sparse"], "unknown architecture `sparse`");
    fails(&["train", "--data", data, "--out", out, "--sweep", "lr=1,2"], "not sweepable");
    fails(&["train", "--data", data, "--out", "gs://bucket/x"], "unsupported scheme");
    // An SAE evaluated on activations of another width.
    let narrow = narrow_dataset();
    fails(
        &["eval", "--sae", topk_alone().to_str().unwrap(), "--data", &narrow, "--threads", "1"],
        "d_model mismatch: the SAE",
    );
    // A dataset still being written, without --follow.
    let partial = scratch("partial");
    std::fs::create_dir_all(&partial).unwrap();
    for entry in std::fs::read_dir(dataset()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "manifest.json" {
            copy_tree(&entry.path(), &partial.join(entry.file_name()));
        }
    }
    fails(&["train", "--data", partial.to_str().unwrap(), "--out", out], "is not final");
    // A damaged SAE file.
    let damaged = scratch("damaged");
    copy_tree(topk_alone(), &damaged);
    std::fs::write(damaged.join("sae_weights.safetensors"), b"garbage").unwrap();
    fails(&["eval", "--sae", damaged.to_str().unwrap(), "--data", data], "sae_weights.safetensors");
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

#[test]
fn feature_neighbors_are_sorted_exclude_the_feature_and_find_it_in_a_copy() {
    let sae_dir = topk_alone().to_str().unwrap();
    let out = sae(&["features", "neighbors", "--sae", sae_dir, "--feature", "3", "--top", "5", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let found = last_json(&out)["neighbors"].as_array().unwrap().clone();
    assert_eq!(found.len(), 5);
    let cosines: Vec<f64> = found.iter().map(|n| n["cosine"].as_f64().unwrap()).collect();
    assert!(cosines.windows(2).all(|w| w[0] >= w[1]), "{cosines:?}");
    assert!(found.iter().all(|n| n["feature"] != 3));
    // In another SAE that is a copy, the feature's nearest neighbour is itself, at cosine 1.
    let out =
        sae_with(&["features", "neighbors", "--sae", sae_dir, "--other-sae", sae_dir], "--feature 3 --top 1 --json");
    let best = &last_json(&out)["neighbors"][0];
    assert_eq!(best["feature"], 3);
    assert!((best["cosine"].as_f64().unwrap() - 1.0).abs() < 1e-5, "{best}");
    let out = sae(&["features", "neighbors", "--sae", sae_dir, "--feature", "1152"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("feature 1152 is out of range"), "{}", stderr(&out));
}

/// The random decoder start (the data start is the default, so every other resume test runs it).
#[test]
fn a_random_decoder_start_resumes_bitwise_and_is_part_of_the_configuration() {
    assert_setting_resumes_bitwise_and_is_configured(
        "decoder-init-random",
        &["--decoder-init", "random"],
        "the decoder started at the same directions either way",
        r#"decoder_init: there "random", here "data""#,
    );

    let bad = train(scratch("decoder-init-bad").to_str().unwrap(), &["--decoder-init", "zeros"]);
    assert!(!bad.status.success());
    let err = stderr(&bad);
    assert!(err.contains("`zeros` is not a decoder initialization (data or random)"), "{err}");
}
