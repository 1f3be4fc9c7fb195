"""The longest context that fits on the GPU at batch 1, for mixcon and the same-size comparison
models of `mixcon bench throughput`, as a table:

  - predicted: (free memory − weights − prefill workspace) ÷ cache bytes per token, where the
    workspace is measured at a short context and the Conba state (constant) is subtracted first;
  - measured (by allocation): the longest context whose cache can be held while the model still
    runs at its end: a real prefill of ``--tail`` tokens, every attention layer's K/V then grown to
    the context with random values (no quadratic prefill of millions of tokens), a further
    ``--tail``-token prefill chunk and one decode step through the model. Doubling, then bisection
    to ``--resolution`` tokens, capped at ``--cap`` (reported as "≥ cap").

    mixcon bench max-context --out eval/results/max_context          # GPU
    mixcon bench max-context --smoke                                  # CPU: predicted only
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from mixcon.bench.throughput import MODELS, build, measure, new_cache, variants  # noqa: E402

from mixcon.bench.common import header, parse_run_args, portable_path  # noqa: E402
from mixcon.models.configuration_mixcon import cache_nbytes  # noqa: E402
from mixcon.models.compat import cache_kwargs, output_cache


def per_token_and_fixed(name, cfgs, dtype):
    cfg = cfgs["mixtral-shaped" if name == "hf-mixtral" else name]
    one, two = cache_nbytes(cfg, 1, dtype=dtype)["total"], cache_nbytes(cfg, 2, dtype=dtype)["total"]
    return two - one, one - (two - one)  # bytes per token, constant bytes (Conba states)


@torch.no_grad()
def run_at_context(name, model, ctx, tail, device):
    """Hold a batch-1 cache of ``ctx`` tokens and run the model at its end (see the module doc).
    Returns the cache (``ctx + 1`` tokens) and the last logits."""
    if ctx < 2 * tail:
        raise ValueError(f"context {ctx} must be at least twice the tail ({tail})")
    vocab = model.config.vocab_size
    cache = new_cache(name, model)
    out = model(torch.randint(3, vocab, (1, tail), device=device), **cache_kwargs(cache), use_cache=True,
                logits_to_keep=1)
    cache = output_cache(out)
    grown = ctx - tail
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        for attr in ("keys", "values"):
            old = getattr(layer, attr)
            new = torch.empty(*old.shape[:-2], grown, old.shape[-1], device=old.device, dtype=old.dtype)
            new[..., :tail, :] = old
            new[..., tail:, :].normal_()
            setattr(layer, attr, new)
            del old
    if hasattr(cache, "_seen_tokens"):  # MixConCache counts tokens itself (Conba layers hold no K/V)
        if any(p is not None for p in getattr(cache, "key_positions", [])):
            raise ValueError("max_context does not grow Mixture-of-Depths caches")
        cache._seen_tokens = grown
    out = model(torch.randint(3, vocab, (1, tail), device=device), **cache_kwargs(cache), use_cache=True,
                logits_to_keep=1)
    out = model(out.logits[:, -1].argmax(-1, keepdim=True), **cache_kwargs(output_cache(out)), use_cache=True)
    return output_cache(out), out.logits


def fits(name, model, ctx, tail, device) -> bool:
    try:
        run_at_context(name, model, ctx, tail, device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def search(fits_fn, start, resolution, cap) -> tuple[int, bool]:
    """(longest context ``fits_fn`` accepts, to within ``resolution``; whether the cap was reached).
    Doubling from ``start``, then bisection."""
    lo, hi = 0, None
    ctx = start
    while ctx <= cap:
        if fits_fn(ctx):
            lo = ctx
            ctx *= 2
        else:
            hi = ctx
            break
    if hi is None:
        return lo, True
    while hi - lo > resolution:
        mid = (lo + hi) // 2 // resolution * resolution
        if mid <= lo:
            break
        if fits_fn(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mixcon-1b", help="a shipped config name or a config.json")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--resolution", type=int, default=8192)
    ap.add_argument("--tail", type=int, default=512, help="tokens of the real prefill chunks at both ends")
    ap.add_argument("--cap", type=int, default=16 * 2**20)
    ap.add_argument("--memory-cap-gib", type=float, default=None,
                    help="hold the process to this much GPU memory (torch.cuda.set_per_process_memory_fraction), "
                         "so a larger card answers for a smaller one: 79.65 = an H100 80GB's 81,559 MiB")
    args, device, dtype = parse_run_args(ap, argv, "tiny sizes on CPU (predicted numbers only)")
    if args.smoke:
        dtype = torch.float32
    elif device.type != "cuda":
        sys.exit("mixcon bench max-context measures a GPU; use --smoke on CPU (predicted numbers only)")
    cfgs = variants(args.config, args.cap, args.smoke)
    meta = header(device, dtype=str(dtype), config=portable_path(args.config), chunk=args.chunk)
    for k, v in meta.items():
        print(f"# {k}: {v}")
    total = torch.cuda.mem_get_info()[1] if device.type == "cuda" else 80 * 2**30
    if args.memory_cap_gib is not None:
        if args.memory_cap_gib <= 0:
            ap.error(f"--memory-cap-gib must be > 0, got {args.memory_cap_gib}")
        cap = int(args.memory_cap_gib * 2**30)
        if device.type == "cuda" and cap < total:
            torch.cuda.set_per_process_memory_fraction(cap / total)
        total = min(total, cap)
        meta["memory_cap_GiB"] = total / 2**30
        print(f"# memory cap: {total / 2**30:.2f} GiB of this device")
    rows = []
    for name in args.models:
        model = build(name, cfgs, device, dtype)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        per_tok, fixed = per_token_and_fixed(name, cfgs, dtype)
        probe = args.chunk if not args.smoke else 64
        if device.type == "cuda":
            torch.cuda.empty_cache()
            measure(name, model, 1, probe, args.chunk, 1, device)
            workspace = torch.cuda.max_memory_allocated() - weights - (fixed + per_tok * (probe + 1))
        else:
            workspace = 0
        free = total - weights - max(workspace, 0) - fixed
        predicted = int(free // per_tok) if per_tok else None
        row = dict(model=name, weights_GiB=weights / 2**30, kv_bytes_per_token=per_tok, state_MiB=fixed / 2**20,
                   workspace_GiB=workspace / 2**30, predicted=predicted)
        if device.type == "cuda":
            measured, capped = search(lambda c: fits(name, model, c, args.tail, device),
                                      max(args.chunk, args.resolution), args.resolution, args.cap)
            row.update(measured=measured, capped=capped)
        rows.append(row)
        print(row, flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines = [f"Longest context at batch 1 on {meta['device']} ({total / 2**30:.0f} GiB), {meta['dtype']}, "
             f"config {meta['config']}", "",
             "| model | weights | KV bytes/token | Conba state | predicted | measured |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        pred = "∞ (no attention)" if r["predicted"] is None else f"{r['predicted']:,}"
        meas = ("≥ " if r.get("capped") else "") + f"{r['measured']:,}" if "measured" in r else "—"
        lines.append(f"| {r['model']} | {r['weights_GiB']:.1f} GiB | {r['kv_bytes_per_token']:,} | "
                     f"{r['state_MiB']:.1f} MiB | {pred} | {meas} |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        open(os.path.join(args.out, "max_context.md"), "w").write("\n".join(lines) + "\n")
        json.dump(dict(meta=meta, rows=rows), open(os.path.join(args.out, "max_context.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
