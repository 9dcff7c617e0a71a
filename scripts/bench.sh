#!/usr/bin/env bash
# Side-by-side benchmarks, each pair measured in the same run on the same machine and data.
# The machines are shared and noisy, so every comparison is repeated in ROUNDS alternating
# rounds (A B A B ...) and the median of the per-round ratios is reported.
set -euo pipefail
cd "$(dirname "$0")/.."
SAE=target/release/sae
MODEL=${SAE_MODEL:-${SAE_MODEL_DIR:-${SAE_CACHE:-$HOME/.cache/sae-pipeline}/models}/SmolLM2-135M-Instruct.Q4_1.gguf}
THREADS=${BENCH_THREADS:-2}
TOKENS=${BENCH_TOKENS:-4096}
ROUNDS=${BENCH_ROUNDS:-3}
last_field() { python3 -c "import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])['$1'])"; }

echo "== forward throughput (f32, CPU, $THREADS threads, batch 8, ctx 256, $TOKENS tokens of English fortunes, $ROUNDS rounds) =="
results=()
for round in $(seq "$ROUNDS"); do
  full=$($SAE activations --model "$MODEL" --threads "$THREADS" --max-tokens "$TOKENS" --full-forward --json 2>/dev/null | last_field tokens_per_s)
  theirs=$("$SAE_PYTHON" scripts/bench_forward.py --gguf "$MODEL" --threads "$THREADS" --max-tokens "$TOKENS" 2>/dev/null | last_field tokens_per_s)
  early=$($SAE activations --model "$MODEL" --threads "$THREADS" --max-tokens "$TOKENS" --hook blocks.15.hook_resid_post --json 2>/dev/null | last_field tokens_per_s)
  echo "round $round: ours full $full, transformers $theirs, ours early exit @15 $early tokens/s"
  results+=("$full,$theirs,$early")
done
python3 - "${results[@]}" <<'PY'
import statistics, sys
rows = [tuple(map(float, r.split(","))) for r in sys.argv[1:]]
vs_hf = [full / theirs for full, theirs, _ in rows]
early = [e / full for full, _, e in rows]
fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
print(f"ratio ours/transformers, full forward:        median {statistics.median(vs_hf):.2f}x  (rounds: {fmt(vs_hf)})")
print(f"ratio early exit @blocks.15 / full forward:   median {statistics.median(early):.2f}x  (rounds: {fmt(early)})")
PY
