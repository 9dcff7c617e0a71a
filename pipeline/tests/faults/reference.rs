//! The uninterrupted captures every scenario compares with, and where in them faults land.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::campaign::Rng;
use crate::common::dataset_rows;
use crate::process::{run, start, Finished};
use crate::{sae_command, scratch, strings, HOOK};

/// Small windows and batches keep the captures short on 2 cores; shards of about 1 MiB (~1300
/// bf16 rows) so that a capture commits several shards and kills land between commits.
pub const CAPTURE: &[&str] =
    &["--context-len", "64", "--batch-size", "4", "--threads", "2", "--row-group-rows", "256", "--shard-mib", "1"];

pub fn capture_args(out: &str, tokens: u64) -> Vec<String> {
    let mut args = strings(&["capture", "--out", out, "--max-tokens", &tokens.to_string()]);
    args.extend(strings(CAPTURE));
    args
}

/// An uninterrupted capture, and how long it took: until `header.json` appeared (the model is
/// loaded by then) and in all.
pub struct Reference {
    pub url: String,
    pub header_after: Duration,
    pub took: Duration,
    pub shards: usize,
}

impl Reference {
    pub fn capture(name: &str, tokens: u64) -> Reference {
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
    pub fn kill_point(&self, i: usize, planned: usize, rng: &mut Rng) -> (usize, Duration) {
        let shard_time = self.took.saturating_sub(self.header_after).div_f64(self.shards as f64);
        let stretch = |j: usize| j * (self.shards - 1) / planned;
        let commits =
            stretch(i) + rng.between(0, (stretch(i + 1).max(stretch(i) + 1) - stretch(i) - 1) as u64) as usize;
        let span = if commits == 0 { self.header_after + shard_time } else { shard_time };
        (commits, span.mul_f64(rng.uniform(0.0, 0.9)))
    }

    /// A seeded delay that lands after the header was written, while shards are being encoded
    /// and uploaded.
    pub fn upload_delay(&self, rng: &mut Rng) -> Duration {
        let work = self.took.saturating_sub(self.header_after);
        self.header_after + work.mul_f64(rng.uniform(0.0, 0.8))
    }

    /// Whether the dataset at `url` holds the reference's rows: token columns and bits.
    pub fn equals(&self, url: &str, opts: &store::StoreOptions) -> bool {
        let (rows_a, values_a) = dataset_rows(&self.url, HOOK, &store::StoreOptions::default());
        let (rows_b, values_b) = dataset_rows(url, HOOK, opts);
        rows_a == rows_b
            && values_a.len() == values_b.len()
            && values_a.iter().zip(&values_b).all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

/// 6,000 rows of real layer-15 activations (about 5 shards of 256-row groups), captured once:
/// the capture scenario's uninterrupted run and the training scenarios' data.
pub fn base() -> &'static Reference {
    static BASE: OnceLock<Reference> = OnceLock::new();
    BASE.get_or_init(|| Reference::capture("base", 6000))
}

/// 2,600 rows (2 shards): the S3 scenarios capture this many again and again.
pub fn small() -> &'static Reference {
    static SMALL: OnceLock<Reference> = OnceLock::new();
    SMALL.get_or_init(|| Reference::capture("small", 2600))
}

pub fn commits_of(dataset: &Path, worker: &str) -> usize {
    std::fs::read_dir(dataset.join("commits").join(worker))
        .map(|d| d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().ends_with(".json")).count())
        .unwrap_or(0)
}

pub fn verify(url: &str, env: &dyn Fn(&mut Command), logs: &Path, tag: &str) -> Finished {
    let mut cmd = sae_command(&strings(&["dataset", "verify", url]));
    env(&mut cmd);
    run(cmd, logs, tag)
}
