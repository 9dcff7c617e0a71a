//! `info` and `verify`: what `sae dataset info` and `sae dataset verify` print.

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::location::{open_store_with, Location, StoreOptions};
use crate::manifest::{
    CorpusIdentity, CreatedInfo, Manifest, ModelIdentity, TokenizerIdentity, MANIFEST_KEY, SHARDS_DIR,
};
use crate::reader::{check_schema, chunk_crcs, parse_footer};
use crate::records::{current_manifest, read_manifest};
use crate::runtime::runtime;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HookInfo {
    pub name: String,
    pub d_model: usize,
}

/// A summary of a dataset (`sae dataset info URL --json` prints this as one JSON object).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    pub url: String,
    pub dataset_id: String,
    pub format_version: u32,
    /// Whether `manifest.json` exists. When false, the figures count the committed shards.
    #[serde(rename = "final")]
    pub is_final: bool,
    pub tokens: u64,
    pub hooks: Vec<HookInfo>,
    pub dtype: Dtype,
    pub context_len: usize,
    pub shards: usize,
    pub bytes: u64,
    pub bytes_per_element: f64,
    pub row_group_rows: usize,
    pub zstd_level: i32,
    pub model: ModelIdentity,
    pub tokenizer: TokenizerIdentity,
    pub corpus: CorpusIdentity,
    pub created: CreatedInfo,
}

/// Read the manifest (or, for a dataset still being written, its header and commit records).
pub fn info(url: &str, store: &StoreOptions) -> Result<DatasetInfo> {
    let loc = open_store_with(url, store)?;
    runtime()?.block_on(info_async(&loc))
}

async fn info_async(loc: &Location) -> Result<DatasetInfo> {
    let (m, is_final) = current_manifest(loc).await?;
    Ok(DatasetInfo {
        url: loc.url.clone(),
        dataset_id: m.dataset_id.clone(),
        format_version: m.format_version,
        is_final,
        tokens: m.tokens,
        hooks: m.hooks.iter().map(|h| HookInfo { name: h.name.clone(), d_model: h.d_model }).collect(),
        dtype: m.dtype,
        context_len: m.context_len,
        shards: m.shards.len(),
        bytes: m.bytes,
        bytes_per_element: m.bytes_per_element(),
        row_group_rows: m.encoding.row_group_rows,
        zstd_level: m.encoding.zstd_level,
        model: m.model,
        tokenizer: m.tokenizer,
        corpus: m.corpus,
        created: m.created,
    })
}

/// One bad shard: its key and everything found wrong with it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardProblem {
    pub key: String,
    pub problems: Vec<String>,
}

/// The result of [`verify`]. `ok` is false when any shard is bad or any stray `.parquet` object
/// sits under `shards/`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub url: String,
    pub ok: bool,
    pub shards_checked: usize,
    pub rows_checked: u64,
    pub bytes_checked: u64,
    pub bad_shards: Vec<ShardProblem>,
    /// `.parquet` objects under `shards/` that the manifest does not list.
    pub unlisted: Vec<String>,
}

/// Check every shard of a final dataset: size, SHA-256 of the whole object, footer CRC, schema
/// (columns, types, widths), row groups and row counts against the manifest, and the CRC-32C of
/// every column chunk. Errors only when the dataset itself cannot be read (no manifest, I/O);
/// bad shards are reported in the [`VerifyReport`]. `concurrency` shards are checked at once.
pub fn verify(url: &str, store: &StoreOptions, concurrency: usize) -> Result<VerifyReport> {
    let loc = open_store_with(url, store)?;
    runtime()?.block_on(verify_async(&loc, concurrency.max(1)))
}

