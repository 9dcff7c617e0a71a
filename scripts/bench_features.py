#!/usr/bin/env python3
"""The plain-PyTorch reference for the features benchmark: the statistics pass of
`sae features build` written the direct way, on dense latents.

  python3 scripts/bench_features.py --data DIR --sae DIR [--top-k 20] [--samples 20]
      [--chunk-rows 4096] [--threads N]

Per chunk of rows (shards in manifest order, read with pyarrow), with the SAE exported by
`sae train` (SAELens layout, TopK): z = dense TopK code [n, d_sae]; then, per feature, firing
counts, sums and maxima, a log-binned histogram, the top-K activations (topk down the rows of z,
merged with the running top-K) and a uniform sample of firing rows (the smallest random keys,
merged the same way). That is the same work as our statistics pass (pass 1), which touches only
the firing latents instead.

Timing starts when the first chunk is read; reading is timed apart. The last line of stdout is one
JSON object: rows, seconds, rows_per_s, read_seconds.
Run it with the venv's python (it needs torch, numpy, pyarrow and safetensors).
"""
import argparse
import json
import os
import sys
import time

import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from bench_train import decode_rows  # noqa: E402

LOG_LO, BINS_PER_DECADE, LOG_BINS = -4.0, 32.0, 256


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--sae", required=True)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--chunk-rows", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = json.load(open(os.path.join(a.sae, "cfg.json")))
    w = load_file(os.path.join(a.sae, "sae_weights.safetensors"))
    k, d_sae = cfg["k"], cfg["d_sae"]
    hook = cfg["metadata"]["sae_pipeline"]["hook_name"]
    manifest = json.load(open(os.path.join(a.data, "manifest.json")))
    d = next(h["d_model"] for h in manifest["hooks"] if h["name"] == hook)

    fired = torch.zeros(d_sae, dtype=torch.int64)
    total = torch.zeros(d_sae, dtype=torch.float64)
    amax = torch.zeros(d_sae)
    hist = torch.zeros(d_sae * LOG_BINS, dtype=torch.int64)
    top_v = torch.full((a.top_k, d_sae), -1.0)
    top_r = torch.zeros((a.top_k, d_sae), dtype=torch.int64)
    key_s = torch.full((a.samples, d_sae), 2.0)
    val_s = torch.zeros((a.samples, d_sae))
    row_s = torch.zeros((a.samples, d_sae), dtype=torch.int64)
    rows = 0
    read_seconds = 0.0
    started = None
    with torch.no_grad():
        for shard in manifest["shards"]:
            f = pq.ParquetFile(os.path.join(a.data, shard["key"]))
            for g in range(len(shard["row_groups"])):
                t0 = time.perf_counter()
                x = torch.from_numpy(decode_rows(f.read_row_group(g, columns=[hook]).column(hook), d, manifest["dtype"]))
                read_seconds += time.perf_counter() - t0
                started = started or t0
                for chunk in x.split(a.chunk_rows):
                    n = chunk.shape[0]
                    pre = (chunk - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
                    v, i = pre.topk(k, dim=1)
                    z = torch.zeros_like(pre).scatter_(1, i, v.relu())
                    fires = z > 0
                    fired += fires.sum(0)
                    total += z.sum(0, dtype=torch.float64)
                    amax = torch.maximum(amax, z.amax(0))
                    at = fires.nonzero()
                    vals = z[fires]
                    b = ((vals.log10() - LOG_LO) * BINS_PER_DECADE).floor().clamp(0, LOG_BINS - 1).long()
                    hist += torch.bincount(at[:, 1] * LOG_BINS + b, minlength=d_sae * LOG_BINS)
                    numbers = torch.arange(rows, rows + n)
                    cv, ci = z.topk(min(a.top_k, n), dim=0)
                    top_v, pick = torch.cat([top_v, cv]).topk(a.top_k, dim=0)
                    top_r = torch.cat([top_r, numbers[ci]]).gather(0, pick)
                    keys = torch.rand(n, d_sae).masked_fill(~fires, 2.0)
                    ck, ci = keys.topk(min(a.samples, n), dim=0, largest=False)
                    key_s, pick = torch.cat([key_s, ck]).topk(a.samples, dim=0, largest=False)
                    val_s = torch.cat([val_s, z.gather(0, ci)]).gather(0, pick)
                    row_s = torch.cat([row_s, numbers[ci]]).gather(0, pick)
                    rows += n
    seconds = time.perf_counter() - started
    print(json.dumps({"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "read_seconds": read_seconds}))


if __name__ == "__main__":
    main()
