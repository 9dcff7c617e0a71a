#!/usr/bin/env python3
"""Upload a `sae features export --format neuronpedia` folder with neuronpedia's own client.

  NEURONPEDIA_API_KEY=... python3 scripts/neuronpedia_upload.py DIR [--dry-run]

The model and the source set must exist on Neuronpedia first, created by their owner with the
same client (neuronpedia 1.2.1; see its examples/upload_features.ipynb):

  from neuronpedia.np_model import Model; Model.new(id=MODEL_ID, layers=30)
  from neuronpedia.np_source_set import SourceSet; SourceSet.new(model_id=MODEL_ID, name=SAE_SET)

MODEL_ID, the layer and SAE_SET are those of the export (batch files' `model_id`, `layer`,
`sae_set`; `sae features export --model-id ... --sae-set ...` sets them); the source is
`<layer>-<sae set>`. Each feature goes up with its density, top and bottom logits and its
activation windows (top activations without a quantile, quantile samples with their band's
min, max and share of tokens), at most 128 per request as the client requires. --dry-run builds
the requests with the client's own code and prints their count instead of sending them.
"""
import argparse
import json
import os
import re
import sys


def client_features(batch: dict, source: str) -> list:
    """A batch file's features as neuronpedia's client objects (their constructors check them)."""
    from neuronpedia.np_activation import Activation
    from neuronpedia.np_feature import Feature, Logit

    model_id = batch["model_id"]
    out = []
    for f in batch["features"]:
        acts = [
            Activation(
                modelId=model_id, source=source, index=f["feature_index"], tokens=a["tokens"], values=a["values"],
                # The runner marks top activations with bin_contains = -1: no quantile.
                quantileMin=None if a["bin_contains"] < 0 else a["bin_min"],
                quantileMax=None if a["bin_contains"] < 0 else a["bin_max"],
                quantileFraction=None if a["bin_contains"] < 0 else a["bin_contains"],
            )
            for a in f["activations"]
        ]
        out.append(Feature(
            modelId=model_id, source=source, index=f["feature_index"], density=f["frac_nonzero"],
            top_logits=[Logit(t, v) for t, v in zip(f["pos_str"], f["pos_values"])],
            bottom_logits=[Logit(t, v) for t, v in zip(f["neg_str"], f["neg_values"])],
            activations=acts,
        ))
    return out


def batch_files(folder: str) -> list:
    names = [n for n in os.listdir(folder) if re.fullmatch(r"batch-\d+\.json", n)]
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(n[6:-5]))]


def upload(folder: str, request) -> list:
    """Sends every batch through `request.upload_batch`; returns its answers."""
    from neuronpedia.requests.feature_request import MAX_FEATURES_PER_BATCH

    answers = []
    for path in batch_files(folder):
        with open(path, encoding="utf-8") as f:
            batch = json.load(f)
        source = f"{batch['layer']}-{batch['sae_set']}"
        features = client_features(batch, source)
        for start in range(0, len(features), MAX_FEATURES_PER_BATCH):
            answers.append(request.upload_batch(batch["model_id"], source, features[start:start + MAX_FEATURES_PER_BATCH]))
    return answers


def dry_run_request():
    """neuronpedia's FeatureRequest with the network call replaced by a recorder."""
    from neuronpedia.requests.feature_request import FeatureRequest

    request = FeatureRequest(api_key="dry-run")
    request.sent = []
    request.send_request = lambda method, uri, json=None, **_: request.sent.append((method, uri, json)) or {}
    return request


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--dry-run", action="store_true", help="build the requests, do not send them")
    args = ap.parse_args()
    if args.dry_run:
        request = dry_run_request()
    else:
        from neuronpedia.requests.feature_request import FeatureRequest

        request = FeatureRequest()  # reads NEURONPEDIA_API_KEY
    answers = upload(args.folder, request)
    sent = getattr(request, "sent", [])
    print(json.dumps({"requests": len(answers), "features": sum(len(body["features"]) for _, _, body in sent) if sent else None}))


if __name__ == "__main__":
    sys.exit(main())
