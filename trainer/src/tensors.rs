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

/// Serializes `tensors` (any device, f32 or i64) with optional string metadata.
pub fn to_bytes(tensors: &[(String, Tensor)], metadata: Option<BTreeMap<String, String>>) -> Vec<u8> {
    let owned: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = tensors
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
        .collect();
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (name.clone(), TensorView::new(*dtype, shape.clone(), bytes).expect("consistent tensor view"))
        })
        .collect();
    let metadata: Option<HashMap<String, String>> = metadata.map(|m| m.into_iter().collect());
    safetensors::serialize(views, metadata).expect("serialize safetensors")
}

/// The string metadata of safetensors bytes, without decoding any tensor.
pub fn metadata_of(bytes: &[u8], location: &str) -> Result<BTreeMap<String, String>, TensorFileError> {
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| TensorFileError::Invalid { location: location.to_string(), detail: e.to_string() })?;
    Ok(header.metadata().clone().map(|m| m.into_iter().collect()).unwrap_or_default())
}

/// Parses safetensors bytes into CPU tensors by name, plus the metadata. `location` names the
/// object in errors.
pub fn from_bytes(
    bytes: &[u8],
    location: &str,
) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, String>), TensorFileError> {
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
    fn garbage_is_refused_with_its_name() {
        let err = from_bytes(b"not a safetensors file", "s3://b/ckpt").unwrap_err().to_string();
        assert!(err.contains("s3://b/ckpt"), "{err}");
    }
}
