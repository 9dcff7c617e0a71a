//! Listing a corpus's inputs: local files and folders, and object-store prefixes.

use std::path::Path;

use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use store::StoreFailure;

use super::{block_on, CorpusFile, CorpusFormat, SkippedFile, Source};
use crate::error::{Error, Result};

/// Lists a local input: the file itself, or the files under the folder (sorted, symlinks and
/// `.dat` skipped).
pub(super) fn list_local(
    input: usize,
    path: &Path,
    format: CorpusFormat,
    files: &mut Vec<CorpusFile>,
    skipped: &mut Vec<SkippedFile>,
) -> Result<()> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|source| Error::CorpusInputUnreadable { path: path.to_path_buf(), source })?;
    // A named input may be a symlink (the user asked for it): follow it once.
    let meta = if meta.file_type().is_symlink() {
        std::fs::metadata(path).map_err(|source| Error::BrokenSymlink { path: path.to_path_buf(), source })?
    } else {
        meta
    };
    if meta.is_file() {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        files.push(CorpusFile {
            input,
            rel_path: name,
            location: path.display().to_string(),
            size: meta.len(),
            named: true,
            source: Source::Local(path.to_path_buf()),
        });
        return Ok(());
    }
    if !meta.is_dir() {
        return Err(Error::NotFileOrFolder { path: path.to_path_buf() });
    }
    let mut found = Vec::new();
    walk_local(path, path, format, &mut found, skipped)
        .map_err(|source| Error::ListFolder { path: path.to_path_buf(), source })?;
    found.sort_by(|a: &CorpusFile, b: &CorpusFile| a.rel_path.cmp(&b.rel_path));
    files.extend(found.into_iter().map(|f| CorpusFile { input, ..f }));
    Ok(())
}

fn walk_local(
    root: &Path,
    dir: &Path,
    format: CorpusFormat,
    out: &mut Vec<CorpusFile>,
    skipped: &mut Vec<SkippedFile>,
) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // The root must be listable; a sub-folder that is not is skipped like an unreadable file.
        Err(e) if dir != root => {
            let location = dir.display().to_string();
            tracing::warn!(folder = %location, error = %e, "skipping corpus folder");
            skipped.push(SkippedFile { location, reason: e.to_string() });
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let file_type = entry.file_type()?;
        if file_type.is_symlink() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            let location = path.display().to_string();
            tracing::warn!(file = %location, "skipping corpus file with a non-UTF-8 name");
            skipped.push(SkippedFile { location, reason: "name is not UTF-8".into() });
            continue;
        };
        if file_type.is_dir() {
            walk_local(root, &path, format, out, skipped)?;
        } else if file_type.is_file() && !name.ends_with(".dat") && format.takes_from_folder(&name) {
            let rel = path.strip_prefix(root).expect("walked paths are under the root");
            let rel_path = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            out.push(CorpusFile {
                input: 0,
                rel_path,
                location: path.display().to_string(),
                size,
                named: false,
                source: Source::Local(path),
            });
        }
    }
    Ok(())
}

/// Lists an object-store input: every object under the prefix (sorted, `.dat` skipped), or the
/// object at the prefix itself.
pub(super) fn list_object_store(
    rt: &tokio::runtime::Runtime,
    input: usize,
    location: &store::Location,
    format: CorpusFormat,
    files: &mut Vec<CorpusFile>,
) -> Result<()> {
    let (store, prefix) = (location.store.clone(), location.prefix.clone());
    let listed: Vec<object_store::ObjectMeta> = {
        let (store, prefix) = (store.clone(), prefix.clone());
        block_on(rt, async move { store.list(Some(&prefix)).try_collect().await })
            .map_err(|e| Error::ListObjects { url: location.url.clone(), source: StoreFailure::new(&e) })?
    };
    let url = location.url.trim_end_matches('/');
    if listed.is_empty() {
        let (s, p) = (store.clone(), prefix.clone());
        return match block_on(rt, async move { s.head(&p).await }) {
            Ok(meta) => {
                let name = prefix.filename().unwrap_or_default().to_string();
                files.push(CorpusFile {
                    input,
                    rel_path: name,
                    location: url.to_string(),
                    size: meta.size,
                    named: true,
                    source: Source::Object { store, path: prefix },
                });
                Ok(())
            }
            Err(object_store::Error::NotFound { .. }) => Err(Error::NoObject { url: url.to_string() }),
            Err(e) => Err(Error::HeadObject { url: url.to_string(), source: StoreFailure::new(&e) }),
        };
    }
    let mut found: Vec<CorpusFile> = listed
        .into_iter()
        .filter_map(|meta| {
            let rel_path: String = match meta.location.prefix_match(&prefix) {
                Some(parts) => parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"),
                None => meta.location.to_string(),
            };
            let name = meta.location.filename().unwrap_or_default();
            (!name.ends_with(".dat") && format.takes_from_folder(name)).then(|| CorpusFile {
                input,
                location: format!("{url}/{rel_path}"),
                rel_path,
                size: meta.size,
                named: false,
                source: Source::Object { store: store.clone(), path: meta.location },
            })
        })
        .collect();
    found.sort_by(|a, b| a.rel_path.cmp(&b.rel_path));
    files.extend(found);
    Ok(())
}
