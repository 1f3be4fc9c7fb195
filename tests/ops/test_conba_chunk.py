"""The chunk-parallel Conba scan (mixcon/ops/conba/chunk.py, control period P > 1) against the
reference (docs/conba.md, "Kernel contract").

On CPU through Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py), compiled on a CUDA GPU
when there is one. The interpreter runs a scan's combine once per element, so the shapes are small;
they are odd on purpose: T not a multiple of the block or of P, d_inner not a multiple of the
program's channel block, N = 5, groups with padded lanes, masks that leave a row empty, initial
states with a non-zero phase and an h that differs from its delay line's first entry. Every tensor
the kernels allocate is pre-filled with NaN, so an element a kernel forgets to write shows up.
"""

import pytest
import torch

pytest.importorskip("triton")

from helpers import SEQ_INPUTS as SEQ  # noqa: E402
from helpers import KERNEL_DEVICE as DEVICE  # noqa: E402
from helpers import KERNEL_MECHANISMS as MECHANISMS  # noqa: E402
from helpers import compare_to_reference, kernel_inputs, nan_prefill, random_state, rel_rms  # noqa: E402
from mixcon.ops.conba import ConbaState, conba_scan  # noqa: E402
from mixcon.ops.conba import chunk as ck  # noqa: E402



@pytest.fixture(autouse=True)
def _nan_prefilled_outputs(monkeypatch):
    nan_prefill(monkeypatch, ck)
    # carries saved every 8 steps: with blocks of 2 or 4 the backward recomputes segments of several
    # blocks, the last one partial; with blocks of 16 or 64, one block per segment
    monkeypatch.setattr(ck, "CHECKPOINT_INTERVAL", 8)
    yield


def _inputs(mech, T=21, d=16, **kw):
    return kernel_inputs(mech, T=T, d=d, **kw)


def _init_state(x, P, seed=0):
    return random_state(x, P, seed)


def _ref(P):
    return lambda x, st: conba_scan(**x, initial_state=st, return_final_state=True, backend="ref", control_period=P)


def _chunk(P, bt=None, bt_b=None):
    return lambda x, st: ck.conba_scan_chunk(**x, initial_state=st, return_final_state=True, control_period=P,
                                             block_t=bt, bwd_block_t=bt_b)


def _compare(x, tol, P, init=None, bt=None, grad=True, bt_b=None):
    """The chunk kernel against the reference (helpers.compare_to_reference: float64 oracle in fp32)."""
    compare_to_reference(x, tol, _chunk(P, bt, bt_b), _ref(P), init, grad)


# ---------------------------------------------------------------------------------- forward and backward
@pytest.mark.parametrize("mech", MECHANISMS)
def test_each_mechanism_P4_every_gradient(mech):
    """P = 4, blocks of 4 (one instant per block, anywhere in it: masks and the initial phase move it)."""
    x = _inputs(mech, T=13)
    _compare(x, 1e-5, 4, init=_init_state(x, 4), bt=4)


@pytest.mark.parametrize("tau,G,d,T", [(1, 8, 16, 14), (3, 4, 20, 11), (4, 6, 12, 8)])
def test_delay_lengths_odd_groups(tau, G, d, T):
    """Companion states of order 1, 3, 4; d = 20 with G = 4: five groups, two per program, the last
    program half empty; G = 6: padded lanes. Blocks of 2 (an instant every other block at P = 4)."""
    x = _inputs("all", b=2 if tau < 3 else 1, T=T, d=d, G=G, tau=tau, n=5 if tau < 4 else 3)
    _compare(x, 1e-5, 4, init=_init_state(x, 4), bt=2)


def test_P64_blocks_shorter_than_the_period():
    """P = 64 with blocks of 16: the instant falls inside a block; T is no multiple of either."""
    x = _inputs("all", b=2, T=80, d=8)
    _compare(x, 1e-5, 64, init=_init_state(x, 64), bt=16)


