//! `sae features build`: one streaming pass over an activation dataset that records, for every
//! feature of an SAE, how often and how strongly it fires and where it fires most.
//!
//! Pass over the activations (on the SAE's device), per chunk of rows `z = encode(x)` `[n, d_sae]`:
//! - firing counts, sums (f64) and maxima per feature;
//! - a top-K heap per feature, kept as two `[K, d_sae]` tensors (values, global row numbers)
//!   merged with each chunk's own top-K: memory is `O(K · d_sae)` whatever the dataset's size;
//! - a uniform sample of S firing rows per feature (bottom-S of a random key, merged the same
//!   way), from which the quantile samples are drawn: sorted by activation and cut into bands
//!   of equal count, so band b holds samples from the b-th quantile interval, as sae_vis does;
//! - a log-binned histogram sketch of the firing activations (32 bins per decade), turned at the
//!   end into equal-width bins over (0, max]; a bin's count may land one bin off when a log bin
//!   straddles a boundary (log bins are 7% wide).
//!
//! A second, cheaper pass reads the same rows again in the same order and only for the rows
//! around each kept example: it takes their stored token ids and the feature's activation at
//! each token of the window (re-encoded). Contexts never cross a window (`sequence_id`).
//!
//! Logit effects project each decoder row through the final norm's weight and the unembedding
//! (`W_dec · diag(g) · W_Uᵀ`, chunked over features) and keep the top and bottom 10 tokens.
//! Neighbours come from decoder cosine similarity, chunked the same way.

use std::collections::HashMap;

use anyhow::{bail, Result};
use capture::Model;
use indicatif::{ProgressBar, ProgressStyle};
use store::reader::{Reader, ReaderOptions};
use store::{Manifest, StoreOptions};
use tch::{Device, Kind, Tensor};
use trainer::sae::Sae;

mod example_windows;

use example_windows::fill_windows;

use crate::features::neighbors::{all_nearest, unit_rows};
use crate::features::set::{Example, ExampleKind, FeatureStats};

/// Log-binned histogram sketch: bins of 1/32 decade from 10^-4 to 10^4.
const LOG_LO: f64 = -4.0;
const BINS_PER_DECADE: f64 = 32.0;
const LOG_BINS: i64 = 8 * 32;
/// Key of an empty reservoir slot (random keys are in [0, 1)).
const EMPTY_KEY: f64 = 2.0;

/// Settings of the pass.
#[derive(Clone, Debug)]
pub struct BuildSettings {
    pub top_k: usize,
    pub context: usize,
    pub quantile_bands: usize,
    pub samples_per_band: usize,
    pub histogram_bins: usize,
    pub logit_tokens: usize,
    pub neighbors: usize,
    /// Rows encoded per chunk (bounded further so a chunk's `[n, d_sae]` stays under 256 MiB).
    pub chunk_rows: usize,
    /// Stop after this many rows (None: the whole dataset).
    pub max_rows: Option<u64>,
    pub seed: u64,
}

impl Default for BuildSettings {
    fn default() -> Self {
        BuildSettings {
            top_k: 20,
            context: 8,
            quantile_bands: 5,
            samples_per_band: 4,
            histogram_bins: 40,
            logit_tokens: 10,
            neighbors: 10,
            chunk_rows: 4096,
            max_rows: None,
            seed: 0,
        }
    }
}

/// The results of the pass, before they are written.
pub struct Built {
    pub rows: u64,
    pub features: Vec<FeatureStats>,
    pub examples: Vec<Example>,
}

/// Per feature, the `k` entries with the smallest keys seen so far, as `[k, d_sae]` tensors
/// sorted by key down each column. Unfilled slots hold a key that sorts after every real one.
struct BestPerFeature {
    key: Tensor,   // [k, d_sae] f32
    value: Tensor, // [k, d_sae] f32, -1 where unfilled
    row: Tensor,   // [k, d_sae] i64, global row numbers
}

impl BestPerFeature {
    fn new(k: i64, d_sae: i64, empty_key: f64, device: Device) -> Self {
        BestPerFeature {
            key: Tensor::full([k, d_sae], empty_key, (Kind::Float, device)),
            value: Tensor::full([k, d_sae], -1.0, (Kind::Float, device)),
            row: Tensor::zeros([k, d_sae], (Kind::Int64, device)),
        }
    }

