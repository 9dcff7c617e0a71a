//! Dataset URLs: a plain path, `file://`, `s3://bucket/prefix`, or `memory://name/prefix`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig,
};

use crate::error::{Error, Result};

/// Options for opening a store. The defaults are what a user gets; tests lower the retry limits.
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    /// Retry policy for remote stores (S3). `None` keeps object_store's default (10 retries,
    /// exponential backoff, 3 min budget).
    pub retry: Option<RetryConfig>,
    /// HTTP client options for remote stores (timeouts, pool size...).
    pub client: Option<ClientOptions>,
    /// S3 settings applied over the `AWS_*` environment, as `(key, value)` with object_store's
    /// key names (`aws_endpoint`, `aws_allow_http`, `aws_access_key_id`, ...).
    pub s3_config: Vec<(String, String)>,
}

/// An opened dataset location: an object store and the prefix of the dataset inside it.
#[derive(Clone, Debug)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    /// The dataset's prefix inside `store`. `manifest.json` is `prefix/manifest.json`.
    pub prefix: Path,
    /// The URL as given, with any user info or query string removed: safe to print.
    pub url: String,
    /// For local datasets, the directory (used to remove staging files of killed uploads).
    pub local_dir: Option<std::path::PathBuf>,
}

/// Open a dataset URL with default options. See [`open_store_with`].
pub fn open_store(url: &str) -> Result<Location> {
    open_store_with(url, &StoreOptions::default())
}

static MEMORY_STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();

/// Open a dataset URL:
/// - a plain path (relative or absolute) or `file:///abs/path`: the local file system;
/// - `s3://bucket/prefix`: Amazon S3 or any S3-compatible server, configured by the standard
///   `AWS_*` environment variables (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, `AWS_REGION`,
///   `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, ...);
/// - `memory://name/prefix`: an in-process store shared by every URL with the same `name`
///   (for tests).
pub fn open_store_with(url: &str, opts: &StoreOptions) -> Result<Location> {
    let bad = |reason: &str| Error::Url {
        url: redact_url(url),
        reason: reason.to_string(),
    };
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("missing bucket name (expected s3://bucket/prefix)"));
        }
        if bucket.contains('@') || rest.contains('?') {
            return Err(bad("credentials or query strings are not accepted in URLs; use the AWS_* environment variables"));
        }
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(r) = &opts.retry {
            b = b.with_retry(r.clone());
        }
        if let Some(c) = &opts.client {
            // Client options replace the environment's client settings: keep AWS_ALLOW_HTTP.
            b = b.with_client_options(c.clone());
            if let Ok(v) = std::env::var("AWS_ALLOW_HTTP") {
                b = b.with_allow_http(v.eq_ignore_ascii_case("true") || v == "1");
            }
        }
        for (k, v) in &opts.s3_config {
            let key: object_store::aws::AmazonS3ConfigKey = k
                .parse()
                .map_err(|_| bad(&format!("unknown S3 setting `{k}`")))?;
            b = b.with_config(key, v);
        }
        let store = b
            .build()
            .map_err(|e| bad(&format!("cannot configure S3 client: {e}")))?;
        let prefix = Path::parse(prefix.trim_end_matches('/')).map_err(|e| bad(&e.to_string()))?;
        return Ok(Location {
            store: Arc::new(store),
            prefix,
            url: redact_url(url),
            local_dir: None,
        });
    }
    if let Some(rest) = url.strip_prefix("memory://") {
        let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let map = MEMORY_STORES.get_or_init(Default::default);
        let store = map
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(InMemory::new()))
            .clone();
        let prefix = Path::parse(prefix.trim_end_matches('/')).map_err(|e| bad(&e.to_string()))?;
        return Ok(Location {
            store,
            prefix,
            url: url.to_string(),
            local_dir: None,
        });
    }
    let fs_path = if let Some(rest) = url.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(bad("file:// URLs must be absolute (file:///abs/path)"));
        }
        std::path::PathBuf::from(rest)
    } else if url.contains("://") {
        return Err(bad(
            "unsupported scheme (use a path, file://, s3:// or memory://)",
        ));
    } else {
        if url.is_empty() {
            return Err(bad("empty path"));
        }
        let p = std::path::PathBuf::from(url);
        if p.is_absolute() {
            p
        } else {
            std::env::current_dir()
                .map_err(|e| bad(&e.to_string()))?
                .join(p)
        }
    };
    let prefix = Path::from_absolute_path(&fs_path).map_err(|e| bad(&e.to_string()))?;
    let store = LocalFileSystem::new().with_automatic_cleanup(true);
    Ok(Location {
        store: Arc::new(store),
        prefix,
        url: fs_path.display().to_string(),
        local_dir: Some(fs_path),
    })
}

