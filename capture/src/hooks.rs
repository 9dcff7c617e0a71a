//! Hook points, named as in TransformerLens, and interventions at them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use tch::Tensor;

/// A place in the forward pass where activations can be read or replaced.
///
/// | name | tensor |
/// | --- | --- |
/// | `hook_embed` | token embeddings |
/// | `hook_pos_embed` | learned position embeddings (GPT-2 only) |
/// | `blocks.{i}.hook_resid_pre` | residual stream entering block i |
/// | `blocks.{i}.attn.hook_z` | each attention head's output, before `o_proj`: `[batch, seq, n_heads, head_dim]` |
/// | `blocks.{i}.hook_attn_out` | attention output of block i (after `o_proj`) |
/// | `blocks.{i}.hook_resid_mid` | residual stream after the attention, before the MLP |
/// | `blocks.{i}.hook_mlp_out` | MLP output of block i |
/// | `blocks.{i}.hook_resid_post` | residual stream leaving block i (= resid_pre of block i+1) |
/// | `ln_final.hook_normalized` | the final RMSNorm's output, before the unembedding |
///
/// Every hook tensor but `attn.hook_z` has shape `[batch, seq, d_model]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    Embed,
    PosEmbed,
    ResidPre(usize),
    AttnZ(usize),
    AttnOut(usize),
    ResidMid(usize),
    MlpOut(usize),
    ResidPost(usize),
    LnFinal,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown hook {name:?}: valid hooks are hook_embed, blocks.{{i}}.hook_resid_pre, blocks.{{i}}.attn.hook_z, blocks.{{i}}.hook_attn_out, blocks.{{i}}.hook_resid_mid, blocks.{{i}}.hook_mlp_out, blocks.{{i}}.hook_resid_post with i in 0..={last_block}, and ln_final.hook_normalized (and hook_pos_embed for GPT-2); `sae capture --list-hooks` prints a model's hooks")]
pub struct UnknownHook {
    pub name: String,
    pub last_block: usize,
}

impl HookPoint {
    /// Parses a TransformerLens hook name and checks the block index against `n_layers`.
    pub fn parse(name: &str, n_layers: usize) -> Result<Self, UnknownHook> {
        let unknown = || UnknownHook { name: name.to_string(), last_block: n_layers.saturating_sub(1) };
        let hook = match name {
            "hook_embed" => HookPoint::Embed,
            "hook_pos_embed" => HookPoint::PosEmbed,
            "ln_final.hook_normalized" => HookPoint::LnFinal,
            _ => {
                let rest = name.strip_prefix("blocks.").ok_or_else(unknown)?;
                let (index, kind) = rest.split_once('.').ok_or_else(unknown)?;
                // Reject "+1", " 1", "01"-style indices so each hook has exactly one name.
                if index.is_empty()
                    || !index.bytes().all(|b| b.is_ascii_digit())
                    || (index.len() > 1 && index.starts_with('0'))
                {
                    return Err(unknown());
                }
                let i: usize = index.parse().map_err(|_| unknown())?;
                if i >= n_layers {
                    return Err(unknown());
                }
                match kind {
                    "hook_resid_pre" => HookPoint::ResidPre(i),
                    "attn.hook_z" => HookPoint::AttnZ(i),
                    "hook_attn_out" => HookPoint::AttnOut(i),
                    "hook_resid_mid" => HookPoint::ResidMid(i),
                    "hook_mlp_out" => HookPoint::MlpOut(i),
                    "hook_resid_post" => HookPoint::ResidPost(i),
                    _ => return Err(unknown()),
                }
            }
        };
        Ok(hook)
    }

    /// Every hook of a Llama-family model with `n_layers` blocks, in the order the forward pass
    /// reaches them (other families add or leave out some: [`crate::decoder::Decoder::hook_points`]).
    pub fn all(n_layers: usize) -> Vec<HookPoint> {
        let blocks = (0..n_layers).flat_map(|i| {
            [
                HookPoint::ResidPre(i),
                HookPoint::AttnZ(i),
                HookPoint::AttnOut(i),
                HookPoint::ResidMid(i),
                HookPoint::MlpOut(i),
                HookPoint::ResidPost(i),
            ]
        });
        std::iter::once(HookPoint::Embed).chain(blocks).chain([HookPoint::LnFinal]).collect()
    }

