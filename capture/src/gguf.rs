//! GGUF v2/v3 files: header, metadata, tensor infos, and dequantization to f32.
//!
//! Layout (little-endian), as llama.cpp's `ggml/docs/gguf.md` describes it:
//! `magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv | kv* | tensor_info* | pad | data`.
//! A tensor info is `string name | u32 n_dims | u64 dims[n_dims] | u32 type | u64 offset`,
//! where `dims` lists the fastest-varying dimension first: the reverse of the row-major shape.
//! `offset` is relative to the start of the data section, which begins at the first multiple of
//! `general.alignment` (default 32) after the tensor infos.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod builder;
mod dequantize;
mod reader;

pub use builder::GgufBuilder;
pub use dequantize::dequantize;
use reader::Reader;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// `general.alignment` above this is refused: real files use 32, and a huge alignment would
/// move the data section past any file.
const MAX_ALIGNMENT: u64 = 1 << 20;
/// Arrays of arrays deeper than this are refused (real files nest at most once), so a hostile
/// file cannot exhaust the stack through recursion.
pub const MAX_ARRAY_DEPTH: usize = 4;
/// Metadata values (array items included) a file may hold. A 256k-token vocabulary with its
/// merges and token types is under a million; each value costs 32 bytes or more in memory, so a
/// small file cannot make the parser allocate many times its own size.
pub const MAX_METADATA_VALUES: u64 = 1 << 24;
/// Tensor ranks above this are refused (ggml's maximum is 4).
const MAX_RANK: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read GGUF file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a GGUF file (magic bytes {magic:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, magic: [u8; 4] },
    #[error("{path}: GGUF version {version} is not supported (only 2 and 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: file is truncated or corrupt while reading {what}")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: metadata value type {kind} for key {key:?} is unknown")]
    BadValueType { path: PathBuf, key: String, kind: u32 },
    #[error("{path}: tensor {tensor:?} has type {type_name}, which is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)")]
    UnsupportedType { path: PathBuf, tensor: String, type_name: String },
    #[error("{path}: tensor {tensor:?} not found")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: metadata key {key:?} is missing or has the wrong type")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: {what} (the file is damaged or not a model)")]
    Invalid { path: PathBuf, what: String },
}

/// Why [`dequantize`] could not decode a buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantizeError {
    #[error("type {} cannot be dequantized", .0.name())]
    Unsupported(GgmlType),
    #[error("{elements} elements of {} need {expected} bytes, got {actual}", ty.name())]
    WrongLength { ty: GgmlType, elements: usize, expected: usize, actual: usize },
}

/// A metadata value, typed as in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type, widened; GGUF writers are not consistent about integer widths.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types. Only the ones we can dequantize have their own variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
    /// Any other type id; refused by [`dequantize`].
    Other(u32),
}

impl GgmlType {
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    /// The name llama.cpp uses for the type.
    pub fn name(self) -> String {
        const NAMES: [&str; 40] = [
            "F32",
            "F16",
            "Q4_0",
            "Q4_1",
            "Q4_2",
            "Q4_3",
            "Q5_0",
            "Q5_1",
            "Q8_0",
            "Q8_1",
            "Q2_K",
            "Q3_K",
            "Q4_K",
            "Q5_K",
            "Q6_K",
            "Q8_K",
            "IQ2_XXS",
            "IQ2_XS",
            "IQ3_XXS",
            "IQ1_S",
            "IQ4_NL",
            "IQ3_S",
            "IQ2_S",
            "IQ4_XS",
            "I8",
            "I16",
            "I32",
            "I64",
            "F64",
            "IQ1_M",
            "BF16",
            "Q4_0_4_4",
            "Q4_0_4_8",
            "Q4_0_8_8",
            "TQ1_0",
            "TQ2_0",
            "IQ4_NL_4_4",
            "IQ4_NL_4_8",
            "IQ4_NL_8_8",
            "MXFP4",
        ];
        let id = self.id() as usize;
        NAMES.get(id).map_or_else(|| format!("type id {id}"), |s| s.to_string())
    }

