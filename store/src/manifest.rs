//! `manifest.json`, `header.json` and per-shard commit records (see `docs/format.md`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::Dtype;

/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

pub const MANIFEST_KEY: &str = "manifest.json";
pub const HEADER_KEY: &str = "header.json";
pub const COMMITS_DIR: &str = "commits";
pub const SHARDS_DIR: &str = "shards";
/// `parts/<worker>.json`: written when one of several workers has committed its whole share.
pub const PARTS_DIR: &str = "parts";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ModelIdentity {
    pub name: String,
    /// SHA-256 of the model file, lowercase hex.
    pub file_sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TokenizerIdentity {
    pub name: String,
    /// A digest of the tokenizer's definition (vocab and merges), lowercase hex.
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CorpusIdentity {
    /// Where the text came from (a path or URL, without credentials).
    pub name: String,
    /// A digest of the corpus files, lowercase hex.
    pub sha256: String,
    /// Free-form details of how windows were cut (e.g. "windows of 256 tokens, stride 256").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookSpec {
    pub name: String,
    pub d_model: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CreatedInfo {
    /// The sae-pipeline version that wrote the dataset.
    pub version: String,
    /// The command line, with secret-looking arguments redacted.
    pub command_line: Vec<String>,
}

impl CreatedInfo {
    /// This process's command line, with the values of secret-looking options redacted.
    pub fn from_process() -> Self {
        CreatedInfo { version: env!("CARGO_PKG_VERSION").to_string(), command_line: redact_args(std::env::args()) }
    }
}

fn looks_secret(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "secret",
        "password",
        "passwd",
        "credential",
        "access-key",
        "access_key",
        "session-token",
        "session_token",
        "api-key",
        "api_key",
        "auth",
    ]
    .iter()
    .any(|s| n.contains(s))
}

pub(crate) fn redact_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut redact_next = false;
    for a in args {
        if redact_next {
            out.push("<redacted>".into());
            redact_next = false;
            continue;
        }
        if let Some((k, _)) = a.split_once('=') {
            if k.starts_with('-') && looks_secret(k) || k.starts_with("AWS_") {
                out.push(format!("{k}=<redacted>"));
                continue;
            }
        } else if a.starts_with('-') && looks_secret(&a) {
            redact_next = true;
        }
        // URLs with user info: keep only what is safe to print.
        if a.contains("://") {
            out.push(crate::location::redact_url(&a));
        } else {
            out.push(a);
        }
    }
    out
}

/// What the dataset is: fixed when the dataset is created, written to `header.json` first and
/// copied into the manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetHeader {
    pub model: ModelIdentity,
    pub tokenizer: TokenizerIdentity,
    pub hooks: Vec<HookSpec>,
    pub context_len: usize,
    pub corpus: CorpusIdentity,
    pub created: CreatedInfo,
}

impl DatasetHeader {
    /// What makes `other` a different dataset from `self`, one `path: there X, here Y` per field
    /// that differs ([`crate::compare::differences`], `self` being what is stored), in key order
    /// (`created` does not count: the same dataset is written again by a resumed command). A
    /// corpus `detail` that holds a JSON object is compared field by field. Empty when they
    /// describe the same dataset.
    pub fn differences(&self, other: &DatasetHeader) -> Vec<String> {
        let comparable = |h: &DatasetHeader| {
            let mut json = serde_json::to_value(h).expect("a header serializes");
            json.as_object_mut().expect("a header is an object").remove("created");
            if let Ok(detail @ serde_json::Value::Object(_)) = serde_json::from_str(&h.corpus.detail) {
                json["corpus"]["detail"] = detail;
            }
            json
        };
        crate::compare::differences(&comparable(self), &comparable(other))
    }
}

/// Storage settings that shape the shards; fixed at creation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Encoding {
    pub dtype: Dtype,
    pub compression: String,
    pub zstd_level: i32,
    pub row_group_rows: usize,
    pub shard_bytes: u64,
    /// Parquet encoding of the activation columns.
    pub activation_encoding: String,
}

/// `header.json`: written first, with `PutMode::Create`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeaderFile {
    pub format_version: u32,
    pub dataset_id: String,
    #[serde(flatten)]
    pub header: DatasetHeader,
    pub encoding: Encoding,
}

