//! Reading an SAE's features. So far: nearest neighbours by decoder cosine similarity.

pub mod neighbors;
