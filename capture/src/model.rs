//! Loading a model (weights, configuration and tokenizer) from a GGUF file or a Hugging Face folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::architecture::Architecture;
use crate::config::LlamaConfig;
use crate::decoder::Decoder;
use crate::error::{Error, Result};
use crate::gemma2::{Gemma2, Gemma2Config};
use crate::gguf::{GgufFile, Value};
use crate::gpt2::{Gpt2, Gpt2Config};
use crate::gpt_neox::{GptNeoX, GptNeoXConfig};
use crate::llama::Llama;
use crate::tokenizer::TextTokenizer;
use crate::weights::WeightError;

/// The default model: SmolLM2-135M-Instruct, as `make` installs it.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$SAE_MODEL_DIR/<file>`, else `$SAE_CACHE/models/<file>`, else `~/.cache/sae-pipeline/models/<file>`.
pub fn default_model_path() -> PathBuf {
    let dir = std::env::var_os("SAE_MODEL_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("SAE_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            // home_dir falls back to the password database when HOME is unset (`env -i`).
            #[allow(deprecated)]
            let home = std::env::home_dir().unwrap_or_else(|| PathBuf::from("."));
            home.join(".cache/sae-pipeline")
        });
        cache.join("models")
    });
    dir.join(DEFAULT_MODEL_FILE)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    Gguf,
    HuggingFace,
}

/// A loaded language model with its tokenizer.
pub struct Model {
    /// The network of whichever architecture the file describes.
    pub network: Box<dyn Decoder>,
    pub tokenizer: TextTokenizer,
    /// `general.name` from a GGUF header, else the file or folder name.
    pub name: String,
    pub path: PathBuf,
    pub format: ModelFormat,
}

impl Model {
    /// Loads a `.gguf` file or a Hugging Face folder (`config.json`, `model.safetensors` or a
    /// sharded index, `tokenizer.json`), computing in `kind` on `device`.
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        if !path.exists() {
            return Err(Error::ModelMissing { path: path.to_path_buf() });
        }
        if path.is_dir() {
            Self::load_hf(path, device, kind)
        } else {
            Self::load_gguf(path, device, kind)
        }
    }

    fn load_gguf(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let cfg = LlamaConfig::from_gguf(&file)?;
        let tokenizer = TextTokenizer::from_gguf(&file)?;
        let mut weights = HashMap::new();
        for info in &file.tensors {
            let Some(name) = hf_name(&info.name) else {
                tracing::debug!(tensor = %info.name, "skipping tensor the model does not use");
                continue;
            };
            let (shape, values) = file.dequantize(&info.name)?;
            let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            let mut tensor = Tensor::from_slice(&values).view(shape.as_slice());
            // llama.cpp's converter permutes Q and K rows for its interleaved rotary layout.
            let rotary_heads = if name.ends_with("q_proj.weight") {
                Some(cfg.num_attention_heads)
            } else if name.ends_with("k_proj.weight") {
                Some(cfg.n_kv_heads())
            } else {
                None
            };
            if let Some(n_head) = rotary_heads {
                tensor = unpermute_rotary_rows(&tensor, n_head as i64, cfg.head_dim() as i64, cfg.d_model() as i64)
                    .map_err(|source| Error::RotaryWeight {
                        path: path.to_path_buf(),
                        tensor: info.name.clone(),
                        source,
                    })?;
            }
            weights.insert(name, tensor);
        }
        let llama = Llama::from_weights(cfg, weights, device, kind)
            .map_err(|source| Error::BuildModel { path: path.to_path_buf(), source })?;
        let name =
            file.get("general.name").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| file_stem(path));
        Ok(Model { network: Box::new(llama), tokenizer, name, path: path.to_path_buf(), format: ModelFormat::Gguf })
    }

    fn load_hf(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: serde_json::Value = serde_json::from_str(&read_small_file(&config_path, MAX_CONFIG_BYTES)?)
            .map_err(|source| Error::NotJson { path: config_path.clone(), source })?;
        let arch = Architecture::of_config(&config, &config_path)?;
        tracing::debug!(?arch, dir = %dir.display(), "model family");
        let tokenizer = TextTokenizer::from_hf_dir(dir)?;
        let mut weights = HashMap::new();
        for file in safetensors_files(dir)? {
            // Kept in their stored dtype (bf16 or f16 weights are not widened to f32 here); each
            // tensor is converted to the compute dtype as the model takes it.
            let tensors = Tensor::read_safetensors(&file)
                .map_err(|source| Error::ReadSafetensors { path: file.clone(), source })?;
            weights.extend(tensors);
        }
        let built: Result<Box<dyn Decoder>, WeightError> = match arch {
            Architecture::Llama(family) => {
                let cfg = LlamaConfig::from_hf_json(family, &config, &config_path)?;
                Llama::from_weights(cfg, weights, device, kind).map(|m| Box::new(m) as Box<dyn Decoder>)
            }
            Architecture::Gpt2 => {
                let cfg = Gpt2Config::from_config(&config, &config_path)?;
                Gpt2::from_weights(cfg, weights, device, kind).map(|m| Box::new(m) as Box<dyn Decoder>)
            }
            Architecture::Gemma2 => {
                let cfg = Gemma2Config::from_config(&config, &config_path)?;
                Gemma2::from_weights(cfg, weights, device, kind).map(|m| Box::new(m) as Box<dyn Decoder>)
            }
            Architecture::GptNeoX => {
                let cfg = GptNeoXConfig::from_config(&config, &config_path)?;
                GptNeoX::from_weights(cfg, weights, device, kind).map(|m| Box::new(m) as Box<dyn Decoder>)
            }
        };
        let network = built.map_err(|source| Error::BuildModel { path: dir.to_path_buf(), source })?;
        Ok(Model {
            network,
            tokenizer,
            name: file_stem(dir),
            path: dir.to_path_buf(),
            format: ModelFormat::HuggingFace,
        })
    }

    /// SHA-256 (lowercase hex) of the model's weights: the GGUF file, or a Hugging Face folder's
    /// `config.json` and safetensors files in name order. Datasets record it, so that a dataset
    /// can be matched with the exact model that produced it.
    pub fn file_sha256(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let files = match self.format {
            ModelFormat::Gguf => vec![self.path.clone()],
            ModelFormat::HuggingFace => {
                let mut files = vec![self.path.join("config.json")];
                files.extend(safetensors_files(&self.path)?);
                files
            }
        };
        let mut hasher = Sha256::new();
        for file in files {
            let read_error = |source| Error::Read { path: file.clone(), source };
            let mut reader = std::fs::File::open(&file).map_err(read_error)?;
            std::io::copy(&mut reader, &mut hasher).map_err(read_error)?;
        }
        Ok(format!("{:x}", hasher.finalize()))
    }
}

