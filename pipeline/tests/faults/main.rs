//! A fault campaign against the `sae` program: seeded SIGKILLs and SIGTERMs at random points of
//! capture and training (one process, torchrun with 2 ranks, `--follow`), an S3 server restarted
//! mid-upload, 503 storms and dropped connections, and finalize racing a late worker. Every
//! interrupted run is resumed by running the same command again and must end equal to the
//! uninterrupted run, bit for bit; a run that fails must fail clearly (non-zero exit, a message
//! naming what failed, no panic) and leave nothing torn behind.
//!
//! Size and placement: `SAE_FAULT_KILLS` faults per scenario (default 2, which keeps this file
//! to a few minutes inside `make test`), `SAE_FAULT_SEED` for where they land (default 13).
//! Each scenario prints one summary line starting with `faults:` (with `--nocapture`), and
//! appends it to the file `SAE_FAULT_SUMMARY` names, if any; `make faults` runs 10 per scenario
//! and prints those lines.
//!
//! The seed fixes the delays and the steps aimed at, not the exact instruction a kill lands on:
//! the processes run on a shared machine, so the same seed gives nearby, not identical, points.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod campaign;
#[path = "../common/mod.rs"]
mod common;
mod process;
mod reference;
mod s3;
#[path = "../../../store/tests/common/mod.rs"]
mod store_common;
mod training;

use campaign::{faults_per_scenario, Rng, Tally};
use common::{metrics_text_without_timing, newest_checkpoint};
use process::{assert_clear_failure, run, start};
use reference::{base, capture_args, commits_of, small, verify};
use s3::{drops, nothing_torn, run_with_fault, s3_env, storm, with_env, RestartableS3, S3S_BUCKET};
use s3::{S3S_ACCESS_KEY, S3S_SECRET_KEY};
use store_common::{moto, Fault, Proxy, TestStoreOptions};
use training::CHECKPOINT_EVERY;
use training::{checkpoint_step, kill_launcher_and_ranks, launch, run_difference, train_args, Launch};

const SAE: &str = env!("CARGO_BIN_EXE_sae");
const HOOK: &str = "blocks.15.hook_resid_post";

