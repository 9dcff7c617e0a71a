//! Checkpoints: one object per checkpoint, `checkpoints/step-<step>.safetensors`, holding the
//! SAE's tensors (`sae.*`), Adam's moments (`adam.m.*`, `adam.v.*`), the dead-latent counters
//! (`dead.tokens_since_fired`), the loss sums not yet logged (`metrics.pending`: [5], or [world, 5]
//! with each rank's own sums in a data-parallel run), and, as JSON in the safetensors metadata under `checkpoint`,
//! the [`CheckpointState`]. A single object put is atomic on every store, so a checkpoint is
//! either complete or invisible; a torn local write never has the final name. Damage after the
//! write (a flipped bit, a truncated copy) is caught by a checksum over the tensors and the state,
//! recorded in the state and verified on load; the trainer then falls back to the previous
//! checkpoint.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use store::reader::Cursor;
use store::ObjectDir;
use tch::Tensor;

use crate::metrics::MetricsRow;
use crate::tensors;

pub const CHECKPOINT_DIR: &str = "checkpoints";
/// How many of the newest checkpoints are kept. Two, so that a sweep killed while writing its
/// members' checkpoints still has a step that every member saved.
pub const KEEP: usize = 2;
const STATE_KEY: &str = "checkpoint";
/// Metadata key of `sha256:<hex>` over the tensors (`tensors::sha256_of`) and the state's JSON
/// exactly as stored (version 2 on).
const CHECKSUM_KEY: &str = "checksum";
/// Version 2 added the checksum (over the tensors and the state), the normalization and the shard
/// order; version 1 checkpoints are still read (without a checksum to verify).
pub const FORMAT_VERSION: u32 = 2;

/// Everything but the tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format_version: u32,
    /// Steps completed.
    pub step: u64,
    /// Tokens seen, over all ranks.
    pub tokens: u64,
    /// The reader's position: the next batch to train on.
    pub cursor: Cursor,
    pub adam_steps: u64,
    /// The run's configuration (compared on resume).
    pub config: serde_json::Value,
    /// The random state. Training draws no random numbers after initialization (the data order
    /// is a pure function of the seed and the cursor, and no architecture samples), so the seed
    /// is all there is; a resumed run refuses a checkpoint whose seeds are not its own.
    pub rng: RngState,
    /// The metrics logged so far, so `metrics.jsonl` can be rebuilt exactly on resume.
    pub metrics: Vec<MetricsRow>,
    /// Steps accumulated since the last logged row (their sums are the `metrics.pending` tensor).
    #[serde(default)]
    pub pending_metric_steps: u64,
    /// The input normalization fixed at the run's start, so a resumed run uses the same one
    /// even when the dataset has grown since (follow mode).
    #[serde(default)]
    pub normalization: Option<Normalization>,
    /// Follow mode: the shard keys in the order the reader discovered them, replayed on resume.
    #[serde(default)]
    pub follow_shards: Vec<String>,
}

/// How inputs are normalized: multiplied by `scale` (so that E‖x‖² = d_in), with `variance` the
/// per-feature variance of the scaled inputs (the FVU's denominator).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub scale: f64,
    pub variance: f64,
}

/// The seeds a run drew its random numbers from: torch's (the weights' initialization) and the
/// reader's (the data order). A resumed run checks them against its own seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    pub torch_seed: u64,
    pub reader_seed: u64,
}

impl RngState {
    /// The state of a run seeded with `seed`: both generators start from it.
    pub fn from_seed(seed: u64) -> Self {
        RngState { torch_seed: seed, reader_seed: seed }
    }
}

