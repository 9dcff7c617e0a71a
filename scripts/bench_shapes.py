"""The forward's shapes that the capture benchmarks share, so that the matrix-product limit
(bench_matmul.py) and the attention kernel's timing (bench_attention.py) describe the same model
and batch. Defaults: SmolLM2-135M (../shared/ENVIRONMENT.md), batches of 8 windows of 256 tokens,
the 16 blocks up to blocks.15, 2 threads."""
import argparse

import torch

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def shape_args(ap: argparse.ArgumentParser) -> None:
    """Adds the shared shape, thread and dtype options to `ap`."""
    ap.add_argument("--context-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")


def parse(ap: argparse.ArgumentParser) -> tuple[argparse.Namespace, torch.dtype]:
    """Parses the arguments, sets torch's threads, and returns them with the torch dtype."""
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    return a, DTYPES[a.dtype]