/// A fresh folder for a scenario, named after it (letters and digits only).
fn scratch(name: &str) -> PathBuf {
    let name: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("faults").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sae_command(args: &[String]) -> Command {
    let mut cmd = Command::new(SAE);
    cmd.args(args).env("RUST_LOG", "warn");
    cmd
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// Capture: SIGKILL at seeded random points, each followed by a resume.

#[test]
fn capture_killed_at_random_points_resumes_to_the_uninterrupted_dataset() {
    let mut tally = Tally::new("capture: SIGKILL + resume");
    let mut rng = Rng::for_scenario("capture-sigkill");
    let reference = base();
    let dir = scratch("capture-killed");
    let (data, logs) = (dir.join("data"), dir.join("logs"));
    let url = data.display().to_string();
    let args = capture_args(&url, 6000);
    for i in 0..tally.planned {
        let (commits, delay) = reference.kill_point(i, tally.planned, &mut rng);
        let mut p = start(sae_command(&args), &logs, &format!("run-{i}"));
        let since = Instant::now();
        let reached = p.runs_until(|| commits_of(&data, "w00000") >= commits);
        // The delay counts from the target commit, or from the start for the first shard.
        let waited = if commits == 0 { since.elapsed() } else { Duration::ZERO };
        if !(reached && p.runs_for(delay.saturating_sub(waited))) {
            let f = p.wait();
            tally.saw(&f);
            assert!(f.success(), "capture failed without a fault: {}", f.stderr);
            break; // finished before the kill: there is nothing left to interrupt
        }
        p.signal("-KILL");
        let f = p.wait();
        tally.saw(&f);
        if f.status.signal() == Some(9) {
            tally.landed += 1;
            assert!(!data.join("manifest.json").exists(), "a killed capture left a manifest");
        }
    }
    let f = run(sae_command(&args), &logs, "final");
    tally.saw(&f);
    assert!(f.success(), "the resumed capture failed: {}", f.stderr);
    tally.compared(reference.equals(&url, &store::StoreOptions::default()));
    let v = verify(&url, &|_| {}, &logs, "verify");
    assert!(v.success(), "{}{}", v.stdout, v.stderr);
    tally.report();
}

// ---------------------------------------------------------------------------------------------
// Training: SIGKILL and SIGTERM in turn at seeded random steps, each resumed.

/// One training scenario: an uninterrupted run, then a run interrupted `planned` times (SIGKILL
/// and SIGTERM in turn) at seeded steps spread over the run, each resumed, and the final
/// weights and metrics compared.
fn train_with_kills(scenario: &'static str, how: Launch, settings: &[&str], total_steps: u64) -> Tally {
    let mut tally = Tally::new(scenario);
    let mut rng = Rng::for_scenario(scenario);
    let dir = scratch(scenario);
    let logs = dir.join("logs");
    let every = CHECKPOINT_EVERY;
    let args_for = |out: &Path| train_args(&base().url, out.to_str().unwrap(), settings);
    let whole = dir.join("whole");
    let f = run(launch(how, &args_for(&whole)), &logs, "whole");
    tally.saw(&f);
    assert!(f.success(), "uninterrupted run failed: {}", f.stderr);
    assert!(whole.join("result.json").exists());
    let step_time = f.took.div_f64(total_steps as f64);

    let out = dir.join("interrupted");
    let args = args_for(&out);
    let planned = tally.planned as u64;
    // Kill i aims at a step drawn from the i-th of `planned` equal stretches of the run, so that
    // kills spread over the whole run whatever their number.
    let (first, last) = (every, total_steps - every);
    let mut seen = None;
    let mut deepest_kill = 0;
    for i in 0..planned {
        let stretch = |j: u64| first + (last - first) * j / planned;
        let target = rng.between(stretch(i), stretch(i + 1).max(stretch(i) + 1) - 1);
        let signal = if i % 2 == 0 { "-KILL" } else { "-TERM" };
        let mut p = start(launch(how, &args), &logs, &format!("run-{i}"));
        // Wait for a checkpoint newer than the last one seen and at least at the target's
        // checkpoint, then a seeded part of a checkpoint interval, to land between checkpoints.
        let reached = p.runs_until(|| {
            let newest = newest_checkpoint(&out);
            newest.is_some() && newest != seen && checkpoint_step(newest.as_deref().unwrap()) >= target / every * every
        });
        let landed = reached && p.runs_for(step_time.mul_f64(rng.uniform(0.0, every as f64)));
        if !landed {
            let f = p.wait();
            tally.saw(&f);
            assert!(f.success(), "training failed without a fault: {}", f.stderr);
            break; // finished before the signal: nothing left to interrupt
        }
        let newest_before = newest_checkpoint(&out).map(|n| checkpoint_step(&n)).unwrap_or(0);
        if how == Launch::Torchrun && signal == "-KILL" {
            tally.saw(&kill_launcher_and_ranks(p));
        } else {
            // torchrun passes SIGTERM on to its ranks, which checkpoint and stop.
            p.signal(signal);
            let f = p.wait();
            tally.saw(&f);
            if out.join("result.json").exists() {
                assert!(f.success(), "{}", f.stderr);
                break; // the signal came as the run finished
            }
            match (how, signal) {
                (Launch::OneProcess, "-TERM") => {
                    assert_eq!(f.status.code(), Some(130), "SIGTERM: a checkpoint, then exit 130: {}", f.stderr)
                }
                (Launch::OneProcess, _) => assert_eq!(f.status.signal(), Some(9)),
                _ => assert!(!f.success(), "torchrun reported success after SIGTERM"),
            }
        }
        assert!(!out.join("result.json").exists(), "an interrupted run looks finished");
        tally.landed += 1;
        deepest_kill = deepest_kill.max(newest_before);
        seen = newest_checkpoint(&out);
    }
    let f = run(launch(how, &args), &logs, "final");
    tally.saw(&f);
    assert!(f.success(), "the resumed run failed: {}", f.stderr);
    let difference = run_difference(&whole, &out);
    if let Some(difference) = &difference {
        // Say what differs and where the interruptions stopped, so a failure can be read from the
        // log alone (the scratch folder is overwritten by the next run).
        let stops: Vec<String> = std::fs::read_dir(&logs)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .flat_map(|text| {
                text.lines().filter(|l| l.contains("interrupted at step")).map(String::from).collect::<Vec<_>>()
            })
            .collect();
        println!(
            "faults: {scenario}: the resumed run differs from the uninterrupted one: {difference}; stops: {stops:?}"
        );
    }
    tally.compared(difference.is_none());
    println!("faults: {scenario:<34} | deepest kill after checkpoint step {deepest_kill} of {total_steps}");
    tally
}

/// Enough steps that every kill gets a stretch of at least ~8 steps (more than one checkpoint
/// interval) to itself.
fn train_steps() -> u64 {
    60.max(10 + 8 * faults_per_scenario() as u64)
}

#[test]
fn one_process_training_killed_and_terminated_resumes_bitwise() {
    let steps = train_steps();
    let tokens = (256 * steps).to_string();
    let tally = train_with_kills(
        "train: SIGKILL/SIGTERM + resume",
        Launch::OneProcess,
        &["--batch-size", "256", "--max-tokens", &tokens],
        steps,
    );
    tally.report();
}

#[test]
fn torchrun_training_killed_and_terminated_resumes_bitwise() {
    let steps = train_steps();
    let tokens = (256 * steps).to_string();
    // 128 rows per rank: 256 per step, as in one process. Rows every 7 steps put most checkpoints
    // between rows, so resumes restore every rank's unlogged sums (averaging them into the
    // checkpoint once changed the next row's last bits).
    let tally = train_with_kills(
        "train torchrun x2: SIGKILL/SIGTERM",
        Launch::Torchrun,
        &["--batch-size", "128", "--max-tokens", &tokens, "--dist-timeout", "60", "--log-every", "7"],
        steps,
    );
    tally.report();
}

#[test]
fn follow_training_killed_and_terminated_resumes_bitwise() {
    // One pass in commit order over the 6,000 rows: 88 steps of 64 rows. A follow window is 8
    // row groups of 256 rows (32 steps), so kills land in all three windows.
    let steps = 88;
    let tally = train_with_kills(
        "train --follow: SIGKILL/SIGTERM",
        Launch::OneProcess,
        &["--follow", "--batch-size", "64", "--max-tokens", &(64 * steps).to_string()],
        steps,
    );
    tally.report();
}

// ---------------------------------------------------------------------------------------------
// S3: a server restarted mid-upload (s3s-fs keeps its objects in files, so they outlive it).

#[test]
fn capture_to_s3_survives_a_server_restart_mid_upload() {
    let mut tally = Tally::new("s3 capture: server restarted");
    let mut rng = Rng::for_scenario("s3-restart");
    let reference = small();
    let dir = scratch("s3-restart");
    let logs = dir.join("logs");
    let mut server = RestartableS3::start(&dir.join("objects"), common::free_port());
    let env = s3_env(&server.endpoint(), S3S_ACCESS_KEY, S3S_SECRET_KEY);
    for i in 0..tally.planned {
        let url = format!("s3://{S3S_BUCKET}/capture-{i}");
        let args = capture_args(&url, 2600);
        let mut p = start(with_env(sae_command(&args), &env), &logs, &format!("capture-{i}"));
        if p.runs_for(reference.upload_delay(&mut rng)) {
            server.crash();
            std::thread::sleep(Duration::from_secs_f64(rng.uniform(0.1, 3.0)));
            server.restart();
            tally.landed += 1;
        }
        let f = p.wait();
        tally.saw(&f);
        if !f.success() {
            tally.failed_clearly(&f, &[&url]);
            nothing_torn(&url, &env, &server.options(), &logs, &format!("verify-{i}"));
            let again = run(with_env(sae_command(&args), &env), &logs, &format!("rerun-{i}"));
            tally.saw(&again);
            assert!(again.success(), "the rerun after a restart failed: {}", again.stderr);
        }
        tally.compared(reference.equals(&url, &server.options()));
    }
    tally.report();
}

// ---------------------------------------------------------------------------------------------
// S3: 503 storms and dropped connections, through a fault-injecting proxy in front of moto.

fn s3_capture_faults(scenario: &'static str, fault_for: fn(usize, &mut Rng) -> (Fault, Option<&'static str>)) {
    let mut tally = Tally::new(scenario);
    let mut rng = Rng::for_scenario(scenario);
    let reference = small();
    let dir = scratch(scenario);
    let logs = dir.join("logs");
    let proxy = Proxy::start(moto().port);
    let env = s3_env(&proxy.endpoint(), "test", "test");
    let direct = moto().options(3);
    for i in 0..tally.planned {
        let url = moto().url("faults-capture");
        let args = capture_args(&url, 2600);
        let p = start(with_env(sae_command(&args), &env), &logs, &format!("capture-{i}"));
        let (f, hit) = run_with_fault(p, &proxy, reference.upload_delay(&mut rng), fault_for(i, &mut rng));
        tally.saw(&f);
        tally.landed += hit as usize;
        if !f.success() {
            tally.failed_clearly(&f, &[&url]);
            nothing_torn(&url, &env, &direct, &logs, &format!("verify-{i}"));
            let again = run(with_env(sae_command(&args), &env), &logs, &format!("rerun-{i}"));
            tally.saw(&again);
            assert!(again.success(), "the rerun failed: {}", again.stderr);
        }
        tally.compared(reference.equals(&url, &direct));
    }
    tally.report();
}

#[test]
fn capture_through_503_storms_finishes_identically_or_fails_clearly() {
    s3_capture_faults("s3 capture: 503 storms", storm);
}

#[test]
fn capture_through_dropped_connections_finishes_identically_or_fails_clearly() {
    s3_capture_faults("s3 capture: dropped connections", drops);
}

/// The small dataset again, on moto (captured without faults), for training through the proxy.
fn s3_training_data() -> &'static str {
    static DATA: OnceLock<String> = OnceLock::new();
    DATA.get_or_init(|| {
        let url = moto().url("faults-training-data");
        let logs = scratch("s3-training-data");
        let f = run(
            with_env(sae_command(&capture_args(&url, 2600)), &s3_env(&moto().endpoint, "test", "test")),
            &logs,
            "capture",
        );
        assert!(f.success(), "{}", f.stderr);
        assert!(small().equals(&url, &moto().options(3)));
        url
    })
}

