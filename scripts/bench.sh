#!/usr/bin/env bash
# Side-by-side benchmarks, each pair measured in the same run on the same machine and data.
# The machines are shared and noisy, so every comparison is repeated in ROUNDS alternating
# rounds and the median of the per-round ratios is reported.
set -euo pipefail
cd "$(dirname "$0")/.."
SAE=target/release/sae
MODEL=${SAE_MODEL:-${SAE_MODEL_DIR:-${SAE_CACHE:-$HOME/.cache/sae-pipeline}/models}/SmolLM2-135M-Instruct.Q4_1.gguf}
THREADS=${BENCH_THREADS:-2}
TOKENS=${BENCH_TOKENS:-8192}
ROUNDS=${BENCH_ROUNDS:-3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
last_field() { python3 -c "import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])['$1'])"; }

echo "== model and capture throughput (f32 model, CPU, $THREADS threads, batch 8, ctx 256, $TOKENS tokens of English fortunes, $ROUNDS rounds) =="
results=()
for round in $(seq "$ROUNDS"); do
  full=$($SAE activations --model "$MODEL" --threads "$THREADS" --max-tokens "$TOKENS" --full-forward --json 2>/dev/null | last_field tokens_per_s)
  theirs=$("$SAE_PYTHON" scripts/bench_forward.py --gguf "$MODEL" --threads "$THREADS" --max-tokens "$TOKENS" 2>/dev/null | last_field tokens_per_s)
  early=$($SAE activations --model "$MODEL" --threads "$THREADS" --max-tokens "$TOKENS" --hook blocks.15.hook_resid_post --json 2>/dev/null | last_field tokens_per_s)
  rm -rf "$WORK/ds"
  # Throughput over the tokens the model ran on (position 0 of each window is run but not
  # stored), so that both sides count the same work.
  capture=$($SAE capture --model "$MODEL" --threads "$THREADS" --max-tokens "$TOKENS" --hook blocks.15.hook_resid_post --out "$WORK/ds" --json 2>/dev/null | last_field model_tokens_per_s)
  echo "round $round: ours full $full, transformers full $theirs, ours forward to blocks.15 $early, ours capture to blocks.15 $capture tokens/s"
  results+=("$full,$theirs,$early,$capture")
done
python3 - "${results[@]}" <<'PY'
import statistics, sys
rows = [tuple(map(float, r.split(","))) for r in sys.argv[1:]]
def show(name, xs):
    print(f"{name:<58} median {statistics.median(xs):.2f}x  (rounds: {', '.join(f'{x:.2f}' for x in xs)})")
show("ours / transformers, full forward", [f / t for f, t, _, _ in rows])
show("ours early exit at blocks.15 / ours full forward", [e / f for f, _, e, _ in rows])
show("capture at blocks.15 / our forward alone to blocks.15", [c / e for _, _, e, c in rows])
show("capture at blocks.15 / transformers full forward", [c / t for _, t, _, c in rows])
PY

echo
echo "== store: bytes per element, and our reader vs pyarrow into a (rows, d) f32 array =="
"$SAE_PYTHON" scripts/bench_store.py --rounds "${BENCH_STORE_ROUNDS:-5}"

echo
echo "== store encoding: MB/s of bf16 per core and 1 -> 2 encoding threads (the store benchmark's activations, memory://, $ROUNDS rounds) =="
"$SAE_PYTHON" scripts/bench_encode.py --rounds "$ROUNDS" --passes "${BENCH_ENCODE_PASSES:-4}"

echo
TRAIN_TOKENS=${BENCH_TRAIN_TOKENS:-200000}
echo "== training: sae train vs a plain-PyTorch eager TopK SAE (4608 latents, k 32, batch 4096, $TRAIN_TOKENS tokens, CPU, $THREADS threads, $ROUNDS rounds) =="
# Both sides read the same shards: ours through the store reader, theirs with pyarrow.
$SAE capture --model "$MODEL" --threads "$THREADS" --max-tokens "${BENCH_TRAIN_DATA_TOKENS:-50000}" --out "$WORK/train-ds" >/dev/null 2>&1
same=(--latents 4608 --k 32 --batch-size 4096 --max-tokens "$TRAIN_TOKENS" --lr 4e-4 --warmup-steps 100 --threads "$THREADS")
results=()
for round in $(seq "$ROUNDS"); do
  rm -rf "$WORK/sae"
  ours_json=$($SAE train --data "$WORK/train-ds" --out "$WORK/sae" "${same[@]}" --no-eval --quiet --json 2>/dev/null | tail -1)
  theirs_json=$("$SAE_PYTHON" scripts/bench_train.py --data "$WORK/train-ds" "${same[@]}" 2>/dev/null | tail -1)
  ours=$(echo "$ours_json" | last_field tokens_per_s)
  ours_wait=$(echo "$ours_json" | last_field data_wait_fraction)
  theirs=$(echo "$theirs_json" | last_field tokens_per_s)
  theirs_wait=$(echo "$theirs_json" | last_field data_wait_fraction)
  echo "round $round: ours $ours tokens/s (waiting for data $ours_wait), PyTorch eager $theirs tokens/s (waiting for data $theirs_wait)"
  results+=("$ours,$theirs,$ours_wait")
done
python3 - "${results[@]}" <<'PY'
import statistics, sys
rows = [tuple(map(float, r.split(","))) for r in sys.argv[1:]]
ratios = [o / t for o, t, _ in rows]
print(f"{'training tokens/s, ours / PyTorch eager':<58} median {statistics.median(ratios):.2f}x  (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
waits = [w for _, _, w in rows]
print(f"{'share of our step time spent waiting for data':<58} median {100 * statistics.median(waits):.2f}%  (rounds: {', '.join(f'{100 * w:.2f}%' for w in waits)})")
PY

echo
echo "== features: the statistics pass of sae features build vs a plain-PyTorch dense pass (the SAE and data of the training benchmark, CPU, $THREADS threads, $ROUNDS rounds) =="
# Same work on both sides: per-feature counts, sums, maxima, histogram, top-20 and 20 sampled rows.
results=()
for round in $(seq "$ROUNDS"); do
  rm -rf "$WORK/feats"
  log=$(RUST_LOG=info NO_COLOR=1 $SAE features build --sae "$WORK/sae" --data "$WORK/train-ds" --out "$WORK/feats" --threads "$THREADS" 2>&1 | sed 's/\x1b\[[0-9;]*m//g')
  rows=$(echo "$log" | grep -o 'statistics pass done rows=[0-9]*' | grep -o '[0-9]*$')
  pass=$(echo "$log" | grep 'statistics pass done' | grep -o 'seconds="[0-9.]*"' | grep -o '[0-9.]*')
  whole=$(echo "$log" | grep -o '([0-9]* tokens/s)' | grep -o '[0-9]*')
  ours=$(python3 -c "print($rows / $pass)")
  theirs=$("$SAE_PYTHON" scripts/bench_features.py --data "$WORK/train-ds" --sae "$WORK/sae" --threads "$THREADS" 2>/dev/null | last_field rows_per_s)
  echo "round $round: ours statistics pass $ours rows/s (whole build with windows, logit effects and neighbours $whole rows/s), PyTorch dense $theirs rows/s"
  results+=("$ours,$theirs")
done
python3 - "${results[@]}" <<'PY'
import statistics, sys
rows = [tuple(map(float, r.split(","))) for r in sys.argv[1:]]
ratios = [o / t for o, t in rows]
print(f"{'features statistics pass rows/s, ours / PyTorch dense':<58} median {statistics.median(ratios):.2f}x  (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
PY

echo
echo "== data-parallel scaling on CPU: 2 processes x 1 thread (torchrun, Gloo) vs 1 process x 1 thread, same data, $ROUNDS rounds =="
# Same global batch (4096 rows: 2 x 2048 vs 1 x 4096) and the same 4608-latent TopK SAE.
scale_same=(--latents 4608 --k 32 --max-tokens "${BENCH_SCALING_TOKENS:-122880}" --threads 1 --no-eval --quiet --json)
results=()
for round in $(seq "$ROUNDS"); do
  rm -rf "$WORK/one" "$WORK/two"
  one=$($SAE train --data "$WORK/train-ds" --out "$WORK/one" --batch-size 4096 "${scale_same[@]}" 2>/dev/null | last_field tokens_per_s)
  two=$("$(dirname "$SAE_PYTHON")/torchrun" --no-python --nproc-per-node 2 "$SAE" train --data "$WORK/train-ds" --out "$WORK/two" --batch-size 2048 "${scale_same[@]}" 2>/dev/null | last_field tokens_per_s)
  echo "round $round: 1 process $one tokens/s, 2 processes $two tokens/s"
  results+=("$one,$two")
done
python3 - "${results[@]}" <<'PY'
import statistics, sys
rows = [tuple(map(float, r.split(","))) for r in sys.argv[1:]]
eff = [t / (2 * o) for o, t in rows]
print(f"{'scaling efficiency, 2 ranks / (2 x 1 rank)':<58} median {100 * statistics.median(eff):.0f}%  (rounds: {', '.join(f'{100 * e:.0f}%' for e in eff)})")
PY
