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
# BENCH_KEEP=1 keeps the work folder (datasets, SAEs) and says where it is.
WORK=$(mktemp -d)
if [ -n "${BENCH_KEEP:-}" ]; then echo "work folder: $WORK (kept)"; else trap 'rm -rf "$WORK"' EXIT; fi
last_field() { python3 -c "import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])['$1'])"; }

# BENCH_SECTIONS picks sections by name (default: all of them, in this order):
#   forward stopped sizing store encode train features scaling quality
SECTIONS=${BENCH_SECTIONS:-forward stopped sizing store encode train features scaling quality}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
# The training benchmark's data and SAE serve the features section too.
train_data() { [ -d "$WORK/train-ds" ] || $SAE capture --model "$MODEL" --threads "$THREADS" --max-tokens "${BENCH_TRAIN_DATA_TOKENS:-50000}" --out "$WORK/train-ds" >/dev/null 2>&1; }

if want forward; then
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
fi

if want stopped; then
echo
echo "== capture vs transformers stopped at the same block (blocks.15.hook_resid_post), same dtype, and the matrix-product limit (CPU, $THREADS threads, batch 8, ctx 256, $TOKENS tokens, $ROUNDS rounds) =="
# transformers stops at block 15 by a forward hook that raises; both sides load the same GGUF and
# compute in the same dtype. The limit is the same shapes' matrix products alone (bench_matmul.py).
for dtype in ${BENCH_DTYPES:-f32 bf16}; do
  results=()
  for round in $(seq "$ROUNDS"); do
    rm -rf "$WORK/ds"
    ours=$($SAE activations --model "$MODEL" --threads "$THREADS" --dtype "$dtype" --max-tokens "$TOKENS" --hook blocks.15.hook_resid_post --json 2>/dev/null | last_field tokens_per_s)
    capture=$($SAE capture --model "$MODEL" --threads "$THREADS" --dtype "$dtype" --max-tokens "$TOKENS" --hook blocks.15.hook_resid_post --out "$WORK/ds" --json 2>/dev/null | last_field model_tokens_per_s)
    theirs=$("$SAE_PYTHON" scripts/bench_forward.py --gguf "$MODEL" --threads "$THREADS" --dtype "$dtype" --max-tokens "$TOKENS" --stop-at-block 15 2>/dev/null | last_field tokens_per_s)
    limit=$("$SAE_PYTHON" scripts/bench_matmul.py --threads "$THREADS" --dtype "$dtype" --tokens "$TOKENS" --blocks 16 2>/dev/null | last_field tokens_per_s)
    # What the attention kernel costs beyond the two products the limit counts for it.
    attention=$("$SAE_PYTHON" scripts/bench_attention.py --threads "$THREADS" --dtype "$dtype" --blocks 16 2>/dev/null)
    kernel_ratio=$(echo "$attention" | last_field kernel_over_products)
    excess=$(echo "$attention" | last_field excess_s_per_token)
    echo "round $round ($dtype): ours forward $ours, ours capture $capture, transformers stopped $theirs, matrix products alone $limit tokens/s; attention kernel ${kernel_ratio}x its products"
    results+=("$ours,$capture,$theirs,$limit,$kernel_ratio,$excess")
  done
  python3 - "$dtype" "${results[@]}" <<'PY'
import statistics, sys
dtype, rows = sys.argv[1], [tuple(map(float, r.split(","))) for r in sys.argv[2:]]
def show(name, xs, pct=False):
    fmt = (lambda x: f"{100 * x:.0f}%") if pct else (lambda x: f"{x:.2f}x")
    print(f"{name + ' (' + dtype + ')':<64} median {fmt(statistics.median(xs))}  (rounds: {', '.join(fmt(x) for x in xs)})")
show("capture / transformers stopped at blocks.15", [c / t for _, c, t, *_ in rows])
show("our forward to blocks.15 / transformers stopped there", [o / t for o, _, t, *_ in rows])
show("our forward to blocks.15, share of the matrix-product limit", [o / m for o, _, _, m, *_ in rows], pct=True)
show("transformers stopped, share of the matrix-product limit", [t / m for _, _, t, m, *_ in rows], pct=True)
show("attention kernel (SDPA) / its two matrix products", [r for *_, r, _ in rows])
# The kernel's time beyond its products, per token, over our forward's time per token beyond the limit's.
show("attention kernel's excess, share of our gap to the limit",
     [x / (1 / o - 1 / m) if o < m else float("nan") for o, _, _, m, _, x in rows], pct=True)
PY
done
fi

