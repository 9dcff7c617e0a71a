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

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod common;
#[path = "../../store/tests/common/mod.rs"]
mod store_common;

use common::{dataset_rows, newest_checkpoint, venv_bin};
use store_common::{moto, Fault, Proxy};

const SAE: &str = env!("CARGO_BIN_EXE_sae");
const HOOK: &str = "blocks.15.hook_resid_post";
/// No single process of this campaign should come near this; a hang fails the test instead.
const PROCESS_DEADLINE: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------------------------
// Campaign size, seeded placement and the per-scenario tally.

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a valid value")),
        Err(_) => default,
    }
}

/// Faults injected per scenario.
fn faults_per_scenario() -> usize {
    env_or("SAE_FAULT_KILLS", 2)
}

fn campaign_seed() -> u64 {
    env_or("SAE_FAULT_SEED", 13)
}

/// splitmix64, seeded from the campaign seed and the scenario's name, so that scenarios running
/// side by side do not share one sequence and each is reproducible alone.
struct Rng(u64);

impl Rng {
    fn for_scenario(name: &str) -> Rng {
        let mut h = campaign_seed() ^ 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        Rng(h)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform integer in [lo, hi].
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// What one scenario saw, printed as its summary line.
struct Tally {
    scenario: &'static str,
    started: Instant,
    planned: usize,
    /// Faults that hit a running process (a kill that came after the process had finished
    /// does not count).
    landed: usize,
    /// Final results compared with the uninterrupted run, and how many were equal.
    compared: usize,
    identical: usize,
    /// Runs that a fault made fail, each clearly (checked before counting).
    clear_failures: usize,
    /// `panicked at` in any process's stderr.
    panics: Vec<String>,
    /// The first clear failure's message, as an example for the report.
    example_failure: Option<String>,
}

impl Tally {
    fn new(scenario: &'static str) -> Tally {
        Tally {
            scenario,
            started: Instant::now(),
            planned: faults_per_scenario(),
            landed: 0,
            compared: 0,
            identical: 0,
            clear_failures: 0,
            panics: Vec::new(),
            example_failure: None,
        }
    }

    /// Every finished process goes through here, so that no panic goes unseen.
    fn saw(&mut self, run: &Finished) {
        if let Some(line) = run.stderr.lines().find(|l| l.contains("panicked at")) {
            self.panics.push(line.to_string());
        }
    }

    fn compared(&mut self, identical: bool) {
        self.compared += 1;
        self.identical += identical as usize;
    }

    /// A run that a fault made fail: it must fail clearly, naming `names_one_of`.
    fn failed_clearly(&mut self, run: &Finished, names_one_of: &[&str]) {
        assert_clear_failure(run, names_one_of);
        self.clear_failures += 1;
        if self.example_failure.is_none() {
            self.example_failure = Some(error_line(run));
        }
    }

    fn report(self) {
        let line = format!(
            "faults: {:<34} | faults {:>2}/{:<2} landed and survived | runs identical {:>2}/{:<2} | clear failures {:>2} | panics {} | {:.0} s",
            self.scenario,
            self.landed,
            self.planned,
            self.identical,
            self.compared,
            self.clear_failures,
            self.panics.len(),
            self.started.elapsed().as_secs_f64(),
        );
        println!("{line}");
        if let Some(example) = &self.example_failure {
            println!("faults: {:<34} | example failure: {example}", self.scenario);
        }
        if let Ok(path) = std::env::var("SAE_FAULT_SUMMARY") {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
            let mut text = format!("{line}\n");
            if let Some(example) = &self.example_failure {
                text.push_str(&format!("faults: {:<34} | example failure: {example}\n", self.scenario));
            }
            f.write_all(text.as_bytes()).unwrap();
        }
        assert!(self.panics.is_empty(), "{}: panics: {:?}", self.scenario, self.panics);
        assert_eq!(self.identical, self.compared, "{}: a final result differs", self.scenario);
    }
}

// ---------------------------------------------------------------------------------------------
// Processes whose output survives a kill.

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

/// A process whose stdout and stderr go to files, since a killed process's pipes would be lost.
struct Process {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    started: Instant,
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Finished {
    fn success(&self) -> bool {
        self.status.success()
    }
}

/// Start `cmd` with its output in `logs/<tag>.{out,err}`.
fn start(mut cmd: Command, logs: &Path, tag: &str) -> Process {
    std::fs::create_dir_all(logs).unwrap();
    let stdout = logs.join(format!("{tag}.out"));
    let stderr = logs.join(format!("{tag}.err"));
    let child = cmd
        .stdout(Stdio::from(std::fs::File::create(&stdout).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    Process { child, stdout, stderr, started: Instant::now() }
}

fn run(cmd: Command, logs: &Path, tag: &str) -> Finished {
    start(cmd, logs, tag).wait()
}

impl Process {
    fn running(&mut self) -> bool {
        assert!(self.started.elapsed() < PROCESS_DEADLINE, "a process ran for over {PROCESS_DEADLINE:?}");
        self.child.try_wait().unwrap().is_none()
    }

    /// Sleeps for `delay` unless the process ends first; true when it is still running.
    fn runs_for(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        while Instant::now() < until {
            if !self.running() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.running()
    }

    /// Polls `done` every 5 ms until it holds (true) or the process ends (false).
    fn runs_until(&mut self, mut done: impl FnMut() -> bool) -> bool {
        loop {
            if done() {
                return true;
            }
            if !self.running() {
                return done();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn signal(&self, signal: &str) {
        send_signal(self.child.id(), signal);
    }

    fn wait(mut self) -> Finished {
        let deadline = self.started + PROCESS_DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "a process ran for over {PROCESS_DEADLINE:?}: {}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Finished {
            status,
            took: self.started.elapsed(),
            stdout: std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        }
    }
}

fn send_signal(pid: u32, signal: &str) {
    // The process may have ended a moment ago; that is for the caller to find out.
    let _ = Command::new("kill").args([signal, &pid.to_string()]).stderr(Stdio::null()).status();
}

/// Every live descendant of `pid` (children first listed, then theirs), from /proc.
fn descendants(pid: u32) -> Vec<u32> {
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

/// Alive and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) != Some("Z"))
        .unwrap_or(false)
}

/// The last line of stderr that is not empty: where `sae` prints its error.
fn error_line(run: &Finished) -> String {
    run.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}

/// Non-zero exit by the program's own hand (not a signal), no panic, and the message names one
/// of `names_one_of` (the object's URL or key).
fn assert_clear_failure(run: &Finished, names_one_of: &[&str]) {
    assert!(!run.success(), "expected a failure, got success: {}", run.stderr);
    assert!(run.status.code().is_some(), "ended by a signal, not an error: {:?}\n{}", run.status, run.stderr);
    assert!(!run.stderr.contains("panicked at"), "a panic:\n{}", run.stderr);
    let message = error_line(run);
    assert!(
        names_one_of.iter().any(|n| message.contains(n)),
        "the error does not name {names_one_of:?}: {message}\nstderr:\n{}",
        run.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// Datasets.

/// Small windows and batches keep the captures short on 2 cores; shards of about 1 MiB (~1300
/// bf16 rows) so that a capture commits several shards and kills land between commits.
const CAPTURE: &[&str] =
    &["--context-len", "64", "--batch-size", "4", "--threads", "2", "--row-group-rows", "256", "--shard-mib", "1"];

fn capture_args(out: &str, tokens: u64) -> Vec<String> {
    let mut args = strings(&["capture", "--out", out, "--max-tokens", &tokens.to_string()]);
    args.extend(strings(CAPTURE));
    args
}

/// An uninterrupted capture, and how long it took: until `header.json` appeared (the model is
/// loaded by then) and in all.
struct Reference {
    url: String,
    header_after: Duration,
    took: Duration,
    shards: usize,
}

impl Reference {
    fn capture(name: &str, tokens: u64) -> Reference {
        let dir = scratch(name);
        let data = dir.join("data");
        let url = data.display().to_string();
        let mut p = start(sae_command(&capture_args(&url, tokens)), &dir.join("logs"), "capture");
        assert!(p.runs_until(|| data.join("header.json").exists()), "capture ended before writing its header");
        let header_after = p.started.elapsed();
        let finished = p.wait();
        assert!(finished.success(), "reference capture failed: {}", finished.stderr);
        let info = store::info(&url, &store::StoreOptions::default()).unwrap();
        assert_eq!(info.tokens, tokens);
        assert!(info.shards >= 2, "the reference should span several shards, has {}", info.shards);
        Reference { url, header_after, took: finished.took, shards: info.shards }
    }

    /// Where kill `i` of `planned` lands: after `commits` shards are committed (drawn from the
    /// i-th of `planned` equal stretches of the capture, never the last shard, which may be
    /// short), plus a seeded part of one shard's time (of the model's loading too, for the first
    /// shard).
    fn kill_point(&self, i: usize, planned: usize, rng: &mut Rng) -> (usize, Duration) {
        let shard_time = self.took.saturating_sub(self.header_after).div_f64(self.shards as f64);
        let stretch = |j: usize| j * (self.shards - 1) / planned;
        let commits =
            stretch(i) + rng.between(0, (stretch(i + 1).max(stretch(i) + 1) - stretch(i) - 1) as u64) as usize;
        let span = if commits == 0 { self.header_after + shard_time } else { shard_time };
        (commits, span.mul_f64(rng.uniform(0.0, 0.9)))
    }

    /// A seeded delay that lands after the header was written, while shards are being encoded
    /// and uploaded.
    fn upload_delay(&self, rng: &mut Rng) -> Duration {
        let work = self.took.saturating_sub(self.header_after);
        self.header_after + work.mul_f64(rng.uniform(0.0, 0.8))
    }

    /// Whether the dataset at `url` holds the reference's rows: token columns and bits.
    fn equals(&self, url: &str, opts: &store::StoreOptions) -> bool {
        let (rows_a, values_a) = dataset_rows(&self.url, HOOK, &store::StoreOptions::default());
        let (rows_b, values_b) = dataset_rows(url, HOOK, opts);
        rows_a == rows_b
            && values_a.len() == values_b.len()
            && values_a.iter().zip(&values_b).all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

/// 6,000 rows of real layer-15 activations (about 5 shards of 256-row groups), captured once:
/// the capture scenario's uninterrupted run and the training scenarios' data.
fn base() -> &'static Reference {
    static BASE: OnceLock<Reference> = OnceLock::new();
    BASE.get_or_init(|| Reference::capture("base", 6000))
}

/// 2,600 rows (2 shards): the S3 scenarios capture this many again and again.
fn small() -> &'static Reference {
    static SMALL: OnceLock<Reference> = OnceLock::new();
    SMALL.get_or_init(|| Reference::capture("small", 2600))
}

fn commits_of(dataset: &Path, worker: &str) -> usize {
    std::fs::read_dir(dataset.join("commits").join(worker))
        .map(|d| d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().ends_with(".json")).count())
        .unwrap_or(0)
}

fn verify(url: &str, env: &dyn Fn(&mut Command), logs: &Path, tag: &str) -> Finished {
    let mut cmd = sae_command(&strings(&["dataset", "verify", url]));
    env(&mut cmd);
    run(cmd, logs, tag)
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

#[derive(Clone, Copy, PartialEq)]
enum Launch {
    OneProcess,
    /// torchrun with 2 ranks (Gloo on CPU).
    Torchrun,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn launch(how: Launch, args: &[String]) -> Command {
    match how {
        Launch::OneProcess => sae_command(args),
        Launch::Torchrun => {
            let mut cmd = Command::new(venv_bin("torchrun"));
            cmd.args(["--no-python", "--nproc-per-node", "2", "--master-port", &free_port().to_string(), SAE])
                .args(args)
                .env("RUST_LOG", "warn");
            cmd
        }
    }
}

fn checkpoint_step(name: &str) -> u64 {
    name.trim_start_matches("step-").trim_end_matches(".safetensors").parse().unwrap()
}

/// Metrics rows without the fields that measure time, which differ between any two runs.
fn metrics_without_timing(text: &str) -> Vec<serde_json::Value> {
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

/// Same weights file, byte for byte, and the same metrics but for timing.
fn same_run(a: &Path, b: &Path) -> bool {
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    read(a, "sae_weights.safetensors") == read(b, "sae_weights.safetensors")
        && metrics_without_timing(&String::from_utf8(read(a, "metrics.jsonl")).unwrap())
            == metrics_without_timing(&String::from_utf8(read(b, "metrics.jsonl")).unwrap())
}

/// One training scenario: an uninterrupted run, then a run interrupted `planned` times (SIGKILL
/// and SIGTERM in turn) at seeded steps spread over the run, each resumed, and the final
/// weights and metrics compared.
fn train_with_kills(scenario: &'static str, how: Launch, settings: &[&str], total_steps: u64) -> Tally {
    let mut tally = Tally::new(scenario);
    let mut rng = Rng::for_scenario(scenario);
    let dir = scratch(scenario);
    let logs = dir.join("logs");
    let every = 5;
    let args_for = |out: &Path| {
        let mut args = strings(&["train", "--data", &base().url, "--out", out.to_str().unwrap()]);
        args.extend(strings(&[
            "--latents",
            "1152",
            "--k",
            "16",
            "--lr",
            "1e-3",
            "--threads",
            "1",
            "--log-every",
            "5",
            "--no-eval",
            "--quiet",
            "--json",
            "--checkpoint-every",
            &every.to_string(),
        ]));
        args.extend(strings(settings));
        args
    };
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
            // A lost node or a batch system's hard kill: the launcher and both ranks at once
            // (the ranks run in their own session, so killing torchrun alone would orphan them).
            let ranks = descendants(p.child.id());
            p.signal(signal);
            for pid in &ranks {
                send_signal(*pid, signal);
            }
            let f = p.wait();
            tally.saw(&f);
            let deadline = Instant::now() + Duration::from_secs(30);
            while ranks.iter().any(|&pid| alive(pid)) {
                assert!(Instant::now() < deadline, "ranks outlived SIGKILL");
                std::thread::sleep(Duration::from_millis(10));
            }
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
    tally.compared(same_run(&whole, &out));
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
    // 128 rows per rank: 256 per step, as in one process.
    let tally = train_with_kills(
        "train torchrun x2: SIGKILL/SIGTERM",
        Launch::Torchrun,
        &["--batch-size", "128", "--max-tokens", &tokens, "--dist-timeout", "60"],
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

const S3S_ACCESS_KEY: &str = "SAEFAULTSACCESSKEY";
const S3S_SECRET_KEY: &str = "sae-faults-secret-key-0123456789";
const S3S_BUCKET: &str = "faults";

/// s3s-fs on a fixed port and folder; `crash` SIGKILLs the server process itself.
struct RestartableS3 {
    port: u16,
    dir: PathBuf,
    /// The shell watchdog that ends the server if this test process dies.
    watchdog: Child,
}

impl RestartableS3 {
    fn start(dir: &Path, port: u16) -> RestartableS3 {
        std::fs::create_dir_all(dir.join(S3S_BUCKET)).unwrap();
        let args = strings(&[
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--access-key",
            S3S_ACCESS_KEY,
            "--secret-key",
            S3S_SECRET_KEY,
            dir.to_str().unwrap(),
        ]);
        let bin = store_common::s3s_fs_binary();
        // A restart right after a crash may find the port still held for a moment.
        for _ in 0..20 {
            let mut watchdog = store_common::spawn_watched(bin.to_str().unwrap(), &args, None);
            if store_common::wait_listening(port, &mut watchdog, "s3s-fs") {
                return RestartableS3 { port, dir: dir.to_path_buf(), watchdog };
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("s3s-fs would not start on port {port}");
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn crash(&mut self) {
        for pid in descendants(self.watchdog.id()) {
            send_signal(pid, "-KILL");
        }
        let _ = self.watchdog.wait();
    }

    fn restart(&mut self) {
        self.crash();
        *self = RestartableS3::start(&self.dir.clone(), self.port);
    }

    fn options(&self) -> store::StoreOptions {
        store_common::s3_options(&self.endpoint(), S3S_ACCESS_KEY, S3S_SECRET_KEY, 3)
    }
}

impl Drop for RestartableS3 {
    fn drop(&mut self) {
        self.crash();
    }
}

/// The environment that points `sae` at an S3 endpoint.
fn s3_env(endpoint: &str, access_key: &str, secret_key: &str) -> impl Fn(&mut Command) {
    let (endpoint, access_key, secret_key) = (endpoint.to_string(), access_key.to_string(), secret_key.to_string());
    move |cmd: &mut Command| {
        cmd.env("AWS_ENDPOINT", &endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", &access_key)
            .env("AWS_SECRET_ACCESS_KEY", &secret_key)
            // The test proxy serves one request per connection, so a pooled connection that it
            // closed would be a fault of the proxy's own rather than one the campaign injects.
            .env("AWS_POOL_MAX_IDLE_PER_HOST", "0");
    }
}

fn with_env(mut cmd: Command, env: &dyn Fn(&mut Command)) -> Command {
    env(&mut cmd);
    cmd
}

/// A failed capture leaves nothing torn: no manifest, or one whose every shard verifies.
fn nothing_torn(url: &str, env: &dyn Fn(&mut Command), opts: &store::StoreOptions, logs: &Path, tag: &str) {
    if store::info(url, opts).map(|i| i.is_final).unwrap_or(false) {
        let v = verify(url, env, logs, tag);
        assert!(v.success(), "a failed capture left a final dataset that does not verify: {}{}", v.stdout, v.stderr);
    }
}

#[test]
fn capture_to_s3_survives_a_server_restart_mid_upload() {
    let mut tally = Tally::new("s3 capture: server restarted");
    let mut rng = Rng::for_scenario("s3-restart");
    let reference = small();
    let dir = scratch("s3-restart");
    let logs = dir.join("logs");
    let mut server = RestartableS3::start(&dir.join("objects"), free_port());
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

/// The i-th fault of a kind: a short burst (within the client's 10 retries), a longer burst on
/// one method, or an outage that lasts until the process gives up.
fn storm(i: usize, rng: &mut Rng) -> (Fault, Option<&'static str>) {
    match i % 3 {
        0 => (Fault::Http503(usize::MAX), None),
        1 => (Fault::Http503(rng.between(1, 6) as usize), None),
        _ => (Fault::Http503(rng.between(8, 40) as usize), Some("PUT")),
    }
}

fn drops(i: usize, rng: &mut Rng) -> (Fault, Option<&'static str>) {
    match i % 3 {
        0 => (Fault::Drop(usize::MAX), None),
        1 => (Fault::Drop(rng.between(1, 4) as usize), None),
        _ => (Fault::Drop(rng.between(2, 12) as usize), Some(if rng.between(0, 1) == 0 { "PUT" } else { "GET" })),
    }
}

/// Waits for `p`, holding `fault` on the proxy from `delay` after its start until it ends.
/// Returns the run and whether a fault hit one of its requests.
fn run_with_fault(
    mut p: Process,
    proxy: &Proxy,
    delay: Duration,
    (fault, method): (Fault, Option<&'static str>),
) -> (Finished, bool) {
    let before = proxy.injected();
    if p.runs_for(delay) {
        proxy.set(fault, method);
    }
    let f = p.wait();
    proxy.set(Fault::Pass, None);
    (f, proxy.injected() > before)
}

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

fn s3_train_args(data: &str, out: &str) -> Vec<String> {
    strings(&[
        "train",
        "--data",
        data,
        "--out",
        out,
        "--latents",
        "1152",
        "--k",
        "16",
        "--batch-size",
        "256",
        "--max-tokens",
        "10240",
        "--lr",
        "1e-3",
        "--threads",
        "1",
        "--log-every",
        "5",
        "--no-eval",
        "--quiet",
        "--json",
        "--checkpoint-every",
        "5",
    ])
}

fn s3_training_faults(scenario: &'static str, fault_for: fn(usize, &mut Rng) -> (Fault, Option<&'static str>)) {
    let mut tally = Tally::new(scenario);
    let mut rng = Rng::for_scenario(scenario);
    let data = s3_training_data();
    let dir = scratch(scenario);
    let logs = dir.join("logs");
    let whole = dir.join("whole");
    let direct_env = s3_env(&moto().endpoint, "test", "test");
    let f = run(with_env(sae_command(&s3_train_args(data, whole.to_str().unwrap())), &direct_env), &logs, "whole");
    tally.saw(&f);
    assert!(f.success(), "{}", f.stderr);
    let took = f.took;

    let proxy = Proxy::start(moto().port);
    let env = s3_env(&proxy.endpoint(), "test", "test");
    let direct = moto().options(3);
    for i in 0..tally.planned {
        let out = moto().url("faults-train");
        let args = s3_train_args(data, &out);
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
            && metrics_without_timing(std::str::from_utf8(&get("metrics.jsonl")).unwrap())
                == metrics_without_timing(std::str::from_utf8(&read("metrics.jsonl")).unwrap());
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