    /// How many transformer blocks must run before this hook's tensor exists.
    pub fn blocks_needed(self, n_layers: usize) -> usize {
        match self {
            HookPoint::Embed | HookPoint::PosEmbed => 0,
            HookPoint::ResidPre(i) => i,
            HookPoint::AttnZ(i)
            | HookPoint::AttnOut(i)
            | HookPoint::ResidMid(i)
            | HookPoint::MlpOut(i)
            | HookPoint::ResidPost(i) => i + 1,
            HookPoint::LnFinal => n_layers,
        }
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookPoint::Embed => write!(f, "hook_embed"),
            HookPoint::PosEmbed => write!(f, "hook_pos_embed"),
            HookPoint::ResidPre(i) => write!(f, "blocks.{i}.hook_resid_pre"),
            HookPoint::AttnZ(i) => write!(f, "blocks.{i}.attn.hook_z"),
            HookPoint::AttnOut(i) => write!(f, "blocks.{i}.hook_attn_out"),
            HookPoint::ResidMid(i) => write!(f, "blocks.{i}.hook_resid_mid"),
            HookPoint::MlpOut(i) => write!(f, "blocks.{i}.hook_mlp_out"),
            HookPoint::ResidPost(i) => write!(f, "blocks.{i}.hook_resid_post"),
            HookPoint::LnFinal => write!(f, "ln_final.hook_normalized"),
        }
    }
}

/// A function that sees the tensor at a hook and may replace it (return `Some`).
pub type Intervention<'a> = Box<dyn FnMut(&Tensor) -> Option<Tensor> + 'a>;

/// What a forward pass should read and change.
///
/// Interventions at a hook run in the order they were added; a captured hook records the tensor
/// after every intervention at that hook has run (what the rest of the model sees).
#[derive(Default)]
pub struct Hooks<'a> {
    capture: BTreeSet<HookPoint>,
    interventions: Vec<(HookPoint, Intervention<'a>)>,
    captured: BTreeMap<HookPoint, Tensor>,
}

impl<'a> Hooks<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the tensor at each of `points`.
    pub fn capture(mut self, points: impl IntoIterator<Item = HookPoint>) -> Self {
        self.capture.extend(points);
        self
    }

    /// Runs `f` on the tensor at `point`; when it returns `Some`, the model continues with that.
    pub fn intervene(mut self, point: HookPoint, f: impl FnMut(&Tensor) -> Option<Tensor> + 'a) -> Self {
        self.interventions.push((point, Box::new(f)));
        self
    }

    /// The deepest hook this request touches, if any.
    pub fn deepest(&self, n_layers: usize) -> Option<usize> {
        self.capture.iter().chain(self.interventions.iter().map(|(p, _)| p)).map(|p| p.blocks_needed(n_layers)).max()
    }

    /// Called by the model at each hook point.
    pub(crate) fn apply(&mut self, point: HookPoint, mut x: Tensor) -> Tensor {
        for (p, f) in self.interventions.iter_mut() {
            if *p == point {
                if let Some(replaced) = f(&x) {
                    assert_eq!(replaced.size(), x.size(), "intervention at {point} changed the tensor's shape");
                    x = replaced;
                }
            }
        }
        if self.capture.contains(&point) {
            self.captured.insert(point, x.shallow_clone());
        }
        x
    }

    pub(crate) fn wants(&self, point: HookPoint) -> bool {
        self.capture.contains(&point) || self.interventions.iter().any(|(p, _)| *p == point)
    }

    /// The captured tensors, by hook.
    pub fn take_captured(&mut self) -> BTreeMap<HookPoint, Tensor> {
        std::mem::take(&mut self.captured)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let all = HookPoint::all(30);
        assert_eq!(all.len(), 2 + 6 * 30);
        for hook in all {
            assert_eq!(HookPoint::parse(&hook.to_string(), 30).unwrap(), hook);
        }
        assert_eq!(HookPoint::parse("blocks.3.attn.hook_z", 30).unwrap(), HookPoint::AttnZ(3));
        assert_eq!(HookPoint::parse("blocks.3.hook_resid_mid", 30).unwrap(), HookPoint::ResidMid(3));
    }

    #[test]
    fn unknown_hooks_name_the_hook_and_the_range() {
        for bad in [
            "blocks.30.hook_resid_post",
            "blocks.x.hook_resid_post",
            "blocks.01.hook_resid_pre",
            "blocks.3.hook_q",
            "resid",
        ] {
            let err = HookPoint::parse(bad, 30).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("0..=29"), "{err}");
        }
    }

    #[test]
    fn blocks_needed_orders_hooks_by_depth() {
        assert_eq!(HookPoint::Embed.blocks_needed(30), 0);
        assert_eq!(HookPoint::ResidPre(15).blocks_needed(30), 15);
        assert_eq!(HookPoint::ResidPost(15).blocks_needed(30), 16);
        assert_eq!(HookPoint::LnFinal.blocks_needed(30), 30);
    }
}
