pub mod activations;
pub mod generate;
