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
    ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};

use crate::error::{Error, Result};

/// Options for opening a store. The defaults are what a user gets; tests lower the retry limits.
/// Its `Debug` shows the S3 setting names but no value that could be a credential.
#[derive(Clone, Default)]
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

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s3_config: Vec<(&str, &str)> = self
            .s3_config
            .iter()
            .map(|(k, v)| (k.as_str(), if s3_setting_is_public(k) { v.as_str() } else { "<redacted>" }))
            .collect();
        f.debug_struct("StoreOptions")
            .field("retry", &self.retry)
            // Client options hold proxy URLs and default headers, either of which may carry
            // credentials: say only whether they are set.
            .field("client", &self.client.as_ref().map(|_| "<set>"))
            .field("s3_config", &s3_config)
            .finish()
    }
}

/// S3 settings whose values are safe to print (everything else, keys and tokens above all, is
/// redacted). An allow-list, so that a setting added later is hidden until someone decides.
fn s3_setting_is_public(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "aws_region",
        "region",
        "aws_allow_http",
        "allow_http",
        "aws_bucket",
        "bucket",
        "aws_virtual_hosted_style_request",
        "aws_imdsv1_fallback",
        "aws_unsigned_payload",
        "aws_skip_signature",
        "aws_checksum_algorithm",
        "aws_conditional_put",
        "aws_disable_tagging",
        "aws_request_payer",
        "aws_s3_express",
        "aws_server_side_encryption",
    ]
    .contains(&key.as_str())
}

/// An opened dataset location: an object store and the prefix of the dataset inside it.
/// Its `Debug` shows the store's name (`AmazonS3(bucket)`), never its configuration.
#[derive(Clone)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    /// The dataset's prefix inside `store`. `manifest.json` is `prefix/manifest.json`.
    pub prefix: Path,
    /// The URL as given, with any user info or query string removed: safe to print.
    pub url: String,
    /// For local datasets, the directory (used to remove staging files of killed uploads).
    pub local_dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Location")
            .field("store", &format_args!("{}", self.store))
            .field("prefix", &self.prefix)
            .field("url", &self.url)
            .field("local_dir", &self.local_dir)
            .finish()
    }
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
    // Reasons may quote settings (a client error quotes the endpoint URL): redact them too.
    let bad = |reason: &str| Error::Url { url: redact_url(url), reason: redact_urls_in(reason) };
    // Before anything splits the URL: a secret holding `/` would otherwise be taken for a
    // bucket name and sent out in requests.
    if has_user_info(url) {
        return Err(bad("credentials are not accepted in URLs; use the AWS_* environment variables"));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("missing bucket name (expected s3://bucket/prefix)"));
        }
        if bucket.contains('@') || rest.contains('?') {
            return Err(bad(
                "credentials or query strings are not accepted in URLs; use the AWS_* environment variables",
            ));
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
            let key: object_store::aws::AmazonS3ConfigKey =
                k.parse().map_err(|_| bad(&format!("unknown S3 setting `{k}`")))?;
            b = b.with_config(key, v);
        }
        let store = b.build().map_err(|e| bad(&format!("cannot configure S3 client: {e}")))?;
        let prefix = Path::parse(prefix.trim_end_matches('/')).map_err(|e| bad(&e.to_string()))?;
        return Ok(Location { store: Arc::new(store), prefix, url: redact_url(url), local_dir: None });
    }
    if let Some(rest) = url.strip_prefix("memory://") {
        let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let map = MEMORY_STORES.get_or_init(Default::default);
        let store = map.lock().unwrap().entry(name.to_string()).or_insert_with(|| Arc::new(InMemory::new())).clone();
        let prefix = Path::parse(prefix.trim_end_matches('/')).map_err(|e| bad(&e.to_string()))?;
        return Ok(Location { store, prefix, url: redact_url(url), local_dir: None });
    }
    let fs_path = if let Some(rest) = url.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(bad("file:// URLs must be absolute (file:///abs/path)"));
        }
        std::path::PathBuf::from(rest)
    } else if url.contains("://") {
        return Err(bad("unsupported scheme (use a path, file://, s3:// or memory://)"));
    } else {
        if url.is_empty() {
            return Err(bad("empty path"));
        }
        let p = std::path::PathBuf::from(url);
        if p.is_absolute() {
            p
        } else {
            std::env::current_dir().map_err(|e| bad(&e.to_string()))?.join(p)
        }
    };
    let prefix = Path::from_absolute_path(&fs_path).map_err(|e| bad(&e.to_string()))?;
    let store = LocalFileSystem::new().with_automatic_cleanup(true);
    Ok(Location { store: Arc::new(store), prefix, url: fs_path.display().to_string(), local_dir: Some(fs_path) })
}

/// Remove user info and query strings from a URL before it goes into a message.
pub fn redact_url(url: &str) -> String {
    let without_query = url.split(['?', '#']).next().unwrap_or("");
    if without_query.contains("://") {
        return redact_urls_in(without_query);
    }
    match without_query.split_once('/') {
        Some((auth, path)) => format!("{}/{}", auth.rsplit('@').next().unwrap_or(""), path),
        None => without_query.rsplit('@').next().unwrap_or("").to_string(),
    }
}

