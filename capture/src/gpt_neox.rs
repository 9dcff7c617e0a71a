//! GPT-NeoX (Pythia) in libtorch: LayerNorms, attention and MLP side by side on the same input
//! (`use_parallel_residual`, or one after the other without it), rotary embeddings on the first
//! `rotary_pct` of each head, Q/K/V fused in one projection whose rows are grouped by head
//! (`[q_h, k_h, v_h]` for each head h), GELU, and an unembedding of its own (`embed_out`).

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
use crate::rope::{apply_rotary, RopeScaling, Rotary};
use crate::weights::{WeightError, Weights};

/// `GPTNeoXConfig` fields that shape the computation; defaults are transformers'.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GptNeoXConfig {
    pub vocab_size: usize,
    /// d_model.
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// The share of each head's dimensions that is rotated.
    #[serde(default = "defaults::rotary_pct")]
    pub rotary_pct: f64,
    /// The rotary base (transformers reads it into `rope_theta`).
    #[serde(default = "defaults::rotary_emb_base")]
    pub rotary_emb_base: f64,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::yes")]
    pub use_parallel_residual: bool,
    #[serde(default = "defaults::yes")]
    pub attention_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(skip)]
    pub rope_scaling: Option<RopeScaling>,
}

mod defaults {
    pub fn rotary_pct() -> f64 {
        0.25
    }
    pub fn rotary_emb_base() -> f64 {
        10_000.0
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
    pub fn hidden_act() -> String {
        "gelu".into()
    }
    pub fn yes() -> bool {
        true
    }
}

impl GptNeoXConfig {
    /// Reads a GPT-NeoX `config.json`, refusing settings we do not compute.
    pub fn from_config(config: &serde_json::Value, path: &Path) -> Result<Self> {
        let mut cfg: GptNeoXConfig = serde_json::from_value(config.clone())
            .map_err(|source| Error::NotFamilyConfig { path: path.to_path_buf(), family: "GPT-NeoX", source })?;
        if gelu_approximation(&cfg.hidden_act).is_none() {
            return Err(Error::UnsupportedActivation {
                path: path.to_path_buf(),
                field: "hidden_act",
                name: cfg.hidden_act.clone(),
                supported: "gelu, gelu_new and gelu_pytorch_tanh",
            });
        }
        if let Some(value) = config.get("rope_scaling").filter(|v| !v.is_null()) {
            cfg.rope_scaling = RopeScaling::from_config(value, path)?;
        }
        let (hidden_size, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        if heads == 0 || !hidden_size.is_multiple_of(heads) {
            let source = ConfigError::HeadsDoNotDivide { hidden_size, heads };
            return Err(Error::InvalidModelConfig { path: path.to_path_buf(), source });
        }
        if cfg.rotary_dim() == 0 || !cfg.rotary_dim().is_multiple_of(2) {
            let why = "the rotated part of each head must have an even, positive width";
            return Err(unsupported_field(path, "rotary_pct", &cfg.rotary_pct.into(), why));
        }
        Ok(cfg)
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// `int(head_dim * rotary_pct)`, as transformers truncates it.
    fn rotary_dim(&self) -> usize {
        (self.head_dim() as f64 * self.rotary_pct) as usize
    }
}

struct Block {
    input_norm: LayerNorm,
    qkv_proj: Tensor,         // [3 * d, d]: for each head, its q, k and v rows
    qkv_bias: Option<Tensor>, // [3 * d]
    o_proj: Tensor,           // [d, d]
    o_bias: Option<Tensor>,   // [d]
    post_norm: LayerNorm,
    up: Tensor,        // [d_ff, d]
    up_bias: Tensor,   // [d_ff]
    down: Tensor,      // [d, d_ff]
    down_bias: Tensor, // [d]
}

pub struct GptNeoX {
    cfg: GptNeoXConfig,
    embed: Tensor, // [vocab, d]
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    unembed: Tensor, // [vocab, d]
    rotary: Rotary,
    gelu: &'static str,
    device: Device,
    kind: Kind,
}

impl GptNeoX {
    /// Builds the model from CPU tensors named as in transformers' checkpoints (any float
    /// dtype), converting each to `kind` on `device` as it is taken.
    pub fn from_weights(
        cfg: GptNeoXConfig,
        weights: HashMap<String, Tensor>,
        device: Device,
        kind: Kind,
    ) -> Result<Self, WeightError> {
        let mut w = Weights::new(weights, device, kind);
        let (d, vocab, ff) = (cfg.hidden_size as i64, cfg.vocab_size as i64, cfg.intermediate_size as i64);
        let eps = cfg.layer_norm_eps;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("gpt_neox.layers.{i}");
            let bias = cfg.attention_bias;
            blocks.push(Block {
                input_norm: w.take_layer_norm(&format!("{p}.input_layernorm"), d, eps)?,
                qkv_proj: w.take(&format!("{p}.attention.query_key_value.weight"), &[3 * d, d])?,
                qkv_bias: bias.then(|| w.take(&format!("{p}.attention.query_key_value.bias"), &[3 * d])).transpose()?,
                o_proj: w.take(&format!("{p}.attention.dense.weight"), &[d, d])?,
                o_bias: bias.then(|| w.take(&format!("{p}.attention.dense.bias"), &[d])).transpose()?,
                post_norm: w.take_layer_norm(&format!("{p}.post_attention_layernorm"), d, eps)?,
                up: w.take(&format!("{p}.mlp.dense_h_to_4h.weight"), &[ff, d])?,
                up_bias: w.take(&format!("{p}.mlp.dense_h_to_4h.bias"), &[ff])?,
                down: w.take(&format!("{p}.mlp.dense_4h_to_h.weight"), &[d, ff])?,
                down_bias: w.take(&format!("{p}.mlp.dense_4h_to_h.bias"), &[d])?,
            });
        }
        let embed = w.take("gpt_neox.embed_in.weight", &[vocab, d])?;
        let final_norm = w.take_layer_norm("gpt_neox.final_layer_norm", d, eps)?;
        let unembed =
            if cfg.tie_word_embeddings { embed.shallow_clone() } else { w.take("embed_out.weight", &[vocab, d])? };
        let rotary = Rotary::new(cfg.rotary_dim() as i64, cfg.rotary_emb_base, cfg.rope_scaling.as_ref(), device);
        let gelu = gelu_approximation(&cfg.hidden_act).expect("checked by GptNeoXConfig::from_config");
        Ok(GptNeoX { cfg, embed, blocks, final_norm, unembed, rotary, gelu, device, kind })
    }

    /// Self-attention of `x` `[batch, seq, d]` up to the heads' outputs `z`,
    /// `[batch, seq, n_heads, head_dim]`.
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
        let (h, hd) = (self.cfg.num_attention_heads as i64, self.cfg.head_dim() as i64);
        let qkv = x.linear(&block.qkv_proj, block.qkv_bias.as_ref()).view([b, t, h, 3 * hd]).transpose(1, 2);
        let qkv = qkv.chunk(3, -1); // 3 × [b, h, t, hd]
        let q = rotate_first_dims(&qkv[0], cos, sin);
        let k = rotate_first_dims(&qkv[1], cos, sin);
        let (k, v) = extend_cache(cache, k, qkv[2].shallow_clone());
        causal_attention(&q, &k, &v, start, None, None).transpose(1, 2).contiguous()
    }

