"""Long-context throughput: prefill and decode tokens/s, peak memory and cache bytes as functions of
context length (1K → 256K, doubling) and batch size, for a mixcon config (random weights) and, in
the same run, for same-size comparison models:

  - ``mixcon``        the config given (default: configs/mixcon-1b.json),
  - ``jamba-shaped``  the same sizes with Jamba's layout (1:7 attention:Conba, mechanisms off),
  - ``mixtral-shaped`` the same sizes with every mixer attention and MoE in every layer (mixcon code),
  - ``hf-mixtral``    transformers' own MixtralForCausalLM at the mixtral-shaped sizes.

Prefill is chunked (``--chunk`` tokens at a time through the cache) so long contexts fit; decode
runs ``--decode-tokens`` greedy steps after it. Beside each decode number: the roofline
(bytes read per step — active weights + cache — ÷ copy bandwidth measured in this run) and the
percentage of it reached. A model that runs out of memory at some context is marked OOM there and
not tried longer.

Two decode paths (``--paths``), both by default, in the same run:

  - ``dynamic``   the growing cache, one eager forward per token (every kernel launched from Python);
  - ``compiled``  each model's fast path: a static cache sized for the point (context + decode tokens)
    and the decode step compiled with ``torch.compile(mode=--compile-mode)``, which on a GPU captures it
    in a CUDA graph ("reduce-overhead"): mixcon models with a static `MixConCache` and
    ``fullgraph=True`` (the Conba Triton step enters the graph as the ``mixcon::conba_step`` op);
    ``hf-mixtral`` with transformers' own ``StaticCache`` and its default compile settings
    (``fullgraph=False``, as generate's CompileConfig). The prefill runs eagerly (chunked) in both;
    the compile and graph capture happen in ``--warmup`` untimed steps (their time is reported as
    ``compile_s``). Every point compiles afresh (its cache has its own shape).

``--profile`` adds, for the shortest context of each (model, path, batch), a torch.profiler table of
the decode steps (time per kernel, kernel launches per token) under ``<out>/profiles/``.

    mixcon bench throughput --out eval/results/throughput                 # GPU
    mixcon bench throughput --smoke                                       # CPU, tiny sizes

Writes results.csv, results.json and throughput.png (tokens/s vs context, one line per model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from mixcon import MixConCache, MixConConfig, MixConForCausalLM  # noqa: E402
from mixcon.bench.common import copy_bandwidth, header, parse_run_args, portable_path, save_results  # noqa: E402
from mixcon.models.sizes import active_parameters  # noqa: E402
from mixcon.models.compat import cache_kwargs, output_cache

MODELS = ("mixcon", "jamba-shaped", "mixtral-shaped", "hf-mixtral")
PATHS = ("dynamic", "compiled")


def load_config(path, **over) -> MixConConfig:
    from mixcon.resources import load_config as load

    return load(path, **over)


def variants(path, max_ctx, smoke=False) -> dict:
    """The comparison configs at the sizes of the one given."""
    over = dict(max_position_embeddings=max(max_ctx * 2, 4096))
    if smoke:
        over.update(hidden_size=64, intermediate_size=128, n_blocks=1, layers_per_block=8, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512, num_experts=4, experts_per_token=2)
    base = load_config(path, **over)
    L = base.layers_per_block
    off = dict(delay=0, state_scaling=False, control=False, selection="linear", ssm_norm=True)
    return {
        "mixcon": base,
        "jamba-shaped": load_config(path, **over, attn_ratio=f"1:{L - 1}", moe_every=2, moe_offset=1, **off),
        "mixtral-shaped": load_config(path, **over, attn_ratio=f"{L}:0", moe_every=1, moe_offset=0),
    }


def hf_mixtral(cfg: MixConConfig):
    from transformers import MixtralConfig, MixtralForCausalLM

    mc = MixtralConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=len(cfg.layers_block_type),
                       num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                       head_dim=cfg.head_dim, num_local_experts=cfg.num_experts,
                       num_experts_per_tok=cfg.experts_per_token, max_position_embeddings=cfg.max_position_embeddings,
                       tie_word_embeddings=cfg.tie_word_embeddings)
    return MixtralForCausalLM(mc)


def build(name, cfgs, device, dtype):
    with torch.device(device):
        model = hf_mixtral(cfgs["mixtral-shaped"]) if name == "hf-mixtral" else MixConForCausalLM(cfgs[name])
    return model.to(dtype).eval()


def new_cache(name, model):
    if name == "hf-mixtral":
        from transformers import DynamicCache

        return DynamicCache()
    return MixConCache(model.config)


def static_cache(name, model, batch, max_len, device):
    """Each model's own static cache, sized for the point."""
    if name == "hf-mixtral":
        from transformers import StaticCache

        return StaticCache(config=model.config, max_cache_len=max_len)
    return MixConCache(model.config, max_cache_len=max_len, batch_size=batch, device=device)


