//! What `sae features build` writes, and reads back for `search`, `steer` and `browse`.
//!
//! A features folder holds three objects:
//!
//! | object | contents |
//! | --- | --- |
//! | `features.json` | [`Summary`]: where the SAE and the data came from, the pass's settings, the dead features; written last |
//! | `features.parquet` | one row per feature ([`FeatureStats`]) |
//! | `examples.parquet` | one row per example window ([`Example`]): top activations and quantile samples |
//!
//! The Parquet files are plain tables (zstd) that pyarrow or pandas read directly; list columns
//! hold histograms, logit tokens, neighbours and token windows.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::builder::{ListBuilder, PrimitiveBuilder, StringBuilder};
use arrow_array::types::{ArrowPrimitiveType, Float32Type, UInt32Type};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float32Array, Float64Array, ListArray, RecordBatch, StringArray, UInt32Array,
    UInt64Array,
};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use store::ObjectDir;

pub const SUMMARY_FILE: &str = "features.json";
pub const FEATURES_FILE: &str = "features.parquet";
pub const EXAMPLES_FILE: &str = "examples.parquet";
pub const FORMAT_VERSION: u32 = 1;

/// `features.json`: the pass's provenance and settings. Written after the Parquet files, so its
/// presence means the folder is complete.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub format_version: u32,
    /// The SAE folder the features belong to, and the SHA-256 of its `sae_weights.safetensors`
    /// (so a features folder is never shown against another SAE).
    pub sae: String,
    pub sae_weights_sha256: String,
    pub d_in: usize,
    pub d_sae: usize,
    pub hook: String,
    pub model_name: String,
    pub model_sha256: String,
    pub data: String,
    pub dataset_id: String,
    /// Dataset rows (tokens) encoded.
    pub rows: u64,
    /// Top examples kept per feature.
    pub top_k: usize,
    /// Tokens of context kept on each side of an example's token.
    pub context: usize,
    /// Quantile bands of the firing activations, and examples sampled per band.
    pub quantile_bands: usize,
    pub samples_per_band: usize,
    /// Bins of each feature's histogram: equal widths over (0, max_activation].
    pub histogram_bins: usize,
    /// Features that never fired over the rows.
    pub dead: Vec<u32>,
    pub seconds: f64,
    /// The languages (mix groups) of the corpus, when the dataset was captured from a mixed
    /// corpus and `build` traced its examples to them (`--fortune-languages`); else empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub languages: Vec<String>,
}

/// One row of `features.parquet`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FeatureStats {
    pub feature: u32,
    /// Rows on which the activation is > 0.
    pub fired: u64,
    /// fired / rows.
    pub frequency: f64,
    pub max_activation: f32,
    /// Mean activation over the rows on which the feature fired (0 when dead).
    pub mean_activation: f32,
    pub dead: bool,
    /// Counts of firing activations in `histogram_bins` equal bins over (0, max_activation].
    pub histogram: Vec<u32>,
    /// The tokens whose logits the feature's decoder direction raises most, and by how much
    /// (decoder row · final-norm weight · unembedding), best first; then those it lowers most.
    pub top_logit_tokens: Vec<String>,
    pub top_logits: Vec<f32>,
    pub bottom_logit_tokens: Vec<String>,
    pub bottom_logits: Vec<f32>,
    /// Nearest features by decoder cosine similarity, nearest first.
    pub neighbors: Vec<u32>,
    pub neighbor_cosines: Vec<f32>,
    /// Share of the feature's top examples per language of [`Summary::languages`] (empty
    /// without languages, or when it has no top example). Optional in the file: folders built
    /// before it read as empty.
    pub language_shares: Vec<f32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExampleKind {
    /// One of the feature's highest activations, `rank` 0 = the highest.
    Top,
    /// A uniform sample of the rows where the feature fires, in quantile band `band`
    /// (0 = the weakest activations).
    Quantile,
}

impl ExampleKind {
    pub fn name(self) -> &'static str {
        match self {
            ExampleKind::Top => "top",
            ExampleKind::Quantile => "quantile",
        }
    }
}

/// One row of `examples.parquet`: a window of stored tokens around the row where the feature fired.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Example {
    pub feature: u32,
    pub kind: ExampleKind,
    /// Top: 0 = highest. Quantile: position within its band, highest activation first.
    pub rank: u32,
    /// Quantile band (0 = weakest); 0 for top examples.
    pub band: u32,
    pub activation: f32,
    pub sequence_id: u64,
    /// The row's position in its captured window.
    pub position: u32,
    /// Index of the example's token within `token_ids`.
    pub center: u32,
    pub token_ids: Vec<u32>,
    /// Each token decoded on its own.
    pub tokens: Vec<String>,
    /// The feature's activation at each token of the window.
    pub token_activations: Vec<f32>,
}

