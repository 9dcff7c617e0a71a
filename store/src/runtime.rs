//! The small tokio runtime that each blocking API of this crate (writer, reader, `info`,
//! `verify`, [`crate::ObjectDir`]) owns for its object store requests.

use tokio::runtime::Runtime;

use crate::error::{Error, Result};

/// A two-thread runtime for object store I/O.
pub(crate) fn runtime() -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sae-store-io")
        .enable_all()
        .build()
        .map_err(|e| Error::Start { what: "the I/O runtime", cause: e.to_string() })
}