/// Per hook and per shard sums, accumulated in f64 over the stored (rounded) values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HookStats {
    /// Sum of rows, one entry per dimension.
    pub sum: Vec<f64>,
    /// Sum over rows of the squared L2 norm.
    pub sum_sq_norm: f64,
    pub count: u64,
}

impl HookStats {
    pub fn new(d: usize) -> Self {
        HookStats { sum: vec![0.0; d], sum_sq_norm: 0.0, count: 0 }
    }
    pub fn merge(&mut self, other: &HookStats) {
        for (a, b) in self.sum.iter_mut().zip(&other.sum) {
            *a += b;
        }
        self.sum_sq_norm += other.sum_sq_norm;
        self.count += other.count;
    }
}

/// One shard, as listed by the manifest and by its commit record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// Key relative to the dataset prefix, e.g. `shards/w0-00000003-1f2e3d4c.parquet`.
    pub key: String,
    pub rows: u64,
    pub bytes: u64,
    /// `sha256:<hex>` of the whole object.
    pub checksum: String,
    /// The global index of this shard's first row (filled by the manifest; 0 in commit records).
    pub first_row: u64,
    /// Rows of each row group, in order.
    pub row_groups: Vec<u64>,
    /// Length of the Parquet footer (metadata + 8 bytes), at the end of the object.
    pub footer_len: u64,
    /// CRC-32C of the footer bytes.
    pub footer_crc32c: u32,
    /// Smallest and largest `sequence_id` in the shard.
    pub sequence_ids: [u64; 2],
    /// Per hook sums over this shard's rows.
    pub stats: BTreeMap<String, HookStats>,
}

/// `commits/<worker>/<seq>.json`: one per committed shard, created with `PutMode::Create`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub format_version: u32,
    pub dataset_id: String,
    pub worker: String,
    pub seq: u64,
    pub shard: ShardEntry,
}

/// Per hook summary: the shape and the merged statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HookSummary {
    pub name: String,
    pub d_model: usize,
    /// Mean row (sum of the per-shard sums, in shard order, divided by the count).
    pub mean: Vec<f64>,
    /// Mean squared L2 norm of a row.
    pub mean_sq_norm: f64,
}

/// `manifest.json`: the dataset, written last with `PutMode::Create`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub dataset_id: String,
    pub model: ModelIdentity,
    pub tokenizer: TokenizerIdentity,
    pub hooks: Vec<HookSummary>,
    pub dtype: Dtype,
    pub context_len: usize,
    pub corpus: CorpusIdentity,
    /// Number of stored rows (one per token).
    pub tokens: u64,
    /// Total bytes of the shard objects.
    pub bytes: u64,
    pub encoding: Encoding,
    pub shards: Vec<ShardEntry>,
    pub created: CreatedInfo,
}

impl Manifest {
    pub fn hook(&self, name: &str) -> Option<&HookSummary> {
        self.hooks.iter().find(|h| h.name == name)
    }
    /// Bytes of shard objects per stored activation element.
    pub fn bytes_per_element(&self) -> f64 {
        let elems: u64 = self.hooks.iter().map(|h| h.d_model as u64).sum::<u64>() * self.tokens;
        if elems == 0 {
            0.0
        } else {
            self.bytes as f64 / elems as f64
        }
    }
}

/// Limits on what a metadata record may declare. Records are read from stores anyone may have
/// written to, and their sizes drive allocations (a hook's `d_model` sizes a vector of sums, a
/// shard's rows size the reader's buffers), so a record beyond these is refused as damaged.
pub mod limits {
    /// The largest metadata object read. A manifest holds per-shard sums of every dimension,
    /// about 12 KB per shard of a 576-wide hook: 512 MiB is 40k such shards. Records are decoded
    /// straight into their types (8 bytes per number at most), never into a JSON tree.
    pub const MAX_METADATA_BYTES: u64 = 512 << 20;
    /// The widest hook (the largest models have d_model near 25k).
    pub const MAX_D_MODEL: usize = 1 << 18;
    /// The sum of `d_model` over a dataset's hooks: each hook's statistics are `d_model` f64s.
    pub const MAX_TOTAL_D_MODEL: usize = 1 << 20;
    pub const MAX_HOOKS: usize = 1024;
    pub const MAX_CONTEXT_LEN: usize = 1 << 24;
    /// Rows of one shard (a 256 MiB shard of 576-wide bf16 rows holds 233k).
    pub const MAX_SHARD_ROWS: u64 = 1 << 40;
    /// Bytes of one shard object (S3's largest object is 5 TiB).
    pub const MAX_SHARD_BYTES: u64 = 1 << 43;
    pub const MAX_WORKERS: usize = 1 << 20;
}

