//! `sae features export --format neuronpedia DIR`: a features folder as the JSON batches
//! Neuronpedia imports (see [`crate::features::neuronpedia`] for the layout). The parts the
//! features folder does not hold — the logit-effect histograms and the decoder's neuron
//! alignment — come from the SAE and the model here.

use std::path::PathBuf;

use anyhow::{bail, Result};
use capture::Model;
use store::{ObjectDir, StoreOptions};
use tch::{Device, Kind, Tensor};
use trainer::sae::Sae;

use crate::cmd::eval::load_sae_with_sha;
use crate::features::neuronpedia::{write_export, ExportSettings, ModelViews, DEFAULT_FEATURES_PER_BATCH};
use crate::features::set::FeatureSet;
use crate::model_args::ModelArgs;

/// Bins of the logit-effect histogram, as SAEDashboard's.
const LOGIT_HIST_BINS: i64 = 40;
/// Rows of the decoder's neuron-alignment table, as the Neuronpedia runner's `FeatureTablesConfig(n_rows=3)`.
const ALIGNMENT_ROWS: i64 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// The JSON batches SAEDashboard's Neuronpedia runner writes.
    Neuronpedia,
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A features folder (from `sae features build`), a path or URL.
    #[arg(long)]
    features: String,
    #[arg(long, value_enum)]
    format: ExportFormat,
    /// A local directory for the files.
    out: PathBuf,
    /// The SAE the features belong to (default: the one the features folder names).
    #[arg(long)]
    sae: Option<String>,
    /// Neuronpedia's id of the model (default: the model's name, lower case).
    #[arg(long)]
    model_id: Option<String>,
    /// Neuronpedia's source-set name (default: sae-pipeline-res-<d_sae>); the source is
    /// `<layer>-<sae set>`.
    #[arg(long)]
    sae_set: Option<String>,
    /// Features per batch file.
    #[arg(long, default_value_t = DEFAULT_FEATURES_PER_BATCH)]
    features_per_batch: usize,
    #[command(flatten)]
    model: ModelArgs,
}