    /// Merges new entries (feature, key, value, row), each `[m]`. On equal keys the older entry
    /// wins, so the result does not depend on how the rows were cut into chunks.
    fn merge(&mut self, features: &Tensor, keys: &Tensor, values: &Tensor, rows: &Tensor) {
        let (k, d_sae) = self.key.size2().expect("[k, d_sae]");
        let device = self.key.device();
        // The state as entries too: slot (j, f) belongs to feature f. Every feature then has at
        // least k entries, so the k best of each refill the whole state.
        let all_features = Tensor::cat(&[&Tensor::arange(d_sae, (Kind::Int64, device)).repeat([k]), features], 0);
        let all_keys = Tensor::cat(&[&self.key.flatten(0, -1), keys], 0);
        let all_values = Tensor::cat(&[&self.value.flatten(0, -1), values], 0);
        let all_rows = Tensor::cat(&[&self.row.flatten(0, -1), rows], 0);
        // Sort by key, then stably by feature: each feature's entries are contiguous, best first.
        let by_key = all_keys.argsort_stable(true, 0, false);
        let order = by_key.index_select(0, &all_features.index_select(0, &by_key).argsort_stable(true, 0, false));
        let sorted_features = all_features.index_select(0, &order);
        let counts = all_features.bincount::<Tensor>(None, d_sae);
        let starts = counts.cumsum(0, Kind::Int64) - &counts;
        let rank = Tensor::arange(order.size()[0], (Kind::Int64, device)) - starts.index_select(0, &sorted_features);
        let keep = rank.lt(k);
        let chosen = order.masked_select(&keep);
        let slots = [Some(rank.masked_select(&keep)), Some(sorted_features.masked_select(&keep))];
        self.key = self.key.index_put(&slots, &all_keys.index_select(0, &chosen), false);
        self.value = self.value.index_put(&slots, &all_values.index_select(0, &chosen), false);
        self.row = self.row.index_put(&slots, &all_rows.index_select(0, &chosen), false);
    }
}

/// Running statistics over the encoded chunks, all tensors on the SAE's device. Only firing
/// latents are touched (`n · k` of `n · d_sae` for TopK), so the cost per chunk follows the
/// code's sparsity, not the dictionary's width.
struct Accumulator {
    fired: Tensor,    // [d_sae] i64
    sum: Tensor,      // [d_sae] f64
    max: Tensor,      // [d_sae] f32
    log_hist: Tensor, // [d_sae * LOG_BINS] i64
    /// Top activations: key = −activation.
    top: BestPerFeature,
    /// Uniform sample of firing rows: key = a uniform random number.
    samples: BestPerFeature,
    rows: u64,
}

impl Accumulator {
    fn new(d_sae: i64, k: i64, s: i64, device: Device) -> Self {
        Accumulator {
            fired: Tensor::zeros([d_sae], (Kind::Int64, device)),
            sum: Tensor::zeros([d_sae], (Kind::Double, device)),
            max: Tensor::zeros([d_sae], (Kind::Float, device)),
            log_hist: Tensor::zeros([d_sae * LOG_BINS], (Kind::Int64, device)),
            top: BestPerFeature::new(k, d_sae, 1.0, device),
            samples: BestPerFeature::new(s, d_sae, EMPTY_KEY, device),
            rows: 0,
        }
    }

    /// Adds the next `n` rows, given as their firing latents: `(row within the chunk, feature,
    /// activation > 0)` triplets, each `[m]`.
    fn add(&mut self, n: i64, rows: &Tensor, features: &Tensor, values: &Tensor) {
        let d_sae = self.fired.size()[0];
        if values.size()[0] > 0 {
            self.fired += features.bincount::<Tensor>(None, d_sae);
            self.sum = self.sum.index_add(0, features, &values.to_kind(Kind::Double));
            self.max = self.max.internal_scatter_reduce(0, features, values, "amax", true);
            // Histogram sketch: flat index feature * LOG_BINS + log bin of each activation.
            let bin = ((values.log10() - LOG_LO) * BINS_PER_DECADE)
                .floor()
                .clamp(0.0, (LOG_BINS - 1) as f64)
                .to_kind(Kind::Int64);
            self.log_hist += (features * LOG_BINS + bin).bincount::<Tensor>(None, d_sae * LOG_BINS);
            let rows = rows + self.rows as i64;
            self.top.merge(features, &values.neg(), values, &rows);
            let keys = Tensor::rand([values.size()[0]], (Kind::Float, values.device()));
            self.samples.merge(features, &keys, values, &rows);
        }
        self.rows += n as u64;
    }
}