/// A whole features folder in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureSet {
    pub summary: Summary,
    /// Indexed by feature id.
    pub features: Vec<FeatureStats>,
    /// Grouped by feature, then top before quantile, then rank.
    pub examples: Vec<Example>,
}

/// The widest SAE a summary may describe, and the most of each per-feature count: the sizes
/// drive page counts, widths and loops of the readers, so a forged `features.json` is refused.
const MAX_SUMMARY_D_SAE: usize = 1 << 24;
const MAX_SUMMARY_COUNT: usize = 1 << 16;

impl Summary {
    /// The sizes a reader relies on: dead latents are distinct latents of the SAE, and every
    /// count is within reason.
    pub fn check_sizes(&self) -> std::result::Result<(), String> {
        if self.d_sae == 0 || self.d_sae > MAX_SUMMARY_D_SAE || self.d_in == 0 || self.d_in > MAX_SUMMARY_D_SAE {
            return Err(format!("d_sae {} and d_in {} must be in 1..={MAX_SUMMARY_D_SAE}", self.d_sae, self.d_in));
        }
        if let Some(&bad) = self.dead.iter().find(|&&f| f as usize >= self.d_sae) {
            return Err(format!("dead latent {bad} is not a latent of an SAE of {}", self.d_sae));
        }
        if self.dead.len() > self.d_sae {
            return Err(format!("{} dead latents of {}", self.dead.len(), self.d_sae));
        }
        for (name, count) in [
            ("top_k", self.top_k),
            ("context", self.context),
            ("quantile_bands", self.quantile_bands),
            ("samples_per_band", self.samples_per_band),
            ("histogram_bins", self.histogram_bins),
        ] {
            if count > MAX_SUMMARY_COUNT {
                return Err(format!("{name} {count} is more than {MAX_SUMMARY_COUNT}"));
            }
        }
        Ok(())
    }
}

impl FeatureSet {
    /// The examples of one feature (they are stored grouped by feature).
    pub fn examples_of(&self, feature: u32) -> &[Example] {
        let start = self.examples.partition_point(|e| e.feature < feature);
        let end = self.examples.partition_point(|e| e.feature <= feature);
        &self.examples[start..end]
    }

    /// The distinct tokens at the centre of a feature's top examples, highest activation first:
    /// the tokens it fires on most.
    pub fn top_tokens(&self, feature: u32) -> Vec<&str> {
        let mut tokens: Vec<&str> = Vec::new();
        for e in self.examples_of(feature).iter().filter(|e| e.kind == ExampleKind::Top) {
            if let Some(t) = e.tokens.get(e.center as usize) {
                if !tokens.contains(&t.as_str()) {
                    tokens.push(t);
                }
            }
        }
        tokens
    }

    /// The languages of a feature's top examples, most frequent first: "en 60% · de 40%"
    /// (empty without languages).
    pub fn language_summary(&self, feature: u32) -> String {
        let Some(f) = self.features.get(feature as usize) else { return String::new() };
        let mut shares: Vec<(&String, f32)> =
            self.summary.languages.iter().zip(f.language_shares.iter().copied()).collect();
        shares.sort_by(|a, b| b.1.total_cmp(&a.1));
        let parts: Vec<String> =
            shares.iter().filter(|(_, s)| *s > 0.0).map(|(l, s)| format!("{l} {:.0}%", s * 100.0)).collect();
        parts.join(" · ")
    }

    /// Writes the Parquet files, then `features.json`. An older `features.json` is removed first,
    /// so a rewrite cut short leaves a folder that reads as unfinished, never as a mix.
    pub fn write(&self, dir: &ObjectDir) -> Result<()> {
        dir.delete(SUMMARY_FILE)?;
        dir.put(FEATURES_FILE, to_parquet(features_batch(&self.features)?)?)?;
        dir.put(EXAMPLES_FILE, to_parquet(examples_batch(&self.examples)?)?)?;
        let mut json = serde_json::to_vec_pretty(&self.summary)?;
        json.push(b'\n');
        dir.put(SUMMARY_FILE, json)?;
        Ok(())
    }

