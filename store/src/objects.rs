//! A folder of plain objects on any store, with blocking calls: what the trainer needs for its
//! outputs (checkpoints, `cfg.json`, metrics, plots) on the same URLs as datasets.
//!
//! Every single-object put is atomic on every backend (S3 puts are; the local file system writes
//! a staging file and renames it), so an object is either complete or absent. That is the whole
//! consistency story for callers that keep each logical record in one object. Objects larger
//! than [`MULTIPART_THRESHOLD`] (big checkpoints) go up as multipart uploads, since one S3 PUT
//! is capped at 5 GiB; those are atomic too (the object appears when the upload completes).

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::runtime::Runtime;

use crate::error::{Error, Result};
use crate::location::{open_store_with, redact_url, Location, StoreOptions};
use crate::manifest::Manifest;
use crate::records::current_manifest;
use crate::runtime::runtime;

/// Puts of more bytes than this are multipart uploads.
pub const MULTIPART_THRESHOLD: usize = 256 << 20;
/// The size of each part of a multipart put.
const PART_BYTES: usize = 64 << 20;

/// An opened folder (a URL prefix) of objects. Keys are relative to the folder.
pub struct ObjectDir {
    loc: Location,
    rt: Runtime,
    multipart_threshold: usize,
}

impl ObjectDir {
    pub fn open(url: &str, opts: &StoreOptions) -> Result<ObjectDir> {
        Ok(ObjectDir { loc: open_store_with(url, opts)?, rt: runtime()?, multipart_threshold: MULTIPART_THRESHOLD })
    }

    /// The URL, safe to print (no credentials).
    pub fn url(&self) -> &str {
        &self.loc.url
    }

    /// The local directory, when the folder is on the local file system.
    pub fn local_dir(&self) -> Option<&std::path::Path> {
        self.loc.local_dir.as_deref()
    }

    /// `url/key`, for messages.
    pub fn display(&self, key: &str) -> String {
        self.loc.display(key)
    }

    /// The sub-folder `key/` as its own [`ObjectDir`].
    pub fn child(&self, key: &str) -> Result<ObjectDir> {
        let loc = Location {
            store: self.loc.store.clone(),
            prefix: self.loc.path(key),
            url: self.loc.display(key),
            local_dir: self.loc.local_dir.as_ref().map(|d| d.join(key)),
        };
        Ok(ObjectDir { loc, rt: runtime()?, multipart_threshold: self.multipart_threshold })
    }

    /// The object's bytes, or `None` when it does not exist.
    pub fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.rt.block_on(self.loc.get(key))
    }

    /// Puts of more than `bytes` become multipart uploads (tests lower it from
    /// [`MULTIPART_THRESHOLD`]).
    pub fn with_multipart_threshold(mut self, bytes: usize) -> Self {
        self.multipart_threshold = bytes;
        self
    }

    /// Writes (or replaces) the object atomically: one put, or a multipart upload when large.
    pub fn put(&self, key: &str, data: impl Into<Bytes>) -> Result<()> {
        let data: Bytes = data.into();
        let path = self.loc.path(key);
        let failed = |op, e| Error::store(op, self.loc.display(key), e);
        if data.len() <= self.multipart_threshold {
            let payload = PutPayload::from_bytes(data);
            return self.rt.block_on(self.loc.store.put(&path, payload)).map(|_| ()).map_err(|e| failed("PUT", e));
        }
        self.rt.block_on(async {
            let upload =
                self.loc.store.put_multipart(&path).await.map_err(|e| failed("start multipart upload of", e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
            for part in data.chunks(PART_BYTES) {
                writer.wait_for_capacity(4).await.map_err(|e| failed("upload part of", e))?;
                writer.put(data.slice_ref(part));
            }
            writer.finish().await.map(|_| ()).map_err(|e| failed("complete upload of", e))
        })
    }

    /// Creates the object only if it does not exist yet; `Ok(false)` if it did.
    pub fn put_create(&self, key: &str, data: impl Into<Bytes>) -> Result<bool> {
        self.rt.block_on(self.loc.put_create(key, data.into()))
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        self.rt.block_on(self.loc.delete(key))
    }

    /// Keys (relative to this folder) of every object under `dir/`, sorted.
    pub fn list(&self, dir: &str) -> Result<Vec<String>> {
        let listed = self.rt.block_on(self.loc.list(dir))?;
        Ok(listed.into_iter().map(|(key, _)| key).collect())
    }
}

/// The dataset's manifest and whether the dataset is final. For a dataset still being written
/// (no `manifest.json` yet), the manifest is merged from the commit records so far, which is what
/// a follow-mode reader will see first.
pub fn load_manifest(url: &str, opts: &StoreOptions) -> Result<(Manifest, bool)> {
    let loc = open_store_with(url, opts)?;
    runtime()?.block_on(current_manifest(&loc))
}

/// The token columns (`sequence_id`, `position`, `token_id`) of shard `index` of a final dataset,
/// in stored order. The activations are not decoded. Evaluation rebuilds token windows from
/// these: rows of one `sequence_id`, in `position` order.
pub fn shard_tokens(url: &str, opts: &StoreOptions, index: usize) -> Result<crate::reader::TokenColumns> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::ProjectionMask;

    let (manifest, _) = load_manifest(url, opts)?;
    let shard = manifest.shards.get(index).ok_or_else(|| Error::NoSuchShard {
        url: redact_url(url),
        shards: manifest.shards.len(),
        index,
    })?;
    let dir = ObjectDir::open(url, opts)?;
    let bytes = dir.get(&shard.key)?.ok_or_else(|| Error::NotFound {
        url: dir.url().to_string(),
        what: format!("shard `{}` listed by the manifest is missing", shard.key),
    })?;
    let pq = |e| Error::Parquet { key: shard.key.clone(), source: e };
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(pq)?;
    let names = [crate::format::COL_SEQUENCE_ID, crate::format::COL_POSITION, crate::format::COL_TOKEN_ID];
    let schema = builder.parquet_schema();
    let leaves: Vec<usize> = (0..schema.num_columns()).filter(|&i| names.contains(&schema.column(i).name())).collect();
    if leaves.len() != names.len() {
        return Err(Error::corrupt(&shard.key, "the token columns are missing"));
    }
    let mask = ProjectionMask::leaves(schema, leaves);
    let reader = builder.with_projection(mask).build().map_err(pq)?;
    let mut out = crate::reader::TokenColumns::default();
    let bad = || Error::corrupt(&shard.key, "token columns have unexpected types");
    for batch in reader {
        let batch = batch.map_err(|e| pq(e.into()))?;
        out.extend_from_arrow(&batch).ok_or_else(bad)?;
    }
    if out.token_id.len() as u64 != shard.rows {
        return Err(Error::corrupt(
            &shard.key,
            format!("{} rows, the manifest says {}", out.token_id.len(), shard.rows),
        ));
    }
    Ok(out)
}
