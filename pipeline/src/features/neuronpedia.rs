//! A features folder as the JSON batches Neuronpedia imports: the layout SAEDashboard's
//! Neuronpedia runner writes (PyPI `sae-dashboard` 0.8.0: `neuronpedia/neuronpedia_runner.py`
//! writes the files, `neuronpedia/neuronpedia_converter.py` fills them, and the classes of
//! `neuronpedia/neuronpedia_dashboard.py` define the fields).
//!
//! [`write_export`] writes into a local folder:
//!
//! | file | contents |
//! | --- | --- |
//! | `batch-N.json` | a [`Batch`]: up to `features_per_batch` features that fired, in id order |
//! | `skipped_indexes.json` | [`Skipped`]: the features that never fired (Neuronpedia creates them as dead) |
//! | `run_settings.json` | [`RunSettings`]: the fields of SAEDashboard's `NeuronpediaRunnerConfig` that apply |
//!
//! How our statistics map onto the runner's fields:
//! - `activations`: the top examples first (`bin_min` = −1, `bin_max` = the feature's maximum,
//!   `bin_contains` = −1, as the runner marks its "TOP ACTIVATIONS" group), then each quantile
//!   band, highest first (`bin_min`/`bin_max` = the band's lowest and highest sampled activation,
//!   `bin_contains` = the share of all tokens in the band: density / bands, since our bands hold
//!   equal counts of the firing activations). `tokens` are the window's tokens, each decoded on
//!   its own (SAEDashboard writes vocabulary strings with `Ġ` turned into a space, which is the
//!   same text for whole-character tokens); `qualifying_token_index` is the example's own token.
//! - `pos_str`/`pos_values`, `neg_str`/`neg_values`: the logit effects of the build
//!   (decoder row · final-norm weight · unembedding, as TransformerLens' folded `W_U` gives).
//! - `frac_nonzero`: the density; `freq_hist_data_*`: the build's activation histogram (bar
//!   centres, counts); `logits_hist_data_*`: a histogram of the feature's logit effect on every
//!   token of the vocabulary (computed at export).
//! - `neuron_alignment_*`: the decoder row's 3 largest entries and their share of its L1 norm,
//!   as SAEDashboard computes them. The correlation tables (`correlated_*`) need activation
//!   correlations that the build does not record: they are empty lists, as SAEDashboard leaves
//!   them when those tables are off. `decoder_weights_dist` (attention SAEs) and `vector` are
//!   empty as in the runner's output for a residual-stream SAE.
//! - Values are rounded to 3 decimals, as the runner's converter does.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::set::{Example, ExampleKind, FeatureSet, FeatureStats};

/// Features per batch file, as the runner's `n_features_at_a_time` default (and the most
/// Neuronpedia's upload API takes at once).
pub const DEFAULT_FEATURES_PER_BATCH: usize = 128;

/// One `batch-N.json` (SAEDashboard's `NeuronpediaDashboardBatch.to_dict()`).
#[derive(Serialize, Debug)]
pub struct Batch {
    pub model_id: String,
    pub layer: u32,
    pub sae_set: String,
    pub sae_id_suffix: Option<String>,
    pub features: Vec<Feature>,
}

/// One feature (`NeuronpediaDashboardFeature.to_dict()`, in its key order).
#[derive(Serialize, Debug)]
pub struct Feature {
    pub feature_index: u32,
    pub neuron_alignment_indices: Vec<u32>,
    pub neuron_alignment_values: Vec<f32>,
    pub neuron_alignment_l1: Vec<f32>,
    pub correlated_neurons_indices: Vec<u32>,
    pub correlated_neurons_l1: Vec<f32>,
    pub correlated_neurons_pearson: Vec<f32>,
    pub correlated_features_indices: Vec<u32>,
    pub correlated_features_l1: Vec<f32>,
    pub correlated_features_pearson: Vec<f32>,
    pub neg_str: Vec<String>,
    pub neg_values: Vec<f32>,
    pub pos_str: Vec<String>,
    pub pos_values: Vec<f32>,
    pub frac_nonzero: f64,
    pub freq_hist_data_bar_values: Vec<f32>,
    pub freq_hist_data_bar_heights: Vec<f32>,
    pub logits_hist_data_bar_heights: Vec<f32>,
    pub logits_hist_data_bar_values: Vec<f32>,
    pub n_prompts_total: u64,
    pub n_tokens_in_prompt: u64,
    pub dataset: String,
    pub decoder_weights_dist: Vec<f32>,
    pub activations: Vec<Activation>,
    pub vector: Vec<f32>,
}