/// Remove user info and query strings from a URL before it goes into a message.
pub(crate) fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let rest = match rest.split_once('/') {
        Some((auth, path)) => format!("{}/{}", auth.rsplit('@').next().unwrap_or(""), path),
        None => rest.rsplit('@').next().unwrap_or("").to_string(),
    };
    match scheme {
        Some(s) => format!("{s}://{rest}"),
        None => rest,
    }
}

impl Location {
    /// The object path of `rel` (a key relative to the dataset prefix, like `shards/x.parquet`).
    pub fn path(&self, rel: &str) -> Path {
        let mut p = self.prefix.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.join(part);
        }
        p
    }

    /// `url/rel`, for messages.
    pub fn display(&self, rel: &str) -> String {
        format!("{}/{}", self.url.trim_end_matches('/'), rel)
    }

    /// The key of `path` relative to the prefix.
    pub(crate) fn rel(&self, path: &Path) -> String {
        match path.prefix_match(&self.prefix) {
            Some(parts) => parts
                .map(|p| p.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/"),
            None => path.to_string(),
        }
    }

    pub(crate) async fn get(&self, rel: &str) -> Result<Option<Bytes>> {
        match self.store.get(&self.path(rel)).await {
            Ok(r) => Ok(Some(
                r.bytes()
                    .await
                    .map_err(|e| Error::store("GET", self.display(rel), e))?,
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::store("GET", self.display(rel), e)),
        }
    }

    pub(crate) async fn get_range(&self, rel: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        self.store
            .get_range(&self.path(rel), range)
            .await
            .map_err(|e| Error::store("GET (range)", self.display(rel), e))
    }

    /// Create `rel` with `PutMode::Create`. Returns `Ok(false)` if it already exists.
    pub(crate) async fn put_create(&self, rel: &str, data: Bytes) -> Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.path(rel), PutPayload::from_bytes(data), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(Error::store("PUT (create)", self.display(rel), e)),
        }
    }

    pub(crate) async fn delete(&self, rel: &str) -> Result<()> {
        match self.store.delete(&self.path(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::store("DELETE", self.display(rel), e)),
        }
    }

    /// Every object under `prefix/rel_dir/`, with keys relative to the dataset prefix.
    pub(crate) async fn list(&self, rel_dir: &str) -> Result<Vec<(String, ObjectMeta)>> {
        let dir = self.path(rel_dir);
        let metas: Vec<ObjectMeta> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| Error::store("LIST", self.display(rel_dir), e))?;
        let mut out: Vec<_> = metas
            .into_iter()
            .map(|m| (self.rel(&m.location), m))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials() {
        assert_eq!(
            redact_url("s3://AKIA:secret@bucket/x?sig=1"),
            "s3://bucket/x"
        );
        assert_eq!(redact_url("/tmp/x"), "/tmp/x");
    }

    #[test]
    fn rejects_credentials_in_url() {
        let e = open_store("s3://KEY:SECRET@bucket/p")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("SECRET"), "{e}");
        assert!(e.contains("AWS_"), "{e}");
    }

    #[test]
    fn parses_locations() {
        let l = open_store("memory://t/a/b").unwrap();
        assert_eq!(l.path("shards/x.parquet").as_ref(), "a/b/shards/x.parquet");
        assert_eq!(l.rel(&l.path("commits/w0/1.json")), "commits/w0/1.json");
        let l = open_store("/tmp/some/ds").unwrap();
        assert_eq!(l.prefix.as_ref(), "tmp/some/ds");
        assert!(open_store("gs://x/y").is_err());
        assert!(open_store("s3:///nobucket").is_err());
    }
}
