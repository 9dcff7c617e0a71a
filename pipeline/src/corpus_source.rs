//! The corpus flags shared by the commands that read text, and the window stream they open.

use std::sync::Arc;

use anyhow::{Context, Result};
use capture::corpus::{Corpus, CorpusFormat, CorpusSpec};
use capture::tokenizer::TextTokenizer;
use capture::windows::{WindowOptions, WindowStream};

#[derive(clap::Args, Debug, Clone)]
pub struct CorpusArgs {
    /// Text inputs: files, folders (read recursively, in sorted order) or object-store URLs.
    /// Several may follow one --corpus, or --corpus may be repeated; they are read in order.
    /// Default: the English fortune files of /usr/share/games/fortunes (fortune format), or the
    /// mixed languages of --fortune-languages.
    #[arg(long = "corpus", value_name = "PATH_OR_URL", num_args = 1..)]
    pub inputs: Vec<String>,
    /// text (a file is a document), fortune (documents separated by `%` lines), jsonl or parquet.
    /// Default: fortune for the default corpus, else text.
    #[arg(long)]
    pub corpus_format: Option<CorpusFormat>,
    /// The JSONL key or Parquet column that holds the text.
    #[arg(long, default_value = capture::corpus::DEFAULT_TEXT_FIELD)]
    pub text_field: String,
    /// Instead of the English fortunes, Debian's fortunes in these languages (en, de, es, zh),
    /// interleaved in a fixed cycle of documents per language (en 16, de 8, es 12, zh 1), so any
    /// prefix holds the same mix.
    #[arg(long, value_delimiter = ',', value_name = "LANGS", conflicts_with_all = ["inputs", "corpus_format"])]
    pub fortune_languages: Vec<String>,
}

impl CorpusArgs {
    pub fn spec(&self) -> Result<CorpusSpec> {
        let spec = if !self.fortune_languages.is_empty() {
            CorpusSpec::multilingual_fortunes(&self.fortune_languages)?
        } else if self.inputs.is_empty() {
            let mut spec = CorpusSpec::default_fortunes()?;
            if let Some(format) = self.corpus_format {
                spec.format = format;
            }
            spec
        } else {
            CorpusSpec::new(self.inputs.iter().cloned(), self.corpus_format.unwrap_or_default())
        };
        Ok(spec.with_text_field(self.text_field.clone()))
    }
}

/// A listed corpus, its identity, and windows of it on demand.
pub struct WindowSource {
    corpus: Corpus,
    identity: store::CorpusIdentity,
    tokenizer: Arc<TextTokenizer>,
    context_len: usize,
}

impl WindowSource {
    /// Lists the corpus and hashes its files (the identity a dataset records).
    pub fn open(args: &CorpusArgs, tokenizer: &TextTokenizer, context_len: usize) -> Result<Self> {
        let spec = args.spec()?;
        let corpus = Corpus::open(spec.clone())?;
        let fingerprint = corpus.fingerprint().with_context(|| format!("cannot read the corpus {}", spec.name))?;
        tracing::info!(corpus = %spec.name, files = fingerprint.files, bytes = fingerprint.bytes, "corpus");
        let identity = fingerprint.to_manifest(&spec, String::new());
        Ok(WindowSource { corpus, identity, tokenizer: Arc::new(tokenizer.clone()), context_len })
    }

    pub fn identity(&self) -> &store::CorpusIdentity {
        &self.identity
    }

    pub fn format(&self) -> CorpusFormat {
        self.corpus.spec().format
    }

    /// Windows `start..end` of the global window order (fewer if the corpus ends first).
    pub fn windows(&self, start: u64, end: u64) -> Result<WindowStream> {
        let options =
            WindowOptions { start_window: start, end_window: Some(end), ..WindowOptions::new(self.context_len) };
        Ok(WindowStream::start(self.corpus.clone(), self.tokenizer.clone(), options)?)
    }
}
