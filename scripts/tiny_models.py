#!/usr/bin/env python3
"""Tiny randomly initialised models made by transformers, and transformers' outputs on them.

The Rust tests (capture/tests/tiny_models.rs) run this for each model family and compare our
model with transformers' on the same folder: logits, every hook's activations, a batch of packed
windows, greedy generation and token ids. Nothing is downloaded.

--family names a recipe below (a transformers config of a few layers and a small width; fixed
seed; f32). The folder --model-dir is (re)made when missing or made by another recipe:
config.json and model.safetensors from save_pretrained, and tokenizer.json (with
tokenizer_config.json), a byte-level BPE trained here with the `tokenizers` package on a fixed
text (no tokenizer file of these families ships in a PyPI package), with the family's BOS rule.

With --requests REQ.json and --out DIR it also writes, from transformers with eager attention:
  DIR/reference.json: {"hooks": [name, ...], "prompts": [ids, ...], "tokenize": [ids, ...],
                       "batch": [[ids of window], ...],
                       "generate": [{"prompt_ids", "tokens", "margins"}, ...]}
  DIR/tensors.safetensors: "logits.{i}" [seq, vocab] and "{hook}.{i}" for prompt i, and
                       "logits.batch", "{hook}.batch" for the batch; hook tensors are shaped as
                       TransformerLens's (attn.hook_z is [seq, n_heads, head_dim]).
REQ.json: {"prompts": [text, ...], "tokenize": [text, ...], "batch": {"windows": B, "len": T},
           "generate": {"prompts": [text, ...], "max_new_tokens": N}}
"""
import argparse
import fcntl
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

# Bumped whenever a recipe or the tokenizer training changes, so cached folders are remade.
RECIPE_VERSION = 1

COMMON = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, initializer_range=0.1,
)

NEOX_COMMON = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=256, layer_norm_eps=1e-5, initializer_range=0.1, hidden_act="gelu",
)

# family -> (model_type, config overrides, tokenizer BOS rule)
RECIPES = {
    "llama": ("llama", dict(tie_word_embeddings=True), "bos"),
    "llama3": ("llama", dict(
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
    ), "bos"),
    "qwen2": ("qwen2", dict(rope_theta=1000000.0, tie_word_embeddings=True), "none"),
    # A window shorter than the prompts, and a head width other than hidden_size / heads.
    "mistral": ("mistral", dict(sliding_window=6, head_dim=24, tie_word_embeddings=False), "bos"),
    # Soft-capping low enough to bite on random weights, a window shorter than the prompts.
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=2.0,
                              final_logit_softcapping=3.0), "bos"),
    # A family we refuse: the tests check that its folder is not loaded.
    "gemma": ("gemma", dict(head_dim=16), "bos"),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=3, n_head=4, n_positions=256, vocab_size=512), "none"),
    # Pythia's layout: parallel attention and MLP, a quarter of each head rotated, untied.
    "gpt_neox": ("gpt_neox", dict(rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False), "none"),
    "gpt_neox_sequential": ("gpt_neox", dict(rotary_pct=0.5, use_parallel_residual=False, attention_bias=False), "none"),
}

# A fixed text to train the tokenizer on (the Zen of Python, and a few lines in other scripts
# so that multi-byte characters get merges too).
TRAINING_TEXT = """Beautiful is better than ugly. Explicit is better than implicit.
Simple is better than complex. Complex is better than complicated. Flat is better than nested.
Sparse is better than dense. Readability counts. Special cases aren't special enough to break the
rules. Although practicality beats purity. Errors should never pass silently. Unless explicitly
silenced. In the face of ambiguity, refuse the temptation to guess. There should be one-- and
preferably only one --obvious way to do it. Although that way may not be obvious at first unless
you're Dutch. Now is better than never. Although never is often better than *right* now. If the
implementation is hard to explain, it's a bad idea. If the implementation is easy to explain, it
may be a good idea. Namespaces are one honking great idea -- let's do more of those!
The capital of France is Paris. Once upon a time, in a small village, there lived a fox.
def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)
Schöne Grüße aus München! ¿Dónde está la biblioteca? 我爱北京天安门。 0123456789 $12,345.67
"""

