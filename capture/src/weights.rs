//! Taking a checkpoint's tensors by name, checking each one's shape, and moving it to the
//! compute device and dtype one tensor at a time (so a bf16 checkpoint is never widened whole).

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::norm::LayerNorm;

/// A checkpoint that lacks a weight the configuration needs, or holds one of the wrong shape.
/// The [`crate::Error`] that carries it names the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightError {
    #[error("weight {name} is missing from the checkpoint")]
    Missing { name: String },
    #[error("weight {name} has shape {shape:?}, expected {expected:?}")]
    WrongShape { name: String, shape: Vec<i64>, expected: Vec<i64> },
}

/// The tensors of a checkpoint not yet taken by the model.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    device: Device,
    kind: Kind,
}

impl Weights {
    pub fn new(tensors: HashMap<String, Tensor>, device: Device, kind: Kind) -> Self {
        Weights { tensors, device, kind }
    }

    /// Removes `name`, which must have `shape`, and returns it on the device in the compute dtype.
    pub fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor, WeightError> {
        let t = self.tensors.remove(name).ok_or_else(|| WeightError::Missing { name: name.into() })?;
        if t.size() != shape {
            return Err(WeightError::WrongShape { name: name.into(), shape: t.size(), expected: shape.to_vec() });
        }
        Ok(t.to_device(self.device).to_kind(self.kind))
    }

    /// A `Conv1D` weight stored `[input, output]`, returned as a `linear` weight `[output, input]`.
    pub fn take_conv1d(&mut self, name: &str, input: i64, output: i64) -> Result<Tensor, WeightError> {
        Ok(self.take(name, &[input, output])?.tr().contiguous())
    }

    /// `{prefix}.weight` and `{prefix}.bias` of a LayerNorm of width `d`.
    pub fn take_layer_norm(&mut self, prefix: &str, d: i64, eps: f64) -> Result<LayerNorm, WeightError> {
        Ok(LayerNorm {
            weight: self.take(&format!("{prefix}.weight"), &[d])?,
            bias: self.take(&format!("{prefix}.bias"), &[d])?,
            eps,
        })
    }
}
