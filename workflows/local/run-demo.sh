#!/usr/bin/env bash
# Runs `make demo` and keeps its full log under runs/<UTC timestamp>/ (a local stand-in for the
# batch-job logs that the Slurm and Kubernetes workflows will keep).
set -euo pipefail
cd "$(dirname "$0")/../.."
run_dir=runs/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$run_dir"
echo "logging to $run_dir/demo.log" >&2
make demo 2>&1 | tee "$run_dir/demo.log"