/// One example window (`NeuronpediaDashboardActivation.to_dict()`, without the optional DFA keys).
#[derive(Serialize, Debug)]
pub struct Activation {
    pub bin_min: f64,
    pub bin_max: f64,
    pub bin_contains: f64,
    pub tokens: Vec<String>,
    pub values: Vec<f32>,
    pub qualifying_token_index: u32,
}

/// `skipped_indexes.json`, as the runner's `record_skipped_features` writes it. We skip the
/// features that never fired, not those under a log-sparsity threshold, so `log_sparsity` is null.
#[derive(Serialize, Debug)]
pub struct Skipped {
    pub model_id: String,
    /// A string, as the runner writes it.
    pub layer: String,
    pub sae_set: String,
    pub log_sparsity: Option<i32>,
    pub skipped_indexes: Vec<u32>,
}

/// `run_settings.json`: the `NeuronpediaRunnerConfig` fields that describe this export.
#[derive(Serialize, Debug)]
pub struct RunSettings {
    pub sae_set: String,
    pub sae_path: String,
    pub outputs_dir: String,
    pub huggingface_dataset_path: String,
    pub n_prompts_total: u64,
    pub n_tokens_in_prompt: u64,
    pub n_features_at_a_time: usize,
    pub n_quantiles: usize,
    pub top_acts_group_size: usize,
    pub quantile_group_size: usize,
    pub model_id: String,
    pub layer: u32,
}

/// What the features folder does not hold: where the export goes and what the model gives.
pub struct ExportSettings {
    pub model_id: String,
    pub layer: u32,
    pub sae_set: String,
    pub features_per_batch: usize,
    /// Windows the dataset was cut into, and tokens per window.
    pub n_prompts_total: u64,
    pub n_tokens_in_prompt: u64,
}

/// Per feature, what the SAE and the model give: the logit-effect histogram (bar centres,
/// counts) and the decoder row's 3 largest entries (index, value, share of the row's L1 norm).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelViews {
    pub logit_hist_values: Vec<f32>,
    pub logit_hist_heights: Vec<f32>,
    pub alignment: Vec<(u32, f32, f32)>,
}

fn round3(x: f32) -> f32 {
    (x * 1000.0).round() / 1000.0
}

fn rounded(xs: &[f32]) -> Vec<f32> {
    xs.iter().copied().map(round3).collect()
}

/// The centres of `bins` equal bins over (0, max], as the build's histogram is cut.
fn bar_centres(max: f32, bins: usize) -> Vec<f32> {
    (0..bins).map(|i| round3(max * (i as f32 + 0.5) / bins as f32)).collect()
}

fn activation(e: &Example, bin: (f64, f64, f64)) -> Activation {
    Activation {
        bin_min: bin.0,
        bin_max: bin.1,
        bin_contains: bin.2,
        tokens: e.tokens.clone(),
        values: rounded(&e.token_activations),
        qualifying_token_index: e.center,
    }
}

/// The example windows of one feature: top activations, then quantile bands, highest first.
fn activations(set: &FeatureSet, f: &FeatureStats) -> Vec<Activation> {
    let examples = set.examples_of(f.feature);
    let top_bin = (-1.0, round3(f.max_activation) as f64, -1.0);
    let mut out: Vec<Activation> =
        examples.iter().filter(|e| e.kind == ExampleKind::Top).map(|e| activation(e, top_bin)).collect();
    let mut quantiles: Vec<&Example> = examples.iter().filter(|e| e.kind == ExampleKind::Quantile).collect();
    quantiles.sort_by_key(|e| (std::cmp::Reverse(e.band), e.rank));
    let share = f.frequency / set.summary.quantile_bands.max(1) as f64;
    for band in quantiles.chunk_by(|a, b| a.band == b.band) {
        let lo = band.iter().map(|e| e.activation).fold(f32::INFINITY, f32::min);
        let hi = band.iter().map(|e| e.activation).fold(f32::NEG_INFINITY, f32::max);
        let bin = (round3(lo) as f64, round3(hi) as f64, share);
        out.extend(band.iter().map(|e| activation(e, bin)));
    }
    out
}