/// A metadata record's own consistency checks, run by [`parse_versioned`] after decoding:
/// the error says what is wrong, and the caller names the object.
pub trait Validate {
    fn validate(&self) -> std::result::Result<(), String>;
}

fn check_hooks<'a>(hooks: impl Iterator<Item = (&'a str, usize)>) -> std::result::Result<(), String> {
    use limits::*;
    let (mut count, mut total) = (0usize, 0usize);
    for (name, d_model) in hooks {
        count += 1;
        if d_model == 0 || d_model > MAX_D_MODEL {
            return Err(format!("hook `{name}` has d_model {d_model}, outside 1..={MAX_D_MODEL}"));
        }
        total += d_model;
    }
    if count == 0 || count > MAX_HOOKS {
        return Err(format!("{count} hooks, outside 1..={MAX_HOOKS}"));
    }
    if total > MAX_TOTAL_D_MODEL {
        return Err(format!("the hooks' d_model sum to {total}, more than {MAX_TOTAL_D_MODEL}"));
    }
    Ok(())
}

fn check_context_len(context_len: usize) -> std::result::Result<(), String> {
    if context_len == 0 || context_len > limits::MAX_CONTEXT_LEN {
        return Err(format!("context_len {context_len} is outside 1..={}", limits::MAX_CONTEXT_LEN));
    }
    Ok(())
}

/// A worker name becomes part of object keys (`commits/<worker>/...`, `parts/<worker>.json`).
fn check_worker_name(worker: &str) -> std::result::Result<(), String> {
    let plain = !worker.is_empty()
        && worker.len() <= 64
        && worker.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !plain {
        return Err(format!("worker name {worker:?} is not 1 to 64 letters, digits, `-` or `_`"));
    }
    Ok(())
}

impl Validate for ShardEntry {
    fn validate(&self) -> std::result::Result<(), String> {
        use limits::*;
        let key = &self.key;
        let plain_key = key.starts_with(&format!("{SHARDS_DIR}/"))
            && !key.split('/').any(|p| p.is_empty() || p == "." || p == "..");
        if !plain_key {
            return Err(format!("shard key {key:?} is not a file under {SHARDS_DIR}/"));
        }
        if self.rows > MAX_SHARD_ROWS || self.bytes > MAX_SHARD_BYTES {
            return Err(format!("shard `{key}`: {} rows in {} bytes is beyond the limits ({MAX_SHARD_ROWS} rows, {MAX_SHARD_BYTES} bytes)", self.rows, self.bytes));
        }
        let group_rows = self.row_groups.iter().try_fold(0u64, |sum, &r| sum.checked_add(r));
        if group_rows != Some(self.rows) || self.row_groups.contains(&0) {
            return Err(format!(
                "shard `{key}`: row groups {:?} do not add up to its {} rows",
                self.row_groups, self.rows
            ));
        }
        if self.footer_len < 8 || self.footer_len > self.bytes {
            return Err(format!("shard `{key}`: footer of {} bytes in an object of {}", self.footer_len, self.bytes));
        }
        if self.sequence_ids[0] > self.sequence_ids[1] {
            return Err(format!("shard `{key}`: sequence ids {:?} are not a range", self.sequence_ids));
        }
        for (hook, stats) in &self.stats {
            if stats.sum.len() > MAX_D_MODEL || stats.count > self.rows {
                return Err(format!(
                    "shard `{key}`: statistics of hook `{hook}` have {} sums over {} rows",
                    stats.sum.len(),
                    stats.count
                ));
            }
        }
        Ok(())
    }
}

