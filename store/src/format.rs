//! The shard schema and encoding (see `docs/format.md`).

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manifest::HookSpec;

pub const COL_SEQUENCE_ID: &str = "sequence_id";
pub const COL_POSITION: &str = "position";
pub const COL_TOKEN_ID: &str = "token_id";
/// Parquet key-value metadata: the CRC-32C of every column chunk, `[[crc per column] per row group]`.
pub const KV_CHUNK_CRC: &str = "sae.chunk_crc32c";
/// Parquet key-value metadata: the dataset id, so a stray shard can be traced to its dataset.
pub const KV_DATASET_ID: &str = "sae.dataset_id";

/// The stored element type of activations. Rows are little-endian, row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    Bf16,
    F16,
    F32,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::F32 => "f32",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "bf16" => Ok(Dtype::Bf16),
            "f16" => Ok(Dtype::F16),
            "f32" => Ok(Dtype::F32),
            _ => Err(Error::invalid(format!("unknown dtype `{s}` (expected bf16, f16 or f32)"))),
        }
    }

    /// Encode f32 values into this dtype (round to nearest even), appending to `out`.
    pub fn encode_f32(self, src: &[f32], out: &mut Vec<u8>) {
        out.reserve(src.len() * self.size());
        match self {
            Dtype::F32 => {
                for v in src {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Dtype::Bf16 => {
                for v in src {
                    out.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
            Dtype::F16 => {
                for v in src {
                    out.extend_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
        }
    }

    /// Decode stored bytes into f32, appending to `out` (exact: every stored value is an f32).
    pub fn decode_to_f32(self, src: &[u8], out: &mut Vec<f32>) {
        out.reserve(src.len() / self.size());
        match self {
            Dtype::F32 => out.extend(src.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            Dtype::Bf16 => {
                out.extend(src.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)))
            }
            Dtype::F16 => {
                out.extend(src.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
            }
        }
    }
}

/// Byte-planar rows: within a row of `d` elements of `size` bytes, byte `b` (little-endian
/// significance) of element `j` is stored at `b * d + j`. Parquet's BYTE_STREAM_SPLIT then lays
/// out all low bytes of the row group before all high bytes, which zstd compresses well (the
/// high bytes of bf16 activations hold sign and exponent, and compress ~2.6x; the low bytes do
/// not compress).
#[cfg_attr(not(test), allow(dead_code))] // the writer fuses this with encoding
pub fn to_planar(src: &[u8], d: usize, size: usize, out: &mut Vec<u8>) {
    let w = d * size;
    let start = out.len();
    out.resize(start + src.len(), 0);
    for (row, dst) in src.chunks_exact(w).zip(out[start..].chunks_exact_mut(w)) {
        for j in 0..d {
            for b in 0..size {
                dst[b * d + j] = row[j * size + b];
            }
        }
    }
}

/// The inverse of [`to_planar`]: little-endian elements, row-major.
pub fn from_planar(src: &[u8], d: usize, size: usize, out: &mut Vec<u8>) {
    let w = d * size;
    let start = out.len();
    out.resize(start + src.len(), 0);
    for (row, dst) in src.chunks_exact(w).zip(out[start..].chunks_exact_mut(w)) {
        if size == 2 {
            let (lo, hi) = row.split_at(d);
            for (j, e) in dst.chunks_exact_mut(2).enumerate() {
                e[0] = lo[j];
                e[1] = hi[j];
            }
        } else {
            for j in 0..d {
                for b in 0..size {
                    dst[j * size + b] = row[b * d + j];
                }
            }
        }
    }
}

/// Planar rows of `dtype` straight to little-endian f32 bytes.
pub fn planar_to_f32_bytes(dtype: Dtype, src: &[u8], d: usize, out: &mut Vec<u8>) {
    match dtype {
        Dtype::Bf16 => {
            let start = out.len();
            out.resize(start + src.len() * 2, 0);
            for (row, dst) in src.chunks_exact(2 * d).zip(out[start..].chunks_exact_mut(4 * d)) {
                let (lo, hi) = row.split_at(d);
                for (j, e) in dst.chunks_exact_mut(4).enumerate() {
                    e[2] = lo[j];
                    e[3] = hi[j];
                }
            }
        }
        Dtype::F32 => from_planar(src, d, 4, out),
        Dtype::F16 => {
            let mut le = Vec::with_capacity(src.len());
            from_planar(src, d, 2, &mut le);
            for c in le.chunks_exact(2) {
                out.extend_from_slice(&half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32().to_le_bytes());
            }
        }
    }
}

/// The Arrow schema of a shard for these hooks.
pub fn shard_schema(hooks: &[HookSpec], dtype: Dtype) -> SchemaRef {
    let mut fields = vec![
        Field::new(COL_SEQUENCE_ID, DataType::UInt64, false),
        Field::new(COL_POSITION, DataType::UInt32, false),
        Field::new(COL_TOKEN_ID, DataType::UInt32, false),
    ];
    for h in hooks {
        let meta = [
            ("sae.dtype".to_string(), dtype.name().to_string()),
            ("sae.d_model".to_string(), h.d_model.to_string()),
            ("sae.layout".to_string(), "byte_planar".to_string()),
        ];
        fields.push(
            Field::new(&h.name, DataType::FixedSizeBinary((h.d_model * dtype.size()) as i32), false)
                .with_metadata(meta.into_iter().collect::<std::collections::HashMap<_, _>>()),
        );
    }
    Arc::new(Schema::new(fields))
}

/// Writer properties: zstd everywhere; activation columns BYTE_STREAM_SPLIT without dictionary or
/// statistics; integer columns delta-encoded.
pub fn writer_properties(
    hooks: &[HookSpec],
    zstd_level: i32,
    row_group_rows: usize,
    page_bytes: usize,
) -> Result<WriterProperties> {
    let level = ZstdLevel::try_new(zstd_level).map_err(|e| Error::invalid(format!("zstd level {zstd_level}: {e}")))?;
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_max_row_group_bytes(None)
        .set_offset_index_disabled(true)
        .set_statistics_enabled(EnabledStatistics::None)
        .set_created_by(format!("sae-pipeline store {}", env!("CARGO_PKG_VERSION")));
    for c in [COL_SEQUENCE_ID, COL_POSITION] {
        b = b
            .set_column_dictionary_enabled(ColumnPath::new(vec![c.to_string()]), false)
            .set_column_encoding(ColumnPath::new(vec![c.to_string()]), Encoding::DELTA_BINARY_PACKED);
    }
    for h in hooks {
        let p = ColumnPath::new(vec![h.name.clone()]);
        b = b
            .set_column_dictionary_enabled(p.clone(), false)
            .set_column_encoding(p.clone(), Encoding::BYTE_STREAM_SPLIT)
            .set_column_data_page_size_limit(p.clone(), page_bytes)
            .set_column_data_page_row_count_limit(p.clone(), row_group_rows.max(1));
    }
    Ok(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planar_roundtrip() {
        for size in [2usize, 4] {
            let d = 5;
            let src: Vec<u8> = (0..(3 * d * size) as u32).map(|i| (i * 7 % 251) as u8).collect();
            let mut p = Vec::new();
            to_planar(&src, d, size, &mut p);
            assert_eq!(p[1], src[size], "byte 0 of element 1 comes second");
            assert_eq!(p[d], src[1], "byte 1 of element 0 starts the second plane");
            let mut back = Vec::new();
            from_planar(&p, d, size, &mut back);
            assert_eq!(back, src);
        }
        let vals = [1.5f32, -2.25, 1e-3, 7.0];
        for dt in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            let mut le = Vec::new();
            dt.encode_f32(&vals, &mut le);
            let mut p = Vec::new();
            to_planar(&le, 2, dt.size(), &mut p);
            let mut f = Vec::new();
            planar_to_f32_bytes(dt, &p, 2, &mut f);
            let mut want = Vec::new();
            dt.decode_to_f32(&le, &mut want);
            let got: Vec<f32> = f.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            assert_eq!(got, want, "{dt:?}");
        }
    }

    #[test]
    fn dtype_roundtrip_is_exact_for_representable_values() {
        for dt in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            let src = [0.0f32, -1.5, 3.25, 1024.0, -0.0078125];
            let mut enc = Vec::new();
            dt.encode_f32(&src, &mut enc);
            assert_eq!(enc.len(), src.len() * dt.size());
            let mut dec = Vec::new();
            dt.decode_to_f32(&enc, &mut dec);
            assert_eq!(dec, src, "{dt:?}");
        }
        // bf16 rounds to nearest even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
        let mut enc = Vec::new();
        Dtype::Bf16.encode_f32(&[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0], &mut enc);
        let mut dec = Vec::new();
        Dtype::Bf16.decode_to_f32(&enc, &mut dec);
        assert_eq!(dec, vec![1.0, 1.0 + 4.0 / 256.0]);
    }
}
