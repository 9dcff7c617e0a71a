//! The finished SAE in SAELens' on-disk layout: `cfg.json` and `sae_weights.safetensors` at the
//! root of the SAE's folder, readable by `SAE.load_from_disk` (SAELens 6.x).
//!
//! Training happens on inputs scaled by `activation_scale` (so that E‖x‖² = d_in). The export
//! folds that factor back into the weights, so the saved SAE works on the model's raw
//! activations and SAELens needs no normalization (`normalize_activations: "none"`):
//!
//! ```text
//! (s·x − b_dec) W_enc + b_enc  =  (x − b_dec/s) (s·W_enc) + b_enc
//! (z W_dec + b_dec) / s        =  z (W_dec/s) + b_dec/s
//! ```
//!
//! Thresholds act on pre-activations, which the fold leaves unchanged. BatchTopK is saved as a
//! JumpReLU whose threshold is the learned global threshold for every latent, as SAELens saves it.
//! The factor itself is kept in `cfg.json` (`metadata.sae_pipeline.activation_scale`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::sae::{Architecture, Sae, SaeConfig, SaeError};
use crate::tensors::{self, TensorFileError};

pub const CFG_FILE: &str = "cfg.json";
pub const WEIGHTS_FILE: &str = "sae_weights.safetensors";
/// The SAELens release whose `cfg.json` layout we write (and test against).
pub const SAE_LENS_LAYOUT_VERSION: &str = "6.54.12";

/// What, besides the weights, describes an exported SAE. Stored under
/// `metadata.sae_pipeline` in `cfg.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportInfo {
    pub hook_name: String,
    /// The model file's name, as the dataset's manifest records it.
    pub model_name: String,
    pub model_sha256: String,
    pub dataset_id: String,
    pub context_len: usize,
    /// The factor the training inputs were multiplied by (already folded into the weights).
    pub activation_scale: f64,
    /// The architecture as trained, with its hyper-parameters.
    pub trained: SaeConfig,
    /// Training tokens seen.
    pub tokens: u64,
}

/// The SAELens architecture name and the config SAELens runs at inference.
fn inference_architecture(trained: &Architecture) -> &'static str {
    match trained {
        Architecture::Relu { .. } => "standard",
        Architecture::TopK { .. } => "topk",
        Architecture::BatchTopK { .. } | Architecture::JumpRelu { .. } => "jumprelu",
    }
}

/// `cfg.json` and `sae_weights.safetensors`, as bytes. Equal weights give equal bytes: there is
/// no timestamp or path in the weights file.
pub fn export_files(sae: &Sae, info: &ExportInfo) -> (Vec<u8>, Vec<u8>) {
    let _guard = tch::no_grad_guard();
    let s = info.activation_scale;
    let mut weights = vec![
        ("W_enc".to_string(), sae.w_enc() * s),
        ("W_dec".to_string(), sae.w_dec() / s),
        ("b_enc".to_string(), sae.b_enc().copy()),
        ("b_dec".to_string(), sae.b_dec() / s),
    ];
    if let Some(threshold) = sae.threshold() {
        weights.push(("threshold".to_string(), threshold));
    }
    let weights = tensors::to_bytes(&weights, None);

    let config = sae.config();
    let mut cfg = json!({
        "architecture": inference_architecture(&config.arch),
        "d_in": config.d_in,
        "d_sae": config.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": true,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": info.model_name,
            "hook_name": info.hook_name,
            "hook_head_index": null,
            "context_size": info.context_len,
            "prepend_bos": false,
            "dataset_path": info.dataset_id,
            "model_from_pretrained_kwargs": {},
            // SAELens reads the nested metadata only from configs that say they are 6.x.
            "sae_lens_version": SAE_LENS_LAYOUT_VERSION,
            "sae_lens_training_version": SAE_LENS_LAYOUT_VERSION,
            "sae_pipeline": info,
        },
    });
    if let Architecture::TopK { k } = config.arch {
        cfg["k"] = json!(k);
        cfg["rescale_acts_by_decoder_norm"] = json!(false);
    }
    let mut cfg = serde_json::to_vec_pretty(&cfg).expect("cfg.json");
    cfg.push(b'\n');
    (cfg, weights)
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("`{location}` is not a valid SAE cfg.json: {detail}")]
    Cfg { location: String, detail: String },
    #[error(transparent)]
    Tensors(#[from] TensorFileError),
    #[error("`{location}`: {source}")]
    Sae { location: String, source: SaeError },
}

