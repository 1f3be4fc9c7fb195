"""`mixcon bench conba-tune`: what bounds the fused Conba scan: forward ns per time step at one shape (default batch 1,
T 32K, d_inner 4096, N 16, bf16) for each mechanism alone and all together, and for each program
size (channels per program, warps), in one run. The mechanisms' rows say how much of a step is
the control loop's chain; the block rows whether more, smaller programs per SM hide latency.

``--chunk`` asks the spill question instead (docs/kernels.md, "Spills"): the chunk scan (P = 64) forward
and backward for each forward block, backward block and warps (chunk.TUNING), and the P = 1 backward
at batch 8 with one warp per 32 or per 8 channels (fused_recurrent.TUNING); the configurations that
spill ahead of time beside those that do not, timed in one process. It writes chunk/results.* and
chunk_best.txt (block_t, bwd_block_t, warps, bwd_channels_per_warp), which the full `conba` step reads.

    mixcon bench conba-tune --out eval/results/conba_tuning          # GPU (or mixcon bench conba-tune ...)
    mixcon bench conba-tune --chunk --out eval/results/conba_tuning  # GPU; mostly compiles (not yet run there)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
from tqdm.auto import tqdm

from mixcon.bench.common import header, save_results, timeit
from mixcon.ops.conba import chunk as ck
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
    ap.add_argument("--chunk", action="store_true", help="the chunk scan's blocks and the backward's warps (spills)")
    ap.add_argument("--block-t", type=int, nargs="+", default=[16], help="--chunk: forward blocks")
    ap.add_argument("--bwd-block-t", type=int, nargs="+", default=[16, 8, 4, 2], help="--chunk: backward blocks")
    ap.add_argument("--chunk-warps", type=int, nargs="+", default=[4], help="--chunk: warps per program")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="--chunk at tiny sizes on CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.chunk, args.batch, args.seqlen, args.d_inner, args.d_state = True, 1, 16, 16, 4
        args.block_t, args.bwd_block_t, args.sweep = [8], [8, 2], ["all"]
    elif not torch.cuda.is_available():
        sys.exit("mixcon bench conba-tune measures a GPU")
    if args.chunk:
        return tune_chunk(args)
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


def _fwd_bwd(x, P, device, reps):
    """(forward seconds, forward + backward seconds) of one scan of ``x`` at period P."""
    leaves = {k: v.detach().requires_grad_() for k, v in x.items()
              if k in ("u", "delta", "B", "C", "z") and isinstance(v, torch.Tensor)}
    xs = {**x, **leaves}
    gy = torch.randn_like(x["u"])

    def both():
        y = conba_scan(**xs, backend="triton", control_period=P)
        torch.autograd.backward(y, gy)

    with torch.no_grad():
        f = timeit(lambda: conba_scan(**x, backend="triton", control_period=P), device, **reps)
    return f, timeit(both, device, **reps)


def tune_chunk(args):
    """The spill question, timed: chunk scan forward and backward per block configuration, and the P = 1
    backward per warps; each row beside the shipped configuration's, from the same process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = dict(warmup=3, reps=10) if not args.smoke else dict(warmup=0, reps=1)
    b, T, d, n, P = args.batch, args.seqlen, args.d_inner, args.d_state, 64 if not args.smoke else 8
    meta = header(device, dtype=str(dtype), shape=f"b={b} T={T} d_inner={d} N={n} G=8 P={P}",
                  chunk_tuning=dict(ck.TUNING), tuning=dict(fr.TUNING))
    for k, v in meta.items():
        print(f"# {k}: {v}")
    cols = ["kernel", "mechanisms", "block_t", "bwd_block_t", "warps", "bwd_channels_per_warp", "batch", "fwd_ms",
            "fwd_bwd_ms", "bwd_ms", "bwd_vs_shipped"]
    print("\t".join(cols))
    rows, shipped_ck, shipped_fr = [], dict(ck.TUNING), dict(fr.TUNING)
    points = [("chunk", m, bt, btb, w, None, b) for m in args.sweep for bt in args.block_t
              for btb in args.bwd_block_t if btb <= bt for w in args.chunk_warps]
    # the P = 1 backward at batch 8 (32-channel programs): one warp per 32 channels (shipped) or per 8
    points += [("p1", m, None, None, None, cpw, 8 if not args.smoke else 2) for m in args.sweep[:1] for cpw in (32, 8)]
    for kernel, mech, bt, btb, w, cpw, batch in tqdm(points, desc="configurations", disable=None):
        ck.TUNING.update(shipped_ck)
        fr.TUNING.update(shipped_fr)
        if kernel == "chunk":
            ck.TUNING.update(block_t=bt, bwd_block_t=btb, num_warps=w)
        else:
            fr.TUNING.update(bwd_channels_per_warp=cpw)
        x = inputs(batch, T, d, n, 8, dtype, device, **MECHANISMS[mech])
        f, fb = _fwd_bwd(x, P if kernel == "chunk" else 1, device, reps)
        rows.append(dict(kernel=kernel, mechanisms=mech, block_t=bt, bwd_block_t=btb, warps=w,
                         bwd_channels_per_warp=cpw, batch=batch, fwd_ms=f * 1e3, fwd_bwd_ms=fb * 1e3,
                         bwd_ms=(fb - f) * 1e3))
        del x
    ck.TUNING.update(shipped_ck)
    fr.TUNING.update(shipped_fr)

    def is_shipped(r):
        if r["kernel"] == "p1":
            return r["bwd_channels_per_warp"] == shipped_fr["bwd_channels_per_warp"]
        btb = shipped_ck["bwd_block_t"] or shipped_ck["block_t"]
        return (r["block_t"], r["bwd_block_t"], r["warps"]) == (shipped_ck["block_t"], btb, shipped_ck["num_warps"])

    for r in rows:
        base = next((s for s in rows if s["kernel"] == r["kernel"] and s["mechanisms"] == r["mechanisms"]
                     and is_shipped(s)), None)
        r["bwd_vs_shipped"] = r["bwd_ms"] / base["bwd_ms"] if base and base["bwd_ms"] > 0 else float("nan")
        print("\t".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols), flush=True)
    first = [r for r in rows if r["kernel"] == "chunk" and r["mechanisms"] == args.sweep[0]]
    best = min(first, key=lambda r: r["fwd_bwd_ms"]) if first else None
    p1 = min((r for r in rows if r["kernel"] == "p1"), key=lambda r: r["bwd_ms"])
    if best:
        print(f"# fastest chunk forward+backward for {args.sweep[0]}: block_t={best['block_t']} "
              f"bwd_block_t={best['bwd_block_t']} warps={best['warps']} ({best['fwd_bwd_ms']:.3g} ms)")
    print(f"# fastest P = 1 backward at batch {p1['batch']}: bwd_channels_per_warp={p1['bwd_channels_per_warp']}")
    if args.out:
        save_results(os.path.join(args.out, "chunk"), rows, cols, meta)
        if best:
            tmp = os.path.join(args.out, "chunk_best.txt.tmp")
            with open(tmp, "w") as f:
                f.write(f"{best['block_t']} {best['bwd_block_t']} {best['warps']} {p1['bwd_channels_per_warp']}\n")
            os.replace(tmp, os.path.join(args.out, "chunk_best.txt"))
    return rows


if __name__ == "__main__":
    main()
