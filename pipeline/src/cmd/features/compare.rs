//! `sae features compare`: the features that fire on every one of several prompts (for example
//! one sentence in several languages), ranked by their weakest showing: the smallest, over the
//! prompts, of the feature's maximum on the prompt divided by its dataset maximum. A feature that
//! fires strongly on all of them ranks first; dense features come after the specific ones (see
//! [`crate::features::ranking`]). For each feature it shows the tokens of each prompt it fires on.

use anyhow::{bail, Result};
use serde::Serialize;
use store::StoreOptions;

use super::load_features_for;
use super::search::{describe, percent, EncodedPrompt};
use crate::cmd::eval::{load_sae_with_sha, sae_fits_model};
use crate::features::ranking::{check_max_density, rank_order, scales, Scale, DEFAULT_MAX_DENSITY};
use crate::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// The SAE's folder, a path or URL.
    #[arg(long)]
    sae: String,
    /// A features folder of this SAE (from `sae features build`): its dataset maxima scale the
    /// activations, its densities mark dense features.
    #[arg(long)]
    features: String,
    /// A prompt; give two or more.
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    /// Features firing on more than this share of the dataset's tokens are marked dense and
    /// listed after the specific ones.
    #[arg(long, default_value_t = DEFAULT_MAX_DENSITY)]
    max_density: f64,
    /// Specific features shown (and at most as many dense ones after them).
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Print the result as one JSON object (the last line of stdout).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ModelArgs,
}

/// One token a shared feature fires on.
#[derive(Serialize, Debug, PartialEq)]
pub(super) struct Firing {
    pub position: usize,
    pub token: String,
    pub activation: f64,
}

/// A shared feature on one prompt.
#[derive(Serialize, Debug, PartialEq)]
pub(super) struct InPrompt {
    pub max_activation: f64,
    pub relative_activation: Option<f64>,
    /// Every position it fires on, in prompt order.
    pub fires: Vec<Firing>,
}

/// A feature that fires on every prompt.
#[derive(Serialize, Debug, PartialEq)]
pub(super) struct SharedFeature {
    pub feature: i64,
    /// The smallest relative activation over the prompts (the rank key; null when the feature
    /// never fired over the dataset).
    pub min_relative_activation: Option<f64>,
    pub dataset_max: f32,
    pub density: f64,
    pub dense: bool,
    /// In the order the prompts were given.
    pub prompts: Vec<InPrompt>,
}

/// How much the prompts' features overlap.
#[derive(Serialize, Debug, PartialEq)]
pub(super) struct Overlap {
    /// Features firing somewhere in each prompt.
    pub active: Vec<usize>,
    /// Features firing in every prompt, and how many of them are not dense.
    pub in_all: usize,
    pub specific_in_all: usize,
}

/// The features firing in every prompt, ranked: the `top` best specific ones, then the `top`
/// best dense ones; and the overlap counts.
pub(super) fn shared_features(
    prompts: &[EncodedPrompt],
    scales: &[Scale],
    top: usize,
) -> (Vec<SharedFeature>, Overlap) {
    let d_sae = scales.len();
    let mut maxima = vec![vec![0f32; d_sae]; prompts.len()];
    for (p, prompt) in prompts.iter().enumerate() {
        for (f, max, _, _) in prompt.maxima() {
            maxima[p][f] = max;
        }
    }
    let active = maxima.iter().map(|m| m.iter().filter(|&&v| v > 0.0).count()).collect();
    let mut shared: Vec<SharedFeature> = (0..d_sae)
        .filter(|&f| maxima.iter().all(|m| m[f] > 0.0))
        .map(|f| {
            let s = scales[f];
            let weakest = maxima.iter().map(|m| m[f]).fold(f32::INFINITY, f32::min);
            let in_prompts = prompts
                .iter()
                .zip(&maxima)
                .map(|(prompt, m)| InPrompt {
                    max_activation: m[f] as f64,
                    relative_activation: s.relative(m[f]),
                    fires: prompt
                        .positions()
                        .filter(|&position| prompt.at(position)[f] > 0.0)
                        .map(|position| Firing {
                            position,
                            token: prompt.tokens[position].clone(),
                            activation: prompt.at(position)[f] as f64,
                        })
                        .collect(),
                })
                .collect();
            SharedFeature {
                feature: f as i64,
                min_relative_activation: s.relative(weakest),
                dataset_max: s.dataset_max,
                density: s.density,
                dense: s.dense,
                prompts: in_prompts,
            }
        })
        .collect();
    shared.sort_by(|a, b| {
        rank_order((a.dense, a.min_relative_activation, a.feature), (b.dense, b.min_relative_activation, b.feature))
    });
    let overlap = Overlap { active, in_all: shared.len(), specific_in_all: shared.iter().filter(|s| !s.dense).count() };
    let mut dense = shared.split_off(overlap.specific_in_all);
    shared.truncate(top);
    dense.truncate(top);
    shared.extend(dense);
    (shared, overlap)
}