    /// Reads only `features.json`; `None` when the folder holds no finished build.
    pub fn read_summary(dir: &ObjectDir) -> Result<Option<Summary>> {
        let Some(bytes) = dir.get(SUMMARY_FILE)? else { return Ok(None) };
        let summary: Summary = serde_json::from_slice(&bytes)
            .with_context(|| format!("`{}` is not a features summary", dir.display(SUMMARY_FILE)))?;
        if summary.format_version != FORMAT_VERSION {
            bail!(
                "`{}` has format version {}, this program reads {FORMAT_VERSION}",
                dir.display(SUMMARY_FILE),
                summary.format_version
            );
        }
        summary
            .check_sizes()
            .map_err(|detail| anyhow::anyhow!("`{}` is damaged: {detail}", dir.display(SUMMARY_FILE)))?;
        Ok(Some(summary))
    }

    pub fn read(dir: &ObjectDir) -> Result<FeatureSet> {
        let summary = Self::read_summary(dir)?.with_context(|| {
            format!("`{}` holds no features (no {SUMMARY_FILE}); run `sae features build` first", dir.url())
        })?;
        let read = |key: &str| -> Result<Vec<RecordBatch>> {
            let bytes = dir.get(key)?.with_context(|| format!("`{}` is missing", dir.display(key)))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .and_then(|b| b.build())
                .with_context(|| format!("`{}` is not a Parquet file", dir.display(key)))?;
            reader.collect::<Result<Vec<_>, _>>().with_context(|| format!("cannot read `{}`", dir.display(key)))
        };
        let mut features = Vec::new();
        for batch in read(FEATURES_FILE)? {
            features.extend(
                features_from_batch(&batch)
                    .with_context(|| format!("`{}` has an unexpected schema", dir.display(FEATURES_FILE)))?,
            );
        }
        let mut examples = Vec::new();
        for batch in read(EXAMPLES_FILE)? {
            examples.extend(
                examples_from_batch(&batch)
                    .with_context(|| format!("`{}` has an unexpected schema", dir.display(EXAMPLES_FILE)))?,
            );
        }
        if features.len() != summary.d_sae || features.iter().enumerate().any(|(i, f)| f.feature as usize != i) {
            bail!("`{}` does not hold features 0..{} in order", dir.display(FEATURES_FILE), summary.d_sae);
        }
        if let Some(f) = features
            .iter()
            .find(|f| !f.language_shares.is_empty() && f.language_shares.len() != summary.languages.len())
        {
            bail!(
                "`{}` gives feature {} shares of {} languages, but the summary lists {}",
                dir.display(FEATURES_FILE),
                f.feature,
                f.language_shares.len(),
                summary.languages.len()
            );
        }
        Ok(FeatureSet { summary, features, examples })
    }
}

fn to_parquet(batch: RecordBatch) -> Result<Vec<u8>> {
    let props = WriterProperties::builder().set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?)).build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(out)
}

fn list_field(name: &str, item: DataType) -> Field {
    Field::new(name, DataType::List(Arc::new(Field::new("item", item, true))), false)
}

fn strings<'a>(rows: impl Iterator<Item = &'a Vec<String>>) -> ArrayRef {
    let mut b = ListBuilder::new(StringBuilder::new());
    for row in rows {
        for s in row {
            b.values().append_value(s);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

/// A list column of numbers of Arrow type `T` (`Float32Type`, `UInt32Type`), a list per row.
fn numbers<'a, T: ArrowPrimitiveType>(rows: impl Iterator<Item = &'a Vec<T::Native>>) -> ArrayRef {
    let mut b = ListBuilder::new(PrimitiveBuilder::<T>::new());
    for row in rows {
        b.values().append_slice(row);
        b.append(true);
    }
    Arc::new(b.finish())
}

fn features_batch(f: &[FeatureStats]) -> Result<RecordBatch> {
    let schema = Schema::new(vec![
        Field::new("feature", DataType::UInt32, false),
        Field::new("fired", DataType::UInt64, false),
        Field::new("frequency", DataType::Float64, false),
        Field::new("max_activation", DataType::Float32, false),
        Field::new("mean_activation", DataType::Float32, false),
        Field::new("dead", DataType::Boolean, false),
        list_field("histogram", DataType::UInt32),
        list_field("top_logit_tokens", DataType::Utf8),
        list_field("top_logits", DataType::Float32),
        list_field("bottom_logit_tokens", DataType::Utf8),
        list_field("bottom_logits", DataType::Float32),
        list_field("neighbors", DataType::UInt32),
        list_field("neighbor_cosines", DataType::Float32),
        list_field("language_shares", DataType::Float32),
    ]);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(f.iter().map(|x| x.feature))),
        Arc::new(UInt64Array::from_iter_values(f.iter().map(|x| x.fired))),
        Arc::new(Float64Array::from_iter_values(f.iter().map(|x| x.frequency))),
        Arc::new(Float32Array::from_iter_values(f.iter().map(|x| x.max_activation))),
        Arc::new(Float32Array::from_iter_values(f.iter().map(|x| x.mean_activation))),
        Arc::new(BooleanArray::from(f.iter().map(|x| x.dead).collect::<Vec<_>>())),
        numbers::<UInt32Type>(f.iter().map(|x| &x.histogram)),
        strings(f.iter().map(|x| &x.top_logit_tokens)),
        numbers::<Float32Type>(f.iter().map(|x| &x.top_logits)),
        strings(f.iter().map(|x| &x.bottom_logit_tokens)),
        numbers::<Float32Type>(f.iter().map(|x| &x.bottom_logits)),
        numbers::<UInt32Type>(f.iter().map(|x| &x.neighbors)),
        numbers::<Float32Type>(f.iter().map(|x| &x.neighbor_cosines)),
        numbers::<Float32Type>(f.iter().map(|x| &x.language_shares)),
    ];
    Ok(RecordBatch::try_new(Arc::new(schema), columns)?)
}