/// `text` with the user info of every `scheme://user:secret@host/...` in it removed: for
/// messages that may quote URLs (an HTTP client's errors quote the request URL).
///
/// User info ends at the last `@` of the URL when no `/` comes before it, or when a `:` comes
/// before the first `/`: AWS secret keys may hold `/`, and a pasted `s3://KEY:SE/CRET@bucket`
/// must lose all of it. An `@` further along a path (`s3://bucket/a@b`) is kept.
pub fn redact_urls_in(text: &str) -> String {
    let ends_url = |c: char| c.is_whitespace() || matches!(c, '`' | '"' | '\'' | '<' | '>');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        let url_len = after.find(ends_url).unwrap_or(after.len());
        let url = &after[..url_len];
        let keep_from = match url.rfind('@') {
            Some(at_sign) => {
                let user_info = &url[..at_sign];
                let host_part = user_info.split('/').next().unwrap_or("");
                if !user_info.contains('/') || host_part.contains(':') {
                    at_sign + 1
                } else {
                    0
                }
            }
            None => 0,
        };
        out.push_str(&url[keep_from..]);
        rest = &after[url_len..];
    }
    out.push_str(rest);
    out
}

/// Whether `text` holds a URL with user info (credentials), as [`redact_urls_in`] sees it.
pub fn has_user_info(text: &str) -> bool {
    redact_urls_in(text) != text
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
            Some(parts) => parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"),
            None => path.to_string(),
        }
    }

    pub(crate) async fn get(&self, rel: &str) -> Result<Option<Bytes>> {
        match self.store.get(&self.path(rel)).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| Error::store("GET", self.display(rel), e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::store("GET", self.display(rel), e)),
        }
    }

    /// Like [`Location::get`], but refuses an object larger than `max_bytes` before reading
    /// it: for metadata, whose size a writer (or an attacker) chose.
    pub(crate) async fn get_bounded(&self, rel: &str, max_bytes: u64) -> Result<Option<Bytes>> {
        let result = match self.store.get(&self.path(rel)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Error::store("GET", self.display(rel), e)),
        };
        if result.meta.size > max_bytes {
            return Err(Error::BadMetadata {
                location: self.display(rel),
                detail: format!("{} bytes, more than the {max_bytes} such a record may hold", result.meta.size),
            });
        }
        let bytes = result.bytes().await.map_err(|e| Error::store("GET", self.display(rel), e))?;
        Ok(Some(bytes))
    }

    pub(crate) async fn get_range(&self, rel: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        self.store
            .get_range(&self.path(rel), range)
            .await
            .map_err(|e| Error::store("GET (range)", self.display(rel), e))
    }

    /// Create `rel` with `PutMode::Create`. Returns `Ok(false)` if it already exists.
    pub(crate) async fn put_create(&self, rel: &str, data: Bytes) -> Result<bool> {
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.store.put_opts(&self.path(rel), PutPayload::from_bytes(data), opts).await {
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
        let mut out: Vec<_> = metas.into_iter().map(|m| (self.rel(&m.location), m)).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials() {
        assert_eq!(redact_url("s3://AKIA:secret@bucket/x?sig=1"), "s3://bucket/x");
        assert_eq!(redact_url("/tmp/x"), "/tmp/x");
    }

    #[test]
    fn redacts_user_info_wherever_a_message_quotes_a_url() {
        let text = "error sending request for url (http://AKIA:s3cr3t@127.0.0.1:9000/bucket/k): refused; also `s3://K:SE/CRET@b/x` and s3://bucket/a@b";
        let redacted = redact_urls_in(text);
        assert_eq!(redacted, "error sending request for url (http://127.0.0.1:9000/bucket/k): refused; also `s3://b/x` and s3://bucket/a@b");
        assert!(has_user_info(text) && !has_user_info(&redacted));
        assert!(
            !has_user_info("s3://bucket/prefix") && !has_user_info("/tmp/a@b/c") && !has_user_info("--max-tokens=5")
        );
        assert!(has_user_info("--out=s3://KEY:SECRET@bucket/p"));
        assert_eq!(redact_url("s3://K:SE/CRET@bucket/x?sig=1"), "s3://bucket/x");
        assert_eq!(redact_url("memory://KEY:SECRET@name/p"), "memory://name/p");
    }

    #[test]
    fn debug_of_options_and_locations_prints_no_secret() {
        let opts = StoreOptions {
            s3_config: vec![
                ("aws_secret_access_key".into(), "PLANTED-SECRET".into()),
                ("aws_session_token".into(), "PLANTED-TOKEN".into()),
                ("aws_access_key_id".into(), "PLANTED-KEY-ID".into()),
                ("aws_region".into(), "eu-west-1".into()),
                ("aws_endpoint".into(), "http://u:PLANTED-PASS@127.0.0.1:9".into()),
            ],
            client: Some(ClientOptions::new().with_proxy_url("http://u:PLANTED-PROXY@proxy:3128")),
            ..Default::default()
        };
        let debug = format!("{opts:?} {opts:#?}");
        assert!(!debug.contains("PLANTED"), "{debug}");
        assert!(debug.contains("aws_secret_access_key") && debug.contains("eu-west-1"), "{debug}");
        let loc = open_store_with("s3://bucket/prefix", &opts).unwrap();
        let debug = format!("{loc:?} {loc:#?}");
        assert!(!debug.contains("PLANTED") && debug.contains("bucket"), "{debug}");
    }

    #[test]
    fn rejects_credentials_in_url() {
        for url in [
            "s3://KEY:SECRET@bucket/p",
            "s3://KEY:SE/CRET@bucket/p",
            "memory://KEY:SECRET@m/p",
            "file://KEY:SECRET@/tmp/p",
        ] {
            let e = open_store(url).unwrap_err().to_string();
            assert!(!e.contains("SECRET") && !e.contains("CRET"), "{e}");
            assert!(e.contains("AWS_"), "{e}");
        }
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
