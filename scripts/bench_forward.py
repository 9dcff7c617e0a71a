#!/usr/bin/env python3
"""transformers' forward throughput on the same GGUF and the same windows as `sae activations`.

Windows: English fortunes (documents separated by '%' lines), each tokenized without special
tokens and followed by EOS, packed into --context-len windows. With --stop-at-block L the forward
is stopped at the output of block L (= `blocks.L.hook_resid_post`) by a forward hook that raises,
which is how one captures a layer with transformers without paying for the blocks above it.
Prints one JSON line.
"""
import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class StopForward(Exception):
    """Raised by the hook on the last wanted block, carrying its output."""


ap = argparse.ArgumentParser()
ap.add_argument("--gguf", required=True)
ap.add_argument("--text-file", default="/usr/share/games/fortunes/fortunes")
ap.add_argument("--max-tokens", type=int, default=4096)
ap.add_argument("--context-len", type=int, default=256)
ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--stop-at-block", type=int, help="stop after this block (default: the full forward)")
ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
args = ap.parse_args()

torch.set_num_threads(args.threads)
dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
directory, name = os.path.split(os.path.abspath(args.gguf))
tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype).eval()
if args.stop_at_block is not None:
    def stop(_module, _inputs, output):
        raise StopForward(output[0] if isinstance(output, tuple) else output)

    model.model.layers[args.stop_at_block].register_forward_hook(stop)


def run(batch):
    try:
        model(batch, use_cache=False)
    except StopForward:
        return
    if args.stop_at_block is not None:
        raise RuntimeError("the hook did not stop the forward")


eos = 2
stream = []
with open(args.text_file, encoding="utf-8") as f:
    for doc in f.read().split("\n%\n"):
        doc = doc.strip()
        if not doc:
            continue
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [eos]
        if len(stream) >= args.max_tokens:
            break
stream = stream[: args.max_tokens]
n = len(stream) // args.context_len
windows = torch.tensor(stream[: n * args.context_len]).view(n, args.context_len)
with torch.inference_mode():
    run(windows[:1, :16])  # warm-up
    start = time.perf_counter()
    for i in range(0, n, args.batch_size):
        run(windows[i : i + args.batch_size])
    secs = time.perf_counter() - start
print(json.dumps({"tokens": n * args.context_len, "seconds": secs, "tokens_per_s": n * args.context_len / secs,
                  "dtype": args.dtype, "stop_at_block": args.stop_at_block}))