fn examples_batch(e: &[Example]) -> Result<RecordBatch> {
    let schema = Schema::new(vec![
        Field::new("feature", DataType::UInt32, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("rank", DataType::UInt32, false),
        Field::new("band", DataType::UInt32, false),
        Field::new("activation", DataType::Float32, false),
        Field::new("sequence_id", DataType::UInt64, false),
        Field::new("position", DataType::UInt32, false),
        Field::new("center", DataType::UInt32, false),
        list_field("token_ids", DataType::UInt32),
        list_field("tokens", DataType::Utf8),
        list_field("token_activations", DataType::Float32),
    ]);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(e.iter().map(|x| x.feature))),
        Arc::new(StringArray::from_iter_values(e.iter().map(|x| x.kind.name()))),
        Arc::new(UInt32Array::from_iter_values(e.iter().map(|x| x.rank))),
        Arc::new(UInt32Array::from_iter_values(e.iter().map(|x| x.band))),
        Arc::new(Float32Array::from_iter_values(e.iter().map(|x| x.activation))),
        Arc::new(UInt64Array::from_iter_values(e.iter().map(|x| x.sequence_id))),
        Arc::new(UInt32Array::from_iter_values(e.iter().map(|x| x.position))),
        Arc::new(UInt32Array::from_iter_values(e.iter().map(|x| x.center))),
        numbers::<UInt32Type>(e.iter().map(|x| &x.token_ids)),
        strings(e.iter().map(|x| &x.tokens)),
        numbers::<Float32Type>(e.iter().map(|x| &x.token_activations)),
    ];
    Ok(RecordBatch::try_new(Arc::new(schema), columns)?)
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .with_context(|| format!("no column `{name}`"))?
        .as_any()
        .downcast_ref::<T>()
        .with_context(|| {
            format!(
                "column `{name}` has type {}",
                batch.column_by_name(name).map_or(DataType::Null, |c| c.data_type().clone())
            )
        })
}

/// Row `i` of a list column, as the values of type `T` turned into `Vec<V>` by `f`.
fn list_row<T: 'static, V>(list: &ListArray, i: usize, f: impl Fn(&T) -> Vec<V>) -> Result<Vec<V>> {
    let values = list.value(i);
    let typed = values.as_any().downcast_ref::<T>().context("list column of an unexpected item type")?;
    Ok(f(typed))
}

fn string_list(list: &ListArray, i: usize) -> Result<Vec<String>> {
    list_row::<StringArray, String>(list, i, |a| a.iter().map(|s| s.unwrap_or_default().to_string()).collect())
}
fn float_list(list: &ListArray, i: usize) -> Result<Vec<f32>> {
    list_row::<Float32Array, f32>(list, i, |a| a.values().to_vec())
}
fn uint_list(list: &ListArray, i: usize) -> Result<Vec<u32>> {
    list_row::<UInt32Array, u32>(list, i, |a| a.values().to_vec())
}

