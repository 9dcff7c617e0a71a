//! Reading an SAE's features: the statistics pass (`build`), nearest neighbours, and the
//! folder format they share.

pub mod browse;
pub mod build;
pub mod languages;
pub mod neighbors;
pub mod neuronpedia;
pub mod ranking;
pub mod set;
