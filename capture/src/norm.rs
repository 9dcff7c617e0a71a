//! Normalisations, computed as transformers computes them.

use tch::{Kind, Tensor};

/// RMSNorm over the last dimension: in f32, cast back to `x`'s dtype before the weight, as
/// transformers' `LlamaRMSNorm` does.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let x32 = x.to_kind(Kind::Float);
    let variance = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    let normed = x32 * (variance + eps).rsqrt();
    normed.to_kind(x.kind()) * weight
}

/// A LayerNorm over the last dimension with a weight and a bias, as `torch.nn.LayerNorm`.
pub struct LayerNorm {
    pub weight: Tensor, // [d]
    pub bias: Tensor,   // [d]
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let d = self.weight.size()[0];
        x.layer_norm([d], Some(&self.weight), Some(&self.bias), self.eps, false)
    }
}

/// Gemma's RMSNorm: the weight is stored as an offset from 1, and it is applied in f32 before
/// the cast back, as transformers' `Gemma2RMSNorm` does.
pub fn rms_norm_one_plus(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let x32 = x.to_kind(Kind::Float);
    let variance = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    let normed = x32 * (variance + eps).rsqrt();
    (normed * (weight.to_kind(Kind::Float) + 1.0)).to_kind(x.kind())
}
