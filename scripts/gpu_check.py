#!/usr/bin/env python3
"""The PyTorch side of scripts/gpu-check.sh: the references our CUDA paths are compared with.

  gpu_check.py bundle   --gguf FILE --corpus-dir DIR --out DIR
      (on a machine with the model) config.json and tokenizer.json of the GGUF's model, and one
      fortune-format file of every fortune file in DIR, for a machine that cannot fetch them.
  gpu_check.py stand-in --bundle DIR --out DIR [--seed S]
      a Hugging Face folder with the bundle's config and tokenizer and random weights: the real
      model's shapes (so the same work per token), not its weights.
  gpu_check.py forward  --model DIR --corpus FILE --device D --dtype T --tokens N [--layer L]
      transformers' forward stopped at the output of block L by a forward hook that raises (the
      same work as our early exit at blocks.L.hook_resid_post); tokens/s.
  gpu_check.py train    --data DIR --device D [--autocast] --latents N --k K --batch-size B --tokens T
      SAELens's own SAETrainer on a TopK SAE over the dataset's rows (read with pyarrow and held on
      the device, so its data loading is not timed); steps/s. Without sae_lens importable it says
      so and times the plain-PyTorch TopK step of scripts/bench_train.py instead (reference "eager").
  gpu_check.py roofline --device D --latents N --d D --batch-size B
      the dense matrix products of one TopK SAE training step (encoder and decoder forward, and
      the three weight and input gradients), alone, in bf16 and f32: the time a step cannot beat.

Each prints one JSON line on stdout; progress goes to stderr.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

EOS = 2


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fortune_documents(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for doc in f.read().split("\n%\n"):
            doc = doc.strip()
            if doc and doc != "%":
                yield doc


def cmd_bundle(a):
    from transformers import AutoConfig, AutoTokenizer

    os.makedirs(a.out, exist_ok=True)
    directory, name = os.path.split(os.path.abspath(a.gguf))
    AutoConfig.from_pretrained(directory, gguf_file=name).to_json_file(os.path.join(a.out, "config.json"))
    # The fast tokenizer's files only: the slow tokenizer's own file would be a copy of the GGUF.
    AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(a.out, legacy_format=False)
    files = []
    for root, dirs, names in os.walk(a.corpus_dir):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(root, n)
            if not n.endswith((".dat", ".u8")) and not os.path.islink(p) and os.path.isfile(p):
                files.append(p)
    docs = 0
    with open(os.path.join(a.out, "corpus.txt"), "w", encoding="utf-8") as out:
        for p in files:
            for doc in fortune_documents(p):
                out.write(doc + "\n%\n")
                docs += 1
    print(json.dumps({"files": len(files), "documents": docs, "out": a.out}))


def cmd_stand_in(a):
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(a.seed)
    config = AutoConfig.from_pretrained(a.bundle)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    os.makedirs(a.out, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True)
    for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(a.bundle, n), a.out)
    print(json.dumps({"out": a.out, "parameters": sum(p.numel() for p in model.parameters())}))


class StopForward(Exception):
    pass


def cmd_forward(a):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    if a.threads:
        torch.set_num_threads(a.threads)
    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    stream = []
    for doc in fortune_documents(a.corpus):
        stream += tok.encode(doc, add_special_tokens=False).ids + [EOS]
        if len(stream) >= a.tokens:
            break
    n = min(len(stream), a.tokens) // a.context_len
    windows = torch.tensor(stream[: n * a.context_len]).view(n, a.context_len).to(a.device)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(a.device).eval()
    layers = model.model.layers
    if not 0 <= a.layer < len(layers):
        raise SystemExit(f"--layer {a.layer}: the model has {len(layers)} blocks")

    def stop(_module, _inputs, output):
        raise StopForward(output[0] if isinstance(output, tuple) else output)

    layers[a.layer].register_forward_hook(stop)

    def run(batch):
        try:
            model(batch, use_cache=False)
        except StopForward as s:
            return s.args[0]
        raise RuntimeError("the hook did not stop the forward")

    with torch.inference_mode():
        for _ in range(3):  # warm-up: kernels, allocator
            run(windows[:1])
        sync(a.device)
        start = time.perf_counter()
        for i in range(0, n, a.batch_size):
            run(windows[i:i + a.batch_size])
        sync(a.device)
        secs = time.perf_counter() - start
    tokens = n * a.context_len
    print(json.dumps({"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs, "dtype": a.dtype,
                      "device": a.device, "transformers_layer": a.layer}))


def read_rows(data, hook, max_rows):
    """Rows of `hook` from a dataset folder, with pyarrow, decoded as docs/format.md says."""
    import pyarrow.parquet as pq

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_train import decode_rows

    manifest = json.load(open(os.path.join(data, "manifest.json")))
    d = next(h["d_model"] for h in manifest["hooks"] if h["name"] == hook)
    parts, rows = [], 0
    for shard in manifest["shards"]:
        f = pq.ParquetFile(os.path.join(data, shard["key"]))
        for i in range(f.num_row_groups):
            parts.append(decode_rows(f.read_row_group(i, columns=[hook]).column(hook), d, manifest["dtype"]))
            rows += len(parts[-1])
            if rows >= max_rows:
                return np.concatenate(parts)[:max_rows], manifest
    return np.concatenate(parts), manifest


def batches_on_device(rows, batch_size, device, seed=0):
    """Endless batches drawn from rows held on the device (one permutation per epoch)."""
    x = torch.from_numpy(rows).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), device=device, generator=g)
        for b in range(0, len(x) - batch_size + 1, batch_size):
            yield x[perm[b:b + batch_size]]


def saelens_steps(a, data):
    os.environ.setdefault("TQDM_DISABLE", "1")
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps = a.tokens // a.batch_size
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=a.d_in, d_sae=a.latents, k=a.k, device=a.device, dtype="float32"))
    cfg = SAETrainerConfig(total_training_samples=steps * a.batch_size, train_batch_size_samples=a.batch_size,
                           device=a.device, autocast=a.autocast, lr=a.lr, lr_end=a.lr / 10)
    # The first steps (allocations, kernel choice) are not timed: a short run first.
    warm = SAETrainer(cfg=SAETrainerConfig(total_training_samples=5 * a.batch_size,
                                           train_batch_size_samples=a.batch_size, device=a.device,
                                           autocast=a.autocast, lr=a.lr, lr_end=a.lr / 10), sae=sae, data_provider=data)
    warm.fit()
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=data)
    sync(a.device)
    start = time.perf_counter()
    trainer.fit()
    sync(a.device)
    return steps, time.perf_counter() - start


def eager_steps(a, data):
    """The plain-PyTorch TopK step of scripts/bench_train.py (no AuxK: nothing is dead this early)."""
    steps = a.tokens // a.batch_size
    dirs = torch.nn.functional.normalize(torch.randn(a.latents, a.d_in, device=a.device), dim=1)
    W_dec = dirs.clone().requires_grad_()
    W_enc = dirs.t().contiguous().requires_grad_()
    b_enc = torch.zeros(a.latents, device=a.device, requires_grad=True)
    b_dec = torch.zeros(a.d_in, device=a.device, requires_grad=True)
    params = [W_enc, b_enc, W_dec, b_dec]
    opt = torch.optim.Adam(params, lr=a.lr)
    autocast = torch.autocast(device_type=torch.device(a.device).type, dtype=torch.bfloat16, enabled=a.autocast)

    def step(x):
        opt.zero_grad(set_to_none=False)
        with autocast:
            pre = (x - b_dec) @ W_enc + b_enc
            values, indices = pre.topk(a.k, dim=1)
            z = torch.zeros_like(pre).scatter(1, indices, values.relu())
            loss = (z @ W_dec + b_dec - x).float().square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)

    for _ in range(5):
        step(next(data))
    sync(a.device)
    start = time.perf_counter()
    for _ in range(steps):
        step(next(data))
    sync(a.device)
    return steps, time.perf_counter() - start


def cmd_train(a):
    if a.threads:
        torch.set_num_threads(a.threads)
    rows, manifest = read_rows(a.data, a.hook, a.max_rows)
    hook = next(h for h in manifest["hooks"] if h["name"] == a.hook)
    a.d_in = hook["d_model"]
    # Scaled as our trainer scales its inputs, so both train on rows of the same size.
    rows = rows * np.float32(np.sqrt(a.d_in / hook["mean_sq_norm"]))
    data = batches_on_device(rows, a.batch_size, a.device)
    try:
        import sae_lens  # noqa: F401

        reference = "SAELens " + sae_lens.__version__
        steps, secs = saelens_steps(a, data)
    except ImportError as e:
        log(f"gpu_check: sae_lens cannot be imported here ({e}); timing the plain-PyTorch eager TopK step instead")
        reference = "eager PyTorch (SAELens missing)"
        steps, secs = eager_steps(a, data)
    print(json.dumps({"reference": reference, "steps": steps, "seconds": secs, "steps_per_s": steps / secs,
                      "tokens_per_s": steps * a.batch_size / secs, "autocast_bf16": a.autocast,
                      "rows_held": len(rows), "device": a.device}))


def cmd_roofline(a):
    if a.threads:
        torch.set_num_threads(a.threads)
    out = {"device": a.device, "batch_size": a.batch_size, "d_in": a.d, "latents": a.latents}
    for name, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
        B, d, L = a.batch_size, a.d, a.latents
        x = torch.randn(B, d, device=a.device, dtype=dtype)
        W_enc = torch.randn(d, L, device=a.device, dtype=dtype)
        W_dec = torch.randn(L, d, device=a.device, dtype=dtype)
        z = torch.randn(B, L, device=a.device, dtype=dtype)
        g = torch.randn(B, d, device=a.device, dtype=dtype)

        def products():
            x @ W_enc          # encoder forward
            z @ W_dec          # decoder forward (dense: the bound for any decoder)
            z.t() @ g          # decoder weight gradient
            g @ W_dec.t()      # gradient into the latents
            x.t() @ z          # encoder weight gradient

        for _ in range(3):
            products()
        sync(a.device)
        times = []
        for _ in range(a.repeats):
            start = time.perf_counter()
            products()
            sync(a.device)
            times.append(time.perf_counter() - start)
        secs = float(np.median(times))
        out[f"{name}_step_seconds"] = secs
        out[f"{name}_tflops"] = 5 * 2 * B * d * L / secs / 1e12
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bundle")
    b.add_argument("--gguf", required=True)
    b.add_argument("--corpus-dir", default="/usr/share/games/fortunes")
    b.add_argument("--out", required=True)
    s = sub.add_parser("stand-in")
    s.add_argument("--bundle", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    f = sub.add_parser("forward")
    f.add_argument("--model", required=True, help="a Hugging Face folder")
    f.add_argument("--corpus", required=True)
    f.add_argument("--device", default="cuda")
    f.add_argument("--dtype", default="bf16")
    f.add_argument("--tokens", type=int, default=1_000_000)
    f.add_argument("--context-len", type=int, default=256)
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--layer", type=int, default=15)
    f.add_argument("--threads", type=int)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--hook", default="blocks.15.hook_resid_post")
    t.add_argument("--device", default="cuda")
    t.add_argument("--autocast", action="store_true", help="bf16 autocast (SAELens's `autocast`)")
    t.add_argument("--latents", type=int, default=4608)
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--batch-size", type=int, default=4096)
    t.add_argument("--tokens", type=int, default=8_000_000)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--max-rows", type=int, default=2_000_000)
    t.add_argument("--threads", type=int)
    r = sub.add_parser("roofline")
    r.add_argument("--device", default="cuda")
    r.add_argument("--latents", type=int, default=4608)
    r.add_argument("--d", type=int, default=576)
    r.add_argument("--batch-size", type=int, default=4096)
    r.add_argument("--repeats", type=int, default=50)
    r.add_argument("--threads", type=int)
    a = p.parse_args()
    {"bundle": cmd_bundle, "stand-in": cmd_stand_in, "forward": cmd_forward, "train": cmd_train,
     "roofline": cmd_roofline}[a.cmd](a)


if __name__ == "__main__":
    main()
