"""Benchmark of the MoE layer (issue: MoE at the speed of its active parameters, "Performance").

One run, one table: for tokens-per-batch from 1 to 64K at the paper's width (hidden 2560, expert
FFN 7168, 16 experts, top-2; ``--config`` for another), the time of

  - forward+backward of the grouped MoE (`moe_impl="grouped"`: sort by expert, torch grouped_mm on
    CUDA in bf16; the gather path at small token counts),
  - the same with the reference loop over experts (`moe_impl="loop"`),
  - a dense SwiGLU MLP with the same active parameters (intermediate size K·F),

with achieved TFLOP/s (2·3·tokens·K·3·D·F for forward+backward of K SwiGLU experts), and at
decode sizes (≤ 8 tokens) the forward time against the floor of reading the K experts' weights at
the copy bandwidth measured in this run.

Usage (GPU):  mixcon bench moe --out eval/results/moe
Smoke test on CPU (tiny width): mixcon bench moe --smoke
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from mixcon.bench.common import copy_bandwidth, header, parse_run_args, print_row, save_results, timeit  # noqa: E402
from mixcon.ops.moe import moe_grouped, moe_loop, route  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--ffn", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4 ** i for i in range(9)])  # 1 .. 64K
    ap.add_argument("--loop-max-tokens", type=int, default=1 << 16)
    args, device, dtype = parse_run_args(ap, argv, "tiny sizes on CPU")
    if args.smoke:
        args.hidden, args.ffn, args.tokens, dtype = 64, 96, [1, 16, 256], torch.float32
    elif device.type != "cuda":
        sys.exit("mixcon bench moe needs a CUDA GPU (or --smoke)")
    E, K, D, Fh = args.experts, args.top_k, args.hidden, args.ffn
    meta = header(device, dtype=str(dtype), shape=f"D={D} F={Fh} E={E} K={K}")
    for k, v in meta.items():
        print(f"# {k}: {v}")
    bw = copy_bandwidth(device)
    print(f"# copy bandwidth {bw / 1e9:.0f} GB/s")
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(device, dtype).requires_grad_(True)  # noqa: E731
    gate_up, down, router = mk(E, 2 * Fh, D), mk(E, D, Fh), mk(E, D)
    dense_gu, dense_down = mk(2 * K * Fh, D), mk(D, K * Fh)
    esize = torch.finfo(dtype).bits // 8
    cols = ["tokens", "moe_fb_ms", "moe_TFLOPs", "loop_fb_ms", "dense_fb_ms", "dense_TFLOPs", "moe_over_dense",
            "moe_fwd_us", "k_experts_floor_us", "fwd_over_floor"]
    print("\t".join(cols))
    rows = []
    for T in args.tokens:
        x = torch.randn(T, D, generator=g).to(device, dtype).requires_grad_(True)
        gy = torch.randn(T, D, generator=g).to(device, dtype)

        def moe(fn):
            w, idx = route(x @ router.t(), K)
            return fn(x, gate_up, down, w, idx)

        def fb(fn):
            y = fn()
            torch.autograd.grad(y, [x, gate_up, down, router], gy, allow_unused=True)

        def dense():
            gt, up = F.linear(x, dense_gu).chunk(2, dim=-1)
            return F.linear(F.silu(gt) * up, dense_down)

        flops = 2 * 3 * T * K * 3 * D * Fh  # fwd + bwd (2×), three D×F products per expert
        row = dict(tokens=T)
        t = timeit(lambda: fb(lambda: moe(moe_grouped)), device)
        row.update(moe_fb_ms=t * 1e3, moe_TFLOPs=flops / t / 1e12)
        if T <= args.loop_max_tokens:
            row["loop_fb_ms"] = timeit(lambda: fb(lambda: moe(moe_loop)), device, 1, 5) * 1e3
        td = timeit(lambda: fb(dense), device)
        row.update(dense_fb_ms=td * 1e3, dense_TFLOPs=flops / td / 1e12, moe_over_dense=t / td)
        if T <= 8:
            with torch.no_grad():
                tf = timeit(lambda: moe(moe_grouped), device)
            n_read = min(E, T * K)
            floor = n_read * 3 * D * Fh * esize / (bw / 2)  # copy bw counts read + write
            row.update(moe_fwd_us=tf * 1e6, k_experts_floor_us=floor * 1e6, fwd_over_floor=tf / floor)
        rows.append(row)
        print_row(row, cols)
    if args.out:
        save_results(args.out, rows, cols, meta, copy_GBps=bw / 1e9)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for key, label in (("moe_TFLOPs", "MoE grouped"), ("dense_TFLOPs", "dense, equal active params")):
            ax.plot([r["tokens"] for r in rows], [r[key] for r in rows], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per batch")
        ax.set_ylabel("TFLOP/s (forward+backward)")
        ax.set_title(f"MoE {meta['shape']} on {meta['device']}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "tflops.png"), dpi=120)
        print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
