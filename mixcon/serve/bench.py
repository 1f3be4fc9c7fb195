"""Throughput of MixCon served by vLLM beside this project's `generate`, on the same prompts.

    python -m mixcon.serve.bench --model DIR [--batch 1 8] [--prompt-len 64] [--new-tokens 64]
    python -m mixcon.serve.bench --tiny-random OUT_DIR ...   # exports a random model of the tiny config first

Both decode greedily exactly ``--new-tokens`` tokens per prompt (no end-of-sequence stop) from the same
random token prompts; tokens/s counts generated tokens. `generate` runs left-padded batches with the
dynamic cache, and on CUDA also with the static cache (``cache_implementation="static"``). vLLM runs
one `LLM.generate` call over the batch (eager on CPU; CUDA graphs are not available to this model).
Each figure is the median of ``--reps`` timed runs after one warm-up, in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

# the engine in this process: a separate engine process polls for work and would take CPU from the
# `generate` runs beside it
DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def export_tiny_random(out_dir: str, **overrides) -> str:
    """A random MixCon of configs/tiny.json (head_dim 32: vLLM's CPU attention needs ≥ 32) saved with
    `save_pretrained`."""
    from mixcon import MixConForCausalLM
    from mixcon.resources import load_config

    torch.manual_seed(0)
    MixConForCausalLM(load_config("tiny", **{"head_dim": 32, **overrides})).save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a save_pretrained MixCon directory")
    src.add_argument("--tiny-random", metavar="OUT_DIR", help="export a random tiny MixCon here and use it")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)

    from mixcon import MixConForCausalLM
    from mixcon.bench.common import header

    model_dir = args.model or export_tiny_random(args.tiny_random)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    import vllm

    llm = vllm.LLM(model=model_dir, skip_tokenizer_init=True, dtype=args.dtype, enable_prefix_caching=False,
                   enforce_eager=True, max_model_len=args.prompt_len + args.new_tokens,
                   max_num_seqs=max(args.batch), seed=0)
    hf = MixConForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    cfg = hf.config
    meta = header(device, vllm=vllm.__version__, dtype=args.dtype, threads=torch.get_num_threads(),
                  hidden_size=cfg.hidden_size, layers=cfg.num_hidden_layers, layout="".join(
                      "a" if t == "attention" else "c" for t in cfg.layers_block_type),
                  params=sum(p.numel() for p in hf.parameters()), prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens)
    print(json.dumps(meta))
    g = torch.Generator().manual_seed(0)
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    print(f"{'batch':>5} {'engine':<24} {'tokens/s':>10} {'vs generate':>12}")
    for b in args.batch:
        prompts = torch.randint(3, cfg.vocab_size, (b, args.prompt_len), generator=g)
        reqs = [{"prompt_token_ids": p} for p in prompts.tolist()]
        ids = prompts.to(device)
        gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                   pad_token_id=cfg.pad_token_id)
        rows = [("generate (dynamic cache)", lambda: hf.generate(input_ids=ids, **gen))]
        if device.type == "cuda":
            rows.append(("generate (static cache)",
                         lambda: hf.generate(input_ids=ids, cache_implementation="static", **gen)))
        rows.append(("vLLM LLM.generate", lambda: llm.generate(reqs, sp, use_tqdm=False)))
        base = None
        for name, fn in rows:
            with torch.no_grad():
                tps = b * args.new_tokens / _median_time(fn, args.reps)
            base = base or tps
            print(f"{b:>5} {name:<24} {tps:>10.1f} {tps / base:>11.2f}x")


if __name__ == "__main__":
    main()
