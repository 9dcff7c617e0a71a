//! Activation datasets: sharded Parquet on any object store (`file://`, `s3://`, `memory://`),
//! committed atomically by a manifest written last, and read back by a streaming, shuffled,
//! resumable reader.
//!
//! This crate knows nothing of models or of `tch`: it moves rows of activations as plain buffers.
