#!/usr/bin/env python3
"""Store encoding benchmark: MB/s of bf16 per core, and the scaling from 1 to 2 encoding threads,
on real layer-15 activations written to memory:// (so that no disk or network is timed).

  python3 scripts/bench_encode.py [--acts DIR] [--passes N] [--rounds N] [--threads 1,2] [--json]

--acts is the folder that scripts/bench_store.py makes (acts.npy, tokens.u32, meta.json); it is
made the same way if missing. Every round writes the rows --passes times with each thread count,
one after the other, in one run. "MB" counts the bf16 bytes of the activations (rows x d x 2),
the unit of a GPU's output rate. Per core is MB over the CPU seconds the whole process spent
writing (every thread: conversion, Parquet encoding and zstd, checksums, the copy into the store),
so it is the figure that says how many cores a given rate needs. Medians over rounds are printed.
Run it with the venv's python (gen_activations.py needs transformers).
"""
import argparse, json, os, statistics, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
p = argparse.ArgumentParser()
p.add_argument("--acts", default=os.path.expanduser("~/.cache/sae-pipeline/bench/l15"))
p.add_argument("--tokens", type=int, default=65536, help="rows to capture if --acts is missing")
p.add_argument("--passes", type=int, default=4)
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--threads", default="1,2", help="encoding thread counts, compared with the first")
p.add_argument("--gpu-gb-per-s", type=float, default=1.2, help="a GPU's output rate, GB/s of bf16")
p.add_argument("--json", action="store_true", help="print only the JSON result")
a = p.parse_args()
log = (lambda *x: print(*x, file=sys.stderr)) if a.json else print
counts = [int(t) for t in a.threads.split(",")]

if not os.path.exists(os.path.join(a.acts, "meta.json")):
    log(f"capturing {a.tokens} tokens of layer-15 activations into {a.acts} (transformers, CPU)")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts/gen_activations.py"), "--out", a.acts,
                    "--tokens", str(a.tokens)], check=True)

target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
subprocess.run(["cargo", "build", "--release", "-q", "-p", "store", "--example", "bench_store"], cwd=ROOT, check=True)
binary = os.path.join(target, "release", "examples", "bench_store")

runs = {t: [] for t in counts}
for r in range(a.rounds):
    line = []
    for t in counts:
        out = json.loads(subprocess.run(
            [binary, "write", a.acts, f"memory://bench-encode/r{r}-t{t}", "--encode-threads", str(t),
             "--passes", str(a.passes)], check=True, capture_output=True, text=True).stdout)
        mb = out["rows"] * out["d"] * 2 / 1e6
        runs[t].append({"mb_per_s": mb / out["write_seconds"], "mb_per_cpu_s": mb / out["cpu_seconds"],
                        "cpu_seconds": out["cpu_seconds"], "seconds": out["write_seconds"], "mb": mb})
        line.append(f"{t} thread(s) {mb / out['write_seconds']:.0f} MB/s ({mb / out['cpu_seconds']:.0f} MB per CPU-s)")
    log(f"round {r + 1}: " + ", ".join(line))

med = lambda xs: statistics.median(xs)
base = counts[0]
per_core = med([x["mb_per_cpu_s"] for x in runs[base]])
result = {
    "mb_bf16": runs[base][0]["mb"],
    "mb_per_s": {t: med([x["mb_per_s"] for x in runs[t]]) for t in counts},
    "mb_per_cpu_s": {t: med([x["mb_per_cpu_s"] for x in runs[t]]) for t in counts},
    "scaling": {t: med([x["mb_per_s"] / b["mb_per_s"] for x, b in zip(runs[t], runs[base])]) for t in counts[1:]},
    "cores_for_gpu_rate": a.gpu_gb_per_s * 1000 / per_core,
    "gpu_gb_per_s": a.gpu_gb_per_s,
    "cpus_visible": os.cpu_count(),
}
if a.json:
    print(json.dumps(result))
else:
    for t in counts:
        print(f"{f'encode, {t} thread(s): MB/s of bf16 (wall), MB per CPU-second':<58} "
              f"{result['mb_per_s'][t]:.0f}, {result['mb_per_cpu_s'][t]:.0f}")
    for t, s in result["scaling"].items():
        rounds = ", ".join(f"{x['mb_per_s'] / b['mb_per_s']:.2f}" for x, b in zip(runs[t], runs[base]))
        print(f"{f'encode scaling, {t} threads / {base} thread (wall MB/s)':<58} median {s:.2f}x  (rounds: {rounds})")
    print(f"{f'cores to encode {a.gpu_gb_per_s} GB/s of bf16 at {per_core:.0f} MB per CPU-s':<58} "
          f"{result['cores_for_gpu_rate']:.1f}  ({os.cpu_count()} CPUs visible; shared machines are noisy)")