    fn mlp(&self, block: &Block, x: &Tensor) -> Tensor {
        x.linear(&block.up, Some(&block.up_bias)).gelu(self.gelu).linear(&block.down, Some(&block.down_bias))
    }
}

/// Rotary embedding on the first `cos.size(-1)` dimensions of each head; the rest pass through.
fn rotate_first_dims(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let rot = cos.size()[1];
    let head_dim = x.size()[3];
    let rotated = apply_rotary(&x.narrow(3, 0, rot), cos, sin);
    Tensor::cat(&[rotated, x.narrow(3, rot, head_dim - rot)], 3)
}

impl Decoder for GptNeoX {
    fn n_layers(&self) -> usize {
        self.blocks.len()
    }
    fn d_model(&self) -> usize {
        self.cfg.hidden_size
    }
    /// TransformerLens's hooks; with parallel attention and MLP there is no `hook_resid_mid`.
    fn hook_points(&self) -> Vec<HookPoint> {
        let mut hooks = HookPoint::all(self.blocks.len());
        if self.cfg.use_parallel_residual {
            hooks.retain(|h| !matches!(h, HookPoint::ResidMid(_)));
        }
        hooks
    }
    fn hook_width(&self, _point: HookPoint) -> usize {
        self.cfg.hidden_size // n_heads * head_dim = d_model for attn.hook_z too
    }
    fn device(&self) -> Device {
        self.device
    }
    fn kind(&self) -> Kind {
        self.kind
    }
    fn unembedding(&self) -> &Tensor {
        &self.unembed
    }
    fn final_norm_gain(&self) -> Tensor {
        self.final_norm.weight.shallow_clone()
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
        let (cos, sin) = self.rotary.cos_sin(start, seq, self.kind); // [seq, rotary_dim]

        let mut x = Tensor::embedding(&self.embed, &tokens.to_device(self.device), -1, false, false); // [b, t, d]
        x = hooks.apply(HookPoint::Embed, x);
        let mut cache = cache;
        for (i, block) in self.blocks.iter().take(blocks).enumerate() {
            if hooks.wants(HookPoint::ResidPre(i)) {
                x = hooks.apply(HookPoint::ResidPre(i), x);
            }
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            let z = self.attention_z(block, &block.input_norm.forward(&x), &cos, &sin, start, layer_cache);
            let z = hooks.apply(HookPoint::AttnZ(i), z); // [b, t, h, hd]
            let attn = z.flatten(2, 3).linear(&block.o_proj, block.o_bias.as_ref()); // [b, t, d]
            let attn = hooks.apply(HookPoint::AttnOut(i), attn);
            if self.cfg.use_parallel_residual {
                // transformers adds them in this order: mlp + attn + x.
                let mlp = hooks.apply(HookPoint::MlpOut(i), self.mlp(block, &block.post_norm.forward(&x)));
                x = mlp + attn + x;
            } else {
                x = attn + x;
                if hooks.wants(HookPoint::ResidMid(i)) {
                    x = hooks.apply(HookPoint::ResidMid(i), x);
                }
                let mlp = hooks.apply(HookPoint::MlpOut(i), self.mlp(block, &block.post_norm.forward(&x)));
                x = mlp + x;
            }
            x = hooks.apply(HookPoint::ResidPost(i), x);
        }
        x
    }

    fn final_norm(&self, x: &Tensor) -> Tensor {
        self.final_norm.forward(x)
    }
}
