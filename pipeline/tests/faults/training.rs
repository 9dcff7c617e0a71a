//! Launching a training run (one process or torchrun) and comparing two runs' results.

use std::path::Path;
use std::process::Command;

use crate::common::{free_port, metrics_without_timing, sigkill_tree, venv_bin, wait_until_gone};
use crate::process::{Finished, Process};
use crate::{sae_command, strings, SAE};

/// Steps between checkpoints in every training scenario.
pub const CHECKPOINT_EVERY: u64 = 5;
/// The SAE every training scenario trains: small, on one thread (so that two runs agree bit for
/// bit), without evaluation, printing its result as JSON.
const SMALL_SAE: &str = "--latents 1152 --k 16 --lr 1e-3 --threads 1 --no-eval --quiet --json";
/// Steps between metrics rows, unless a scenario's settings choose (checkpoints then fall on
/// row boundaries; a scenario resuming between rows sets its own).
const LOG_EVERY: &str = "5";

/// The `sae train` arguments for training on `data` into `out`, with a scenario's `settings`.
pub fn train_args(data: &str, out: &str, settings: &[&str]) -> Vec<String> {
    let mut args = strings(&["train", "--data", data, "--out", out]);
    args.extend(SMALL_SAE.split_whitespace().map(String::from));
    if !settings.contains(&"--log-every") {
        args.extend(strings(&["--log-every", LOG_EVERY]));
    }
    args.extend(strings(&["--checkpoint-every", &CHECKPOINT_EVERY.to_string()]));
    args.extend(strings(settings));
    args
}

/// SIGKILLs a torchrun launcher and its ranks at once, as a lost node or a batch system's hard
/// kill would (the ranks run in their own session, so killing torchrun alone would orphan
/// them), and waits until every rank is gone.
pub fn kill_launcher_and_ranks(p: Process) -> Finished {
    let ranks = sigkill_tree(p.child.id());
    let f = p.wait();
    wait_until_gone(&ranks);
    f
}

/// How a training run is started.
#[derive(Clone, Copy, PartialEq)]
pub enum Launch {
    OneProcess,
    /// torchrun with 2 ranks (Gloo on CPU).
    Torchrun,
}

pub fn launch(how: Launch, args: &[String]) -> Command {
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

pub fn checkpoint_step(name: &str) -> u64 {
    name.trim_start_matches("step-").trim_end_matches(".safetensors").parse().unwrap()
}

/// What differs between two runs' results (None: the same weights file, byte for byte, and the
/// same metrics but for timing): the weights, and the first metrics row that differs, both
/// versions, for the report of a scenario whose runs should be identical.
pub fn run_difference(a: &Path, b: &Path) -> Option<String> {
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    let mut found = Vec::new();
    if read(a, "sae_weights.safetensors") != read(b, "sae_weights.safetensors") {
        found.push("the weights differ".to_string());
    }
    let (rows_a, rows_b) = (metrics_without_timing(a), metrics_without_timing(b));
    if rows_a.len() != rows_b.len() {
        found.push(format!("{} metrics rows against {}", rows_a.len(), rows_b.len()));
    }
    if let Some((x, y)) = rows_a.iter().zip(&rows_b).find(|(x, y)| x != y) {
        found.push(format!("first differing metrics row: {x} against {y}"));
    }
    (!found.is_empty()).then(|| found.join("; "))
}
