//! Hosts a decoder-only language model in libtorch (through `tch`) and reads its activations.
//!
//! - [`model::Model::load`] loads a GGUF file or a Hugging Face folder, with its tokenizer;
//!   [`architecture`] decides from `config.json` which family a folder is, and refuses families
//!   and settings that are not implemented.
//! - One file per architecture: [`llama`] (Llama, Mistral, Qwen 2), [`gpt2`], [`gpt_neox`]
//!   (Pythia) and [`gemma2`], sharing [`attention`], [`rope`], [`norm`], [`activation`] and
//!   [`weights`]. Each implements [`decoder::Decoder`], whose `forward` runs the model, reading
//!   and changing activations at hook points named as in TransformerLens ([`hooks::HookPoint`]),
//!   and stops early after the deepest hook when no logits are needed.
//! - [`generate::generate`] decodes with a KV cache.
//!
//! - [`corpus`] reads text corpora and [`windows`] packs them into token windows.
//!
//! Errors are typed: fallible functions return [`Result`], whose [`Error`] names the file, folder,
//! URL, field or tensor concerned and keeps the underlying error (I/O, JSON, libtorch, the store)
//! as its `source()`. A few narrower errors are returned where only they can occur and are
//! wrapped by [`Error`] elsewhere: [`gguf::GgufError`] (reading a GGUF file),
//! [`decoder::TokenInputError`] (token ids a forward pass refuses), [`weights::WeightError`] (a
//! checkpoint's weights), [`config::ConfigError`] (hyper-parameters), [`hooks::UnknownHook`]
//! (a hook name).
//!
//! This crate knows nothing of SAEs or of how activations are stored. It uses the `store` crate
//! only to open corpus inputs given as object-store URLs (and to print them without credentials)
//! and to describe a corpus as a dataset manifest records it ([`corpus::CorpusFingerprint`]).

pub mod activation;
pub mod architecture;
pub mod attention;
pub mod config;
pub mod corpus;
pub mod decoder;
pub mod device;
pub mod error;
pub mod gemma2;
pub mod generate;
pub mod gguf;
pub mod gpt2;
pub mod gpt_neox;
pub mod hooks;
pub mod llama;
pub mod model;
pub mod norm;
pub mod rope;
pub mod tokenizer;
pub mod weights;
pub mod windows;

pub use decoder::Decoder;
pub use error::{Error, Result};
pub use hooks::{HookPoint, Hooks};
pub use model::Model;