if want sizing; then
echo
# Capture's levers (issue 16 §3): windows per forward pass, tokens per window, and the encoder
# threads kept off the model's cores, each against the defaults (batch 8, ctx 256, model threads =
# encode threads = THREADS), in one dtype, with the matrix-product limit of each shape.
SIZING_DTYPE=${BENCH_SIZING_DTYPE:-bf16}
SIZINGS=${BENCH_SIZINGS:-8,256,$THREADS,$THREADS 4,256,$THREADS,$THREADS 16,256,$THREADS,$THREADS 16,128,$THREADS,$THREADS 4,512,$THREADS,$THREADS 8,256,$THREADS,1 8,256,1,1}
echo "== capture sizing: batch,ctx,model threads,encode threads in {$SIZINGS}, $SIZING_DTYPE, $TOKENS tokens, $ROUNDS rounds =="
results=()
for round in $(seq "$ROUNDS"); do
  for sizing in $SIZINGS; do
    IFS=, read -r batch ctx model_threads encode_threads <<< "$sizing"
    rm -rf "$WORK/ds"
    capture=$($SAE capture --model "$MODEL" --threads "$model_threads" --encode-threads "$encode_threads" --dtype "$SIZING_DTYPE" --batch-size "$batch" --context-len "$ctx" --max-tokens "$TOKENS" --out "$WORK/ds" --json 2>/dev/null | last_field model_tokens_per_s)
    limit=$("$SAE_PYTHON" scripts/bench_matmul.py --threads "$THREADS" --dtype "$SIZING_DTYPE" --tokens "$TOKENS" --batch-size "$batch" --context-len "$ctx" --blocks 16 2>/dev/null | last_field tokens_per_s)
    echo "round $round, $sizing: capture $capture, matrix products alone ($THREADS threads) $limit tokens/s"
    results+=("$round,$sizing,$capture,$limit")
  done
done
python3 - "${results[@]}" <<'PY'
import statistics, sys
from collections import defaultdict
rows = [r.split(",") for r in sys.argv[1:]]
base = rows[0][1:5]
capture, limit = defaultdict(dict), defaultdict(dict)
for rnd, *sizing, c, m in rows:
    capture[tuple(sizing)][rnd], limit[tuple(sizing)][rnd] = float(c), float(m)
print(f"{'batch, ctx, model threads, encode threads':<44}{'tokens/s':>10}{'vs defaults':>13}{'share of limit':>16}")
for sizing, by_round in capture.items():
    ratio = statistics.median(by_round[r] / capture[tuple(base)][r] for r in by_round)
    share = statistics.median(by_round[r] / limit[sizing][r] for r in by_round)
    print(f"{', '.join(sizing):<44}{statistics.median(by_round.values()):>10.0f}{ratio:>12.2f}x{100 * share:>15.0f}%")
PY
fi

if want store; then
echo
echo "== store: bytes per element, and our reader vs pyarrow into a (rows, d) f32 array =="
"$SAE_PYTHON" scripts/bench_store.py --rounds "${BENCH_STORE_ROUNDS:-5}"
fi

if want encode; then
echo
echo "== store encoding: MB/s of bf16 per core and 1 -> 2 encoding threads (the store benchmark's activations, memory://, $ROUNDS rounds) =="
"$SAE_PYTHON" scripts/bench_encode.py --rounds "$ROUNDS" --passes "${BENCH_ENCODE_PASSES:-4}"
fi

if want train; then
echo
TRAIN_TOKENS=${BENCH_TRAIN_TOKENS:-200000}
echo "== training: sae train vs a plain-PyTorch eager TopK SAE (4608 latents, k 32, batch 4096, $TRAIN_TOKENS tokens, CPU, $THREADS threads, $ROUNDS rounds) =="
# Both sides read the same shards: ours through the store reader, theirs with pyarrow.
train_data
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
fi

if want features; then
echo
echo "== features: the statistics pass of sae features build vs a plain-PyTorch dense pass (the SAE and data of the training benchmark, CPU, $THREADS threads, $ROUNDS rounds) =="
# Same work on both sides: per-feature counts, sums, maxima, histogram, top-20 and 20 sampled rows.
train_data
[ -d "$WORK/sae" ] || $SAE train --data "$WORK/train-ds" --out "$WORK/sae" --latents 4608 --k 32 --batch-size 4096 \
  --max-tokens "${BENCH_TRAIN_TOKENS:-200000}" --lr 4e-4 --warmup-steps 100 --threads "$THREADS" --no-eval --quiet >/dev/null 2>&1
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
fi

