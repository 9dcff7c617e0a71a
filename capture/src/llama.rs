//! A Llama-family decoder in libtorch: RMSNorm, rotary embeddings, grouped-query attention with a
//! causal mask and a KV cache, a SwiGLU MLP, and tied or separate unembedding.
//!
//! Weights use Hugging Face names (`model.layers.{i}.self_attn.q_proj.weight`, ...), with Q and K in
//! Hugging Face's rotary layout (halves, `rotate_half`); the GGUF loader undoes llama.cpp's
//! permutation before they get here.

use std::collections::{BTreeMap, HashMap};

use tch::{Device, Kind, Tensor};

use crate::config::LlamaConfig;
use crate::hooks::{HookPoint, Hooks};

/// One transformer block. Q, K and V share one matmul, and so do the MLP's gate and up
/// projections: fewer, larger GEMMs run faster than three or two small ones.
struct Block {
    input_norm: Tensor,   // [d]
    qkv_proj: Tensor,     // [(n_heads + 2 * n_kv_heads) * head_dim, d]: rows of q, then k, then v
    o_proj: Tensor,       // [d, n_heads * head_dim]
    post_norm: Tensor,    // [d]
    gate_up_proj: Tensor, // [2 * d_ff, d]: rows of gate, then up
    down_proj: Tensor,    // [d, d_ff]
}

/// Per-layer keys and values of the tokens seen so far, for incremental decoding.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>, // each [batch, n_kv_heads, seen, head_dim]
    seen: i64,
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

/// Token ids a forward pass refuses: looking them up in the embedding would fail inside
/// libtorch (a panic on CPU, a device-side assert that poisons the whole CUDA context on GPU).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenInputError {
    #[error("tokens must be a [batch, seq] tensor of integer ids, got shape {shape:?} of {kind:?}")]
    BadTensor { shape: Vec<i64>, kind: Kind },
    #[error("token id {id} is outside the model's vocabulary of {vocab} tokens (ids 0..{vocab})")]
    OutOfVocabulary { id: i64, vocab: i64 },
}

/// A checkpoint that lacks a weight the configuration needs, or holds one of the wrong shape.
/// The [`crate::Error`] that carries it names the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightError {
    #[error("weight {name} is missing from the checkpoint")]
    Missing { name: String },
    #[error("weight {name} has shape {shape:?}, expected {expected:?}")]
    WrongShape { name: String, shape: Vec<i64>, expected: Vec<i64> },
}

/// What a forward pass returns.
pub struct ForwardOutput {
    /// `[batch, seq, vocab]` in f32, when logits were asked for.
    pub logits: Option<Tensor>,
    /// Captured hook tensors, each `[batch, seq, d_model]` in the compute dtype.
    pub hooks: BTreeMap<HookPoint, Tensor>,
}

pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor, // [vocab, d]
    blocks: Vec<Block>,
    final_norm: Tensor,      // [d]
    lm_head: Option<Tensor>, // [vocab, d]; None when tied to `embed`
    inv_freq: Tensor,        // [head_dim / 2], f32
    device: Device,
    kind: Kind,
}

