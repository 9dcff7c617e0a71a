#!/usr/bin/env python3
"""Capture real SmolLM2-135M layer-15 residual activations (blocks.15.hook_resid_post) for the
store benchmark, using the `transformers` reference implementation (not our capture crate).

Writes OUT/acts.f32 (rows x 576 float32, row-major), OUT/tokens.u32, OUT/meta.json.
Windows of --ctx tokens are cut from the concatenated fortunes corpus, so most windows start
mid-document, as a real capture does.

usage: gen_activations.py --out DIR [--tokens N] [--ctx 256] [--batch 8]
"""
import argparse, glob, json, os, random, time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--tokens", type=int, default=65536)
p.add_argument("--ctx", type=int, default=256)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--model-dir", default=os.path.expanduser(os.environ.get("SAE_MODEL_DIR", "~/.cache/sae-pipeline/models")))
p.add_argument("--gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf")
p.add_argument("--corpus", default="/usr/share/games/fortunes")
a = p.parse_args()
os.makedirs(a.out, exist_ok=True)
torch.set_grad_enabled(False)
tok = AutoTokenizer.from_pretrained(a.model_dir, gguf_file=a.gguf)
model = AutoModelForCausalLM.from_pretrained(a.model_dir, gguf_file=a.gguf, torch_dtype=torch.float32).eval()

files = sorted(f for f in glob.glob(os.path.join(a.corpus, "*"))
               if os.path.isfile(f) and not f.endswith((".dat", ".u8")))
docs = []
for f in files:
    text = open(f, encoding="utf-8", errors="replace").read()
    docs.extend(d.strip() for d in text.split("\n%\n") if d.strip())
random.Random(0).shuffle(docs)  # mix the topic files so a small sample is representative
ids = []
need = a.tokens + a.ctx
for d in docs:
    ids.extend(tok(d)["input_ids"] + [tok.eos_token_id])
    if len(ids) >= need:
        break
n_windows = a.tokens // a.ctx
windows = np.array(ids[: n_windows * a.ctx], dtype=np.int64).reshape(n_windows, a.ctx)

acts = np.lib.format.open_memmap(os.path.join(a.out, "acts.npy"), mode="w+", dtype=np.float32,
                                 shape=(n_windows * a.ctx, model.config.hidden_size))
t0 = time.time()
for i in range(0, n_windows, a.batch):
    x = torch.from_numpy(windows[i : i + a.batch])
    out = model(input_ids=x, output_hidden_states=True)
    h = out.hidden_states[16].float().numpy()  # hidden_states[0] is the embedding; [16] = after block 15
    acts[i * a.ctx : i * a.ctx + h.shape[0] * a.ctx] = h.reshape(-1, h.shape[-1])
    print(f"{(i + x.shape[0]) * a.ctx} tokens, {time.time() - t0:.0f}s", flush=True)
acts.flush()
windows.astype(np.uint32).tofile(os.path.join(a.out, "tokens.u32"))
json.dump({"rows": int(n_windows * a.ctx), "d": int(model.config.hidden_size), "ctx": a.ctx,
           "hook": "blocks.15.hook_resid_post", "model": a.gguf, "corpus": a.corpus},
          open(os.path.join(a.out, "meta.json"), "w"))
print("done", a.out)