/// Reads `[K, d_sae]` as `K` rows of `d_sae` values.
fn to_rows<T: tch::kind::Element + Copy>(t: &Tensor) -> Result<Vec<Vec<T>>> {
    let t = t.to_device(Device::Cpu).contiguous();
    let (k, d) = t.size2()?;
    let flat = Vec::<T>::try_from(t.flatten(0, -1))?;
    Ok((0..k as usize).map(|i| flat[i * d as usize..(i + 1) * d as usize].to_vec()).collect())
}

/// The rows both passes read: `hook`'s activations in `data_url`, in stored order, encoded by `sae`.
struct DatasetRows<'a> {
    sae: &'a Sae,
    data_url: &'a str,
    hook: &'a str,
    store: &'a StoreOptions,
    chunk_rows: usize,
}

impl DatasetRows<'_> {
    fn open(&self) -> Result<Reader> {
        let mut opts = ReaderOptions::one_pass_in_order(self.hook, self.chunk_rows);
        opts.with_tokens = true;
        opts.store = self.store.clone();
        Ok(Reader::open(self.data_url, opts)?)
    }
}

fn progress(total: u64, what: &str) -> ProgressBar {
    let template = format!("{{spinner}} {what} [{{bar:30}}] {{pos}}/{{len}} tokens {{per_sec}} eta {{eta}}");
    ProgressBar::new(total).with_style(ProgressStyle::with_template(&template).expect("valid template"))
}

/// Runs both passes over `data_url`'s rows of `hook` and computes the logit effects and
/// neighbours. `model` supplies the unembedding and decodes tokens.
pub fn build(
    sae: &Sae,
    model: &Model,
    data_url: &str,
    manifest: &Manifest,
    hook: &str,
    store: &StoreOptions,
    s: &BuildSettings,
) -> Result<Built> {
    let _guard = tch::no_grad_guard();
    let d_sae = sae.config().d_sae as i64;
    if s.top_k == 0 || s.quantile_bands == 0 || s.samples_per_band == 0 || s.histogram_bins == 0 {
        bail!("--top-k, --quantile-bands, --samples-per-band and --histogram-bins must be at least 1");
    }
    tch::manual_seed(s.seed as i64);
    // A chunk's latents [n, d_sae] and its random keys stay under 256 MiB each.
    let chunk_rows = s.chunk_rows.min(((1usize << 26) / d_sae as usize).max(64));
    let total_rows = s.max_rows.map_or(manifest.tokens, |m| m.min(manifest.tokens));
    let dataset = DatasetRows { sae, data_url, hook, store, chunk_rows };

    let totals = statistics_pass(&dataset, total_rows, s)?.totals()?;
    let rows = totals.rows;
    if rows == 0 {
        bail!("dataset `{data_url}` has no rows of hook `{hook}`");
    }
    let mut examples = choose_examples(&totals, s);
    let windows_started = std::time::Instant::now();
    fill_windows(&dataset, model, rows, s.context, &mut examples)?;
    tracing::info!(
        examples = examples.len(),
        seconds = format!("{:.1}", windows_started.elapsed().as_secs_f64()),
        "example windows read"
    );
    let logits_started = std::time::Instant::now();
    let (logit_top, logit_bottom) = logit_effects(sae, model, s.logit_tokens)?;
    let neighbors = all_nearest(&unit_rows(sae.w_dec()), s.neighbors)?;
    tracing::info!(
        seconds = format!("{:.1}", logits_started.elapsed().as_secs_f64()),
        "logit effects and neighbours done"
    );
    let features = (0..d_sae as usize)
        .map(|f| {
            let mut stats = totals.feature(f, s.histogram_bins);
            stats.top_logit_tokens = logit_top[f].iter().map(|(t, _)| t.clone()).collect();
            stats.top_logits = logit_top[f].iter().map(|(_, v)| *v).collect();
            stats.bottom_logit_tokens = logit_bottom[f].iter().map(|(t, _)| t.clone()).collect();
            stats.bottom_logits = logit_bottom[f].iter().map(|(_, v)| *v).collect();
            stats.neighbors = neighbors[f].iter().map(|(n, _)| *n).collect();
            stats.neighbor_cosines = neighbors[f].iter().map(|(_, c)| *c).collect();
            stats
        })
        .collect();
    Ok(Built { rows, features, examples: examples.into_iter().map(|(e, _)| e).collect() })
}

