//! Launching a training run (one process or torchrun) and comparing two runs' results.

use std::path::Path;
use std::process::Command;

use crate::common::{free_port, venv_bin};
use crate::{sae_command, SAE};

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

/// Metrics rows without the fields that measure time, which differ between any two runs.
pub fn metrics_without_timing(text: &str) -> Vec<serde_json::Value> {
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
pub fn same_run(a: &Path, b: &Path) -> bool {
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    read(a, "sae_weights.safetensors") == read(b, "sae_weights.safetensors")
        && metrics_without_timing(&String::from_utf8(read(a, "metrics.jsonl")).unwrap())
            == metrics_without_timing(&String::from_utf8(read(b, "metrics.jsonl")).unwrap())
}