/// 40 steps of 256 rows.
const S3_TRAIN: &[&str] = &["--batch-size", "256", "--max-tokens", "10240"];

fn s3_training_faults(scenario: &'static str, fault_for: fn(usize, &mut Rng) -> (Fault, Option<&'static str>)) {
    let mut tally = Tally::new(scenario);
    let mut rng = Rng::for_scenario(scenario);
    let data = s3_training_data();
    let dir = scratch(scenario);
    let logs = dir.join("logs");
    let whole = dir.join("whole");
    let direct_env = s3_env(&moto().endpoint, "test", "test");
    let f =
        run(with_env(sae_command(&train_args(data, whole.to_str().unwrap(), S3_TRAIN)), &direct_env), &logs, "whole");
    tally.saw(&f);
    assert!(f.success(), "{}", f.stderr);
    let took = f.took;

    let proxy = Proxy::start(moto().port);
    let env = s3_env(&proxy.endpoint(), "test", "test");
    let direct = moto().options(3);
    for i in 0..tally.planned {
        let out = moto().url("faults-train");
        let args = train_args(data, &out, S3_TRAIN);
        let p = start(with_env(sae_command(&args), &env), &logs, &format!("train-{i}"));
        let (f, hit) = run_with_fault(p, &proxy, took.mul_f64(rng.uniform(0.0, 0.8)), fault_for(i, &mut rng));
        tally.saw(&f);
        tally.landed += hit as usize;
        let objects = store::ObjectDir::open(&out, &direct).unwrap();
        if !f.success() {
            tally.failed_clearly(&f, &[&out, data]);
            assert!(objects.get("result.json").unwrap().is_none(), "a failed run wrote result.json");
            let again = run(with_env(sae_command(&args), &env), &logs, &format!("rerun-{i}"));
            tally.saw(&again);
            assert!(again.success(), "the rerun failed: {}", again.stderr);
        }
        let get = |name: &str| objects.get(name).unwrap().unwrap_or_else(|| panic!("{out}: no {name}"));
        let read = |name: &str| std::fs::read(whole.join(name)).unwrap();
        let identical = get("sae_weights.safetensors")[..] == read("sae_weights.safetensors")[..]
            && metrics_text_without_timing(std::str::from_utf8(&get("metrics.jsonl")).unwrap())
                == metrics_text_without_timing(std::str::from_utf8(&read("metrics.jsonl")).unwrap());
        tally.compared(identical);
    }
    tally.report();
}

