//! `sae features`: read an SAE's features (build, search, compare, neighbors, browse, export).

mod compare;
mod export;
mod search;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use capture::corpus::CorpusSpec;
use store::{ObjectDir, StoreOptions};
use tch::Device;
use trainer::export::LoadedSae;

use crate::cmd::eval::{check_capture_model, load_sae, load_sae_with_sha, sae_hook_in_dataset, sae_hook_in_model};
use crate::features::build::{build, BuildSettings};
use crate::features::languages::{check_corpus, example_languages, set_language_shares};
use crate::features::neighbors::{nearest, unit_rows, Neighbor};
use crate::features::ranking::{check_max_density, DEFAULT_MAX_DENSITY};
use crate::features::set::{FeatureSet, Summary, FORMAT_VERSION};
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
    Search(search::SearchArgs),
    /// The features that fire on every one of several prompts, ranked by their weakest
    /// activation relative to the dataset maximum, and where in each prompt they fire.
    Compare(compare::CompareArgs),
    /// Write the features in another tool's format: the JSON batches Neuronpedia imports.
    Export(export::ExportArgs),
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
    /// The dataset was captured from the multilingual fortunes of these languages (`sae capture
    /// --fortune-languages`): trace each feature's top examples to their languages (the corpus
    /// is read again and must be the one the dataset records).
    #[arg(long, value_delimiter = ',', value_name = "LANGS")]
    pub fortune_languages: Vec<String>,
    #[command(flatten)]
    pub model: ModelArgs,
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
    /// Features firing on more than this share of tokens are marked dense on the index.
    #[arg(long, default_value_t = DEFAULT_MAX_DENSITY)]
    pub max_density: f64,
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Build(a) => run_build(&a, &StoreOptions::default()).map(|_| ()),
        Command::Search(a) => search::search(a),
        Command::Compare(a) => compare::compare(a),
        Command::Export(a) => export::export(a),
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
    let corpus = (!a.fortune_languages.is_empty())
        .then(|| CorpusSpec::multilingual_fortunes(&a.fortune_languages))
        .transpose()?;
    let languages: Vec<String> =
        corpus.iter().flat_map(|c| c.mix.iter().flat_map(|m| m.groups.iter().map(|g| g.name.clone()))).collect();
    let out = ObjectDir::open(&a.out, store)?;
    if !a.force {
        if let Ok(Some(done)) = FeatureSet::read_summary(&out) {
            let same = done.sae_weights_sha256 == sae_sha
                && done.dataset_id == manifest.dataset_id
                && (done.top_k, done.context, done.quantile_bands, done.samples_per_band, done.histogram_bins)
                    == (a.top_k, a.context, a.quantile_bands, a.samples_per_band, a.histogram_bins)
                && a.max_rows.is_none_or(|m| m.min(manifest.tokens) == done.rows)
                && done.languages == languages;
            if same {
                println!("features of {} over {} are already built at {} ({} rows)", a.sae, a.data, a.out, done.rows);
                return Ok(done);
            }
        }
    }

    if let Some(spec) = &corpus {
        check_corpus(spec, &manifest)?;
    }
    let model = a.model.load()?;
    check_capture_model(&model, &manifest, &a.data)?;
    sae_hook_in_model(&info.hook_name, &model)?;
    let started = Instant::now();
    let mut built = build(&sae, &model, &a.data, &manifest, &hook.name, store, &settings)?;
    if let Some(spec) = corpus {
        let (names, of_example) = example_languages(spec, &model.tokenizer, &manifest, &built.examples)?;
        set_language_shares(&mut built.features, &built.examples, &of_example, names.len());
    }
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
        languages,
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
    check_max_density(a.max_density)?;
    crate::features::browse::write_site(&set, &a.out, a.max_density)
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
