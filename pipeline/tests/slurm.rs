//! The job files of workflows/slurm/, submitted with sbatch to a real single-node Slurm cluster
//! (Debian's slurm-wlm and munge, started on loopback by scripts/slurm-local.sh and stopped at
//! the end, also on failure), against a real S3 server (moto) on the real model and corpus:
//! - a 2-task capture array and a finalize job that waits on it give a dataset equal, row for
//!   row, to a one-worker capture;
//! - train.sbatch with 2 tasks (Gloo on CPU) trains and exports;
//! - a training job requeued by `scontrol requeue` resumes from its checkpoint and ends with the
//!   same weights, bit for bit, as the uninterrupted job;
//! - submit.sh runs the whole chain to a finished SAE and features folder.
//!
//! One test runs the scenarios in order on one cluster: they share the dataset and the
//! uninterrupted training job, and a single-node cluster runs one scenario well at a time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{dataset_rows, S3Objects, S3Server};

const SAE: &str = env!("CARGO_BIN_EXE_sae");
const HOOK: &str = "blocks.15.hook_resid_post";
/// Small windows and batches keep the captures short on 2 cores.
const CAPTURE_ARGS: &str = "--context-len 64 --batch-size 4 --row-group-rows 256";
const CAPTURE_TOKENS: &str = "2048";
/// A small SAE, trained long enough (40 steps of 2 x 256 rows) for a requeue to land mid-run.
const TRAIN_TOKENS: &str = "20480";
const TRAIN_ARGS: &str = "--batch-size 256 --lr 1e-3 --threads 1 --log-every 4 --no-eval --json --dist-timeout 60";

