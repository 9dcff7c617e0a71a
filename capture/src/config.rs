//! The Llama-family configuration (Llama, Mistral, Qwen 2), read from a GGUF header or a Hugging
//! Face `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::architecture::{llama_variant, LlamaFamily, LlamaVariant};
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Value};

/// Model hyper-parameters. Field names follow Hugging Face's `LlamaConfig`, so a
/// `config.json` deserializes directly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    /// d_model.
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: each K/V head serves `num_attention_heads / num_key_value_heads`
    /// query heads. Defaults to `num_attention_heads` (plain multi-head attention).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Width of each attention head; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// The family's own settings (biases, rotary scaling, sliding windows), read and checked by
    /// [`crate::architecture`].
    #[serde(skip)]
    pub variant: LlamaVariant,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}

impl LlamaConfig {
    pub fn d_model(&self) -> usize {
        self.hidden_size
    }
    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
    /// The sliding attention window of `layer`, if it has one.
    pub fn sliding_window(&self, layer: usize) -> Option<usize> {
        self.variant.sliding_windows.get(layer).copied().flatten()
    }

    /// Reads `{arch}.*` keys from a GGUF header. `tied` says whether the file lacks `output.weight`.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.require("general.architecture")?.as_str().unwrap_or_default().to_string();
        if arch != "llama" {
            return Err(Error::UnsupportedArchitecture { path: file.path().to_path_buf(), arch });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let vocab_size = match file.get(&key("vocab_size")).and_then(Value::as_u64) {
            Some(n) => n as usize,
            None => file.require("tokenizer.ggml.tokens")?.as_array().map_or(0, |a| a.len()),
        };
        let heads = file.require_u64(&key("attention.head_count"))? as usize;
        // Llama 3.1 files carry their rotary scaling as a tensor of factors; running without it
        // would be slightly wrong everywhere, so such files are refused.
        let scaling = file.get(&key("rope.scaling.type")).and_then(Value::as_str).unwrap_or("none");
        if scaling != "none" || file.tensor_info("rope_freqs.weight").is_some() {
            return Err(Error::GgufRopeScaling { path: file.path().to_path_buf(), arch, scaling: scaling.to_string() });
        }
        let cfg = LlamaConfig {
            vocab_size,
            hidden_size: file.require_u64(&key("embedding_length"))? as usize,
            intermediate_size: file.require_u64(&key("feed_forward_length"))? as usize,
            num_hidden_layers: file.require_u64(&key("block_count"))? as usize,
            num_attention_heads: heads,
            num_key_value_heads: Some(
                file.get(&key("attention.head_count_kv")).and_then(Value::as_u64).map_or(heads, |n| n as usize),
            ),
            rope_theta: file.get(&key("rope.freq_base")).and_then(Value::as_f64).unwrap_or(default_rope_theta()),
            rms_norm_eps: file.require_f64(&key("attention.layer_norm_rms_epsilon"))?,
            max_position_embeddings: file
                .get(&key("context_length"))
                .and_then(Value::as_u64)
                .map_or(default_max_positions(), |n| n as usize),
            tie_word_embeddings: file.tensor_info("output.weight").is_none(),
            head_dim: None,
            variant: LlamaVariant::default(),
        };
        cfg.validate().map_err(|source| Error::InvalidModelHeader { path: file.path().to_path_buf(), source })?;
        Ok(cfg)
    }

    /// Reads the `config.json` (at `path`, parsed as `json`) of a member of the Llama family,
    /// refusing settings we do not implement.
    pub fn from_hf_json(family: LlamaFamily, json: &serde_json::Value, path: &Path) -> Result<Self> {
        let mut cfg: LlamaConfig = serde_json::from_value(json.clone())
            .map_err(|source| Error::NotLlamaConfig { path: path.to_path_buf(), source })?;
        cfg.variant = llama_variant(family, json, cfg.num_hidden_layers, path)?;
        cfg.validate().map_err(|source| Error::InvalidModelConfig { path: path.to_path_buf(), source })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let (hidden_size, heads, kv_heads) = (self.hidden_size, self.num_attention_heads, self.n_kv_heads());
        // With an explicit head_dim, hidden_size need not be heads × head_dim.
        if heads == 0 || (self.head_dim.is_none() && !hidden_size.is_multiple_of(heads)) {
            return Err(ConfigError::HeadsDoNotDivide { hidden_size, heads });
        }
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(ConfigError::KvHeadsDoNotDivide { heads, kv_heads });
        }
        if self.head_dim() == 0 {
            return Err(ConfigError::ZeroHeadDim);
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(ConfigError::OddHeadDim { head_dim: self.head_dim() });
        }
        Ok(())
    }
}

/// Hyper-parameters that do not fit together (the header or `config.json` they came from is
/// named by the [`Error`] that carries this).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("hidden_size {hidden_size} is not a multiple of num_attention_heads {heads}")]
    HeadsDoNotDivide { hidden_size: usize, heads: usize },
    #[error("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")]
    KvHeadsDoNotDivide { heads: usize, kv_heads: usize },
    #[error("head dimension {head_dim} must be even for rotary embeddings")]
    OddHeadDim { head_dim: usize },
    #[error("head dimension is 0")]
    ZeroHeadDim,
    #[error("n_embd {n_embd} is not a multiple of n_head {n_head}")]
    EmbdDoNotDivide { n_embd: usize, n_head: usize },
}
