//! `sae eval`: reconstruction statistics over the dataset and the CE-loss score through the
//! model, for an exported SAE. Also run at the end of `sae train`.

use anyhow::{bail, Context, Result};
use capture::HookPoint;
use serde::{Deserialize, Serialize};
use store::reader::{Reader, ReaderOptions};
use store::{HookSummary, Manifest, ObjectDir, StoreOptions};
use tch::{Device, Kind, Tensor};
use trainer::eval::{ReconstructionStats, ReconstructionSummary};
use trainer::export::{self, LoadedSae};

use crate::ce_score::{ce_loss_score, windows_from_tokens, CeScore};
use crate::model_args::ModelArgs;

/// Where `sae eval` writes its results, in the SAE's folder.
pub const EVAL_FILE: &str = "eval.json";
pub const DENSITY_PLOT_FILE: &str = "feature_density.png";

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Tokens of windows rebuilt from the dataset's last shard for the CE-loss score.
    #[arg(long, default_value_t = 8192)]
    pub eval_tokens: usize,
    /// Rows of the dataset (in stored order) for FVU, L0 and feature density.
    #[arg(long, default_value_t = 1_000_000)]
    pub density_tokens: u64,
    /// Windows per forward pass of the CE-loss score.
    #[arg(long, default_value_t = 8)]
    pub eval_batch: usize,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The SAE's folder (cfg.json + sae_weights.safetensors), a path or URL.
    #[arg(long)]
    sae: String,
    /// The activation dataset to evaluate on.
    #[arg(long)]
    data: String,
    #[command(flatten)]
    eval: EvalArgs,
    /// Print the result as one JSON object (the last line of stdout).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ModelArgs,
}

/// What `sae eval` reports (and stores as `eval.json` beside the SAE).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    pub sae: String,
    pub data: String,
    pub hook: String,
    #[serde(flatten)]
    pub reconstruction: ReconstructionSummary,
    #[serde(flatten)]
    pub ce: CeScore,
}

pub fn run(args: Args) -> Result<()> {
    let report = evaluate(&args.sae, &args.data, &args.eval, &args.model, &StoreOptions::default())?;
    print_report(&report);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

pub fn print_report(r: &EvalReport) {
    println!("SAE {} on {} ({})", r.sae, r.data, r.hook);
    println!(
        "  FVU {:.4} (inliers {:.4}, {:.2}% of rows) · L0 {:.1} · dead {:.2}% over {} rows",
        r.reconstruction.fvu,
        r.reconstruction.fvu_inliers,
        100.0 * r.reconstruction.inlier_fraction,
        r.reconstruction.l0,
        100.0 * r.reconstruction.dead_fraction,
        r.reconstruction.rows
    );
    println!(
        "  CE-loss score {:.4} · ΔCE {:+.4} nats (clean {:.4}, SAE {:.4}, zero-ablation {:.4}) over {} tokens",
        r.ce.ce_loss_score, r.ce.delta_ce, r.ce.ce_clean, r.ce.ce_sae, r.ce.ce_zero_ablation, r.ce.tokens
    );
}

pub fn load_sae(url: &str, store: &StoreOptions, device: Device) -> Result<LoadedSae> {
    Ok(load_sae_with_sha(url, store, device)?.0)
}

/// Loads an exported SAE and the SHA-256 (lowercase hex) of its `sae_weights.safetensors`, which
/// identifies the SAE for the features folders built from it.
pub fn load_sae_with_sha(url: &str, store: &StoreOptions, device: Device) -> Result<(LoadedSae, String)> {
    use sha2::{Digest, Sha256};
    let dir = ObjectDir::open(url, store)?;
    let read = |key: &str| -> Result<Vec<u8>> {
        let bytes = dir.get(key)?.with_context(|| format!("no SAE at `{}`: `{key}` is missing", dir.url()))?;
        Ok(bytes.to_vec())
    };
    let cfg = read(export::CFG_FILE)?;
    let weights = read(export::WEIGHTS_FILE)?;
    let sha = format!("{:x}", Sha256::digest(&weights));
    Ok((export::load(&cfg, &weights, dir.url(), device)?, sha))
}

/// The dataset's summary of the SAE's hook `hook_name`, checked against the SAE's input width.
pub fn sae_hook_in_dataset<'m>(
    manifest: &'m Manifest,
    hook_name: &str,
    d_in: usize,
    sae_url: &str,
    data_url: &str,
) -> Result<&'m HookSummary> {
    let hook = manifest.hook(hook_name).with_context(|| {
        let have: Vec<&str> = manifest.hooks.iter().map(|h| h.name.as_str()).collect();
        format!("dataset `{data_url}` has no hook `{hook_name}` (the SAE's hook); it has: {}", have.join(", "))
    })?;
    if hook.d_model != d_in {
        bail!("d_model mismatch: the SAE at `{sae_url}` takes d_in {d_in} but hook `{}` of dataset `{data_url}` has d_model {}", hook.name, hook.d_model);
    }
    Ok(hook)
}

