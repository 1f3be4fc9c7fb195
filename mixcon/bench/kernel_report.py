"""Ahead-of-time compile report of the shipped Triton kernels: registers, spills, shared memory, warps.

Every Conba kernel (`conba/chunk.py`: the chunk-parallel scan for P > 1, forward and backward;
`conba/fused_recurrent.py`: the per-step scan for P = 1, forward and backward, and the decode step
for every P) is compiled by Triton's own compiler for a target GPU (``GPUTarget``), with no GPU on
the machine, at the configurations the dispatch launches: the constexpr flags, the program's
blocking (`chunk._blocking`, `chunk.block_size`, `fused_recurrent._blocking`) and the warps are
taken from the dispatch code itself for a model shape (default: the model's defaults, d_inner 4096,
N = 16, G = 8, τ = 2, P = 64, bf16 activations). The MoE layer ships no Triton kernel (it runs on
torch's grouped_mm / bmm, `mixcon/ops/moe.py`), so it has no row.

Registers and spills are ptxas's own figures (``-v``, the log Triton prints with
``knobs.nvidia.dump_ptxas_log``), which is why the compile runs in a fresh, private Triton cache:
a cached kernel would not go through ptxas again. Shared memory is what Triton's compiler reserves
for the kernel (the launch's dynamic shared memory). One row per (kernel, configuration) and a last
line ``spills: N``, N the total bytes of spill stores over all rows.

    mixcon bench kernel-report --arch sm_90            # every kernel
    mixcon bench kernel-report --arch sm_90 --only step
    mixcon bench kernel-report --arch sm_90 --only bwd --tuning chunk.bwd_block_t=4 \
        fused_recurrent.bwd_channels_per_warp=8           # the dispatch under other TUNING values

Run it in a process without ``TRITON_INTERPRET`` (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field

# per-token tensors the model passes in bf16 (the forward's inputs and output, the backward's gradients)
ACTIVATIONS = {"u_ptr", "dt_ptr", "z_ptr", "B_ptr", "C_ptr", "y_ptr", "gy_ptr", "gu_ptr", "gdt_ptr", "gz_ptr"}
FLOAT_SCALARS = {"k_max", "sigma_w", "sigma_v"}


@dataclass
class KernelConfig:
    """One kernel at one configuration of the dispatch: its constexprs, its warps, and the element types
    of pointers that are not float (the others: bf16 activations, fp32 everything else)."""

    name: str
    fn: object
    constexprs: dict
    num_warps: int
    int_ptrs: dict = field(default_factory=dict)


@dataclass
class Shape:
    """The model shape the configurations are taken for (the model's defaults)."""

    d_inner: int = 4096
    d_state: int = 16
    group_size: int = 8
    tau: int = 2
    control_period: int = 64
    seqlen: int = 8192


def _signature(fn, constexprs: dict, int_ptrs: dict, activation: str) -> dict:
    """Triton's signature of ``fn``: each argument's type from its name (a grouped argument, a tuple whose
    members the kernel's module names in ``ARG_GROUPS``: a tuple of its members' types)."""
    groups = getattr(sys.modules[fn.fn.__module__], "ARG_GROUPS", {})

    def type_of(name):
        if name.endswith("_ptr"):
            return int_ptrs.get(name, activation if name in ACTIVATIONS else "*fp32")
        return "fp32" if name in FLOAT_SCALARS else "i32"

    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in groups:
            sig[name] = tuple(type_of(m) for m in groups[name])
        else:
            sig[name] = type_of(name)
    return sig


def configs(shape: Shape = Shape()) -> list[KernelConfig]:
    """The (kernel, configuration) pairs the dispatch launches for ``shape``, built with the dispatch's
    own blocking and flag functions."""
    from mixcon.ops.conba import chunk as ck
    from mixcon.ops.conba import chunk_bwd, chunk_fwd
    from mixcon.ops.conba import fused_recurrent as fr
    from mixcon.ops.conba.host import CHECKPOINT_INTERVAL, ScanConfig

    d, n, G, tau, P = shape.d_inner, shape.d_state, shape.group_size, shape.tau, shape.control_period
    out = []

    # ---- chunk.py (P > 1): training (no mask, no state: the instants are blocks' last steps), chunked
    # prefill (mask, a state passed on), every mechanism off (a Mamba-1 scan), and the heaviest: τ = 4 + noise
    gp, bg, np_, _, warps = ck._blocking(d, G, n)
    variants = [
        ("train", dict(tau=tau, control=True, alpha=True, mask=False, state=False, noise=False), False),
        ("prefill", dict(tau=tau, control=True, alpha=True, mask=True, state=True, noise=False), None),
        ("off", dict(tau=0, control=False, alpha=False, mask=False, state=False, noise=False), False),
        ("tau4+noise", dict(tau=4, control=True, alpha=True, mask=True, state=True, noise=True), True),
    ]
    for label, v, gfinal in variants:
        bt = ck.block_size(shape.seqlen, P, v["control"])
        bt_b = ck.bwd_block_size(shape.seqlen, P, v["control"], bt)
        cfg = ScanConfig(tau=v["tau"], group_size=G, control=v["control"], softplus=True, k_max=1.0,
                         sigma_w=0.01 if v["noise"] else 0.0, sigma_v=0.01 if v["noise"] else 0.0, seed=0, period=P,
                         block_t=bt, fix_h=v["tau"] > 0 and v["state"],
                         aligned=v["control"] and not v["mask"] and not v["state"] and P % bt == 0,
                         has_D=True, has_bias=True, has_z=True, has_alpha=v["alpha"], has_mask=v["mask"])
        common = dict(G=G, GP=gp, BG=bg, NP=np_, BT=bt, MS=max(v["tau"], 1), SEG=ck._segment(bt), **cfg.flags())
        ints = {"m_ptr": "*i8", "ph_ptr": "*i32", "t1_ptr": "*i32"}
        out.append(KernelConfig(f"chunk_fwd[{label}]", chunk_fwd._chunk_fwd_kernel,
                                dict(common, SAVE=gfinal is not None), warps, ints))
        if gfinal is not None:  # the backward's own block (and so its segment and alignment)
            bwd = dict(common, BT=bt_b, SEG=ck._checkpoint_interval(bt) // bt_b, HAS_GFINAL=gfinal,
                       ALIGNED=v["control"] and not v["mask"] and not v["state"] and P % bt_b == 0)
            out.append(KernelConfig(f"chunk_bwd[{label}]", chunk_bwd._chunk_bwd_kernel, bwd, warps, ints))

    # ---- fused_recurrent.py: the P = 1 scan and the decode step, at batch 1 and batch 8 blocking
    def fr_flags(control=True, tau_=tau, alpha=True, mask=True, noise=False):
        return dict(TAU=tau_, CONTROL=control, HAS_ALPHA=alpha, HAS_BIAS=True, SOFTPLUS=True, HAS_D=True, HAS_Z=True,
                    HAS_MASK=mask, NOISE_W=noise, NOISE_V=noise)

    for batch in (1, 8):
        gp, bg, np_, _, warps = fr._blocking(d, G, n, batch)
        bwd_warps = fr._blocking(d, G, n, batch, backward=True)[4]
        tile = dict(G=G, GP=gp, BG=bg, NP=np_)
        ch = bg * gp
        scan = dict(tile, CHECKPOINT_INTERVAL=CHECKPOINT_INTERVAL)
        out.append(KernelConfig(f"p1_fwd[b{batch},{ch}ch]", fr._conba_fwd_kernel,
                                dict(scan, SAVE=True, **fr_flags(mask=False)), warps,
                                {"m_ptr": "*i8"}))
        out.append(KernelConfig(f"p1_bwd[b{batch},{ch}ch]", fr._conba_bwd_kernel,
                                dict(scan, HAS_GFINAL=False, **fr_flags(mask=False)), bwd_warps,
                                {"m_ptr": "*i8"}))
        step_ints = {"m_ptr": "*i8", "ph_ptr": "*i64"}
        out.append(KernelConfig(f"step[P={P},b{batch},{ch}ch]", fr._conba_step_kernel,
                                dict(tile, PERIODIC=P > 1, **fr_flags()), warps, step_ints))
        if batch == 1:
            out.append(KernelConfig(f"step[P=1,b{batch},{ch}ch]", fr._conba_step_kernel,
                                    dict(tile, PERIODIC=False, **fr_flags()), warps, step_ints))
            out.append(KernelConfig(f"step[off,b{batch},{ch}ch]", fr._conba_step_kernel,
                                    dict(tile, PERIODIC=False, **fr_flags(control=False, tau_=0, alpha=False)), warps,
                                    step_ints))
    return out


def set_tuning(assignment: str) -> None:
    """Apply ``module.key=value`` (module: chunk or fused_recurrent; value: an int or None) to that module's
    TUNING, so the report shows what the dispatch would launch under it."""
    from mixcon.ops.conba import chunk, fused_recurrent

    modules = {"chunk": chunk, "fused_recurrent": fused_recurrent}
    m = re.fullmatch(r"(\w+)\.(\w+)=(\w+)", assignment.strip())
    if not m or m.group(1) not in modules:
        raise ValueError(f"--tuning {assignment!r}: expected MODULE.KEY=VALUE with MODULE one of {sorted(modules)}")
    tuning = modules[m.group(1)].TUNING
    if m.group(2) not in tuning:
        raise ValueError(f"--tuning {assignment!r}: {m.group(1)}.TUNING has no {m.group(2)!r}; keys: {sorted(tuning)}")
    value = m.group(3)
    if value != "None" and not value.isdigit():
        raise ValueError(f"--tuning {assignment!r}: the value must be a positive integer or None")
    tuning[m.group(2)] = None if value == "None" else int(value)


def parse_arch(arch: str) -> int:
    m = re.fullmatch(r"sm_?(\d+)a?", arch.strip())
    if not m:
        raise ValueError(f"--arch {arch!r}: expected sm_<capability>, e.g. sm_90 (H100/H200) or sm_80 (A100)")
    return int(m.group(1))


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def compile_one(kc: KernelConfig, capability: int, activation: str = "*bf16") -> dict:
    """Compile ``kc`` for ``capability`` (no GPU needed) and return its row: registers, spill stores and
    loads (bytes), stack frame, shared memory (bytes), warps, compile seconds."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the kernel report needs Triton's compiler: run it without TRITON_INTERPRET=1")
    sig = _signature(kc.fn, kc.constexprs, kc.int_ptrs, activation)
    buf = io.StringIO()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache, knobs.cache.scope(), knobs.nvidia.scope():
        knobs.cache.dir = cache  # a fresh cache: ptxas runs, and prints its figures
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(fn=kc.fn, signature=sig, constexprs=kc.constexprs),
                               target=GPUTarget("cuda", capability, 32), options=dict(num_warps=kc.num_warps))
    log = buf.getvalue()
    spill = _PTXAS.search(log)
    regs = _REGS.search(log)
    if spill is None or regs is None:
        raise RuntimeError(f"{kc.name}: no ptxas figures in the compile log:\n{log[-2000:]}")
    return dict(kernel=kc.name, regs=int(regs.group(1)), spill_stores=int(spill.group(2)),
                spill_loads=int(spill.group(3)), stack=int(spill.group(1)), shared=int(k.metadata.shared),
                warps=int(k.metadata.num_warps), seconds=time.perf_counter() - t0)


COLS = ("kernel", "regs", "spill_stores", "spill_loads", "stack", "shared", "warps", "seconds")


def format_row(r: dict) -> str:
    return (f"{r['kernel']:<28} {r['regs']:>5} {r['spill_stores']:>12} {r['spill_loads']:>11} {r['stack']:>6} "
            f"{r['shared']:>7} {r['warps']:>5} {r['seconds']:>7.1f}")


def report(arch: str = "sm_90", only=None, shape: Shape = Shape(), echo=print) -> list[dict]:
    """Compile every configuration (those whose name contains one of ``only``, if given) and echo the
    table; returns the rows. The last line is ``spills: N`` (bytes of spill stores, all rows)."""
    import triton

    capability = parse_arch(arch)
    kcs = [kc for kc in configs(shape) if not only or any(s in kc.name for s in only)]
    if not kcs:
        raise ValueError(f"--only {only}: no kernel matches; names: {[kc.name for kc in configs(shape)]}")
    from mixcon.ops.conba import chunk, fused_recurrent

    echo(f"# Triton {triton.__version__}, target sm_{capability}, shape {shape}; bf16 activations")
    echo(f"# TUNING: chunk {chunk.TUNING}, fused_recurrent {fused_recurrent.TUNING}")
    echo(f"{'kernel':<28} {'regs':>5} {'spill_stores':>12} {'spill_loads':>11} {'stack':>6} {'shared':>7} "
         f"{'warps':>5} {'seconds':>7}")
    rows = []
    for kc in kcs:
        r = compile_one(kc, capability)
        rows.append(r)
        echo(format_row(r))
    echo(f"spills: {sum(r['spill_stores'] for r in rows)}")
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="mixcon bench kernel-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90", help="target, e.g. sm_90 (H100, H200) or sm_80 (A100)")
    ap.add_argument("--only", nargs="+", default=None, help="only the kernels whose name contains one of these")
    ap.add_argument("--d-inner", type=int, default=Shape.d_inner)
    ap.add_argument("--d-state", type=int, default=Shape.d_state)
    ap.add_argument("--group-size", type=int, default=Shape.group_size)
    ap.add_argument("--tau", type=int, default=Shape.tau)
    ap.add_argument("--control-period", type=int, default=Shape.control_period)
    ap.add_argument("--tuning", nargs="+", default=[], metavar="MODULE.KEY=VALUE",
                    help="set a TUNING entry of conba.chunk or conba.fused_recurrent first, e.g. chunk.bwd_block_t=4")
    args = ap.parse_args(argv)
    try:
        parse_arch(args.arch)
        for t in args.tuning:
            set_tuning(t)
    except ValueError as e:
        ap.error(str(e))
    shape = Shape(args.d_inner, args.d_state, args.group_size, args.tau, args.control_period)
    return report(args.arch, args.only, shape)