/// The block number of a hook name `blocks.N....`.
fn layer_of(hook: &str) -> Result<u32> {
    hook.strip_prefix("blocks.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("the hook `{hook}` names no layer (expected blocks.N....)"))
}

/// A name as Neuronpedia's ids are written: lower case, alphanumerics and hyphens.
fn np_id(name: &str) -> String {
    let id: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    id.trim_matches('-').to_string()
}

pub(super) fn export(a: ExportArgs) -> Result<()> {
    let ExportFormat::Neuronpedia = a.format;
    let store = StoreOptions::default();
    let set = FeatureSet::read(&ObjectDir::open(&a.features, &store)?)?;
    let s = &set.summary;
    let sae_url = a.sae.clone().unwrap_or_else(|| s.sae.clone());
    let model = a.model.load()?;
    let (loaded, sae_sha) = load_sae_with_sha(&sae_url, &store, model.network.device())?;
    if sae_sha != s.sae_weights_sha256 {
        bail!("the features at `{}` were built from another SAE ({}), not from `{sae_url}`", a.features, s.sae);
    }
    let (manifest, _) = store::load_manifest(&s.data, &store)?;
    // Windows are numbered from 0 in the corpus's window order.
    let windows = manifest.shards.iter().map(|shard| shard.sequence_ids[1] + 1).max().unwrap_or(0);
    let settings = ExportSettings {
        model_id: a.model_id.clone().unwrap_or_else(|| np_id(&s.model_name)),
        layer: layer_of(&s.hook)?,
        sae_set: a.sae_set.clone().unwrap_or_else(|| format!("sae-pipeline-res-{}", s.d_sae)),
        features_per_batch: a.features_per_batch,
        n_prompts_total: windows,
        n_tokens_in_prompt: manifest.context_len as u64,
    };
    let views = model_views(&loaded.sae, &model)?;
    let batches = write_export(&set, &views, &settings, &a.out)?;
    println!(
        "{} features ({} dead, in skipped_indexes.json) in {batches} batches for Neuronpedia model `{}`, source `{}-{}` → {}",
        s.d_sae,
        s.dead.len(),
        settings.model_id,
        settings.layer,
        settings.sae_set,
        a.out.display()
    );
    Ok(())
}

/// Per feature: the histogram of its logit effect on every vocabulary token (decoder row ·
/// final-norm weight · unembedding; bars over [min, max] as SAEDashboard's `HistogramData`),
/// and its decoder row's largest entries with their share of the row's L1 norm.
pub fn model_views(sae: &Sae, model: &Model) -> Result<Vec<ModelViews>> {
    let _guard = tch::no_grad_guard();
    let network = &model.network;
    let unembed = network.unembedding().to_kind(Kind::Float); // [vocab, d]
    let gain = network.final_norm_gain().to_kind(Kind::Float);
    let w_dec = sae.w_dec().detach().to_kind(Kind::Float).to_device(network.device());
    if w_dec.size()[1] != unembed.size()[1] {
        bail!(
            "the SAE's decoder rows have width {} but the model's residual stream {}",
            w_dec.size()[1],
            unembed.size()[1]
        );
    }
    let (d_sae, vocab) = (w_dec.size()[0], unembed.size()[0]);
    let (values, indices) = w_dec.topk(ALIGNMENT_ROWS.min(w_dec.size()[1]), 1, true, true);
    let shares = values.abs() / w_dec.abs().sum_dim_intlist(1, true, Kind::Float);
    let to_rows =
        |t: &Tensor| -> Result<Vec<f32>> { Ok(Vec::<f32>::try_from(t.to_device(Device::Cpu).flatten(0, -1))?) };
    let (values, shares) = (to_rows(&values)?, to_rows(&shares)?);
    let indices = Vec::<i64>::try_from(indices.to_device(Device::Cpu).flatten(0, -1))?;
    let k = ALIGNMENT_ROWS.min(w_dec.size()[1]) as usize;

    let mut views = Vec::with_capacity(d_sae as usize);
    // A chunk's effects and bin numbers [len, vocab] stay under about 200 MiB.
    let chunk = ((1i64 << 24) / vocab).max(1);
    let mut start = 0;
    while start < d_sae {
        let len = chunk.min(d_sae - start);
        let effects = (w_dec.narrow(0, start, len) * &gain).matmul(&unembed.tr()); // [len, vocab]
        let lo = effects.amin(1, true);
        let hi = effects.amax(1, true);
        let width = (&hi - &lo).clamp_min(1e-12);
        let bins = ((&effects - &lo) / &width * LOGIT_HIST_BINS as f64)
            .floor()
            .clamp(0.0, (LOGIT_HIST_BINS - 1) as f64)
            .to_kind(Kind::Int64);
        let rows = Tensor::arange(len, (Kind::Int64, effects.device())).unsqueeze(1) * LOGIT_HIST_BINS;
        let counts = (bins + rows).flatten(0, -1).bincount::<Tensor>(None, len * LOGIT_HIST_BINS);
        let counts = to_rows(&counts.to_kind(Kind::Float))?;
        let (lo, width) = (to_rows(&lo)?, to_rows(&width)?);
        for i in 0..len as usize {
            let f = start as usize + i;
            let step = width[i] / LOGIT_HIST_BINS as f32;
            views.push(ModelViews {
                logit_hist_values: (0..LOGIT_HIST_BINS).map(|b| lo[i] + step * (b as f32 + 0.5)).collect(),
                logit_hist_heights: counts[i * LOGIT_HIST_BINS as usize..(i + 1) * LOGIT_HIST_BINS as usize].to_vec(),
                alignment: (0..k).map(|j| (indices[f * k + j] as u32, values[f * k + j], shares[f * k + j])).collect(),
            });
        }
        start += len;
    }
    Ok(views)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_and_ids() {
        assert_eq!(layer_of("blocks.15.hook_resid_post").unwrap(), 15);
        assert!(layer_of("hook_embed").unwrap_err().to_string().contains("hook_embed"));
        assert_eq!(np_id("SmolLM2-135M-Instruct"), "smollm2-135m-instruct");
        assert_eq!(np_id(" a_b "), "a-b");
    }
}
