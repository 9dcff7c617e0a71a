//! Which architecture a Hugging Face `config.json` describes, and whether we implement every
//! setting in it that changes the computation.
//!
//! A folder is loaded only when its `model_type` (and `architectures`, when present) name a
//! family implemented here, and when no field asks for something we do not compute (another
//! rotary scaling, another activation, soft-capping, quantization, ...). Anything else is
//! refused with the field named: running a model approximately would give activations that look
//! plausible and are wrong.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::rope::RopeScaling;

/// A model family we run, as transformers' `model_type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama and the families that differ from it only in settings ([`crate::llama`]).
    Llama(LlamaFamily),
    /// `GPT2LMHeadModel` ([`crate::gpt2`]).
    Gpt2,
    /// `GPTNeoXForCausalLM`, Pythia ([`crate::gpt_neox`]).
    GptNeoX,
    /// `Gemma2ForCausalLM` ([`crate::gemma2`]).
    Gemma2,
}

/// The members of the Llama family, which share [`crate::llama::Llama`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaFamily {
    /// `LlamaForCausalLM` (SmolLM2, Llama 2, Llama 3 and 3.1).
    Llama,
    /// `MistralForCausalLM`: Llama with sliding-window attention on every layer.
    Mistral,
    /// `Qwen2ForCausalLM` (Qwen 2, Qwen 2.5): Llama with biases on Q, K and V.
    Qwen2,
}

/// Every supported family: `model_type`, the `architectures` class and the enum value.
const SUPPORTED: &[(&str, &str, Architecture)] = &[
    ("llama", "LlamaForCausalLM", Architecture::Llama(LlamaFamily::Llama)),
    ("mistral", "MistralForCausalLM", Architecture::Llama(LlamaFamily::Mistral)),
    ("qwen2", "Qwen2ForCausalLM", Architecture::Llama(LlamaFamily::Qwen2)),
    ("gpt2", "GPT2LMHeadModel", Architecture::Gpt2),
    ("gpt_neox", "GPTNeoXForCausalLM", Architecture::GptNeoX),
    ("gemma2", "Gemma2ForCausalLM", Architecture::Gemma2),
];

/// `llama (LlamaForCausalLM), mistral (...), ...`: what error messages list as supported.
pub fn supported_list() -> String {
    SUPPORTED.iter().map(|(t, c, _)| format!("{t} ({c})")).collect::<Vec<_>>().join(", ")
}

impl Architecture {
    /// The family named by `config`'s `model_type` and `architectures`, which must agree.
    pub fn of_config(config: &Value, path: &Path) -> Result<Self> {
        let model_type = config.get("model_type").and_then(Value::as_str);
        let classes: Vec<&str> = config
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let of_type = |t: &str| {
            let entry = SUPPORTED.iter().find(|(name, _, _)| *name == t);
            entry.ok_or_else(|| Error::UnsupportedModelType { path: path.to_path_buf(), model_type: t.to_string() })
        };
        let by_type = model_type.map(of_type).transpose()?;
        for class in &classes {
            let entry = SUPPORTED
                .iter()
                .find(|(_, c, _)| c == class)
                .ok_or_else(|| Error::UnsupportedModelClass { path: path.to_path_buf(), class: class.to_string() })?;
            if let Some(by_type) = by_type {
                if by_type.2 != entry.2 {
                    return Err(Error::DisagreeingArchitecture {
                        path: path.to_path_buf(),
                        model_type: by_type.0.to_string(),
                        class: class.to_string(),
                    });
                }
            }
        }
        match (by_type, classes.first()) {
            (Some(entry), _) => Ok(entry.2),
            (None, Some(class)) => Ok(SUPPORTED.iter().find(|(_, c, _)| c == class).expect("checked above").2),
            (None, None) => Err(Error::UnnamedArchitecture { path: path.to_path_buf() }),
        }
    }
}

/// What a Llama-family `config.json` asks for beyond the fields every family shares.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LlamaVariant {
    /// Biases on the Q, K and V projections (Qwen 2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    pub rope_scaling: Option<RopeScaling>,
    /// Per layer, the sliding attention window in tokens (`None`: the whole causal past).
    /// Empty means no layer has a window.
    pub sliding_windows: Vec<Option<usize>>,
}