fn file_stem(path: &Path) -> String {
    path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned())
}

/// `model.safetensors`, or every file named by `model.safetensors.index.json`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.exists() {
        return Err(Error::NoSafetensors { dir: dir.to_path_buf() });
    }
    let text = read_small_file(&index_path, MAX_INDEX_BYTES)?;
    shard_files_of_index(dir, &index_path, &text)
}

/// A `config.json` is a few KB; anything far larger is not one.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// `model.safetensors.index.json` maps tensor names to file names: a few hundred KB for the
/// largest models. Anything far larger is not an index.
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// The whole of a file that must be small, refused unread when it is larger than `max_bytes`.
fn read_small_file(path: &Path, max_bytes: u64) -> Result<String> {
    let read_error = |source| Error::Read { path: path.to_path_buf(), source };
    let size = std::fs::metadata(path).map_err(read_error)?.len();
    if size > max_bytes {
        return Err(Error::FileTooLarge { path: path.to_path_buf(), size, max_bytes });
    }
    std::fs::read_to_string(path).map_err(read_error)
}

/// The shard files an index names, sorted and without repeats. Each must be a plain file name
/// inside `dir` (no `..`, no absolute path, no sub-folder), so an index cannot point the loader
/// at files elsewhere.
fn shard_files_of_index(dir: &Path, index_path: &Path, text: &str) -> Result<Vec<PathBuf>> {
    let index = || index_path.to_path_buf();
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|source| Error::NotJson { path: index(), source })?;
    let map =
        json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::NoWeightMap { index: index() })?;
    let mut names = Vec::new();
    for (tensor, file) in map {
        let name = file.as_str().ok_or_else(|| Error::ShardNotAString {
            index: index(),
            tensor: tensor.clone(),
            value: file.to_string(),
        })?;
        let plain = Path::new(name).file_name().is_some_and(|n| n == name) && name != "." && name != "..";
        if !plain {
            return Err(Error::ShardOutsideFolder { index: index(), tensor: tensor.clone(), name: name.to_string() });
        }
        names.push(name);
    }
    if names.is_empty() {
        return Err(Error::EmptyWeightMap { index: index() });
    }
    names.sort_unstable();
    names.dedup();
    Ok(names.into_iter().map(|name| dir.join(name)).collect())
}

