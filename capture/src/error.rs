//! The crate's error type. Every variant that concerns a file, folder, URL, field or tensor names
//! it; a failure of this process (a thread or runtime that cannot start, a tokenizer library
//! error) has its own variant. Where a cause is kept as the error's `source()`, the message does
//! not repeat it, so a caller printing the chain (`{:#}` of an `anyhow::Error`) prints it once.

use std::path::PathBuf;

use crate::architecture::supported_list;
use crate::config::ConfigError;
use crate::corpus::{CorpusFormat, MixError};
use crate::decoder::TokenInputError;
use crate::gguf::GgufError;
use crate::model::RotaryShapeError;
use crate::weights::WeightError;

/// Errors of loading a model, tokenizing, generating, and reading a corpus into windows.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- Files in general.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not JSON")]
    NotJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is {size} bytes, more than the {max_bytes} such a file can be")]
    FileTooLarge { path: PathBuf, size: u64, max_bytes: u64 },

    // --- The model: its files, configuration and weights.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Mix(#[from] MixError),
    #[error("model {path} does not exist (run `make setup` to install the default model, or pass --model PATH)")]
    ModelMissing { path: PathBuf },
    #[error("cannot open model {path}")]
    OpenModel {
        path: PathBuf,
        #[source]
        source: GgufError,
    },
    #[error("{path}: architecture {arch:?} is not supported (only \"llama\")")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("invalid model header in {path}")]
    InvalidModelHeader {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("{path} is not a Llama config.json")]
    NotLlamaConfig {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// `family` as people write it: "GPT-2", "GPT-NeoX", "Gemma 2".
    #[error("{path} is not a valid {family} config.json")]
    NotFamilyConfig {
        path: PathBuf,
        family: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid model config in {path}")]
    InvalidModelConfig {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error(
        "{path}: rotary scaling ({arch}.rope.scaling.type = {scaling:?} or a rope_freqs.weight tensor) is not \
         implemented for GGUF files; load the model's Hugging Face folder instead"
    )]
    GgufRopeScaling { path: PathBuf, arch: String, scaling: String },

    // --- Which family a Hugging Face config.json describes, and settings we do not compute.
    #[error("{path}: model_type {model_type:?} is not supported (supported: {})", supported_list())]
    UnsupportedModelType { path: PathBuf, model_type: String },
    #[error("{path}: architectures entry {class:?} is not supported (supported: {})", supported_list())]
    UnsupportedModelClass { path: PathBuf, class: String },
    #[error("{path}: model_type {model_type:?} disagrees with architectures entry {class:?}")]
    DisagreeingArchitecture { path: PathBuf, model_type: String, class: String },
    #[error(
        "{path}: names neither model_type nor architectures, so its architecture is unknown (supported: {})",
        supported_list()
    )]
    UnnamedArchitecture { path: PathBuf },
    /// `field` is the config's name for the activation (`hidden_act`, `activation_function`, ...).
    #[error("{path}: {field} {name:?} is not implemented (only {supported})")]
    UnsupportedActivation { path: PathBuf, field: &'static str, name: String, supported: &'static str },
    /// `rope_type` is the `rope_type` (or `type`) that `rope_scaling` names.
    #[error("{path}: rope_scaling type {rope_type:?} is not implemented (only \"default\" and \"llama3\")")]
    UnsupportedRopeScaling { path: PathBuf, rope_type: String },
    #[error("{path}: rope_scaling {value} names no rope_type")]
    UnnamedRopeScaling { path: PathBuf, value: String },
    #[error("{path}: rope_scaling of type {rope_type:?} needs a number {key}")]
    RopeScalingParameter { path: PathBuf, rope_type: &'static str, key: &'static str },
    /// `value` is the field's JSON.
    #[error("{path}: field {field} = {value} changes the computation in a way that is not implemented ({why})")]
    UnsupportedField { path: PathBuf, field: String, value: String, why: &'static str },
    /// `value` is the field's JSON; `expected` says what it must be ("a positive integer").
    #[error("{path}: field {field} = {value} must be {expected}")]
    InvalidField { path: PathBuf, field: String, value: String, expected: &'static str },

    // --- The weights.
    #[error("{path}: tensor {tensor}")]
    RotaryWeight {
        path: PathBuf,
        tensor: String,
        #[source]
        source: RotaryShapeError,
    },
    #[error("cannot build the model from {path}")]
    BuildModel {
        path: PathBuf,
        #[source]
        source: WeightError,
    },
    #[error("cannot read {path}")]
    ReadSafetensors {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
    #[error("{dir} holds neither model.safetensors nor model.safetensors.index.json")]
    NoSafetensors { dir: PathBuf },
    #[error("{index} has no weight_map")]
    NoWeightMap { index: PathBuf },
    /// `value` is the JSON the index holds where a file name belongs.
    #[error("{index}: tensor {tensor:?} maps to {value}, not a file name")]
    ShardNotAString { index: PathBuf, tensor: String, value: String },
    #[error("{index}: tensor {tensor:?} maps to {name:?}, which is not a file name in the folder")]
    ShardOutsideFolder { index: PathBuf, tensor: String, name: String },
    #[error("{index}: weight_map is empty")]
    EmptyWeightMap { index: PathBuf },

    // --- Running the model.
    #[error(transparent)]
    TokenInput(#[from] TokenInputError),
    #[error("the prompt is empty after tokenization")]
    EmptyPrompt,
    #[error("temperature must be a finite number >= 0, got {temperature}")]
    BadTemperature { temperature: f64 },
    #[error("unknown device {spec:?}: use cpu, cuda or cuda:N")]
    UnknownDevice { spec: String },
    #[error("device cuda:{index} was asked for, but {visible} CUDA device(s) are visible")]
    NoSuchCudaDevice { index: usize, visible: usize },
    #[error("unknown dtype {spec:?}: use f32, bf16 or f16")]
    UnknownDtype { spec: String },

    // --- The tokenizer. `cause` is the tokenizers library's error, printed in the message.
    #[error("{path}: tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\")")]
    UnsupportedTokenizer { path: PathBuf, model: String },
    #[error("{path}: {key} is not an array")]
    NotAnArray { path: PathBuf, key: String },
    #[error("{path}: {key} holds a non-string")]
    NonStringItem { path: PathBuf, key: String },
    #[error("{path}: malformed merge {merge:?}")]
    MalformedMerge { path: PathBuf, merge: String },
    #[error("{path}: cannot build the BPE tokenizer: {cause}")]
    BuildBpe { path: PathBuf, cause: tokenizers::Error },
    #[error("{path}: BOS id {bos} is outside the vocabulary")]
    BosOutsideVocabulary { path: PathBuf, bos: u32 },
    /// The tokenizers library refused the template that prepends BOS.
    #[error("{detail}")]
    BosTemplate { detail: String },
    #[error("cannot load tokenizer {path}: {cause}")]
    LoadTokenizer { path: PathBuf, cause: tokenizers::Error },
    #[error("tokenizer failed: {cause}")]
    Encode { cause: tokenizers::Error },
    #[error("cannot decode tokens: {cause}")]
    Decode { cause: tokenizers::Error },
    #[error("cannot serialize the tokenizer: {cause}")]
    SerializeTokenizer { cause: tokenizers::Error },

    // --- Listing a corpus. `input` and `url` are printed without credentials.
    #[error("unknown corpus format `{name}` (expected text, fortune, jsonl or parquet)")]
    UnknownCorpusFormat { name: String },
    #[error("cannot list the fortunes folder {dir} (install Debian's `fortunes` package)")]
    NoFortunesFolder {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list the fortunes folder {dir}")]
    ListFortunes {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot stat {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the fortunes folder {dir} holds no English fortune files (install Debian's `fortunes` package)")]
    NoEnglishFortunes { dir: PathBuf },
    #[error("no corpus input given")]
    NoCorpusInput,
    #[error("bad corpus input `{input}`")]
    BadCorpusInput {
        input: String,
        #[source]
        source: store::Error,
    },
    #[error("corpus input {path} does not exist or cannot be read")]
    CorpusInputUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corpus input {path} is a broken symlink")]
    BrokenSymlink {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corpus input {path} is neither a file nor a folder")]
    NotFileOrFolder { path: PathBuf },
    #[error("cannot list corpus folder {path}")]
    ListFolder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list corpus input {url}")]
    ListObjects {
        url: String,
        #[source]
        source: store::StoreFailure,
    },
    #[error("corpus input {url} does not exist (no object there or under it)")]
    NoObject { url: String },
    #[error("cannot read corpus input {url}")]
    HeadObject {
        url: String,
        #[source]
        source: store::StoreFailure,
    },
    /// `skipped` counts the files left out of the listing.
    #[error("empty corpus: no {format} files found in {inputs}{}", skipped_note(.skipped))]
    NoCorpusFiles { format: CorpusFormat, inputs: String, skipped: usize },
    #[error("corpus has {files} files; document ids allow at most {}", u32::MAX)]
    TooManyFiles { files: usize },
    #[error("cannot start the I/O runtime for object-store corpus inputs")]
    StartRuntime {
        #[source]
        source: std::io::Error,
    },

    // --- Reading a corpus's records. `location` is the file's path or URL, `line` counts from 1.
    /// `reason` is already a message without credentials (an I/O error, or "not UTF-8 (...)").
    #[error("cannot read corpus file {location}: {reason}")]
    ReadCorpusFile { location: String, reason: String },
    #[error("{location}:{line}: not a JSON line")]
    NotAJsonLine {
        location: String,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{location}:{line}: not a JSON object")]
    NotAJsonObject { location: String, line: usize },
    /// `kind` is what the field holds instead: "a number", "an array", ...
    #[error("{location}:{line}: text field `{field}` holds {kind}, not a string")]
    TextFieldNotAString { location: String, line: usize, field: String, kind: &'static str },
    #[error("{location}:{line}: no text field `{field}` (fields: {}); choose one with --text-field", .fields.join(", "))]
    NoTextField { location: String, line: usize, field: String, fields: Vec<String> },
    #[error("{location}: no column `{column}` (columns: {}); choose one with --text-field", .columns.join(", "))]
    NoTextColumn { location: String, column: String, columns: Vec<String> },
    #[error("{location}: column `{column}` holds {data_type}, not strings")]
    TextColumnNotStrings { location: String, column: String, data_type: arrow_schema::DataType },
    #[error("{location}: {rows} rows; document ids allow at most {} per file", u32::MAX)]
    TooManyRows { location: String, rows: i64 },

    // --- Packing windows.
    #[error("context length must be at least 2 tokens, not {context_len}")]
    ContextTooShort { context_len: usize },
    #[error("the tokenizer has no EOS token to separate documents")]
    NoEos,
    #[error("the tokenizer adds BOS but has no BOS id")]
    NoBosId,
    #[error(transparent)]
    TokenizerPool(#[from] rayon::ThreadPoolBuildError),
    #[error("cannot start the tokenizer thread")]
    StartTokenizerThread {
        #[source]
        source: std::io::Error,
    },
    #[error("the tokenizer thread stopped without finishing (it panicked)")]
    TokenizerThreadDied,
    /// `file` is the document's file (path or URL); `record` its index in the file.
    #[error("cannot tokenize document {record} of {file}")]
    Tokenize {
        record: u32,
        file: String,
        #[source]
        source: Box<Error>,
    },
    #[error("empty corpus: no documents in {inputs} ({files_read} files read, {skipped} skipped)")]
    NoDocuments { inputs: String, files_read: usize, skipped: usize },
    #[error("the corpus is shorter than one window: {documents} documents give {tokens} tokens, fewer than the context length {context_len}")]
    ShorterThanOneWindow { documents: u64, tokens: u64, context_len: usize },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// ` (N skipped)` after the inputs of an empty corpus, when files were skipped.
fn skipped_note(skipped: &usize) -> String {
    if *skipped == 0 {
        String::new()
    } else {
        format!(" ({skipped} skipped)")
    }
}
