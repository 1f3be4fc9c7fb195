"""CPU benchmark of Conba's scan: the per-period path `chunk_torch` against the reference loop.

Forward and forward+backward seconds of `conba_scan` with backend "chunk_torch" and "ref" (the
loop in naive.py), in the same process, at the tiny model's sizes (configs/tiny.json: d_inner =
2 × 64, N = 8, groups of 8, τ = 2), float32, scaling + delay on, noise off, for each T and each
setting: control on at P = 64, 16 and 1, and control off. The loop is timed once per row at the
largest T (it is slow); ``--ref-max-T`` skips it above that length.

With ``--associative`` it also times, for the linear part alone (control and delay off, τ = 0),
an associative (Hillis–Steele) scan over blocks of 64 steps written with autograd, against the
same computation in chunk_torch: the measurement behind chunk_torch's choice of a loop over the
block's steps.

Usage:  python tools/bench_conba_cpu.py [--T 256 1024 4096] [--batch 16] [--threads 1] [--associative]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mixcon.benchmark import header  # noqa: E402
from mixcon.ops.conba import conba_scan  # noqa: E402

SETTINGS = {"P=64": dict(control=True, P=64), "P=16": dict(control=True, P=16),
            "P=1": dict(control=True, P=1), "control off": dict(control=False, P=1)}


def inputs(b, T, d, n, G, control, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ng = d // G
    x = dict(u=r(b, T, d), delta=r(b, T, d) * 0.5, A=-(torch.rand(d, n, generator=g) * 4 + 0.5),
             B=r(b, T, n), C=r(b, T, n), D=r(d), z=r(b, T, d), delta_bias=r(d) * 0.3 - 3.0,
             delta_softplus=True, group_size=G, alpha=torch.sigmoid(r(b, T, ng) + 4),
             rho=torch.full((ng,), 0.01), tau=2)
    if control:
        x.update(k0=torch.full((ng,), 0.1), eta=torch.full((ng,), 0.05), lam=torch.full((ng,), 0.05),
                 w_r=torch.zeros(d), k_max=1.0)
    for k in ("u", "delta", "B", "C", "z", "alpha", "A", "D", "delta_bias"):
        x[k].requires_grad_(True)
    return x


def associative_scan(dt, u, A, B, C, block=64):
    """y of h_t = exp(Δ_t A) h_{t−1} + Δ_t u_t B_t, y_t = C_t · h_t (time-major (T, b, ·)): a
    Hillis–Steele scan inside each block of ``block`` steps, the blocks chained sequentially."""
    T = dt.shape[0]
    ys, h_prev = [], None
    for s in range(0, T, block):
        sl = slice(s, min(s + block, T))
        a = torch.exp(dt[sl, :, None, :] * A.t())  # (L, b, N, d)
        x = (dt[sl] * u[sl])[:, :, None, :] * B[sl, :, :, None]
        step = 1
        while step < a.shape[0]:  # (a, x)_t ← (a_t a_{t−s}, a_t x_{t−s} + x_t)
            x = torch.cat([x[:step], x[step:] + a[step:] * x[:-step]])
            a = torch.cat([a[:step], a[step:] * a[:-step]])
            step *= 2
        h = x if h_prev is None else x + a * h_prev
        h_prev = h[-1]
        ys.append(torch.matmul(C[sl, :, None, :], h).squeeze(2))
    return torch.cat(ys)


def timed(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--d-inner", type=int, default=128)
    ap.add_argument("--d-state", type=int, default=8)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ref-max-T", type=int, default=4096)
    ap.add_argument("--associative", action="store_true", help="also time a Hillis-Steele scan (linear part)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    print(header(dev, dtype="float32", batch=args.batch, d_inner=args.d_inner, N=args.d_state, G=8, tau=2,
                 threads=torch.get_num_threads(), mechanisms="scaling+delay(+control), noise off"))
    cols = ["setting", "T", "chunk fwd s", "chunk fwd+bwd s", "ref fwd s", "ref fwd+bwd s", "speed-up fwd+bwd"]
    print("\t".join(cols), flush=True)
    for T in args.T:
        for name in args.settings:
            s = SETTINGS[name]
            x = inputs(args.batch, T, args.d_inner, args.d_state, 8, s["control"])

            def fwd(backend):
                with torch.no_grad():
                    conba_scan(**x, backend=backend, control_period=s["P"])

            def fwd_bwd(backend):
                y = conba_scan(**x, backend=backend, control_period=s["P"])
                y.square().mean().backward()

            row = [name, T, timed(lambda: fwd("chunk_torch"), args.reps),
                   timed(lambda: fwd_bwd("chunk_torch"), args.reps)]
            if T <= args.ref_max_T:
                reps = args.reps if T <= 1024 else 1
                row += [timed(lambda: fwd("ref"), reps), timed(lambda: fwd_bwd("ref"), reps)]
                row.append(row[5] / row[3])
            print("\t".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row), flush=True)
        if args.associative:
            x = inputs(args.batch, T, args.d_inner, args.d_state, 8, False)
            x.update(alpha=None, rho=None, tau=0, D=None, z=None, delta_bias=None, delta_softplus=False)
            x["delta"] = torch.nn.functional.softplus(x["delta"].detach() - 3.0).requires_grad_(True)
            tm = lambda v: v.transpose(0, 1)  # noqa: E731

            def assoc():
                y = associative_scan(tm(x["delta"]), tm(x["u"]), x["A"], tm(x["B"]), tm(x["C"]))
                y.square().mean().backward()
                return y

            def chunk():
                y = conba_scan(**x, backend="chunk_torch")
                y.square().mean().backward()
                return y

            assert torch.allclose(assoc().transpose(0, 1), chunk(), rtol=1e-4, atol=1e-4)
            print("\t".join(["linear part: associative fwd+bwd s", str(T), f"{timed(assoc, args.reps):.3g}",
                             "chunk_torch fwd+bwd s", f"{timed(chunk, args.reps):.3g}"]), flush=True)


if __name__ == "__main__":
    main()
