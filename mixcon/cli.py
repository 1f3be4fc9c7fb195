"""`mixcon` command line: the built-in demo and the layout printer.

    mixcon demo [--config configs/tiny.json] [--context 4096]
    mixcon layout configs/mixcon-paper.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from mixcon import MixConCache, MixConConfig, MixConForCausalLM

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.json")


def load_config(path: str, **overrides) -> MixConConfig:
    if not os.path.exists(path):
        raise SystemExit(f"config file {path!r} does not exist (try one of configs/*.json)")
    kw = json.load(open(path))
    if kw.pop("model_type", "mixcon") != "mixcon":
        raise SystemExit(f"{path}: model_type must be 'mixcon'")
    kw.update(overrides)
    return MixConConfig(**kw)


def _cache_bytes(model: MixConForCausalLM, context: int, chunk: int = 512) -> int:
    """Bytes of the cache after a prefill of ``context`` random tokens (chunked, batch 1)."""
    cache = MixConCache(model.config)
    ids = torch.randint(3, model.config.vocab_size, (1, context))
    with torch.no_grad():
        for s in range(0, context, chunk):
            model(ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache.nbytes()


def demo(args):
    torch.manual_seed(args.seed)
    cfg = load_config(args.config)
    print(f"MixCon from {args.config}: {cfg.n_blocks} blocks × {cfg.layers_per_block} layers, a:c = {cfg.attn_ratio}")
    print(cfg.layout_summary())
    model = MixConForCausalLM(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n:,}")
    prompt = torch.randint(3, cfg.vocab_size, (2, 8))
    out = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=cfg.pad_token_id)
    print(f"greedy continuation of two random prompts (random weights): {out[:, 8:].tolist()}")

    # The same model with every mixer attention: its KV cache grows with every layer, MixCon's only in a:c of them.
    L = cfg.layers_per_block
    tf_cfg = load_config(args.config, attn_ratio=f"{L}:0")
    transformer = MixConForCausalLM(tf_cfg).eval()
    print(f"\ncache after a {args.context}-token prompt (batch 1, float32):")
    rows = [("mixcon " + cfg.attn_ratio, _cache_bytes(model, args.context)),
            (f"transformer {L}:0", _cache_bytes(transformer, args.context))]
    for name, b in rows:
        print(f"  {name:18s} {b / 2**20:10.2f} MiB")
    print(f"  ratio              {rows[1][1] / rows[0][1]:10.2f}×  smaller for MixCon")


def layout(args):
    cfg = load_config(args.config)
    print(cfg.layout_summary())
    for i, (m, f) in enumerate(zip(cfg.layers_block_type, cfg.layers_ffn_type)):
        print(f"layer {i:3d}: {m:9s} {f}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="mixcon", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    d = sub.add_parser("demo", help="build a model, generate, compare its cache with a transformer's")
    d.add_argument("--config", default=DEFAULT_CONFIG)
    d.add_argument("--context", type=int, default=4096)
    d.add_argument("--new-tokens", type=int, default=12)
    d.add_argument("--seed", type=int, default=0)
    lay = sub.add_parser("layout", help="print the resolved per-layer layout of a config")
    lay.add_argument("config")
    args = ap.parse_args(argv)
    if args.cmd is None:
        args = ap.parse_args(["demo"] + (argv or sys.argv[1:]))
    {"demo": demo, "layout": layout}[args.cmd](args)


if __name__ == "__main__":
    main()
