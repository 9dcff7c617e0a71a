//! GPT-2 in libtorch: learned position embeddings, pre-LayerNorm blocks, multi-head attention
//! with biases, a GELU (tanh) MLP, and an unembedding tied to the token embedding.
//!
//! Checkpoints store the projections as `Conv1D` weights, `[in, out]`; they are transposed to
//! `[out, in]` at load so that every projection is a plain `linear`. Names are transformers'
//! (`transformer.h.{i}.attn.c_attn.weight`, ...), with or without the `transformer.` prefix.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::activation::gelu_approximation;
use crate::architecture::unsupported_field;
use crate::attention::{causal_attention, extend_cache, LayerCache};
use crate::config::ConfigError;
use crate::decoder::{Decoder, KvCache};
use crate::error::{Error, Result};
use crate::hooks::{HookPoint, Hooks};
use crate::norm::LayerNorm;
use crate::weights::{WeightError, Weights};

/// `GPT2Config` fields that shape the computation; defaults are transformers' (save_pretrained
/// leaves fields at their defaults out of config.json).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Gpt2Config {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::n_positions")]
    pub n_positions: usize,
    /// d_model.
    #[serde(default = "defaults::n_embd")]
    pub n_embd: usize,
    #[serde(default = "defaults::n_layer")]
    pub n_layer: usize,
    #[serde(default = "defaults::n_head")]
    pub n_head: usize,
    /// MLP width; `None` means 4 × n_embd.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "defaults::layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "defaults::activation_function")]
    pub activation_function: String,
    #[serde(default = "defaults::yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "defaults::yes")]
    pub tie_word_embeddings: bool,
}

mod defaults {
    pub fn vocab_size() -> usize {
        50257
    }
    pub fn n_positions() -> usize {
        1024
    }
    pub fn n_embd() -> usize {
        768
    }
    pub fn n_layer() -> usize {
        12
    }
    pub fn n_head() -> usize {
        12
    }
    pub fn layer_norm_epsilon() -> f64 {
        1e-5
    }
    pub fn activation_function() -> String {
        "gelu_new".into()
    }
    pub fn yes() -> bool {
        true
    }
}

impl Gpt2Config {
    /// Reads a GPT-2 `config.json`, refusing settings we do not compute.
    pub fn from_config(config: &serde_json::Value, path: &Path) -> Result<Self> {
        let cfg: Gpt2Config = serde_json::from_value(config.clone()).map_err(|source| Error::NotFamilyConfig {
            path: path.to_path_buf(),
            family: "GPT-2",
            source,
        })?;
        if cfg.gelu_approximation().is_none() {
            return Err(Error::UnsupportedActivation {
                path: path.to_path_buf(),
                field: "activation_function",
                name: cfg.activation_function.clone(),
                supported: "gelu_new, gelu_pytorch_tanh and gelu",
            });
        }
        if !cfg.scale_attn_weights {
            let why = "unscaled attention is not implemented";
            return Err(unsupported_field(path, "scale_attn_weights", &false.into(), why));
        }
        if cfg.scale_attn_by_inverse_layer_idx {
            let why = "scaling attention by the layer index is not implemented";
            return Err(unsupported_field(path, "scale_attn_by_inverse_layer_idx", &true.into(), why));
        }
        if cfg.n_head == 0 || !cfg.n_embd.is_multiple_of(cfg.n_head) {
            let source = ConfigError::EmbdDoNotDivide { n_embd: cfg.n_embd, n_head: cfg.n_head };
            return Err(Error::InvalidModelConfig { path: path.to_path_buf(), source });
        }
        Ok(cfg)
    }

    /// libtorch's `gelu` approximation for `activation_function`.
    fn gelu_approximation(&self) -> Option<&'static str> {
        gelu_approximation(&self.activation_function)
    }

    fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}

struct Block {
    ln_1: LayerNorm,
    qkv_proj: Tensor, // [3 * d, d]: rows of q, then k, then v
    qkv_bias: Tensor, // [3 * d]
    o_proj: Tensor,   // [d, d]
    o_bias: Tensor,   // [d]
    ln_2: LayerNorm,
    fc: Tensor,        // [d_ff, d]
    fc_bias: Tensor,   // [d_ff]
    proj: Tensor,      // [d, d_ff]
    proj_bias: Tensor, // [d]
}

pub struct Gpt2 {
    cfg: Gpt2Config,
    wte: Tensor, // [vocab, d]
    wpe: Tensor, // [n_positions, d]
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Option<Tensor>, // [vocab, d]; None when tied to `wte`
    gelu: &'static str,
    device: Device,
    kind: Kind,
}

