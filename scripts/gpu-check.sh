#!/usr/bin/env bash
# The GPU check: our CUDA paths beside their PyTorch references on the same machine, as ratios.
# Meant for one H100/H200 and under 8 minutes at the default (full) size; `--device cpu --size
# tiny` runs the same steps on a CPU in a few minutes, which checks the script itself.
#
#   scripts/gpu-check.sh --prepare [--bundle DIR]
#       On a machine with the model, the fortunes and a built sae (target/release/sae, or
#       $SAE_BIN; an x86-64 build for the usual GPU machines): fills the bundle
#       folder (default gpu-bundle/, ignored by git) with what a machine without network needs:
#       the sae binary, the model's config.json and tokenizer.json, and corpus.txt (every fortune
#       file as one fortune-format file). Prints its size.
#   scripts/gpu-check.sh [--device cuda|cpu] [--size full|tiny] [--bundle DIR] [--model HF_DIR]
#       Runs the check from the bundle and prints, for each part, both sides and their ratio:
#       1. capture vs transformers: our forward to blocks.15.hook_resid_post and our whole
#          capture (model, encoding, storage) against transformers stopped at the same block by a
#          forward hook that raises; same dtype (bf16 on CUDA, f32 on CPU), same windows;
#       2. training steps/s, `sae train` vs SAELens's SAETrainer (TopK, same sizes, its rows held
#          on the device), in f32 and with --bf16-autocast (SAELens's `autocast`);
#       3. our bf16 step time vs the bf16 matrix-product roofline: the step's five dense products
#          timed alone in PyTorch;
#       4. `sae features build` on the captured rows; 5. `sae features search` and `sae steer`.
#
# The model: --model HF_DIR (a Hugging Face folder, which both sides load). Without it, a
# stand-in is made from the bundle: SmolLM2-135M's config and tokenizer with random weights.
# Every timing here depends on the shapes alone, so the stand-in times the same work, but its
# features, search hits and steered text mean nothing. (The real GGUF is 98 MB, more than may
# travel to a machine without network.)
#
# Environment: SAE_GPU_PYTHON, a python with torch, transformers, tokenizers and pyarrow
# (default: /opt/torch/.venv/bin/python3 if present, else $SAE_PYTHON, else python3); sae_lens
# is used when it imports, else the training reference is the plain-PyTorch TopK step and the
# output says so. The sae binary finds libtorch through that python's torch/lib.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda SIZE=full BUNDLE=gpu-bundle MODEL="" PREPARE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --bundle) BUNDLE=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --prepare) PREPARE=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -z "${SAE_GPU_PYTHON:-}" ]; then
  if [ -x /opt/torch/.venv/bin/python3 ]; then SAE_GPU_PYTHON=/opt/torch/.venv/bin/python3
  else SAE_GPU_PYTHON=${SAE_PYTHON:-python3}; fi
fi
PY=$SAE_GPU_PYTHON

if [ "$PREPARE" = 1 ]; then
  GGUF=${SAE_MODEL:-${SAE_MODEL_DIR:-${SAE_CACHE:-$HOME/.cache/sae-pipeline}/models}/SmolLM2-135M-Instruct.Q4_1.gguf}
  SAE_BIN=${SAE_BIN:-target/release/sae}
  [ -x "$SAE_BIN" ] || { echo "gpu-check: no $SAE_BIN: build it first (make build)" >&2; exit 1; }
  mkdir -p "$BUNDLE"
  cp "$SAE_BIN" "$BUNDLE/sae"
  strip "$BUNDLE/sae" 2>/dev/null || true
  "$PY" scripts/gpu_check.py bundle --gguf "$GGUF" --out "$BUNDLE" >/dev/null
  echo "gpu-check: bundle $BUNDLE ready, $(du -sh "$BUNDLE" | cut -f1):"
  ls -l "$BUNDLE"
  exit 0
fi

