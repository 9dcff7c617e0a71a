# Sourced by the Makefile before cargo: points the tch build at a libtorch.
# A user's own LIBTORCH wins; otherwise the venv's torch (installed by scripts/setup.sh).
SAE_CACHE=${SAE_CACHE:-$HOME/.cache/sae-pipeline}
# The venv's Python, chosen as the tests choose it (testkit::python): SAE_PYTHON, else python3 in
# SAE_VENV, else in $SAE_CACHE/venv. Exported, so that scripts and tests use the same one.
export SAE_PYTHON=${SAE_PYTHON:-${SAE_VENV:-$SAE_CACHE/venv}/bin/python3}
if [ -z "${LIBTORCH:-}" ]; then
  LIBTORCH=$("$SAE_PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))') || {
    echo "no LIBTORCH and no torch in $SAE_PYTHON: run scripts/setup.sh" >&2; return 1; }
  export LIBTORCH
fi
