//! Finalizing a dataset: once every worker has recorded its part, merging the commit records
//! into `manifest.json` (created last, with `PutMode::Create`) and removing what no commit
//! record names.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};
use crate::location::{open_store_with, Location, StoreOptions};
use crate::manifest::{build_manifest, CommitRecord, Manifest, HEADER_KEY, MANIFEST_KEY, PARTS_DIR, SHARDS_DIR};
use crate::records::{commit_key, list_commits, read_header, read_listed};
use crate::runtime::runtime;

/// `parts/<worker>.json`: one worker of `workers` has committed its whole share. [`finalize`]
/// refuses while fewer than `workers` parts exist, so a dataset is never finalized with a
/// worker's share missing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartRecord {
    pub format_version: u32,
    pub dataset_id: String,
    pub worker: String,
    /// How many workers share the dataset.
    pub workers: usize,
    /// Rows and shards this worker committed.
    pub rows: u64,
    pub shards: usize,
}

/// Merge every commit record of the dataset at `url` into `manifest.json` (created with
/// `PutMode::Create`: a second finalize fails with [`Error::AlreadyExists`]), then delete the
/// objects under `shards/` that no commit record names.
///
/// Refuses unless every worker has finished: each worker that committed a shard must have its
/// part record ([`DatasetWriter::finish_part`](super::DatasetWriter::finish_part)), the part
/// records must agree on the number of workers and all of them must be there, and that number
/// must be `workers` when given.
pub fn finalize(url: &str, store: &StoreOptions, workers: Option<usize>) -> Result<Manifest> {
    let loc = open_store_with(url, store)?;
    finalize_at(&loc, workers)
}

/// [`finalize`] on an opened location.
pub fn finalize_at(loc: &Location, workers: Option<usize>) -> Result<Manifest> {
    runtime()?.block_on(finalize_async(loc, workers))
}

/// Every worker that committed, and every worker of the declared count, has recorded its part.
async fn check_parts(
    loc: &Location,
    dataset_id: &str,
    commits: &[CommitRecord],
    declared: Option<usize>,
) -> Result<()> {
    let mut parts = Vec::new();
    for (key, _) in loc.list(PARTS_DIR).await? {
        let part: PartRecord = read_listed(loc, &key).await?;
        if part.dataset_id != dataset_id {
            return Err(Error::BadMetadata {
                location: loc.display(&key),
                detail: format!("belongs to dataset {}", part.dataset_id),
            });
        }
        parts.push(part);
    }
    let refuse = |reason: String| Err(Error::FinalizeRefused { url: loc.url.clone(), reason });
    let finished: BTreeSet<&str> = parts.iter().map(|p| p.worker.as_str()).collect();
    let unfinished: BTreeSet<&str> =
        commits.iter().map(|c| c.worker.as_str()).filter(|w| !finished.contains(w)).collect();
    if !unfinished.is_empty() {
        let names: Vec<&str> = unfinished.into_iter().collect();
        return refuse(format!(
            "worker(s) {} committed shards but never finished (no part record); run them again to finish their share",
            names.join(", ")
        ));
    }
    let Some(workers) = parts.first().map(|p| p.workers) else {
        return refuse("no worker has finished (no part records under parts/)".into());
    };
    if let Some(odd) = parts.iter().find(|p| p.workers != workers) {
        return refuse(format!("worker {} was run with {} workers, another with {workers}", odd.worker, odd.workers));
    }
    if let Some(declared) = declared.filter(|&d| d != workers) {
        return refuse(format!("it was written by {workers} workers, not the {declared} given with --workers"));
    }
    if parts.len() < workers {
        return refuse(format!(
            "only {} of {workers} workers have finished ({}); run the missing workers first",
            parts.len(),
            finished.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(())
}

pub(crate) async fn finalize_async(loc: &Location, workers: Option<usize>) -> Result<Manifest> {
    let header = read_header(loc).await?.ok_or_else(|| Error::NotFound {
        url: loc.url.clone(),
        what: format!("no {HEADER_KEY}: nothing was written here"),
    })?;
    let commits = list_commits(loc, None).await?;
    check_parts(loc, &header.dataset_id, &commits, workers).await?;
    let objects: BTreeMap<String, u64> = loc.list(SHARDS_DIR).await?.into_iter().map(|(k, m)| (k, m.size)).collect();
    for c in &commits {
        let where_ = loc.display(&commit_key(&c.worker, c.seq));
        if c.dataset_id != header.dataset_id {
            return Err(Error::BadMetadata {
                location: where_,
                detail: format!("belongs to dataset {}", c.dataset_id),
            });
        }
        match objects.get(&c.shard.key) {
            Some(&size) if size == c.shard.bytes => {}
            Some(&size) => {
                return Err(Error::corrupt(
                    &c.shard.key,
                    format!("committed with {} bytes, the object has {size}", c.shard.bytes),
                ))
            }
            None => return Err(Error::corrupt(&c.shard.key, "committed but missing from the store")),
        }
    }
    let manifest = build_manifest(&header, &commits);
    let body = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    if !loc.put_create(MANIFEST_KEY, body.into()).await? {
        return Err(Error::AlreadyExists {
            location: loc.display(MANIFEST_KEY),
            what: "the dataset was already finalized".into(),
        });
    }
    // A commit that landed after the listing above is not in the manifest; its worker fails (it
    // finds the manifest after committing), and its object is left alone: finalize never
    // deletes an object that a commit record names.
    let mut keep: BTreeSet<String> = manifest.shards.iter().map(|s| s.key.clone()).collect();
    for late in list_commits(loc, None).await? {
        if keep.insert(late.shard.key.clone()) {
            tracing::warn!(
                "{} was committed after the manifest was written; its rows are not in the dataset",
                loc.display(&late.shard.key)
            );
        }
    }
    for key in objects.keys() {
        if !keep.contains(key.as_str()) {
            tracing::info!("removing {} (not committed)", loc.display(key));
            loc.delete(key).await?;
        }
    }
    remove_stale_staging_files(loc);
    Ok(manifest)
}

/// A local staging file untouched for this long belongs to a killed upload, not one in flight.
pub const STALE_STAGING_AGE: std::time::Duration = std::time::Duration::from_secs(300);

/// A local multipart upload that was killed leaves a staging file `<key>#<n>`, which the object
/// store API does not list; those older than [`STALE_STAGING_AGE`] are removed. Younger ones may
/// belong to an upload still in flight in another process (a duplicate worker), which must fail
/// on its own terms, not because its file vanished. (On S3, an abandoned multipart upload stays
/// invisible and is reclaimed by the bucket's AbortIncompleteMultipartUpload lifecycle rule.)
fn remove_stale_staging_files(loc: &Location) {
    let Some(dir) = &loc.local_dir else { return };
    let Ok(entries) = std::fs::read_dir(dir.join(SHARDS_DIR)) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some((base, n)) = name.rsplit_once('#') else { continue };
        if !(base.ends_with(".parquet") && n.chars().all(|c| c.is_ascii_digit())) {
            continue;
        }
        let age = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if age.is_some_and(|age| age >= STALE_STAGING_AGE) {
            let _ = std::fs::remove_file(e.path());
        } else {
            tracing::info!("leaving {} (an upload that may still be in flight)", e.path().display());
        }
    }
}