if want scaling; then
echo
echo "== data-parallel scaling on CPU: 2 processes x 1 thread (torchrun, Gloo) vs 1 process x 1 thread, same data, $ROUNDS rounds =="
# Same global batch (4096 rows: 2 x 2048 vs 1 x 4096) and the same 4608-latent TopK SAE.
train_data
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
fi

if want quality; then
echo
# The quality protocol of issue 16: our capture of the default corpus for training, held-out rows
# from other fortune files, both trainers on the same rows with the same token budget (TopK, 4608
# latents, k 32, batch 4096), each with its own defaults but for the learning rate, and the same
# evaluators for both SAEs: SAELens loading each (FVU, inlier FVU, L0, dead) and `sae eval` (the
# same figures plus the CE-loss score through our model).
Q_TRAIN=${BENCH_QUALITY_TRAIN_TOKENS:-300000}
Q_HELDOUT=${BENCH_QUALITY_HELDOUT_TOKENS:-30000}
Q_BUDGET=${BENCH_QUALITY_TOKENS:-2400000}
Q_LRS=${BENCH_QUALITY_LRS:-3e-4 1e-3 3e-3}
FORTUNES=/usr/share/games/fortunes
echo "== SAE quality vs SAELens on the same rows: $Q_TRAIN training rows, $Q_HELDOUT held-out rows (wisdom, work, zippy), $Q_BUDGET training tokens, learning rates $Q_LRS (our default at 4608 latents: 1e-3), CPU, $THREADS threads =="
$SAE capture --model "$MODEL" --threads "$THREADS" --max-tokens "$Q_TRAIN" --out "$WORK/q-train" >/dev/null 2>&1
$SAE capture --model "$MODEL" --threads "$THREADS" --max-tokens "$Q_HELDOUT" --out "$WORK/q-heldout" \
  --corpus "$FORTUNES/wisdom" "$FORTUNES/work" "$FORTUNES/zippy" >/dev/null 2>&1
q_same=(--latents 4608 --k 32 --batch-size 4096 --threads "$THREADS")
saes=()
for lr in $Q_LRS; do
  ours=$($SAE train --data "$WORK/q-train" --out "$WORK/q-ours-$lr" "${q_same[@]}" --max-tokens "$Q_BUDGET" --lr "$lr" --no-eval --quiet --json 2>/dev/null | last_field tokens_per_s)
  theirs=$("$SAE_PYTHON" scripts/bench_quality.py train-saelens --data "$WORK/q-train" --like "$WORK/q-ours-$lr" --out "$WORK/q-saelens-$lr" \
    --latents 4608 --k 32 --batch-size 4096 --threads "$THREADS" --tokens "$Q_BUDGET" --lr "$lr" 2>/dev/null | last_field tokens_per_s)
  echo "lr $lr: trained, ours $ours tokens/s, SAELens $theirs tokens/s"
  saes+=("$WORK/q-ours-$lr" "$WORK/q-saelens-$lr")
done
"$SAE_PYTHON" scripts/bench_quality.py evaluate --data "$WORK/q-heldout" --threads "$THREADS" "${saes[@]}" 2>/dev/null > "$WORK/q-saelens-eval.jsonl"
: > "$WORK/q-sae-eval.jsonl"
for sae in "${saes[@]}"; do
  $SAE eval --sae "$sae" --data "$WORK/q-heldout" --model "$MODEL" --threads "$THREADS" --json 2>/dev/null | tail -1 >> "$WORK/q-sae-eval.jsonl"
done
python3 - "$WORK/q-saelens-eval.jsonl" "$WORK/q-sae-eval.jsonl" <<'PY'
import json, os, sys
theirs = [json.loads(l) for l in open(sys.argv[1])]
ours = [json.loads(l) for l in open(sys.argv[2])]
cols = [(os.path.basename(t["sae"]).removeprefix("q-").replace("-", ", lr "), t, o) for t, o in zip(theirs, ours)]
print(f"{'held-out rows, scored by SAELens (sae eval in brackets)':<38}" + "".join(f"{c[0]:>24}" for c in cols))
for name, key, fmt in [("FVU, inliers (norm <= 3 x median)", "fvu_inliers", "{:.4f}"), ("FVU, all rows", "fvu", "{:.4f}"),
                       ("L0", "l0", "{:.1f}"), ("dead latents", "dead_fraction", "{:.2%}")]:
    print(f"{name:<38}" + "".join(f"{(fmt.format(t[key]) + ' (' + fmt.format(o[key]) + ')'):>24}" for _, t, o in cols))
print(f"{'CE-loss score (sae eval)':<38}" + "".join(f"{o['ce_loss_score']:>24.4f}" for _, _, o in cols))
PY
fi
