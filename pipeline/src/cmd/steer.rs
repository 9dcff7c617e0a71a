//! `sae steer`: generate with one or more features clamped (or pushed) at every position, next
//! to the unsteered generation. The SAE's error term is kept (see `trainer::steer`).

use anyhow::{bail, Result};
use capture::generate::{generate, GenerateOptions};
use capture::{HookPoint, Hooks, Model};
use store::StoreOptions;
use tch::Tensor;
use trainer::sae::Sae;
use trainer::steer::{splice, FeatureEdit};

use crate::cmd::eval::{load_sae_with_sha, sae_fits_model};
use crate::cmd::features::load_features_for;
use crate::cmd::generate::SamplingArgs;
use crate::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The SAE's folder, a path or URL.
    #[arg(long)]
    sae: String,
    /// The feature to steer; repeat the flag to steer several at once.
    #[arg(long, required = true, allow_negative_numbers = true)]
    feature: Vec<i64>,
    /// Fix each feature's activation: `5x` is 5 times the feature's maximum activation over the
    /// dataset (needs --features), a plain number is that activation.
    #[arg(long, conflicts_with = "add", required_unless_present = "add", allow_hyphen_values = true)]
    clamp: Option<String>,
    /// Add this to each feature's activation instead (adds that multiple of its decoder row).
    #[arg(long, allow_negative_numbers = true)]
    add: Option<f64>,
    #[arg(long)]
    prompt: String,
    /// Both generations use the same settings (and seed, when sampling).
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The SAE's features folder (from `sae features build`), for `Nx` clamps.
    #[arg(long)]
    features: Option<String>,
    /// Print the result as one JSON object (the last line of stdout).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ModelArgs,
}

/// What `--clamp` asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Clamp {
    /// `Nx`: N times the feature's maximum activation over the dataset.
    TimesMax(f64),
    /// A plain activation value.
    Value(f64),
}

fn parse_clamp(s: &str) -> Result<Clamp> {
    let t = s.trim();
    let bad = || anyhow::anyhow!("--clamp {s:?}: expected a number or a multiple such as 5x");
    match t.strip_suffix(['x', 'X']) {
        Some(n) => Ok(Clamp::TimesMax(n.trim().parse().map_err(|_| bad())?)),
        None => Ok(Clamp::Value(t.parse().map_err(|_| bad())?)),
    }
}

/// Hooks that splice `edits` in at `hook` at every position but the sequence's first (the
/// attention sink, which the SAE never saw in training). Counts positions across KV-cache steps.
pub fn steering_hooks<'a>(sae: &'a Sae, hook: HookPoint, edits: &'a [FeatureEdit]) -> Hooks<'a> {
    let mut seen = 0i64;
    Hooks::new().intervene(hook, move |x: &Tensor| {
        let (b, t, d) = x.size3().expect("[batch, seq, d]");
        let steered = splice(sae, &x.reshape([b * t, d]), |z| edits.iter().for_each(|e| e.apply(z)))
            .expect("the SAE's width was checked")
            .reshape([b, t, d]);
        let start = seen;
        seen += t;
        if start == 0 {
            // Keep position 0 as the model computed it.
            let rest = steered.narrow(1, 1, t - 1);
            Some(Tensor::cat(&[x.narrow(1, 0, 1), rest], 1))
        } else {
            Some(steered)
        }
    })
}

fn continuation(model: &Model, prompt: &[u32], opts: &GenerateOptions, mut hooks: Hooks) -> Result<String> {
    let mut ids = generate(model, prompt, opts, &mut hooks, |_| Ok::<_, anyhow::Error>(()))?;
    ids.retain(|&id| Some(id) != model.tokenizer.eos_id);
    Ok(model.tokenizer.decode(&ids)?)
}

pub fn run(a: Args) -> Result<()> {
    let store = StoreOptions::default();
    let model = a.model.load()?;
    let (loaded, sae_sha) = load_sae_with_sha(&a.sae, &store, model.network.device())?;
    let hook = sae_fits_model(&loaded, &a.sae, &model)?;
    let sae = &loaded.sae;
    let d_sae = sae.config().d_sae as i64;
    for &f in &a.feature {
        if f < 0 || f >= d_sae {
            bail!("feature {f} is out of range: the SAE at `{}` has features 0..{}", a.sae, d_sae - 1);
        }
    }
    let features = a.features.as_deref().map(|url| load_features_for(url, &store, &a.sae, &sae_sha)).transpose()?;
    let mut edits = Vec::new();
    let mut described = Vec::new();
    for &feature in &a.feature {
        let edit = match (&a.clamp, a.add) {
            (Some(clamp), _) => {
                let value = match parse_clamp(clamp)? {
                    Clamp::Value(value) => value,
                    Clamp::TimesMax(n) => {
                        let Some(set) = &features else {
                            bail!(
                                "--clamp {clamp} is a multiple of feature {feature}'s maximum activation, which `sae features build` records: pass its folder with --features, or give an activation value"
                            );
                        };
                        let max = set.features[feature as usize].max_activation as f64;
                        if max <= 0.0 {
                            bail!("feature {feature} never fired over the dataset (it is dead), so {clamp} of its maximum is 0; give an activation value");
                        }
                        n * max
                    }
                };
                described.push(format!("feature {feature} clamped to {value:.3}"));
                FeatureEdit::Clamp { feature, value }
            }
            (None, Some(value)) => {
                described.push(format!("feature {feature} + {value:.3}"));
                FeatureEdit::Add { feature, value }
            }
            (None, None) => bail!("give --clamp or --add"),
        };
        edits.push(edit);
    }

    let prompt = model.tokenizer.encode(&a.prompt)?;
    let opts = a.sampling.options();
    let unsteered = continuation(&model, &prompt, &opts, Hooks::new())?;
    let steered = continuation(&model, &prompt, &opts, steering_hooks(sae, hook, &edits))?;
    println!("prompt: {:?}", a.prompt);
    println!("unsteered: {}", unsteered);
    println!("steered ({}): {}", described.join(", "), steered);
    if a.json {
        let out = serde_json::json!({
            "sae": a.sae, "prompt": a.prompt, "edits": described, "unsteered": unsteered, "steered": steered,
        });
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{parse_clamp, Clamp};

    #[test]
    fn clamps_parse_as_multiples_or_values() {
        assert_eq!(parse_clamp("5x").unwrap(), Clamp::TimesMax(5.0));
        assert_eq!(parse_clamp("2.5X").unwrap(), Clamp::TimesMax(2.5));
        assert_eq!(parse_clamp("12.75").unwrap(), Clamp::Value(12.75));
        assert_eq!(parse_clamp("-3").unwrap(), Clamp::Value(-3.0));
        assert!(parse_clamp("x5").is_err());
    }
}
