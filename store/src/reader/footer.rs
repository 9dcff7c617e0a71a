//! A shard's footer checked against the manifest: its CRC, its schema (columns, types, widths),
//! its row groups, and the table of column chunk CRCs. `verify` runs the same checks.

use parquet::basic::Type as PhysicalType;
use parquet::file::metadata::ParquetMetaDataReader;

use crate::error::{Error, Result};
use crate::format::{self, Dtype};
use crate::manifest::ShardEntry;

pub(crate) fn parse_footer(s: &ShardEntry, footer: &[u8]) -> Result<parquet::file::metadata::ParquetMetaData> {
    let crc = crc32c::crc32c(footer);
    if crc != s.footer_crc32c {
        return Err(Error::corrupt(
            &s.key,
            format!("footer CRC-32C {crc:08x}, the manifest says {:08x}", s.footer_crc32c),
        ));
    }
    if footer.len() < 8 || &footer[footer.len() - 4..] != b"PAR1" {
        return Err(Error::corrupt(&s.key, "no Parquet footer"));
    }
    ParquetMetaDataReader::decode_metadata(&footer[..footer.len() - 8])
        .map_err(|e| Error::Parquet { key: s.key.clone(), source: e })
}

/// Check the shard's schema and row groups against the manifest; return the leaf column indices
/// of the hook and of sequence_id, position, token_id.
pub(crate) fn check_schema(
    s: &ShardEntry,
    meta: &parquet::file::metadata::ParquetMetaData,
    hook: &str,
    d: usize,
    dtype: Dtype,
) -> Result<[usize; 4]> {
    let schema = meta.file_metadata().schema_descr();
    let find = |name: &str| (0..schema.num_columns()).find(|&i| schema.column(i).path().parts() == [name.to_string()]);
    let bad = |detail: String| Error::corrupt(&s.key, detail);
    let h = find(hook).ok_or_else(|| bad(format!("no column `{hook}`")))?;
    let c = schema.column(h);
    if c.physical_type() != PhysicalType::FIXED_LEN_BYTE_ARRAY || c.type_length() as usize != d * dtype.size() {
        return Err(bad(format!(
            "column `{hook}` is {:?}({}), expected FIXED_LEN_BYTE_ARRAY({}) for d_model {d} in {}",
            c.physical_type(),
            c.type_length(),
            d * dtype.size(),
            dtype.name()
        )));
    }
    let mut cols = [h, 0, 0, 0];
    for (k, (name, ty)) in [
        (format::COL_SEQUENCE_ID, PhysicalType::INT64),
        (format::COL_POSITION, PhysicalType::INT32),
        (format::COL_TOKEN_ID, PhysicalType::INT32),
    ]
    .into_iter()
    .enumerate()
    {
        let i = find(name).ok_or_else(|| bad(format!("no column `{name}`")))?;
        if schema.column(i).physical_type() != ty {
            return Err(bad(format!("column `{name}` is {:?}, expected {ty:?}", schema.column(i).physical_type())));
        }
        cols[k + 1] = i;
    }
    let rgs: Vec<u64> = meta.row_groups().iter().map(|r| r.num_rows() as u64).collect();
    if rgs != s.row_groups {
        return Err(bad(format!("row groups of {:?} rows, the manifest says {:?}", rgs, s.row_groups)));
    }
    let rows: u64 = rgs.iter().sum();
    if rows != s.rows {
        return Err(bad(format!("{rows} rows, the manifest says {}", s.rows)));
    }
    Ok(cols)
}

pub(crate) fn chunk_crcs(s: &ShardEntry, meta: &parquet::file::metadata::ParquetMetaData) -> Result<Vec<Vec<u32>>> {
    let kv = meta.file_metadata().key_value_metadata().and_then(|kv| kv.iter().find(|k| k.key == format::KV_CHUNK_CRC));
    let crcs: Vec<Vec<u32>> = kv
        .and_then(|k| k.value.as_deref())
        .and_then(|v| serde_json::from_str(v).ok())
        .ok_or_else(|| Error::corrupt(&s.key, format!("no `{}` metadata", format::KV_CHUNK_CRC)))?;
    if crcs.len() != meta.num_row_groups()
        || crcs.iter().any(|r| r.len() != meta.file_metadata().schema_descr().num_columns())
    {
        return Err(Error::corrupt(&s.key, "column chunk CRC table does not match the row groups"));
    }
    Ok(crcs)
}