/// Reads and checks the fields of a Llama-family config that change the computation.
pub fn llama_variant(family: LlamaFamily, config: &Value, n_layers: usize, path: &Path) -> Result<LlamaVariant> {
    let present = |field: &str| config.get(field).filter(|v| !v.is_null());

    if let Some(act) = present("hidden_act") {
        if act.as_str() != Some("silu") {
            let name = act.as_str().map_or_else(|| act.to_string(), str::to_owned);
            let supported = "\"silu\" (SwiGLU) for this family";
            return Err(Error::UnsupportedActivation {
                path: path.to_path_buf(),
                field: "hidden_act",
                name,
                supported,
            });
        }
    }
    if let Some(bias) = present("mlp_bias") {
        if bias.as_bool() != Some(false) {
            return Err(unsupported_field(path, "mlp_bias", bias, "MLP biases are not implemented"));
        }
    }
    if let Some(factor) = present("partial_rotary_factor") {
        if factor.as_f64() != Some(1.0) {
            let why = "only full rotary embeddings are implemented";
            return Err(unsupported_field(path, "partial_rotary_factor", factor, why));
        }
    }
    for field in ["attn_logit_softcapping", "final_logit_softcapping", "quantization_config"] {
        if let Some(value) = present(field) {
            return Err(unsupported_field(path, field, value, "not part of this family as implemented"));
        }
    }
    let rope_scaling = match present("rope_scaling") {
        None => None,
        Some(value) => RopeScaling::from_config(value, path)?,
    };

    let attention_bias = match present("attention_bias") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| invalid_field(path, "attention_bias", v, "true or false"))?,
    };
    let (qkv_bias, o_bias) = match family {
        LlamaFamily::Llama => (attention_bias, attention_bias),
        LlamaFamily::Mistral => (false, false),
        LlamaFamily::Qwen2 => (true, false),
    };
    let sliding_windows = match family {
        LlamaFamily::Llama => Vec::new(),
        LlamaFamily::Mistral => {
            // MistralConfig's default window is 4096; save_pretrained leaves defaults out.
            let window = match config.get("sliding_window") {
                None => Some(4096),
                Some(Value::Null) => None,
                Some(v) => Some(positive_field(path, "sliding_window", v)?),
            };
            vec![window; n_layers]
        }
        LlamaFamily::Qwen2 => qwen2_windows(config, n_layers, path)?,
    };
    Ok(LlamaVariant { qkv_bias, o_bias, rope_scaling, sliding_windows })
}

/// Qwen 2's windows, as `Qwen2Config` derives them: `sliding_window` applies only when
/// `use_sliding_window`, and only on layers whose `layer_types` entry is `sliding_attention`
/// (by default, layers from `max_window_layers` on).
fn qwen2_windows(config: &Value, n_layers: usize, path: &Path) -> Result<Vec<Option<usize>>> {
    let use_window = config.get("use_sliding_window").and_then(Value::as_bool).unwrap_or(false);
    let window = match (use_window, config.get("sliding_window")) {
        (false, _) | (true, Some(Value::Null)) => None,
        (true, None) => Some(4096),
        (true, Some(v)) => Some(positive_field(path, "sliding_window", v)?),
    };
    let max_window_layers = match config.get("max_window_layers") {
        None | Some(Value::Null) => 28,
        Some(v) => positive_field(path, "max_window_layers", v)?,
    };
    let layer_types: Vec<String> = match config.get("layer_types") {
        None | Some(Value::Null) => (0..n_layers)
            .map(|i| {
                let sliding = window.is_some() && i >= max_window_layers;
                if sliding { "sliding_attention" } else { "full_attention" }.to_string()
            })
            .collect(),
        Some(v) => {
            let types: Option<Vec<String>> =
                v.as_array().map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect());
            match types {
                Some(types) if types.len() == n_layers => types,
                _ => return Err(invalid_field(path, "layer_types", v, "a list of one attention type per layer")),
            }
        }
    };
    layer_types
        .iter()
        .map(|t| match t.as_str() {
            "full_attention" => Ok(None),
            "sliding_attention" => Ok(window),
            other => {
                let why = "only full_attention and sliding_attention exist";
                Err(unsupported_field(path, "layer_types", &Value::from(other), why))
            }
        })
        .collect()
}

/// A field of `path` (whose JSON is `value`) asks for a computation that is not implemented.
pub(crate) fn unsupported_field(path: &Path, field: &str, value: &Value, why: &'static str) -> Error {
    Error::UnsupportedField { path: path.to_path_buf(), field: field.to_string(), value: value.to_string(), why }
}

/// A field of `path` (whose JSON is `value`) is not what it must be (`expected`).
pub(crate) fn invalid_field(path: &Path, field: &str, value: &Value, expected: &'static str) -> Error {
    Error::InvalidField { path: path.to_path_buf(), field: field.to_string(), value: value.to_string(), expected }
}

/// `value` as a positive integer, else an [`Error::InvalidField`] naming `field`.
fn positive_field(path: &Path, field: &str, value: &Value) -> Result<usize> {
    positive(value).ok_or_else(|| invalid_field(path, field, value, "a positive integer"))
}

