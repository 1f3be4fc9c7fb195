"""Triton helpers shared by the Conba kernels (`fused_recurrent.py`, `chunk_fwd.py`, `chunk_bwd.py`): the
noise hash and normal draw, tanh and softplus on exact-path formulas (no libdevice, so the interpreter runs
the same code on CPU). The host side both scans share is `host.py`.
"""

from __future__ import annotations

import triton
import triton.language as tl


# ---------------------------------------------------------------------------------- Triton helpers
@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _normal(key, lane):
    """Standard normal from a uint32 key and lane: the arithmetic of noise.normal_from_key."""
    h1 = _mix32(lane ^ key)
    h2 = _mix32(h1 ^ 0x68E31DA4)
    u1 = ((h1 >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    u2 = (h2 >> 8).to(tl.float32) * 5.9604644775390625e-08
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit
def _tanh(x):
    """tanh without libdevice: an odd series near 0 (no cancellation), exp form elsewhere."""
    ax = tl.abs(x)
    e2 = tl.exp(-2.0 * ax)
    big = (1.0 - e2) / (1.0 + e2)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333
                                                            + x2 * (-0.05396825396825397 + x2 * 0.021869488536155203))))
    r = tl.where(ax < 0.25, small, big)
    return tl.where(x < 0, -r, r)


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20) with Kahan's accurate log1p."""
    ex = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + ex
    dw = w - 1.0
    lp = tl.where(dw == 0.0, ex, tl.log(w) * (ex / tl.where(dw == 0.0, 1.0, dw)))
    return tl.where(x > 20.0, x, lp)
