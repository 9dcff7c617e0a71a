#!/usr/bin/env bash
# Submit the whole flow as one Slurm dependency chain and print the job ids and where the
# results will be:
#
#   capture (array of WORKERS tasks) -> finalize -> train (+ eval) -> features build
#
#   workflows/slurm/submit.sh DATASET_URL OUT_URL [options]
#
# DATASET_URL is where the activations go (s3://bucket/prefix, or a path every node sees); the
# SAE goes to OUT_URL/sae (with --sweep, one folder per SAE under it) and its features folder to
# OUT_URL/features. Every job retries by itself: a requeued capture task continues after its last
# committed shard, a requeued training job resumes from its newest checkpoint.
#
# Options (each overrides the variable named after it):
#   --workers N          capture array size                                   (WORKERS, default 4)
#   --nodes N            training nodes                                       (NODES, default 1)
#   --gpus-per-node G    GPUs per training node, one rank each; 0 for CPUs    (GPUS_PER_NODE, default 1)
#   --ranks-per-node R   training ranks per node                (RANKS_PER_NODE, default GPUS_PER_NODE or 1)
#   --sweep "SPEC"       train several SAEs in one pass, e.g. "latents=2304,4608 k=16,32" (SWEEP);
#                        the features step is left out (run features.sbatch per SAE)
#   --skip-capture       the dataset is already finished: submit training and features only
#   --no-features        stop after training
#   --partition P        (PARTITION, default: the cluster's default partition)
#   --account A          (ACCOUNT, default: none)
#   --log-dir DIR        where the jobs' logs go, on a shared file system (LOG_DIR, default ./logs)
# Variables:
#   SAE                  the sae binary, resolved to an absolute path here (default: sae on PATH)
#   CAPTURE_TIME, TRAIN_TIME, FEATURES_TIME, FINALIZE_TIME
#                        time limits (defaults 12:00:00, 24:00:00, 4:00:00, 0:30:00)
#   CPUS_PER_TASK        CPUs per capture, features and training task (default 4)
#   MODEL, HOOK, CAPTURE_TOKENS, CORPUS, DEVICE, THREADS, CAPTURE_ARGS   see capture.sbatch
#   ARCH, LATENTS, K, TRAIN_TOKENS, CHECKPOINT_EVERY, LAUNCHER, TRAIN_ARGS see train.sbatch
#   FEATURES_ARGS                                                        see features.sbatch
#   SBATCH_ARGS          more sbatch flags for every job, space-separated (e.g. "--qos=high")
# S3 settings and credentials come from the standard AWS_* variables of the environment; sbatch
# passes the environment on to the jobs.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 2 ] || usage
DATASET_URL=$1
OUT_URL=${2%/}
shift 2

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORKERS=${WORKERS:-4}
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
SWEEP=${SWEEP:-}
PARTITION=${PARTITION:-}
ACCOUNT=${ACCOUNT:-}
LOG_DIR=${LOG_DIR:-$PWD/logs}
skip_capture=0
features=1
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS=$2; shift 2 ;;
    --nodes) NODES=$2; shift 2 ;;
    --gpus-per-node) GPUS_PER_NODE=$2; shift 2 ;;
    --ranks-per-node) RANKS_PER_NODE=$2; shift 2 ;;
    --sweep) SWEEP=$2; shift 2 ;;
    --skip-capture) skip_capture=1; shift ;;
    --no-features) features=0; shift ;;
    --partition) PARTITION=$2; shift 2 ;;
    --account) ACCOUNT=$2; shift 2 ;;
    --log-dir) LOG_DIR=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "submit.sh: unknown option $1" >&2; usage ;;
  esac
done
[ "$GPUS_PER_NODE" -gt 0 ] && default_ranks=$GPUS_PER_NODE || default_ranks=1
RANKS_PER_NODE=${RANKS_PER_NODE:-$default_ranks}
CPUS_PER_TASK=${CPUS_PER_TASK:-4}
CAPTURE_TIME=${CAPTURE_TIME:-12:00:00}
FINALIZE_TIME=${FINALIZE_TIME:-0:30:00}
TRAIN_TIME=${TRAIN_TIME:-24:00:00}
FEATURES_TIME=${FEATURES_TIME:-4:00:00}
[ "$WORKERS" -ge 1 ] || { echo "submit.sh: --workers must be at least 1" >&2; exit 2; }

# The jobs run on other nodes: give them the binary's absolute path.
SAE=$(command -v "${SAE:-sae}") || { echo "submit.sh: no sae binary (set SAE=/path/to/sae)" >&2; exit 2; }
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
export SAE DATASET_URL WORKERS SWEEP
export OUT_URL=$OUT_URL/sae SAE_URL=$OUT_URL/sae FEATURES_URL=$OUT_URL/features

common=(--parsable)
[ -n "$PARTITION" ] && common+=(--partition "$PARTITION")
[ -n "$ACCOUNT" ] && common+=(--account "$ACCOUNT")
read -r -a extra <<< "${SBATCH_ARGS:-}"
common+=("${extra[@]}")
one_gpu=()
[ "$GPUS_PER_NODE" -gt 0 ] && one_gpu=(--gpus=1)

# sbatch --parsable prints "jobid" or "jobid;cluster".
submit() { local id; id=$(sbatch "${common[@]}" "$@"); echo "${id%%;*}"; }

after=()
if [ "$skip_capture" = 0 ]; then
  capture=$(submit --array="0-$((WORKERS - 1))" --cpus-per-task="$CPUS_PER_TASK" "${one_gpu[@]}" \
    --time="$CAPTURE_TIME" --output="$LOG_DIR/%x-%A_%a.log" "$here/capture.sbatch")
  finalize=$(submit --dependency="afterok:$capture" --time="$FINALIZE_TIME" \
    --output="$LOG_DIR/%x-%j.log" "$here/finalize.sbatch")
  after=(--dependency="afterok:$finalize")
fi
train_resources=(--nodes="$NODES" --ntasks-per-node="$RANKS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK")
[ "$GPUS_PER_NODE" -gt 0 ] && train_resources+=(--gpus-per-node="$GPUS_PER_NODE")
train=$(submit "${after[@]}" "${train_resources[@]}" --time="$TRAIN_TIME" \
  --output="$LOG_DIR/%x-%j.log" "$here/train.sbatch")
if [ "$features" = 1 ] && [ -z "$SWEEP" ]; then
  features_job=$(submit --dependency="afterok:$train" --cpus-per-task="$CPUS_PER_TASK" "${one_gpu[@]}" \
    --time="$FEATURES_TIME" --output="$LOG_DIR/%x-%j.log" "$here/features.sbatch")
fi

if [ "$skip_capture" = 0 ]; then
  echo "capture job   $capture (array 0-$((WORKERS - 1)): $WORKERS workers)"
  echo "finalize job  $finalize (after $capture)"
fi
echo "train job     $train (${NODES} node(s) x $RANKS_PER_NODE rank(s)${after:+, after $finalize})"
[ -n "${features_job:-}" ] && echo "features job  ${features_job} (after $train)"
echo "dataset       $DATASET_URL"
echo "sae           $SAE_URL${SWEEP:+/<one folder per SAE of the sweep>}"
[ -n "${features_job:-}" ] && echo "features      $FEATURES_URL"
echo "logs          $LOG_DIR"
echo "follow with   squeue -u ${USER:-$(id -un)}; tail -f $LOG_DIR/sae-train-$train.log"
