"""`mixcon bench conba-tune`: what bounds the fused Conba scan: forward ns per time step at one shape (default batch 1,
T 32K, d_inner 4096, N 16, bf16) for each mechanism alone and all together, and for each program
size (channels per program, warps), in one run. The mechanisms' rows say how much of a step is
the control loop's chain; the block rows whether more, smaller programs per SM hide latency.

    mixcon bench conba-tune --out eval/results/conba_tuning   # GPU (or python tools/tune_conba.py ...)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

from mixcon.benchmark import header, save_results, timeit
from mixcon.ops.conba import conba_scan
from mixcon.ops.conba import fused_recurrent as fr

MECHANISMS = {
    "none": dict(),
    "scaling": dict(alpha=True),
    "delay": dict(tau=2),
    "control": dict(control=True),
    "noise": dict(noise=True),
    "inference": dict(alpha=True, tau=2, control=True),  # every mechanism but the training noise
    "all": dict(alpha=True, tau=2, control=True, noise=True),
}


def inputs(b, T, d, n, G, dtype, device, alpha=False, tau=0, control=False, noise=False):
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    ng = d // G
    x = dict(u=r(b, T, d).to(dtype), delta=(r(b, T, d) * 0.5).to(dtype),
             A=-(torch.rand(d, n, generator=g, device=device) + 0.5), B=r(b, T, n).to(dtype),
             C=r(b, T, n).to(dtype), D=r(d), z=r(b, T, d).to(dtype), delta_bias=r(d) * 0.3 - 3.0,
             delta_softplus=True, group_size=G)
    if alpha:
        x["alpha"] = torch.sigmoid(r(b, T, ng) + 4).to(dtype)
    if tau:
        x.update(rho=torch.full((ng,), 0.01, device=device), tau=tau)
    if control:
        x.update(k0=torch.full((ng,), 0.1, device=device), eta=torch.full((ng,), 0.01, device=device),
                 lam=torch.full((ng,), 0.05, device=device), w_r=torch.ones(d, device=device), k_max=1.0)
    if noise:
        x.update(sigma_w=0.01, sigma_v=0.01, seed=1)
    return x


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=32768)
    ap.add_argument("--d-inner", type=int, default=4096)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--max-warps", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--sweep", nargs="+", default=["inference", "all"], help="mechanism sets swept over blocks")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("mixcon bench conba-tune measures a GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    b, T, d, n = args.batch, args.seqlen, args.d_inner, args.d_state
    meta = header(device, dtype=str(dtype), shape=f"b={b} T={T} d_inner={d} N={n} G=8")
    for k, v in meta.items():
        print(f"# {k}: {v}")
    cols = ["mechanisms", "channels", "max_warps", "programs", "fwd_ms", "ns_per_step"]
    print("\t".join(cols))
    rows = []
    default = dict(fr.TUNING)
    auto = (fr._channels(b, d), default["max_warps"])  # what the kernels pick by themselves here
    points = [(m, *auto) for m in MECHANISMS]
    points += [(m, c, w) for m, c, w in itertools.product(args.sweep, args.channels, args.max_warps)
               if (c, w) != auto and not (c <= 32 and w > 1)]
    for mech, ch, warps in points:
        fr.TUNING.update(channels=ch, max_warps=warps)
        x = inputs(b, T, d, n, 8, dtype, device, **MECHANISMS[mech])
        with torch.no_grad():
            t = timeit(lambda: conba_scan(**x, backend="triton"), device)
        row = dict(mechanisms=mech, channels=ch, max_warps=warps, programs=b * fr._blocking(d, 8, n, b)[3],
                   fwd_ms=t * 1e3, ns_per_step=t / T * 1e9)
        rows.append(row)
        print("\t".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in cols), flush=True)
        del x
    fr.TUNING.update(default)
    best = min((r for r in rows if r["mechanisms"] == args.sweep[0]), key=lambda r: r["ns_per_step"])
    print(f"# fastest for {args.sweep[0]}: channels={best['channels']} max_warps={best['max_warps']} "
          f"({best['ns_per_step']:.0f} ns/step)")
    if args.out:
        save_results(args.out, rows, cols, meta)
        with open(os.path.join(args.out, "best.txt"), "w") as f:
            f.write(f"{best['channels']} {best['max_warps']}\n")


if __name__ == "__main__":
    main()
