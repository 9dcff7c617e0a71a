//! Autoregressive generation with a KV cache: greedy by default, or sampling at a temperature.

use tch::{Kind, Tensor};

use crate::error::Error;
use crate::hooks::Hooks;
use crate::model::Model;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f64,
    pub seed: u64,
    /// Stop after the model emits its EOS token.
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 32, temperature: 0.0, seed: 0, stop_at_eos: true }
    }
}

/// Generates up to `max_new_tokens` after `prompt`, calling `on_token` with each new id.
/// `hooks` is applied at every step (steering passes its interventions here). An error of
/// `on_token` stops generation and is returned as it is; the crate's own errors are converted
/// into the caller's error type `E`.
pub fn generate<E: From<Error>>(
    model: &Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    hooks: &mut Hooks,
    mut on_token: impl FnMut(u32) -> Result<(), E>,
) -> Result<Vec<u32>, E> {
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt.into());
    }
    if opts.temperature < 0.0 || !opts.temperature.is_finite() {
        return Err(Error::BadTemperature { temperature: opts.temperature }.into());
    }
    tch::manual_seed(opts.seed as i64);
    let network = &model.network;
    let mut cache = network.new_cache();
    let mut input = Tensor::from_slice(&prompt.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
    let mut generated = Vec::with_capacity(opts.max_new_tokens);
    for _ in 0..opts.max_new_tokens {
        let out = network.forward(&input, Some(&mut cache), hooks, true).map_err(Error::from)?;
        let logits = out.logits.expect("logits were asked for").select(1, -1).squeeze_dim(0); // [vocab]
        let next = if opts.temperature == 0.0 {
            logits.argmax(0, false)
        } else {
            (logits / opts.temperature).softmax(0, Kind::Float).multinomial(1, false).squeeze_dim(0)
        };
        let next = next.int64_value(&[]) as u32;
        generated.push(next);
        on_token(next)?;
        if opts.stop_at_eos && Some(next) == model.tokenizer.eos_id {
            break;
        }
        input = Tensor::from_slice(&[next as i64]).unsqueeze(0);
    }
    Ok(generated)
}
