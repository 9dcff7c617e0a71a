//! A Llama-family decoder in libtorch (Llama, Mistral, Qwen 2): RMSNorm, rotary embeddings
//! (optionally with Llama 3's scaling), grouped-query attention with a causal mask (optionally a
//! sliding window) and a KV cache, optional Q/K/V/O biases, a SwiGLU MLP, and tied or separate
//! unembedding.
//!
//! Weights use Hugging Face names (`model.layers.{i}.self_attn.q_proj.weight`, ...), with Q and K in
//! Hugging Face's rotary layout (halves, `rotate_half`); the GGUF loader undoes llama.cpp's
//! permutation before they get here.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::attention::{causal_attention, extend_cache, LayerCache};
use crate::config::LlamaConfig;
use crate::decoder::{Decoder, KvCache};
use crate::hooks::{HookPoint, Hooks};
use crate::norm::rms_norm;
use crate::rope::{apply_rotary, Rotary};
use crate::weights::{WeightError, Weights};

/// One transformer block. Q, K and V share one matmul, and so do the MLP's gate and up
/// projections: fewer, larger GEMMs run faster than three or two small ones.
struct Block {
    input_norm: Tensor,       // [d]
    qkv_proj: Tensor,         // [(n_heads + 2 * n_kv_heads) * head_dim, d]: rows of q, then k, then v
    qkv_bias: Option<Tensor>, // [(n_heads + 2 * n_kv_heads) * head_dim]
    o_proj: Tensor,           // [d, n_heads * head_dim]
    o_bias: Option<Tensor>,   // [d]
    post_norm: Tensor,        // [d]
    gate_up_proj: Tensor,     // [2 * d_ff, d]: rows of gate, then up
    down_proj: Tensor,        // [d, d_ff]
    window: Option<usize>,    // sliding attention window, in tokens
}

pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor, // [vocab, d]
    blocks: Vec<Block>,
    final_norm: Tensor,      // [d]
    lm_head: Option<Tensor>, // [vocab, d]; None when tied to `embed`
    rotary: Rotary,
    device: Device,
    kind: Kind,
}

impl Llama {
    /// Builds the model from CPU tensors named as in Hugging Face checkpoints (any float dtype),
    /// converting each to the compute dtype `kind` on `device` one at a time.
    pub fn from_weights(
        cfg: LlamaConfig,
        weights: HashMap<String, Tensor>,
        device: Device,
        kind: Kind,
    ) -> Result<Self, WeightError> {
        let d = cfg.d_model() as i64;
        let hd = cfg.head_dim() as i64;
        let q_rows = cfg.num_attention_heads as i64 * hd;
        let kv_rows = cfg.n_kv_heads() as i64 * hd;
        let ff = cfg.intermediate_size as i64;
        let vocab = cfg.vocab_size as i64;
        let mut w = Weights::new(weights, device, kind);
        let embed = w.take("model.embed_tokens.weight", &[vocab, d])?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let attn = format!("{p}.self_attn");
                let q = w.take(&format!("{attn}.q_proj.weight"), &[q_rows, d])?;
                let k = w.take(&format!("{attn}.k_proj.weight"), &[kv_rows, d])?;
                let v = w.take(&format!("{attn}.v_proj.weight"), &[kv_rows, d])?;
                let qkv_bias = if cfg.variant.qkv_bias {
                    let q = w.take(&format!("{attn}.q_proj.bias"), &[q_rows])?;
                    let k = w.take(&format!("{attn}.k_proj.bias"), &[kv_rows])?;
                    let v = w.take(&format!("{attn}.v_proj.bias"), &[kv_rows])?;
                    Some(Tensor::cat(&[q, k, v], 0))
                } else {
                    None
                };
                let o_bias =
                    if cfg.variant.o_bias { Some(w.take(&format!("{attn}.o_proj.bias"), &[d])?) } else { None };
                let gate = w.take(&format!("{p}.mlp.gate_proj.weight"), &[ff, d])?;
                let up = w.take(&format!("{p}.mlp.up_proj.weight"), &[ff, d])?;
                Ok(Block {
                    input_norm: w.take(&format!("{p}.input_layernorm.weight"), &[d])?,
                    qkv_proj: Tensor::cat(&[q, k, v], 0),
                    qkv_bias,
                    o_proj: w.take(&format!("{attn}.o_proj.weight"), &[d, q_rows])?,
                    o_bias,
                    post_norm: w.take(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                    gate_up_proj: Tensor::cat(&[gate, up], 0),
                    down_proj: w.take(&format!("{p}.mlp.down_proj.weight"), &[d, ff])?,
                    window: cfg.sliding_window(i),
                })
            })
            .collect::<Result<Vec<_>, WeightError>>()?;
        let final_norm = w.take("model.norm.weight", &[d])?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(w.take("lm_head.weight", &[vocab, d])?) };
        let rotary = Rotary::new(hd, cfg.rope_theta, cfg.variant.rope_scaling.as_ref(), device);
        Ok(Llama { cfg, embed, blocks, final_norm, lm_head, rotary, device, kind })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Grouped-query self-attention of `x` `[batch, seq, d]` up to the heads' outputs
    /// (TransformerLens's `z`), `[batch, seq, n_heads, head_dim]`, before the output projection.
    fn attention_z(
        &self,
        block: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        start: i64,
        cache: Option<&mut LayerCache>,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("[batch, seq, d]");
        let (h, kvh, hd) =
            (self.cfg.num_attention_heads as i64, self.cfg.n_kv_heads() as i64, self.cfg.head_dim() as i64);
        let qkv = x.linear(&block.qkv_proj, block.qkv_bias.as_ref()).split_with_sizes([h * hd, kvh * hd, kvh * hd], -1);
        let heads = |y: &Tensor, n: i64| y.reshape([b, t, n, hd]).transpose(1, 2); // [b, n, t, hd]
        let q = apply_rotary(&heads(&qkv[0], h), cos, sin);
        let k = apply_rotary(&heads(&qkv[1], kvh), cos, sin);
        let (k, v) = extend_cache(cache, k, heads(&qkv[2], kvh));
        let out = causal_attention(&q, &k, &v, start, block.window, None); // [b, h, t, hd]
        out.transpose(1, 2).contiguous() // [b, t, h, hd]
    }
}

