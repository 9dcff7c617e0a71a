//! The test venv's Python and programs (moto_server, torchrun, kubernetes-validate), resolved
//! one way for every test: `SAE_PYTHON` names the interpreter, else `SAE_VENV` the venv, else
//! `$SAE_CACHE/venv`, else `~/.cache/sae-pipeline/venv`, the venv scripts/setup.sh --test fills.
//! scripts/env.sh exports `SAE_PYTHON` chosen by the same rule, so sourcing it changes nothing.

use std::path::PathBuf;

fn var(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The set-up's cache folder: `SAE_CACHE`, else `~/.cache/sae-pipeline`.
pub fn cache_dir() -> PathBuf {
    var("SAE_CACHE")
        .unwrap_or_else(|| var("HOME").unwrap_or_else(|| PathBuf::from("/root")).join(".cache/sae-pipeline"))
}

/// The venv folder: `SAE_VENV`, else `$SAE_CACHE/venv`, else `~/.cache/sae-pipeline/venv`.
pub fn venv() -> PathBuf {
    var("SAE_VENV").unwrap_or_else(|| cache_dir().join("venv"))
}

/// The venv's Python: `SAE_PYTHON`, else `python3` in [`venv`]'s `bin`.
pub fn python() -> PathBuf {
    var("SAE_PYTHON").unwrap_or_else(|| venv().join("bin/python3"))
}

/// The program `name` installed beside [`python`] (in the venv's `bin`).
pub fn venv_bin(name: &str) -> PathBuf {
    python().with_file_name(name)
}