impl Validate for HeaderFile {
    fn validate(&self) -> std::result::Result<(), String> {
        check_hooks(self.header.hooks.iter().map(|h| (h.name.as_str(), h.d_model)))?;
        check_context_len(self.header.context_len)?;
        if self.encoding.row_group_rows == 0 {
            return Err("row_group_rows is 0".into());
        }
        Ok(())
    }
}

impl Validate for CommitRecord {
    fn validate(&self) -> std::result::Result<(), String> {
        check_worker_name(&self.worker)?;
        self.shard.validate()
    }
}

impl Validate for crate::writer::PartRecord {
    fn validate(&self) -> std::result::Result<(), String> {
        check_worker_name(&self.worker)?;
        if self.workers == 0 || self.workers > limits::MAX_WORKERS {
            return Err(format!("workers {} is outside 1..={}", self.workers, limits::MAX_WORKERS));
        }
        Ok(())
    }
}

impl Validate for Manifest {
    fn validate(&self) -> std::result::Result<(), String> {
        check_hooks(self.hooks.iter().map(|h| (h.name.as_str(), h.d_model)))?;
        for hook in &self.hooks {
            if hook.mean.len() != hook.d_model {
                return Err(format!(
                    "hook `{}`: mean has {} values for d_model {}",
                    hook.name,
                    hook.mean.len(),
                    hook.d_model
                ));
            }
        }
        check_context_len(self.context_len)?;
        if self.encoding.row_group_rows == 0 {
            return Err("row_group_rows is 0".into());
        }
        let (mut rows, mut bytes) = (0u64, 0u64);
        for shard in &self.shards {
            shard.validate()?;
            if shard.first_row != rows {
                return Err(format!(
                    "shard `{}` starts at row {}, but the shards before it hold {rows} rows",
                    shard.key, shard.first_row
                ));
            }
            // Each term is bounded by the shard limits, but there may be many shards.
            rows = rows.checked_add(shard.rows).ok_or("the shards' rows overflow")?;
            bytes = bytes.checked_add(shard.bytes).ok_or("the shards' bytes overflow")?;
        }
        if rows != self.tokens || bytes != self.bytes {
            return Err(format!(
                "the shards hold {rows} rows in {bytes} bytes, the manifest says {} in {}",
                self.tokens, self.bytes
            ));
        }
        Ok(())
    }
}

/// Parse JSON metadata, refusing unknown format versions before anything else, and records that
/// fail their [`Validate`] checks after.
pub(crate) fn parse_versioned<T: serde::de::DeserializeOwned + Validate>(
    bytes: &[u8],
    location: &str,
    url: &str,
) -> Result<T> {
    if bytes.len() as u64 > limits::MAX_METADATA_BYTES {
        return Err(Error::BadMetadata {
            location: location.to_string(),
            detail: format!(
                "{} bytes, more than the {} a metadata record may hold",
                bytes.len(),
                limits::MAX_METADATA_BYTES
            ),
        });
    }
    /// Only the version: the other fields are skipped without being kept.
    #[derive(Deserialize)]
    struct VersionOnly {
        format_version: Option<serde_json::Value>,
    }
    let v: VersionOnly = serde_json::from_slice(bytes).map_err(|e| Error::BadMetadata {
        location: location.to_string(),
        detail: format!("not a JSON object: {e}"),
    })?;
    match &v.format_version {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(FORMAT_VERSION as u64) => {}
        Some(other) => {
            return Err(Error::UnsupportedVersion {
                url: url.to_string(),
                found: other.to_string(),
                supported: FORMAT_VERSION,
            })
        }
        None => {
            return Err(Error::UnsupportedVersion {
                url: url.to_string(),
                found: "none".into(),
                supported: FORMAT_VERSION,
            })
        }
    }
    let record: T = serde_json::from_slice(bytes)
        .map_err(|e| Error::BadMetadata { location: location.to_string(), detail: e.to_string() })?;
    record.validate().map_err(|detail| Error::BadMetadata { location: location.to_string(), detail })?;
    Ok(record)
}

