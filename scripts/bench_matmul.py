#!/usr/bin/env python3
"""The matrix-product limit of a forward pass to a block: only its matrix products, timed alone.

For --tokens tokens in windows of --context-len, runs every block's matrix products up to and
including --blocks blocks, at the shapes of a Llama-style model (defaults: SmolLM2-135M, whose
figures are in ../shared/ENVIRONMENT.md): the fused Q/K/V projection, the attention scores and
their weighted sum (causal masking aside), the output projection, the fused gate/up projection
and the down projection. Norms, RoPE, softmax, SiLU and the residual adds are left out, so no
forward pass of the same shapes can be faster than this on the same threads and dtype. Prints one
JSON line: seconds and tokens/s of the products alone.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shapes import parse, shape_args  # noqa: E402

ap = argparse.ArgumentParser()
shape_args(ap)
ap.add_argument("--tokens", type=int, default=8192)
ap.add_argument("--d-ff", type=int, default=1536)
ap.add_argument("--rounds", type=int, default=3, help="best of this many passes")
a, dtype = parse(ap)
hd = a.d_model // a.heads
rows = a.batch_size * a.context_len
w_qkv = torch.randn(a.d_model + 2 * a.kv_heads * hd, a.d_model, dtype=dtype)
w_o = torch.randn(a.d_model, a.d_model, dtype=dtype)
w_gate_up = torch.randn(2 * a.d_ff, a.d_model, dtype=dtype)
w_down = torch.randn(a.d_model, a.d_ff, dtype=dtype)
x = torch.randn(rows, a.d_model, dtype=dtype)
q = torch.randn(a.batch_size * a.heads, a.context_len, hd, dtype=dtype)
h = torch.randn(rows, a.d_ff, dtype=dtype)


def block():
    torch.nn.functional.linear(x, w_qkv)  # [rows, d + 2 kvh hd]
    scores = torch.bmm(q, q.transpose(1, 2))  # [b h, t, t]
    torch.bmm(scores, q)  # [b h, t, hd]
    torch.nn.functional.linear(x, w_o)  # [rows, d]
    torch.nn.functional.linear(x, w_gate_up)  # [rows, 2 d_ff]
    torch.nn.functional.linear(h, w_down)  # [rows, d]


batches = max(1, a.tokens // rows)
with torch.inference_mode():
    block()  # warm-up
    best = float("inf")
    for _ in range(a.rounds):
        start = time.perf_counter()
        for _ in range(batches):
            for _ in range(a.blocks):
                block()
        best = min(best, time.perf_counter() - start)
tokens = batches * rows
print(json.dumps({"tokens": tokens, "seconds": best, "tokens_per_s": tokens / best, "dtype": a.dtype,
                  "blocks": a.blocks}))
