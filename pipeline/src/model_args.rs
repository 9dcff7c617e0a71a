//! The flags shared by every command that runs the model.

use std::path::PathBuf;

use anyhow::Result;
use capture::device::{device_name, parse_device, parse_dtype};
use capture::Model;

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF file or Hugging Face folder (config.json, model.safetensors, tokenizer.json).
    /// Default: $SAE_MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf, else ~/.cache/sae-pipeline/models/...
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// cpu, cuda or cuda:N. Default: cuda when a GPU is visible, else cpu.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
    /// Compute dtype: f32, bf16 or f16. Default: bf16 on CUDA and on CPUs with native bf16
    /// (x86 AVX512-BF16, where it is about 2× f32), else f32; for `sae capture`, the dtype of the
    /// capture that --out already holds, if it holds one.
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long, value_name = "N")]
    pub threads: Option<i32>,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Model> {
        if let Some(n) = self.threads {
            tch::set_num_threads(n);
        }
        let device = parse_device(self.device.as_deref())?;
        let kind = parse_dtype(self.dtype.as_deref(), device)?;
        let path = self.model.clone().unwrap_or_else(capture::model::default_model_path);
        let started = std::time::Instant::now();
        let model = Model::load(&path, device, kind)?;
        tracing::info!(
            model = %model.name, path = %path.display(), device = %device_name(device), dtype = ?kind,
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()), "loaded model"
        );
        Ok(model)
    }
}