/// An exported SAE loaded for inference on raw activations: its weights have the scale folded
/// in, so `info.activation_scale` is a record of training, not something to apply again.
pub struct LoadedSae {
    pub sae: Sae,
    pub info: ExportInfo,
}

/// The cfg's `d_in` and `d_sae` must be the shape of the saved decoder, `[d_sae, d_in]`:
/// [`Sae::new`] allocates `d_in × d_sae` weights from them before any saved tensor is loaded, so
/// a damaged or forged `cfg.json` could otherwise ask for terabytes.
pub fn check_sizes_match_weights(config: &SaeConfig, saved: &BTreeMap<String, Tensor>) -> Result<(), String> {
    let dims = (i64::try_from(config.d_sae), i64::try_from(config.d_in));
    let decoder = saved.get("W_dec").ok_or("the weights hold no W_dec")?;
    match dims {
        (Ok(d_sae), Ok(d_in)) if decoder.size() == [d_sae, d_in] => Ok(()),
        _ => Err(format!(
            "d_sae {} and d_in {} do not match the saved W_dec of shape {:?}",
            config.d_sae,
            config.d_in,
            decoder.size()
        )),
    }
}

/// Loads what [`export_files`] wrote. `location` names the folder in errors.
pub fn load(cfg: &[u8], weights: &[u8], location: &str, device: Device) -> Result<LoadedSae, LoadError> {
    let cfg_error = |detail: String| LoadError::Cfg { location: format!("{location}/{CFG_FILE}"), detail };
    let value: serde_json::Value = serde_json::from_slice(cfg).map_err(|e| cfg_error(e.to_string()))?;
    let info: ExportInfo = serde_json::from_value(value["metadata"]["sae_pipeline"].clone())
        .map_err(|e| cfg_error(format!("metadata.sae_pipeline: {e} (was it written by sae-pipeline?)")))?;
    let (mut saved, _) = tensors::from_bytes(weights, &format!("{location}/{WEIGHTS_FILE}"))?;
    let trained = &info.trained;
    check_sizes_match_weights(trained, &saved).map_err(cfg_error)?;
    // Inference runs the saved architecture: BatchTopK becomes a JumpReLU with its threshold.
    let arch = match &trained.arch {
        Architecture::BatchTopK { .. } => Architecture::JumpRelu { init_threshold: 1.0, bandwidth: 1.0, l0_coeff: 0.0 },
        other => other.clone(),
    };
    if let Architecture::JumpRelu { .. } = arch {
        let threshold =
            saved.remove("threshold").ok_or_else(|| cfg_error("a JumpReLU SAE needs a `threshold` tensor".into()))?;
        saved.insert("log_threshold".to_string(), threshold.log());
    }
    let config = SaeConfig { arch, ..trained.clone() };
    let sae_error = |source| LoadError::Sae { location: location.to_string(), source };
    let mut sae = Sae::new(config, device).map_err(sae_error)?;
    let saved: BTreeMap<String, Tensor> = saved.into_iter().map(|(name, t)| (name, t.to_kind(Kind::Float))).collect();
    sae.load_state_tensors(&saved).map_err(sae_error)?;
    Ok(LoadedSae { sae, info })
}

#[cfg(test)]
mod size_checks {
    use super::*;

    fn saved_decoder(shape: &[i64]) -> BTreeMap<String, Tensor> {
        BTreeMap::from([("W_dec".to_string(), Tensor::zeros(shape, (Kind::Float, Device::Cpu)))])
    }

    #[test]
    fn forged_sizes_in_cfg_are_refused_before_allocating() {
        let arch = Architecture::TopK { k: 2 };
        assert!(check_sizes_match_weights(&SaeConfig::new(4, 8, arch.clone()), &saved_decoder(&[8, 4])).is_ok());
        for (d_in, d_sae) in [(4, 1 << 40), (usize::MAX, 8), (8, 4)] {
            let err = check_sizes_match_weights(&SaeConfig::new(d_in, d_sae, arch.clone()), &saved_decoder(&[8, 4]))
                .unwrap_err();
            assert!(err.contains(&d_sae.to_string()) && err.contains("[8, 4]"), "{err}");
        }
        let err = check_sizes_match_weights(&SaeConfig::new(4, 8, arch), &BTreeMap::new()).unwrap_err();
        assert!(err.contains("W_dec"), "{err}");
    }
}