/// One feature in Neuronpedia's layout.
pub fn feature(set: &FeatureSet, f: &FeatureStats, views: &ModelViews, s: &ExportSettings) -> Feature {
    Feature {
        feature_index: f.feature,
        neuron_alignment_indices: views.alignment.iter().map(|a| a.0).collect(),
        neuron_alignment_values: views.alignment.iter().map(|a| round3(a.1)).collect(),
        neuron_alignment_l1: views.alignment.iter().map(|a| round3(a.2)).collect(),
        correlated_neurons_indices: vec![],
        correlated_neurons_l1: vec![],
        correlated_neurons_pearson: vec![],
        correlated_features_indices: vec![],
        correlated_features_l1: vec![],
        correlated_features_pearson: vec![],
        neg_str: f.bottom_logit_tokens.clone(),
        neg_values: rounded(&f.bottom_logits),
        pos_str: f.top_logit_tokens.clone(),
        pos_values: rounded(&f.top_logits),
        frac_nonzero: f.frequency,
        freq_hist_data_bar_values: bar_centres(f.max_activation, f.histogram.len()),
        freq_hist_data_bar_heights: f.histogram.iter().map(|&c| c as f32).collect(),
        logits_hist_data_bar_heights: views.logit_hist_heights.clone(),
        logits_hist_data_bar_values: rounded(&views.logit_hist_values),
        n_prompts_total: s.n_prompts_total,
        n_tokens_in_prompt: s.n_tokens_in_prompt,
        dataset: set.summary.data.clone(),
        decoder_weights_dist: vec![],
        activations: activations(set, f),
        vector: vec![],
    }
}

fn write_json(dir: &Path, name: &str, value: &impl Serialize) -> Result<()> {
    let path = dir.join(name);
    let text = serde_json::to_string(value).with_context(|| format!("cannot encode `{}`", path.display()))?;
    std::fs::write(&path, text).with_context(|| format!("cannot write `{}`", path.display()))
}

