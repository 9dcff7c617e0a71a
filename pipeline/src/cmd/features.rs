//! `sae features`: read an SAE's features (build, search, neighbors, browse).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use capture::{HookPoint, Hooks, Model};
use serde::Serialize;
use store::{ObjectDir, StoreOptions};
use tch::{Device, Kind, Tensor};
use trainer::export::LoadedSae;
use trainer::sae::Sae;

use crate::cmd::eval::{
    check_capture_model, load_sae, load_sae_with_sha, sae_fits_model, sae_hook_in_dataset, sae_hook_in_model,
};
use crate::features::build::{build, BuildSettings};
use crate::features::neighbors::{nearest, unit_rows, Neighbor};
use crate::features::set::{ExampleKind, FeatureSet, Summary, FORMAT_VERSION};
use crate::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// One pass over a dataset: every feature's frequency, maximum, histogram, top examples,
    /// quantile samples, logit effects and neighbours, stored as Parquet and JSON.
    Build(BuildArgs),
    /// The features that fire on a prompt, per token and over the whole prompt.
    Search(SearchArgs),
    /// Nearest features by the cosine similarity of their decoder rows.
    Neighbors(NeighborArgs),
    /// Write a static HTML feature browser (opens from file://, no server).
    Browse(BrowseArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct BuildArgs {
    /// The SAE's folder (cfg.json + sae_weights.safetensors), a path or URL.
    #[arg(long)]
    pub sae: String,
    /// The activation dataset to read (the SAE's hook must be in it).
    #[arg(long)]
    pub data: String,
    /// Where to write features.json, features.parquet and examples.parquet.
    #[arg(long)]
    pub out: String,
    /// Top-activating examples kept per feature.
    #[arg(long, default_value_t = 20)]
    pub top_k: usize,
    /// Tokens of context on each side of an example's token.
    #[arg(long, default_value_t = 8)]
    pub context: usize,
    /// Quantile bands of each feature's activations to sample examples from.
    #[arg(long, default_value_t = 5)]
    pub quantile_bands: usize,
    /// Examples sampled per quantile band.
    #[arg(long, default_value_t = 4)]
    pub samples_per_band: usize,
    /// Bins of each feature's activation histogram.
    #[arg(long, default_value_t = 40)]
    pub histogram_bins: usize,
    /// Rows encoded at once (fewer when the SAE is wide, so a chunk's latents stay under 256 MiB).
    #[arg(long, default_value_t = 4096)]
    pub chunk_rows: usize,
    /// Read at most this many rows of the dataset (default: all).
    #[arg(long)]
    pub max_rows: Option<u64>,
    /// Rebuild even when --out already holds features of this SAE and dataset.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(clap::Args, Debug)]
struct SearchArgs {
    /// The SAE's folder, a path or URL.
    #[arg(long)]
    sae: String,
    #[arg(long)]
    prompt: String,
    /// A features folder of this SAE (from `sae features build`): shows each feature's top
    /// logit tokens and top example.
    #[arg(long)]
    features: Option<String>,
    /// Features shown per token.
    #[arg(long, default_value_t = 5)]
    per_token: usize,
    /// Features shown for the whole prompt.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Print the result as one JSON object (the last line of stdout).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(clap::Args, Debug)]
struct NeighborArgs {
    /// The SAE's folder (cfg.json + sae_weights.safetensors), a path or URL.
    #[arg(long)]
    sae: String,
    /// The feature (latent index) to find neighbours of.
    #[arg(long, allow_negative_numbers = true)]
    feature: i64,
    /// How many neighbours.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Look for neighbours in this SAE instead (for example one of another width).
    #[arg(long)]
    other_sae: Option<String>,
    /// Print the result as one JSON object (the last line of stdout).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BrowseArgs {
    /// A features folder (from `sae features build`).
    #[arg(long)]
    pub features: String,
    /// A local directory for the site; index.html goes at its top.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Build(a) => run_build(&a, &StoreOptions::default()).map(|_| ()),
        Command::Search(a) => search(a),
        Command::Neighbors(a) => neighbors(a),
        Command::Browse(a) => {
            let index = browse(&a, &StoreOptions::default())?;
            println!("feature browser: {}", index.display());
            Ok(())
        }
    }
}

/// Builds the features folder, or finds it already built for this SAE, dataset and settings.
pub fn run_build(a: &BuildArgs, store: &StoreOptions) -> Result<Summary> {
    let device = capture::device::parse_device(a.model.device.as_deref())?;
    let (LoadedSae { sae, info }, sae_sha) = load_sae_with_sha(&a.sae, store, device)?;
    let (manifest, _) = store::load_manifest(&a.data, store)?;
    let hook = sae_hook_in_dataset(&manifest, &info.hook_name, sae.config().d_in, &a.sae, &a.data)?;
    let settings = BuildSettings {
        top_k: a.top_k,
        context: a.context,
        quantile_bands: a.quantile_bands,
        samples_per_band: a.samples_per_band,
        histogram_bins: a.histogram_bins,
        max_rows: a.max_rows,
        chunk_rows: a.chunk_rows.max(1),
        ..BuildSettings::default()
    };
    let out = ObjectDir::open(&a.out, store)?;
    if !a.force {
        if let Ok(Some(done)) = FeatureSet::read_summary(&out) {
            let same = done.sae_weights_sha256 == sae_sha
                && done.dataset_id == manifest.dataset_id
                && (done.top_k, done.context, done.quantile_bands, done.samples_per_band, done.histogram_bins)
                    == (a.top_k, a.context, a.quantile_bands, a.samples_per_band, a.histogram_bins)
                && a.max_rows.is_none_or(|m| m.min(manifest.tokens) == done.rows);
            if same {
                println!("features of {} over {} are already built at {} ({} rows)", a.sae, a.data, a.out, done.rows);
                return Ok(done);
            }
        }
    }

    let model = a.model.load()?;
    check_capture_model(&model, &manifest, &a.data)?;
    sae_hook_in_model(&info.hook_name, &model)?;
    let started = Instant::now();
    let built = build(&sae, &model, &a.data, &manifest, &hook.name, store, &settings)?;
    let dead: Vec<u32> = built.features.iter().filter(|f| f.dead).map(|f| f.feature).collect();
    let summary = Summary {
        format_version: FORMAT_VERSION,
        sae: a.sae.clone(),
        sae_weights_sha256: sae_sha,
        d_in: sae.config().d_in,
        d_sae: sae.config().d_sae,
        hook: hook.name.clone(),
        model_name: manifest.model.name.clone(),
        model_sha256: manifest.model.file_sha256.clone(),
        data: a.data.clone(),
        dataset_id: manifest.dataset_id.clone(),
        rows: built.rows,
        top_k: a.top_k,
        context: a.context,
        quantile_bands: a.quantile_bands,
        samples_per_band: a.samples_per_band,
        histogram_bins: a.histogram_bins,
        dead,
        seconds: started.elapsed().as_secs_f64(),
    };
    let set = FeatureSet { summary, features: built.features, examples: built.examples };
    set.write(&out)?;
    let s = &set.summary;
    println!(
        "features of {} over {} rows of {}: {} alive, {} dead, {} examples, {:.1} s ({:.0} tokens/s) → {}",
        a.sae,
        s.rows,
        a.data,
        s.d_sae - s.dead.len(),
        s.dead.len(),
        set.examples.len(),
        s.seconds,
        s.rows as f64 / s.seconds.max(1e-9),
        a.out
    );
    Ok(set.summary)
}

/// Reads a features folder and checks that it was built from the SAE whose weights hash to `sae_sha`.
pub fn load_features_for(url: &str, store: &StoreOptions, sae_url: &str, sae_sha: &str) -> Result<FeatureSet> {
    let set = FeatureSet::read(&ObjectDir::open(url, store)?)?;
    if set.summary.sae_weights_sha256 != sae_sha {
        bail!(
            "the features at `{url}` were built from another SAE ({}, weights sha256 {}), not from `{sae_url}` (sha256 {sae_sha})",
            set.summary.sae,
            set.summary.sae_weights_sha256
        );
    }
    Ok(set)
}

pub fn browse(a: &BrowseArgs, store: &StoreOptions) -> Result<PathBuf> {
    let set = FeatureSet::read(&ObjectDir::open(&a.features, store)?)?;
    crate::features::browse::write_site(&set, &a.out)
}

#[derive(Serialize)]
struct FeatureHit {
    feature: i64,
    activation: f64,
}

#[derive(Serialize)]
struct TokenHits {
    position: usize,
    token_id: u32,
    token: String,
    features: Vec<FeatureHit>,
}

#[derive(Serialize)]
struct PromptHit {
    feature: i64,
    max_activation: f64,
    /// Position (in the tokenized prompt) of the maximum.
    max_position: usize,
    tokens_fired: usize,
}

fn search(a: SearchArgs) -> Result<()> {
    let store = StoreOptions::default();
    let model = a.model.load()?;
    let (loaded, sae_sha) = load_sae_with_sha(&a.sae, &store, model.network.device())?;
    let hook = sae_fits_model(&loaded, &a.sae, &model)?;
    let sae = &loaded.sae;
    let features = a.features.as_deref().map(|url| load_features_for(url, &store, &a.sae, &sae_sha)).transpose()?;
    let ids = model.tokenizer.encode(&a.prompt)?;
    if ids.len() < 2 {
        bail!("the prompt has {} token(s); the first position is not encoded, so give at least 2", ids.len());
    }
    let _guard = tch::no_grad_guard();
    let z = encode_prompt(&model, sae, hook, &ids)?;
    let per_token = token_hits(&z, &ids, a.per_token, &model)?;
    let prompt_hits = prompt_hits(&z, a.top)?;

    println!("{} on {:?} ({} tokens; position 0 is not encoded)", a.sae, a.prompt, ids.len());
    println!("per token (feature:activation):");
    for t in &per_token {
        let hits: Vec<String> = t.features.iter().map(|h| format!("{}:{:.2}", h.feature, h.activation)).collect();
        println!("  {:>3} {:<16} {}", t.position, format!("{:?}", t.token), hits.join("  "));
    }
    println!("whole prompt (by maximum activation):");
    for h in &prompt_hits {
        println!(
            "  feature {:>6}  max {:>7.3} at {:<14} active on {}/{} tokens{}",
            h.feature,
            h.max_activation,
            format!("{:?}", per_token[h.max_position - 1].token),
            h.tokens_fired,
            ids.len() - 1,
            features.as_ref().map(|set| describe(set, h.feature)).unwrap_or_default()
        );
    }
    if a.json {
        let out = serde_json::json!({ "sae": a.sae, "prompt": a.prompt, "token_ids": ids, "tokens": per_token, "prompt_features": prompt_hits });
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}

/// The prompt's latents `[seq - 1, d_sae]` on the CPU: the model runs to `hook` (early exit) and
/// every position but the first is encoded, as capture stores them.
fn encode_prompt(model: &Model, sae: &Sae, hook: HookPoint, ids: &[u32]) -> Result<Tensor> {
    let tokens = Tensor::from_slice(&ids.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
    let mut hooks = Hooks::new().capture([hook]);
    let out = model.network.forward(&tokens, None, &mut hooks, false)?;
    let acts = out.hooks[&hook].squeeze_dim(0).to_kind(Kind::Float); // [seq, d]
    Ok(sae.encode(&acts.narrow(0, 1, ids.len() as i64 - 1))?.to_device(Device::Cpu))
}

/// Per encoded position, its `per_token` strongest firing features.
fn token_hits(z: &Tensor, ids: &[u32], per_token: usize, model: &Model) -> Result<Vec<TokenHits>> {
    let k = (per_token as i64).min(z.size()[1]);
    let (values, indices) = z.topk(k, 1, true, true);
    let values = Vec::<f32>::try_from(values.flatten(0, -1))?;
    let indices = Vec::<i64>::try_from(indices.flatten(0, -1))?;
    (1..ids.len())
        .enumerate()
        .map(|(row, position)| {
            let features = (0..k as usize)
                .map(|j| row * k as usize + j)
                .filter(|&at| values[at] > 0.0)
                .map(|at| FeatureHit { feature: indices[at], activation: values[at] as f64 })
                .collect();
            let token = model.tokenizer.decode(&[ids[position]])?;
            Ok(TokenHits { position, token_id: ids[position], token, features })
        })
        .collect()
}

/// The `top` features with the highest maximum over the prompt, among those that fire.
fn prompt_hits(z: &Tensor, top: usize) -> Result<Vec<PromptHit>> {
    let (max, argmax) = z.max_dim(0, false);
    let fired = z.gt(0.0).sum_dim_intlist(0, false, Kind::Int64);
    let top = (top as i64).min(z.size()[1]);
    let (best, order) = max.topk(top, 0, true, true);
    let best = Vec::<f32>::try_from(best)?;
    let order = Vec::<i64>::try_from(order)?;
    let argmax = Vec::<i64>::try_from(argmax)?;
    let fired = Vec::<i64>::try_from(fired)?;
    Ok(order
        .iter()
        .zip(&best)
        .filter(|(_, &v)| v > 0.0)
        .map(|(&f, &v)| PromptHit {
            feature: f,
            max_activation: v as f64,
            max_position: argmax[f as usize] as usize + 1,
            tokens_fired: fired[f as usize] as usize,
        })
        .collect())
}

/// What the features folder says of `feature`: dataset maximum, top tokens, logits, an example.
fn describe(set: &FeatureSet, feature: i64) -> String {
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
    format!(
        " · dataset max {:.2} · top tokens {} · logits ↑ {}{}",
        stats.max_activation,
        fires_on.join(" "),
        logits.join(" "),
        example
    )
}

fn neighbors(a: NeighborArgs) -> Result<()> {
    let store = StoreOptions::default();
    let sae = load_sae(&a.sae, &store, Device::Cpu)?;
    let d_sae = sae.sae.config().d_sae as i64;
    if a.feature < 0 || a.feature >= d_sae {
        bail!("feature {} is out of range: the SAE at `{}` has features 0..{}", a.feature, a.sae, d_sae - 1);
    }
    let rows = unit_rows(sae.sae.w_dec());
    let query = rows.get(a.feature);
    let (target_url, found): (&str, Vec<Neighbor>) = match &a.other_sae {
        None => (&a.sae, nearest(&query, &rows, a.top, Some(a.feature))?),
        Some(other) => {
            let other_sae = load_sae(other, &store, Device::Cpu)?;
            if other_sae.info.hook_name != sae.info.hook_name {
                tracing::warn!(
                    "the SAEs read different hooks: {} and {}",
                    sae.info.hook_name,
                    other_sae.info.hook_name
                );
            }
            (other, nearest(&query, &unit_rows(other_sae.sae.w_dec()), a.top, None)?)
        }
    };
    println!("nearest features to feature {} of {} in {}:", a.feature, a.sae, target_url);
    for n in &found {
        println!("  {:>8}  cosine {:+.4}", n.feature, n.cosine);
    }
    if a.json {
        let out = serde_json::json!({ "sae": a.sae, "feature": a.feature, "in": target_url, "neighbors": found });
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}
