//! Gemma 2 in libtorch: embeddings scaled by sqrt(d_model), RMSNorms with `(1 + w)` before and
//! after both attention and MLP, grouped-query attention with queries scaled by
//! `query_pre_attn_scalar^-1/2`, attention-logit soft-capping and a sliding window on the layers
//! `layer_types` marks, a GeGLU MLP, and final-logit soft-capping over a tied unembedding.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::activation::gelu_approximation;
use crate::architecture::invalid_field;
use crate::attention::{causal_attention, extend_cache, softcapped_causal_attention, LayerCache};
use crate::config::ConfigError;
use crate::decoder::{Decoder, KvCache};
use crate::error::{Error, Result};
use crate::hooks::{HookPoint, Hooks};
use crate::norm::rms_norm_one_plus;
use crate::rope::{apply_rotary, RopeScaling, Rotary};
use crate::weights::{WeightError, Weights};

/// `Gemma2Config` fields that shape the computation; defaults are transformers'.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Gemma2Config {
    pub vocab_size: usize,
    /// d_model.
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default = "defaults::head_dim")]
    pub head_dim: usize,
    #[serde(default = "defaults::hidden_activation")]
    pub hidden_activation: String,
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "defaults::rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "defaults::query_pre_attn_scalar")]
    pub query_pre_attn_scalar: f64,
    #[serde(default = "defaults::attn_logit_softcapping")]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default = "defaults::final_logit_softcapping")]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default = "defaults::sliding_window")]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "defaults::yes")]
    pub tie_word_embeddings: bool,
    #[serde(skip)]
    pub rope_scaling: Option<RopeScaling>,
}

mod defaults {
    pub fn head_dim() -> usize {
        256
    }
    pub fn hidden_activation() -> String {
        "gelu_pytorch_tanh".into()
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn rope_theta() -> f64 {
        10_000.0
    }
    pub fn query_pre_attn_scalar() -> f64 {
        256.0
    }
    pub fn attn_logit_softcapping() -> Option<f64> {
        Some(50.0)
    }
    pub fn final_logit_softcapping() -> Option<f64> {
        Some(30.0)
    }
    pub fn sliding_window() -> Option<usize> {
        Some(4096)
    }
    pub fn yes() -> bool {
        true
    }
}

impl Gemma2Config {
    /// Reads a Gemma 2 `config.json`, refusing settings we do not compute.
    pub fn from_config(config: &serde_json::Value, path: &Path) -> Result<Self> {
        let mut cfg: Gemma2Config = serde_json::from_value(config.clone())
            .map_err(|source| Error::NotFamilyConfig { path: path.to_path_buf(), family: "Gemma 2", source })?;
        if gelu_approximation(&cfg.hidden_activation).is_none() {
            return Err(Error::UnsupportedActivation {
                path: path.to_path_buf(),
                field: "hidden_activation",
                name: cfg.hidden_activation.clone(),
                supported: "gelu_pytorch_tanh, gelu_new and gelu",
            });
        }
        if let Some(value) = config.get("rope_scaling").filter(|v| !v.is_null()) {
            cfg.rope_scaling = RopeScaling::from_config(value, path)?;
        }
        if let Some(types) = &cfg.layer_types {
            let known = types.iter().all(|t| t == "sliding_attention" || t == "full_attention");
            if types.len() != cfg.num_hidden_layers || !known {
                let expected = "a list of full_attention or sliding_attention, one per layer";
                return Err(invalid_field(path, "layer_types", &config["layer_types"], expected));
            }
        }
        let invalid = |source| Error::InvalidModelConfig { path: path.to_path_buf(), source };
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(invalid(ConfigError::KvHeadsDoNotDivide { heads, kv_heads }));
        }
        if cfg.head_dim == 0 {
            return Err(invalid(ConfigError::ZeroHeadDim));
        }
        if !cfg.head_dim.is_multiple_of(2) {
            return Err(invalid(ConfigError::OddHeadDim { head_dim: cfg.head_dim }));
        }
        Ok(cfg)
    }

    /// The sliding window of `layer`: as `Gemma2Config` derives `layer_types` when absent,
    /// even layers (0, 2, ...) slide and odd ones see the whole past.
    fn window(&self, layer: usize) -> Option<usize> {
        let sliding = match &self.layer_types {
            Some(types) => types[layer] == "sliding_attention",
            None => layer.is_multiple_of(2),
        };
        if sliding {
            self.sliding_window
        } else {
            None
        }
    }
}