BOS, EOS = "<|bos|>", "<|eos|>"


def build_tokenizer(bos_rule):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    if bos_rule == "bos":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   add_bos_token=bos_rule == "bos")


def build_folder(family, model_dir):
    """Makes model_dir for `family` unless it already holds this recipe. Tests run in parallel,
    so the folder is made under a lock and moved into place whole."""
    parent = os.path.dirname(os.path.abspath(model_dir))
    os.makedirs(parent, exist_ok=True)
    with open(os.path.join(parent, f".{family}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build_folder_locked(family, model_dir, parent)


def build_folder_locked(family, model_dir, parent):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides, bos_rule = RECIPES[family]
    stamp = {"family": family, "version": RECIPE_VERSION}
    stamp_path = os.path.join(model_dir, "recipe.json")
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                return
    tokenizer = build_tokenizer(bos_rule)
    fields = {"gpt2": dict(initializer_range=0.1), "gpt_neox": NEOX_COMMON}.get(model_type, COMMON).copy()
    fields.update(overrides)
    fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Norm weights start at exactly 1 (or 0 for Gemma's 1 + w) and biases at 0: perturb them so
    # that a mix-up between them, or a bias left out, shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{family}-")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    with open(os.path.join(staging, "recipe.json"), "w") as f:
        json.dump(stamp, f)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(staging, model_dir)


def hook_modules(model):
    """TransformerLens hook name -> (module, "in" or "out"): the module whose input or output
    is the hook's tensor."""
    if model.config.model_type == "gpt2":
        return gpt2_hook_modules(model.transformer)
    if model.config.model_type == "gemma2":
        return gemma2_hook_modules(model.model)
    if model.config.model_type == "gpt_neox":
        return gpt_neox_hook_modules(model.gpt_neox, model.config.use_parallel_residual)
    base = model.model
    hooks = {"hook_embed": (base.embed_tokens, "out")}
    for i, layer in enumerate(base.layers):
        b = f"blocks.{i}"
        hooks[f"{b}.hook_resid_pre"] = (layer, "in")
        hooks[f"{b}.attn.hook_z"] = (layer.self_attn.o_proj, "in")
        hooks[f"{b}.hook_attn_out"] = (layer.self_attn, "out")
        hooks[f"{b}.hook_resid_mid"] = (layer.post_attention_layernorm, "in")
        hooks[f"{b}.hook_mlp_out"] = (layer.mlp, "out")
        hooks[f"{b}.hook_resid_post"] = (layer, "out")
    hooks["ln_final.hook_normalized"] = (base.norm, "out")
    return hooks


def gpt2_hook_modules(base):
    hooks = {"hook_embed": (base.wte, "out"), "hook_pos_embed": (base.wpe, "out")}
    for i, block in enumerate(base.h):
        b = f"blocks.{i}"
        hooks[f"{b}.hook_resid_pre"] = (block, "in")
        hooks[f"{b}.attn.hook_z"] = (block.attn.c_proj, "in")
        hooks[f"{b}.hook_attn_out"] = (block.attn, "out")
        hooks[f"{b}.hook_resid_mid"] = (block.ln_2, "in")
        hooks[f"{b}.hook_mlp_out"] = (block.mlp, "out")
        hooks[f"{b}.hook_resid_post"] = (block, "out")
    hooks["ln_final.hook_normalized"] = (base.ln_f, "out")
    return hooks


def gemma2_hook_modules(base):
    # The embedding scaled by sqrt(d), as TransformerLens's hook_embed, is layer 0's input; the
    # attention and MLP outputs are taken after their post-norms (what is added to the residual).
    hooks = {"hook_embed": (base.layers[0], "in")}
    for i, layer in enumerate(base.layers):
        b = f"blocks.{i}"
        hooks[f"{b}.hook_resid_pre"] = (layer, "in")
        hooks[f"{b}.attn.hook_z"] = (layer.self_attn.o_proj, "in")
        hooks[f"{b}.hook_attn_out"] = (layer.post_attention_layernorm, "out")
        hooks[f"{b}.hook_resid_mid"] = (layer.pre_feedforward_layernorm, "in")
        hooks[f"{b}.hook_mlp_out"] = (layer.post_feedforward_layernorm, "out")
        hooks[f"{b}.hook_resid_post"] = (layer, "out")
    hooks["ln_final.hook_normalized"] = (base.norm, "out")
    return hooks


def gpt_neox_hook_modules(base, parallel):
    hooks = {"hook_embed": (base.embed_in, "out")}
    for i, layer in enumerate(base.layers):
        b = f"blocks.{i}"
        hooks[f"{b}.hook_resid_pre"] = (layer, "in")
        hooks[f"{b}.attn.hook_z"] = (layer.attention.dense, "in")
        hooks[f"{b}.hook_attn_out"] = (layer.attention, "out")
        if not parallel:  # TransformerLens has no resid_mid when attention and MLP run side by side
            hooks[f"{b}.hook_resid_mid"] = (layer.post_attention_layernorm, "in")
        hooks[f"{b}.hook_mlp_out"] = (layer.mlp, "out")
        hooks[f"{b}.hook_resid_post"] = (layer, "out")
    hooks["ln_final.hook_normalized"] = (base.final_layer_norm, "out")
    return hooks


def run_with_hooks(model, ids):
    """Logits [batch, seq, vocab] and every hook's tensor for `ids` [batch, seq]."""
    captured, handles = {}, []
    n_heads = model.config.num_attention_heads
    for name, (module, side) in hook_modules(model).items():
        def grab(tensor, name=name):
            tensor = tensor[0] if isinstance(tensor, tuple) else tensor
            if name.endswith("attn.hook_z"):
                tensor = tensor.reshape(*tensor.shape[:2], n_heads, -1)
            if name == "hook_pos_embed":  # [1, seq, d], shared by the batch; TransformerLens repeats it
                tensor = tensor.expand(ids.shape[0], -1, -1)
            captured[name] = tensor.detach().clone()
        if side == "in":
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, grab=grab: grab(args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, grab=grab: grab(out)))
    try:
        logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, captured


def references(model_dir, requests, out_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    result = {"hooks": list(hook_modules(model)), "prompts": [], "tokenize": [], "generate": []}
    tensors = {}
    with torch.no_grad():
        for text in requests.get("tokenize", []):
            result["tokenize"].append(tokenizer(text)["input_ids"])
        all_ids = []
        for i, text in enumerate(requests["prompts"]):
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            result["prompts"].append(ids[0].tolist())
            all_ids += ids[0].tolist() + [tokenizer.eos_token_id]
            logits, hooks = run_with_hooks(model, ids)
            tensors[f"logits.{i}"] = logits[0]
            tensors.update({f"{name}.{i}": t[0] for name, t in hooks.items()})
        # Padding-free packed windows: the prompts' ids joined by EOS, cut into equal windows.
        b, t = requests["batch"]["windows"], requests["batch"]["len"]
        while len(all_ids) < b * t:
            all_ids += all_ids
        batch = torch.tensor(all_ids[: b * t]).view(b, t)
        result["batch"] = batch.tolist()
        logits, hooks = run_with_hooks(model, batch)
        tensors["logits.batch"] = logits
        tensors.update({f"{name}.batch": x for name, x in hooks.items()})

        gen = requests["generate"]
        model.generation_config.eos_token_id = None  # run every step, as the Rust side does
        for text in gen["prompts"]:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            out = model.generate(ids, do_sample=False, max_new_tokens=gen["max_new_tokens"], output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id)
            margins = [float(x.topk(2).values[0, 0] - x.topk(2).values[0, 1]) for x in out.logits]
            result["generate"].append({"prompt_ids": ids[0].tolist(),
                                       "tokens": out.sequences[0, ids.shape[1]:].tolist(), "margins": margins})
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "tensors.safetensors"))
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(result, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True, choices=sorted(RECIPES))
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--requests")
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    build_folder(args.family, args.model_dir)
    if args.requests:
        with open(args.requests) as f:
            requests = json.load(f)
        references(args.model_dir, requests, args.out)


if __name__ == "__main__":
    main()
