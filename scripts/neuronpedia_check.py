#!/usr/bin/env python3
"""Check a `sae features export --format neuronpedia` folder against SAEDashboard's own code.

  python3 scripts/neuronpedia_check.py DIR

The layout comes from PyPI sae-dashboard 0.8.0 (installed with --no-deps: these modules need
only numpy), not from a copy of it:
  - file names: the f-strings `batch-{feature_batch_count}.json`, `skipped_indexes.json` and
    RUN_SETTINGS_FILE in sae_dashboard/neuronpedia/neuronpedia_runner.py (read as text: that
    module imports sae_lens, wandb and transformer_lens);
  - batch files: each is loaded with `NeuronpediaDashboardBatch(**json)`, which takes exactly the
    runner's field names (an unknown key is a TypeError) and builds the nested Feature and
    Activation objects; its `to_dict()` must give back the file's object exactly (so no field is
    missing and the nesting is the runner's); every value must have the type its constructor
    annotates (an int is accepted where float is annotated, as Python's numeric tower does and
    as the runner itself writes histogram counts);
  - skipped_indexes.json: the keys of the dict that `record_skipped_features` dumps (parsed with ast);
  - run_settings.json: `NeuronpediaRunnerConfig(**json)` must accept it.
Then scripts/neuronpedia_upload.py turns every feature into neuronpedia 1.2.1's client objects
(Feature, Logit, Activation, whose constructor checks quantileFraction) and passes them to the
client's own `FeatureRequest.upload_batch`, with the network call replaced by a recorder: those
are the requests an upload would send.

The JSON must parse strictly (no NaN or Infinity). The last stdout line is one JSON object with
counts; the exit code is 1 with a message on stderr when a check fails.
"""
import ast
import importlib.util
import inspect
import json
import os
import re
import sys
import typing

from sae_dashboard.neuronpedia.neuronpedia_dashboard import (
    NeuronpediaDashboardActivation,
    NeuronpediaDashboardBatch,
    NeuronpediaDashboardFeature,
)
from sae_dashboard.neuronpedia.neuronpedia_runner_config import NeuronpediaRunnerConfig


def fail(msg: str) -> None:
    print(f"neuronpedia_check: {msg}", file=sys.stderr)
    sys.exit(1)


def strict_load(path: str):
    def no_constant(name):
        fail(f"{path}: {name} is not JSON")

    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"), parse_constant=no_constant)


def runner_source() -> str:
    spec = importlib.util.find_spec("sae_dashboard")
    folder = list(spec.submodule_search_locations)[0]
    with open(os.path.join(folder, "neuronpedia", "neuronpedia_runner.py"), encoding="utf-8") as f:
        return f.read()


def skipped_keys(source: str) -> set:
    """The keys of the dict literal that `record_skipped_features` passes to json.dumps."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "record_skipped_features":
            for inner in ast.walk(node):
                if isinstance(inner, ast.Dict):
                    return {k.value for k in inner.keys}
    fail("record_skipped_features not found in the runner")


def is_type(value, annotation) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any:
        return True
    if origin is typing.Union:
        return any(is_type(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(is_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(is_type(k, args[0]) and is_type(v, args[1]) for k, v in value.items())
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def check_types(obj: dict, cls, where: str) -> None:
    hints = typing.get_type_hints(cls.__init__)
    params = inspect.signature(cls.__init__).parameters
    for key, value in obj.items():
        if key not in params:
            fail(f"{where}: `{key}` is not a field of {cls.__name__}")
        if not is_type(value, hints[key]):
            fail(f"{where}: `{key}` = {value!r:.80} is not {hints[key]}")


def check_batch(path: str, data: dict) -> list:
    try:
        batch = NeuronpediaDashboardBatch(**data)
    except TypeError as e:
        fail(f"{path}: NeuronpediaDashboardBatch does not take it: {e}")
    if batch.to_dict() != data:
        fail(f"{path}: NeuronpediaDashboardBatch(**file).to_dict() differs from the file")
    check_types({k: v for k, v in data.items() if k != "features"}, NeuronpediaDashboardBatch, path)
    for i, feature in enumerate(data["features"]):
        where = f"{path} feature {i}"
        check_types({k: v for k, v in feature.items() if k != "activations"}, NeuronpediaDashboardFeature, where)
        for j, act in enumerate(feature["activations"]):
            check_types(act, NeuronpediaDashboardActivation, f"{where} activation {j}")
            if len(act["tokens"]) != len(act["values"]):
                fail(f"{where} activation {j}: {len(act['tokens'])} tokens but {len(act['values'])} values")
            if not 0 <= act["qualifying_token_index"] < len(act["tokens"]):
                fail(f"{where} activation {j}: qualifying_token_index outside the tokens")
    return batch.features


def upload_payloads(folder: str) -> list:
    """The requests neuronpedia's own upload code would send for this folder
    (scripts/neuronpedia_upload.py with the network call replaced by a recorder)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from neuronpedia_upload import dry_run_request, upload

    request = dry_run_request()
    upload(folder, request)
    return request.sent


def main() -> None:
    if len(sys.argv) != 2:
        fail("usage: neuronpedia_check.py DIR")
    folder = sys.argv[1]
    source = runner_source()
    for pattern in ('batch-{feature_batch_count}.json', 'skipped_indexes.json', 'RUN_SETTINGS_FILE = "run_settings.json"'):
        if pattern not in source:
            fail(f"the runner no longer writes `{pattern}`; the layout this check knows is out of date")
    names = sorted(os.listdir(folder))
    batches = sorted((n for n in names if re.fullmatch(r"batch-\d+\.json", n)), key=lambda n: int(n[6:-5]))
    if [int(n[6:-5]) for n in batches] != list(range(len(batches))):
        fail(f"batch files are not numbered 0..{len(batches) - 1}: {batches}")
    features, model_id, layer, sae_set = [], None, None, None
    for name in batches:
        data = strict_load(os.path.join(folder, name))
        features += check_batch(name, data)
        model_id, layer, sae_set = data["model_id"], data["layer"], data["sae_set"]
    skipped = strict_load(os.path.join(folder, "skipped_indexes.json"))
    if set(skipped) != skipped_keys(source):
        fail(f"skipped_indexes.json has keys {sorted(skipped)}, the runner writes {sorted(skipped_keys(source))}")
    settings = strict_load(os.path.join(folder, "run_settings.json"))
    try:
        NeuronpediaRunnerConfig(**settings)
    except TypeError as e:
        fail(f"run_settings.json: NeuronpediaRunnerConfig does not take it: {e}")
    sent = upload_payloads(folder)
    uploaded = sum(len(body["features"]) for _, _, body in sent)
    print(json.dumps({
        "ok": True, "batches": len(batches), "features": len(features), "skipped": len(skipped["skipped_indexes"]),
        "activations": sum(len(f.activations) for f in features), "upload_requests": len(sent),
        "uploaded_features": uploaded, "model_id": model_id, "source": f"{layer}-{sae_set}",
    }))


if __name__ == "__main__":
    main()