struct Block {
    input_norm: Tensor,       // [d]
    qkv_proj: Tensor,         // [(n_heads + 2 * n_kv_heads) * head_dim, d]: rows of q, then k, then v
    qkv_bias: Option<Tensor>, // [(n_heads + 2 * n_kv_heads) * head_dim]
    o_proj: Tensor,           // [d, n_heads * head_dim]
    o_bias: Option<Tensor>,   // [d]
    post_attn_norm: Tensor,   // [d]
    pre_mlp_norm: Tensor,     // [d]
    gate_up_proj: Tensor,     // [2 * d_ff, d]: rows of gate, then up
    down_proj: Tensor,        // [d, d_ff]
    post_mlp_norm: Tensor,    // [d]
    window: Option<usize>,
}

pub struct Gemma2 {
    cfg: Gemma2Config,
    embed: Tensor, // [vocab, d]
    blocks: Vec<Block>,
    final_norm: Tensor,      // [d]
    lm_head: Option<Tensor>, // [vocab, d]; None when tied to `embed`
    rotary: Rotary,
    gelu: &'static str,
    device: Device,
    kind: Kind,
}

impl Gemma2 {
    /// Builds the model from CPU tensors named as in transformers' checkpoints (any float
    /// dtype), converting each to `kind` on `device` as it is taken.
    pub fn from_weights(
        cfg: Gemma2Config,
        weights: HashMap<String, Tensor>,
        device: Device,
        kind: Kind,
    ) -> Result<Self, WeightError> {
        let mut w = Weights::new(weights, device, kind);
        let (d, vocab, ff, hd) =
            (cfg.hidden_size as i64, cfg.vocab_size as i64, cfg.intermediate_size as i64, cfg.head_dim as i64);
        let (q_rows, kv_rows) = (cfg.num_attention_heads as i64 * hd, cfg.num_key_value_heads as i64 * hd);
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let q = w.take(&format!("{a}.q_proj.weight"), &[q_rows, d])?;
            let k = w.take(&format!("{a}.k_proj.weight"), &[kv_rows, d])?;
            let v = w.take(&format!("{a}.v_proj.weight"), &[kv_rows, d])?;
            let qkv_bias = if cfg.attention_bias {
                let q = w.take(&format!("{a}.q_proj.bias"), &[q_rows])?;
                let k = w.take(&format!("{a}.k_proj.bias"), &[kv_rows])?;
                let v = w.take(&format!("{a}.v_proj.bias"), &[kv_rows])?;
                Some(Tensor::cat(&[q, k, v], 0))
            } else {
                None
            };
            let gate = w.take(&format!("{p}.mlp.gate_proj.weight"), &[ff, d])?;
            let up = w.take(&format!("{p}.mlp.up_proj.weight"), &[ff, d])?;
            blocks.push(Block {
                input_norm: w.take(&format!("{p}.input_layernorm.weight"), &[d])?,
                qkv_proj: Tensor::cat(&[q, k, v], 0),
                qkv_bias,
                o_proj: w.take(&format!("{a}.o_proj.weight"), &[d, q_rows])?,
                o_bias: cfg.attention_bias.then(|| w.take(&format!("{a}.o_proj.bias"), &[d])).transpose()?,
                post_attn_norm: w.take(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                pre_mlp_norm: w.take(&format!("{p}.pre_feedforward_layernorm.weight"), &[d])?,
                gate_up_proj: Tensor::cat(&[gate, up], 0),
                down_proj: w.take(&format!("{p}.mlp.down_proj.weight"), &[d, ff])?,
                post_mlp_norm: w.take(&format!("{p}.post_feedforward_layernorm.weight"), &[d])?,
                window: cfg.window(i),
            });
        }
        let embed = w.take("model.embed_tokens.weight", &[vocab, d])?;
        let final_norm = w.take("model.norm.weight", &[d])?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(w.take("lm_head.weight", &[vocab, d])?) };
        let rotary = Rotary::new(hd, cfg.rope_theta, cfg.rope_scaling.as_ref(), device);
        let gelu = gelu_approximation(&cfg.hidden_activation).expect("checked by Gemma2Config::from_config");
        Ok(Gemma2 { cfg, embed, blocks, final_norm, lm_head, rotary, gelu, device, kind })
    }

    fn norm(&self, x: &Tensor, weight: &Tensor) -> Tensor {
        rms_norm_one_plus(x, weight, self.cfg.rms_norm_eps)
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
        let (h, kvh, hd) =
            (self.cfg.num_attention_heads as i64, self.cfg.num_key_value_heads as i64, self.cfg.head_dim as i64);
        let qkv = x.linear(&block.qkv_proj, block.qkv_bias.as_ref()).split_with_sizes([h * hd, kvh * hd, kvh * hd], -1);
        let heads = |y: &Tensor, n: i64| y.reshape([b, t, n, hd]).transpose(1, 2); // [b, n, t, hd]
        let q = apply_rotary(&heads(&qkv[0], h), cos, sin);
        let k = apply_rotary(&heads(&qkv[1], kvh), cos, sin);
        let (k, v) = extend_cache(cache, k, heads(&qkv[2], kvh));
        let scale = self.cfg.query_pre_attn_scalar.powf(-0.5);
        let out = match self.cfg.attn_logit_softcapping {
            Some(cap) => softcapped_causal_attention(&q, &k, &v, start, block.window, scale, cap),
            None => causal_attention(&q, &k, &v, start, block.window, Some(scale)),
        }; // [b, h, t, hd]
        out.transpose(1, 2).contiguous()
    }
}