def test_P64_one_block_per_period(monkeypatch):
    """One block per period (BT = P = 64), no mask, empty initial state, so each instant is a block's
    last step (the ALIGNED kernels, without the second column); two periods, so the second block
    starts with a held signal."""
    seen, launch = [], ck.chunk_conba_fwd
    monkeypatch.setattr(ck, "chunk_conba_fwd", lambda cfg, *a, **k: seen.append(cfg.aligned) or launch(cfg, *a, **k))
    x = _inputs("control", b=1, T=128, d=8, mask=False)
    x["alpha"] = torch.sigmoid(torch.randn(1, 128, 1, generator=torch.Generator().manual_seed(9)) + 2).to(DEVICE)
    _compare(x, 1e-5, 64, bt=64)
    assert seen == [True]


@pytest.mark.parametrize("bt,bt_b", [(8, 2), (4, 8)])
def test_backward_blocks_of_their_own(bt, bt_b):
    """The backward's blocks shorter (and longer) than the forward's: it recomputes from the same saved
    carries with its own clock. P = 16 over 66 steps (four instants), every mechanism, a padded row and
    an initial state mid-period."""
    x = _inputs("all", b=2, T=66, d=8)
    _compare(x, 1e-5, 16, init=_init_state(x, 16), bt=bt, bt_b=bt_b)


def test_backward_block_size_rules(monkeypatch):
    monkeypatch.setattr(ck, "TUNING", dict(ck.TUNING, bwd_block_t=None))
    assert ck.bwd_block_size(4096, 64, True, 16) == 16  # None: the forward's
    monkeypatch.setattr(ck, "TUNING", dict(ck.TUNING, bwd_block_t=4))
    assert ck.bwd_block_size(4096, 64, True, 16) == 4
    assert ck.bwd_block_size(4096, 2, True, 2) == 2  # at most P with control on
    assert ck.bwd_block_size(3, 64, True, 4) == 4  # no longer than T needs (the minimum, 2, aside)
    monkeypatch.setattr(ck, "TUNING", dict(ck.TUNING, bwd_block_t=64))
    assert ck.bwd_block_size(4096, 64, True, 4) == 8  # at most the steps between carries (8 here)
    assert ck.bwd_block_size(4096, 64, True, 16) == 16  # (one 16-step block per carry)
    x = _inputs("control", b=1, T=6, d=8, mask=False)
    for bad in (3, 32):
        with pytest.raises(ValueError, match="bwd_block_t"):
            ck.conba_scan_chunk(**x, control_period=16, block_t=4, bwd_block_t=bad)


def test_bf16_inputs():
    """The kernel and the reference both read bf16 and accumulate in float32; outputs and gradients
    are rounded to bf16, hence the tolerance."""
    x = _inputs("all", dtype=torch.bfloat16, T=12)
    _compare(x, 1e-2, 4, init=_init_state(x, 4), bt=4)


def test_no_mask_empty_state_and_an_empty_row():
    x = _inputs("all", T=11, mask=False)
    _compare(x, 1e-5, 4)  # k0 is a leaf here: its gradient comes through the initial gain
    x = _inputs("all", b=3, T=9)
    x["mask"][2] = 0  # a row with no real step: everything passes through
    _compare(x, 1e-5, 4, init=_init_state(x, 4))


def test_no_grad_forward_and_split_scan_mid_period():
    """The forward without saving carries; a split in the middle of a period with the state passed on
    equals one scan (noise off: it is keyed by the time index inside one call)."""
    x = _inputs("all", T=15)
    x["sigma_w"] = x["sigma_v"] = 0.0
    _compare(x, 1e-5, 4, init=_init_state(x, 4), grad=False)
    with torch.no_grad():
        y, fin = ck.conba_scan_chunk(**x, return_final_state=True, control_period=4)
        first = {k: (v[:, :6] if k in SEQ else v) for k, v in x.items()}
        second = {k: (v[:, 6:] if k in SEQ else v) for k, v in x.items()}
        y1, s1 = ck.conba_scan_chunk(**first, return_final_state=True, control_period=4)
        y2, s2 = ck.conba_scan_chunk(**second, initial_state=s1, return_final_state=True, control_period=4)
    assert (s1.phase != 0).any()
    assert rel_rms(torch.cat([y1, y2], 1), y) <= 1e-5
    for f, a, b in zip(ConbaState._fields, s2, fin):
        assert torch.equal(a, b) if not b.is_floating_point() else (rel_rms(a, b) <= 1e-5), f


