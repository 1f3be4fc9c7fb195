"""Decode speed of the three decode paths, side by side (`mixcon bench decode`): ms per token at batch 1
after a prompt of T tokens, greedy, for

  ``eager``     the dynamic cache (the default of ``generate`` on CPU), eager forwards;
  ``static``    the static cache (``cache_implementation="static"``), eager forwards;
  ``compiled``  the static cache with the decode step compiled once by ``torch.compile(fullgraph=True)``
                (what ``generate`` does by itself on a GPU, there with ``mode="reduce-overhead"``: CUDA
                graphs); the compile time is reported apart (``compile_s``), not in the per-token time;

beside ``roofline_ms``: the bytes a token must read at that context (`conba_cpu.decode_bytes`: every
weight once, the attention K/V, the Conba states) over the device's measured copy bandwidth, the time
memory bandwidth allows. Models: the shipped ``tiny`` config and the 8-layer width-256 2:6 hybrid of
`mixcon bench conba-cpu` (``hybrid``). The three paths' tokens are interleaved, one token of each in
turn from its own cache, so that load changes on a shared machine hit all three alike; medians over
every token of every repeat. The three paths must pick the same tokens (checked).

    mixcon bench decode --threads 1 --out eval/results/decode-cpu
"""

from __future__ import annotations

import argparse
import time

import torch

from .common import copy_bandwidth, header, print_row, save_results

PATHS = ("eager", "static", "compiled")
COLS = ["model", "T", "tokens", "eager_ms", "static_ms", "compiled_ms", "roofline_ms", "compiled_speedup",
        "compile_s"]


def bench_models(names):
    from ..resources import load_config
    from .conba_cpu import model_configs

    out = {}
    for name in names:
        if name == "hybrid":
            out[name] = model_configs(max_ctx=8192)["hybrid"]
        else:
            out[name] = load_config(name)
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_rows(model_name, config, Ts, tokens, reps, device, backend, bandwidth):
    """One row per context T: median ms per token of each path, the roofline, the compile seconds."""
    from ..models.cache import MixConCache
    from ..models.compat import cache_kwargs, output_cache
    from ..models.modeling_mixcon import MixConForCausalLM
    from .conba_cpu import decode_bytes

    torch.manual_seed(0)
    model = MixConForCausalLM(config).eval().to(device)
    mode = "reduce-overhead" if device.type == "cuda" else None
    rows = []
    for T in Ts:
        ids = torch.randint(3, config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T)).to(device)
        M = T + tokens + 1
        torch._dynamo.reset()  # one compile per (model, context): the static cache's shapes are the context's
        step = torch.compile(model.forward, fullgraph=True, dynamic=False, backend=backend, mode=mode)
        times = {p: [] for p in PATHS}
        compile_s = None
        for _ in range(reps):
            state = {}
            with torch.no_grad():
                for p in PATHS:  # prefills (eager), each into its own cache
                    cache = None if p == "eager" else MixConCache(config, max_cache_len=M, batch_size=1,
                                                                 device=device)
                    o = model(ids, use_cache=True, logits_to_keep=1, **({} if cache is None else cache_kwargs(cache)))
                    state[p] = (output_cache(o), o.logits[:, -1:].argmax(-1))
                if compile_s is None:  # compiled on the first decode token, outside the timings
                    cache, nxt = state["compiled"]
                    c_ref = MixConCache(config, max_cache_len=M, batch_size=1, device=device)
                    model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(c_ref))
                    t0 = time.perf_counter()
                    step(nxt, use_cache=True, **cache_kwargs(c_ref))
                    _sync(device)
                    compile_s = time.perf_counter() - t0
                    del c_ref
                for _ in range(tokens):
                    picked = {}
                    for p in PATHS:
                        cache, nxt = state[p]
                        fn = step if p == "compiled" else model
                        if p == "compiled" and device.type == "cuda":
                            torch.compiler.cudagraph_mark_step_begin()
                        _sync(device)
                        t0 = time.perf_counter()
                        o = fn(nxt, use_cache=True, **cache_kwargs(cache))
                        _sync(device)
                        times[p].append(time.perf_counter() - t0)
                        picked[p] = o.logits[:, -1:].argmax(-1).clone()
                        state[p] = (cache, picked[p])
                    if not (torch.equal(picked["eager"], picked["static"])
                            and torch.equal(picked["eager"], picked["compiled"])):
                        raise RuntimeError(f"{model_name} at T={T}: the decode paths picked different tokens "
                                           f"{ {p: t.item() for p, t in picked.items()} }")
            del state
        med = lambda v: sorted(v)[len(v) // 2] * 1e3  # noqa: E731
        row = dict(model=model_name, T=T, tokens=tokens * reps, **{f"{p}_ms": med(times[p]) for p in PATHS})
        row["roofline_ms"] = decode_bytes(model, T) / bandwidth * 1e3
        row["compiled_speedup"] = row["eager_ms"] / row["compiled_ms"]
        row["compile_s"] = compile_s
        rows.append(row)
        print_row(row, COLS)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "hybrid"],
                    help="shipped config names, or 'hybrid' (the 8-layer width-256 2:6 hybrid)")
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 8192], help="prompt lengths (context)")
    ap.add_argument("--tokens", type=int, default=16, help="decode tokens per repeat")
    ap.add_argument("--reps", type=int, default=2, help="repeats (each a fresh prefill of every path)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled path")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. the machine's load)")
    ap.add_argument("--out", default=None, help="folder for results.csv / results.json")
    args = ap.parse_args(argv)
    for name, v in (("--tokens", args.tokens), ("--reps", args.reps), ("--threads", args.threads)):
        if v < 1:
            ap.error(f"{name}={v}: must be at least 1")
    if any(t < 1 for t in args.T):
        ap.error(f"--T {args.T}: every prompt length must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here; use --device cpu")
    torch.set_num_threads(args.threads)
    try:
        configs = bench_models(args.models)
    except (ValueError, FileNotFoundError) as exc:
        ap.error(f"--models: {exc}")
    from ..ops.conba import cpu

    compiled_kernels = cpu.kernels() is not None if device.type == "cpu" else None  # built before any timing
    bandwidth = copy_bandwidth(device)
    meta = header(device, dtype="float32", batch=1, threads=torch.get_num_threads(), backend=args.backend,
                  compiled_kernels=compiled_kernels, copy_GBps=round(bandwidth / 1e9, 2), note=args.note)
    print(meta, flush=True)
    print("\t".join(COLS), flush=True)
    rows = []
    for name, cfg in configs.items():
        rows += decode_rows(name, cfg, args.T, args.tokens, args.reps, device, args.backend, bandwidth)
    if args.out:
        save_results(args.out, rows, COLS, meta)
    return rows


if __name__ == "__main__":
    main()