impl Decoder for Gemma2 {
    fn n_layers(&self) -> usize {
        self.blocks.len()
    }
    fn d_model(&self) -> usize {
        self.cfg.hidden_size
    }
    fn hook_points(&self) -> Vec<HookPoint> {
        HookPoint::all(self.blocks.len())
    }
    fn hook_width(&self, point: HookPoint) -> usize {
        match point {
            HookPoint::AttnZ(_) => self.cfg.num_attention_heads * self.cfg.head_dim,
            _ => self.cfg.hidden_size,
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
    /// The stored offset `w` of the final norm, which scales by `1 + w`.
    fn final_norm_gain(&self) -> Tensor {
        // Gemma's RMSNorm multiplies by `1 + w` (norm.rs).
        self.final_norm.to_kind(Kind::Float) + 1.0
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

        // transformers rounds sqrt(d) to the compute dtype before multiplying.
        let normalizer = Tensor::from((self.cfg.hidden_size as f64).sqrt()).to_kind(self.kind).to_device(self.device);
        let embed = Tensor::embedding(&self.embed, &tokens.to_device(self.device), -1, false, false); // [b, t, d]
        let mut x = hooks.apply(HookPoint::Embed, embed * normalizer);
        let mut cache = cache;
        for (i, block) in self.blocks.iter().take(blocks).enumerate() {
            if hooks.wants(HookPoint::ResidPre(i)) {
                x = hooks.apply(HookPoint::ResidPre(i), x);
            }
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            let z = self.attention_z(block, &self.norm(&x, &block.input_norm), &cos, &sin, start, layer_cache);
            let z = hooks.apply(HookPoint::AttnZ(i), z); // [b, t, h, hd]
            let attn = z.flatten(2, 3).linear(&block.o_proj, block.o_bias.as_ref());
            // As TransformerLens: hook_attn_out is what is added to the residual, after the post-norm.
            x = x + hooks.apply(HookPoint::AttnOut(i), self.norm(&attn, &block.post_attn_norm));
            if hooks.wants(HookPoint::ResidMid(i)) {
                x = hooks.apply(HookPoint::ResidMid(i), x);
            }
            let gate_up = self.norm(&x, &block.pre_mlp_norm).linear::<Tensor>(&block.gate_up_proj, None).chunk(2, -1);
            let mlp = (gate_up[0].gelu(self.gelu) * &gate_up[1]).linear::<Tensor>(&block.down_proj, None);
            x = x + hooks.apply(HookPoint::MlpOut(i), self.norm(&mlp, &block.post_mlp_norm));
            x = hooks.apply(HookPoint::ResidPost(i), x);
        }
        x
    }

    fn final_norm(&self, x: &Tensor) -> Tensor {
        self.norm(x, &self.final_norm)
    }

    fn logits(&self, normed: &Tensor) -> Tensor {
        let logits = normed.linear::<Tensor>(self.unembedding(), None); // [b, t, vocab]
        match self.cfg.final_logit_softcapping {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }
}
