#!/usr/bin/env python3
"""The quality benchmark's Python side: SAELens's own trainer on our rows, and one evaluator.

  bench_quality.py train-saelens --data DIR --like SAE_DIR --out DIR [--hook H] [--latents N]
      [--k K] [--batch-size B] [--tokens T] [--lr LR] [--threads N] [--seed S]
      SAELens's SAETrainer (TopK, its own defaults but for the learning rate) on every row of the
      dataset (read with pyarrow, as docs/format.md says, and held in memory; one shuffle per
      epoch), for T training rows. The trained SAE is written in the layout `sae export` writes
      (cfg.json + sae_weights.safetensors): the cfg of --like (an SAE of ours with the same sizes)
      with SAELens's weights, so that both SAELens and `sae eval` load it. SAELens trains on the
      raw rows, so there is no scale to fold (activation_scale 1).
  bench_quality.py evaluate --data DIR SAE_DIR... [--hook H] [--rows N]
      Loads each SAE with SAELens (`SAE.load_from_disk`) and scores it on the dataset's rows:
      FVU over all rows, FVU over inliers (rows with norm <= 3 x the median norm, as `sae eval`),
      L0, and dead latents (never firing on these rows).

Each prints one JSON line on stdout (evaluate: one per SAE); progress goes to stderr. Run it with
the venv's python (torch, numpy, pyarrow, safetensors, sae-lens).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check import batches_on_device, log, read_rows  # noqa: E402

INLIER_NORM_MULTIPLE = 3.0


def only_hook(data, hook):
    if hook:
        return hook
    hooks = json.load(open(os.path.join(data, "manifest.json")))["hooks"]
    if len(hooks) != 1:
        raise SystemExit(f"{data}: several hooks ({', '.join(h['name'] for h in hooks)}); pass --hook")
    return hooks[0]["name"]


def cmd_train_saelens(a):
    os.environ.setdefault("TQDM_DISABLE", "1")
    from safetensors.torch import save_file
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    rows, _ = read_rows(a.data, only_hook(a.data, a.hook), 1 << 62)
    log(f"bench_quality: SAELens on {len(rows)} rows of {a.data}, {a.tokens} training rows, lr {a.lr}")
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=rows.shape[1], d_sae=a.latents, k=a.k, device="cpu",
                                                dtype="float32"))
    steps = a.tokens // a.batch_size
    cfg = SAETrainerConfig(total_training_samples=steps * a.batch_size, train_batch_size_samples=a.batch_size,
                           device="cpu", lr=a.lr, lr_end=a.lr / 10)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches_on_device(rows, a.batch_size, "cpu", a.seed))
    start = time.perf_counter()
    trainer.fit()
    secs = time.perf_counter() - start

    os.makedirs(a.out, exist_ok=True)
    cfg_json = json.load(open(os.path.join(a.like, "cfg.json")))
    ours = cfg_json["metadata"]["sae_pipeline"]
    ours["activation_scale"] = 1.0
    ours["tokens"] = steps * a.batch_size
    cfg_json["metadata"]["trained_by"] = "SAELens SAETrainer (scripts/bench_quality.py)"
    with open(os.path.join(a.out, "cfg.json"), "w") as f:
        json.dump(cfg_json, f, indent=2)
    weights = {name: getattr(sae, name).detach().contiguous().float() for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    save_file(weights, os.path.join(a.out, "sae_weights.safetensors"))
    tokens = steps * a.batch_size
    print(json.dumps({"trainer": "saelens", "lr": a.lr, "tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs}))


def cmd_evaluate(a):
    os.environ.setdefault("TQDM_DISABLE", "1")
    from sae_lens import SAE

    torch.set_num_threads(a.threads)
    x = torch.from_numpy(read_rows(a.data, only_hook(a.data, a.hook), a.rows)[0])
    norms = x.norm(dim=1)
    inliers = norms <= INLIER_NORM_MULTIPLE * norms.median()
    for path in a.sae:
        sae = SAE.load_from_disk(path, device="cpu")
        sq_err, fired, l0 = [], torch.zeros(sae.cfg.d_sae, dtype=torch.bool), 0.0
        with torch.no_grad():
            for b in range(0, len(x), 4096):
                batch = x[b:b + 4096]
                z = sae.encode(batch)
                sq_err.append((sae.decode(z) - batch).double().square().sum(dim=1))
                fired |= (z > 0).any(dim=0)
                l0 += (z > 0).sum().item()
        sq_err = torch.cat(sq_err)

        def fvu(mask):
            rows = x[mask].double()
            return (sq_err[mask].sum() / (rows - rows.mean(dim=0)).square().sum()).item()

        print(json.dumps({"sae": path, "rows": len(x), "fvu": fvu(torch.ones_like(inliers)),
                          "fvu_inliers": fvu(inliers), "inlier_fraction": inliers.double().mean().item(),
                          "l0": l0 / len(x), "dead_fraction": 1.0 - fired.double().mean().item()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-saelens")
    t.add_argument("--data", required=True)
    t.add_argument("--like", required=True, help="an SAE folder of ours with the same sizes (its cfg.json)")
    t.add_argument("--out", required=True)
    t.add_argument("--hook")
    t.add_argument("--latents", type=int, default=4608)
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--batch-size", type=int, default=4096)
    t.add_argument("--tokens", type=int, default=2_400_000)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate")
    e.add_argument("--data", required=True)
    e.add_argument("--hook")
    e.add_argument("--rows", type=int, default=1 << 62)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("sae", nargs="+")
    a = ap.parse_args()
    {"train-saelens": cmd_train_saelens, "evaluate": cmd_evaluate}[a.cmd](a)


if __name__ == "__main__":
    main()