fn positive(v: &Value) -> Option<usize> {
    v.as_u64().filter(|&n| n > 0).map(|n| n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn path() -> &'static Path {
        Path::new("/m/config.json")
    }

    #[test]
    fn model_type_and_architectures_pick_the_family() {
        let cases = [
            (json!({"model_type": "llama"}), Architecture::Llama(LlamaFamily::Llama)),
            (json!({"architectures": ["Qwen2ForCausalLM"]}), Architecture::Llama(LlamaFamily::Qwen2)),
            (
                json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}),
                Architecture::Llama(LlamaFamily::Mistral),
            ),
            (json!({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}), Architecture::Gpt2),
        ];
        for (config, arch) in cases {
            assert_eq!(Architecture::of_config(&config, path()).unwrap(), arch, "{config}");
        }
    }

    #[test]
    fn unknown_or_mixed_families_are_refused_with_the_supported_list() {
        for (config, named) in [
            (json!({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}), "gemma"),
            (json!({"model_type": "llama", "architectures": ["GemmaForCausalLM"]}), "GemmaForCausalLM"),
            (json!({"architectures": ["PhiForCausalLM"]}), "PhiForCausalLM"),
        ] {
            let err = Architecture::of_config(&config, path()).unwrap_err().to_string();
            assert!(err.contains(named) && err.contains("llama (LlamaForCausalLM)"), "{err}");
            assert!(err.contains("gemma2 (Gemma2ForCausalLM)"), "{err}");
            assert!(err.contains("/m/config.json"), "{err}");
        }
        let mixed = json!({"model_type": "llama", "architectures": ["Gemma2ForCausalLM"]});
        let err = Architecture::of_config(&mixed, path()).unwrap_err().to_string();
        assert!(err.contains("disagrees") && err.contains("Gemma2ForCausalLM"), "{err}");
        let err =
            Architecture::of_config(&json!({"model_type": "qwen2", "architectures": ["LlamaForCausalLM"]}), path())
                .unwrap_err()
                .to_string();
        assert!(err.contains("disagrees"), "{err}");
        let err = Architecture::of_config(&json!({"hidden_size": 4}), path()).unwrap_err().to_string();
        assert!(err.contains("neither model_type nor architectures"), "{err}");
    }

    #[test]
    fn fields_we_do_not_compute_are_refused_by_name() {
        for (config, field) in [
            (json!({"hidden_act": "gelu"}), "hidden_act"),
            (json!({"mlp_bias": true}), "mlp_bias"),
            (json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}), "rope_scaling"),
            (json!({"rope_scaling": {"type": "linear", "factor": 2.0}}), "rope_scaling"),
            (json!({"partial_rotary_factor": 0.5}), "partial_rotary_factor"),
            (json!({"final_logit_softcapping": 30.0}), "final_logit_softcapping"),
            (json!({"quantization_config": {"quant_method": "gptq"}}), "quantization_config"),
        ] {
            let err = llama_variant(LlamaFamily::Llama, &config, 2, path()).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("/m/config.json"), "{err}");
        }
        let bad_types = json!({"use_sliding_window": true, "layer_types": ["full_attention", "chunked_attention"]});
        let err = llama_variant(LlamaFamily::Qwen2, &bad_types, 2, path()).unwrap_err().to_string();
        assert!(err.contains("layer_types") && err.contains("chunked_attention"), "{err}");
    }

    #[test]
    fn family_settings_follow_transformers_defaults() {
        let qwen = llama_variant(LlamaFamily::Qwen2, &json!({"sliding_window": 8}), 3, path()).unwrap();
        assert!(qwen.qkv_bias && !qwen.o_bias);
        assert_eq!(qwen.sliding_windows, [None, None, None], "use_sliding_window defaults to false");
        let qwen = llama_variant(
            LlamaFamily::Qwen2,
            &json!({"use_sliding_window": true, "sliding_window": 8, "max_window_layers": 1}),
            3,
            path(),
        )
        .unwrap();
        assert_eq!(qwen.sliding_windows, [None, Some(8), Some(8)]);
        let mistral = llama_variant(LlamaFamily::Mistral, &json!({}), 2, path()).unwrap();
        assert_eq!(mistral.sliding_windows, [Some(4096), Some(4096)]);
        let mistral = llama_variant(LlamaFamily::Mistral, &json!({"sliding_window": null}), 2, path()).unwrap();
        assert_eq!(mistral.sliding_windows, [None, None]);
        let llama = llama_variant(LlamaFamily::Llama, &json!({"attention_bias": true}), 2, path()).unwrap();
        assert!(llama.qkv_bias && llama.o_bias && llama.sliding_windows.is_empty());
    }
}
