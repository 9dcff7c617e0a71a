//! `sae features search`: the features that fire on a prompt, per token and over the whole
//! prompt. With a features folder they are ranked by activation relative to each feature's
//! dataset maximum, dense features after the specific ones (see [`crate::features::ranking`]);
//! without one, by raw activation.

use anyhow::{bail, Result};
use capture::{HookPoint, Hooks, Model};
use serde::Serialize;
use store::StoreOptions;
use tch::{Device, Kind, Tensor};
use trainer::sae::Sae;

use super::load_features_for;
use crate::cmd::eval::{load_sae_with_sha, sae_fits_model};
use crate::features::ranking::{check_max_density, rank_order, scales, Scale, DEFAULT_MAX_DENSITY};
use crate::features::set::{ExampleKind, FeatureSet};
use crate::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct SearchArgs {
    /// The SAE's folder, a path or URL.
    #[arg(long)]
    sae: String,
    #[arg(long)]
    prompt: String,
    /// A features folder of this SAE (from `sae features build`): ranks features by activation
    /// relative to their dataset maximum, marks dense ones, and shows each feature's top logit
    /// tokens and top example. Without it, features are ranked by raw activation.
    #[arg(long)]
    features: Option<String>,
    /// Features firing on more than this share of the dataset's tokens are marked dense and
    /// listed after the specific ones (0.02 = 2%, about 3× the demo SAE's mean firing rate).
    #[arg(long, default_value_t = DEFAULT_MAX_DENSITY)]
    max_density: f64,
    /// Features shown per token.
    #[arg(long, default_value_t = 5)]
    per_token: usize,
    /// Specific features shown for the whole prompt (and at most as many dense ones after them).
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Print the result as one JSON object (the last line of stdout).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ModelArgs,
}

/// A prompt's tokens and latents.
pub(super) struct EncodedPrompt {
    pub ids: Vec<u32>,
    /// Each token decoded on its own (position 0 included).
    pub tokens: Vec<String>,
    /// Latents of positions 1.. as rows of `d_sae` (row `r` is position `r + 1`).
    pub z: Vec<f32>,
    pub d_sae: usize,
}

