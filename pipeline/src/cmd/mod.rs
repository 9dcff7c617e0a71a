pub mod activations;
pub mod dataset;
pub mod generate;
