"""Long-context throughput: prefill and decode tokens/s, peak memory and cache bytes as functions of
context length (1K → 256K, doubling) and batch size, for a mixcon config (random weights) and, in
the same run, for same-size comparison models:

  - ``mixcon``        the config given (default: configs/mixcon-1b.json),
  - ``jamba-shaped``  the same sizes with Jamba's layout (1:7 attention:Conba, mechanisms off),
  - ``mixtral-shaped`` the same sizes with every mixer attention and MoE in every layer (mixcon code),
  - ``hf-mixtral``    transformers' own MixtralForCausalLM at the mixtral-shaped sizes.

Prefill is chunked (``--chunk`` tokens at a time through the cache) so long contexts fit; decode
runs ``--decode-tokens`` greedy steps after it. Beside each decode number: the roofline
(bytes read per step — active weights + cache — ÷ copy bandwidth measured in this run).
A model that runs out of memory at some context is marked OOM there and not tried longer.

    python eval/throughput.py --out eval/results/throughput                 # GPU
    python eval/throughput.py --smoke                                       # CPU, tiny sizes

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

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from mixcon import MixConCache, MixConConfig, MixConForCausalLM  # noqa: E402
from mixcon.benchmark import copy_bandwidth, header, parse_run_args, save_results  # noqa: E402
from mixcon.models.sizes import active_parameters  # noqa: E402

MODELS = ("mixcon", "jamba-shaped", "mixtral-shaped", "hf-mixtral")


def load_config(path, **over) -> MixConConfig:
    kw = json.load(open(path))
    kw.pop("model_type", None)
    kw.update(over)
    return MixConConfig(**kw)


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


def cache_bytes(cache) -> int:
    if isinstance(cache, MixConCache):
        return cache.nbytes()
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure(name, model, batch, context, chunk, decode_tokens, device):
    """(prefill tok/s, decode tok/s, peak bytes, cache bytes) after prefilling ``context`` tokens."""
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, context), device=device)
    cache = new_cache(name, model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    out = None
    for s in range(0, context, chunk):
        out = model(ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
    sync(device)
    t_prefill = time.perf_counter() - t0
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    t_decode = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return batch * context / t_prefill, batch * decode_tokens / t_decode, peak, cache_bytes(cache)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "mixcon-1b.json"))
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024 * 2 ** i for i in range(9)])  # 1K..256K
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--chunk", type=int, default=8192, help="prefill chunk (tokens)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds per model; its points not started by then are recorded as skipped "
                         "(results are saved after every point)")
    args, device, dtype = parse_run_args(ap, argv, "tiny sizes on CPU")
    if args.smoke:
        args.contexts, args.batch, args.chunk, args.decode_tokens, dtype = [64, 128], [1, 2], 48, 4, torch.float32
    elif device.type != "cuda":
        sys.exit("throughput.py measures a GPU; use --smoke on CPU")
    cfgs = variants(args.config, max(args.contexts), args.smoke)
    meta = header(device, dtype=str(dtype), config=os.path.relpath(args.config, ROOT), chunk=args.chunk,
                  decode_tokens=args.decode_tokens)
    for k, v in meta.items():
        print(f"# {k}: {v}")
    bw = copy_bandwidth(device)
    print(f"# copy bandwidth {bw / 1e9:.0f} GB/s")
    esize = torch.finfo(dtype).bits // 8
    rows = []
    points = [(m, b, c) for m in args.models for b in args.batch for c in args.contexts]
    oom = set()
    model, current = None, None
    cols = ["model", "batch", "context", "status", "prefill_tok_s", "decode_tok_s", "decode_roofline_tok_s",
            "peak_GiB", "cache_MiB"]
    start = {}
    for name, b, ctx in tqdm(points, desc="throughput", unit="point"):
        start.setdefault(name, time.perf_counter())
        if args.time_budget is not None and time.perf_counter() - start[name] > args.time_budget:
            rows.append(dict(model=name, batch=b, context=ctx, status="skipped (time budget)"))
            continue
        if args.out and rows:
            save_results(args.out, rows, cols, meta, copy_GBps=bw / 1e9)
        if (name, b) in oom:
            rows.append(dict(model=name, batch=b, context=ctx, status="OOM"))
            continue
        if current != name:
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model = build(name, cfgs, device, dtype)
            current = name
            active = active_parameters(cfgs["mixtral-shaped" if name == "hf-mixtral" else name])
        try:
            pre, dec, peak, cb = measure(name, model, b, ctx, args.chunk, args.decode_tokens, device)
        except torch.OutOfMemoryError:
            oom.add((name, b))
            rows.append(dict(model=name, batch=b, context=ctx, status="OOM"))
            continue
        roof = b / ((active * esize + cb) / (bw / 2))  # tokens/s if each step only read weights + cache
        rows.append(dict(model=name, batch=b, context=ctx, status="ok", prefill_tok_s=pre, decode_tok_s=dec,
                         decode_roofline_tok_s=roof, peak_GiB=peak / 2**30 if peak else None,
                         cache_MiB=cb / 2**20))
        tqdm.write(f"{name:15s} b={b:<3d} ctx={ctx:<7d} prefill {pre:10.0f} tok/s  decode {dec:8.1f} tok/s "
                   f"(roofline {roof:8.1f})  cache {cb / 2**20:9.1f} MiB"
                   + (f"  peak {peak / 2**30:6.2f} GiB" if peak else ""))
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
            for name in dict.fromkeys(r["model"] for r in rows):
                pts = [(r["context"], r[key]) for r in rows if r["model"] == name and r["batch"] == b
                       and r["status"] == "ok"]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
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