impl Llama {
    /// Builds the model from f32 CPU tensors named as in Hugging Face checkpoints, moving them to
    /// `device` in the compute dtype `kind`.
    pub fn from_weights(
        cfg: LlamaConfig,
        mut weights: HashMap<String, Tensor>,
        device: Device,
        kind: Kind,
    ) -> Result<Self, WeightError> {
        let d = cfg.d_model() as i64;
        let hd = cfg.head_dim() as i64;
        let q_rows = cfg.num_attention_heads as i64 * hd;
        let kv_rows = cfg.n_kv_heads() as i64 * hd;
        let ff = cfg.intermediate_size as i64;
        let vocab = cfg.vocab_size as i64;
        let mut take = |name: &str, shape: &[i64]| -> Result<Tensor, WeightError> {
            let t = weights.remove(name).ok_or_else(|| WeightError::Missing { name: name.into() })?;
            if t.size() != shape {
                return Err(WeightError::WrongShape { name: name.into(), shape: t.size(), expected: shape.to_vec() });
            }
            Ok(t.to_kind(kind).to_device(device))
        };
        let embed = take("model.embed_tokens.weight", &[vocab, d])?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let q = take(&format!("{p}.self_attn.q_proj.weight"), &[q_rows, d])?;
                let k = take(&format!("{p}.self_attn.k_proj.weight"), &[kv_rows, d])?;
                let v = take(&format!("{p}.self_attn.v_proj.weight"), &[kv_rows, d])?;
                let gate = take(&format!("{p}.mlp.gate_proj.weight"), &[ff, d])?;
                let up = take(&format!("{p}.mlp.up_proj.weight"), &[ff, d])?;
                Ok(Block {
                    input_norm: take(&format!("{p}.input_layernorm.weight"), &[d])?,
                    qkv_proj: Tensor::cat(&[q, k, v], 0),
                    o_proj: take(&format!("{p}.self_attn.o_proj.weight"), &[d, q_rows])?,
                    post_norm: take(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                    gate_up_proj: Tensor::cat(&[gate, up], 0),
                    down_proj: take(&format!("{p}.mlp.down_proj.weight"), &[d, ff])?,
                })
            })
            .collect::<Result<Vec<_>, WeightError>>()?;
        let final_norm = take("model.norm.weight", &[d])?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(take("lm_head.weight", &[vocab, d])?) };
        // Hugging Face's default rotary init, computed in f32 as it does:
        // inv_freq[j] = 1 / theta^(2j / head_dim).
        let exponents =
            Tensor::arange_start_step(0, hd, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / hd as f64;
        let inv_freq = (Tensor::from(cfg.rope_theta as f32).pow(&exponents)).reciprocal().to_device(device);
        Ok(Llama { cfg, embed, blocks, final_norm, lm_head, inv_freq, device, kind })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The unembedding matrix `[vocab, d]` (the embedding when tied).
    pub fn unembedding(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The final RMSNorm's weight `[d]` (what scales the residual stream before the unembedding).
    pub fn final_norm_weight(&self) -> &Tensor {
        &self.final_norm
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: (0..self.blocks.len()).map(|_| None).collect(), seen: 0 }
    }

    /// The rows of the embedding: every token id must be below this.
    pub fn vocab_rows(&self) -> i64 {
        self.embed.size()[0]
    }

    /// Checks that `tokens` is a `[batch, seq]` integer tensor whose ids all index the embedding.
    /// Ids come from tokenizers, datasets and users, none of which is bound to this model.
    pub fn check_tokens(&self, tokens: &Tensor) -> Result<(), TokenInputError> {
        let kind = tokens.kind();
        if tokens.dim() != 2 || !matches!(kind, Kind::Int64 | Kind::Int) {
            return Err(TokenInputError::BadTensor { shape: tokens.size(), kind });
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

    /// Runs the model on `tokens` `[batch, seq]` (i64), after [`Llama::check_tokens`].
    ///
    /// With a cache, `tokens` continue the sequence it holds, and the cache is extended.
    /// Without logits, the pass stops after the deepest hook that `hooks` reads or changes
    /// (early exit); with a cache, early exit is off so that every layer's cache stays whole.
    // `x = x + y` makes a new tensor where `x += y` would add in place: hooks keep the residual
    // tensors they were given, which must not change afterwards.
    #[allow(clippy::assign_op_pattern)]
    pub fn forward(
        &self,
        tokens: &Tensor,
        cache: Option<&mut KvCache>,
        hooks: &mut Hooks,
        want_logits: bool,
    ) -> Result<ForwardOutput, TokenInputError> {
        self.check_tokens(tokens)?;
        let _guard = tch::no_grad_guard();
        let n_layers = self.blocks.len();
        let seq = tokens.size()[1];
        let start = cache.as_ref().map_or(0, |c| c.seen);
        let blocks_to_run =
            if want_logits || cache.is_some() { n_layers } else { hooks.deepest(n_layers).unwrap_or(0) };

        let positions = Tensor::arange_start(start, start + seq, (Kind::Float, self.device));
        let freqs = positions.unsqueeze(1) * self.inv_freq.unsqueeze(0); // [seq, head_dim/2]
        let freqs = Tensor::cat(&[&freqs, &freqs], -1); // [seq, head_dim]
        let (cos, sin) = (freqs.cos().to_kind(self.kind), freqs.sin().to_kind(self.kind));

        let mut x = Tensor::embedding(&self.embed, &tokens.to_device(self.device), -1, false, false); // [batch, seq, d]
        x = hooks.apply(HookPoint::Embed, x);

        let mut cache = cache;
        for (i, block) in self.blocks.iter().take(blocks_to_run).enumerate() {
            if hooks.wants(HookPoint::ResidPre(i)) {
                x = hooks.apply(HookPoint::ResidPre(i), x);
            }
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            let attn = self.attention(block, &self.rms_norm(&x, &block.input_norm), &cos, &sin, start, layer_cache);
            let attn = hooks.apply(HookPoint::AttnOut(i), attn);
            x = x + attn;
            let h = self.rms_norm(&x, &block.post_norm);
            let gate_up = h.linear::<Tensor>(&block.gate_up_proj, None).chunk(2, -1); // 2 × [batch, seq, d_ff]
            let mlp = (gate_up[0].silu() * &gate_up[1]).linear::<Tensor>(&block.down_proj, None);
            let mlp = hooks.apply(HookPoint::MlpOut(i), mlp);
            x = x + mlp;
            x = hooks.apply(HookPoint::ResidPost(i), x);
        }
        if let Some(c) = cache {
            c.seen += seq;
        }

        let mut logits = None;
        if blocks_to_run == n_layers && (want_logits || hooks.wants(HookPoint::LnFinal)) {
            let normed = hooks.apply(HookPoint::LnFinal, self.rms_norm(&x, &self.final_norm));
            if want_logits {
                logits = Some(normed.linear::<Tensor>(self.unembedding(), None).to_kind(Kind::Float));
                // [batch, seq, vocab]
            }
        }
        Ok(ForwardOutput { logits, hooks: hooks.take_captured() })
    }

    /// RMSNorm in f32, cast back to the compute dtype before the weight, as Hugging Face does.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Tensor {
        let x32 = x.to_kind(Kind::Float);
        let variance = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = x32 * (variance + self.cfg.rms_norm_eps).rsqrt();
        normed.to_kind(self.kind) * weight
    }

    /// Grouped-query self-attention; `x` is `[batch, seq, d]`.
    fn attention(
        &self,
        block: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        start: i64,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("[batch, seq, d]");
        let (h, kvh, hd) =
            (self.cfg.num_attention_heads as i64, self.cfg.n_kv_heads() as i64, self.cfg.head_dim() as i64);
        let qkv = x.linear::<Tensor>(&block.qkv_proj, None).split_with_sizes([h * hd, kvh * hd, kvh * hd], -1);
        let heads = |y: &Tensor, n: i64| y.reshape([b, t, n, hd]).transpose(1, 2); // [b, n, t, hd]
        let q = rotate(&heads(&qkv[0], h), cos, sin);
        let mut k = rotate(&heads(&qkv[1], kvh), cos, sin);
        let mut v = heads(&qkv[2], kvh);
        if let Some(slot) = cache {
            if let Some((k_past, v_past)) = slot.take() {
                k = Tensor::cat(&[k_past, k], 2);
                v = Tensor::cat(&[v_past, v], 2);
            }
            *slot = Some((k.shallow_clone(), v.shallow_clone()));
        }
        // Each K/V head serves h / kvh query heads; SDPA's enable_gqa broadcasts them without copies.
        let gqa = h != kvh;
        let total = k.size()[2];
        let out = if start == 0 {
            Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, gqa)
        } else if t == 1 {
            // One new token attends to everything cached: no mask needed.
            Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, false, None, gqa)
        } else {
            // Several new tokens after a cache: query i (absolute start + i) sees keys 0..=start+i.
            let qpos = Tensor::arange_start(start, start + t, (Kind::Int64, self.device)).unsqueeze(1);
            let kpos = Tensor::arange(total, (Kind::Int64, self.device)).unsqueeze(0);
            let mask = kpos.le_tensor(&qpos); // [t, total], true = may attend
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(mask), 0.0, false, None, gqa)
        }; // [b, h, t, hd]
        out.transpose(1, 2).contiguous().view([b, t, h * hd]).linear::<Tensor>(&block.o_proj, None)
    }
}