/// Merge commit records (already in shard order) into a manifest.
pub(crate) fn build_manifest(header: &HeaderFile, commits: &[CommitRecord]) -> Manifest {
    let mut shards = Vec::with_capacity(commits.len());
    let mut first_row = 0u64;
    let mut bytes = 0u64;
    let mut totals: Vec<HookStats> = header.header.hooks.iter().map(|h| HookStats::new(h.d_model)).collect();
    for c in commits {
        let mut s = c.shard.clone();
        s.first_row = first_row;
        // Validated records keep these far from overflowing; saturate rather than panic anyway,
        // and let the manifest's own validation refuse the result.
        first_row = first_row.saturating_add(s.rows);
        bytes = bytes.saturating_add(s.bytes);
        for (h, t) in header.header.hooks.iter().zip(totals.iter_mut()) {
            if let Some(st) = s.stats.get(&h.name) {
                t.merge(st);
            }
        }
        shards.push(s);
    }
    let hooks = header
        .header
        .hooks
        .iter()
        .zip(totals)
        .map(|(h, t)| {
            let n = t.count.max(1) as f64;
            HookSummary {
                name: h.name.clone(),
                d_model: h.d_model,
                mean: t.sum.iter().map(|s| s / n).collect(),
                mean_sq_norm: t.sum_sq_norm / n,
            }
        })
        .collect();
    Manifest {
        format_version: FORMAT_VERSION,
        dataset_id: header.dataset_id.clone(),
        model: header.header.model.clone(),
        tokenizer: header.header.tokenizer.clone(),
        hooks,
        dtype: header.encoding.dtype,
        context_len: header.header.context_len,
        corpus: header.header.corpus.clone(),
        tokens: first_row,
        bytes,
        encoding: header.encoding.clone(),
        shards,
        created: header.header.created.clone(),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn header_differences_name_each_field_that_differs() {
        let a = DatasetHeader {
            model: ModelIdentity { name: "m".into(), file_sha256: "aa".into() },
            tokenizer: TokenizerIdentity::default(),
            hooks: vec![HookSpec { name: "blocks.15.hook_resid_post".into(), d_model: 576 }],
            context_len: 256,
            corpus: CorpusIdentity { name: "fortunes".into(), sha256: "cc".into(), detail: "{}".into() },
            created: CreatedInfo::default(),
        };
        // Another command line writing the same dataset is not a difference.
        let mut same = a.clone();
        same.created.command_line = vec!["sae".into(), "capture".into()];
        assert!(a.differences(&same).is_empty());

        let mut b = a.clone();
        b.hooks[0].name = "blocks.14.hook_resid_post".into();
        b.context_len = 128;
        let diff = a.differences(&b);
        assert_eq!(diff.len(), 2, "{diff:?}");
        assert_eq!(diff[0], "context_len: there 256, here 128", "{diff:?}");
        assert!(
            diff[1].starts_with("hooks: there ")
                && diff[1].contains("blocks.15.hook_resid_post")
                && diff[1].contains("blocks.14.hook_resid_post"),
            "{diff:?}"
        );

        // A JSON detail is compared field by field; any other detail whole.
        let (mut c, mut d) = (a.clone(), a.clone());
        c.corpus.detail = r#"{"max_tokens":100,"batch_size":4}"#.into();
        d.corpus.detail = r#"{"max_tokens":200,"batch_size":4}"#.into();
        assert_eq!(c.differences(&d), ["corpus.detail.max_tokens: there 100, here 200"]);
        d.corpus.detail = "plain".into();
        assert_eq!(c.differences(&d), [r#"corpus.detail: there {"batch_size":4,"max_tokens":100}, here "plain""#]);
    }
    use super::*;

    #[test]
    fn redacts_secret_args() {
        let a = redact_args(
            ["sae", "capture", "--secret-key", "S3CR3T", "--aws-access-key=AK", "s3://u:p@b/x", "--tokens", "100"]
                .map(String::from),
        );
        let joined = a.join(" ");
        assert!(!joined.contains("S3CR3T") && !joined.contains("AK") && !joined.contains("u:p"), "{joined}");
        assert!(joined.contains("--tokens 100") && joined.contains("s3://b/x"), "{joined}");
    }

    #[test]
    fn refuses_unknown_version() {
        let e = parse_versioned::<Manifest>(br#"{"format_version": 99}"#, "m", "memory://x").unwrap_err();
        assert!(matches!(e, Error::UnsupportedVersion { .. }));
        assert!(e.to_string().contains("format_version 99"), "{e}");
    }
}
