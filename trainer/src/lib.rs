//! Sparse-autoencoder training: architectures, the training loop, metrics, checkpoints with exact
//! resume, and data-parallel collectives on PyTorch's c10d.
//!
//! The crate is laid down by the foundation issue; its contents arrive with the trainer issue.
