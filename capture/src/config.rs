//! The Llama-family configuration, read from a GGUF header or a Hugging Face `config.json`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

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
        self.hidden_size / self.num_attention_heads
    }

    /// Reads `{arch}.*` keys from a GGUF header. `tied` says whether the file lacks `output.weight`.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.require("general.architecture")?.as_str().unwrap_or_default().to_string();
        if arch != "llama" {
            bail!("{}: architecture {arch:?} is not supported (only \"llama\")", file.path().display());
        }
        let key = |k: &str| format!("{arch}.{k}");
        let vocab_size = match file.get(&key("vocab_size")).and_then(Value::as_u64) {
            Some(n) => n as usize,
            None => file.require("tokenizer.ggml.tokens")?.as_array().map_or(0, |a| a.len()),
        };
        let heads = file.require_u64(&key("attention.head_count"))? as usize;
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
        };
        cfg.validate().with_context(|| format!("invalid model header in {}", file.path().display()))?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let cfg: LlamaConfig =
            serde_json::from_str(&text).with_context(|| format!("{} is not a Llama config.json", path.display()))?;
        cfg.validate().with_context(|| format!("invalid model config in {}", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if self.n_kv_heads() == 0 || !self.num_attention_heads.is_multiple_of(self.n_kv_heads()) {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.n_kv_heads()
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("head dimension {} must be even for rotary embeddings", self.head_dim());
        }
        Ok(())
    }
}
