//! The languages of a feature's top examples, from the files they came from.
//!
//! A dataset stores no document ids, only (window, position) per row. For a dataset captured
//! from a mixed corpus ([`capture::corpus::Mix`], e.g. the multilingual fortunes), the corpus is
//! read and packed into windows again, exactly as capture did (same files, same tokenizer, same
//! window length; checked through the corpus fingerprint the dataset's manifest records), and
//! each example's token is traced to its document, its file, and the mix group (language) of
//! that file. Re-tokenizing is cheap next to the model: about a second per million tokens per core.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use capture::corpus::{Corpus, CorpusSpec};
use capture::tokenizer::TextTokenizer;
use capture::windows::{WindowOptions, WindowStream};
use store::Manifest;

use super::set::{Example, ExampleKind, FeatureStats};

/// Opens `spec` and checks that it is the corpus the dataset of `manifest` was captured from.
pub fn check_corpus(spec: &CorpusSpec, manifest: &Manifest) -> Result<Corpus> {
    let corpus = Corpus::open(spec.clone())?;
    let fingerprint = corpus.fingerprint().with_context(|| format!("cannot read the corpus {}", spec.name))?;
    if fingerprint.sha256 != manifest.corpus.sha256 {
        bail!(
            "the dataset was captured from another corpus ({}, sha256 {}) than {} (sha256 {}): its examples cannot be traced to languages",
            manifest.corpus.name,
            manifest.corpus.sha256,
            spec.name,
            fingerprint.sha256
        );
    }
    Ok(corpus)
}

/// The group (language) of each example's own token, as an index into the returned names.
pub fn example_languages(
    spec: CorpusSpec,
    tokenizer: &TextTokenizer,
    manifest: &Manifest,
    examples: &[Example],
) -> Result<(Vec<String>, Vec<usize>)> {
    let mix = spec.mix.clone().context("the corpus is not a mixed one: it has no groups to attribute examples to")?;
    let corpus = check_corpus(&spec, manifest)?;
    let names: Vec<String> = mix.groups.iter().map(|g| g.name.clone()).collect();
    let group_of_file: Vec<usize> = corpus
        .files()
        .iter()
        .map(|f| mix.groups.iter().position(|g| g.inputs.contains(&f.input)).expect("mix covers every input"))
        .collect();
    // The windows the examples sit in, each asked for once.
    let mut wanted: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, e) in examples.iter().enumerate() {
        wanted.entry(e.sequence_id).or_default().push(i);
    }
    let Some(&last) = wanted.keys().max() else { return Ok((names, vec![])) };
    let options = WindowOptions { end_window: Some(last + 1), ..WindowOptions::new(manifest.context_len) };
    let mut language = vec![usize::MAX; examples.len()];
    for window in WindowStream::start(corpus, Arc::new(tokenizer.clone()), options)? {
        let window = window?;
        for &i in wanted.get(&window.sequence_id).map_or(&[][..], Vec::as_slice) {
            let e = &examples[i];
            let at = e.position as usize;
            let center_token = e.token_ids.get(e.center as usize).copied();
            if window.tokens.get(at).copied() != center_token {
                bail!(
                    "window {} of the corpus does not hold the dataset's token at position {at}: the dataset was not captured with windows of {} tokens of this corpus",
                    window.sequence_id,
                    manifest.context_len
                );
            }
            let doc = window.document_at(at).context("a window with no documents")?;
            language[i] = group_of_file[doc.file as usize];
        }
    }
    if let Some(i) = language.iter().position(|&l| l == usize::MAX) {
        bail!(
            "the corpus ended before window {} (example of feature {})",
            examples[i].sequence_id,
            examples[i].feature
        );
    }
    Ok((names, language))
}

/// Sets each feature's `language_shares`: the share of its top examples per language.
pub fn set_language_shares(features: &mut [FeatureStats], examples: &[Example], language: &[usize], languages: usize) {
    let mut counts: Vec<Vec<u32>> = vec![vec![0; languages]; features.len()];
    for (e, &l) in examples.iter().zip(language) {
        if e.kind == ExampleKind::Top {
            counts[e.feature as usize][l] += 1;
        }
    }
    for (f, c) in features.iter_mut().zip(counts) {
        let total: u32 = c.iter().sum();
        f.language_shares = if total == 0 { vec![] } else { c.iter().map(|&n| n as f32 / total as f32).collect() };
    }
}
