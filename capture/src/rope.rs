//! Rotary position embeddings in Hugging Face's layout (two halves of each head, `rotate_half`),
//! with the frequency scalings we implement.

use std::path::Path;

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// A `rope_scaling` that changes the rotary frequencies.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1's recipe (`rope_type: "llama3"`): low frequencies divided by `factor`, high
    /// ones kept, the band between interpolated.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

impl RopeScaling {
    /// Reads the `rope_scaling` object of the config.json at `path`: `None` for the default
    /// (unscaled) type, an error naming the type or parameter for anything we do not implement.
    pub fn from_config(value: &Value, path: &Path) -> Result<Option<Self>> {
        let kind = value.get("rope_type").or_else(|| value.get("type")).and_then(Value::as_str);
        match kind {
            Some("default") => Ok(None),
            Some("llama3") => {
                let number = |key: &'static str| {
                    value.get(key).and_then(Value::as_f64).ok_or_else(|| Error::RopeScalingParameter {
                        path: path.to_path_buf(),
                        rope_type: "llama3",
                        key,
                    })
                };
                let scaling = RopeScaling::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor: number("low_freq_factor")?,
                    high_freq_factor: number("high_freq_factor")?,
                    original_max_position_embeddings: number("original_max_position_embeddings")?,
                };
                Ok(Some(scaling))
            }
            Some(other) => {
                Err(Error::UnsupportedRopeScaling { path: path.to_path_buf(), rope_type: other.to_string() })
            }
            None => Err(Error::UnnamedRopeScaling { path: path.to_path_buf(), value: value.to_string() }),
        }
    }
}

/// Precomputed inverse frequencies of one model's rotary embedding.
pub struct Rotary {
    inv_freq: Tensor, // [rotary_dim / 2], f32
}

impl Rotary {
    /// `inv_freq[j] = 1 / theta^(2j / rotary_dim)` in f32 as transformers computes it, then scaled.
    pub fn new(rotary_dim: i64, theta: f64, scaling: Option<&RopeScaling>, device: Device) -> Self {
        let exponents = Tensor::arange_start_step(0, rotary_dim, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float)
            / rotary_dim as f64;
        let mut inv_freq = Tensor::from(theta as f32).pow(&exponents).reciprocal();
        if let Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) = scaling
        {
            inv_freq = llama3_inv_freq(
                &inv_freq,
                *factor,
                *low_freq_factor,
                *high_freq_factor,
                *original_max_position_embeddings,
            );
        }
        Rotary { inv_freq: inv_freq.to_device(device) }
    }

    /// `cos` and `sin` `[seq, rotary_dim]` for positions `start..start + seq`, in `kind`.
    pub fn cos_sin(&self, start: i64, seq: i64, kind: Kind) -> (Tensor, Tensor) {
        let positions = Tensor::arange_start(start, start + seq, (Kind::Float, self.inv_freq.device()));
        let freqs = positions.unsqueeze(1) * self.inv_freq.unsqueeze(0); // [seq, rotary_dim / 2]
        let freqs = Tensor::cat(&[&freqs, &freqs], -1); // [seq, rotary_dim]
        (freqs.cos().to_kind(kind), freqs.sin().to_kind(kind))
    }
}

/// transformers' `_compute_llama3_parameters`, op for op in f32 (`a / t` is `t.reciprocal() * a`
/// in PyTorch), so that the frequencies are the same bits.
fn llama3_inv_freq(inv_freq: &Tensor, factor: f64, low: f64, high: f64, old_context: f64) -> Tensor {
    let low_freq_wavelen = old_context / low;
    let high_freq_wavelen = old_context / high;
    let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
    let scaled = inv_freq.where_self(&wavelen.le(low_freq_wavelen), &(inv_freq / factor));
    let smooth = (wavelen.reciprocal() * old_context - low) / (high - low);
    let smoothed = (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
    let medium = wavelen.ge(high_freq_wavelen).logical_and(&wavelen.le(low_freq_wavelen));
    smoothed.where_self(&medium, &scaled)
}

/// `x * cos + rotate_half(x) * sin` on `x` `[batch, heads, seq, rotary_dim]`, where
/// `rotate_half([x1, x2]) = [-x2, x1]` over the two halves of the last dimension.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[x2.neg(), x1], 3);
    x * cos + rotated * sin
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn path() -> &'static Path {
        Path::new("/m/config.json")
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let scaling = RopeScaling::from_config(
            &json!({
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192
            }),
            path(),
        )
        .unwrap();
        let plain = Rotary::new(128, 500_000.0, None, Device::Cpu).inv_freq;
        let scaled = Rotary::new(128, 500_000.0, scaling.as_ref(), Device::Cpu).inv_freq;
        let (p, s) = (Vec::<f32>::try_from(plain).unwrap(), Vec::<f32>::try_from(scaled).unwrap());
        assert_eq!(p[0], s[0], "the highest frequency is kept");
        assert!((p[63] / s[63] - 8.0).abs() < 1e-5, "the lowest is divided by the factor");
        assert!(p.iter().zip(&s).all(|(a, b)| b <= a));
    }

    #[test]
    fn unknown_rope_types_are_refused_and_default_is_no_scaling() {
        assert_eq!(RopeScaling::from_config(&json!({"rope_type": "default"}), path()).unwrap(), None);
        let err = RopeScaling::from_config(&json!({"type": "dynamic", "factor": 2.0}), path()).unwrap_err();
        assert!(matches!(&err, Error::UnsupportedRopeScaling { rope_type, .. } if rope_type == "dynamic"), "{err}");
        let err = RopeScaling::from_config(&json!({"rope_type": "llama3", "factor": 8.0}), path()).unwrap_err();
        assert!(err.to_string().contains("low_freq_factor") && err.to_string().contains("/m/config.json"), "{err}");
        let err = RopeScaling::from_config(&json!({"factor": 8.0}), path()).unwrap_err();
        assert!(matches!(err, Error::UnnamedRopeScaling { .. }), "{err}");
    }
}