case "$SIZE" in
  full) CAPTURE_TOKENS=2000000 FORWARD_TOKENS=1000000 TRAIN_TOKENS=8000000 LATENTS=4608 BATCH=4096
        FEATURE_ROWS=1000000 ROUNDS=2 ;;
  tiny) CAPTURE_TOKENS=12000 FORWARD_TOKENS=4096 TRAIN_TOKENS=16384 LATENTS=1152 BATCH=1024
        FEATURE_ROWS=8000 ROUNDS=1 ;;
  *) echo "gpu-check: --size is full or tiny" >&2; exit 2 ;;
esac
case "$DEVICE" in
  cuda*) DTYPE=bf16 ;;
  cpu) DTYPE=f32 ;;
  *) echo "gpu-check: --device is cuda, cuda:N or cpu" >&2; exit 2 ;;
esac
for f in sae config.json tokenizer.json tokenizer_config.json corpus.txt; do
  [ -e "$BUNDLE/$f" ] || { echo "gpu-check: $BUNDLE/$f is missing: run scripts/gpu-check.sh --prepare where the model is" >&2; exit 1; }
done

TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TQDM_DISABLE=1 NO_COLOR=1
SAE=$BUNDLE/sae
CORPUS=$BUNDLE/corpus.txt
HOOK=blocks.15.hook_resid_post
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STARTED=$SECONDS
last_json() { grep '^{' | tail -1; }
field() { "$PY" -c "import json,sys; print(json.loads(sys.argv[1])['$2'])" "$1"; }
ratio() { "$PY" -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}x')" "$1" "$2"; }
line() { printf '%-62s %s\n' "$1" "$2"; }

echo "== gpu-check: device $DEVICE, dtype $DTYPE, size $SIZE, $(date -u +%Y-%m-%dT%H:%MZ) =="
"$PY" -c 'import torch; print("torch", torch.__version__, "| GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
"$SAE" --version 2>/dev/null || true

if [ -z "$MODEL" ]; then
  MODEL=$WORK/stand-in
  "$PY" scripts/gpu_check.py stand-in --bundle "$BUNDLE" --out "$MODEL" >/dev/null
  echo "model: stand-in (SmolLM2-135M shapes and tokenizer, random weights): timings only"
else
  echo "model: $MODEL"
fi
RUN=(--model "$MODEL" --device "$DEVICE" --dtype "$DTYPE")

echo
echo "== 1. capture vs transformers stopped at block 15 ($DTYPE, ctx 256, batch 8) =="
for round in $(seq "$ROUNDS"); do
  ours=$("$SAE" activations "${RUN[@]}" --text-file "$CORPUS" --max-tokens "$FORWARD_TOKENS" --hook "$HOOK" --json 2>"$WORK/err" | last_json) \
    || { cat "$WORK/err" >&2; exit 1; }
  theirs=$("$PY" scripts/gpu_check.py forward --model "$MODEL" --corpus "$CORPUS" --device "$DEVICE" --dtype "$DTYPE" \
    --tokens "$FORWARD_TOKENS" | last_json)
  line "round $round: forward to blocks.15, ours / transformers (tokens/s)" \
    "$(ratio "$(field "$ours" tokens_per_s)" "$(field "$theirs" tokens_per_s)")  ($(field "$ours" tokens_per_s) vs $(field "$theirs" tokens_per_s))"
done
capture=$("$SAE" capture "${RUN[@]}" --corpus "$CORPUS" --corpus-format fortune --max-tokens "$CAPTURE_TOKENS" \
  --hook "$HOOK" --out "$WORK/ds" --json 2>"$WORK/err" | last_json) || { cat "$WORK/err" >&2; exit 1; }
line "capture (model + encoding + storage) / transformers forward" \
  "$(ratio "$(field "$capture" model_tokens_per_s)" "$(field "$theirs" tokens_per_s)")  ($(field "$capture" model_tokens_per_s) model tokens/s, $(field "$capture" tokens) rows stored)"