impl Decoder for Llama {
    fn n_layers(&self) -> usize {
        self.blocks.len()
    }
    fn d_model(&self) -> usize {
        self.cfg.d_model()
    }
    fn hook_points(&self) -> Vec<HookPoint> {
        HookPoint::all(self.blocks.len())
    }
    fn hook_width(&self, point: HookPoint) -> usize {
        match point {
            HookPoint::AttnZ(_) => self.cfg.num_attention_heads * self.cfg.head_dim(),
            _ => self.cfg.d_model(),
        }
    }
    fn device(&self) -> Device {
        self.device
    }
    fn kind(&self) -> Kind {
        self.kind
    }
    fn unembedding(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
    fn final_norm_gain(&self) -> Tensor {
        self.final_norm.shallow_clone()
    }
    fn vocab_rows(&self) -> i64 {
        self.embed.size()[0]
    }

    // `x = x + y` makes a new tensor where `x += y` would add in place: hooks keep the residual
    // tensors they were given, which must not change afterwards.
    #[allow(clippy::assign_op_pattern)]
    fn run_blocks(
        &self,
        tokens: &Tensor,
        start: i64,
        blocks: usize,
        cache: Option<&mut KvCache>,
        hooks: &mut Hooks,
    ) -> Tensor {
        let seq = tokens.size()[1];
        let (cos, sin) = self.rotary.cos_sin(start, seq, self.kind); // [seq, head_dim]
        let eps = self.cfg.rms_norm_eps;

        let mut x = Tensor::embedding(&self.embed, &tokens.to_device(self.device), -1, false, false); // [batch, seq, d]
        x = hooks.apply(HookPoint::Embed, x);

        let mut cache = cache;
        for (i, block) in self.blocks.iter().take(blocks).enumerate() {
            if hooks.wants(HookPoint::ResidPre(i)) {
                x = hooks.apply(HookPoint::ResidPre(i), x);
            }
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            let z = self.attention_z(block, &rms_norm(&x, &block.input_norm, eps), &cos, &sin, start, layer_cache);
            let z = hooks.apply(HookPoint::AttnZ(i), z); // [batch, seq, n_heads, head_dim]
            let attn = z.flatten(2, 3).linear(&block.o_proj, block.o_bias.as_ref()); // [batch, seq, d]
            let attn = hooks.apply(HookPoint::AttnOut(i), attn);
            x = x + attn;
            if hooks.wants(HookPoint::ResidMid(i)) {
                x = hooks.apply(HookPoint::ResidMid(i), x);
            }
            let h = rms_norm(&x, &block.post_norm, eps);
            let gate_up = h.linear::<Tensor>(&block.gate_up_proj, None).chunk(2, -1); // 2 × [batch, seq, d_ff]
            let mlp = (gate_up[0].silu() * &gate_up[1]).linear::<Tensor>(&block.down_proj, None);
            let mlp = hooks.apply(HookPoint::MlpOut(i), mlp);
            x = x + mlp;
            x = hooks.apply(HookPoint::ResidPost(i), x);
        }
        x
    }

    fn final_norm(&self, x: &Tensor) -> Tensor {
        rms_norm(x, &self.final_norm, self.cfg.rms_norm_eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::TokenInputError;

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
            head_dim: None,
            variant: Default::default(),
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