impl EncodedPrompt {
    /// Tokenizes `prompt`, runs the model to `hook` (early exit) and encodes every position but
    /// the first, as capture stores them.
    pub fn encode(model: &Model, sae: &Sae, hook: HookPoint, prompt: &str) -> Result<EncodedPrompt> {
        let ids = model.tokenizer.encode(prompt)?;
        if ids.len() < 2 {
            bail!(
                "the prompt {prompt:?} has {} token(s); the first position is not encoded, so give at least 2",
                ids.len()
            );
        }
        let _guard = tch::no_grad_guard();
        let tokens = Tensor::from_slice(&ids.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
        let mut hooks = Hooks::new().capture([hook]);
        let out = model.network.forward(&tokens, None, &mut hooks, false)?;
        let acts = out.hooks[&hook].squeeze_dim(0).to_kind(Kind::Float); // [seq, d]
        let z = sae.encode(&acts.narrow(0, 1, ids.len() as i64 - 1))?.to_device(Device::Cpu);
        let d_sae = z.size()[1] as usize;
        let z = Vec::<f32>::try_from(z.flatten(0, -1))?;
        let tokens = ids.iter().map(|&id| model.tokenizer.decode(&[id])).collect::<Result<Vec<_>, _>>()?;
        Ok(EncodedPrompt { ids, tokens, z, d_sae })
    }

    /// The latents at `position` (≥ 1).
    pub fn at(&self, position: usize) -> &[f32] {
        &self.z[(position - 1) * self.d_sae..position * self.d_sae]
    }

    /// Encoded positions: 1..ids.len().
    pub fn positions(&self) -> std::ops::Range<usize> {
        1..self.ids.len()
    }

    /// Per feature that fires somewhere: (feature, its maximum, the position of the maximum,
    /// the number of positions it fires on), by feature id.
    pub fn maxima(&self) -> Vec<(usize, f32, usize, usize)> {
        let mut best: Vec<(f32, usize, usize)> = vec![(0.0, 0, 0); self.d_sae];
        for position in self.positions() {
            for (f, &v) in self.at(position).iter().enumerate() {
                if v > 0.0 {
                    let b = &mut best[f];
                    b.2 += 1;
                    if v > b.0 {
                        (b.0, b.1) = (v, position);
                    }
                }
            }
        }
        best.into_iter().enumerate().filter(|(_, b)| b.2 > 0).map(|(f, (v, p, n))| (f, v, p, n)).collect()
    }
}

#[derive(Serialize, Debug)]
pub(super) struct FeatureHit {
    pub feature: i64,
    pub activation: f64,
    /// activation / the feature's dataset maximum (with --features; null when it never fired there).
    pub relative_activation: Option<f64>,
    pub dense: bool,
}

#[derive(Serialize, Debug)]
pub(super) struct TokenHits {
    pub position: usize,
    pub token_id: u32,
    pub token: String,
    pub features: Vec<FeatureHit>,
}

#[derive(Serialize, Debug)]
pub(super) struct PromptHit {
    pub feature: i64,
    pub max_activation: f64,
    /// max_activation / dataset_max (with --features; null when the feature never fired there).
    pub relative_activation: Option<f64>,
    /// The feature's maximum and density over the dataset (with --features).
    pub dataset_max: Option<f32>,
    pub density: Option<f64>,
    pub dense: bool,
    /// Position (in the tokenized prompt) of the maximum.
    pub max_position: usize,
    pub tokens_fired: usize,
}

/// The rank key of feature `f` at activation `v`: by relative activation with scales, else raw.
fn key(scales: Option<&[Scale]>, f: usize, v: f32) -> (bool, Option<f64>, i64) {
    match scales {
        Some(s) => (s[f].dense, s[f].relative(v), f as i64),
        None => (false, Some(v as f64), f as i64),
    }
}

/// Per encoded position, its `per_token` best-ranked firing features.
pub(super) fn rank_tokens(p: &EncodedPrompt, per_token: usize, scales: Option<&[Scale]>) -> Vec<TokenHits> {
    p.positions()
        .map(|position| {
            let mut hits: Vec<(usize, f32)> =
                p.at(position).iter().enumerate().filter(|(_, &v)| v > 0.0).map(|(f, &v)| (f, v)).collect();
            hits.sort_by(|a, b| rank_order(key(scales, a.0, a.1), key(scales, b.0, b.1)));
            hits.truncate(per_token);
            let features = hits
                .into_iter()
                .map(|(f, v)| {
                    let (dense, relative, _) = key(scales, f, v);
                    FeatureHit {
                        feature: f as i64,
                        activation: v as f64,
                        relative_activation: scales.and(relative),
                        dense,
                    }
                })
                .collect();
            TokenHits { position, token_id: p.ids[position], token: p.tokens[position].clone(), features }
        })
        .collect()
}

/// The features that fire on the prompt, ranked by their maximum over it: the `top` best
/// specific ones, then (with scales) the `top` best dense ones.
pub(super) fn rank_prompt(p: &EncodedPrompt, top: usize, scales: Option<&[Scale]>) -> Vec<PromptHit> {
    let mut hits: Vec<PromptHit> = p
        .maxima()
        .into_iter()
        .map(|(f, v, position, fired)| {
            let (dense, relative, _) = key(scales, f, v);
            PromptHit {
                feature: f as i64,
                max_activation: v as f64,
                relative_activation: scales.and(relative),
                dataset_max: scales.map(|s| s[f].dataset_max),
                density: scales.map(|s| s[f].density),
                dense,
                max_position: position,
                tokens_fired: fired,
            }
        })
        .collect();
    hits.sort_by(|a, b| {
        rank_order(
            key(scales, a.feature as usize, a.max_activation as f32),
            key(scales, b.feature as usize, b.max_activation as f32),
        )
    });
    let specific = hits.iter().filter(|h| !h.dense).count();
    let mut dense = hits.split_off(specific);
    hits.truncate(top);
    dense.truncate(top);
    hits.extend(dense);
    hits
}

pub(super) fn search(a: SearchArgs) -> Result<()> {
    check_max_density(a.max_density)?;
    let store = StoreOptions::default();
    let model = a.model.load()?;
    let (loaded, sae_sha) = load_sae_with_sha(&a.sae, &store, model.network.device())?;
    let hook = sae_fits_model(&loaded, &a.sae, &model)?;
    let features = a.features.as_deref().map(|url| load_features_for(url, &store, &a.sae, &sae_sha)).transpose()?;
    let scales = features.as_ref().map(|set| scales(&set.features, a.max_density));
    let prompt = EncodedPrompt::encode(&model, &loaded.sae, hook, &a.prompt)?;
    let per_token = rank_tokens(&prompt, a.per_token, scales.as_deref());
    let prompt_hits = rank_prompt(&prompt, a.top, scales.as_deref());

    println!("{} on {:?} ({} tokens; position 0 is not encoded)", a.sae, a.prompt, prompt.ids.len());
    match &scales {
        Some(_) => println!(
            "per token (feature:activation/dataset max = relative; * = dense, > {} of tokens):",
            percent(a.max_density)
        ),
        None => println!("per token (feature:activation; without --features, by raw activation):"),
    }
    for t in &per_token {
        let hits: Vec<String> = t
            .features
            .iter()
            .map(|h| match h.relative_activation {
                Some(r) => format!("{}{}:{:.2}={:.2}", h.feature, if h.dense { "*" } else { "" }, h.activation, r),
                None => format!("{}:{:.2}", h.feature, h.activation),
            })
            .collect();
        println!("  {:>3} {:<16} {}", t.position, format!("{:?}", t.token), hits.join("  "));
    }
    match &scales {
        Some(_) => println!("whole prompt (by maximum relative to the dataset maximum; dense features last):"),
        None => println!("whole prompt (by maximum activation):"),
    }
    for h in &prompt_hits {
        let scale = match (h.relative_activation, h.dataset_max, h.density) {
            (Some(r), Some(m), Some(d)) => {
                format!(
                    " = {r:.2} of dataset max {m:.2} · density {}{}",
                    percent(d),
                    if h.dense { " DENSE" } else { "" }
                )
            }
            (None, Some(_), _) => " · never fired over the dataset".into(),
            _ => String::new(),
        };
        println!(
            "  feature {:>6}  max {:>7.3}{scale} at {:<14} active on {}/{} tokens{}",
            h.feature,
            h.max_activation,
            format!("{:?}", prompt.tokens[h.max_position]),
            h.tokens_fired,
            prompt.ids.len() - 1,
            features.as_ref().map(|set| describe(set, h.feature)).unwrap_or_default()
        );
    }
    if a.json {
        let out = serde_json::json!({
            "sae": a.sae, "prompt": a.prompt, "token_ids": prompt.ids, "max_density": a.max_density,
            "ranked_by": if scales.is_some() { "relative" } else { "raw" },
            "tokens": per_token, "prompt_features": prompt_hits,
        });
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}

/// A share of tokens as a percentage.
pub(super) fn percent(share: f64) -> String {
    format!("{:.3}%", share * 100.0)
}

/// What the features folder says of `feature`: top tokens, logits, an example.
pub(super) fn describe(set: &FeatureSet, feature: i64) -> String {
    let stats = &set.features[feature as usize];
    let fires_on: Vec<String> = set.top_tokens(feature as u32).iter().take(5).map(|t| format!("{t:?}")).collect();
    let logits: Vec<String> = stats.top_logit_tokens.iter().take(5).map(|t| format!("{t:?}")).collect();
    let example = set
        .examples_of(feature as u32)
        .iter()
        .find(|e| e.kind == ExampleKind::Top)
        .map(|e| {
            let c = e.center as usize;
            let text: String =
                e.tokens.iter().enumerate().map(|(i, t)| if i == c { format!("[[{t}]]") } else { t.clone() }).collect();
            format!(" · example {:?}", text.replace('\n', "↵"))
        })
        .unwrap_or_default();
    let languages = set.language_summary(feature as u32);
    let languages = if languages.is_empty() { languages } else { format!(" · languages {languages}") };
    format!(" · top tokens {} · logits ↑ {}{languages}{}", fires_on.join(" "), logits.join(" "), example)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three positions of four features, with activations chosen by hand.
    fn prompt() -> EncodedPrompt {
        #[rustfmt::skip]
        let z = vec![
            // f0   f1   f2   f3
            8.0, 0.0, 1.0, 0.0, // position 1
            2.0, 0.5, 0.0, 0.0, // position 2
            0.0, 0.0, 1.5, 0.0, // position 3
        ];
        EncodedPrompt {
            ids: vec![10, 11, 12, 13],
            tokens: ["a", "b", "c", "d"].map(String::from).to_vec(),
            z,
            d_sae: 4,
        }
    }

    /// Dataset maxima 20, 1, 2, 5; densities 15.6%, 2% (the threshold), 0.1%, 0.
    fn scales_at(max_density: f64) -> Vec<Scale> {
        [(20.0, 0.156), (1.0, 0.02), (2.0, 0.001), (5.0, 0.0)]
            .map(|(m, d)| Scale { dataset_max: m, density: d, dense: d > max_density })
            .to_vec()
    }

    #[test]
    fn the_prompt_is_ranked_by_relative_activation_with_dense_features_last() {
        let p = prompt();
        let s = scales_at(0.02);
        // Relative maxima, by hand: f0 8/20 = 0.4 (dense), f1 0.5/1 = 0.5, f2 1.5/2 = 0.75.
        let hits = rank_prompt(&p, 10, Some(&s));
        let got: Vec<(i64, f64, bool)> =
            hits.iter().map(|h| (h.feature, h.relative_activation.unwrap(), h.dense)).collect();
        assert_eq!(got, vec![(2, 0.75, false), (1, 0.5, false), (0, 0.4, true)]);
        assert_eq!((hits[0].max_position, hits[0].tokens_fired, hits[0].max_activation), (3, 2, 1.5));
        assert_eq!((hits[2].max_position, hits[2].tokens_fired, hits[2].max_activation), (1, 2, 8.0));
        // Just below feature 1's density (the threshold edge) it is dense too: after f2, before f0.
        let hits = rank_prompt(&p, 10, Some(&scales_at(0.019_999)));
        assert_eq!(
            hits.iter().map(|h| (h.feature, h.dense)).collect::<Vec<_>>(),
            vec![(2, false), (1, true), (0, true)]
        );
        // --top 1: one specific feature, then one dense one.
        let hits = rank_prompt(&p, 1, Some(&s));
        assert_eq!(hits.iter().map(|h| h.feature).collect::<Vec<_>>(), vec![2, 0]);
        // Without scales: raw maxima 8, 1.5, 0.5.
        let hits = rank_prompt(&p, 10, None);
        assert_eq!(hits.iter().map(|h| h.feature).collect::<Vec<_>>(), vec![0, 2, 1]);
        assert!(hits.iter().all(|h| h.relative_activation.is_none() && !h.dense));
    }

    #[test]
    fn each_token_lists_its_best_ranked_features() {
        let p = prompt();
        let s = scales_at(0.02);
        let tokens = rank_tokens(&p, 2, Some(&s));
        assert_eq!(tokens.len(), 3);
        // Position 1: f2 1/2 = 0.5 before f0 (dense, 8/20 = 0.4).
        let first: Vec<(i64, f64)> =
            tokens[0].features.iter().map(|h| (h.feature, h.relative_activation.unwrap())).collect();
        assert_eq!(first, vec![(2, 0.5), (0, 0.4)]);
        assert_eq!((tokens[0].position, tokens[0].token.as_str()), (1, "b"));
        // Position 2: f1 0.5/1 = 0.5, then f0 (dense) 2/20 = 0.1.
        assert_eq!(tokens[1].features.iter().map(|h| h.feature).collect::<Vec<_>>(), vec![1, 0]);
        assert!(tokens[1].features[1].dense);
        let raw = rank_tokens(&p, 1, None);
        assert_eq!(raw[1].features[0].feature, 0);
    }
}