    /// Bytes of `elements` values of this type: `None` for a type we cannot read, for a count
    /// that is not a whole number of blocks, or on overflow.
    pub fn byte_len(self, elements: u64) -> Option<u64> {
        let (per_block, block_bytes) = self.block_layout()?;
        let (per_block, block_bytes) = (per_block as u64, block_bytes as u64);
        if !elements.is_multiple_of(per_block) {
            return None;
        }
        (elements / per_block).checked_mul(block_bytes)
    }

    /// (elements per block, bytes per block) for the types we can read.
    fn block_layout(self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 | GgmlType::BF16 => Some((1, 2)),
            GgmlType::Q4_0 => Some((32, 18)),
            GgmlType::Q4_1 => Some((32, 20)),
            GgmlType::Q8_0 => Some((32, 34)),
            GgmlType::Other(_) => None,
        }
    }
}

/// Where a tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as stored: fastest-varying first (the reverse of the row-major shape).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Row-major shape, as PyTorch and safetensors write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
    /// The element count. [`GgufFile`] refuses files whose counts overflow, so for a parsed
    /// file this is exact.
    pub fn n_elements(&self) -> usize {
        self.checked_n_elements().unwrap_or(usize::MAX)
    }
    fn checked_n_elements(&self) -> Option<usize> {
        let n = self.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d))?;
        usize::try_from(n).ok()
    }
}

enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file; tensor data stays in the (memory-mapped) file until dequantized.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the model file is opened read-only; as with every mmap-based loader, a
        // concurrent truncation by another process would fault, which we accept.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path.to_path_buf(), Bytes::Mapped(map))
    }

    /// Parses a GGUF image held in memory; `name` is used in error messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(PathBuf::from(name), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<Self, GgufError> {
        let mut r = Reader { bytes: &bytes, pos: 0, path: &path, values_read: 0 };
        let magic: [u8; 4] = r.take(4, "magic")?.try_into().expect("4 bytes");
        if &magic != MAGIC {
            return Err(GgufError::BadMagic { path, magic });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion { path, version });
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each entry takes a fixed minimum of bytes, so a count beyond what the rest of the file
        // can hold is corrupt; checking it first keeps a forged count from driving allocations.
        const MIN_KV_BYTES: u64 = 8 + 4 + 1; // key length, value type, one byte of value
        const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8; // name length, rank, type, offset
        r.check_count(n_kv, MIN_KV_BYTES, "metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let kind = r.u32("metadata value type")?;
            let value = r.value(kind, &key, 0)?;
            metadata.insert(key, value);
        }
        r.check_count(n_tensors, MIN_TENSOR_INFO_BYTES, "tensor count")?;
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor rank")?;
            if n_dims > MAX_RANK {
                return Err(r.invalid(format!("tensor {name:?} has rank {n_dims} (at most {MAX_RANK})")));
            }
            let dims = (0..n_dims).map(|_| r.u64("tensor dims")).collect::<Result<Vec<_>, _>>()?;
            let ggml_type = GgmlType::from_id(r.u32("tensor type")?);
            let offset = r.u64("tensor offset")?;
            tensors.push(TensorInfo { name, dims, ggml_type, offset });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v.as_u64().filter(|&a| a > 0 && a <= MAX_ALIGNMENT).ok_or_else(|| {
                r.invalid(format!("general.alignment {v:?} is not an integer in 1..={MAX_ALIGNMENT}"))
            })?,
        };
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let data_start = usize::try_from(data_start).map_err(|_| r.truncated("data section"))?;
        for info in &tensors {
            check_tensor_extent(info, data_start, r.bytes.len()).map_err(|what| r.invalid(what))?;
        }
        Ok(GgufFile { path, bytes, version, metadata, tensors, data_start })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A metadata value that must be present; the error names the key and the file.
    pub fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey { path: self.path.clone(), key: key.into() })
    }

    pub fn require_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.require(key)?.as_u64().ok_or_else(|| GgufError::MissingKey { path: self.path.clone(), key: key.into() })
    }

    pub fn require_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.require(key)?.as_f64().ok_or_else(|| GgufError::MissingKey { path: self.path.clone(), key: key.into() })
    }

    /// The raw bytes of a tensor's data.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<&[u8], GgufError> {
        if info.ggml_type.block_layout().is_none() {
            return Err(unsupported(&self.path, &info.name, info.ggml_type));
        }
        // `info` may not come from this file, so check its extent again rather than trust it.
        let range = check_tensor_extent(info, self.data_start, self.bytes.len())
            .map_err(|what| GgufError::Invalid { path: self.path.clone(), what })?;
        Ok(&self.bytes[range])
    }

    /// Dequantizes a tensor to f32, returning its row-major shape and values.
    pub fn dequantize(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), GgufError> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor { path: self.path.clone(), tensor: name.into() })?;
        if let GgmlType::Other(_) = info.ggml_type {
            return Err(unsupported(&self.path, &info.name, info.ggml_type));
        }
        let values = dequantize(info.ggml_type, self.tensor_bytes(info)?, info.n_elements()).map_err(|e| match e {
            DequantizeError::Unsupported(ty) => unsupported(&self.path, &info.name, ty),
            other => GgufError::Invalid { path: self.path.clone(), what: format!("tensor {:?}: {other}", info.name) },
        })?;
        Ok((info.shape(), values))
    }
}

