//! The little-endian reader of a GGUF header: bounded counts, lengths and nesting, so that a
//! damaged file is an error and never a huge allocation.

use std::path::Path;

use super::{GgufError, Value, MAX_ARRAY_DEPTH, MAX_METADATA_VALUES};

pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) pos: usize,
    pub(super) path: &'a Path,
    /// Metadata values parsed so far, against [`MAX_METADATA_VALUES`].
    pub(super) values_read: u64,
}

/// The fewest bytes a value of type `kind` takes in a file (an unknown type fails when read).
fn min_value_bytes(kind: u32) -> u64 {
    match kind {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 4 + 8,
        _ => 1,
    }
}

impl Reader<'_> {
    pub(super) fn truncated(&self, what: &str) -> GgufError {
        GgufError::Truncated { path: self.path.to_path_buf(), what: what.to_string() }
    }
    pub(super) fn invalid(&self, what: String) -> GgufError {
        GgufError::Invalid { path: self.path.to_path_buf(), what }
    }
    pub(super) fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }
    /// Refuses `count` entries of at least `min_bytes` each when the rest of the file cannot
    /// hold them.
    pub(super) fn check_count(&self, count: u64, min_bytes: u64, what: &str) -> Result<(), GgufError> {
        match count.checked_mul(min_bytes) {
            Some(needed) if needed <= self.remaining() => Ok(()),
            _ => {
                Err(self.truncated(&format!("{what} {count} (more than the {} bytes left can hold)", self.remaining())))
            }
        }
    }
    pub(super) fn take(&mut self, n: usize, what: &str) -> Result<&[u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| self.truncated(what))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub(super) fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }
    pub(super) fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    pub(super) fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    pub(super) fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).map_err(|_| self.truncated(what))?;
        let bytes = self.take(len, what)?;
        // Tokenizer vocabularies hold byte-level strings that are valid UTF-8; be lenient anyway.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    /// A value of type `kind`; `depth` is how many arrays enclose it.
    pub(super) fn value(&mut self, kind: u32, key: &str, depth: usize) -> Result<Value, GgufError> {
        self.values_read += 1;
        if self.values_read > MAX_METADATA_VALUES {
            return Err(self.invalid(format!("more than {MAX_METADATA_VALUES} metadata values (at key {key:?})")));
        }
        Ok(match kind {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(key)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.invalid(format!("key {key:?}: arrays nested more than {MAX_ARRAY_DEPTH} deep")));
                }
                let item_kind = self.u32(key)?;
                let len = self.u64(key)?;
                self.check_count(len, min_value_bytes(item_kind), &format!("key {key:?}: array length"))?;
                let items = (0..len).map(|_| self.value(item_kind, key, depth + 1)).collect::<Result<_, _>>()?;
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(key)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            kind => return Err(GgufError::BadValueType { path: self.path.to_path_buf(), key: key.into(), kind }),
        })
    }
}