/// A Q or K weight of a GGUF file whose shape does not fit its heads (a damaged file): it cannot
/// be un-permuted. The [`Error`] that carries it names the file and the tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shape {shape:?}, expected {expected:?} ({n_head} heads of {head_dim})")]
pub struct RotaryShapeError {
    pub shape: Vec<i64>,
    pub expected: [i64; 2],
    pub n_head: i64,
    pub head_dim: i64,
}

/// Maps llama.cpp tensor names to Hugging Face names.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_owned());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undoes llama.cpp's `permute(w, n_head)`: within each head the converter interleaved the two
/// rotary halves (rows `[r0, r_half, r1, r_half+1, ...]`); this restores `[first half, second half]`.
/// `w` must be `[n_head * head_dim, d]`; any other shape (a damaged file) is an error.
fn unpermute_rotary_rows(w: &Tensor, n_head: i64, head_dim: i64, d: i64) -> Result<Tensor, RotaryShapeError> {
    let expected = [n_head * head_dim, d];
    if w.size() != expected || head_dim % 2 != 0 {
        return Err(RotaryShapeError { shape: w.size(), expected, n_head, head_dim });
    }
    Ok(w.view([n_head, head_dim / 2, 2, d]).transpose(1, 2).contiguous().view(expected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, head_dim/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (n_head, head_dim, cols) = (3i64, 8i64, 5i64);
        let w = Tensor::arange(n_head * head_dim * cols, (Kind::Float, Device::Cpu)).view([n_head * head_dim, cols]);
        let permuted =
            w.view([n_head, 2, head_dim / 2, cols]).transpose(1, 2).contiguous().view([n_head * head_dim, cols]);
        assert!(unpermute_rotary_rows(&permuted, n_head, head_dim, cols).unwrap().equal(&w));
    }

    #[test]
    fn unpermute_refuses_a_wrongly_shaped_weight() {
        let flat = Tensor::zeros([24], (Kind::Float, Device::Cpu));
        let err = unpermute_rotary_rows(&flat, 3, 8, 1).unwrap_err().to_string();
        assert!(err.contains("[24]") && err.contains("[24, 1]"), "{err}");
        let odd_rows = Tensor::zeros([25, 5], (Kind::Float, Device::Cpu));
        assert!(unpermute_rotary_rows(&odd_rows, 3, 8, 5).is_err());
    }

    #[test]
    fn safetensors_index_names_only_files_in_the_folder() {
        let dir = Path::new("/models/m");
        let index = Path::new("/models/m/model.safetensors.index.json");
        let good = r#"{"weight_map": {"a": "model-00002.safetensors", "b": "model-00001.safetensors", "c": "model-00001.safetensors"}}"#;
        let files = shard_files_of_index(dir, index, good).unwrap();
        assert_eq!(files, [dir.join("model-00001.safetensors"), dir.join("model-00002.safetensors")]);
        for (bad, expect) in [
            (r#"{"weight_map": {"a": "../../etc/passwd"}}"#, "not a file name"),
            (r#"{"weight_map": {"a": "/abs.safetensors"}}"#, "not a file name"),
            (r#"{"weight_map": {"a": 7}}"#, "not a file name"),
            (r#"{"weight_map": {}}"#, "empty"),
            (r#"{"weight_map": []}"#, "no weight_map"),
            (r#"[1, 2]"#, "no weight_map"),
            ("{", "not JSON"),
        ] {
            let err = format!("{:#}", shard_files_of_index(dir, index, bad).unwrap_err());
            assert!(err.contains(expect) && err.contains("model.safetensors.index.json"), "{bad}: {err}");
        }
    }

    #[test]
    fn oversized_index_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors.index.json");
        std::fs::write(&path, vec![b' '; 2048]).unwrap();
        let err = read_small_file(&path, 1024).unwrap_err().to_string();
        assert!(err.contains("2048 bytes") && err.contains("model.safetensors.index.json"), "{err}");
    }

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(hf_name("blk.12.attn_q.weight").as_deref(), Some("model.layers.12.self_attn.q_proj.weight"));
        assert_eq!(hf_name("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
