pub mod activations;
pub mod capture;
pub mod dataset;
pub mod generate;
