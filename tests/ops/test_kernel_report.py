"""`mixcon bench kernel-report` (mixcon/bench/kernel_report.py): the ahead-of-time compile report of the shipped
Triton kernels. Its configurations cover every kernel entry point of the Conba modules; one small kernel
compiled for sm_90 here (Triton's compiler, no GPU) gives a row with ptxas's figures and the last line."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from helpers import ROOT  # noqa: E402
from mixcon.bench import kernel_report as kr  # noqa: E402
from mixcon.ops.conba import chunk, chunk_bwd, chunk_fwd, fused_recurrent  # noqa: E402


def test_configs_cover_every_kernel_entry_point():
    entry = {f"{m.__name__}.{name}" for m in (chunk_fwd, chunk_bwd, fused_recurrent) for name in dir(m)
             if name.endswith("_kernel") and hasattr(getattr(m, name), "fn")}
    covered = {f"{kc.fn.fn.__module__}.{kc.fn.fn.__name__}" for kc in kr.configs()}
    assert entry and entry <= covered, entry - covered
    names = [kc.name for kc in kr.configs()]
    assert len(names) == len(set(names))
    assert "step[P=64,b1,8ch]" in names  # the decode step at the default period


def test_every_constexpr_of_every_config_is_given():
    import inspect

    for kc in kr.configs():
        params = inspect.signature(kc.fn.fn).parameters
        flags = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        assert flags == set(kc.constexprs), (kc.name, flags ^ set(kc.constexprs))


def test_bad_arch_is_refused():
    assert kr.parse_arch("sm_90") == 90 and kr.parse_arch("sm_80") == 80 and kr.parse_arch("sm_90a") == 90
    with pytest.raises(ValueError, match="sm_<capability>"):
        kr.parse_arch("hopper")


@pytest.mark.slow
def test_compiles_one_kernel_for_sm90_and_prints_the_spill_total():
    """The mechanisms-off decode step (the smallest kernel, ~1 s) through `mixcon bench kernel-report`, in a
    process without the interpreter."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "mixcon", "bench", "kernel-report", "--arch", "sm_90",
                        "--only", "step[off"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    row = next(line for line in lines if line.startswith("step[off"))
    regs, stores, loads, stack, shared, warps = map(int, row.split()[1:7])
    assert 0 < regs <= 255 and warps >= 1 and shared >= 0
    assert re.fullmatch(r"spills: \d+", lines[-1]) and int(lines[-1].split()[1]) == stores


def test_grouped_kernel_arguments_match_arg_groups():
    """The kernels take some arguments as tuples (chunk.py: forward and backward share ins, prm, strides,
    scalars, dims, clock, carries); kernel_report types their members by the names in the module's
    ARG_GROUPS, so each kernel's unpacking line must list exactly those names."""
    import inspect

    for m in (chunk_fwd, chunk_bwd, fused_recurrent):
        groups = getattr(m, "ARG_GROUPS", {})
        for name in dir(m):
            k = getattr(m, name)
            if not (name.endswith("_kernel") and hasattr(k, "fn")):
                continue
            src = inspect.getsource(k.fn)
            for arg in inspect.signature(k.fn).parameters:
                if arg in groups:
                    line = re.search(rf"^\s+([\w, ]+) = {arg}$", src, re.M)
                    assert line, (name, arg)
                    assert tuple(s.strip() for s in line.group(1).split(",")) == groups[arg], (name, arg)
    shared = ("ins", "prm", "strides", "scalars", "dims", "clock", "carries")
    for k in (chunk_fwd._chunk_fwd_kernel, chunk_bwd._chunk_bwd_kernel):
        assert set(shared) <= set(inspect.signature(k.fn).parameters), k.fn.__name__
    bwd = [p for p, v in inspect.signature(chunk_bwd._chunk_bwd_kernel.fn).parameters.items()
           if "constexpr" not in str(v.annotation)]
    assert len(bwd) <= 20, bwd  # was 69 flat arguments (89 with the constexprs)


def test_backward_rows_follow_the_dispatch_tuning(monkeypatch):
    """The report compiles what the dispatch launches: the chunk backward at its own block (and the
    segment between saved carries that follows), the P = 1 backward at its own warps."""
    monkeypatch.setattr(chunk, "TUNING", dict(chunk.TUNING, bwd_block_t=4))
    monkeypatch.setattr(fused_recurrent, "TUNING", dict(fused_recurrent.TUNING, bwd_channels_per_warp=8))
    by = {kc.name: kc for kc in kr.configs()}
    fwd, bwd = by["chunk_fwd[train]"], by["chunk_bwd[train]"]
    assert fwd.constexprs["BT"] == 16 and bwd.constexprs["BT"] == 4
    assert fwd.constexprs["BT"] * fwd.constexprs["SEG"] == bwd.constexprs["BT"] * bwd.constexprs["SEG"]
    assert by["p1_bwd[b8,32ch]"].num_warps == 4 and by["p1_fwd[b8,32ch]"].num_warps == 1
    assert fused_recurrent._blocking(4096, 8, 16, 8, backward=True)[4] == 4


def test_tuning_option(monkeypatch):
    monkeypatch.setattr(chunk, "TUNING", dict(chunk.TUNING))
    kr.set_tuning("chunk.bwd_block_t=8")
    assert chunk.TUNING["bwd_block_t"] == 8
    kr.set_tuning("chunk.bwd_block_t=None")
    assert chunk.TUNING["bwd_block_t"] is None
    for bad, msg in [("moe.x=1", "MODULE one of"), ("chunk.nope=1", "has no 'nope'"), ("chunk.block_t=-1", "MODULE"),
                     ("chunk.block_t=big", "positive integer")]:
        with pytest.raises(ValueError, match=msg):
            kr.set_tuning(bad)
