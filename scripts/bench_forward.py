#!/usr/bin/env python3
"""transformers' forward throughput on the same GGUF and the same windows as `sae activations`.

Windows: English fortunes (documents separated by '%' lines), each tokenized without special
tokens and followed by EOS, packed into --context-len windows. Prints one JSON line.
"""
import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--gguf", required=True)
ap.add_argument("--text-file", default="/usr/share/games/fortunes/fortunes")
ap.add_argument("--max-tokens", type=int, default=4096)
ap.add_argument("--context-len", type=int, default=256)
ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()

torch.set_num_threads(args.threads)
directory, name = os.path.split(os.path.abspath(args.gguf))
tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
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
with torch.no_grad():
    model(windows[:1, :16])  # warm-up
    start = time.perf_counter()
    for i in range(0, n, args.batch_size):
        model(windows[i : i + args.batch_size])
    secs = time.perf_counter() - start
print(json.dumps({"tokens": n * args.context_len, "seconds": secs, "tokens_per_s": n * args.context_len / secs}))
