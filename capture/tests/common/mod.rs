//! Shared by the model tests: the model is loaded once per test binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use capture::Model;
use tch::{Device, Kind};

/// Fixed so that results that are compared bit for bit come out the same way every run.
pub const THREADS: i32 = 2;

pub fn model_path() -> PathBuf {
    capture::model::default_model_path()
}

/// The default GGUF model in f32 on CPU, loaded once.
pub fn model() -> MutexGuard<'static, Model> {
    static MODEL: OnceLock<Mutex<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            tch::set_num_threads(THREADS);
            let path = model_path();
            let model = Model::load(&path, Device::Cpu, Kind::Float)
                .unwrap_or_else(|e| panic!("cannot load {} (run `make setup`): {e:#}", path.display()));
            Mutex::new(model)
        })
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The venv's Python, where `make test` installed transformers (found as every test finds it).
#[allow(unused_imports)] // only the reference tests run Python
pub use testkit::python;

pub fn ids(tokens: &[u32]) -> tch::Tensor {
    tch::Tensor::from_slice(&tokens.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0)
}