def cache_bytes(cache) -> int:
    """Bytes a decode step reads from the cache: a MixCon cache's states and K/V, a transformers
    cache's K/V (a static cache's every slot: the mask hides the unused ones, SDPA still reads them)."""
    if isinstance(cache, MixConCache):
        return cache.nbytes()
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


def compile_step(name, model, mode, backend):
    """The decode step each model is best served by (see the module docstring)."""
    torch._dynamo.reset()
    kw = dict(backend=backend) if backend != "inductor" else dict(mode=mode)
    return torch.compile(model.forward, fullgraph=name != "hf-mixtral", **kw)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _to_static(dynamic, static):
    """Copy a prefilled transformers DynamicCache into a StaticCache (its update writes the slots
    0 … n − 1 and advances its counter), so both paths share the same eager prefill."""
    for i, layer in enumerate(dynamic.layers):
        static.update(layer.keys, layer.values, i)
    return static


def _profile(step, nxt, n, path, device):
    """Run n decode steps under torch.profiler and write the kernel table to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            nxt = step(nxt)
        sync(device)
    events = prof.key_averages()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernels = sum(e.count for e in events if getattr(e, "device_type", None) is not None
                  and "CUDA" in str(e.device_type))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(f"# {n} decode steps; device kernels launched: {kernels} ({kernels / n:.1f} per token)\n")
        f.write(events.table(sort_by=sort, row_limit=30))
    os.replace(path + ".tmp", path)


@torch.no_grad()
def measure(name, model, batch, context, chunk, decode_tokens, device, path="dynamic", compile_mode="reduce-overhead",
            backend="inductor", warmup=3, profile_to=None):
    """(prefill tok/s, decode tok/s, peak bytes, cache bytes read per step, compile seconds) after
    prefilling ``context`` tokens, decoding with ``path`` ("dynamic" or "compiled")."""
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, context), device=device)
    compiled = path == "compiled"
    max_len = context + warmup + decode_tokens * (2 if profile_to else 1) + 1
    if compiled and name != "hf-mixtral":
        cache = static_cache(name, model, batch, max_len, device)  # its prefill attends over the slots in use
    else:
        cache = new_cache(name, model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    out = None
    for s in range(0, context, chunk):
        out = model(ids[:, s:s + chunk], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
    if compiled and name == "hf-mixtral":
        cache = _to_static(cache, static_cache(name, model, batch, max_len, device))
    sync(device)
    t_prefill = time.perf_counter() - t0
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    fwd = compile_step(name, model, compile_mode, backend) if compiled else model

    def step(tok):
        if compiled and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        o = fwd(input_ids=tok, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        return o.logits[:, -1].argmax(-1, keepdim=True)

    t_compile = 0.0
    if compiled:  # compile + graph capture, untimed
        t0 = time.perf_counter()
        for _ in range(warmup):
            nxt = step(nxt)
        sync(device)
        t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        nxt = step(nxt)
    sync(device)
    t_decode = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    if profile_to is not None:
        _profile(step, nxt, decode_tokens, profile_to, device)
    return batch * context / t_prefill, batch * decode_tokens / t_decode, peak, cache_bytes(cache), t_compile


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mixcon-1b", help="a shipped config name or a config.json")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024 * 2 ** i for i in range(9)])  # 1K..256K
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--chunk", type=int, default=8192, help="prefill chunk (tokens)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds per model; its points not started by then are recorded as skipped "
                         "(results are saved after every point)")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS,
                    help="decode paths: dynamic (eager, growing cache), compiled (static cache + torch.compile)")
    ap.add_argument("--compile-mode", default="reduce-overhead",
                    help="torch.compile mode of the compiled path (reduce-overhead = CUDA graphs)")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend (default: inductor on a GPU, eager with --smoke)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed compiled steps (compile, graph capture)")
    ap.add_argument("--profile", action="store_true",
                    help="profile the decode of the shortest context of each (model, path, batch)")
    args, device, dtype = parse_run_args(ap, argv, "tiny sizes on CPU")
    if args.smoke:
        args.contexts, args.batch, args.chunk, args.decode_tokens, dtype = [64, 128], [1, 2], 48, 4, torch.float32
        args.warmup = min(args.warmup, 2)
    elif device.type != "cuda":
        sys.exit("mixcon bench throughput measures a GPU; use --smoke on CPU")
    backend = args.compile_backend or ("inductor" if device.type == "cuda" else "eager")
    cfgs = variants(args.config, max(args.contexts), args.smoke)
    meta = header(device, dtype=str(dtype), config=portable_path(args.config), chunk=args.chunk,
                  decode_tokens=args.decode_tokens, paths=args.paths, compile_mode=args.compile_mode,
                  compile_backend=backend, warmup=args.warmup)
    for k, v in meta.items():
        print(f"# {k}: {v}")
    bw = copy_bandwidth(device)
    print(f"# copy bandwidth {bw / 1e9:.0f} GB/s")
    esize = torch.finfo(dtype).bits // 8
    rows = []
    points = [(m, p, b, c) for m in args.models for p in args.paths for b in args.batch for c in args.contexts]
    if args.smoke:  # the compiled path once per model (each point compiles afresh): keeps the smoke run short
        points = [(m, p, b, c) for m, p, b, c in points
                  if p != "compiled" or (b == min(args.batch) and c == min(args.contexts))]
    oom = set()
    model, current = None, None
    cols = ["model", "path", "batch", "context", "status", "prefill_tok_s", "decode_tok_s", "decode_roofline_tok_s",
            "roofline_pct", "compile_s", "peak_GiB", "cache_MiB"]
    start = {}
    for name, path, b, ctx in tqdm(points, desc="throughput", unit="point"):
        key = dict(model=name, path=path, batch=b, context=ctx)
        start.setdefault((name, path), time.perf_counter())
        if args.time_budget is not None and time.perf_counter() - start[(name, path)] > args.time_budget:
            rows.append(dict(key, status="skipped (time budget)"))
            continue
        if args.out and rows:
            save_results(args.out, rows, cols, meta, copy_GBps=bw / 1e9)
        if (name, path, b) in oom:
            rows.append(dict(key, status="OOM"))
            continue
        if current != name:
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model = build(name, cfgs, device, dtype)
            current = name
            active = active_parameters(cfgs["mixtral-shaped" if name == "hf-mixtral" else name])
        prof = None
        if args.profile and args.out and ctx == min(args.contexts):
            prof = os.path.join(args.out, "profiles", f"{name}_{path}_b{b}_ctx{ctx}.txt")
        try:
            pre, dec, peak, cb, t_comp = measure(name, model, b, ctx, args.chunk, args.decode_tokens, device, path,
                                                 args.compile_mode, backend, args.warmup, prof)
        except torch.OutOfMemoryError:
            oom.add((name, path, b))
            rows.append(dict(key, status="OOM"))
            continue
        except Exception as e:  # a compile failure is a result too: recorded, the other points go on
            if path != "compiled":
                raise
            rows.append(dict(key, status=f"failed: {type(e).__name__}: {str(e)[:200]}"))
            tqdm.write(f"{name} {path} b={b} ctx={ctx}: {type(e).__name__}: {e}")
            continue
        roof = b / ((active * esize + cb) / (bw / 2))  # tokens/s if each step only read weights + cache
        rows.append(dict(key, status="ok", prefill_tok_s=pre, decode_tok_s=dec, decode_roofline_tok_s=roof,
                         roofline_pct=100 * dec / roof, compile_s=t_comp,
                         peak_GiB=peak / 2**30 if peak else None, cache_MiB=cb / 2**20))
        tqdm.write(f"{name:15s} {path:8s} b={b:<3d} ctx={ctx:<7d} prefill {pre:10.0f} tok/s  decode {dec:8.1f} tok/s "
                   f"(roofline {roof:8.1f}, {100 * dec / roof:5.1f}%)  cache {cb / 2**20:9.1f} MiB"
                   + (f"  peak {peak / 2**30:6.2f} GiB" if peak else "") + (f"  compile {t_comp:.0f}s" if t_comp else ""))
    if args.out:
        save_results(args.out, rows, cols, meta, copy_GBps=bw / 1e9)
        plot(rows, os.path.join(args.out, "throughput.png"), meta)
        print(f"# wrote {args.out}")
    return rows


def plot(rows, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(5 * len(batches), 7), squeeze=False)
    for j, b in enumerate(batches):
        for i, key in enumerate(("prefill_tok_s", "decode_tok_s")):
            ax = axes[i][j]
            for name, dpath in dict.fromkeys((r["model"], r.get("path", "dynamic")) for r in rows):
                pts = [(r["context"], r[key]) for r in rows if r["model"] == name and r["batch"] == b
                       and r.get("path", "dynamic") == dpath and r["status"] == "ok"]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ls="-" if dpath == "compiled" else "--",
                            label=f"{name} ({dpath})")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(key.replace("_tok_s", " tokens/s"))
            ax.set_title(f"batch {b}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{meta['config']} on {meta['device']} ({meta['dtype']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
