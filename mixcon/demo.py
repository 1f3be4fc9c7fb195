"""`mixcon demo`: build a small MixCon, generate from it, and compare its cache with a transformer's."""

from __future__ import annotations

import torch

from mixcon import MixConCache, MixConForCausalLM
from mixcon.resources import load_config
from mixcon.models.compat import cache_kwargs, output_cache


def cache_bytes(model: MixConForCausalLM, context: int, chunk: int = 512) -> int:
    """Bytes of the cache after a prefill of ``context`` random tokens (chunked, batch 1)."""
    cache = MixConCache(model.config)
    ids = torch.randint(3, model.config.vocab_size, (1, context))
    with torch.no_grad():
        for s in range(0, context, chunk):
            model(ids[:, s:s + chunk], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    return cache.nbytes()


def demo(config: str = "tiny", context: int = 4096, new_tokens: int = 12, seed: int = 0) -> None:
    torch.manual_seed(seed)
    cfg = load_config(config)
    print(f"MixCon {config}: {cfg.n_blocks} blocks × {cfg.layers_per_block} layers, a:c = {cfg.attn_ratio}")
    print(cfg.layout_summary())
    model = MixConForCausalLM(cfg).eval()
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    prompt = torch.randint(3, cfg.vocab_size, (2, 8))
    out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=cfg.pad_token_id)
    print(f"greedy continuation of two random prompts (random weights): {out[:, 8:].tolist()}")
    # The same model with every mixer attention: its KV cache grows in every layer, MixCon's only in a:c of them.
    L = cfg.layers_per_block
    transformer = MixConForCausalLM(load_config(config, attn_ratio=f"{L}:0", layer_pattern=None)).eval()
    print(f"\ncache after a {context}-token prompt (batch 1, float32):")
    rows = [("mixcon " + cfg.attn_ratio, cache_bytes(model, context)),
            (f"transformer {L}:0", cache_bytes(transformer, context))]
    for name, b in rows:
        print(f"  {name:18s} {b / 2**20:10.2f} MiB")
    print(f"  ratio              {rows[1][1] / rows[0][1]:10.2f}×  smaller for MixCon")