pub(super) fn compare(a: CompareArgs) -> Result<()> {
    check_max_density(a.max_density)?;
    if a.prompts.len() < 2 {
        bail!("give at least two prompts (--prompt A --prompt B) to compare");
    }
    let store = StoreOptions::default();
    let model = a.model.load()?;
    let (loaded, sae_sha) = load_sae_with_sha(&a.sae, &store, model.network.device())?;
    let hook = sae_fits_model(&loaded, &a.sae, &model)?;
    let set = load_features_for(&a.features, &store, &a.sae, &sae_sha)?;
    let scales = scales(&set.features, a.max_density);
    let prompts: Vec<EncodedPrompt> =
        a.prompts.iter().map(|p| EncodedPrompt::encode(&model, &loaded.sae, hook, p)).collect::<Result<_>>()?;
    let (shared, overlap) = shared_features(&prompts, &scales, a.top);

    println!(
        "{} on {} prompts (dense: firing on more than {} of tokens):",
        a.sae,
        prompts.len(),
        percent(a.max_density)
    );
    for (i, (text, p)) in a.prompts.iter().zip(&prompts).enumerate() {
        println!("  [{}] {text:?}: {} tokens, {} features active", i + 1, p.ids.len(), overlap.active[i]);
    }
    println!(
        "{} features fire in every prompt ({} specific, {} dense); ranked by the smallest activation relative to the dataset maximum:",
        overlap.in_all,
        overlap.specific_in_all,
        overlap.in_all - overlap.specific_in_all
    );
    for s in &shared {
        let weakest = s.min_relative_activation.map_or("n/a".into(), |r| format!("{r:.2}"));
        println!(
            "  feature {:>6}  min relative {weakest} · dataset max {:.2} · density {}{}{}",
            s.feature,
            s.dataset_max,
            percent(s.density),
            if s.dense { " DENSE" } else { "" },
            describe(&set, s.feature)
        );
        for (i, p) in s.prompts.iter().enumerate() {
            let fires: Vec<String> = p.fires.iter().map(|f| format!("{:?} {:.2}", f.token, f.activation)).collect();
            println!("      [{}] {}", i + 1, fires.join(", "));
        }
    }
    if a.json {
        let out = serde_json::json!({
            "sae": a.sae, "features": a.features, "max_density": a.max_density,
            "prompts": a.prompts.iter().zip(&prompts).map(|(text, p)| serde_json::json!({
                "prompt": text, "token_ids": p.ids, "tokens": p.tokens,
            })).collect::<Vec<_>>(),
            "overlap": overlap, "shared_features": shared,
        });
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(z: Vec<f32>, d_sae: usize) -> EncodedPrompt {
        let n = z.len() / d_sae + 1;
        let tokens = (0..n).map(|i| format!("t{i}")).collect();
        EncodedPrompt { ids: (0..n as u32).collect(), tokens, z, d_sae }
    }

    #[test]
    fn features_in_every_prompt_rank_by_their_weakest_relative_activation() {
        // Four features; dataset maxima 10, 2, 4, 1; feature 0 is dense.
        let scales: Vec<Scale> = [(10.0, 0.5, true), (2.0, 0.01, false), (4.0, 0.01, false), (1.0, 0.01, false)]
            .map(|(m, d, dense)| Scale { dataset_max: m, density: d, dense })
            .to_vec();
        #[rustfmt::skip]
        let a = prompt(vec![
            9.0, 1.0, 0.0, 0.5,
            0.0, 1.5, 2.0, 0.0,
        ], 4);
        #[rustfmt::skip]
        let b = prompt(vec![
            5.0, 0.0, 3.0, 0.0,
            0.0, 0.5, 0.0, 0.0,
        ], 4);
        let (shared, overlap) = shared_features(&[a, b], &scales, 10);
        // Feature 3 is missing from b. Weakest relative: f1 min(1.5, 0.5)/2 = 0.25, f2 min(2, 3)/4 = 0.5,
        // f0 (dense) min(9, 5)/10 = 0.5.
        let got: Vec<(i64, f64)> = shared.iter().map(|s| (s.feature, s.min_relative_activation.unwrap())).collect();
        assert_eq!(got, vec![(2, 0.5), (1, 0.25), (0, 0.5)]);
        assert_eq!(overlap, Overlap { active: vec![4, 3], in_all: 3, specific_in_all: 2 });
        let f1 = &shared[1];
        assert_eq!(
            f1.prompts[0].fires,
            vec![
                Firing { position: 1, token: "t1".into(), activation: 1.0 },
                Firing { position: 2, token: "t2".into(), activation: 1.5 },
            ]
        );
        assert_eq!(f1.prompts[1].fires, vec![Firing { position: 2, token: "t2".into(), activation: 0.5 }]);
        assert_eq!(f1.prompts[1].relative_activation, Some(0.25));
        // --top 1: the best specific one, then the best dense one.
        let (a, b) = (prompt(vec![9.0, 1.0, 2.0, 0.5], 4), prompt(vec![5.0, 0.4, 3.0, 0.0], 4));
        let (shared, _) = shared_features(&[a, b], &scales, 1);
        assert_eq!(shared.iter().map(|s| s.feature).collect::<Vec<_>>(), vec![2, 0]);
    }
}