async fn verify_async(loc: &Location, concurrency: usize) -> Result<VerifyReport> {
    let m = read_manifest(loc).await?.ok_or_else(|| Error::NotFound {
        url: loc.url.clone(),
        what: "no manifest.json (the dataset is not final)".into(),
    })?;
    let mut problems: Vec<ShardProblem> = futures::stream::iter(m.shards.iter().cloned())
        .map(|s| {
            let m = &m;
            async move {
                let p = verify_shard(loc, m, &s).await;
                ShardProblem { key: s.key.clone(), problems: p }
            }
        })
        .buffered(concurrency)
        .filter(|p| futures::future::ready(!p.problems.is_empty()))
        .collect()
        .await;
    problems.sort_by(|a, b| a.key.cmp(&b.key));
    let listed: std::collections::HashSet<&str> = m.shards.iter().map(|s| s.key.as_str()).collect();
    let unlisted: Vec<String> = loc
        .list(SHARDS_DIR)
        .await?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.ends_with(".parquet") && !listed.contains(k.as_str()))
        .collect();
    let mut rows = 0;
    let mut first = 0;
    let mut order_problems = Vec::new();
    for s in &m.shards {
        if s.first_row != first {
            order_problems.push(ShardProblem {
                key: s.key.clone(),
                problems: vec![format!("first_row {} but the shards before hold {first} rows", s.first_row)],
            });
        }
        first += s.rows;
        rows += s.rows;
    }
    if rows != m.tokens {
        order_problems.push(ShardProblem {
            key: MANIFEST_KEY.into(),
            problems: vec![format!("tokens {} but the shards hold {rows} rows", m.tokens)],
        });
    }
    problems.extend(order_problems);
    Ok(VerifyReport {
        url: loc.url.clone(),
        ok: problems.is_empty() && unlisted.is_empty(),
        shards_checked: m.shards.len(),
        rows_checked: rows,
        bytes_checked: m.shards.iter().map(|s| s.bytes).sum(),
        bad_shards: problems,
        unlisted,
    })
}

async fn verify_shard(loc: &Location, m: &Manifest, s: &crate::manifest::ShardEntry) -> Vec<String> {
    let mut p = Vec::new();
    let data = match loc.get(&s.key).await {
        Ok(Some(d)) => d,
        Ok(None) => return vec!["missing".into()],
        Err(e) => return vec![e.to_string()],
    };
    if data.len() as u64 != s.bytes {
        p.push(format!("{} bytes, the manifest says {}", data.len(), s.bytes));
    }
    let sum = format!("sha256:{:x}", Sha256::digest(&data));
    if sum != s.checksum {
        p.push(format!("checksum {sum}, the manifest says {}", s.checksum));
    }
    if (data.len() as u64) < s.footer_len {
        p.push("shorter than its footer".into());
        return p;
    }
    let footer = &data[data.len() - s.footer_len as usize..];
    let meta = match parse_footer(s, footer) {
        Ok(meta) => meta,
        Err(e) => {
            p.push(e.to_string());
            return p;
        }
    };
    for h in &m.hooks {
        if let Err(e) = check_schema(s, &meta, &h.name, h.d_model, m.dtype) {
            p.push(e.to_string());
        }
    }
    if meta.file_metadata().schema_descr().num_columns() != 3 + m.hooks.len() {
        p.push(format!(
            "{} columns, expected {}",
            meta.file_metadata().schema_descr().num_columns(),
            3 + m.hooks.len()
        ));
    }
    match chunk_crcs(s, &meta) {
        Err(e) => p.push(e.to_string()),
        Ok(crcs) => {
            for (ri, rg) in meta.row_groups().iter().enumerate() {
                for (ci, c) in rg.columns().iter().enumerate() {
                    let (start, len) = c.byte_range();
                    let Some(chunk) = data.get(start as usize..(start + len) as usize) else {
                        p.push(format!("row group {ri} column {ci} lies outside the object"));
                        continue;
                    };
                    if crc32c::crc32c(chunk) != crcs[ri][ci] {
                        p.push(format!("row group {ri} column {ci}: CRC-32C mismatch"));
                    }
                }
            }
        }
    }
    p
}