/// Rotary embedding in Hugging Face's layout: `x * cos + rotate_half(x) * sin`, where
/// `rotate_half([x1, x2]) = [-x2, x1]` over the two halves of the head dimension.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[x2.neg(), x1], 3);
    x * cos + rotated * sin
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-block model of 8 tokens, 4 dimensions and 2 heads, with random weights.
    fn tiny_model() -> Llama {
        let cfg = LlamaConfig {
            vocab_size: 8,
            hidden_size: 4,
            intermediate_size: 6,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: Some(1),
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
            max_position_embeddings: 16,
            tie_word_embeddings: true,
        };
        let opts = (Kind::Float, Device::Cpu);
        let p = "model.layers.0";
        let weights: HashMap<String, Tensor> = [
            ("model.embed_tokens.weight".to_string(), vec![8, 4]),
            (format!("{p}.self_attn.q_proj.weight"), vec![4, 4]),
            (format!("{p}.self_attn.k_proj.weight"), vec![2, 4]),
            (format!("{p}.self_attn.v_proj.weight"), vec![2, 4]),
            (format!("{p}.self_attn.o_proj.weight"), vec![4, 4]),
            (format!("{p}.mlp.gate_proj.weight"), vec![6, 4]),
            (format!("{p}.mlp.up_proj.weight"), vec![6, 4]),
            (format!("{p}.mlp.down_proj.weight"), vec![4, 6]),
            (format!("{p}.input_layernorm.weight"), vec![4]),
            (format!("{p}.post_attention_layernorm.weight"), vec![4]),
            ("model.norm.weight".to_string(), vec![4]),
        ]
        .into_iter()
        .map(|(name, shape)| (name, Tensor::randn(shape.as_slice(), opts)))
        .collect();
        Llama::from_weights(cfg, weights, Device::Cpu, Kind::Float).unwrap()
    }

    fn ids(ids: &[i64]) -> Tensor {
        Tensor::from_slice(ids).unsqueeze(0)
    }

    #[test]
    fn token_ids_outside_the_vocabulary_are_refused_before_the_embedding() {
        let model = tiny_model();
        let out = model.forward(&ids(&[0, 7, 3]), None, &mut Hooks::new(), true).unwrap();
        assert_eq!(out.logits.unwrap().size(), [1, 3, 8]);
        for bad in [8, 1 << 40, -1] {
            let err = model.forward(&ids(&[1, bad]), None, &mut Hooks::new(), true).err().unwrap();
            assert_eq!(err, TokenInputError::OutOfVocabulary { id: bad, vocab: 8 });
            assert!(err.to_string().contains(&bad.to_string()) && err.to_string().contains("vocabulary of 8"), "{err}");
        }
    }

    #[test]
    fn tokens_that_are_not_a_batch_of_integer_ids_are_refused() {
        let model = tiny_model();
        let flat = Tensor::from_slice(&[1i64, 2]);
        let err = model.forward(&flat, None, &mut Hooks::new(), false).err().unwrap();
        assert!(matches!(err, TokenInputError::BadTensor { ref shape, .. } if shape == &[2]), "{err}");
        let floats = Tensor::from_slice(&[1.0f32, 2.0]).unsqueeze(0);
        assert!(matches!(
            model.forward(&floats, None, &mut Hooks::new(), false),
            Err(TokenInputError::BadTensor { .. })
        ));
    }
}
