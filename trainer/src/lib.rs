//! Sparse-autoencoder training: architectures, the training loop, metrics, checkpoints with exact
//! resume, and the SAELens export.
//!
//! * [`sae`]: the SAE's parameters, the ReLU, TopK, BatchTopK and JumpReLU architectures and
//!   their losses (reconstruction, sparsity, AuxK).
//! * [`train`]: the loop over the store's reader, for one SAE or a sweep, with checkpoints.
//! * [`adam`], [`schedule`], [`dead`], [`loader`], [`metrics`]: one idea each.
//! * [`checkpoint`], [`export`], [`tensors`]: what goes to the output folder.
//! * [`steer`]: editing features in the activations, keeping the SAE's error term.
//! * [`eval`]: reconstruction statistics over a stream of activations; [`plots`]: PNG charts.

pub mod adam;
pub mod checkpoint;
pub mod dead;
pub mod dist;
pub mod eval;
pub mod export;
pub mod loader;
pub mod metrics;
pub mod plots;
pub mod sae;
pub mod schedule;
pub mod steer;
pub mod tensors;
pub mod train;
