#!/usr/bin/env python3
"""Store benchmark: bytes per element on real layer-15 activations, and our reader against
pyarrow reading the same shards into one (rows, d) float32 array, both on file://, in one run.

  python3 scripts/bench_store.py [--acts DIR] [--tokens N] [--out DIR] [--rounds N] [--json]

--acts holds acts.npy/tokens.u32/meta.json from scripts/gen_activations.py (made if missing,
with --tokens tokens). The Rust side is store/examples/bench_store.rs, built here with cargo.
Each round times our reader (best of 3 reads in one process) and the pyarrow snippet from
docs/format.md (best of 3 in this interpreter), alternating; the median of the per-round ratios
is reported, since the machines are shared and noisy.
Run it with the venv's python (it needs numpy and pyarrow).
"""
import argparse, json, os, re, shutil, statistics, subprocess, sys, time

# Both sides allocate from mimalloc (pyarrow's default pool; our bench binary's global
# allocator). Let it keep freed pages for 1 s instead of 10 ms, as a long-running reader would:
# otherwise re-faulting fresh pages costs more than decoding. Set before pyarrow is imported.
os.environ.setdefault("MIMALLOC_PURGE_DELAY", "1000")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
p = argparse.ArgumentParser()
p.add_argument("--acts", default=os.path.expanduser("~/.cache/sae-pipeline/bench/l15"))
p.add_argument("--tokens", type=int, default=65536)
p.add_argument("--out", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "sae-bench-store"))
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--zstd-level", default="1")
p.add_argument("--json", action="store_true", help="print only the JSON result")
a = p.parse_args()
log = (lambda *x: print(*x, file=sys.stderr)) if a.json else print

if not os.path.exists(os.path.join(a.acts, "meta.json")):
    log(f"capturing {a.tokens} tokens of layer-15 activations into {a.acts} (transformers, CPU)")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts/gen_activations.py"), "--out", a.acts,
                    "--tokens", str(a.tokens)], check=True)
meta = json.load(open(os.path.join(a.acts, "meta.json")))
hook = meta["hook"]

target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
subprocess.run(["cargo", "build", "--release", "-q", "-p", "store", "--example", "bench_store"], cwd=ROOT, check=True)
binary = os.path.join(target, "release", "examples", "bench_store")

ds = os.path.join(a.out, "l15")
shutil.rmtree(a.out, ignore_errors=True)
w = json.loads(subprocess.run([binary, "write", a.acts, ds, "--zstd-level", a.zstd_level], check=True,
                              capture_output=True, text=True).stdout)
log(f"wrote {w['rows']} rows x {w['d']} ({w['dtype']}, zstd {w['zstd_level']}): "
    f"{w['bytes']} bytes in {w['shards']} shard(s) = {w['bytes_per_element']:.4f} bytes/element")

doc = open(os.path.join(ROOT, "docs/format.md")).read()
snippet = re.search(r"<!-- pyarrow-snippet:start -->\s*```python\n(.*?)```", doc, re.S).group(1)
ns = {}
exec(snippet, ns)
read_hook, np = ns["read_hook"], ns["np"]

ratios, ours, theirs, check_ours, check_theirs = [], [], [], None, None
for r in range(a.rounds):
    out = json.loads(subprocess.run([binary, "read", ds, hook, "--repeat", "3"], check=True,
                                    capture_output=True, text=True).stdout)
    ours.append(out["seconds"])
    check_ours = out["checksum_every_97th"]
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        arr = read_hook(ds, hook)
        best = min(best, time.perf_counter() - t)
    theirs.append(best)
    check_theirs = float(arr.ravel()[::97].astype(np.float64).sum())
    del arr
    ratios.append(theirs[-1] / ours[-1])
    log(f"round {r}: ours {ours[-1]:.3f} s, pyarrow {theirs[-1]:.3f} s: {ratios[-1]:.2f}x")

assert abs(check_ours - check_theirs) < 1e-6 * max(1.0, abs(check_theirs)), (check_ours, check_theirs)
rows, d = w["rows"], w["d"]
med_ours, med_theirs = statistics.median(ours), statistics.median(theirs)
result = {
    "rows": rows, "d": d, "dtype": w["dtype"], "zstd_level": w["zstd_level"],
    "bytes_per_element": w["bytes_per_element"],
    "ours_seconds_median": med_ours, "pyarrow_seconds_median": med_theirs,
    "ours_rows_per_s": rows / med_ours, "pyarrow_rows_per_s": rows / med_theirs,
    "speedup_median": statistics.median(ratios), "speedup_rounds": ratios, "cpus": os.cpu_count(),
}
log(f"reader into a ({rows}, {d}) float32 array, median of {a.rounds} rounds: ours {med_ours:.3f} s "
    f"({rows / med_ours:,.0f} rows/s), pyarrow {med_theirs:.3f} s ({rows / med_theirs:,.0f} rows/s); "
    f"median per-round ratio {result['speedup_median']:.2f}x (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
print(json.dumps(result))
