use std::fmt;

/// Errors of the store. Every variant that concerns stored data names the dataset URL or the
/// object (shard key, record) it concerns; the two that concern none say so: [`Error::Invalid`]
/// (an argument or option of the caller) and [`Error::Start`] (a thread of this process).
/// No variant ever carries credentials: URLs are stored without user info or query strings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid dataset URL `{url}`: {reason}")]
    Url { url: String, reason: String },
    /// `cause` already holds the store's whole error chain, so it is printed here and is not
    /// the error's `source()` (a caller printing the chain would print it twice).
    #[error("{op} `{location}` failed: {cause}")]
    Store { op: &'static str, location: String, cause: StoreFailure },
    #[error("`{location}` already exists: {what}")]
    AlreadyExists { location: String, what: String },
    #[error("no dataset at `{url}`: {what}")]
    NotFound { url: String, what: String },
    #[error("dataset `{url}` has format_version {found}, but this build reads only version {supported}; upgrade sae-pipeline")]
    UnsupportedVersion { url: String, found: String, supported: u32 },
    #[error("bad manifest or commit record `{location}`: {detail}")]
    BadMetadata { location: String, detail: String },
    #[error("corrupt shard `{key}`: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("parquet error in shard `{key}`: {source}")]
    Parquet {
        key: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// An argument or option of the caller is wrong, on its own or for the dataset it is used
    /// with (a rank beyond the row groups, a cursor past the end of an epoch).
    #[error("{0}")]
    Invalid(String),
    /// A runtime or thread pool of this process could not start.
    #[error("cannot start {what}: {cause}")]
    Start { what: &'static str, cause: String },
    /// The reader was asked for a hook the dataset does not hold (`have` lists those it does).
    #[error("dataset `{url}` has no hook `{hook}`; it has: {}", .have.join(", "))]
    NoSuchHook { url: String, hook: String, have: Vec<String> },
    /// The hook's `d_model` is not the one the reader was asked for.
    #[error("hook `{hook}` of dataset `{url}` has d_model {found}, not the {wanted} asked for")]
    WrongDModel { url: String, hook: String, found: usize, wanted: usize },
    /// [`crate::shard_tokens`] was asked for a shard past the last.
    #[error("dataset `{url}` has {shards} shards, no shard {index}")]
    NoSuchShard { url: String, shards: usize, index: usize },
    /// [`crate::finalize`] refused: not every worker has finished.
    #[error("cannot finalize {url}: {reason}")]
    FinalizeRefused { url: String, reason: String },
    /// A follow-mode reader waited longer than its idle timeout for a new commit.
    #[error("follow mode: nothing new was committed to `{url}` for {idle:?} and it is not final")]
    FollowIdle { url: String, idle: std::time::Duration },
    /// The reader's windows did not arrive in the order its plan made them: a bug, not bad data.
    #[error("reader of `{url}` out of step: {detail}")]
    OutOfStep { url: String, detail: String },
    /// A row group could not be converted or encoded (`row_group` counts the row groups this
    /// writer was given, from 0).
    #[error("encoding row group {row_group} of `{url}` failed: {detail}")]
    Encode { url: String, row_group: u64, detail: String },
    /// A call on a writer whose encoding thread already failed (or that already finished).
    #[error("the writer of `{url}` failed earlier: {detail}")]
    WriterFailed { url: String, detail: String },
    /// The reader's fetch task or a decoding thread died: the data stream is broken, not ended.
    #[error("reading `{url}` failed: {detail}")]
    ReaderFailed { url: String, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What an object store said when a request failed: its whole error chain as one message, with
/// the user info and query strings of any URL in it removed. The HTTP client's errors print the
/// request URL, which holds credentials when the endpoint was given as `http://KEY:SECRET@host`,
/// so the original error is not kept as a source that a caller could print.
#[derive(Debug)]
pub struct StoreFailure {
    message: String,
    not_found: bool,
}

impl StoreFailure {
    pub fn new(source: &object_store::Error) -> Self {
        StoreFailure {
            message: crate::location::redact_urls_in(&error_chain(source)),
            not_found: matches!(source, object_store::Error::NotFound { .. }),
        }
    }

    /// Whether the store said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        self.not_found
    }
}

impl fmt::Display for StoreFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StoreFailure {}

/// `error: cause: cause...`, skipping a cause whose text the previous one already holds.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = cause.source();
    }
    message
}

/// The message of a panic's payload (what `panic!` was given), for errors that report a dead
/// thread or task.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".to_string(),
    }
}

impl Error {
    pub(crate) fn store(op: &'static str, location: impl fmt::Display, source: object_store::Error) -> Self {
        Error::Store {
            op,
            location: crate::location::redact_urls_in(&location.to_string()),
            cause: StoreFailure::new(&source),
        }
    }
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
    pub(crate) fn corrupt(key: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Corrupt { key: key.into(), detail: detail.into() }
    }
}
