pub mod activations;
pub mod capture;
pub mod dataset;
pub mod eval;
pub mod features;
pub mod generate;
pub mod train;
