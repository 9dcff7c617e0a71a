//! Unique names and temporary folders.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// `name` made unique to this process and call: `<name>-<pid>-<counter>`.
pub fn unique(name: &str) -> String {
    format!("{name}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst))
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh folder under the system's temporary folder, named after `name`.
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(unique(&format!("sae-store-{name}")));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// Where the folder is.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