#[test]
fn training_through_503_storms_finishes_identically_or_fails_clearly() {
    s3_training_faults("s3 train: 503 storms", storm);
}

#[test]
fn training_through_dropped_connections_finishes_identically_or_fails_clearly() {
    s3_training_faults("s3 train: dropped connections", drops);
}

/// A run whose checkpoint upload of `failing_step` fails for good must fail clearly, and the
/// rerun resumes from the checkpoint before it and must end equal to an uninterrupted run, bit
/// for bit: weights and every metrics row. With `log_every` not dividing the resumed step, the
/// resumed run starts between two metrics rows, from the sums the checkpoint kept.
fn training_after_a_failed_checkpoint_upload(log_every: &str, failing_step: u64) {
    let scenario = format!("failed checkpoint upload, log-every {log_every}, step {failing_step}");
    let settings = [S3_TRAIN, &["--log-every", log_every]].concat();
    let data = s3_training_data();
    let dir = scratch(&scenario);
    let logs = dir.join("logs");
    let whole = dir.join("whole");
    let direct_env = s3_env(&moto().endpoint, "test", "test");
    let f =
        run(with_env(sae_command(&train_args(data, whole.to_str().unwrap(), &settings)), &direct_env), &logs, "whole");
    assert!(f.success(), "{}", f.stderr);

    let proxy = Proxy::start(moto().port);
    let key = format!("checkpoints/step-{failing_step:09}.safetensors");
    proxy.set_for_path(Fault::Http503(usize::MAX), Some("PUT"), &key);
    let env = s3_env(&proxy.endpoint(), "test", "test");
    let out = moto().url("faults-failed-checkpoint");
    let args = train_args(data, &out, &settings);
    let failed = run(with_env(sae_command(&args), &env), &logs, "failed");
    assert!(proxy.injected() > 0, "{scenario}: the fault never hit");
    assert_clear_failure(&failed, &[&key]);
    let objects = store::ObjectDir::open(&out, &moto().options(3)).unwrap();
    assert!(objects.get("result.json").unwrap().is_none(), "a failed run wrote result.json");

    proxy.set(Fault::Pass, None);
    let again = run(with_env(sae_command(&args), &env), &logs, "rerun");
    assert!(again.success(), "the rerun failed: {}", again.stderr);
    let resumed_from = failing_step - CHECKPOINT_EVERY;
    let summary: serde_json::Value = serde_json::from_str(again.stdout.lines().last().unwrap_or("")).unwrap();
    assert_eq!(summary["resumed_from_step"], resumed_from, "{scenario}: {summary}");
    let get = |name: &str| objects.get(name).unwrap().unwrap_or_else(|| panic!("{out}: no {name}"));
    let read = |name: &str| std::fs::read(whole.join(name)).unwrap();
    assert!(get("sae_weights.safetensors")[..] == read("sae_weights.safetensors")[..], "{scenario}: weights differ");
    let text = |bytes: &[u8]| metrics_text_without_timing(std::str::from_utf8(bytes).unwrap());
    assert_eq!(text(&get("metrics.jsonl")), text(&read("metrics.jsonl")), "{scenario}: metrics differ");
}