/// Pass 1: firing statistics, top-K and samples over the first `total_rows` rows.
fn statistics_pass(dataset: &DatasetRows, total_rows: u64, s: &BuildSettings) -> Result<Accumulator> {
    let sae = dataset.sae;
    let device = sae.w_dec().device();
    let samples = (s.quantile_bands * s.samples_per_band) as i64;
    let started = std::time::Instant::now();
    let mut acc = Accumulator::new(sae.config().d_sae as i64, s.top_k as i64, samples, device);
    let bar = progress(total_rows, "features");
    for batch in dataset.open()? {
        let batch = batch?;
        let keep = (total_rows - acc.rows).min(batch.rows as u64) as i64;
        let x = Tensor::from_slice(&batch.to_f32())
            .view([batch.rows as i64, batch.d as i64])
            .narrow(0, 0, keep)
            .to_device(device);
        let (rows, features, values) = sae.encode_sparse(&x)?;
        acc.add(keep, &rows, &features, &values);
        bar.inc(keep as u64);
        if acc.rows >= total_rows {
            break;
        }
    }
    bar.finish_and_clear();
    tracing::info!(
        rows = acc.rows,
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "statistics pass done"
    );
    Ok(acc)
}

/// The first pass's results on the CPU: per feature (index `f`), and per slot `j` of the top-K
/// and sample reservoirs as `[slot][f]`.
struct Totals {
    rows: u64,
    fired: Vec<i64>,
    sums: Vec<f64>,
    maxima: Vec<f32>,
    /// `[d_sae * LOG_BINS]`, feature-major.
    log_hist: Vec<i64>,
    top_values: Vec<Vec<f32>>,
    top_rows: Vec<Vec<i64>>,
    sample_keys: Vec<Vec<f32>>,
    sample_values: Vec<Vec<f32>>,
    sample_rows: Vec<Vec<i64>>,
}

impl Accumulator {
    fn totals(&self) -> Result<Totals> {
        Ok(Totals {
            rows: self.rows,
            fired: Vec::<i64>::try_from(self.fired.to_device(Device::Cpu))?,
            sums: Vec::<f64>::try_from(self.sum.to_device(Device::Cpu))?,
            maxima: Vec::<f32>::try_from(self.max.to_device(Device::Cpu))?,
            log_hist: Vec::<i64>::try_from(self.log_hist.to_device(Device::Cpu))?,
            top_values: to_rows::<f32>(&self.top.value)?,
            top_rows: to_rows::<i64>(&self.top.row)?,
            sample_keys: to_rows::<f32>(&self.samples.key)?,
            sample_values: to_rows::<f32>(&self.samples.value)?,
            sample_rows: to_rows::<i64>(&self.samples.row)?,
        })
    }
}

impl Totals {
    /// Feature `f`'s statistics, without its logit effects and neighbours.
    fn feature(&self, f: usize, histogram_bins: usize) -> FeatureStats {
        let fired = self.fired[f];
        let hist = &self.log_hist[f * LOG_BINS as usize..(f + 1) * LOG_BINS as usize];
        FeatureStats {
            feature: f as u32,
            fired: fired as u64,
            frequency: fired as f64 / self.rows as f64,
            max_activation: self.maxima[f],
            mean_activation: if fired > 0 { (self.sums[f] / fired as f64) as f32 } else { 0.0 },
            dead: fired == 0,
            histogram: linear_histogram(hist, self.maxima[f], histogram_bins),
            top_logit_tokens: vec![],
            top_logits: vec![],
            bottom_logit_tokens: vec![],
            bottom_logits: vec![],
            neighbors: vec![],
            neighbor_cosines: vec![],
            language_shares: vec![],
        }
    }
}

