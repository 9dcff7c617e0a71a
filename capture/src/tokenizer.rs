//! Text ↔ token ids, built the way transformers builds the fast tokenizer for the same model, so
//! that our ids equal theirs.
//!
//! - From GGUF metadata (`tokenizer.ggml.model = "gpt2"`): a byte-level BPE over
//!   `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, with the settings of transformers' GGUF
//!   converter (byte-level pre-tokenizer without prefix space, byte-level decoder, CONTROL tokens
//!   special). BOS is prepended only when `tokenizer.ggml.add_bos_token` is true. transformers'
//!   GGUF path builds a `LlamaTokenizerFast` that prepends BOS whatever the file says; SmolLM2's
//!   file says false, and so does its original `tokenizer.json`, so we follow the file: our ids
//!   equal transformers' `tokenizer(text, add_special_tokens=False)`.
//! - From a Hugging Face folder: `tokenizer.json` as is, with `tokenizer_config.json`
//!   (`add_bos_token`, `bos_token`, `eos_token`) when present.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Value};

#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Whether `encode` starts every text with BOS (the model's `add_bos_token`).
    pub add_bos: bool,
}

impl TextTokenizer {
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let path = || file.path().to_path_buf();
        let model = file.require("tokenizer.ggml.model")?.as_str().unwrap_or_default();
        if model != "gpt2" {
            return Err(Error::UnsupportedTokenizer { path: path(), model: model.to_string() });
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            let items =
                file.require(key)?.as_array().ok_or_else(|| Error::NotAnArray { path: path(), key: key.into() })?;
            items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_owned).ok_or_else(|| Error::NonStringItem { path: path(), key: key.into() })
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| Error::MalformedMerge { path: path(), merge: m.clone() })
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|cause| Error::BuildBpe { path: path(), cause })?;
        let id = |key: &str| file.get(key).and_then(Value::as_u64).map(|v| v as u32);
        let (bos_id, eos_id) = (id("tokenizer.ggml.bos_token_id"), id("tokenizer.ggml.eos_token_id"));
        let add_bos = file.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false);

        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        match (add_bos, bos_id) {
            (true, Some(bos)) => {
                let bos_text =
                    tokens.get(bos as usize).ok_or_else(|| Error::BosOutsideVocabulary { path: path(), bos })?;
                let template = TemplateProcessing::builder()
                    .try_single(format!("{bos_text}:0 $A:0"))
                    .and_then(|b| b.try_pair(format!("{bos_text}:0 $A:0 $B:1")))
                    .map_err(|detail| Error::BosTemplate { detail })?
                    .special_tokens(vec![(bos_text.clone(), bos)])
                    .build()
                    .map_err(|e| Error::BosTemplate { detail: e.to_string() })?;
                inner.with_post_processor(Some(template));
            }
            _ => {
                inner.with_post_processor(Some(ByteLevelProcessor::new(true, false, true)));
            }
        }
        // Like transformers' GGUF converter: every CONTROL token (token_type 3) is special, so
        // "<|im_end|>" in text maps to its id; without token types, BOS/EOS/UNK/PAD are.
        let specials: Vec<AddedToken> = match file.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(types) => types
                .iter()
                .zip(&tokens)
                .filter(|(t, _)| t.as_u64() == Some(3) || matches!(t, Value::I32(3)))
                .map(|(_, token)| AddedToken::from(token.clone(), true))
                .collect(),
            None => ["bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"]
                .iter()
                .filter_map(|k| id(&format!("tokenizer.ggml.{k}")))
                .filter_map(|i| tokens.get(i as usize))
                .map(|t| AddedToken::from(t.clone(), true))
                .collect(),
        };
        inner.add_special_tokens(&specials);
        Ok(TextTokenizer { inner, bos_id, eos_id, add_bos })
    }

    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&file).map_err(|cause| Error::LoadTokenizer { path: file.clone(), cause })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|source| Error::NotJson { path: config_path, source })?,
            Err(_) => serde_json::Value::Null,
        };
        let token_id = |key: &str| {
            let text = match &config[key] {
                serde_json::Value::String(s) => Some(s.as_str()),
                serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()),
                _ => None,
            };
            text.and_then(|t| inner.token_to_id(t))
        };
        let (bos_id, eos_id) = (token_id("bos_token"), token_id("eos_token"));
        let add_bos = config["add_bos_token"].as_bool().unwrap_or(false);
        Ok(TextTokenizer { inner, bos_id, eos_id, add_bos })
    }

    /// Token ids of `text`, with BOS first when the model adds it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, true).map_err(|cause| Error::Encode { cause })?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|cause| Error::Decode { cause })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// SHA-256 (lowercase hex) of the tokenizer's full definition (model, vocabulary, merges,
    /// pre-tokenizer, special tokens) and of whether BOS is added: two tokenizers with the same
    /// digest give the same ids.
    pub fn digest(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let json = self.inner.to_string(false).map_err(|cause| Error::SerializeTokenizer { cause })?;
        let mut hasher = Sha256::new();
        hasher.update(json.as_bytes());
        hasher.update([self.add_bos as u8]);
        Ok(format!("{:x}", hasher.finalize()))
    }
}
