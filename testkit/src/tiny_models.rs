//! The tiny random models of each family that `scripts/tiny_models.py` makes with transformers,
//! cached in `$SAE_CACHE/tiny-models/<family>`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::venv::{cache_dir, python};

/// The family's folder in the cache (made by [`tiny_models_script`] when missing).
pub fn tiny_model_dir(family: &str) -> PathBuf {
    cache_dir().join("tiny-models").join(family)
}

/// The script's command for `family`: it makes the family's folder if it is missing; a caller
/// adds `--requests`/`--out` to have transformers' outputs written too.
pub fn tiny_models_script(family: &str) -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/tiny_models.py");
    let mut cmd = Command::new(python());
    cmd.arg(script).args(["--family", family, "--model-dir"]).arg(tiny_model_dir(family));
    cmd
}

/// Runs `cmd` (from [`tiny_models_script`]), panicking with its stderr if it fails.
pub fn run_tiny_models_script(mut cmd: Command) {
    let output = cmd.output().expect("cannot run the venv's python (run `make setup-test`)");
    assert!(output.status.success(), "tiny_models.py failed:\n{}", String::from_utf8_lossy(&output.stderr));
}

/// The family's folder, made first if it is not in the cache.
pub fn tiny_model(family: &str) -> PathBuf {
    run_tiny_models_script(tiny_models_script(family));
    tiny_model_dir(family)
}