/// The examples to look up, each with its global row: per feature its top activations, then
/// its quantile samples (sorted by activation, cut into bands of equal count, highest first).
fn choose_examples(totals: &Totals, s: &BuildSettings) -> Vec<(Example, u64)> {
    let samples = s.quantile_bands * s.samples_per_band;
    let mut examples: Vec<(Example, u64)> = Vec::new();
    for f in 0..totals.fired.len() {
        let blank = |kind, rank: usize, band: usize, activation: f32| Example {
            feature: f as u32,
            kind,
            rank: rank as u32,
            band: band as u32,
            activation,
            sequence_id: 0,
            position: 0,
            center: 0,
            token_ids: vec![],
            tokens: vec![],
            token_activations: vec![],
        };
        for (rank, (values, rows)) in totals.top_values.iter().zip(&totals.top_rows).enumerate() {
            if values[f] > 0.0 {
                examples.push((blank(ExampleKind::Top, rank, 0, values[f]), rows[f] as u64));
            }
        }
        let mut sampled: Vec<(f32, u64)> = (0..samples)
            .filter(|&j| totals.sample_keys[j][f] < EMPTY_KEY as f32)
            .map(|j| (totals.sample_values[j][f], totals.sample_rows[j][f] as u64))
            .collect();
        sampled.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let m = sampled.len();
        let mut in_band = vec![Vec::new(); s.quantile_bands];
        for (i, (value, row)) in sampled.into_iter().enumerate() {
            in_band[i * s.quantile_bands / m].push((value, row));
        }
        for (band, mut members) in in_band.into_iter().enumerate() {
            members.reverse(); // highest first
            for (rank, (value, row)) in members.into_iter().enumerate() {
                examples.push((blank(ExampleKind::Quantile, rank, band, value), row));
            }
        }
    }
    examples
}

/// Re-bins a log sketch into `bins` equal bins over (0, max]: each log bin's count goes to the
/// linear bin holding its geometric centre.
pub fn linear_histogram(log_hist: &[i64], max: f32, bins: usize) -> Vec<u32> {
    let mut out = vec![0u32; bins];
    if max <= 0.0 {
        return out;
    }
    for (b, &count) in log_hist.iter().enumerate() {
        if count > 0 {
            let centre = 10f64.powf(LOG_LO + (b as f64 + 0.5) / BINS_PER_DECADE);
            let at = ((centre / max as f64) * bins as f64).floor().clamp(0.0, (bins - 1) as f64) as usize;
            out[at] += count as u32;
        }
    }
    out
}

/// Token ids decoded on their own, each once.
struct TokenText<'a> {
    model: &'a Model,
    cache: HashMap<u32, String>,
}

impl<'a> TokenText<'a> {
    fn new(model: &'a Model) -> Self {
        TokenText { model, cache: HashMap::new() }
    }

    fn get(&mut self, id: u32) -> Result<String> {
        if let Some(text) = self.cache.get(&id) {
            return Ok(text.clone());
        }
        let text = self.model.tokenizer.decode(&[id])?;
        self.cache.insert(id, text.clone());
        Ok(text)
    }
}