def test_dispatch_triton_backend(monkeypatch):
    """backend="triton": the chunk scan for P > 1 (control on or off), the per-step kernels for P = 1."""
    from mixcon.ops.conba import fused_recurrent as fr

    calls = []
    real_chunk, real_step = ck.conba_scan_chunk, fr.conba_scan_fused_recurrent
    monkeypatch.setattr(ck, "conba_scan_chunk", lambda *a, **k: calls.append("chunk") or real_chunk(*a, **k))
    monkeypatch.setattr(fr, "conba_scan_fused_recurrent", lambda *a, **k: calls.append("step") or real_step(*a, **k))
    x = _inputs("control", b=1, T=3, d=8, mask=False)
    off = {k: v for k, v in x.items() if k not in ("k0", "eta", "lam", "w_r", "k_max")}
    with torch.no_grad():
        conba_scan(**x, backend="triton", control_period=4)
        conba_scan(**off, backend="triton", control_period=4)
        conba_scan(**x, backend="triton", control_period=1)
    assert calls == ["chunk", "chunk", "step"]
    with pytest.raises(ValueError, match="block_t"):
        ck.conba_scan_chunk(**x, control_period=4, block_t=8)


@pytest.mark.gpu
def test_gpu_realistic_shape_bf16():
    x = _inputs("all", b=2, T=300, d=512, n=16, dtype=torch.bfloat16)
    _compare(x, 1e-2, 64, init=_init_state(x, 64))


_AOT = """
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mixcon.ops.conba import chunk as ck
from mixcon.ops.conba import chunk_bwd, chunk_fwd

which = sys.argv[1]
flags = dict(G=8, GP=8, BG=1, NP=16, BT=ck.TUNING["block_t"], MS=2, TAU=2, CONTROL=True, HAS_ALPHA=True,
             HAS_BIAS=True, SOFTPLUS=True, HAS_D=True, HAS_Z=True, HAS_MASK=True, NOISE_W=True, NOISE_V=True,
             FIX_H=True, SEG=4, ALIGNED=False, **({"SAVE": True} if which == "fwd" else {"HAS_GFINAL": True}))
fn = chunk_fwd._chunk_fwd_kernel if which == "fwd" else chunk_bwd._chunk_bwd_kernel
bf16 = {"u_ptr", "dt_ptr", "z_ptr", "B_ptr", "C_ptr", "al_ptr", "y_ptr", "gy_ptr", "gu_ptr", "gdt_ptr", "gz_ptr",
        "gal_ptr"}
ints = {"m_ptr": "*i8", "ph_ptr": "*i32", "t1_ptr": "*i32"}


def ty(name):
    if name.endswith("_ptr"):
        return ints.get(name, "*bf16" if name in bf16 else "*fp32")
    return "fp32" if name in ("k_max", "sigma_w", "sigma_v") else "i32"


sig = {}
for name in inspect.signature(fn.fn).parameters:
    if name in flags:
        sig[name] = "constexpr"
    elif name in chunk_fwd.ARG_GROUPS:  # a grouped argument: a tuple of its members' types
        sig[name] = tuple(ty(m) for m in chunk_fwd.ARG_GROUPS[name])
    else:
        sig[name] = ty(name)
k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=flags), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=ck.TUNING["num_warps"]))
assert k.asm.get("cubin")
print("compiled", which)
"""


@pytest.mark.slow
@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_compiles_for_an_h100_ahead_of_time(which):
    """Triton's compiler for sm_90, no GPU needed (a process without the interpreter): the interpreter
    accepts code the compiler refuses — a loop variable reused with another type once passed the
    interpreter tests. Every mechanism on, τ = 2, the default block. ~10-40 s of CPU each."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _AOT, which], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


def test_launcher_forms_no_noise(monkeypatch):
    """With training noise the chunk launcher passes the seed's key and the kernels hash ξ and ζ
    themselves, forward and backward (regenerated there): no noise is drawn in PyTorch, and no tensor
    larger than the same scan forms without noise."""
    from helpers import launcher_forms_no_noise

    launcher_forms_no_noise(monkeypatch, lambda xs: ck.conba_scan_chunk(**xs, control_period=4), _inputs("all"))