echo
echo "== 2. training steps/s: sae train vs the reference (TopK, $LATENTS latents, k 32, batch $BATCH, $TRAIN_TOKENS tokens) =="
SAME=(--latents "$LATENTS" --k 32 --batch-size "$BATCH")
declare -A OUR_STEP
for mode in f32 bf16; do
  flag=() ref_flag=()
  [ "$mode" = bf16 ] && flag=(--bf16-autocast) ref_flag=(--autocast)
  ours=$("$SAE" train --data "$WORK/ds" --out "$WORK/sae-$mode" "${SAME[@]}" --max-tokens "$TRAIN_TOKENS" \
    --device "$DEVICE" "${flag[@]}" --no-eval --quiet --json 2>"$WORK/err" | last_json) || { cat "$WORK/err" >&2; exit 1; }
  theirs=$("$PY" scripts/gpu_check.py train --data "$WORK/ds" --device "$DEVICE" "${ref_flag[@]}" "${SAME[@]}" \
    --tokens "$TRAIN_TOKENS" | last_json)
  our_steps=$("$PY" -c "print($(field "$ours" tokens_per_s) / $BATCH)")
  OUR_STEP[$mode]=$("$PY" -c "print(1 / $our_steps)")
  line "$mode: ours / $(field "$theirs" reference) (steps/s)" \
    "$(ratio "$our_steps" "$(field "$theirs" steps_per_s)")  ($(printf '%.1f' "$our_steps") vs $(printf '%.1f' "$(field "$theirs" steps_per_s)"); our data wait $(field "$ours" data_wait_fraction))"
done

echo
echo "== 3. step time vs the bf16 matrix-product roofline (the step's 5 dense products alone) =="
roof=$("$PY" scripts/gpu_check.py roofline --device "$DEVICE" --latents "$LATENTS" --batch-size "$BATCH" | last_json)
line "roofline step / our bf16-autocast step" \
  "$("$PY" -c "print(f'{100 * $(field "$roof" bf16_step_seconds) / ${OUR_STEP[bf16]}:.0f}%')")  (products $(printf '%.3f' "$("$PY" -c "print(1000 * $(field "$roof" bf16_step_seconds))")") ms at $(printf '%.0f' "$(field "$roof" bf16_tflops)") TFLOP/s; our step $(printf '%.3f' "$("$PY" -c "print(1000 * ${OUR_STEP[bf16]})")") ms)"
line "f32 roofline step / our f32 step" \
  "$("$PY" -c "print(f'{100 * $(field "$roof" f32_step_seconds) / ${OUR_STEP[f32]}:.0f}%')")"

echo
echo "== 4. features build (the bf16-autocast SAE over $FEATURE_ROWS rows at most) =="
start=$(date +%s.%N)
"$SAE" features build --sae "$WORK/sae-bf16" --data "$WORK/ds" --out "$WORK/features" --max-rows "$FEATURE_ROWS" \
  "${RUN[@]}" >/dev/null 2>"$WORK/err" || { cat "$WORK/err" >&2; exit 1; }
secs=$("$PY" -c "import time; print(time.time() - $start)")
rows=$(grep -o 'statistics pass done rows=[0-9]*' "$WORK/err" | grep -o '[0-9]*$' || echo "?")
line "features build: rows, wall seconds (model load included)" "$rows, $(printf '%.1f' "$secs")"

echo
echo "== 5. search and steer =="
start=$(date +%s.%N)
"$SAE" features search --sae "$WORK/sae-bf16" --features "$WORK/features" --prompt "The capital of France is Paris." \
  "${RUN[@]}" --json >"$WORK/search.json" 2>"$WORK/err" || { cat "$WORK/err" >&2; exit 1; }
line "features search: wall seconds (model load included)" "$(printf '%.1f' "$("$PY" -c "import time; print(time.time() - $start)")")"
feature=$("$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['prompt_features'][0]['feature'] if d.get('prompt_features') else 0)" "$WORK/search.json" 2>/dev/null || echo 0)
start=$(date +%s.%N)
"$SAE" steer --sae "$WORK/sae-bf16" --feature "$feature" --clamp 10 --prompt "The capital of France is" \
  --max-new-tokens 32 "${RUN[@]}" --json >/dev/null 2>"$WORK/err" || { cat "$WORK/err" >&2; exit 1; }
line "steer (feature $feature clamped to 10, 32 new tokens): wall seconds" "$(printf '%.1f' "$("$PY" -c "import time; print(time.time() - $start)")")"

echo
echo "gpu-check: done in $((SECONDS - STARTED)) s"
