#!/usr/bin/env python3
"""The attention kernel against its own matrix products, at the shapes of the capture benchmark.

Times `scaled_dot_product_attention` as capture/src/attention.rs calls it for a window that
starts at position 0 (causal, grouped-query heads broadcast by `enable_gqa`, q/k/v laid out as
the fused projection leaves them) against the two batched matrix products it stands for (scores
and weighted sum, no masking, no softmax), best of --rounds. The difference is what the kernel
costs beyond the products that bench_matmul.py counts in the limit. Prints one JSON line.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shapes import parse, shape_args  # noqa: E402

ap = argparse.ArgumentParser()
shape_args(ap)  # --blocks: blocks per forward, for the per-token figure
ap.add_argument("--rounds", type=int, default=20, help="best of this many calls")
a, dtype = parse(ap)
b, t, h, kvh = a.batch_size, a.context_len, a.heads, a.kv_heads
hd = a.d_model // h
group = h // kvh
# [b, t, heads, hd] transposed to [b, heads, t, hd], as the projection's output is viewed.
q = torch.randn(b, t, h, hd, dtype=dtype).transpose(1, 2)
k = torch.randn(b, t, kvh, hd, dtype=dtype).transpose(1, 2)
v = torch.randn(b, t, kvh, hd, dtype=dtype).transpose(1, 2)
q_grouped = q.contiguous().view(b * kvh, group * t, hd)  # each K/V head's query heads together
k_flat = k.reshape(b * kvh, t, hd)
v_flat = v.reshape(b * kvh, t, hd)


def kernel():
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def products():
    scores = torch.bmm(q_grouped, k_flat.transpose(1, 2))  # [b·kvh, group·t, t]
    return torch.bmm(scores, v_flat)  # [b·kvh, group·t, hd]


best = {"kernel": float("inf"), "products": float("inf")}
with torch.no_grad():
    for _ in range(a.rounds):
        for name, f in (("kernel", kernel), ("products", products)):
            start = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - start)
tokens = b * t
excess = max(best["kernel"] - best["products"], 0.0)
print(
    json.dumps(
        {
            "dtype": a.dtype,
            "kernel_ms": round(best["kernel"] * 1e3, 3),
            "products_ms": round(best["products"] * 1e3, 3),
            "kernel_over_products": round(best["kernel"] / best["products"], 3),
            "excess_s_per_token": excess * a.blocks / tokens,
        }
    )
)
