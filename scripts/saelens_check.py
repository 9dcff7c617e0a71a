#!/usr/bin/env python3
"""Check an exported SAE folder against SAELens: does SAELens load it and compute what we compute?

  python3 scripts/saelens_check.py --sae DIR --inputs FILE.safetensors

DIR is an exported SAE in the SAELens 6.x layout (cfg.json + sae_weights.safetensors).
FILE holds `x` [n, d_in] float32 and our results for it: `latents` [n, d_sae] and `x_hat` [n, d_in].
The SAE is loaded with `SAE.load_from_disk`, then SAELens' own encode runs on x and its decode on
those latents. Both are compared with ours:
  *_max_abs_diff = max |theirs - ours|
  *_max_rel_diff = *_max_abs_diff / (1 + max |value|), max |value| over both tensors
ok is true when both relative diffs are <= 1e-4.

The last stdout line is one compact JSON object. The exit code is 0 whether or not ok; it is
non-zero (with a message on stderr) when the SAE or the inputs cannot be loaded.
Run it with the venv's python (it needs torch, safetensors and sae-lens).
"""
import argparse
import contextlib
import json
import math
import os
import sys

TOL = 1e-4


def fail(msg: str, code: int = 2) -> None:
    print(f"saelens_check: {msg}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sae", required=True, help="SAE folder (cfg.json, sae_weights.safetensors)")
    ap.add_argument("--inputs", required=True, help="safetensors file with x, latents, x_hat")
    args = ap.parse_args()

    for name in ("cfg.json", "sae_weights.safetensors"):
        if not os.path.isfile(os.path.join(args.sae, name)):
            fail(f"{args.sae}: missing {name}")
    try:
        with open(os.path.join(args.sae, "cfg.json")) as f:
            raw_cfg = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{args.sae}/cfg.json: not readable JSON: {e}")
    if not isinstance(raw_cfg, dict):
        fail(f"{args.sae}/cfg.json: not a JSON object")
    # Without metadata.sae_lens_version >= 6 SAELens treats cfg.json as a pre-6.0 config and
    # rebuilds `metadata` from top-level keys, dropping the nested one (hook_name, model_name).
    meta = raw_cfg.get("metadata")
    major = str(meta.get("sae_lens_version") or "") if isinstance(meta, dict) else ""
    major = major.split(".")[0]
    if not major.isdigit() or int(major) < 6:
        print("saelens_check: warning: cfg.json has no metadata.sae_lens_version >= 6; "
              "SAELens will read it as a pre-6.0 config", file=sys.stderr)

    # Everything SAELens and its dependencies print goes to stderr, so that stdout ends with the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        import torch
        from safetensors.torch import load_file

        try:
            from sae_lens import SAE
        except Exception as e:  # noqa: BLE001
            fail(f"cannot import sae_lens: {type(e).__name__}: {e}")

        try:
            sae = SAE.load_from_disk(args.sae, device="cpu")
        except Exception as e:  # noqa: BLE001
            fail(f"SAELens could not load {args.sae}: {type(e).__name__}: {e}")
        sae.eval()

        try:
            tensors = load_file(args.inputs)
        except Exception as e:  # noqa: BLE001
            fail(f"cannot read {args.inputs}: {type(e).__name__}: {e}")
        missing = [k for k in ("x", "latents", "x_hat") if k not in tensors]
        if missing:
            fail(f"{args.inputs}: missing tensor(s) {', '.join(missing)}")
        x = tensors["x"].to(torch.float32)
        ours_z = tensors["latents"].to(torch.float32)
        ours_xhat = tensors["x_hat"].to(torch.float32)
        d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
        if x.dim() != 2 or x.shape[1] != d_in:
            fail(f"x has shape {list(x.shape)}, expected [n, {d_in}]")
        n = x.shape[0]
        if list(ours_z.shape) != [n, d_sae]:
            fail(f"latents has shape {list(ours_z.shape)}, expected [{n}, {d_sae}]")
        if list(ours_xhat.shape) != [n, d_in]:
            fail(f"x_hat has shape {list(ours_xhat.shape)}, expected [{n}, {d_in}]")

        with torch.no_grad():
            z = sae.encode(x)
            if z.is_sparse:
                z = z.to_dense()
            z = z.to(torch.float32)
            xhat = sae.decode(z).to(torch.float32)

    def compare(theirs: "torch.Tensor", ours: "torch.Tensor") -> tuple:
        if n == 0:
            return 0.0, 0.0
        abs_diff = (theirs - ours).abs().max().item()
        scale = max(theirs.abs().max().item(), ours.abs().max().item())
        return abs_diff, abs_diff / (1.0 + scale)

    enc_abs, enc_rel = compare(z, ours_z)
    dec_abs, dec_rel = compare(xhat, ours_xhat)
    finite = all(math.isfinite(v) for v in (enc_abs, enc_rel, dec_abs, dec_rel))
    ok = finite and enc_rel <= TOL and dec_rel <= TOL

    def num(v: float):
        return v if math.isfinite(v) else None  # JSON has no NaN/inf

    cfg = sae.cfg
    result = {
        "architecture": cfg.architecture(),
        "d_in": d_in,
        "d_sae": d_sae,
        "hook_name": cfg.metadata.hook_name,
        "k": getattr(cfg, "k", None),
        "n": n,
        "encode_max_abs_diff": num(enc_abs),
        "encode_max_rel_diff": num(enc_rel),
        "decode_max_abs_diff": num(dec_abs),
        "decode_max_rel_diff": num(dec_rel),
        "latents_l0_sae_lens": (z != 0).sum(dim=-1).float().mean().item() if n else 0.0,
        "latents_l0_ours": (ours_z != 0).sum(dim=-1).float().mean().item() if n else 0.0,
        "ok": ok,
    }
    print(json.dumps(result, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
