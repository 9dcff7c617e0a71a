//! Reading a dataset's JSON records from its store: `header.json`, `manifest.json`, and the
//! commit and part records listed under `commits/` and `parts/`. The writer, the reader, `info`,
//! `verify` and [`crate::load_manifest`] all read them through these functions.

use crate::error::{Error, Result};
use crate::location::Location;
use crate::manifest::{
    build_manifest, limits, parse_versioned, CommitRecord, HeaderFile, Manifest, Validate, COMMITS_DIR, HEADER_KEY,
    MANIFEST_KEY,
};

/// `header.json`, or `None` when nothing was written here.
pub(crate) async fn read_header(loc: &Location) -> Result<Option<HeaderFile>> {
    match loc.get_bounded(HEADER_KEY, limits::MAX_METADATA_BYTES).await? {
        None => Ok(None),
        Some(b) => parse_versioned(&b, &loc.display(HEADER_KEY), &loc.url).map(Some),
    }
}

/// `manifest.json`, or `None` when the dataset is not final.
pub(crate) async fn read_manifest(loc: &Location) -> Result<Option<Manifest>> {
    match loc.get_bounded(MANIFEST_KEY, limits::MAX_METADATA_BYTES).await? {
        Some(b) => parse_versioned(&b, &loc.display(MANIFEST_KEY), &loc.url).map(Some),
        None => Ok(None),
    }
}

/// A record that a listing just returned: one that is gone by the time it is read is bad
/// metadata, not an absent record.
pub(crate) async fn read_listed<T: serde::de::DeserializeOwned + Validate>(loc: &Location, key: &str) -> Result<T> {
    let bytes = loc
        .get_bounded(key, limits::MAX_METADATA_BYTES)
        .await?
        .ok_or_else(|| Error::BadMetadata { location: loc.display(key), detail: "listed but vanished".into() })?;
    parse_versioned(&bytes, &loc.display(key), &loc.url)
}

/// The key of commit record `seq` of `worker`.
pub(crate) fn commit_key(worker: &str, seq: u64) -> String {
    format!("{COMMITS_DIR}/{worker}/{seq:08}.json")
}

/// The commit records of `worker` (of every worker when `None`), in (worker, seq) order.
pub(crate) async fn list_commits(loc: &Location, worker: Option<&str>) -> Result<Vec<CommitRecord>> {
    let dir = match worker {
        Some(w) => format!("{COMMITS_DIR}/{w}"),
        None => COMMITS_DIR.to_string(),
    };
    let mut out = Vec::new();
    for (key, _) in loc.list(&dir).await? {
        if !key.ends_with(".json") {
            continue;
        }
        let rec: CommitRecord = read_listed(loc, &key).await?;
        out.push(rec);
    }
    out.sort_by(|a, b| (&a.worker, a.seq).cmp(&(&b.worker, b.seq)));
    Ok(out)
}

/// The dataset's manifest and whether the dataset is final. For a dataset still being written
/// (no `manifest.json` yet), the manifest is merged from `header.json` and the commit records so
/// far.
pub(crate) async fn current_manifest(loc: &Location) -> Result<(Manifest, bool)> {
    if let Some(manifest) = read_manifest(loc).await? {
        return Ok((manifest, true));
    }
    let header = read_header(loc)
        .await?
        .ok_or_else(|| Error::NotFound { url: loc.url.clone(), what: "no manifest.json or header.json".into() })?;
    let commits = list_commits(loc, None).await?;
    Ok((build_manifest(&header, &commits), false))
}
