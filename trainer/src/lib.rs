//! Sparse-autoencoder training: architectures, the training loop, metrics, checkpoints with exact
//! resume, and data-parallel collectives on PyTorch's c10d.
//!
//! So far the crate holds the SAE itself, in [`sae`]: its parameters, the ReLU, TopK, BatchTopK
//! and JumpReLU architectures, and their losses (reconstruction, sparsity, AuxK). The training
//! loop, metrics and checkpoints arrive with the rest of the trainer issue.

pub mod sae;
