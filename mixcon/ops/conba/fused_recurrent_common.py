"""Triton helpers of the per-step Conba kernels (`fused_recurrent.py`: the P = 1 scan, its backward and the
decode step): a program's tile, one step's inputs, the parameters, the state's loads and stores, and
`_fwd_step`, one step of docs/conba.md (6) on a [N, groups, G] tile.
"""

import triton
import triton.language as tl

from .common import _mix32, _normal, _softplus, _tanh


# ---------------------------------------------------------------------------------- helpers
@triton.jit
def _dlast(D0, D1, D2, D3, TAU: tl.constexpr):
    """The delay line's last entry, h_{t−τ}."""
    if TAU == 1:
        r = D0
    elif TAU == 2:
        r = D1
    elif TAU == 3:
        r = D2
    else:
        r = D3
    return r


@triton.jit
def _load_step(u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, al_ptr, m_ptr, t, T,
               s_u_t, s_dt_t, s_z_t, s_B_t, s_C_t, s_al_t,
               ch, cmask, offs_n, nmask, offs_g, gmask,
               HAS_Z: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_MASK: tl.constexpr):
    """Inputs of step t (pointers already offset to this batch row); zeros past the end."""
    # "t < T" is evaluated per lane (a scalar-and-block mask trips Triton's interpreter)
    cok = cmask & ((ch * 0 + t) < T)
    nok = nmask & ((offs_n * 0 + t) < T)
    u = tl.load(u_ptr + t * s_u_t + ch, mask=cok, other=0.0).to(tl.float32)
    dt_in = tl.load(dt_ptr + t * s_dt_t + ch, mask=cok, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + t * s_B_t + offs_n, mask=nok, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + t * s_C_t + offs_n, mask=nok, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + t * s_z_t + ch, mask=cok, other=0.0).to(tl.float32)
    else:
        z = u
    if HAS_ALPHA:
        a = tl.load(al_ptr + t * s_al_t + offs_g, mask=gmask & ((offs_g * 0 + t) < T), other=1.0).to(tl.float32)
    else:
        a = tl.full(offs_g.shape, 1.0, tl.float32)
    # the step's "real token" flag, broadcast over the channel tile
    if HAS_MASK:
        m = tl.load(m_ptr + t + ch * 0, mask=(ch * 0 + t) < T, other=0) != 0
    else:
        m = (ch * 0 + t) < T
    return u, dt_in, z, Bv, Cv, a, m


@triton.jit
def _tile(pid_b, pid_g, N, NG, seed_key, G: tl.constexpr, GP: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr):
    """Indices and masks of one program's tile: groups [pid_g·BG, +BG) of batch row pid_b.
    Channels are ``ch`` [BG, GP]; the state tile [NP, BG, GP] indexes (d, N) through ``sidx``."""
    offs_n = tl.arange(0, NP)
    offs_g = pid_g * BG + tl.arange(0, BG)
    offs_j = tl.arange(0, GP)
    nmask = offs_n < N
    gmask = offs_g < NG
    cmask = gmask[:, None] & (offs_j[None, :] < G)
    ch = offs_g[:, None] * G + offs_j[None, :]
    smask = nmask[:, None, None] & cmask[None, :, :]
    sidx = ch[None, :, :] * N + offs_n[:, None, None]
    lane_w = (ch[None, :, :] * (N + 1) + offs_n[:, None, None]).to(tl.uint32)  # noise lanes, see noise.py
    lane_v = (ch * (N + 1) + N).to(tl.uint32)
    kb = _mix32(seed_key.to(tl.uint32, bitcast=True) ^ pid_b.to(tl.uint32))
    return offs_n, offs_g, nmask, gmask, cmask, ch, smask, sidx, lane_w, lane_v, kb


@triton.jit
def _load_line(base, sd, sidx, smask, TAU: tl.constexpr, NP: tl.constexpr, BG: tl.constexpr, GP: tl.constexpr):
    """The delay line's τ entries (zeros beyond τ) from a (τ, d, N) slab at ``base``."""
    D0 = tl.zeros([NP, BG, GP], tl.float32)
    D1 = tl.zeros([NP, BG, GP], tl.float32)
    D2 = tl.zeros([NP, BG, GP], tl.float32)
    D3 = tl.zeros([NP, BG, GP], tl.float32)
    if TAU > 0:
        D0 = tl.load(base + sidx, mask=smask, other=0.0)
    if TAU > 1:
        D1 = tl.load(base + sd + sidx, mask=smask, other=0.0)
    if TAU > 2:
        D2 = tl.load(base + 2 * sd + sidx, mask=smask, other=0.0)
    if TAU > 3:
        D3 = tl.load(base + 3 * sd + sidx, mask=smask, other=0.0)
    return D0, D1, D2, D3


@triton.jit
def _store_line(base, sd, sidx, smask, D0, D1, D2, D3, TAU: tl.constexpr):
    """Store the delay line's τ entries to a (τ, d, N) slab at ``base``."""
    if TAU > 0:
        tl.store(base + sidx, D0, mask=smask)
    if TAU > 1:
        tl.store(base + sd + sidx, D1, mask=smask)
    if TAU > 2:
        tl.store(base + 2 * sd + sidx, D2, mask=smask)
    if TAU > 3:
        tl.store(base + 3 * sd + sidx, D3, mask=smask)


