//! Named tensors to and from safetensors bytes (f32 and i64, on the CPU), deterministically:
//! the same tensors and metadata always give the same bytes.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    #[error("`{location}` is not a valid safetensors file: {detail}")]
    Invalid { location: String, detail: String },
    #[error("`{location}`: tensor `{name}` has dtype {dtype:?}; only F32 and I64 are read")]
    Dtype { location: String, name: String, dtype: StDtype },
}

/// Tensors converted to little-endian bytes, ready to serialize.
pub struct Encoded(Vec<(String, StDtype, Vec<usize>, Vec<u8>)>);

/// Converts `tensors` (any device, f32 or i64) to bytes on the CPU.
pub fn encode(tensors: &[(String, Tensor)]) -> Encoded {
    Encoded(
        tensors
            .iter()
            .map(|(name, t)| {
                let t = t.detach().to_device(Device::Cpu).contiguous();
                let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
                let (dtype, bytes) = match t.kind() {
                    Kind::Int64 => {
                        let v = Vec::<i64>::try_from(t.view([-1])).expect("i64 tensor");
                        (StDtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect())
                    }
                    _ => {
                        let v = Vec::<f32>::try_from(t.to_kind(Kind::Float).view([-1])).expect("f32 tensor");
                        (StDtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
                    }
                };
                (name.clone(), dtype, shape, bytes)
            })
            .collect(),
    )
}

impl Encoded {
    /// The tensors' [`digest`].
    pub fn sha256(&self) -> String {
        digest(self.0.iter().map(|(n, dtype, shape, bytes)| (n.as_str(), *dtype, shape.as_slice(), bytes.as_slice())))
    }

    /// The safetensors file, with optional string metadata.
    pub fn to_bytes(&self, metadata: Option<BTreeMap<String, String>>) -> Vec<u8> {
        let views: Vec<(String, TensorView)> = self
            .0
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                (name.clone(), TensorView::new(*dtype, shape.clone(), bytes).expect("consistent tensor view"))
            })
            .collect();
        let metadata: Option<HashMap<String, String>> = metadata.map(|m| m.into_iter().collect());
        safetensors::serialize(views, metadata).expect("serialize safetensors")
    }
}

/// Serializes `tensors` (any device, f32 or i64) with optional string metadata.
pub fn to_bytes(tensors: &[(String, Tensor)], metadata: Option<BTreeMap<String, String>>) -> Vec<u8> {
    encode(tensors).to_bytes(metadata)
}

/// `sha256:<hex>` over every tensor's name, dtype, shape and bytes, in name order: what a
/// checkpoint records to detect damage, independent of the file's layout.
fn digest<'a>(tensors: impl Iterator<Item = (&'a str, StDtype, &'a [usize], &'a [u8])>) -> String {
    use sha2::{Digest, Sha256};
    let mut sorted: Vec<_> = tensors.collect();
    sorted.sort_by_key(|t| t.0);
    let mut sha = Sha256::new();
    for (name, dtype, shape, bytes) in sorted {
        sha.update((name.len() as u64).to_le_bytes());
        sha.update(name.as_bytes());
        sha.update(format!("{dtype:?}{shape:?}").as_bytes());
        sha.update((bytes.len() as u64).to_le_bytes());
        sha.update(bytes);
    }
    format!("sha256:{:x}", sha.finalize())
}

/// The [`digest`] of the tensors stored in safetensors bytes.
pub fn sha256_of(bytes: &[u8], location: &str) -> Result<String, TensorFileError> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| TensorFileError::Invalid { location: location.to_string(), detail: e.to_string() })?;
    let tensors = file.tensors();
    Ok(digest(tensors.iter().map(|(n, v)| (n.as_str(), v.dtype(), v.shape(), v.data()))))
}

/// The string metadata of safetensors bytes, without decoding any tensor.
pub fn metadata_of(bytes: &[u8], location: &str) -> Result<BTreeMap<String, String>, TensorFileError> {
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| TensorFileError::Invalid { location: location.to_string(), detail: e.to_string() })?;
    Ok(header.metadata().clone().map(|m| m.into_iter().collect()).unwrap_or_default())
}

/// Tensors by name.
pub type NamedTensors = BTreeMap<String, Tensor>;
/// A safetensors file's string metadata.
pub type Metadata = BTreeMap<String, String>;

/// Parses safetensors bytes into CPU tensors by name, plus the metadata. `location` names the
/// object in errors.
pub fn from_bytes(bytes: &[u8], location: &str) -> Result<(NamedTensors, Metadata), TensorFileError> {
    let invalid = |detail: String| TensorFileError::Invalid { location: location.to_string(), detail };
    let metadata = metadata_of(bytes, location)?;
    let file = SafeTensors::deserialize(bytes).map_err(|e| invalid(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in file.tensors() {
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let data = view.data();
        let tensor = match view.dtype() {
            StDtype::F32 => {
                let v: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                Tensor::from_slice(&v)
            }
            StDtype::I64 => {
                let v: Vec<i64> = data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
                Tensor::from_slice(&v)
            }
            dtype => return Err(TensorFileError::Dtype { location: location.to_string(), name, dtype }),
        };
        out.insert(name, tensor.reshape(&shape));
    }
    Ok((out, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_deterministic() {
        let tensors = vec![
            ("b".to_string(), Tensor::from_slice(&[1.5f32, -2.0, 3.0, 4.0]).view([2, 2])),
            ("a".to_string(), Tensor::from_slice(&[7i64, 8])),
        ];
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let bytes = to_bytes(&tensors, Some(meta.clone()));
        assert_eq!(bytes, to_bytes(&tensors, Some(meta.clone())));
        let (back, back_meta) = from_bytes(&bytes, "x").unwrap();
        assert_eq!(back_meta, meta);
        assert_eq!(back["b"].size(), vec![2, 2]);
        assert!(back["b"].equal(&tensors[0].1));
        assert!(back["a"].equal(&tensors[1].1));
    }

    #[test]
    fn the_digest_is_the_same_from_tensors_and_from_the_file_and_sees_one_flipped_bit() {
        let tensors = vec![
            ("w".to_string(), Tensor::from_slice(&[1.5f32, -2.0, 3.0, 4.0]).view([2, 2])),
            ("a".to_string(), Tensor::from_slice(&[7i64, 8])),
        ];
        let encoded = encode(&tensors);
        let mut bytes = encoded.to_bytes(None);
        assert_eq!(sha256_of(&bytes, "x").unwrap(), encoded.sha256());
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_ne!(sha256_of(&bytes, "x").unwrap(), encoded.sha256());
    }

    #[test]
    fn garbage_is_refused_with_its_name() {
        let err = from_bytes(b"not a safetensors file", "s3://b/ckpt").unwrap_err().to_string();
        assert!(err.contains("s3://b/ckpt"), "{err}");
    }
}
