#!/usr/bin/env bash
# Side-by-side benchmarks, each pair measured in one run on the same machine and data.
# Compare the ratios: the machines are shared and noisy.
set -euo pipefail
cd "$(dirname "$0")/.."
SAE=target/release/sae
MODEL=${SAE_MODEL:-$("$SAE_PYTHON" -c 'import os; print(os.path.expanduser(os.environ.get("SAE_MODEL_DIR", "~/.cache/sae-pipeline/models")))')/SmolLM2-135M-Instruct.Q4_1.gguf}
THREADS=${BENCH_THREADS:-2}
TOKENS=${BENCH_TOKENS:-4096}
field() { python3 -c "import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])['$1'])"; }

echo "== forward throughput: ours vs transformers (f32, CPU, $THREADS threads, batch 8, ctx 256, $TOKENS tokens) =="
ours_full=$($SAE activations --model "$MODEL" --threads "$THREADS" --max-tokens "$TOKENS" --full-forward --json 2>/dev/null | field tokens_per_s)
theirs=$("$SAE_PYTHON" scripts/bench_forward.py --gguf "$MODEL" --threads "$THREADS" --max-tokens "$TOKENS" 2>/dev/null | field tokens_per_s)
ours_early=$($SAE activations --model "$MODEL" --threads "$THREADS" --max-tokens "$TOKENS" --hook blocks.15.hook_resid_post --json 2>/dev/null | field tokens_per_s)
python3 - "$ours_full" "$theirs" "$ours_early" <<'PY'
import sys
full, theirs, early = map(float, sys.argv[1:])
print(f"ours full forward      {full:8.1f} tokens/s")
print(f"transformers forward   {theirs:8.1f} tokens/s")
print(f"ours early exit @15    {early:8.1f} tokens/s")
print(f"ratio ours/transformers (full forward): {full / theirs:.2f}x")
print(f"ratio early exit @blocks.15 / full forward: {early / full:.2f}x")
PY