impl Gpt2 {
    /// Builds the model from CPU tensors named as in transformers' checkpoints (any float
    /// dtype), converting each to `kind` on `device` as it is taken.
    pub fn from_weights(
        cfg: Gpt2Config,
        weights: HashMap<String, Tensor>,
        device: Device,
        kind: Kind,
    ) -> Result<Self, WeightError> {
        let weights = weights
            .into_iter()
            .map(|(name, t)| (name.strip_prefix("transformer.").map(str::to_owned).unwrap_or(name), t))
            .collect();
        let mut w = Weights::new(weights, device, kind);
        let (d, vocab) = (cfg.n_embd as i64, cfg.vocab_size as i64);
        let ff = cfg.n_inner.unwrap_or(4 * cfg.n_embd) as i64;
        let eps = cfg.layer_norm_epsilon;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("h.{i}");
            blocks.push(Block {
                ln_1: w.take_layer_norm(&format!("{p}.ln_1"), d, eps)?,
                qkv_proj: w.take_conv1d(&format!("{p}.attn.c_attn.weight"), d, 3 * d)?,
                qkv_bias: w.take(&format!("{p}.attn.c_attn.bias"), &[3 * d])?,
                o_proj: w.take_conv1d(&format!("{p}.attn.c_proj.weight"), d, d)?,
                o_bias: w.take(&format!("{p}.attn.c_proj.bias"), &[d])?,
                ln_2: w.take_layer_norm(&format!("{p}.ln_2"), d, eps)?,
                fc: w.take_conv1d(&format!("{p}.mlp.c_fc.weight"), d, ff)?,
                fc_bias: w.take(&format!("{p}.mlp.c_fc.bias"), &[ff])?,
                proj: w.take_conv1d(&format!("{p}.mlp.c_proj.weight"), ff, d)?,
                proj_bias: w.take(&format!("{p}.mlp.c_proj.bias"), &[d])?,
            });
        }
        let wte = w.take("wte.weight", &[vocab, d])?;
        let wpe = w.take("wpe.weight", &[cfg.n_positions as i64, d])?;
        let ln_f = w.take_layer_norm("ln_f", d, eps)?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(w.take("lm_head.weight", &[vocab, d])?) };
        let gelu = cfg.gelu_approximation().expect("checked by Gpt2Config::from_config");
        Ok(Gpt2 { cfg, wte, wpe, blocks, ln_f, lm_head, gelu, device, kind })
    }

    /// Multi-head self-attention of `x` `[batch, seq, d]` up to the heads' outputs `z`,
    /// `[batch, seq, n_heads, head_dim]`.
    fn attention_z(&self, block: &Block, x: &Tensor, start: i64, cache: Option<&mut LayerCache>) -> Tensor {
        let (b, t, d) = x.size3().expect("[batch, seq, d]");
        let (h, hd) = (self.cfg.n_head as i64, self.cfg.head_dim() as i64);
        let qkv = x.linear(&block.qkv_proj, Some(&block.qkv_bias)).split(d, -1); // 3 × [b, t, d]
        let heads = |y: &Tensor| y.reshape([b, t, h, hd]).transpose(1, 2); // [b, h, t, hd]
        let (k, v) = extend_cache(cache, heads(&qkv[1]), heads(&qkv[2]));
        causal_attention(&heads(&qkv[0]), &k, &v, start, None, None).transpose(1, 2).contiguous()
    }
}

impl Decoder for Gpt2 {
    fn n_layers(&self) -> usize {
        self.blocks.len()
    }
    fn d_model(&self) -> usize {
        self.cfg.n_embd
    }
    /// TransformerLens's GPT-2 hooks: the Llama set plus `hook_pos_embed`.
    fn hook_points(&self) -> Vec<HookPoint> {
        let mut hooks = HookPoint::all(self.blocks.len());
        hooks.insert(1, HookPoint::PosEmbed);
        hooks
    }
    fn hook_width(&self, _point: HookPoint) -> usize {
        self.cfg.n_embd // n_heads * head_dim = d_model for attn.hook_z too
    }
    fn device(&self) -> Device {
        self.device
    }
    fn kind(&self) -> Kind {
        self.kind
    }
    fn unembedding(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }
    fn final_norm_gain(&self) -> Tensor {
        self.ln_f.weight.shallow_clone()
    }
    fn vocab_rows(&self) -> i64 {
        self.wte.size()[0]
    }
    fn max_positions(&self) -> Option<i64> {
        Some(self.wpe.size()[0])
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
        let (batch, seq) = (tokens.size()[0], tokens.size()[1]);

        let embed = Tensor::embedding(&self.wte, &tokens.to_device(self.device), -1, false, false); // [b, t, d]
        let embed = hooks.apply(HookPoint::Embed, embed);
        let d = embed.size()[2];
        let pos = self.wpe.narrow(0, start, seq).unsqueeze(0).expand([batch, seq, d], false); // [b, t, d]
        let pos = hooks.apply(HookPoint::PosEmbed, pos);
        let mut x = embed + pos;

        let mut cache = cache;
        for (i, block) in self.blocks.iter().take(blocks).enumerate() {
            if hooks.wants(HookPoint::ResidPre(i)) {
                x = hooks.apply(HookPoint::ResidPre(i), x);
            }
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            let z =
                hooks.apply(HookPoint::AttnZ(i), self.attention_z(block, &block.ln_1.forward(&x), start, layer_cache));
            let attn = z.flatten(2, 3).linear(&block.o_proj, Some(&block.o_bias)); // [b, t, d]
            x = x + hooks.apply(HookPoint::AttnOut(i), attn);
            if hooks.wants(HookPoint::ResidMid(i)) {
                x = hooks.apply(HookPoint::ResidMid(i), x);
            }
            let h = block.ln_2.forward(&x).linear(&block.fc, Some(&block.fc_bias)).gelu(self.gelu); // [b, t, d_ff]
            let mlp = h.linear(&block.proj, Some(&block.proj_bias));
            x = x + hooks.apply(HookPoint::MlpOut(i), mlp);
            x = hooks.apply(HookPoint::ResidPost(i), x);
        }
        x
    }

    fn final_norm(&self, x: &Tensor) -> Tensor {
        self.ln_f.forward(x)
    }
}
