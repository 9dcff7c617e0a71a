use std::io::Write;

use anyhow::Result;
use capture::generate::{generate, GenerateOptions};
use capture::Hooks;

use crate::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The text to continue, tokenized exactly as transformers' tokenizer for the model does.
    #[arg(long)]
    prompt: String,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    model: ModelArgs,
}

/// How much to generate and how to pick tokens (shared with `sae steer`).
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn options(&self) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            seed: self.seed,
            stop_at_eos: true,
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let model = args.model.load()?;
    let prompt = model.tokenizer.encode(&args.prompt)?;
    let opts = args.sampling.options();
    let mut ids = Vec::new();
    let mut printed = 0usize;
    let mut stdout = std::io::stdout().lock();
    let started = std::time::Instant::now();
    generate(&model, &prompt, &opts, &mut Hooks::new(), |id| -> Result<()> {
        if Some(id) == model.tokenizer.eos_id {
            return Ok(());
        }
        ids.push(id);
        // Byte-level BPE can split a character across tokens: print only whole characters.
        let text = model.tokenizer.decode(&ids)?;
        if !text.ends_with('\u{FFFD}') && text.len() > printed {
            stdout.write_all(&text.as_bytes()[printed..])?;
            stdout.flush()?;
            printed = text.len();
        }
        Ok(())
    })?;
    let text = model.tokenizer.decode(&ids)?;
    if text.len() > printed {
        stdout.write_all(&text.as_bytes()[printed..])?;
    }
    writeln!(stdout)?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        prompt_tokens = prompt.len(),
        new_tokens = ids.len(),
        tokens_per_s = format!("{:.1}", ids.len() as f64 / secs),
        "generated"
    );
    Ok(())
}
