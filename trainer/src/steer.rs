//! Steering through an SAE, as in *Scaling Monosemanticity*: the activations `x` are split into
//! the SAE's reconstruction and the error term, `x = decode(z) + (x − decode(z))` with
//! `z = encode(x)`; the latents are edited, and the model continues with
//! `decode(z') + (x − decode(z))`. Everything the SAE does not explain passes through unchanged,
//! so an edit that leaves `z` as it was gives back `x` (up to float rounding).

use tch::{Kind, Tensor};

use crate::sae::{Sae, SaeError};

/// What to do to one feature's activation at every position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FeatureEdit {
    /// Set the activation to this value.
    Clamp { feature: i64, value: f64 },
    /// Add this value to the activation (adds `value` times the decoder row).
    Add { feature: i64, value: f64 },
}

impl FeatureEdit {
    pub fn feature(&self) -> i64 {
        match *self {
            FeatureEdit::Clamp { feature, .. } | FeatureEdit::Add { feature, .. } => feature,
        }
    }

    /// Applies the edit to latents `z` [rows, d_sae] in place.
    pub fn apply(&self, z: &mut Tensor) {
        match *self {
            FeatureEdit::Clamp { feature, value } => {
                let _ = z.select(1, feature).fill_(value);
            }
            FeatureEdit::Add { feature, value } => {
                let mut column = z.select(1, feature);
                let _ = column.g_add_scalar_(value);
            }
        }
    }
}

/// `decode(edit(encode(x))) + (x − decode(encode(x)))` for `x` [rows, d_in], computed in f32 and
/// returned in `x`'s dtype. `edit` changes the latents [rows, d_sae] in place.
pub fn splice(sae: &Sae, x: &Tensor, edit: impl FnOnce(&mut Tensor)) -> Result<Tensor, SaeError> {
    let _guard = tch::no_grad_guard();
    let x32 = x.to_kind(Kind::Float);
    let z = sae.encode(&x32)?;
    let x_hat = sae.decode(&z)?;
    let error = &x32 - &x_hat;
    let mut edited = z.copy();
    edit(&mut edited);
    Ok((sae.decode(&edited)? + error).to_kind(x.kind()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sae::{Architecture, SaeConfig};

    #[test]
    fn an_unchanged_code_gives_back_the_input_and_a_clamp_moves_along_the_decoder_row() {
        tch::manual_seed(0);
        let sae = Sae::new(SaeConfig::new(16, 64, Architecture::TopK { k: 4 }), tch::Device::Cpu).unwrap();
        let x = Tensor::randn([5, 16], (Kind::Float, tch::Device::Cpu));
        let same = splice(&sae, &x, |_| {}).unwrap();
        assert!(same.allclose(&x, 1e-5, 1e-5, false));

        let z = sae.encode(&x).unwrap();
        let clamp = FeatureEdit::Clamp { feature: 3, value: 7.0 };
        let steered = splice(&sae, &x, |z| clamp.apply(z)).unwrap();
        // x' − x = (7 − z[:, 3]) · W_dec[3]
        let want = (Tensor::from(7.0f32) - z.select(1, 3)).unsqueeze(1) * sae.w_dec().get(3).unsqueeze(0);
        assert!((steered - &x).allclose(&want, 1e-4, 1e-4, false));

        let add = FeatureEdit::Add { feature: 9, value: -2.0 };
        let added = splice(&sae, &x, |z| add.apply(z)).unwrap();
        let want = (sae.w_dec().get(9) * -2.0).unsqueeze(0).expand([5, 16], false);
        assert!((added - &x).allclose(&want, 1e-4, 1e-4, false));
    }
}