fn unsupported(path: &Path, tensor: &str, ty: GgmlType) -> GgufError {
    GgufError::UnsupportedType { path: path.to_path_buf(), tensor: tensor.into(), type_name: ty.name() }
}

/// Where a tensor's data lies in a file of `file_len` bytes whose data section starts at
/// `data_start`, checked: every dimension fits an `i64` (libtorch's shapes), the element count
/// and byte length do not overflow, and the data ends inside the file. Types we cannot read are
/// not sized; they fail when dequantized. The error says what is wrong, naming the tensor.
fn check_tensor_extent(
    info: &TensorInfo,
    data_start: usize,
    file_len: usize,
) -> Result<std::ops::Range<usize>, String> {
    let name = &info.name;
    if let Some(&d) = info.dims.iter().find(|&&d| d > i64::MAX as u64) {
        return Err(format!("tensor {name:?} has dimension {d}, too large"));
    }
    let Some(elements) = info.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d)) else {
        return Err(format!("tensor {name:?}: the element count of dims {:?} overflows", info.dims));
    };
    if info.ggml_type.block_layout().is_none() {
        return Ok(0..0);
    }
    let Some(len) = info.ggml_type.byte_len(elements) else {
        return Err(format!(
            "tensor {name:?}: {elements} elements of {} is not a whole number of blocks, or too large",
            info.ggml_type.name()
        ));
    };
    let start = (data_start as u64).checked_add(info.offset);
    let end = start.and_then(|s| s.checked_add(len));
    match (start, end) {
        (Some(start), Some(end)) if end <= file_len as u64 => Ok(start as usize..end as usize),
        _ => Err(format!(
            "data of tensor {name:?} ({len} bytes at offset {}) lies beyond the end of the file ({file_len} bytes)",
            info.offset
        )),
    }
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q8_0_block_dequantizes_to_scale_times_quant() {
        let mut block = f16_bytes(0.5).to_vec();
        let quants: Vec<i8> = (0..32).map(|i| i as i8 - 16).collect();
        block.extend(quants.iter().map(|&q| q as u8));
        let out = dequantize(GgmlType::Q8_0, &block, 32).unwrap();
        let expected: Vec<f32> = quants.iter().map(|&q| 0.5 * q as f32).collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn q4_0_block_uses_low_nibbles_first_and_offset_8() {
        let mut block = f16_bytes(2.0).to_vec();
        // byte j holds element j in its low nibble and element j+16 in its high nibble.
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let out = dequantize(GgmlType::Q4_0, &block, 32).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], 2.0 * (j as f32 - 8.0), "element {j}");
            assert_eq!(out[j + 16], 2.0 * ((15 - j) as f32 - 8.0), "element {}", j + 16);
        }
    }

    #[test]
    fn q4_1_block_adds_minimum() {
        let mut block = f16_bytes(0.25).to_vec();
        block.extend(f16_bytes(-1.5));
        block.extend((0..16u8).map(|j| (j % 16) | (((j + 3) % 16) << 4)));
        let out = dequantize(GgmlType::Q4_1, &block, 32).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], 0.25 * j as f32 - 1.5);
            assert_eq!(out[j + 16], 0.25 * ((j + 3) % 16) as f32 - 1.5);
        }
    }

    #[test]
    fn f16_bf16_and_f32_elements_decode_exactly() {
        let values = [1.0f32, -0.5, 3.140625, 65504.0];
        let f16s: Vec<u8> = values.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F16, &f16s, 4).unwrap(), values);
        let bf16s: Vec<u8> = values.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::BF16, &bf16s, 4).unwrap(), [1.0, -0.5, 3.140625, 65536.0]);
        let f32s: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F32, &f32s, 4).unwrap(), values);
    }

    #[test]
    fn multi_block_tensors_keep_block_order() {
        let mut bytes = Vec::new();
        for d in [1.0f32, -3.0] {
            bytes.extend(f16_bytes(d));
            bytes.extend(std::iter::repeat_n(1u8, 32));
        }
        let out = dequantize(GgmlType::Q8_0, &bytes, 64).unwrap();
        assert!(out[..32].iter().all(|&x| x == 1.0));
        assert!(out[32..].iter().all(|&x| x == -3.0));
    }

    #[test]
    fn file_round_trip_with_metadata_shapes_and_alignment() {
        let q8: Vec<u8> = {
            let mut b = f16_bytes(0.125).to_vec();
            b.extend((0..32).map(|i| i as u8));
            b
        };
        let f32s: Vec<u8> = [1.5f32, -2.0, 3.25].iter().flat_map(|x| x.to_le_bytes()).collect();
        let image = GgufBuilder::default()
            .metadata("general.architecture", Value::String("llama".into()))
            .metadata("llama.block_count", Value::U32(30))
            .metadata("tokenizer.ggml.tokens", Value::Array(vec![Value::String("a".into()), Value::String("b".into())]))
            .tensor("odd", &[3], GgmlType::F32, f32s)
            .tensor("q", &[2, 16], GgmlType::Q8_0, q8)
            .build();
        let file = GgufFile::from_bytes("test.gguf", image).unwrap();
        assert_eq!(file.version, 3);
        assert_eq!(file.require_u64("llama.block_count").unwrap(), 30);
        assert_eq!(file.get("general.architecture").and_then(Value::as_str), Some("llama"));
        assert_eq!(file.get("tokenizer.ggml.tokens").and_then(Value::as_array).map(|a| a.len()), Some(2));
        let (shape, values) = file.dequantize("odd").unwrap();
        assert_eq!((shape, values), (vec![3], vec![1.5, -2.0, 3.25]));
        // Stored dims are reversed: a [2, 16] tensor is listed as [16, 2].
        assert_eq!(file.tensor_info("q").unwrap().dims, vec![16, 2]);
        let (shape, values) = file.dequantize("q").unwrap();
        assert_eq!(shape, vec![2, 16]);
        assert_eq!(values[31], 0.125 * 31.0);
    }

    #[test]
    fn unsupported_type_error_names_tensor_and_type() {
        let image =
            GgufBuilder::default().tensor("blk.0.attn_q.weight", &[256], GgmlType::Other(12), vec![0; 144]).build();
        let file = GgufFile::from_bytes("test.gguf", image).unwrap();
        let err = file.dequantize("blk.0.attn_q.weight").unwrap_err().to_string();
        assert!(err.contains("blk.0.attn_q.weight") && err.contains("Q4_K"), "{err}");
    }

    /// A file's bytes with `patch` written at `at`.
    fn patched(mut image: Vec<u8>, at: usize, patch: &[u8]) -> Vec<u8> {
        image[at..at + patch.len()].copy_from_slice(patch);
        image
    }

    /// Byte offset of the first tensor info's fields after its name, in an image with no metadata.
    fn first_tensor_fields(name: &str) -> usize {
        4 + 4 + 8 + 8 + 8 + name.len()
    }

    #[test]
    fn forged_counts_are_refused_before_allocating() {
        let image = GgufBuilder::default().metadata("k", Value::U8(1)).build();
        // n_kv = u64::MAX, n_tensors = u64::MAX: neither may size a Vec.
        let err = GgufFile::from_bytes("x.gguf", patched(image.clone(), 16, &u64::MAX.to_le_bytes())).unwrap_err();
        assert!(err.to_string().contains("metadata count") && err.to_string().contains("x.gguf"), "{err}");
        let err = GgufFile::from_bytes("x.gguf", patched(image, 8, &(1u64 << 40).to_le_bytes())).unwrap_err();
        assert!(err.to_string().contains("tensor count"), "{err}");
    }

    #[test]
    fn array_lengths_are_checked_against_the_bytes_left() {
        let image = GgufBuilder::default().metadata("a", Value::Array(vec![Value::U64(7)])).build();
        // magic, version, counts (24), key "a" (9), value type (4), item type (4): then the length.
        let len_at = 24 + 9 + 4 + 4;
        let err = GgufFile::from_bytes("x.gguf", patched(image, len_at, &(1u64 << 60).to_le_bytes())).unwrap_err();
        assert!(matches!(err, GgufError::Truncated { .. }) && err.to_string().contains("array length"), "{err}");
    }

    #[test]
    fn deeply_nested_arrays_are_refused() {
        let mut value = Value::U8(1);
        for _ in 0..MAX_ARRAY_DEPTH {
            value = Value::Array(vec![value]);
        }
        let ok = GgufBuilder::default().metadata("nested", value.clone()).build();
        assert!(GgufFile::from_bytes("x.gguf", ok).is_ok());
        let too_deep = GgufBuilder::default().metadata("nested", Value::Array(vec![value])).build();
        let err = GgufFile::from_bytes("x.gguf", too_deep).unwrap_err();
        assert!(err.to_string().contains("nested"), "{err}");
    }

    #[test]
    fn tensor_extents_are_checked_when_the_file_is_opened() {
        let data: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let image = GgufBuilder::default().tensor("t", &[2], GgmlType::F32, data).build();
        let fields = first_tensor_fields("t");
        let (dims_at, offset_at) = (fields + 4, fields + 4 + 8 + 4);
        // Data beyond the end of the file, an offset that overflows, dims whose product overflows,
        // a dimension beyond i64: each is refused by name at open, before any tensor is read.
        for (at, patch, expect) in [
            (offset_at, 64u64.to_le_bytes(), "beyond the end"),
            (offset_at, u64::MAX.to_le_bytes(), "beyond the end"),
            (dims_at, (1u64 << 40).to_le_bytes(), "beyond the end"),
            (dims_at, u64::MAX.to_le_bytes(), "too large"),
        ] {
            let err = GgufFile::from_bytes("x.gguf", patched(image.clone(), at, &patch)).unwrap_err();
            assert!(err.to_string().contains(expect) && err.to_string().contains("\"t\""), "{err}");
        }
        let two_dims = GgufBuilder::default().tensor("t", &[1 << 32, 1 << 32, 1 << 32], GgmlType::F32, vec![]).build();
        let err = GgufFile::from_bytes("x.gguf", two_dims).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
    }

    #[test]
    fn huge_alignment_is_refused() {
        let image = GgufBuilder::default().metadata("general.alignment", Value::U64(u64::MAX)).build();
        let err = GgufFile::from_bytes("x.gguf", image).unwrap_err();
        assert!(err.to_string().contains("general.alignment"), "{err}");
    }

    #[test]
    fn dequantize_refuses_a_length_mismatch_instead_of_panicking() {
        let err = dequantize(GgmlType::Q8_0, &[0u8; 33], 32).unwrap_err();
        assert_eq!(err, DequantizeError::WrongLength { ty: GgmlType::Q8_0, elements: 32, expected: 34, actual: 33 });
        assert!(matches!(dequantize(GgmlType::Q8_0, &[], 31), Err(DequantizeError::WrongLength { .. })));
    }

    #[test]
    fn corrupt_files_are_refused_clearly() {
        let err = GgufFile::from_bytes("x.gguf", b"GGML\x03\0\0\0".to_vec()).unwrap_err();
        assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");
        let mut image = GgufBuilder::default().metadata("k", Value::String("v".into())).build();
        image.truncate(30);
        let err = GgufFile::from_bytes("x.gguf", image).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        let mut image = GgufBuilder::default().build();
        image[4] = 9;
        let err = GgufFile::from_bytes("x.gguf", image).unwrap_err();
        assert!(matches!(err, GgufError::UnsupportedVersion { version: 9, .. }), "{err}");
    }
}
