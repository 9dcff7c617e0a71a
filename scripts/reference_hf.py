#!/usr/bin/env python3
"""Reference outputs from Hugging Face transformers for the same GGUF model, in f32.

The Rust reference tests (capture/tests/reference.rs) run this once and compare against it.

Texts are tokenized with add_special_tokens=False: transformers' GGUF path prepends BOS even
though SmolLM2's GGUF says tokenizer.ggml.add_bos_token = false, and we follow the file.

Input (--requests JSON):
  {"logits": [prompt, ...], "tokenize": [text, ...],
   "generate": [{"prompt": text, "max_new_tokens": n}, ...]}
Output (--out DIR):
  reference.json: token ids of every "tokenize" text and "logits" prompt, and for every
                  "generate" request the greedy tokens with each step's top-2 logit margin;
  logits.safetensors: "logits.{i}" = [seq, vocab] f32 logits of "logits" prompt i.
With --export-hf DIR it also saves the loaded model and tokenizer as a Hugging Face folder
(config.json, model.safetensors, tokenizer.json) for testing our safetensors loader.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="path to the .gguf file")
    ap.add_argument("--requests", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--export-hf", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    directory, name = os.path.split(os.path.abspath(args.gguf))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, torch_dtype=torch.float32)
    model.eval()
    with open(args.requests) as f:
        requests = json.load(f)

    result = {"tokenize": [], "logits": [], "generate": []}
    for text in requests.get("tokenize", []):
        result["tokenize"].append(tokenizer(text, add_special_tokens=False)["input_ids"])

    tensors = {}
    with torch.no_grad():
        for i, prompt in enumerate(requests.get("logits", [])):
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            result["logits"].append(ids[0].tolist())
            tensors[f"logits.{i}"] = model(ids).logits[0].float().contiguous()
        for req in requests.get("generate", []):
            ids = tokenizer(req["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = model.generate(
                ids, do_sample=False, max_new_tokens=req["max_new_tokens"], output_logits=True,
                return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id,
            )
            new = out.sequences[0, ids.shape[1]:].tolist()
            margins = []
            for step in out.logits:
                top2 = torch.topk(step[0].float(), 2).values
                margins.append(float(top2[0] - top2[1]))
            result["generate"].append({"prompt_ids": ids[0].tolist(), "tokens": new, "margins": margins,
                                       "text": tokenizer.decode(new)})

    os.makedirs(args.out, exist_ok=True)
    save_file(tensors, os.path.join(args.out, "logits.safetensors"))
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(result, f)
    if args.export_hf:
        # Sharded, so that the loader's model.safetensors.index.json path is exercised.
        model.save_pretrained(args.export_hf, safe_serialization=True, max_shard_size="300MB")
        tokenizer.save_pretrained(args.export_hf)


if __name__ == "__main__":
    main()
