//! Closing a shard: its Parquet footer written, its upload completed, and its commit record
//! created, which is what makes the shard part of the dataset (steps 2 and 3 of the commit
//! protocol in the module docs).

use std::collections::BTreeMap;

use parquet::file::metadata::KeyValue;
use sha2::Digest;

use super::encoder::{Encoder, Shard};
use crate::error::{Error, Result};
use crate::format;
use crate::manifest::{CommitRecord, HookStats, ShardEntry, FORMAT_VERSION, MANIFEST_KEY};
use crate::records::{commit_key, read_manifest};

impl Encoder {
    pub(super) fn close_shard(&mut self) -> Result<()> {
        let (footer_len, footer_crc32c) = self.write_footer()?;
        let shard = self.shard.take().unwrap();
        let rec = self.complete_upload(shard, footer_len, footer_crc32c)?;
        self.commit(&rec)?;
        self.next_seq += 1;
        self.progress.add(1, rec.shard.bytes, rec.shard.rows);
        self.committed.push(rec);
        Ok(())
    }

    /// Finishes the shard's Parquet file (its chunk CRC table and dataset id in the key-value
    /// metadata) and sends the tail. Returns the footer's length and CRC-32C.
    fn write_footer(&mut self) -> Result<(u64, u32)> {
        let shard = self.shard.as_mut().unwrap();
        let key = shard.key.clone();
        let pq = |e| Error::Parquet { key: key.clone(), source: e };
        shard.file.append_key_value_metadata(KeyValue::new(
            format::KV_CHUNK_CRC.to_string(),
            serde_json::to_string(&shard.crcs).unwrap(),
        ));
        shard.file.append_key_value_metadata(KeyValue::new(
            format::KV_DATASET_ID.to_string(),
            self.header.dataset_id.clone(),
        ));
        shard.file.finish().map_err(pq)?;
        shard.file.flush().map_err(|e| pq(e.into()))?;
        let tail = std::mem::take(shard.file.inner_mut());
        // The file ends with: metadata, its length (u32 LE), "PAR1".
        if tail.len() < 8 || &tail[tail.len() - 4..] != b"PAR1" {
            return Err(Error::corrupt(&key, "the writer produced no footer"));
        }
        let meta_len = u32::from_le_bytes(tail[tail.len() - 8..tail.len() - 4].try_into().unwrap()) as usize;
        let footer_len = meta_len + 8;
        if footer_len > tail.len() {
            return Err(Error::corrupt(&key, "footer split across row group flushes"));
        }
        let footer_crc32c = crc32c::crc32c(&tail[tail.len() - footer_len..]);
        self.send(tail)?;
        Ok((footer_len as u64, footer_crc32c))
    }

    /// Completes the shard's multipart upload (the object appears) and returns its commit record.
    fn complete_upload(&self, shard: Shard, footer_len: u64, footer_crc32c: u32) -> Result<CommitRecord> {
        let key = shard.key;
        let bytes = shard.written;
        let checksum = format!("sha256:{:x}", shard.sha.finalize());
        let upload = shard.upload;
        let loc = &self.loc;
        self.rt.block_on(async {
            match upload.finish().await {
                Ok(_) => Ok(()),
                Err(e) => Err(Error::store("complete upload of", loc.display(&key), e)),
            }
        })?;
        let stats: BTreeMap<String, HookStats> =
            self.header.header.hooks.iter().map(|h| h.name.clone()).zip(shard.stats).collect();
        Ok(CommitRecord {
            format_version: FORMAT_VERSION,
            dataset_id: self.header.dataset_id.clone(),
            worker: self.opts.worker.clone(),
            seq: shard.seq,
            shard: ShardEntry {
                key,
                rows: shard.rows,
                bytes,
                checksum,
                first_row: 0,
                row_groups: shard.row_groups,
                footer_len,
                footer_crc32c,
                sequence_ids: shard.seq_range,
                stats,
            },
        })
    }

    /// Creates the shard's commit record. A shard that another writer committed first, or that
    /// a finalize that ran around this commit left out, is withdrawn and is an error.
    fn commit(&self, rec: &CommitRecord) -> Result<()> {
        let (loc, rt) = (&self.loc, &self.rt);
        let key = &rec.shard.key;
        let ckey = commit_key(&self.opts.worker, rec.seq);
        let body = serde_json::to_vec(rec).expect("commit record serializes");
        if !rt.block_on(loc.put_create(&ckey, body.into()))? {
            // No record names this writer's object (its key is its own): remove it, so the
            // dataset holds nothing that is not committed.
            rt.block_on(loc.delete(key))?;
            return Err(Error::AlreadyExists {
                location: loc.display(&ckey),
                what: format!("another writer with worker id `{}` committed this shard first", self.opts.worker),
            });
        }
        // A finalize may have run around this commit. If its manifest lists the shard, the rows
        // are in the dataset; if not, they are not, which must be an error here rather than a
        // success that loses them. The commit and the object are then withdrawn, so the dataset
        // stays exactly as finalized.
        if let Some(manifest) = rt.block_on(read_manifest(loc))? {
            if !manifest.shards.iter().any(|s| &s.key == key) {
                rt.block_on(loc.delete(&ckey))?;
                rt.block_on(loc.delete(key))?;
                return Err(Error::AlreadyExists {
                    location: loc.display(MANIFEST_KEY),
                    what: format!(
                        "the dataset was finalized before worker `{}` committed shard {} ({} rows); those rows are not in it, and the shard was removed",
                        self.opts.worker, rec.seq, rec.shard.rows
                    ),
                });
            }
        }
        Ok(())
    }
}
