//! What every architecture offers the rest of the program: a causal forward pass with
//! TransformerLens-named hooks, early exit and a KV cache.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use crate::attention::LayerCache;
use crate::hooks::{HookPoint, Hooks, UnknownHook};

/// How many blocks a forward pass runs: every one for logits or with a cache (whose every layer
/// must stay whole), else up to the deepest hook that `hooks` reads or changes (early exit).
pub(crate) fn blocks_to_run(n_layers: usize, hooks: &Hooks, want_logits: bool, cached: bool) -> usize {
    if want_logits || cached {
        n_layers
    } else {
        hooks.deepest(n_layers).unwrap_or(0)
    }
}

/// A decoder-only language model (one implementation per architecture).
pub trait Decoder: Send {
    /// Runs the model on `tokens` `[batch, seq]` (i64), after [`Decoder::check_tokens`].
    ///
    /// With a cache, `tokens` continue the sequence it holds, and the cache is extended.
    /// Without logits, the pass stops after the deepest hook that `hooks` reads or changes
    /// (early exit); with a cache, early exit is off so that every layer's cache stays whole.
    /// The families differ only in [`Decoder::run_blocks`], [`Decoder::final_norm`] and
    /// [`Decoder::logits`]; this is the one place that checks, counts and exits early.
    fn forward(
        &self,
        tokens: &Tensor,
        mut cache: Option<&mut KvCache>,
        hooks: &mut Hooks,
        want_logits: bool,
    ) -> Result<ForwardOutput, TokenInputError> {
        let start = cache.as_ref().map_or(0, |c| c.seen);
        self.check_tokens(tokens, start)?;
        let _guard = tch::no_grad_guard();
        let n_layers = self.n_layers();
        let blocks = blocks_to_run(n_layers, hooks, want_logits, cache.is_some());
        let x = self.run_blocks(tokens, start, blocks, cache.as_deref_mut(), hooks); // [batch, seq, d]
        if let Some(c) = cache {
            c.seen += tokens.size()[1];
        }
        let mut logits = None;
        if blocks == n_layers && (want_logits || hooks.wants(HookPoint::LnFinal)) {
            let normed = hooks.apply(HookPoint::LnFinal, self.final_norm(&x));
            if want_logits {
                logits = Some(self.logits(&normed).to_kind(Kind::Float)); // [batch, seq, vocab]
            }
        }
        Ok(ForwardOutput { logits, hooks: hooks.take_captured() })
    }

    /// Embeds `tokens` (checked, under no_grad) at positions from `start` and runs the first
    /// `blocks` blocks, applying `hooks` on the way; returns the residual stream
    /// `[batch, seq, d]`. It extends each layer's cache but leaves the position count to
    /// [`Decoder::forward`].
    fn run_blocks(
        &self,
        tokens: &Tensor,
        start: i64,
        blocks: usize,
        cache: Option<&mut KvCache>,
        hooks: &mut Hooks,
    ) -> Tensor;

    /// The final norm of the residual stream `[batch, seq, d]`.
    fn final_norm(&self, x: &Tensor) -> Tensor;

    /// Logits `[batch, seq, vocab]` in the compute dtype from the final-normed residual stream.
    fn logits(&self, normed: &Tensor) -> Tensor {
        normed.linear::<Tensor>(self.unembedding(), None)
    }

    /// Transformer blocks.
    fn n_layers(&self) -> usize;
    /// Width of the residual stream.
    fn d_model(&self) -> usize;
    /// Every hook point of this model, in the order the forward pass reaches them.
    fn hook_points(&self) -> Vec<HookPoint>;
    /// Values per token at `point`: `n_heads * head_dim` for `attn.hook_z` (whose tensor is
    /// `[batch, seq, n_heads, head_dim]`), else d_model.
    fn hook_width(&self, point: HookPoint) -> usize;
    fn device(&self) -> Device;
    /// The compute dtype.
    fn kind(&self) -> Kind;
    /// The unembedding matrix `[vocab, d]` (the embedding when tied).
    fn unembedding(&self) -> &Tensor;
    /// The final norm's gain `[d]`: what multiplies the normalized residual stream before the
    /// unembedding (the weight, or `1 + w` where the norm is stored as an offset, as Gemma's).
    fn final_norm_gain(&self) -> Tensor;
    /// The rows of the embedding: every token id must be below this.
    fn vocab_rows(&self) -> i64;
    /// Positions the model can see at once, when it has a hard limit (learned positions).
    fn max_positions(&self) -> Option<i64> {
        None
    }

    fn new_cache(&self) -> KvCache {
        KvCache { layers: (0..self.n_layers()).map(|_| None).collect(), seen: 0 }
    }

    /// Parses a TransformerLens hook name and checks that this model has that hook.
    fn parse_hook(&self, name: &str) -> Result<HookPoint, UnknownHook> {
        let hook = HookPoint::parse(name, self.n_layers())?;
        if !self.hook_points().contains(&hook) {
            return Err(UnknownHook { name: name.to_string(), last_block: self.n_layers().saturating_sub(1) });
        }
        Ok(hook)
    }

    /// Checks that `tokens` is a `[batch, seq]` integer tensor whose ids all index the embedding
    /// (and, with learned positions, that `start + seq` fits them). Ids come from tokenizers,
    /// datasets and users, none of which is bound to this model; a bad id would fail inside
    /// libtorch (a panic on CPU, a device-side assert that poisons the CUDA context on GPU).
    fn check_tokens(&self, tokens: &Tensor, start: i64) -> Result<(), TokenInputError> {
        let kind = tokens.kind();
        if tokens.dim() != 2 || !matches!(kind, Kind::Int64 | Kind::Int) {
            return Err(TokenInputError::BadTensor { shape: tokens.size(), kind });
        }
        if let Some(max) = self.max_positions() {
            let end = start + tokens.size()[1];
            if end > max {
                return Err(TokenInputError::TooLong { end, max });
            }
        }
        if tokens.numel() == 0 {
            return Ok(());
        }
        let vocab = self.vocab_rows();
        for id in [tokens.min().int64_value(&[]), tokens.max().int64_value(&[])] {
            if !(0..vocab).contains(&id) {
                return Err(TokenInputError::OutOfVocabulary { id, vocab });
            }
        }
        Ok(())
    }
}

/// Per-layer keys and values of the tokens seen so far, for incremental decoding.
pub struct KvCache {
    pub(crate) layers: Vec<LayerCache>,
    pub(crate) seen: i64,
}

impl KvCache {
    /// How many positions the cache holds.
    pub fn len(&self) -> i64 {
        self.seen
    }
    pub fn is_empty(&self) -> bool {
        self.seen == 0
    }
}

/// Token ids a forward pass refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenInputError {
    #[error("tokens must be a [batch, seq] tensor of integer ids, got shape {shape:?} of {kind:?}")]
    BadTensor { shape: Vec<i64>, kind: Kind },
    #[error("token id {id} is outside the model's vocabulary of {vocab} tokens (ids 0..{vocab})")]
    OutOfVocabulary { id: i64, vocab: i64 },
    #[error("the sequence reaches position {end}, past the model's {max} learned positions")]
    TooLong { end: i64, max: i64 },
}

/// What a forward pass returns.
pub struct ForwardOutput {
    /// `[batch, seq, vocab]` in f32, when logits were asked for.
    pub logits: Option<Tensor>,
    /// Captured hook tensors in the compute dtype, shaped as [`HookPoint`] documents.
    pub hooks: BTreeMap<HookPoint, Tensor>,
}
