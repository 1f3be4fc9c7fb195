"""The paper's Table 1 recomputed: cache bytes per token and at 256K tokens (batch 1, 16-bit K/V,
float32 Conba states) for MixCon's paper config and for Jamba-, Mixtral- and Llama-2-70B-shaped
models, all expressed as mixcon configs and computed by `mixcon.models.configuration_mixcon.cache_nbytes`
(a test checks it against the bytes a real `MixConCache` holds).

    mixcon bench kv-cache [--context 262144] [--out eval/results/kv_cache]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from mixcon import MixConConfig, MixConForCausalLM  # noqa: E402
from mixcon.models.configuration_mixcon import cache_nbytes  # noqa: E402
from mixcon.models.sizes import active_parameters  # noqa: E402

# Llama-2-70B's shape (80 attention layers, GQA 64 heads / 8 KV heads of 128) as a mixcon config.
LLAMA2_70B = dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, n_blocks=10, layers_per_block=8,
                  attn_ratio="8:0", moe_every=0, num_attention_heads=64, num_key_value_heads=8,
                  max_position_embeddings=4096)


def load(name):
    if name == "llama-2-70b":
        return MixConConfig(**LLAMA2_70B)
    from mixcon.resources import load_config

    return load_config(name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=256 * 1024)
    ap.add_argument("--models", nargs="+", default=["llama-2-70b", "mixtral-8x7b", "jamba-v0.1", "mixcon-paper"])
    ap.add_argument("--out", default=None, help="folder for kv_cache.md, kv_cache.json and kv_cache.png")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        cfg = load(name)
        per_tok = cache_nbytes(cfg, 1)["attention"]
        at = cache_nbytes(cfg, args.context)
        with torch.device("meta"):
            total_params = sum(p.numel() for p in MixConForCausalLM(cfg).parameters())
        rows.append(dict(model=name, layers=len(cfg.layers_block_type),
                         attention_layers=cfg.layers_block_type.count("attention"),
                         params_B=total_params / 1e9, active_B=active_parameters(cfg) / 1e9,
                         kv_bytes_per_token=per_tok, conba_state_MiB=at["conba"] / 2**20,
                         cache_GiB=at["total"] / 2**30))
    base = rows[0]["cache_GiB"]
    lines = [f"Cache at {args.context:,} tokens, batch 1, bf16 K/V, float32 Conba states "
             f"(`mixcon bench kv-cache`)", "",
             "| model | layers (attn) | params | active | KV bytes/token | Conba state | cache | vs " + rows[0]["model"] + " |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layers']} ({r['attention_layers']}) | {r['params_B']:.1f}B | "
                     f"{r['active_B']:.1f}B | {r['kv_bytes_per_token']:,} | {r['conba_state_MiB']:.1f} MiB | "
                     f"{r['cache_GiB']:.2f} GiB | {base / r['cache_GiB']:.1f}× smaller |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        open(os.path.join(args.out, "kv_cache.md"), "w").write(text + "\n")
        json.dump(dict(context=args.context, rows=rows), open(os.path.join(args.out, "kv_cache.json"), "w"), indent=1)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.barh([r["model"] for r in rows], [r["cache_GiB"] for r in rows], color="tab:blue")
        for i, r in enumerate(rows):
            ax.text(r["cache_GiB"], i, f" {r['cache_GiB']:.1f} GiB", va="center", fontsize=8)
        ax.set_xlabel(f"cache at {args.context // 1024}K tokens (GiB, batch 1)")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "kv_cache.png"), dpi=120)


if __name__ == "__main__":
    main()