/// Per feature, the `n` tokens whose logits its decoder row raises most and lowers most.
#[allow(clippy::type_complexity)]
pub fn logit_effects(sae: &Sae, model: &Model, n: usize) -> Result<(Vec<Vec<(String, f32)>>, Vec<Vec<(String, f32)>>)> {
    let _guard = tch::no_grad_guard();
    let network = &model.network;
    let device = network.device();
    let unembed = network.unembedding().to_kind(Kind::Float); // [vocab, d]
    let gain = network.final_norm_gain().to_kind(Kind::Float); // [d]
    let w_dec = sae.w_dec().detach().to_kind(Kind::Float).to_device(device); // [d_sae, d]
    if w_dec.size()[1] != unembed.size()[1] {
        bail!(
            "the SAE's decoder rows have width {} but the model's residual stream has width {}",
            w_dec.size()[1],
            unembed.size()[1]
        );
    }
    let (d_sae, vocab) = (w_dec.size()[0], unembed.size()[0]);
    let n = (n as i64).min(vocab);
    let chunk = ((1i64 << 26) / vocab).max(1);
    let mut top = Vec::with_capacity(d_sae as usize);
    let mut bottom = Vec::with_capacity(d_sae as usize);
    let mut token_text = TokenText::new(model);
    let mut decode = |ids: &Tensor, values: &Tensor| -> Result<Vec<Vec<(String, f32)>>> {
        let ids = to_rows::<i64>(ids)?;
        let values = to_rows::<f32>(values)?;
        ids.iter()
            .zip(values)
            .map(|(ids, values)| ids.iter().zip(values).map(|(&id, v)| Ok((token_text.get(id as u32)?, v))).collect())
            .collect()
    };
    let mut start = 0;
    while start < d_sae {
        let len = chunk.min(d_sae - start);
        let effects = (w_dec.narrow(0, start, len) * &gain).matmul(&unembed.tr()); // [len, vocab]
        let (values, ids) = effects.topk(n, 1, true, true);
        top.extend(decode(&ids, &values)?);
        let (values, ids) = effects.topk(n, 1, false, true);
        bottom.extend(decode(&ids, &values)?);
        start += len;
    }
    Ok((top, bottom))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulator_keeps_the_true_top_k_and_counts_across_chunks() {
        tch::manual_seed(1);
        let z = (Tensor::randn([1000, 7], (Kind::Float, Device::Cpu)) - 0.5).relu();
        let mut acc = Accumulator::new(7, 5, 6, Device::Cpu);
        for chunk in z.split(128, 0) {
            let fires = chunk.gt(0.0);
            let at = fires.nonzero();
            acc.add(chunk.size()[0], &at.select(1, 0), &at.select(1, 1), &chunk.masked_select(&fires));
        }
        assert_eq!(acc.rows, 1000);
        let (want, want_rows) = z.topk(5, 0, true, true);
        assert!(acc.top.value.allclose(&want, 0.0, 0.0, false));
        assert!(acc.top.row.equal(&want_rows));
        assert!(acc.fired.equal(&z.gt(0.0).sum_dim_intlist(0, false, Kind::Int64)));
        assert!(acc.max.equal(&z.amax(0, false)));
        assert!(acc.sum.allclose(&z.sum_dim_intlist(0, false, Kind::Double), 1e-9, 1e-9, false));
        // Sampled rows fire, are distinct, and their recorded values are the activations there.
        let keys = to_rows::<f32>(&acc.samples.key).unwrap();
        let values = to_rows::<f32>(&acc.samples.value).unwrap();
        let rows = to_rows::<i64>(&acc.samples.row).unwrap();
        for f in 0..7 {
            let mut seen = std::collections::HashSet::new();
            for j in 0..6 {
                assert!(keys[j][f] < 1.0, "enough rows fire to fill every sample slot");
                let v = z.double_value(&[rows[j][f], f as i64]) as f32;
                assert!(v > 0.0 && v == values[j][f]);
                assert!(seen.insert(rows[j][f]));
            }
        }
        // The histogram sketch counts every firing activation once.
        assert_eq!(acc.log_hist.sum(Kind::Int64).int64_value(&[]), acc.fired.sum(Kind::Int64).int64_value(&[]));
    }

    #[test]
    fn a_feature_that_fires_less_than_k_times_keeps_its_empty_slots() {
        let mut acc = Accumulator::new(3, 4, 2, Device::Cpu);
        let rows = Tensor::from_slice(&[0i64, 2]);
        let features = Tensor::from_slice(&[1i64, 1]);
        let values = Tensor::from_slice(&[0.5f32, 2.0]);
        acc.add(3, &rows, &features, &values);
        let top = to_rows::<f32>(&acc.top.value).unwrap();
        assert_eq!(top.iter().map(|r| r[1]).collect::<Vec<_>>(), vec![2.0, 0.5, -1.0, -1.0]);
        assert!(top.iter().all(|r| r[0] == -1.0 && r[2] == -1.0));
        assert_eq!(to_rows::<i64>(&acc.top.row).unwrap()[0][1], 2);
    }

    #[test]
    fn linear_histogram_keeps_every_count_and_puts_the_max_in_the_last_bin() {
        let mut log_hist = vec![0i64; LOG_BINS as usize];
        let bin_of = |v: f64| ((v.log10() - LOG_LO) * BINS_PER_DECADE).floor() as usize;
        log_hist[bin_of(10.0)] += 3;
        log_hist[bin_of(0.01)] += 2;
        let h = linear_histogram(&log_hist, 10.0, 10);
        assert_eq!(h.iter().sum::<u32>(), 5);
        assert_eq!(h[9], 3);
        assert_eq!(h[0], 2);
    }
}