/// Slurm's job states after which a job runs no more (unless requeued).
const ENDED: &[&str] = &[
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn job_file(name: &str) -> String {
    repo().join("workflows/slurm").join(name).display().to_string()
}

/// A private Slurm cluster (controller, node daemon, munge) whose state lives in `dir`;
/// stopped when dropped, so a failing test does not leave daemons behind.
struct SlurmCluster {
    dir: PathBuf,
}

impl SlurmCluster {
    fn start(dir: &Path) -> SlurmCluster {
        let out =
            Command::new("bash").arg(repo().join("scripts/slurm-local.sh")).arg("start").arg(dir).output().unwrap();
        assert!(
            out.status.success(),
            "scripts/slurm-local.sh start failed (run `make setup-test` for slurm-wlm and munge, as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SlurmCluster { dir: dir.to_path_buf() }
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("slurm.conf")
    }

    /// A Slurm client command (sbatch, scontrol, ...) aimed at this cluster.
    fn client(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SLURM_CONF", self.conf());
        cmd
    }

    fn scontrol(&self, args: &[&str]) -> String {
        let out = self.client("scontrol").args(args).output().unwrap();
        assert!(out.status.success(), "scontrol {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The states of a job (one per task of an array), from `scontrol show job`.
    fn states(&self, job: &str) -> Vec<String> {
        let text = self.scontrol(&["show", "job", "-o", job]);
        text.lines().filter_map(|line| field(line, "JobState")).collect()
    }

    /// Waits until every task of `job` has ended and checks that all COMPLETED; on failure the
    /// message holds the logs in `logs`.
    fn wait_completed(&self, job: &str, logs: &Path, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let states = self.states(job);
            if !states.is_empty() && states.iter().all(|s| ENDED.contains(&s.as_str())) {
                assert!(
                    states.iter().all(|s| s == "COMPLETED"),
                    "job {job} ended {states:?}; logs:\n{}",
                    all_logs(logs)
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "job {job} still {states:?} after {timeout:?}; logs:\n{}",
                all_logs(logs)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_state(&self, job: &str, want: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.states(job) != [want] {
            assert!(Instant::now() < deadline, "job {job} not {want} after {timeout:?}: {:?}", self.states(job));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(repo().join("scripts/slurm-local.sh")).arg("stop").arg(&self.dir).status();
    }
}

/// `Key=value` out of one line of `scontrol show -o`.
fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
}

/// Every log file in `dir`, concatenated, for failure messages.
fn all_logs(dir: &Path) -> String {
    let mut names: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default();
    names.sort();
    names.iter().map(|p| format!("== {} ==\n{}", p.display(), std::fs::read_to_string(p).unwrap_or_default())).collect()
}

/// What every job of these tests gets: the S3 server, the sae binary, the job files' defaults.
fn job_env(cmd: &mut Command, s3: &S3Server) {
    s3.env(cmd);
    cmd.env("SAE", SAE).env("RUST_LOG", "info");
}

/// Submits `file` with `sbatch --parsable` and returns the job id.
fn sbatch(cluster: &SlurmCluster, s3: &S3Server, vars: &[(&str, &str)], args: &[&str], file: &str) -> String {
    let mut cmd = cluster.client("sbatch");
    job_env(&mut cmd, s3);
    cmd.envs(vars.iter().copied()).arg("--parsable").args(args).arg(file);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "sbatch {file}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap().to_string()
}

fn keys(s3: &S3Server, folder: &str, dir: &str) -> Vec<String> {
    store::ObjectDir::open(folder, &s3.store_options()).unwrap().list(dir).unwrap()
}

/// The JSON summary that `sae train --json` printed last into a job's log.
fn train_summary(log: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(log).unwrap();
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON summary in {}:\n{text}", log.display()));
    serde_json::from_str(line).unwrap()
}

fn scratch() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("slurm-tests");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    dir
}

/// Runs `scenario`, printing its wall time (shown with `--nocapture`).
fn timed<T>(name: &str, scenario: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let value = scenario();
    eprintln!("[slurm test] {name}: {:.1} s", start.elapsed().as_secs_f64());
    value
}

#[test]
fn slurm_job_files_capture_train_survive_a_requeue_and_chain() {
    let dir = scratch();
    let s3 = S3Server::moto("sae");
    let cluster = SlurmCluster::start(&dir.join("cluster"));
    let logs = dir.join("logs");

    let data = timed("capture array + finalize vs one worker", || capture_array_equals_one_worker(&cluster, &s3, &dir));
    let whole = timed("train.sbatch, 2 tasks", || two_task_training_exports(&cluster, &s3, &logs, &data));
    timed("requeued training resumes bit for bit", || {
        requeued_training_resumes_exactly(&cluster, &s3, &logs, &data, &whole)
    });
    timed("submit.sh whole chain", || submit_runs_the_whole_chain(&cluster, &s3, &dir));
}

/// capture.sbatch as a 2-task array, finalize.sbatch after it by dependency; the dataset equals a
/// one-worker capture of the same settings row for row. Returns the dataset's URL.
fn capture_array_equals_one_worker(cluster: &SlurmCluster, s3: &S3Server, dir: &Path) -> String {
    let split = "s3://sae/acts/split";
    let logs = dir.join("logs").display().to_string();
    let vars =
        [("DATASET_URL", split), ("CAPTURE_TOKENS", CAPTURE_TOKENS), ("CAPTURE_ARGS", CAPTURE_ARGS), ("WORKERS", "2")];
    let array = sbatch(
        cluster,
        s3,
        &vars,
        &["--array=0-1", &format!("--output={logs}/%x-%A_%a.log")],
        &job_file("capture.sbatch"),
    );
    let finalize = sbatch(
        cluster,
        s3,
        &vars,
        &[&format!("--dependency=afterok:{array}"), &format!("--output={logs}/%x-%j.log")],
        &job_file("finalize.sbatch"),
    );

    // Meanwhile, the reference: one worker, the same settings, run directly.
    let single = dir.join("single").display().to_string();
    let mut cmd = Command::new(SAE);
    cmd.args(["capture", "--out", &single, "--hook", HOOK, "--max-tokens", CAPTURE_TOKENS, "--threads", "1"])
        .args(CAPTURE_ARGS.split_whitespace())
        .env("RUST_LOG", "warn");
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));

    cluster.wait_completed(&array, Path::new(&logs), Duration::from_secs(240));
    cluster.wait_completed(&finalize, Path::new(&logs), Duration::from_secs(120));
    // Each array task was one worker of two.
    for task in 0..2 {
        let log = std::fs::read_to_string(Path::new(&logs).join(format!("sae-capture-{array}_{task}.log"))).unwrap();
        assert!(log.contains(&format!("task {task} of 2")), "{log}");
    }
    assert!(s3.object(split, "manifest.json").is_some(), "finalize wrote no manifest");

    let (rows_single, values_single) = dataset_rows(&single, HOOK, &Default::default());
    let (rows_split, values_split) = dataset_rows(split, HOOK, &s3.store_options());
    assert_eq!(rows_single.len(), CAPTURE_TOKENS.parse::<usize>().unwrap());
    assert_eq!(rows_single, rows_split, "the array's rows differ from one worker's");
    assert!(values_single == values_split, "the array's activations differ from one worker's");
    split.to_string()
}

fn train_vars<'a>(data: &'a str, out: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("DATASET_URL", data),
        ("OUT_URL", out),
        ("LATENTS", "1152"),
        ("K", "16"),
        ("TRAIN_TOKENS", TRAIN_TOKENS),
        ("TRAIN_ARGS", TRAIN_ARGS),
        ("CHECKPOINT_EVERY", "3"),
    ]
}

/// Submits train.sbatch with two tasks on the node, training into `out`. Returns the job id and
/// its log file.
fn submit_two_task_training(
    cluster: &SlurmCluster,
    s3: &S3Server,
    logs: &Path,
    data: &str,
    out: &str,
) -> (String, PathBuf) {
    let output = format!("--output={}/%x-%j.log", logs.display());
    let job = sbatch(cluster, s3, &train_vars(data, out), &["--ntasks-per-node=2", &output], &job_file("train.sbatch"));
    let log = logs.join(format!("sae-train-{job}.log"));
    (job, log)
}
/// train.sbatch with two tasks on the node: two Gloo ranks, one exported SAE. Returns its URL.
fn two_task_training_exports(cluster: &SlurmCluster, s3: &S3Server, logs: &Path, data: &str) -> String {
    let out = "s3://sae/saes/whole";
    let (job, log) = submit_two_task_training(cluster, s3, logs, data, out);
    cluster.wait_completed(&job, logs, Duration::from_secs(180));
    let summary = train_summary(&log);
    assert_eq!(summary["world_size"], 2, "{summary}");
    assert_eq!(summary["steps"], 40, "{summary}");
    assert!(summary["resumed_from_step"].is_null(), "{summary}");
    // The export: SAELens's file names, and weights that training moved away from zero.
    let cfg: serde_json::Value = serde_json::from_slice(&s3.object(out, "cfg.json").expect("no cfg.json")).unwrap();
    assert_eq!(cfg["d_sae"], 1152, "{cfg}");
    let weights = s3.object(out, "sae_weights.safetensors").expect("no sae_weights.safetensors");
    let (tensors, _) = trainer::tensors::from_bytes(&weights, out).unwrap();
    assert_eq!(tensors["W_dec"].size(), [1152, 576]);
    out.to_string()
}

/// The same training job, requeued with `scontrol requeue` once it has a checkpoint: Slurm sends
/// SIGTERM, the ranks checkpoint and stop, the job goes back to the queue, and its second run
/// resumes and ends with the uninterrupted job's weights, bit for bit.
fn requeued_training_resumes_exactly(cluster: &SlurmCluster, s3: &S3Server, logs: &Path, data: &str, whole: &str) {
    let out = "s3://sae/saes/requeued";
    let (job, log) = submit_two_task_training(cluster, s3, logs, data, out);
    let deadline = Instant::now() + Duration::from_secs(180);
    while keys(s3, out, "checkpoints").is_empty() {
        let states = cluster.states(&job);
        assert!(
            !states.iter().any(|s| ENDED.contains(&s.as_str())),
            "job {job} ended ({states:?}) before its first checkpoint:\n{}",
            all_logs(logs)
        );
        assert!(Instant::now() < deadline, "no checkpoint after 180 s:\n{}", all_logs(logs));
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.scontrol(&["requeue", &job]);
    // A requeued job waits (Reason=BeginTime) before it may start again; start it now.
    cluster.wait_state(&job, "PENDING", Duration::from_secs(60));
    assert!(s3.object(out, "sae_weights.safetensors").is_none(), "the job finished before it was requeued");
    cluster.scontrol(&["update", &format!("JobId={job}"), "StartTime=now"]);
    cluster.wait_completed(&job, logs, Duration::from_secs(180));

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("SLURM_RESTART_COUNT=0") && text.contains("SLURM_RESTART_COUNT=1"), "{text}");
    assert!(text.contains("SIGTERM"), "the batch script saw no SIGTERM:\n{text}");
    assert!(text.contains("resuming from step"), "the requeued job did not resume:\n{text}");
    let summary = train_summary(&log);
    let resumed = summary["resumed_from_step"].as_u64().unwrap_or_else(|| panic!("not resumed: {summary}"));
    assert!((3..40).contains(&resumed), "{summary}");
    // It resumed from the checkpoint written on SIGTERM (steps the ranks reached together), not
    // only from a periodic one.
    let interrupted =
        text.lines().find_map(|l| l.strip_prefix("interrupted at step ")).and_then(|rest| rest.split(';').next());
    assert_eq!(interrupted, Some(resumed.to_string().as_str()), "{text}");
    assert_eq!(
        s3.object(out, "sae_weights.safetensors").unwrap(),
        s3.object(whole, "sae_weights.safetensors").unwrap(),
        "the requeued job's weights differ from the uninterrupted job's"
    );
}

/// submit.sh: capture array -> finalize -> train (+ eval) -> features, as one dependency chain.
fn submit_runs_the_whole_chain(cluster: &SlurmCluster, s3: &S3Server, dir: &Path) {
    let (data, run) = ("s3://sae/chain/acts", "s3://sae/chain/run");
    let logs = dir.join("chain-logs");
    let mut cmd = cluster.client("bash");
    job_env(&mut cmd, s3);
    cmd.arg(job_file("submit.sh"))
        .args([data, run, "--workers", "2", "--gpus-per-node", "0", "--ranks-per-node", "2"])
        .arg("--log-dir")
        .arg(&logs)
        .env("CPUS_PER_TASK", "1")
        .env("CAPTURE_TOKENS", CAPTURE_TOKENS)
        .env("CAPTURE_ARGS", CAPTURE_ARGS)
        .env("LATENTS", "1152")
        .env("K", "16")
        .env("TRAIN_TOKENS", "8192")
        .env(
            "TRAIN_ARGS",
            "--batch-size 256 --threads 1 --eval-tokens 256 --density-tokens 2048 --json --dist-timeout 60",
        )
        .env("FEATURES_ARGS", "--top-k 5 --quantile-bands 2 --samples-per-band 2");
    let out = cmd.output().unwrap();
    let printed = common::stdout(&out);
    assert!(out.status.success(), "submit.sh: {}{printed}", common::stderr(&out));
    let job = |what: &str| -> String {
        let line =
            printed.lines().find(|l| l.starts_with(what)).unwrap_or_else(|| panic!("no `{what}` line:\n{printed}"));
        line[what.len()..].split_whitespace().next().unwrap().to_string()
    };
    let ids: Vec<String> =
        ["capture job", "finalize job", "train job", "features job"].iter().map(|w| job(w)).collect();
    assert!(printed.contains(&format!("features      {run}/features")), "{printed}");
    for id in &ids {
        cluster.wait_completed(id, &logs, Duration::from_secs(300));
    }
    // The chain's order: each job started after every task of the one it depends on ended
    // (times as Slurm prints them, YYYY-MM-DDThh:mm:ss, so text order is time order).
    let times = |id: &str, key: &str| -> Vec<String> {
        cluster.scontrol(&["show", "job", "-o", id]).lines().filter_map(|line| field(line, key)).collect()
    };
    for pair in ids.windows(2) {
        let ended = times(&pair[0], "EndTime").into_iter().max().unwrap();
        let started = times(&pair[1], "StartTime").into_iter().min().unwrap();
        assert!(started >= ended, "job {} started at {started}, before {} ended at {ended}", pair[1], pair[0]);
    }

    let info = s3.object(data, "manifest.json").expect("the chain's dataset was not finalized");
    assert!(!info.is_empty());
    let sae = format!("{run}/sae");
    for key in ["cfg.json", "sae_weights.safetensors", "eval.json"] {
        assert!(s3.object(&sae, key).is_some(), "no {key} in {sae}:\n{}", all_logs(&logs));
    }
    let features = format!("{run}/features");
    let index: serde_json::Value = serde_json::from_slice(
        &s3.object(&features, "features.json").unwrap_or_else(|| panic!("no features.json:\n{}", all_logs(&logs))),
    )
    .unwrap();
    assert!(index.is_object(), "{index}");
}