/// Writes the batches, `skipped_indexes.json` and `run_settings.json` into `dir` (created if
/// needed); `views[f]` holds feature `f`'s model-derived parts. Returns the number of batches.
pub fn write_export(set: &FeatureSet, views: &[ModelViews], s: &ExportSettings, dir: &Path) -> Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    let alive: Vec<&FeatureStats> = set.features.iter().filter(|f| !f.dead).collect();
    let per_batch = s.features_per_batch.max(1);
    let mut batches = 0;
    for (n, chunk) in alive.chunks(per_batch).enumerate() {
        let batch = Batch {
            model_id: s.model_id.clone(),
            layer: s.layer,
            sae_set: s.sae_set.clone(),
            sae_id_suffix: None,
            features: chunk.iter().map(|f| feature(set, f, &views[f.feature as usize], s)).collect(),
        };
        write_json(dir, &format!("batch-{n}.json"), &batch)?;
        batches += 1;
    }
    let skipped = Skipped {
        model_id: s.model_id.clone(),
        layer: s.layer.to_string(),
        sae_set: s.sae_set.clone(),
        log_sparsity: None,
        skipped_indexes: set.features.iter().filter(|f| f.dead).map(|f| f.feature).collect(),
    };
    write_json(dir, "skipped_indexes.json", &skipped)?;
    let settings = RunSettings {
        sae_set: s.sae_set.clone(),
        sae_path: set.summary.sae.clone(),
        outputs_dir: dir.display().to_string(),
        huggingface_dataset_path: set.summary.data.clone(),
        n_prompts_total: s.n_prompts_total,
        n_tokens_in_prompt: s.n_tokens_in_prompt,
        n_features_at_a_time: per_batch,
        n_quantiles: set.summary.quantile_bands,
        top_acts_group_size: set.summary.top_k,
        quantile_group_size: set.summary.samples_per_band,
        model_id: s.model_id.clone(),
        layer: s.layer,
    };
    write_json(dir, "run_settings.json", &settings)?;
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::set::tests::sample_set;

    fn settings() -> ExportSettings {
        ExportSettings {
            model_id: "m".into(),
            layer: 1,
            sae_set: "s".into(),
            features_per_batch: 128,
            n_prompts_total: 10,
            n_tokens_in_prompt: 64,
        }
    }

    #[test]
    fn examples_become_top_then_quantile_activations_with_their_bins() {
        let set = sample_set();
        let views = vec![ModelViews::default(); 2];
        let f = feature(&set, &set.features[0], &views[0], &settings());
        assert_eq!(f.activations.len(), 3);
        let bins: Vec<(f64, f64, f64)> = f.activations.iter().map(|a| (a.bin_min, a.bin_max, a.bin_contains)).collect();
        // Two top examples (max 3.5), then band 0 of 2 (one sample at 0.75, 10% density / 2 bands).
        assert_eq!(bins, vec![(-1.0, 3.5, -1.0), (-1.0, 3.5, -1.0), (0.75, 0.75, 0.05)]);
        assert_eq!(f.activations[0].qualifying_token_index, 1);
        assert_eq!(f.freq_hist_data_bar_values, vec![0.438, 1.313, 2.188, 3.063]);
        assert_eq!(f.freq_hist_data_bar_heights, vec![5.0, 3.0, 1.0, 1.0]);
        assert_eq!(f.pos_str, set.features[0].top_logit_tokens);
    }

    #[test]
    fn dead_features_are_skipped_and_batches_hold_the_rest() {
        let set = sample_set();
        let dir = tempfile::tempdir().unwrap();
        let views = vec![ModelViews::default(); 2];
        assert_eq!(write_export(&set, &views, &settings(), dir.path()).unwrap(), 1);
        let batch: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("batch-0.json")).unwrap()).unwrap();
        assert_eq!(batch["features"].as_array().unwrap().len(), 1);
        // Hostile token text survives JSON exactly.
        assert_eq!(batch["features"][0]["activations"][0]["tokens"][1], set.examples[0].tokens[1].as_str());
        let skipped: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("skipped_indexes.json")).unwrap()).unwrap();
        assert_eq!(skipped["skipped_indexes"], serde_json::json!([1]));
        assert_eq!(skipped["layer"], "1");
    }

    /// Token text that JSON must escape: quotes, backslashes, control characters, a closing
    /// script tag, the replacement character a lone byte of a multi-byte character decodes to,
    /// and the line separators JavaScript once refused in strings.
    const HOSTILE: [&str; 7] = [
        "\"quoted\" 'single'",
        "back\\slash \\u0041 \\",
        "\u{0}\u{1}\u{1f}\n\t\r\u{7f}",
        "</script><script>alert(1)</script>",
        "\u{FFFD}",
        "\u{2028}\u{2029} é 中文",
        "",
    ];

    #[test]
    fn hostile_token_text_round_trips_through_python_json_and_passes_the_package_check() {
        let mut set = sample_set();
        set.examples[0].tokens = HOSTILE.iter().map(|t| t.to_string()).collect();
        set.examples[0].token_ids = (0..HOSTILE.len() as u32).collect();
        set.examples[0].token_activations = vec![0.5; HOSTILE.len()];
        set.features[0].top_logit_tokens[1] = HOSTILE[2].into();
        let dir = tempfile::tempdir().unwrap();
        write_export(&set, &[ModelViews::default(), ModelViews::default()], &settings(), dir.path()).unwrap();
        let path = dir.path().join("batch-0.json");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains('\u{0}') && !text.contains('\n'), "raw control characters in the JSON");
        // Python's strict parser reads back exactly the strings written.
        let script = "import json,sys; b=json.load(open(sys.argv[1])); f=b['features'][0]; \
                      print(json.dumps([f['activations'][0]['tokens'], f['pos_str']], ensure_ascii=True))";
        let out = std::process::Command::new(testkit::venv::python()).args(["-c", script]).arg(&path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let back: (Vec<String>, Vec<String>) = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(back.0, HOSTILE.to_vec());
        assert_eq!(back.1, set.features[0].top_logit_tokens);
        // And the folder passes the check against SAEDashboard's and neuronpedia's own classes.
        let out = std::process::Command::new(testkit::venv::python())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/neuronpedia_check.py"))
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
        assert_eq!((report["features"].as_u64(), report["skipped"].as_u64()), (Some(1), Some(1)));
        assert_eq!(report["uploaded_features"].as_u64(), Some(1));
    }
}