/// Errors unless `model` is the model the dataset at `data_url` was captured with (when the
/// dataset recorded one).
pub fn check_capture_model(model: &capture::Model, manifest: &Manifest, data_url: &str) -> Result<()> {
    let sha = model.file_sha256()?;
    if !manifest.model.file_sha256.is_empty() && sha != manifest.model.file_sha256 {
        bail!(
            "the model `{}` is not the one dataset `{data_url}` was captured with ({}, sha256 {}); pass that model with --model",
            model.path.display(),
            manifest.model.name,
            manifest.model.file_sha256
        );
    }
    Ok(())
}

/// The SAE's hook in `model`, checked against the model's width: what `search` and `steer` need
/// before they run the model with the SAE.
pub fn sae_fits_model(loaded: &LoadedSae, sae_url: &str, model: &capture::Model) -> Result<HookPoint> {
    let hook = sae_hook_in_model(&loaded.info.hook_name, model)?;
    let (d_in, hidden) = (loaded.sae.config().d_in, model.network.d_model());
    if hidden != d_in {
        bail!("the SAE at `{sae_url}` takes d_in {d_in} but model `{}` has hidden size {hidden}", model.name);
    }
    Ok(hook)
}

/// The SAE's hook in `model`, or an error naming both.
pub fn sae_hook_in_model(hook_name: &str, model: &capture::Model) -> Result<HookPoint> {
    model
        .network
        .parse_hook(hook_name)
        .with_context(|| format!("the SAE's hook `{hook_name}` does not exist in model `{}`", model.name))
}

pub fn evaluate(
    sae_url: &str,
    data_url: &str,
    eval: &EvalArgs,
    model_args: &ModelArgs,
    store: &StoreOptions,
) -> Result<EvalReport> {
    if let Some(n) = model_args.threads {
        tch::set_num_threads(n);
    }
    let device = capture::device::parse_device(model_args.device.as_deref())?;
    let LoadedSae { sae, info } = load_sae(sae_url, store, device)?;
    let (manifest, _) = store::load_manifest(data_url, store)?;
    let hook = sae_hook_in_dataset(&manifest, &info.hook_name, sae.config().d_in, sae_url, data_url)?;

    // 1. Reconstruction statistics over the first rows of the dataset, in stored order.
    let mut opts = ReaderOptions::one_pass_in_order(&hook.name, 4096);
    opts.store = store.clone();
    let mut stats = ReconstructionStats::new(&hook.mean, sae.config().d_sae, device);
    for batch in Reader::open(data_url, opts)? {
        let batch = batch?;
        let x = Tensor::from_slice(&batch.to_f32()).view([batch.rows as i64, batch.d as i64]).to_device(device);
        let keep = (eval.density_tokens - stats.rows()).min(batch.rows as u64) as i64;
        stats.add(&sae, &x.narrow(0, 0, keep))?;
        if stats.rows() >= eval.density_tokens {
            break;
        }
    }
    let reconstruction = stats.summary();

    // 2. The CE-loss score through the model.
    let model = model_args.load()?;
    check_capture_model(&model, &manifest, data_url)?;
    let hook_point = sae_hook_in_model(&hook.name, &model)?;
    let last_shard =
        manifest.shards.len().checked_sub(1).with_context(|| format!("dataset `{data_url}` has no shards"))?;
    let tokens = store::shard_tokens(data_url, store, last_shard)?;
    let windows = windows_from_tokens(&tokens, eval.eval_tokens);
    let model_kind = model.network.kind();
    let reconstruct = |x: &Tensor| -> Tensor {
        let x32 = x.to_kind(Kind::Float);
        let x_hat = sae.encode(&x32).and_then(|z| sae.decode(&z)).expect("shapes were checked");
        x_hat.to_kind(model_kind)
    };
    let ce = ce_loss_score(&model, hook_point, &windows, eval.eval_batch, &reconstruct)?;

    let report = EvalReport {
        sae: sae_url.to_string(),
        data: data_url.to_string(),
        hook: hook.name.clone(),
        reconstruction,
        ce,
    };
    let dir = ObjectDir::open(sae_url, store)?;
    let title = format!("feature density, {} latents over {} tokens", sae.config().d_sae, report.reconstruction.rows);
    match trainer::plots::density_histogram(&title, &report.reconstruction.density) {
        Ok(png) => dir.put(DENSITY_PLOT_FILE, png)?,
        Err(e) => tracing::warn!("no density plot: {e}"),
    }
    let mut json = serde_json::to_vec_pretty(&report)?;
    json.push(b'\n');
    dir.put(EVAL_FILE, json)?;
    Ok(report)
}