fn features_from_batch(b: &RecordBatch) -> Result<Vec<FeatureStats>> {
    let feature = column::<UInt32Array>(b, "feature")?;
    let fired = column::<UInt64Array>(b, "fired")?;
    let frequency = column::<Float64Array>(b, "frequency")?;
    let max = column::<Float32Array>(b, "max_activation")?;
    let mean = column::<Float32Array>(b, "mean_activation")?;
    let dead = column::<BooleanArray>(b, "dead")?;
    let lists = [
        "histogram",
        "top_logit_tokens",
        "top_logits",
        "bottom_logit_tokens",
        "bottom_logits",
        "neighbors",
        "neighbor_cosines",
    ]
    .map(|name| column::<ListArray>(b, name));
    let [histogram, top_tokens, top_logits, bottom_tokens, bottom_logits, neighbors, cosines] = lists;
    let (histogram, top_tokens, top_logits, bottom_tokens, bottom_logits, neighbors, cosines) =
        (histogram?, top_tokens?, top_logits?, bottom_tokens?, bottom_logits?, neighbors?, cosines?);
    let languages =
        b.column_by_name("language_shares").map(|_| column::<ListArray>(b, "language_shares")).transpose()?;
    (0..b.num_rows())
        .map(|i| {
            Ok(FeatureStats {
                feature: feature.value(i),
                fired: fired.value(i),
                frequency: frequency.value(i),
                max_activation: max.value(i),
                mean_activation: mean.value(i),
                dead: dead.value(i),
                histogram: uint_list(histogram, i)?,
                top_logit_tokens: string_list(top_tokens, i)?,
                top_logits: float_list(top_logits, i)?,
                bottom_logit_tokens: string_list(bottom_tokens, i)?,
                bottom_logits: float_list(bottom_logits, i)?,
                neighbors: uint_list(neighbors, i)?,
                neighbor_cosines: float_list(cosines, i)?,
                language_shares: languages.map(|l| float_list(l, i)).transpose()?.unwrap_or_default(),
            })
        })
        .collect()
}

