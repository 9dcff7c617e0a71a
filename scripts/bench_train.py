#!/usr/bin/env python3
"""The plain-PyTorch (eager) reference for the training benchmark: a TopK SAE trained on an
activation dataset written by our store, on the CPU, with the same algorithm as `sae train`.

  python3 scripts/bench_train.py --data DIR [--hook NAME] [--latents N] [--k K]
      [--batch-size B] [--max-tokens T] [--lr LR] [--warmup-steps N] [--dead-window T]
      [--threads N] [--seed S]

What it mirrors (trainer/src/sae.rs, train.rs, schedule.rs, dead.rs):
  - inputs scaled by sqrt(d_model / mean_sq_norm) from the manifest; b_dec = mean * scale;
  - W_dec rows random with unit norm, W_enc = W_dec^T, b_enc = 0;
  - pre = (x - b_dec) @ W_enc + b_enc; per-row top-k, ReLU'd; x_hat = z @ W_dec + b_dec;
    mse = mean((x_hat - x)^2);
  - AuxK on latents that have not fired for min(--dead-window, the run) tokens: k_aux = d_in / 2,
    scaled by min(n_dead / k_aux, 1), coefficient 1/32, against the detached residual;
  - W_dec's gradient projected orthogonal to its rows, gradients clipped to norm 1, Adam
    (0.9, 0.999, 1e-8), LR warm-up over --warmup-steps and a linear decay to 0 over the last 20%,
    W_dec rows renormalized after each step.
Data: shards in manifest order, one row group at a time with pyarrow, rows shuffled within
chunks of 8 row groups, batches of B rows (the remainder carries over to the next chunk;
epochs repeat until --max-tokens). Loading is synchronous, in this thread, and timed apart.

Timing starts once the first batch is ready. Progress goes to stderr; the last line of stdout
is one JSON object: tokens, seconds, tokens_per_s, data_wait_fraction, final_mse (the mean
over the last --log-every steps, as in `sae train`'s summary: single batches are noisy, since
the rare first-position rows have huge norms), steps.
Run it with the venv's python (it needs torch, numpy and pyarrow).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import torch

DECAY_FRACTION = 0.2
WINDOW_ROW_GROUPS = 8
AUXK_COEFF = 1.0 / 32.0


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def decode_rows(column, d, dtype):
    """A fixed_size_binary(d * size) column chunk (byte-planar rows) -> (rows, d) float32.

    As in docs/format.md: byte b of element j sits at offset b * d + j of its row."""
    size = {"bf16": 2, "f16": 2, "f32": 4}[dtype]
    raw = np.concatenate([
        np.frombuffer(c.buffers()[1], np.uint8)[c.offset * d * size:(c.offset + len(c)) * d * size]
        for c in column.chunks
    ])
    planes = raw.reshape(-1, size, d)  # (rows, byte, element)
    if dtype == "bf16":  # bf16 = the top 2 bytes of an f32
        bits = planes[:, 0, :].astype(np.uint32) << 16 | planes[:, 1, :].astype(np.uint32) << 24
        return bits.view(np.float32)
    if dtype == "f16":
        return np.ascontiguousarray(planes.transpose(0, 2, 1)).view(np.float16)[..., 0].astype(np.float32)
    return np.ascontiguousarray(planes.transpose(0, 2, 1)).view(np.float32)[..., 0]


def batches(data_dir, manifest, hook, d, batch_size, seed):
    """Yields (rows, d) float32 batches forever: manifest order, shuffled within windows."""
    rng = np.random.default_rng(seed)
    groups = [(s["key"], i) for s in manifest["shards"] for i in range(len(s["row_groups"]))]
    if not groups:
        raise SystemExit(f"{data_dir}: the manifest lists no row groups")
    files = {}
    carry = np.empty((0, d), np.float32)
    while True:  # epochs
        for start in range(0, len(groups), WINDOW_ROW_GROUPS):
            parts = [carry]
            for key, i in groups[start:start + WINDOW_ROW_GROUPS]:
                if key not in files:
                    files[key] = pq.ParquetFile(os.path.join(data_dir, key))
                table = files[key].read_row_group(i, columns=[hook])
                parts.append(decode_rows(table.column(hook), d, manifest["dtype"]))
            # The carried-over rows were shuffled already; shuffle them again with the rest.
            window = np.concatenate(parts)
            window = window[rng.permutation(len(window))]
            full = len(window) // batch_size * batch_size
            for b in range(0, full, batch_size):
                yield window[b:b + batch_size]
            carry = window[full:]


def lr_at(step, lr, warmup_steps, total_steps):
    """trainer::schedule::LrSchedule::at with a 20% decay."""
    warm = (step + 1) / warmup_steps if step < warmup_steps else 1.0
    decay_steps = math.floor(total_steps * DECAY_FRACTION + 0.5)
    decay_start = max(total_steps - decay_steps, 0)
    decay = (total_steps - step) / decay_steps if decay_steps > 0 and step >= decay_start else 1.0
    return lr * min(warm, decay)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a local dataset folder (with manifest.json)")
    p.add_argument("--hook", default="blocks.15.hook_resid_post")
    p.add_argument("--latents", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=1_000_000)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--dead-window", type=int, default=10_000_000,
                   help="tokens without firing after which a latent is dead (capped at the run)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    a = p.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    manifest = json.load(open(os.path.join(a.data, "manifest.json")))
    if manifest.get("format_version") != 1:
        raise SystemExit(f"{a.data}: unknown format_version {manifest.get('format_version')}")
    hooks = {h["name"]: h for h in manifest["hooks"]}
    if a.hook not in hooks:
        raise SystemExit(f"{a.data} has no hook {a.hook}; it has: {', '.join(hooks)}")
    hook = hooks[a.hook]
    d_in, d_sae, k = hook["d_model"], a.latents, a.k
    if not 0 < k <= d_sae:
        raise SystemExit(f"--k {k} must be between 1 and --latents {d_sae}")
    scale = math.sqrt(d_in / hook["mean_sq_norm"])
    total_steps = -(-a.max_tokens // a.batch_size)
    dead_window = max(min(a.dead_window, total_steps * a.batch_size), 1)
    k_aux = max(d_in // 2, 1)

    # Parameters (fp32), initialized as trainer::sae::Sae::new and set_decoder_bias.
    dirs = torch.randn(d_sae, d_in)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    W_dec = dirs.clone().requires_grad_()
    W_enc = dirs.t().contiguous().requires_grad_()
    b_enc = torch.zeros(d_sae, requires_grad=True)
    b_dec = (torch.tensor(hook["mean"], dtype=torch.float32) * scale).requires_grad_()
    params = [W_enc, b_enc, W_dec, b_dec]
    opt = torch.optim.Adam(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8)
    tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64)

    data = batches(a.data, manifest, a.hook, d_in, a.batch_size, a.seed)
    log(f"bench_train: {a.data} hook {a.hook} d_in {d_in}, topk k={k}, {d_sae} latents, batch {a.batch_size}, "
        f"{total_steps} steps, {torch.get_num_threads()} threads, torch {torch.__version__}")
    t_load = time.perf_counter()
    batch = next(data)
    log(f"first batch ready in {time.perf_counter() - t_load:.2f} s")

    start = time.perf_counter()
    wait = 0.0
    mse_value, mse_sum, mse_count = float("nan"), 0.0, 0
    for step in range(total_steps):
        if step > 0:
            t = time.perf_counter()
            batch = next(data)
            wait += time.perf_counter() - t
        x = torch.from_numpy(batch) * scale

        opt.zero_grad(set_to_none=False)
        pre = (x - b_dec) @ W_enc + b_enc
        values, indices = pre.topk(k, dim=1)
        z = torch.zeros_like(pre).scatter(1, indices, values.relu())
        x_hat = z @ W_dec + b_dec
        mse = (x_hat - x).square().mean()
        loss = mse
        dead = tokens_since_fired >= dead_window
        n_dead = int(dead.sum())
        if n_dead > 0:
            residual = (x - x_hat).detach()
            dead_pre = pre.masked_fill(~dead, float("-inf"))
            aux_values, aux_indices = dead_pre.topk(min(k_aux, n_dead), dim=1)
            aux_z = torch.zeros_like(pre).scatter(1, aux_indices, aux_values.relu())
            auxk = (aux_z @ W_dec - residual).square().mean() * min(n_dead / k_aux, 1.0)
            loss = loss + AUXK_COEFF * auxk
        loss.backward()

        with torch.no_grad():
            rows = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).eps)
            W_dec.grad -= (W_dec.grad * rows).sum(dim=1, keepdim=True) * rows
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a.lr, a.warmup_steps, total_steps)
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).eps)
            fired = (z != 0).any(dim=0)
            tokens_since_fired += len(batch)
            tokens_since_fired.masked_fill_(fired, 0)
            mse_sum, mse_count = mse_sum + mse.detach(), mse_count + 1

        if (step + 1) % a.log_every == 0 or step + 1 == total_steps:
            # Like `sae train`'s summary: the mean over the last logged interval.
            mse_value, mse_sum, mse_count = float(mse_sum) / mse_count, 0.0, 0
            elapsed = time.perf_counter() - start
            log(f"step {step + 1}/{total_steps}: mse {mse_value:.4f}, dead {n_dead}, "
                f"{(step + 1) * a.batch_size / elapsed:,.0f} tokens/s, waiting {100 * wait / elapsed:.1f}%")

    seconds = time.perf_counter() - start
    tokens = total_steps * a.batch_size
    print(json.dumps({
        "tokens": tokens,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 1),
        "data_wait_fraction": round(wait / seconds, 5),
        "final_mse": mse_value,
        "steps": total_steps,
    }, separators=(",", ":")))


if __name__ == "__main__":
    main()
