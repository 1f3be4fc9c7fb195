"""`mixcon bench conba`: the fused Conba kernels' benchmark (issue: fused Conba kernels, "Performance").

One run prints one table: forward, backward and decode step of `conba_scan`/`conba_step`
(backend "triton", bf16 inputs, fp32 state, noise off) for each batch, T and d_inner, at the
control period ``--control-period`` P (default 64: the chunk-parallel scan of `chunk.py`; 1: the
per-step kernels of `fused_recurrent.py`), with every mechanism on (delay τ = 2, scaling, control)
and with every mechanism off (``off_*`` columns: a Mamba-1 scan), beside, in the same process:
  - the per-step kernel at P = 1 with every mechanism on (``p1_fwd_ms``, up to ``--p1-max-T``),
  - the pure-PyTorch reference (only at small T: it is a Python loop),
  - mamba_ssm's Triton kernels when importable: `mamba_chunk_scan_combined` (Mamba-2 SSD prefill,
    d_inner split into 64-wide heads, one B/C group, N = 16) and `selective_state_update` (decode,
    Mamba-1 layout at the same (batch, d_inner, N)),
  - SDPA causal attention at the same T (d_model = d_inner / 2, 128-wide heads, forward),
  - the floors: bytes moved ÷ copy bandwidth measured in this run, and exp(Δ·A) count ÷ the SFU
    rate (16 ex2 per clock per SM; ``--sm-clock-ghz``), whichever is larger.

Usage (GPU):  mixcon bench conba --out eval/results/conba   (or mixcon bench conba ...)
Smoke test on CPU through Triton's interpreter (tiny shapes, no timings worth reading):
              TRITON_INTERPRET=1 mixcon bench conba --smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import torch
import torch.nn.functional as F

from mixcon.bench.common import copy_bandwidth, header, parse_run_args, print_row, save_results, timeit
from mixcon.ops.conba import ConbaParams, conba_scan, conba_step, empty_state
from mixcon.ops.conba.params import FIELDS as PARAM_FIELDS
from mixcon.ops.conba import chunk, fused_recurrent


def conba_inputs(b, T, d, n, G, dtype, device, requires_grad=False, mechanisms=True, control_period=64):
    """Random inputs of `conba_scan`; ``mechanisms=False``: no delay, scaling or control (Mamba-1)."""
    g = torch.Generator(device=device).manual_seed(0)  # drawn on the device: 10^9 values on a CPU take minutes
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    ng = d // G
    x = dict(
        u=r(b, T, d).to(dtype), delta=(r(b, T, d) * 0.5).to(dtype),
        A=-(torch.rand(d, n, generator=g, device=device) + 0.5), B=r(b, T, n).to(dtype),
        C=r(b, T, n).to(dtype), D=r(d), z=r(b, T, d).to(dtype),
        delta_bias=r(d) * 0.3 - 3.0, delta_softplus=True, group_size=G,
        control_period=control_period,
    )
    if mechanisms:
        x.update(alpha=torch.sigmoid(r(b, T, ng) + 4).to(dtype), rho=torch.full((ng,), 0.01, device=device), tau=2,
                 k0=torch.full((ng,), 0.1, device=device), eta=torch.full((ng,), 0.01, device=device),
                 lam=torch.full((ng,), 0.05, device=device), w_r=torch.ones(d, device=device), k_max=1.0)
    if requires_grad:
        for k in ("u", "delta", "B", "C", "z", "alpha", "A", "D"):
            if k in x:
                x[k].requires_grad_(True)
    return x


def mamba_baselines():
    """(mamba_chunk_scan_combined, selective_state_update) or Nones; the CUDA extension is stubbed."""
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    out = [None, None]
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        out[0] = mamba_chunk_scan_combined
    except Exception as e:  # pragma: no cover - depends on the machine
        print(f"# mamba_chunk_scan_combined unavailable: {type(e).__name__}: {e}")
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        out[1] = selective_state_update
    except Exception as e:  # pragma: no cover
        print(f"# selective_state_update unavailable: {type(e).__name__}: {e}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seqlen", type=int, nargs="+", default=[2048 * 2 ** i for i in range(7)])  # 2K..128K
    ap.add_argument("--d-inner", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--ref-max-T", type=int, default=2048, help="run the Python-loop reference up to this T")
    ap.add_argument("--max-gib", type=float, default=40.0, help="skip points whose inputs exceed this")
    ap.add_argument("--sm-clock-ghz", type=float, default=1.755, help="for the SFU floor (H100 SXM boost)")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--control-period", type=int, default=64,
                    help="P: > 1 runs the chunk-parallel scan (chunk.py), 1 the per-step kernels")
    ap.add_argument("--p1-max-T", type=int, default=32768,
                    help="run the per-step (P = 1) kernel as a baseline up to this T (0: never)")
    ap.add_argument("--channels", type=int, default=None, help="channels per program (fused_recurrent.TUNING)")
    ap.add_argument("--max-warps", type=int, default=None, help="warps per program at most (TUNING)")
    ap.add_argument("--bwd-channels-per-warp", type=int, default=None, help="the P = 1 backward's (TUNING)")
    ap.add_argument("--chunk-block-t", type=int, default=None, help="time positions per block (chunk.TUNING)")
    ap.add_argument("--chunk-bwd-block-t", type=int, default=None, help="the backward's block (chunk.TUNING)")
    ap.add_argument("--chunk-channels", type=int, default=None, help="channels per program (chunk.TUNING)")
    ap.add_argument("--chunk-warps", type=int, default=None, help="warps per program (chunk.TUNING)")
    ap.add_argument("--sdpa-max-tflop", type=float, default=300.0,
                    help="skip the SDPA baseline where one causal forward exceeds this many TFLOP")
    args, device, _ = parse_run_args(ap, argv, "tiny shapes on CPU (Triton interpreter)")
    if args.control_period < 1:
        ap.error(f"--control-period must be >= 1, got {args.control_period}")
    reps = dict(warmup=3, reps=10)
    if args.smoke:  # the interpreter runs a scan's combine once per element: tiny shapes, one call each
        args.batch, args.seqlen, args.d_inner, args.d_state, args.ref_max_T = [1, 2], [16], [16], 4, 16
        reps = dict(warmup=0, reps=1)
    elif device.type != "cuda":
        sys.exit("mixcon bench conba needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 on CPU); "
                 "on CPU, Conba against Mamba-2 and attention is `mixcon bench conba-cpu`")
    for k in ("channels", "max_warps", "bwd_channels_per_warp"):
        if getattr(args, k) is not None:
            fused_recurrent.TUNING[k] = getattr(args, k)
    for k in ("block_t", "bwd_block_t", "channels", "warps"):
        if getattr(args, "chunk_" + k) is not None:
            chunk.TUNING["num_warps" if k == "warps" else k] = getattr(args, "chunk_" + k)
    P = args.control_period
    meta = header(device, dtype=str(args.dtype), N=args.d_state, control_period=P, noise="off",
                  tuning=dict(fused_recurrent.TUNING), chunk_tuning=dict(chunk.TUNING))
    for k, v in meta.items():
        print(f"# {k}: {v}")
    bw = copy_bandwidth(device)
    sm = torch.cuda.get_device_properties(0).multi_processor_count if device.type == "cuda" else 1
    sfu_rate = 16 * sm * args.sm_clock_ghz * 1e9  # ex2 per second
    print(f"# copy bandwidth {bw / 1e9:.0f} GB/s; SFU rate {sfu_rate / 1e12:.2f} Tex2/s ({sm} SMs)")
    chunk_scan, state_update = mamba_baselines()
    esize = torch.finfo(args.dtype).bits // 8
    rows = []
    cols = ["d_inner", "batch", "T", "fwd_ms", "ns_per_step", "GBps", "floor_ms", "bwd_ms", "bwd_over_fwd",
            "off_fwd_ms", "off_ns_per_step", "off_bwd_ms", "p1_fwd_ms",
            "ref_fwd_ms", "mamba2_ssd_fwd_ms", "sdpa_fwd_ms", "step_us", "mamba_step_us"]
    print("\t".join(cols))
    for d in args.d_inner:
        for b in args.batch:
            for T in args.seqlen:
                in_bytes = b * T * (4 * d + 2 * args.d_state + d // args.group_size) * esize
                if in_bytes * (3 if not args.no_backward else 1) > args.max_gib * 2**30:
                    continue
                row = dict(d_inner=d, batch=b, T=T)
                x = conba_inputs(b, T, d, args.d_state, args.group_size, args.dtype, device, control_period=P)
                with torch.no_grad():
                    t = timeit(lambda: conba_scan(**x, backend="triton"), device, **reps)
                moved = b * T * (4 * d + 2 * args.d_state + d // args.group_size) * esize  # u δ z y, B C, α
                floor = max(moved / bw, b * T * d * args.d_state / sfu_rate)
                row.update(fwd_ms=t * 1e3, ns_per_step=t / T * 1e9, GBps=moved / t / 1e9, floor_ms=floor * 1e3)
                # every mechanism off: the same kernel family as a plain (Mamba-1) selective scan
                x_off = conba_inputs(b, T, d, args.d_state, args.group_size, args.dtype, device, mechanisms=False,
                                     control_period=P)
                with torch.no_grad():
                    t_off = timeit(lambda: conba_scan(**x_off, backend="triton"), device, **reps)
                row.update(off_fwd_ms=t_off * 1e3, off_ns_per_step=t_off / T * 1e9)
                if P > 1 and T <= args.p1_max_T:  # the per-step controller's kernel, the baseline
                    with torch.no_grad():
                        row["p1_fwd_ms"] = timeit(lambda: conba_scan(**{**x, "control_period": 1}, backend="triton"),
                                                  device, **reps) * 1e3
                if not args.no_backward:
                    for key, mech in (("bwd_ms", True), ("off_bwd_ms", False)):
                        xg = conba_inputs(b, T, d, args.d_state, args.group_size, args.dtype, device,
                                          requires_grad=True, mechanisms=mech, control_period=P)
                        y = conba_scan(**xg, backend="triton")
                        gy = torch.randn_like(y)
                        leaves = [v for v in xg.values() if isinstance(v, torch.Tensor) and v.requires_grad]
                        tb = timeit(lambda: torch.autograd.grad(y, leaves, gy, retain_graph=True), device,
                                    min(reps["warmup"], 1), min(reps["reps"], 5))
                        row[key] = tb * 1e3
                        del xg, y, gy, leaves
                    row["bwd_over_fwd"] = row["bwd_ms"] / row["fwd_ms"]
                if T <= args.ref_max_T:
                    with torch.no_grad():
                        row["ref_fwd_ms"] = timeit(lambda: conba_scan(**x, backend="ref"), device,
                                                   min(reps["warmup"], 1), min(reps["reps"], 3)) * 1e3
                if chunk_scan is not None and device.type == "cuda":
                    hd = 64
                    xs = x["u"].view(b, T, d // hd, hd)
                    dts = F.softplus(x["delta"][..., ::hd].float()).to(args.dtype).contiguous()
                    A2 = -torch.rand(d // hd, device=device) - 0.5
                    B2, C2 = x["B"][:, :, None], x["C"][:, :, None]
                    row["mamba2_ssd_fwd_ms"] = timeit(lambda: chunk_scan(xs, dts, A2, B2, C2, chunk_size=256),
                                                      device) * 1e3
                h = max(1, d // 2 // 128)  # d_model = d_inner / 2, 128-wide heads
                if device.type == "cuda" and 2 * b * h * T * T * 128 <= args.sdpa_max_tflop * 1e12:  # causal 4bhT²hd/2
                    q = torch.randn(b, h, T, 128, device=device, dtype=args.dtype)
                    try:
                        row["sdpa_fwd_ms"] = timeit(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True),
                                                    device) * 1e3
                    except torch.OutOfMemoryError:
                        pass
                    del q
                if T == args.seqlen[0]:  # the decode step does not depend on T
                    s = {k: x[k][:, 0] for k in ("u", "delta", "B", "C", "z", "alpha") if k in x}
                    # the fused decode step at the same P (it advances the phase, samples every P-th token); the
                    # parameters built once, as a layer does per token (no keyword adapter in the timing)
                    p = ConbaParams(**{k: v for k, v in x.items() if k in PARAM_FIELDS})
                    state = empty_state(b, d, args.d_state, 2, args.group_size, x["k0"], device)
                    with torch.no_grad():
                        row["step_us"] = timeit(lambda: conba_step(state, **s, params=p, backend="triton"), device,
                                                **reps) * 1e6
                    if state_update is not None and device.type == "cuda":
                        st = torch.zeros(b, d, args.d_state, device=device, dtype=torch.float32)
                        row["mamba_step_us"] = timeit(lambda: state_update(
                            st, s["u"], s["delta"], x["A"], s["B"], s["C"], x["D"], z=s["z"],
                            dt_bias=x["delta_bias"], dt_softplus=True), device) * 1e6
                del x
                rows.append(row)
                print_row(row, cols)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if args.out:
        save_results(args.out, rows, cols, meta, copy_GBps=bw / 1e9, sfu_Tex2ps=sfu_rate / 1e12)
        plot(rows, os.path.join(args.out, "ns_per_step.png"), meta)
        print(f"# wrote {args.out}/results.csv, results.json, ns_per_step.png")


def plot(rows, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({(r["d_inner"], r["batch"]) for r in rows})
    for d, b in keys:
        pts = [(r["T"], r["ns_per_step"]) for r in rows if r["d_inner"] == d and r["batch"] == b]
        ax.plot(*zip(*pts), marker="o", label=f"Conba fwd d={d} b={b}")
        pts = [(r["T"], r["off_ns_per_step"]) for r in rows if r["d_inner"] == d and r["batch"] == b]
        ax.plot(*zip(*pts), marker="x", linestyle="--", label=f"mechanisms off d={d} b={b}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("ns per time step")
    ax.set_title(f"Conba fused scan, P = {meta['control_period']}, {meta['device']}, {meta['dtype']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