fn examples_from_batch(b: &RecordBatch) -> Result<Vec<Example>> {
    let feature = column::<UInt32Array>(b, "feature")?;
    let kind = column::<StringArray>(b, "kind")?;
    let rank = column::<UInt32Array>(b, "rank")?;
    let band = column::<UInt32Array>(b, "band")?;
    let activation = column::<Float32Array>(b, "activation")?;
    let sequence_id = column::<UInt64Array>(b, "sequence_id")?;
    let position = column::<UInt32Array>(b, "position")?;
    let center = column::<UInt32Array>(b, "center")?;
    let token_ids = column::<ListArray>(b, "token_ids")?;
    let tokens = column::<ListArray>(b, "tokens")?;
    let token_activations = column::<ListArray>(b, "token_activations")?;
    (0..b.num_rows())
        .map(|i| {
            let kind = match kind.value(i) {
                "top" => ExampleKind::Top,
                "quantile" => ExampleKind::Quantile,
                other => bail!("unknown example kind `{other}`"),
            };
            Ok(Example {
                feature: feature.value(i),
                kind,
                rank: rank.value(i),
                band: band.value(i),
                activation: activation.value(i),
                sequence_id: sequence_id.value(i),
                position: position.value(i),
                center: center.value(i),
                token_ids: uint_list(token_ids, i)?,
                tokens: string_list(tokens, i)?,
                token_activations: float_list(token_activations, i)?,
            })
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small set with hostile strings, for round trips and for the browser's tests.
    pub fn sample_set() -> FeatureSet {
        let summary = Summary {
            format_version: FORMAT_VERSION,
            sae: "runs/x".into(),
            sae_weights_sha256: "ab".repeat(32),
            d_in: 4,
            d_sae: 2,
            hook: "blocks.1.hook_resid_post".into(),
            model_name: "m".into(),
            model_sha256: "cd".repeat(32),
            data: "data/x".into(),
            dataset_id: "id".into(),
            rows: 100,
            top_k: 2,
            context: 2,
            quantile_bands: 2,
            samples_per_band: 1,
            histogram_bins: 4,
            dead: vec![1],
            seconds: 1.5,
            languages: vec!["en".into(), "de".into()],
        };
        let features = vec![
            FeatureStats {
                feature: 0,
                fired: 10,
                frequency: 0.1,
                max_activation: 3.5,
                mean_activation: 1.25,
                dead: false,
                histogram: vec![5, 3, 1, 1],
                top_logit_tokens: vec![
                    " </script><script>document.body.setAttribute('data-pwned','3')</script>".into(),
                    "\"a\"".into(),
                ],
                top_logits: vec![0.5, 0.25],
                bottom_logit_tokens: vec!["</b>".into()],
                bottom_logits: vec![-0.5],
                neighbors: vec![1],
                neighbor_cosines: vec![0.125],
                language_shares: vec![0.5, 0.5],
            },
            FeatureStats {
                feature: 1,
                fired: 0,
                frequency: 0.0,
                max_activation: 0.0,
                mean_activation: 0.0,
                dead: true,
                histogram: vec![0; 4],
                top_logit_tokens: vec![],
                top_logits: vec![],
                bottom_logit_tokens: vec![],
                bottom_logits: vec![],
                neighbors: vec![0],
                neighbor_cosines: vec![0.125],
                language_shares: vec![],
            },
        ];
        let example = |kind, rank, activation: f32| Example {
            feature: 0,
            kind,
            rank,
            band: 0,
            activation,
            sequence_id: 7,
            position: 3,
            center: 1,
            token_ids: vec![10, 11, 12],
            tokens: vec![
                "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">".into(),
                "<script>document.body.setAttribute('data-pwned','2')</script>".into(),
                " ok & done".into(),
            ],
            token_activations: vec![0.0, activation, 0.5],
        };
        let examples = vec![
            example(ExampleKind::Top, 0, 3.5),
            example(ExampleKind::Top, 1, 3.0),
            example(ExampleKind::Quantile, 0, 0.75),
        ];
        FeatureSet { summary, features, examples }
    }

    #[test]
    fn round_trips_through_parquet_and_json() {
        let dir = tempfile::tempdir().unwrap();
        let objects = ObjectDir::open(dir.path().to_str().unwrap(), &store::StoreOptions::default()).unwrap();
        let set = sample_set();
        set.write(&objects).unwrap();
        let back = FeatureSet::read(&objects).unwrap();
        assert_eq!(back, set);
        assert_eq!(back.examples_of(0).len(), 3);
        assert!(back.examples_of(1).is_empty());
        // Both top examples centre on the same token: listed once.
        assert_eq!(back.top_tokens(0), vec![set.examples[0].tokens[1].as_str()]);
        assert!(back.top_tokens(1).is_empty());
    }

    #[test]
    fn forged_sizes_in_features_json_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let objects = ObjectDir::open(dir.path().to_str().unwrap(), &store::StoreOptions::default()).unwrap();
        let set = sample_set();
        let forgeries: [fn(&mut Summary); 5] = [
            |s: &mut Summary| s.dead = vec![0; s.d_sae + 1],
            |s: &mut Summary| s.dead = vec![u32::MAX],
            |s: &mut Summary| s.d_sae = 0,
            |s: &mut Summary| s.d_sae = usize::MAX,
            |s: &mut Summary| s.top_k = usize::MAX,
        ];
        for forge in forgeries {
            let mut forged = set.clone();
            forge(&mut forged.summary);
            forged.write(&objects).unwrap();
            let err = format!("{:#}", FeatureSet::read_summary(&objects).unwrap_err());
            assert!(err.contains(SUMMARY_FILE) && err.contains("damaged"), "{err}");
        }
    }

    #[test]
    fn damaged_or_unfinished_folders_are_errors_that_name_the_object() {
        let dir = tempfile::tempdir().unwrap();
        let objects = ObjectDir::open(dir.path().to_str().unwrap(), &store::StoreOptions::default()).unwrap();
        let err = FeatureSet::read(&objects).unwrap_err().to_string();
        assert!(err.contains("holds no features"), "{err}");
        sample_set().write(&objects).unwrap();
        std::fs::write(dir.path().join(FEATURES_FILE), b"not parquet").unwrap();
        let err = format!("{:#}", FeatureSet::read(&objects).unwrap_err());
        assert!(err.contains(FEATURES_FILE) && err.contains("not a Parquet file"), "{err}");
        // Another table's schema.
        std::fs::copy(dir.path().join(EXAMPLES_FILE), dir.path().join(FEATURES_FILE)).unwrap();
        let err = format!("{:#}", FeatureSet::read(&objects).unwrap_err());
        assert!(err.contains(FEATURES_FILE) && err.contains("unexpected schema"), "{err}");
        std::fs::write(dir.path().join(SUMMARY_FILE), b"{").unwrap();
        let err = format!("{:#}", FeatureSet::read(&objects).unwrap_err());
        assert!(err.contains(SUMMARY_FILE), "{err}");
    }
}
