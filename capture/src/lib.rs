//! Hosts a Llama-family language model in libtorch (through `tch`) and reads its activations.
//!
//! - [`model::Model::load`] loads a GGUF file or a Hugging Face folder, with its tokenizer.
//! - [`llama::Llama::forward`] runs the model, reading and changing activations at hook points
//!   named as in TransformerLens ([`hooks::HookPoint`]), and stops early after the deepest hook
//!   when no logits are needed.
//! - [`generate::generate`] decodes with a KV cache.
//!
//! - [`corpus`] reads text corpora and [`windows`] packs them into token windows.
//!
//! Errors are typed: fallible functions return [`Result`], whose [`Error`] names the file, folder,
//! URL, field or tensor concerned and keeps the underlying error (I/O, JSON, libtorch, the store)
//! as its `source()`. A few narrower errors are returned where only they can occur and are
//! wrapped by [`Error`] elsewhere: [`gguf::GgufError`] (reading a GGUF file),
//! [`llama::TokenInputError`] (token ids a forward pass refuses), [`llama::WeightError`] (a
//! checkpoint's weights), [`config::ConfigError`] (hyper-parameters), [`hooks::UnknownHook`]
//! (a hook name).
//!
//! This crate knows nothing of SAEs or of how activations are stored. It uses the `store` crate
//! only to open corpus inputs given as object-store URLs (and to print them without credentials)
//! and to describe a corpus as a dataset manifest records it ([`corpus::CorpusFingerprint`]).

pub mod config;
pub mod corpus;
pub mod device;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hooks;
pub mod llama;
pub mod model;
pub mod tokenizer;
pub mod windows;

pub use error::{Error, Result};
pub use hooks::{HookPoint, Hooks};
pub use model::Model;
