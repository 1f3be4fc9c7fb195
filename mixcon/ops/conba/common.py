"""Helpers shared by the Conba Triton kernels (`fused_recurrent.py`, `chunk.py`): the noise hash and
normal draw, tanh and softplus on exact-path formulas (no libdevice, so the interpreter runs the same
code on CPU), and the host-side argument helpers (the per-seed noise key, unit-stride rows, strides).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .noise import M32, SEED_SALT


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


# ---------------------------------------------------------------------------------- Python side
def _mix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x


def _seed_key(seed: int) -> int:
    """noise.step_key's per-seed part, as a signed int32 kernel argument (the kernel bitcasts it)."""
    s = _mix32_int((int(seed) ^ SEED_SALT) & M32)
    return s - (1 << 32) if s >= (1 << 31) else s


def _rows(x):
    """x with a unit stride on its last dim (strides of the leading dims are passed to the kernel)."""
    if x is None:
        return None
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(*xs):
    out = []
    for x in xs:
        out += [x.stride(0), x.stride(1)] if x is not None else [0, 0]
    return out


# The groups of arguments both scan kernel files pass the same way (tuples; Triton unpacks them at compile
# time, so a group costs nothing at run time): the names of their members in the kernels, in order.
SHARED_GROUPS = {
    "ins": ("u_ptr", "dl_ptr", "z_ptr", "B_ptr", "C_ptr", "al_ptr", "m_ptr"),  # per-token inputs
    "prm": ("A_ptr", "bias_ptr", "D_ptr", "wr_ptr", "rho_ptr", "eta_ptr", "lam_ptr"),  # ConbaParams' tensors
    "strides": ("s_u_b", "s_u_t", "s_dl_b", "s_dl_t", "s_z_b", "s_z_t", "s_B_b", "s_B_t", "s_C_b", "s_C_t",
                "s_al_b", "s_al_t"),
    "scalars": ("k_max", "sigma_w", "sigma_v", "seed_key"),
}


def _groups(cfg, u, delta, z, B, C, alpha, mask, A, delta_bias, D, w_r, rho, eta, lam, dummy):
    """The shared groups a scan kernel takes: ins, prm, strides, scalars (absent optional inputs: ``dummy``)."""
    o = lambda x: x if x is not None else dummy  # noqa: E731
    return ((u, delta, o(z), B, C, o(alpha), o(mask)), (A, o(delta_bias), o(D), o(w_r), o(rho), o(eta), o(lam)),
            tuple(_strides(u, delta, z, B, C, alpha)),
            (float(cfg.k_max), float(cfg.sigma_w), float(cfg.sigma_v), _seed_key(cfg.seed)))