@triton.jit
def _load_state(h_ptr, line_ptr, k_ptr, e_ptr, row, sd, NG, d, sidx, smask, offs_g, gmask, ch, cmask,
                TAU: tl.constexpr, CONTROL: tl.constexpr, NP: tl.constexpr, BG: tl.constexpr, GP: tl.constexpr):
    """Row ``row`` of a state stored as h (rows, d, N), delay line (rows, τ, d, N), k (rows, ng) and
    e (rows, d) — a ConbaState, a checkpoint or a state gradient; k and e are 0 without control."""
    h = tl.load(h_ptr + row * sd + sidx, mask=smask, other=0.0)
    D0, D1, D2, D3 = _load_line(line_ptr + row * TAU * sd, sd, sidx, smask, TAU, NP, BG, GP)
    k = tl.zeros([BG], tl.float32)
    e = tl.zeros([BG, GP], tl.float32)
    if CONTROL:
        k = tl.load(k_ptr + row * NG + offs_g, mask=gmask, other=0.0)
        e = tl.load(e_ptr + row * d + ch, mask=cmask, other=0.0)
    return h, D0, D1, D2, D3, k, e


@triton.jit
def _store_state(h_ptr, line_ptr, k_ptr, e_ptr, row, sd, NG, d, h, D0, D1, D2, D3, k, e,
                 sidx, smask, offs_g, gmask, ch, cmask, TAU: tl.constexpr, CONTROL: tl.constexpr):
    """Store a state in the layout `_load_state` reads."""
    tl.store(h_ptr + row * sd + sidx, h, mask=smask)
    _store_line(line_ptr + row * TAU * sd, sd, sidx, smask, D0, D1, D2, D3, TAU)
    if CONTROL:
        tl.store(k_ptr + row * NG + offs_g, k, mask=gmask)
        tl.store(e_ptr + row * d + ch, e, mask=cmask)


@triton.jit
def _load_params(A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr, sidx, smask, ch, cmask, offs_g, gmask,
                 BG: tl.constexpr, GP: tl.constexpr, TAU: tl.constexpr, CONTROL: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr):
    """The per-channel and per-group parameters of this program's channels (zeros when absent)."""
    A = tl.load(A_ptr + sidx, mask=smask, other=0.0).to(tl.float32)
    bias = tl.zeros([BG, GP], tl.float32)
    Dp = tl.zeros([BG, GP], tl.float32)
    wr = tl.zeros([BG, GP], tl.float32)
    rho = tl.zeros([BG], tl.float32)
    eta = tl.zeros([BG], tl.float32)
    lam = tl.zeros([BG], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    if HAS_D:
        Dp = tl.load(D_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    if TAU > 0:
        rho = tl.load(rho_ptr + offs_g, mask=gmask, other=0.0).to(tl.float32)
    if CONTROL:
        wr = tl.load(wr_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
        eta = tl.load(eta_ptr + offs_g, mask=gmask, other=0.0).to(tl.float32)
        lam = tl.load(lam_ptr + offs_g, mask=gmask, other=0.0).to(tl.float32)
    return A, bias, Dp, wr, rho, eta, lam


@triton.jit
def _fwd_step(h, D0, D1, D2, D3, k, e,
              u, dt_in, z, Bv, Cv, a, m, ctl,
              A, bias, Dp, wr, rho, eta, lam, k_max, sigma_w, sigma_v, key, lane_w, lane_v, smask, cmask,
              G: tl.constexpr, TAU: tl.constexpr, CONTROL: tl.constexpr, HAS_ALPHA: tl.constexpr,
              HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
              NOISE_W: tl.constexpr, NOISE_V: tl.constexpr):
    """One step of docs/conba.md (6) on a [N, groups, G] tile. Returns the gated output and the
    state after the step (unchanged, output 0, where m is false). ``ctl``: where the controller
    samples (k and e updated) — ``m`` itself for the per-step controller (P = 1), the real steps
    that close a period for the decode step at P > 1."""
    if HAS_BIAS:
        dt_in = dt_in + bias
    if SOFTPLUS:
        dt = _softplus(dt_in)
    else:
        dt = dt_in
    dA = tl.exp(dt[None, :, :] * A)
    if CONTROL:
        ut = u - k[:, None] * _tanh(e)
    else:
        ut = u
    hp = dA * h
    if TAU > 0:
        r3 = rho[None, :, None]
        hp = (1.0 - r3) * hp + r3 * _dlast(D0, D1, D2, D3, TAU)
    if HAS_ALPHA:
        hp = a[None, :, None] * hp
    hn = hp + (dt * ut)[None, :, :] * Bv[:, None, None]
    if NOISE_W:
        hn = hn + tl.where(smask, sigma_w * _normal(key, lane_w), 0.0)
    y = tl.sum(hn * Cv[:, None, None], axis=0)
    if HAS_D:
        y = y + Dp * u
    if NOISE_V:
        y = y + tl.where(cmask, sigma_v * _normal(key, lane_v), 0.0)
    if CONTROL:
        en = tl.where(cmask, y - wr * u, 0.0)
        rr = tl.sqrt(tl.sum(en * en, axis=1) + 1e-12) / tl.sqrt(G * 1.0)
        kn = tl.minimum(tl.maximum((1.0 - lam) * k + eta * rr, 0.0), k_max)
        k = tl.where(tl.max(ctl.to(tl.int32), axis=1) != 0, kn, k)
        e = tl.where(ctl, en, e)
    if HAS_Z:
        y = y * (z * tl.sigmoid(z))
    y = tl.where(m, y, 0.0)
    if TAU > 3:
        D3 = tl.where(m[None, :, :], D2, D3)
    if TAU > 2:
        D2 = tl.where(m[None, :, :], D1, D2)
    if TAU > 1:
        D1 = tl.where(m[None, :, :], D0, D1)
    if TAU > 0:
        D0 = tl.where(m[None, :, :], hn, D0)
    h = tl.where(m[None, :, :], hn, h)
    return y, h, D0, D1, D2, D3, k, e