pub struct Checkpoint {
    pub state: CheckpointState,
    pub sae: BTreeMap<String, Tensor>,
    pub adam: BTreeMap<String, Tensor>,
    pub dead_counters: Tensor,
    /// Sums of the loss terms of the steps not yet logged.
    pub pending_metrics: Option<Tensor>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Tensors(#[from] tensors::TensorFileError),
    #[error("checkpoint `{location}` is damaged: {detail}")]
    Bad { location: String, detail: String },
}

impl CheckpointError {
    /// Whether the checkpoint object itself is damaged (as opposed to the store failing).
    pub fn is_damage(&self) -> bool {
        matches!(self, CheckpointError::Bad { .. } | CheckpointError::Tensors(_))
    }
}

/// The checksum of a checkpoint whose tensors have `tensors_digest` and whose state is stored as
/// `state_json`: it covers the state too, so a damaged step, cursor or metric is caught like a
/// damaged weight. The JSON is hashed as stored, never re-serialized.
fn checksum(tensors_digest: &str, state_json: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut sha = Sha256::new();
    sha.update(tensors_digest.as_bytes());
    sha.update(state_json.as_bytes());
    format!("sha256:{:x}", sha.finalize())
}

fn key(step: u64) -> String {
    format!("{CHECKPOINT_DIR}/step-{step:09}.safetensors")
}

/// Writes the checkpoint of `state.step`, then deletes all but the [`KEEP`] newest.
pub fn save(
    dir: &ObjectDir,
    state: &CheckpointState,
    sae: &[(String, Tensor)],
    adam: &[(String, Tensor)],
    dead_counters: &Tensor,
    pending_metrics: Option<&Tensor>,
) -> Result<(), CheckpointError> {
    let mut named: Vec<(String, Tensor)> = Vec::new();
    if let Some(sums) = pending_metrics {
        named.push(("metrics.pending".to_string(), sums.shallow_clone()));
    }
    named.extend(sae.iter().map(|(n, t)| (format!("sae.{n}"), t.shallow_clone())));
    named.extend(adam.iter().map(|(n, t)| (format!("adam.{n}"), t.shallow_clone())));
    named.push(("dead.tokens_since_fired".to_string(), dead_counters.shallow_clone()));
    let encoded = tensors::encode(&named);
    let json = serde_json::to_string(state).expect("state");
    let metadata =
        BTreeMap::from([(CHECKSUM_KEY.to_string(), checksum(&encoded.sha256(), &json)), (STATE_KEY.to_string(), json)]);
    dir.put(&key(state.step), encoded.to_bytes(Some(metadata)))?;
    let steps = list_steps(dir)?;
    for old in steps.iter().rev().skip(KEEP) {
        dir.delete(&key(*old))?;
    }
    Ok(())
}

/// The steps of the checkpoints present, ascending.
pub fn list_steps(dir: &ObjectDir) -> Result<Vec<u64>, CheckpointError> {
    let mut steps: Vec<u64> = dir
        .list(CHECKPOINT_DIR)?
        .iter()
        .filter_map(|k| k.strip_prefix(&format!("{CHECKPOINT_DIR}/step-"))?.strip_suffix(".safetensors")?.parse().ok())
        .collect();
    steps.sort_unstable();
    Ok(steps)
}

/// Deletes every checkpoint (once the finished SAE is written, they have served their purpose).
pub fn remove_all(dir: &ObjectDir) -> Result<(), CheckpointError> {
    for step in list_steps(dir)? {
        dir.delete(&key(step))?;
    }
    Ok(())
}

fn bad(location: &str, detail: String) -> CheckpointError {
    CheckpointError::Bad { location: location.to_string(), detail }
}

/// The checkpoint object of `step` and its location, for messages.
fn fetch(dir: &ObjectDir, step: u64) -> Result<(impl std::ops::Deref<Target = [u8]>, String), CheckpointError> {
    let location = dir.display(&key(step));
    let bytes = dir.get(&key(step))?.ok_or_else(|| bad(&location, "it vanished".into()))?;
    Ok((bytes, location))
}

/// The [`CheckpointState`] stored in a checkpoint's metadata, checked for its format version.
fn parse_state(metadata: &BTreeMap<String, String>, location: &str) -> Result<CheckpointState, CheckpointError> {
    let json = metadata.get(STATE_KEY).ok_or_else(|| bad(location, format!("no `{STATE_KEY}` metadata")))?;
    let state: CheckpointState = serde_json::from_str(json).map_err(|e| bad(location, e.to_string()))?;
    if !(1..=FORMAT_VERSION).contains(&state.format_version) {
        return Err(bad(
            location,
            format!("format_version {} (this build reads 1 to {FORMAT_VERSION})", state.format_version),
        ));
    }
    if state.format_version >= 2 && !metadata.contains_key(CHECKSUM_KEY) {
        return Err(bad(location, format!("no `{CHECKSUM_KEY}` metadata")));
    }
    Ok(state)
}

/// Loads the checkpoint of `step`, verifying its tensors against the checksum it recorded.
pub fn load(dir: &ObjectDir, step: u64) -> Result<Checkpoint, CheckpointError> {
    let (bytes, location) = fetch(dir, step)?;
    let bad = |detail: String| bad(&location, detail);
    let (mut named, metadata) = tensors::from_bytes(&bytes, &location)?;
    let state = parse_state(&metadata, &location)?;
    if let Some(recorded) = metadata.get(CHECKSUM_KEY) {
        let found = checksum(&tensors::sha256_of(&bytes, &location)?, &metadata[STATE_KEY]);
        if &found != recorded {
            return Err(bad(format!("its contents hash to {found}, but {recorded} was recorded when it was saved")));
        }
    }
    let dead_counters = named.remove("dead.tokens_since_fired").ok_or_else(|| bad("no dead-latent counters".into()))?;
    let pending_metrics = named.remove("metrics.pending");
    let mut sae = BTreeMap::new();
    let mut adam = BTreeMap::new();
    for (name, t) in named {
        if let Some(n) = name.strip_prefix("sae.") {
            sae.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("adam.") {
            adam.insert(n.to_string(), t);
        } else {
            return Err(bad(format!("unexpected tensor `{name}`")));
        }
    }
    Ok(Checkpoint { state, sae, adam, dead_counters, pending_metrics })
}

/// Reads only the state of the checkpoint of `step` (for comparing configurations): the object
/// is fetched, but no tensor is decoded.
pub fn load_state(dir: &ObjectDir, step: u64) -> Result<CheckpointState, CheckpointError> {
    let (bytes, location) = fetch(dir, step)?;
    parse_state(&tensors::metadata_of(&bytes, &location)?, &location)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn state_with(values: &[f64]) -> CheckpointState {
        let row = |v: f64| MetricsRow {
            step: 1,
            tokens: 2,
            loss: v,
            mse: v / 3.0,
            fvu: v * 0.7,
            l0: v + 1.0,
            auxk: v.sqrt(),
            sparsity: v / 7.0,
            lr: v * 1e-4,
            dead_fraction: v / 11.0,
            data_wait_fraction: v / 13.0,
            tokens_per_s: v * 1e5,
        };
        CheckpointState {
            format_version: FORMAT_VERSION,
            step: 3,
            tokens: 4,
            cursor: Cursor::default(),
            adam_steps: 3,
            config: serde_json::json!({ "lr": values[0] }),
            rng: RngState::from_seed(0),
            metrics: values.iter().map(|&v| row(v)).collect(),
            pending_metric_steps: 0,
            normalization: Some(Normalization { scale: values[0], variance: values[values.len() - 1] }),
            follow_shards: vec![],
        }
    }

    proptest! {
        /// A resumed run computes its FVU with the variance it reads back, and rebuilds
        /// `metrics.jsonl` from the rows it reads back: both must be the stored bits, not the
        /// nearest decimal parse.
        #[test]
        fn state_survives_its_json_bit_for_bit(values in prop::collection::vec(1e-6f64..1e3, 1..40)) {
            let state = state_with(&values);
            let json = serde_json::to_string(&state).unwrap();
            let back: CheckpointState = serde_json::from_str(&json).unwrap();
            let bits = |s: &CheckpointState| -> Vec<u64> {
                let n = s.normalization.unwrap();
                let mut v = vec![n.scale.to_bits(), n.variance.to_bits()];
                for r in &s.metrics {
                    v.extend([r.loss, r.mse, r.fvu, r.l0, r.auxk, r.sparsity, r.lr, r.tokens_per_s].map(f64::to_bits));
                }
                v
            };
            prop_assert_eq!(bits(&back), bits(&state));
        }
    }
}
