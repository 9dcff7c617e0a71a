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
import time

import torch
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--context-len", type=int, default=256)
ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--d-model", type=int, default=576)
ap.add_argument("--heads", type=int, default=9)
ap.add_argument("--kv-heads", type=int, default=3)
ap.add_argument("--blocks", type=int, default=16, help="blocks per forward, for the per-token figure")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
ap.add_argument("--rounds", type=int, default=20, help="best of this many calls")
a = ap.parse_args()

torch.set_num_threads(a.threads)
dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
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