#[test]
fn a_failed_checkpoint_upload_resumes_identically_on_a_metrics_row() {
    training_after_a_failed_checkpoint_upload("5", 25);
}

#[test]
fn a_failed_checkpoint_upload_resumes_identically_between_metrics_rows() {
    training_after_a_failed_checkpoint_upload("4", 15);
}

// ---------------------------------------------------------------------------------------------
// Finalize racing a late worker.

#[test]
fn finalize_racing_a_late_worker_keeps_its_manifest_and_the_late_worker_fails() {
    let mut tally = Tally::new("finalize vs a late worker");
    let mut rng = Rng::for_scenario("late-worker");
    let reference = small();
    let dir = scratch("late-worker");
    let logs = dir.join("logs");
    for i in 0..tally.planned {
        let data = dir.join(format!("data-{i}"));
        let url = data.display().to_string();
        let worker = |index: &str, of: &str| {
            let mut args = capture_args(&url, 2600);
            args.extend(strings(&["--worker", index, "--workers", of]));
            sae_command(&args)
        };
        // Two kinds of late worker: a straggling duplicate of worker 1 (a requeued array task
        // whose first instance was not dead), and a worker started with another worker count.
        let (late, late_id) = if i % 2 == 0 { (worker("1", "2"), "w00001") } else { (worker("2", "3"), "w00002") };
        let mut straggler = start(late, &logs, &format!("late-{i}"));
        assert!(straggler.runs_until(|| data.join("header.json").exists()), "the late worker ended early");
        // Past its start-up checks (it found no manifest), before its first commit: stopped.
        straggler.runs_for(Duration::from_secs_f64(rng.uniform(0.2, 0.8)));
        straggler.signal("-STOP");
        assert_eq!(commits_of(&data, late_id), 0, "the late worker committed before it was stopped");
        for (index, tag) in [("1", "w1"), ("0", "w0")] {
            let f = run(worker(index, "2"), &logs, &format!("{tag}-{i}"));
            tally.saw(&f);
            assert!(f.success(), "worker {index}: {}", f.stderr);
        }
        let f = run(
            sae_command(&strings(&["dataset", "finalize", &url, "--workers", "2"])),
            &logs,
            &format!("finalize-{i}"),
        );
        tally.saw(&f);
        assert!(f.success(), "finalize: {}", f.stderr);
        let manifest = std::fs::read(data.join("manifest.json")).unwrap();

        straggler.signal("-CONT");
        let f = straggler.wait();
        tally.saw(&f);
        tally.landed += 1;
        tally.failed_clearly(&f, &["manifest.json", &format!("commits/{late_id}")]);
        assert_eq!(std::fs::read(data.join("manifest.json")).unwrap(), manifest, "the manifest changed");
        // The late worker removed what it wrote: the dataset verifies, with no object the
        // manifest does not list.
        let v = verify(&url, &|_| {}, &logs, &format!("verify-{i}"));
        assert!(v.success(), "verify: {}{}", v.stdout, v.stderr);
        assert!(!v.stdout.contains("UNLISTED") && !v.stdout.contains("BAD"), "verify: {}", v.stdout);
        tally.compared(reference.equals(&url, &store::StoreOptions::default()));
    }
    tally.report();
}
