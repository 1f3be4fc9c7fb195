"""Fused Conba kernels in Triton: prefill scan, its backward, and the decode step.

The recurrence of docs/conba.md (step 6) feeds the output back into the next step's input,
so it is not associative and cannot use Mamba's parallel scan. These kernels run it
sequentially in time and in parallel over (batch, block of control groups): a control group's
channels share their gain, and groups never talk to each other, so one program owns whole
groups and needs no communication but a sum over the group for the gain update.

Layout inside a program: the state is a register tile ``[N, groups, G]`` (state index first),
one warp per 32 channels (8 channels per one-warp program at small batch, see `_channels`: a step
is a latency-bound chain, and more programs per SM measured faster on an H100). The delay line (τ ≤ 4) lives in registers (``D0..D3``), the gain per
group, the error per channel. The next step's inputs are loaded before the current step's
arithmetic, so their latency overlaps the dependency chain.

Backward: the forward stores the full state every ``CHUNK`` steps. The backward walks the
chunks from last to first; for each it recomputes the chunk's forward from its checkpoint,
writing the pre-step states (h, the delay line's last entry, k, e) to a per-program scratch,
then runs the reverse-time adjoint over the chunk. Noise is regenerated from its counter-based
key (noise.py), never stored. Per-(batch, time) gradients of B and C and the per-parameter
gradients are written as per-program partials and summed afterwards (deterministic, no atomics).

Numerics: every recurrence quantity is float32 whatever the input dtype; tanh, softplus and its
log1p are written with exact-path formulas (no libdevice), so the same code runs in Triton's
interpreter on CPU, where the tests check it against the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import SHARED_GROUPS, _groups, _mix32, _normal, _rows, _seed_key, _softplus, _tanh
from .naive import ConbaState
from .params import ConbaParams, keyword_interface

DEFAULT_CHUNK = 64


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
def _load_step(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, al_ptr, m_ptr, t, T,
               s_u_t, s_dl_t, s_z_t, s_B_t, s_C_t, s_al_t,
               ch, cmask, offs_n, nmask, offs_g, gmask,
               HAS_Z: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_MASK: tl.constexpr):
    """Inputs of step t (pointers already offset to this batch row); zeros past the end."""
    # "t < T" is evaluated per lane (a scalar-and-block mask trips Triton's interpreter)
    cok = cmask & ((ch * 0 + t) < T)
    nok = nmask & ((offs_n * 0 + t) < T)
    u = tl.load(u_ptr + t * s_u_t + ch, mask=cok, other=0.0).to(tl.float32)
    dl = tl.load(dl_ptr + t * s_dl_t + ch, mask=cok, other=0.0).to(tl.float32)
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
    return u, dl, z, Bv, Cv, a, m


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
              u, dl, z, Bv, Cv, a, m, ctl,
              A, bias, Dp, wr, rho, eta, lam, k_max, sigma_w, sigma_v, key, lane_w, lane_v, smask, cmask,
              G: tl.constexpr, TAU: tl.constexpr, CONTROL: tl.constexpr, HAS_ALPHA: tl.constexpr,
              HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
              NOISE_W: tl.constexpr, NOISE_V: tl.constexpr):
    """One step of docs/conba.md (6) on a [N, groups, G] tile. Returns the gated output and the
    state after the step (unchanged, output 0, where m is false). ``ctl``: where the controller
    samples (k and e updated) — ``m`` itself for the per-step controller (P = 1), the real steps
    that close a period for the decode step at P > 1."""
    if HAS_BIAS:
        dl = dl + bias
    if SOFTPLUS:
        dt = _softplus(dl)
    else:
        dt = dl
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


# ---------------------------------------------------------------------------------- forward
@triton.jit
def _conba_fwd_kernel(
    ins, prm, strides, scalars, dims, carries,  # grouped as in the backward (ARG_GROUPS)
    state0,  # initial state (b, d, N), (b, τ, d, N), (b, ng), (b, d)
    y_ptr,
    stateT,  # final state, same shapes
    G: tl.constexpr, GP: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr, CHUNK: tl.constexpr,
    TAU: tl.constexpr, CONTROL: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr,
    NOISE_W: tl.constexpr, NOISE_V: tl.constexpr, SAVE: tl.constexpr,
):
    u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, al_ptr, m_ptr = ins
    A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr = prm
    s_u_b, s_u_t, s_dl_b, s_dl_t, s_z_b, s_z_t, s_B_b, s_B_t, s_C_b, s_C_t, s_al_b, s_al_t = strides
    k_max, sigma_w, sigma_v, seed_key = scalars
    T, d, NG, N, n_chunks = dims
    ck_h_ptr, ck_dl_ptr, ck_k_ptr, ck_e_ptr = carries
    h0_ptr, dl0_ptr, k0_ptr, e0_ptr = state0
    hT_ptr, dlT_ptr, kT_ptr, eT_ptr = stateT
    pid_b = tl.program_id(0).to(tl.int64)  # batch offsets (b·T·d, checkpoints) can pass 2^31
    pid_g = tl.program_id(1)
    offs_n, offs_g, nmask, gmask, cmask, ch, smask, sidx, lane_w, lane_v, kb = _tile(
        pid_b, pid_g, N, NG, seed_key, G, GP, BG, NP)

    A, bias, Dp, wr, rho, eta, lam = _load_params(
        A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr, sidx, smask, ch, cmask, offs_g, gmask,
        BG, GP, TAU, CONTROL, HAS_BIAS, HAS_D)

    sd = d * N
    h, D0, D1, D2, D3, k, e = _load_state(h0_ptr, dl0_ptr, k0_ptr, e0_ptr, pid_b, sd, NG, d, sidx, smask,
                                          offs_g, gmask, ch, cmask, TAU, CONTROL, NP, BG, GP)

    u_b = u_ptr + pid_b * s_u_b
    dl_b = dl_ptr + pid_b * s_dl_b
    z_b = z_ptr + pid_b * s_z_b
    B_b = B_ptr + pid_b * s_B_b
    C_b = C_ptr + pid_b * s_C_b
    al_b = al_ptr + pid_b * s_al_b
    m_b = m_ptr + pid_b * T
    y_b = y_ptr + pid_b * s_u_b  # y is allocated like a contiguous u

    # prefetch step 0
    u, dl, z, Bv, Cv, a, m = _load_step(u_b, dl_b, z_b, B_b, C_b, al_b, m_b, 0, T,
                                        s_u_t, s_dl_t, s_z_t, s_B_t, s_C_t, s_al_t,
                                        ch, cmask, offs_n, nmask, offs_g, gmask, HAS_Z, HAS_ALPHA, HAS_MASK)
    for t in range(0, T):
        if SAVE:
            is_ck = (t % CHUNK) == 0
            _store_state(ck_h_ptr, ck_dl_ptr, ck_k_ptr, ck_e_ptr, pid_b * n_chunks + t // CHUNK, sd, NG, d,
                         h, D0, D1, D2, D3, k, e, sidx, smask & is_ck, offs_g, gmask & is_ck, ch, cmask & is_ck,
                         TAU, CONTROL)
        # issue the next step's loads before this step's dependency chain
        u_n, dl_n, z_n, B_n, C_n, a_n, m_n = _load_step(u_b, dl_b, z_b, B_b, C_b, al_b, m_b, t + 1, T,
                                                        s_u_t, s_dl_t, s_z_t, s_B_t, s_C_t, s_al_t,
                                                        ch, cmask, offs_n, nmask, offs_g, gmask,
                                                        HAS_Z, HAS_ALPHA, HAS_MASK)
        key = _mix32(kb ^ tl.cast(t, tl.uint32))
        y, h, D0, D1, D2, D3, k, e = _fwd_step(
            h, D0, D1, D2, D3, k, e, u, dl, z, Bv, Cv, a, m, m,
            A, bias, Dp, wr, rho, eta, lam, k_max, sigma_w, sigma_v, key, lane_w, lane_v, smask, cmask,
            G, TAU, CONTROL, HAS_ALPHA, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z, NOISE_W, NOISE_V)
        tl.store(y_b + t * s_u_t + ch, y.to(y_ptr.dtype.element_ty), mask=cmask)
        u, dl, z, Bv, Cv, a, m = u_n, dl_n, z_n, B_n, C_n, a_n, m_n

    _store_state(hT_ptr, dlT_ptr, kT_ptr, eT_ptr, pid_b, sd, NG, d, h, D0, D1, D2, D3, k, e,
                 sidx, smask, offs_g, gmask, ch, cmask, TAU, CONTROL)


# ---------------------------------------------------------------------------------- backward
@triton.jit
def _conba_bwd_kernel(
    ins, prm, strides, scalars, dims, carries,  # the forward's groups (ARG_GROUPS)
    gy_ptr, n_blocks,
    gstateT,  # gradients of the final state (fp32)
    scratch,  # (b, CHUNK, ...) of pre-step states
    gins,  # per-step gradients (u, Δ, z, α), contiguous like their inputs
    gBC,  # partials (b, T, n_blocks, N) fp32
    gprm,  # partials of prm's members: (b, d, N), (b, d) × 3, (b, ng) × 3, fp32
    gstate0,  # gradients of the initial state (fp32)
    G: tl.constexpr, GP: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr, CHUNK: tl.constexpr,
    TAU: tl.constexpr, CONTROL: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr,
    NOISE_W: tl.constexpr, NOISE_V: tl.constexpr, HAS_GFINAL: tl.constexpr,
):
    u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, al_ptr, m_ptr = ins
    A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr = prm
    s_u_b, s_u_t, s_dl_b, s_dl_t, s_z_b, s_z_t, s_B_b, s_B_t, s_C_b, s_C_t, s_al_b, s_al_t = strides
    k_max, sigma_w, sigma_v, seed_key = scalars
    T, d, NG, N, n_chunks = dims
    ck_h_ptr, ck_dl_ptr, ck_k_ptr, ck_e_ptr = carries
    ghT_ptr, gdlT_ptr, gkT_ptr, geT_ptr = gstateT
    sc_h_ptr, sc_d_ptr, sc_k_ptr, sc_e_ptr = scratch
    gu_ptr, gdl_ptr, gz_ptr, gal_ptr = gins
    gB_ptr, gC_ptr = gBC
    gA_ptr, gbias_ptr, gD_ptr, gwr_ptr, grho_ptr, geta_ptr, glam_ptr = gprm
    gh0_ptr, gdl0_ptr, gk0_ptr, ge0_ptr = gstate0
    pid_b = tl.program_id(0).to(tl.int64)  # batch offsets (b·T·d, checkpoints) can pass 2^31
    pid_g = tl.program_id(1)
    offs_n, offs_g, nmask, gmask, cmask, ch, smask, sidx, lane_w, lane_v, kb = _tile(
        pid_b, pid_g, N, NG, seed_key, G, GP, BG, NP)
    sd = d * N

    A, bias, Dp, wr, rho, eta, lam = _load_params(
        A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr, sidx, smask, ch, cmask, offs_g, gmask,
        BG, GP, TAU, CONTROL, HAS_BIAS, HAS_D)

    # adjoints of the state after the current step, seeded by the final state's gradients
    gh = tl.zeros([NP, BG, GP], tl.float32)
    gD0 = tl.zeros([NP, BG, GP], tl.float32)
    gD1 = tl.zeros([NP, BG, GP], tl.float32)
    gD2 = tl.zeros([NP, BG, GP], tl.float32)
    gD3 = tl.zeros([NP, BG, GP], tl.float32)
    gk = tl.zeros([BG], tl.float32)
    ge = tl.zeros([BG, GP], tl.float32)
    if HAS_GFINAL:
        gh, gD0, gD1, gD2, gD3, gk, ge = _load_state(ghT_ptr, gdlT_ptr, gkT_ptr, geT_ptr, pid_b, sd, NG, d, sidx,
                                                     smask, offs_g, gmask, ch, cmask, TAU, CONTROL, NP, BG, GP)
    # parameter accumulators
    gA = tl.zeros([NP, BG, GP], tl.float32)
    gbias = tl.zeros([BG, GP], tl.float32)
    gDp = tl.zeros([BG, GP], tl.float32)
    gwr = tl.zeros([BG, GP], tl.float32)
    grho = tl.zeros([BG], tl.float32)
    geta = tl.zeros([BG], tl.float32)
    glam = tl.zeros([BG], tl.float32)

    u_b = u_ptr + pid_b * s_u_b
    dl_b = dl_ptr + pid_b * s_dl_b
    z_b = z_ptr + pid_b * s_z_b
    B_b = B_ptr + pid_b * s_B_b
    C_b = C_ptr + pid_b * s_C_b
    al_b = al_ptr + pid_b * s_al_b
    m_b = m_ptr + pid_b * T
    sc_h = sc_h_ptr + pid_b * CHUNK * sd
    sc_d = sc_d_ptr + pid_b * CHUNK * sd
    sc_k = sc_k_ptr + pid_b * CHUNK * NG
    sc_e = sc_e_ptr + pid_b * CHUNK * d

    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t0 = c * CHUNK
        t1 = tl.minimum(t0 + CHUNK, T)
        # --- recompute the chunk's forward from its checkpoint, keeping the pre-step states
        h, D0, D1, D2, D3, k, e = _load_state(ck_h_ptr, ck_dl_ptr, ck_k_ptr, ck_e_ptr, pid_b * n_chunks + c, sd,
                                              NG, d, sidx, smask, offs_g, gmask, ch, cmask, TAU, CONTROL, NP, BG, GP)
        for t in range(t0, t1):
            s = t - t0
            tl.store(sc_h + s * sd + sidx, h, mask=smask)
            if TAU > 0:
                tl.store(sc_d + s * sd + sidx, _dlast(D0, D1, D2, D3, TAU), mask=smask)
            if CONTROL:
                tl.store(sc_k + s * NG + offs_g, k, mask=gmask)
                tl.store(sc_e + s * d + ch, e, mask=cmask)
            u, dl, z, Bv, Cv, a, m = _load_step(u_b, dl_b, z_b, B_b, C_b, al_b, m_b, t, T,
                                                s_u_t, s_dl_t, s_z_t, s_B_t, s_C_t, s_al_t,
                                                ch, cmask, offs_n, nmask, offs_g, gmask,
                                                HAS_Z, HAS_ALPHA, HAS_MASK)
            key = _mix32(kb ^ tl.cast(t, tl.uint32))
            y, h, D0, D1, D2, D3, k, e = _fwd_step(
                h, D0, D1, D2, D3, k, e, u, dl, z, Bv, Cv, a, m, m,
                A, bias, Dp, wr, rho, eta, lam, k_max, sigma_w, sigma_v, key, lane_w, lane_v, smask, cmask,
                G, TAU, CONTROL, HAS_ALPHA, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z, NOISE_W, NOISE_V)
        tl.debug_barrier()
        # --- reverse-time adjoint over the chunk
        for tt in range(0, t1 - t0):
            t = t1 - 1 - tt
            s = t - t0
            hprev = tl.load(sc_h + s * sd + sidx, mask=smask, other=0.0)
            if TAU > 0:
                hdel = tl.load(sc_d + s * sd + sidx, mask=smask, other=0.0)
            else:
                hdel = hprev
            if CONTROL:
                k = tl.load(sc_k + s * NG + offs_g, mask=gmask, other=0.0)
                e = tl.load(sc_e + s * d + ch, mask=cmask, other=0.0)
            u, dl, z, Bv, Cv, a, m = _load_step(u_b, dl_b, z_b, B_b, C_b, al_b, m_b, t, T,
                                                s_u_t, s_dl_t, s_z_t, s_B_t, s_C_t, s_al_t,
                                                ch, cmask, offs_n, nmask, offs_g, gmask,
                                                HAS_Z, HAS_ALPHA, HAS_MASK)
            go = tl.load(gy_ptr + pid_b * s_u_b + t * s_u_t + ch, mask=cmask, other=0.0).to(tl.float32)
            key = _mix32(kb ^ tl.cast(t, tl.uint32))
            # recompute the step's intermediates
            x = dl
            if HAS_BIAS:
                x = dl + bias
            if SOFTPLUS:
                dt = _softplus(x)
            else:
                dt = x
            dA = tl.exp(dt[None, :, :] * A)
            if CONTROL:
                th = _tanh(e)
                ut = u - k[:, None] * th
            else:
                th = e
                ut = u
            if TAU > 0:
                r3 = rho[None, :, None]
                hp = (1.0 - r3) * dA * hprev + r3 * hdel
            else:
                hp = dA * hprev
            a3 = a[None, :, None]
            hn = a3 * hp + (dt * ut)[None, :, :] * Bv[:, None, None]
            if NOISE_W:
                hn = hn + tl.where(smask, sigma_w * _normal(key, lane_w), 0.0)
            y = tl.sum(hn * Cv[:, None, None], axis=0)
            if HAS_D:
                y = y + Dp * u
            if NOISE_V:
                y = y + tl.where(cmask, sigma_v * _normal(key, lane_v), 0.0)
            # output gate
            if HAS_Z:
                sz = tl.sigmoid(z)
                gy = go * (z * sz)
                gz = go * y * (sz * (1.0 + z * (1.0 - sz)))
            else:
                gy = go
                gz = go
            gu = tl.zeros([BG, GP], tl.float32)
            gk_prev = gk
            ge_prev = ge
            if CONTROL:
                en = tl.where(cmask, y - wr * u, 0.0)
                ss = tl.sqrt(tl.sum(en * en, axis=1) + 1e-12)
                rr = ss / tl.sqrt(G * 1.0)
                kk = (1.0 - lam) * k + eta * rr
                gkk = tl.where((kk >= 0.0) & (kk <= k_max), gk, 0.0)
                gk_prev = (1.0 - lam) * gkk
                glam_t = -k * gkk
                geta_t = rr * gkk
                gr = eta * gkk
                ge_tot = ge + (gr / (ss * tl.sqrt(G * 1.0)))[:, None] * en
                gy = gy + ge_tot
                gwr_t = -ge_tot * u
                gu = gu - ge_tot * wr
            gDp_t = gy * u
            if HAS_D:
                gu = gu + gy * Dp
            ghn = gh + gy[None, :, :] * Cv[:, None, None]
            if TAU > 0:
                ghn = ghn + gD0
            gC_t = tl.sum(tl.sum(tl.where(smask & m[None, :, :], gy[None, :, :] * hn, 0.0), axis=2), axis=1)
            gal_t = tl.sum(tl.sum(ghn * hp, axis=2), axis=0)
            ghp = a3 * ghn
            sB = tl.sum(ghn * Bv[:, None, None], axis=0)  # [BG, GP]
            gdt = sB * ut
            gut = sB * dt
            gB_t = tl.sum(tl.sum(tl.where(smask & m[None, :, :], ghn * (dt * ut)[None, :, :], 0.0), axis=2), axis=1)
            gu = gu + gut
            if CONTROL:
                gk_prev = gk_prev - tl.sum(tl.where(cmask, gut * th, 0.0), axis=1)
                ge_prev = -gut * k[:, None] * (1.0 - th * th)
            if TAU > 0:
                r3 = rho[None, :, None]
                gh_prev = (1.0 - r3) * dA * ghp
                gdA = (1.0 - r3) * ghp * hprev
                grho_t = tl.sum(tl.sum(ghp * (hdel - dA * hprev), axis=2), axis=0)
                gdl_new = r3 * ghp
            else:
                gh_prev = dA * ghp
                gdA = ghp * hprev
                grho_t = tl.zeros([BG], tl.float32)
                gdl_new = gh_prev
            gdAe = tl.where(smask, gdA * dA, 0.0)
            gdt = gdt + tl.sum(gdAe * A, axis=0)
            if SOFTPLUS:
                gx = gdt * tl.where(x > 20.0, 1.0, tl.sigmoid(x))
            else:
                gx = gdt
            # a padded step passes every adjoint through and touches no input
            m3 = m[None, :, :]
            mg = tl.max(m.to(tl.int32), axis=1) != 0
            gA = gA + tl.where(m3, gdAe * dt[None, :, :], 0.0)
            gbias = gbias + tl.where(m, gx, 0.0)
            gDp = gDp + tl.where(m, gDp_t, 0.0)
            grho = grho + tl.where(mg, grho_t, 0.0)
            if CONTROL:
                gwr = gwr + tl.where(m, gwr_t, 0.0)
                geta = geta + tl.where(mg, geta_t, 0.0)
                glam = glam + tl.where(mg, glam_t, 0.0)
                gk = tl.where(mg, gk_prev, gk)
                ge = tl.where(m, ge_prev, ge)
            if TAU > 0:
                if TAU == 1:
                    gD0 = tl.where(m3, gdl_new, gD0)
                elif TAU == 2:
                    gD0 = tl.where(m3, gD1, gD0)
                    gD1 = tl.where(m3, gdl_new, gD1)
                elif TAU == 3:
                    gD0 = tl.where(m3, gD1, gD0)
                    gD1 = tl.where(m3, gD2, gD1)
                    gD2 = tl.where(m3, gdl_new, gD2)
                else:
                    gD0 = tl.where(m3, gD1, gD0)
                    gD1 = tl.where(m3, gD2, gD1)
                    gD2 = tl.where(m3, gD3, gD2)
                    gD3 = tl.where(m3, gdl_new, gD3)
            gh = tl.where(m3, gh_prev, gh)
            gro = pid_b * s_u_b + t * s_u_t + ch  # gradient tensors are contiguous like u
            tl.store(gu_ptr + gro, tl.where(m, gu, 0.0).to(gu_ptr.dtype.element_ty), mask=cmask)
            tl.store(gdl_ptr + gro, tl.where(m, gx, 0.0).to(gdl_ptr.dtype.element_ty), mask=cmask)
            if HAS_Z:
                tl.store(gz_ptr + gro, tl.where(m, gz, 0.0).to(gz_ptr.dtype.element_ty), mask=cmask)
            if HAS_ALPHA:
                tl.store(gal_ptr + (pid_b * T + t) * NG + offs_g, tl.where(mg, gal_t, 0.0).to(gal_ptr.dtype.element_ty),
                         mask=gmask)
            part = ((pid_b * T + t) * n_blocks + pid_g) * N + offs_n
            tl.store(gB_ptr + part, gB_t, mask=nmask)
            tl.store(gC_ptr + part, gC_t, mask=nmask)
        tl.debug_barrier()

    _store_state(gh0_ptr, gdl0_ptr, gk0_ptr, ge0_ptr, pid_b, sd, NG, d, gh, gD0, gD1, gD2, gD3, gk, ge,
                 sidx, smask, offs_g, gmask, ch, cmask, TAU, CONTROL)
    if CONTROL:
        tl.store(gwr_ptr + pid_b * d + ch, gwr, mask=cmask)
        tl.store(geta_ptr + pid_b * NG + offs_g, geta, mask=gmask)
        tl.store(glam_ptr + pid_b * NG + offs_g, glam, mask=gmask)
    tl.store(gA_ptr + pid_b * sd + sidx, gA, mask=smask)
    tl.store(gbias_ptr + pid_b * d + ch, gbias, mask=cmask)
    tl.store(gD_ptr + pid_b * d + ch, gDp, mask=cmask)
    if TAU > 0:
        tl.store(grho_ptr + pid_b * NG + offs_g, grho, mask=gmask)


# ---------------------------------------------------------------------------------- decode step
TICKET = 1 << 32  # one program's mark in the phase word's high half (see _conba_step_kernel)


@triton.jit(do_not_specialize=["t_idx", "period"])  # t = 1 would otherwise become a constant (and a recompile)
def _conba_step_kernel(
    u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, al_ptr, m_ptr, y_ptr,
    A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr,
    h_ptr, dls_ptr, k_ptr, e_ptr, ph_ptr,  # the state, read and written in place (ph: int64 phase)
    d, NG, N, t_idx, period,
    s_u_b, s_dl_b, s_z_b, s_B_b, s_C_b, s_al_b, s_y_b,
    k_max, sigma_w, sigma_v, seed_key,
    G: tl.constexpr, GP: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr,
    TAU: tl.constexpr, CONTROL: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr,
    NOISE_W: tl.constexpr, NOISE_V: tl.constexpr, PERIODIC: tl.constexpr,
):
    """One decode token. PERIODIC (control with P = ``period`` > 1): the controller keeps its gain and
    held error between sampling instants and samples when this real token closes the period; the
    row's phase (real steps since the last instant) advances by one real token and wraps to 0 there.

    The phase is one word per row shared by the row's programs, read and written in one launch: each
    program reads it with an atomic add of TICKET (2^32), so the high half counts the programs that
    have read it, and the last of them (it saw n_programs − 1 tickets) stores the new phase, high half
    0. No program can read after that store, and nothing else runs between two steps."""
    pid_b = tl.program_id(0).to(tl.int64)  # batch offsets (b·T·d, checkpoints) can pass 2^31
    pid_g = tl.program_id(1)
    offs_n, offs_g, nmask, gmask, cmask, ch, smask, sidx, lane_w, lane_v, kb = _tile(
        pid_b, pid_g, N, NG, seed_key, G, GP, BG, NP)
    key = _mix32(kb ^ t_idx.to(tl.uint32))
    sd = d * N
    if PERIODIC:
        word = tl.atomic_add(ph_ptr + pid_b, 4294967296)  # TICKET
    A, bias, Dp, wr, rho, eta, lam = _load_params(
        A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr, sidx, smask, ch, cmask, offs_g, gmask,
        BG, GP, TAU, CONTROL, HAS_BIAS, HAS_D)
    u, dl, z, Bv, Cv, a, m = _load_step(u_ptr + pid_b * s_u_b, dl_ptr + pid_b * s_dl_b, z_ptr + pid_b * s_z_b,
                                        B_ptr + pid_b * s_B_b, C_ptr + pid_b * s_C_b, al_ptr + pid_b * s_al_b,
                                        m_ptr + pid_b, 0, 1, 0, 0, 0, 0, 0, 0,
                                        ch, cmask, offs_n, nmask, offs_g, gmask, HAS_Z, HAS_ALPHA, HAS_MASK)
    h, D0, D1, D2, D3, k, e = _load_state(h_ptr, dls_ptr, k_ptr, e_ptr, pid_b, sd, NG, d, sidx, smask,
                                          offs_g, gmask, ch, cmask, TAU, CONTROL, NP, BG, GP)
    ctl = m
    if PERIODIC:
        if HAS_MASK:
            real = (tl.load(m_ptr + pid_b) != 0).to(tl.int64)
        else:
            real = 1
        phase = (word & 0xFFFFFFFF) + real
        sample = phase == period  # never on a padded token: the phase is below the period before it
        ctl = m & sample
        last = (word >> 32) == tl.num_programs(1) - 1
        tl.store(ph_ptr + pid_b, tl.where(sample, 0, phase), mask=last)
    y, h, D0, D1, D2, D3, k, e = _fwd_step(
        h, D0, D1, D2, D3, k, e, u, dl, z, Bv, Cv, a, m, ctl,
        A, bias, Dp, wr, rho, eta, lam, k_max, sigma_w, sigma_v, key, lane_w, lane_v, smask, cmask,
        G, TAU, CONTROL, HAS_ALPHA, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z, NOISE_W, NOISE_V)
    tl.store(y_ptr + pid_b * s_y_b + ch, y.to(y_ptr.dtype.element_ty), mask=cmask)
    _store_state(h_ptr, dls_ptr, k_ptr, e_ptr, pid_b, sd, NG, d, h, D0, D1, D2, D3, k, e,
                 sidx, smask, offs_g, gmask, ch, cmask, TAU, CONTROL)


# ---------------------------------------------------------------------------------- Python side
# channels per program (whole groups, a power of two; None: by batch, see _channels), the cap on warps,
# and the backward's channels per warp (the forward has one warp per 32 channels). `mixcon bench conba-tune`
# sweeps them on a GPU. The backward of a 32-channel one-warp program (batch >= 4) spills ~0.9 KB per
# thread ahead of time for sm_90; one warp per 8 channels spills none, but fits 4x fewer programs per
# SM: not timed yet (docs/kernels.md, "Spills").
TUNING = dict(channels=None, max_warps=4, bwd_channels_per_warp=32)


def _channels(batch: int, d: int) -> int:
    """Channels per program. Measured on an H100 (eval/results/conba_tuning, bench_conba): a step
    is a latency-bound chain, so what helps is several programs per SM; 8-channel one-warp programs
    run batch 1 at ~530 ns/step against ~760 for 32-channel ones, but once 32-channel programs
    number 512 or more (batch ≥ 4 at d_inner 4096) they are faster (890 against 1500 ns at batch 8)."""
    if TUNING["channels"] is not None:
        return TUNING["channels"]
    return 32 if batch * d // 32 >= 512 else 8


def _blocking(d: int, group_size: int, n: int, batch: int = 1, backward: bool = False):
    """(GP, BG, NP, n_blocks, num_warps): whole groups of about `_channels` channels per program,
    one warp per 32 channels (the backward: per TUNING["bwd_channels_per_warp"])."""
    gp = triton.next_power_of_2(group_size)
    ng = d // group_size
    ch = _channels(batch, d)
    bg = max(1, min(ch // gp if gp <= ch else 1, triton.next_power_of_2(ng)))
    np_ = triton.next_power_of_2(n)
    n_blocks = triton.cdiv(ng, bg)
    per_warp = TUNING["bwd_channels_per_warp"] if backward else 32
    num_warps = max(1, min(TUNING["max_warps"], (bg * gp) // per_warp))
    return gp, bg, np_, n_blocks, num_warps


class _Cfg:
    __slots__ = ("tau", "group_size", "control", "softplus", "k_max", "sigma_w", "sigma_v", "seed", "chunk",
                 "has_D", "has_bias", "has_z", "has_alpha", "has_mask")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


def _flags(cfg):
    return dict(TAU=cfg.tau, CONTROL=cfg.control, HAS_ALPHA=cfg.has_alpha, HAS_BIAS=cfg.has_bias,
                SOFTPLUS=cfg.softplus, HAS_D=cfg.has_D, HAS_Z=cfg.has_z, HAS_MASK=cfg.has_mask,
                NOISE_W=cfg.sigma_w > 0.0, NOISE_V=cfg.sigma_v > 0.0)


# The scan kernels' grouped arguments (tuples, unpacked at compile time): their members' names in the
# kernels, in order; the groups shared with chunk.py's kernels come from common.py. kernel_report reads
# this for the ahead-of-time signatures. (The decode step keeps flat arguments: it runs per token, and
# its ``do_not_specialize`` names t_idx and period.)
ARG_GROUPS = {
    **SHARED_GROUPS,
    "dims": ("T", "d", "NG", "N", "n_chunks"),
    "carries": ("ck_h_ptr", "ck_dl_ptr", "ck_k_ptr", "ck_e_ptr"),  # checkpoints (b, nC, ...) of the pre-chunk state
    "state0": ("h0_ptr", "dl0_ptr", "k0_ptr", "e0_ptr"),
    "stateT": ("hT_ptr", "dlT_ptr", "kT_ptr", "eT_ptr"),
    "gstateT": ("ghT_ptr", "gdlT_ptr", "gkT_ptr", "geT_ptr"),
    "scratch": ("sc_h_ptr", "sc_d_ptr", "sc_k_ptr", "sc_e_ptr"),
    "gins": ("gu_ptr", "gdl_ptr", "gz_ptr", "gal_ptr"),
    "gBC": ("gB_ptr", "gC_ptr"),
    "gprm": ("gA_ptr", "gbias_ptr", "gD_ptr", "gwr_ptr", "grho_ptr", "geta_ptr", "glam_ptr"),
    "gstate0": ("gh0_ptr", "gdl0_ptr", "gk0_ptr", "ge0_ptr"),
}


def _launch_fwd(cfg, u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, h0, dl0, k_init, e0, mask,
                save: bool):
    b, T, d = u.shape
    n = A.shape[1]
    G, tau = cfg.group_size, cfg.tau
    ng = d // G
    gp, bg, np_, n_blocks, num_warps = _blocking(d, G, n, b)
    f32 = dict(device=u.device, dtype=torch.float32)
    y = torch.empty(b, T, d, device=u.device, dtype=u.dtype)
    hT = torch.empty(b, d, n, **f32)
    dlT = torch.empty(b, tau, d, n, **f32)
    kT = torch.empty(b, ng, **f32) if cfg.control else k_init.detach().clone()
    eT = torch.empty(b, d, **f32) if cfg.control else e0.detach().clone()
    n_chunks = triton.cdiv(T, cfg.chunk)
    dummy = torch.empty(1, **f32)
    if save:
        ck = (torch.empty(b, n_chunks, d, n, **f32), torch.empty(b, n_chunks, tau, d, n, **f32) if tau else dummy,
              torch.empty(b, n_chunks, ng, **f32) if cfg.control else dummy,
              torch.empty(b, n_chunks, d, **f32) if cfg.control else dummy)
    else:
        ck = (dummy,) * 4
    ins, prm, strides, scalars = _groups(cfg, u, delta, z, B, C, alpha, mask, A, delta_bias, D, w_r, rho, eta, lam,
                                         dummy)
    _conba_fwd_kernel[(b, n_blocks)](
        ins, prm, strides, scalars, (T, d, ng, n, n_chunks), tuple(ck),
        (h0, dl0 if tau else dummy, k_init, e0), y, (hT, dlT if tau else dummy, kT, eT),
        G=G, GP=gp, BG=bg, NP=np_, CHUNK=cfg.chunk, SAVE=save, **_flags(cfg), num_warps=num_warps,
    )
    return y, (hT, dlT, kT, eT), ck


class _ConbaScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, h0, dl0, k_init, e0,
                mask):
        y, final, ck = _launch_fwd(cfg, u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r,
                                   h0, dl0, k_init, e0, mask, save=True)
        ctx.cfg = cfg
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, mask, *ck)
        ctx.set_materialize_grads(False)
        return (y, *final)

    @staticmethod
    def backward(ctx, gy, ghT, gdlT, gkT, geT):
        cfg = ctx.cfg
        u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, mask, *ck = ctx.saved_tensors
        b, T, d = u.shape
        n = A.shape[1]
        G, tau = cfg.group_size, cfg.tau
        ng = d // G
        gp, bg, np_, n_blocks, num_warps = _blocking(d, G, n, b, backward=True)
        f32 = dict(device=u.device, dtype=torch.float32)
        dummy = torch.empty(1, **f32)
        gy = torch.zeros_like(u) if gy is None else gy.contiguous()
        has_gfinal = any(g is not None for g in (ghT, gdlT, gkT, geT))
        zf = lambda g, *shape: (torch.zeros(*shape, **f32) if g is None else g.float().contiguous())  # noqa: E731
        ghT, gdlT = zf(ghT, b, d, n), zf(gdlT, b, tau, d, n)
        gkT, geT = zf(gkT, b, ng), zf(geT, b, d)
        chunk = cfg.chunk  # the kernel strides the per-row scratch by CHUNK, even when T < CHUNK
        sc = (torch.empty(b, chunk, d, n, **f32), torch.empty(b, chunk, d, n, **f32) if tau else dummy,
              torch.empty(b, chunk, ng, **f32) if cfg.control else dummy,
              torch.empty(b, chunk, d, **f32) if cfg.control else dummy)
        gu = torch.empty(b, T, d, device=u.device, dtype=u.dtype)
        gdelta = torch.empty(b, T, d, device=u.device, dtype=delta.dtype)
        gz = torch.empty(b, T, d, device=u.device, dtype=z.dtype) if z is not None else dummy
        galpha = torch.empty(b, T, ng, device=u.device, dtype=alpha.dtype) if alpha is not None else dummy
        gBp = torch.empty(b, T, n_blocks, n, **f32)
        gCp = torch.empty(b, T, n_blocks, n, **f32)
        gAp = torch.empty(b, d, n, **f32)
        gbp, gDp, gwp = (torch.zeros(b, d, **f32) for _ in range(3))
        grp, gep, glp = (torch.zeros(b, ng, **f32) for _ in range(3))
        gh0 = torch.empty(b, d, n, **f32)
        gdl0 = torch.empty(b, tau, d, n, **f32)
        gk0 = torch.zeros(b, ng, **f32)
        ge0 = torch.zeros(b, d, **f32)
        ins, prm, strides, scalars = _groups(cfg, u, delta, z, B, C, alpha, mask, A, delta_bias, D, w_r, rho, eta,
                                             lam, dummy)
        _conba_bwd_kernel[(b, n_blocks)](
            ins, prm, strides, scalars, (T, d, ng, n, triton.cdiv(T, cfg.chunk)), tuple(ck), gy, n_blocks,
            (ghT, gdlT if tau else dummy, gkT, geT), sc, (gu, gdelta, gz, galpha), (gBp, gCp),
            (gAp, gbp, gDp, gwp, grp, gep, glp), (gh0, gdl0 if tau else dummy, gk0, ge0),
            G=G, GP=gp, BG=bg, NP=np_, CHUNK=cfg.chunk, HAS_GFINAL=has_gfinal, **_flags(cfg),
            num_warps=num_warps,
        )
        like = lambda g, x: None if x is None else g.to(x.dtype)  # noqa: E731
        return (
            None, gu, gdelta, gAp.sum(0).to(A.dtype), gBp.sum(2).to(B.dtype), gCp.sum(2).to(C.dtype),
            like(gDp.sum(0), D), gz if z is not None else None, like(gbp.sum(0), delta_bias),
            galpha if alpha is not None else None,
            like(grp.sum(0), rho) if tau else None,
            like(gep.sum(0), eta) if cfg.control else None, like(glp.sum(0), lam) if cfg.control else None,
            like(gwp.sum(0), w_r) if cfg.control else None,
            gh0, gdl0, gk0 if cfg.control else None, ge0 if cfg.control else None, None,
        )


@keyword_interface("u", "delta")
def conba_scan_triton(u, delta, B, C, params: ConbaParams, *, z=None, alpha=None, mask=None, initial_state=None,
                      return_final_state=False, chunk_size=None):
    """The fused scan (arguments as `mixcon.ops.conba.conba_scan`, already validated there).
    ``chunk_size``: steps between the forward's state checkpoints for the backward. These kernels are
    the per-step controller: with control on, ``params.control_period`` must be 1 (`conba_scan_chunk`
    serves P > 1)."""
    p = params
    if p.control and p.control_period != 1:
        raise ValueError(f"conba_scan_triton runs the per-step controller (control_period=1), got "
                         f"control_period={p.control_period}; use conba_scan_chunk (or conba_scan) for P > 1")
    A, D, delta_bias, delta_softplus, rho, tau = p.A, p.D, p.delta_bias, p.delta_softplus, p.rho, p.tau
    k0, eta, lam, w_r, k_max, group_size = p.k0, p.eta, p.lam, p.w_r, p.k_max, p.group_size
    sigma_w, sigma_v, seed = p.sigma_w, p.sigma_v, p.seed
    b, T, d = u.shape
    n = A.shape[1]
    ng = d // group_size
    control = eta is not None or k0 is not None
    f32 = dict(device=u.device, dtype=torch.float32)
    if initial_state is None:
        h0 = torch.zeros(b, d, n, **f32)
        dl0 = torch.zeros(b, tau, d, n, **f32)
        k_init = k0.float().expand(b, ng) if (control and k0 is not None) else torch.zeros(b, ng, **f32)
        e0 = torch.zeros(b, d, **f32)
        phase = torch.zeros(b, dtype=torch.long, device=u.device)
    else:
        h0, dl0, k_init, e0 = (s.float() for s in initial_state[:4])
        phase = initial_state.phase
    # these kernels are the per-step controller (P = 1): every real step is a sampling instant, so
    # the phase stays 0 (and without control it passes through)
    phase = phase.clone()
    h0, dl0, k_init, e0 = (s.contiguous() for s in (h0, dl0, k_init, e0))
    if T == 0:
        y = u.new_zeros(b, 0, d)
        return (y, ConbaState(h0.clone(), dl0.clone(), k_init.clone(), e0.clone(), phase)) if return_final_state else y
    if control:
        eta = eta if eta is not None else torch.zeros(ng, **f32)
        lam = lam if lam is not None else torch.zeros(ng, **f32)
        w_r = w_r if w_r is not None else torch.ones(d, **f32)
    if mask is not None:
        mask = mask.to(torch.int8).contiguous()
    cfg = _Cfg(tau=tau, group_size=group_size, control=control, softplus=bool(delta_softplus), k_max=float(k_max),
               sigma_w=float(sigma_w), sigma_v=float(sigma_v), seed=int(seed),
               chunk=int(chunk_size or DEFAULT_CHUNK), has_D=D is not None, has_bias=delta_bias is not None,
               has_z=z is not None, has_alpha=alpha is not None, has_mask=mask is not None)
    u = u.contiguous()
    # offsets inside one batch row are 32-bit (the batch offset is 64-bit)
    row = max(T * x.stride(1) for x in (u, delta, z, B, C, alpha) if x is not None)
    if row >= 2**31:
        raise ValueError(f"conba_scan (triton): one batch row spans {row} elements (T={T} × row stride); "
                         f"at most 2^31 - 1 are allowed: split the sequence and pass the state on "
                         f"(the model's chunked prefill does)")
    args = (u, _rows(delta), A.contiguous(), _rows(B), _rows(C), D, _rows(z), delta_bias, _rows(alpha),
            rho, eta, lam, w_r, h0, dl0, k_init, e0, mask)
    needs_grad = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in args)
    if needs_grad:
        y, hT, dlT, kT, eT = _ConbaScan.apply(cfg, *args)
    else:
        y, (hT, dlT, kT, eT), _ = _launch_fwd(cfg, *args, save=False)
    if not control:  # k and e pass through untouched (and so do their gradients), as in the reference
        kT, eT = k_init, e0
    if return_final_state:
        return y, ConbaState(hT, dlT, kT, eT, phase)
    return y


@keyword_interface("state", "u", "delta")
def conba_step_triton(state, u, delta, B, C, params: ConbaParams, *, z=None, alpha=None, mask=None, t=0):
    """The fused decode step: updates ``state`` (float32; the phase int64) in place and returns y
    (batch, d_inner). Every control period P: with control and P > 1 the kernel advances the phase and
    updates the gain only when the token closes a period (`_conba_step_kernel`). No host
    synchronisation and fixed shapes, so it can be captured in a CUDA graph (with a fixed ``t``, which
    only keys the noise). The kernel has no backward: with a gradient required it raises."""
    p = params
    A, D, delta_bias, delta_softplus, rho, tau = p.A, p.D, p.delta_bias, p.delta_softplus, p.rho, p.tau
    eta, lam, w_r, k_max, group_size = p.eta, p.lam, p.w_r, p.k_max, p.group_size
    sigma_w, sigma_v, seed, control_period = p.sigma_w, p.sigma_v, p.seed, p.control_period
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                       for x in (u, delta, B, C, z, alpha, *p.tensors())):
        raise ValueError("conba_step (triton): the fused decode step has no backward; run it under torch.no_grad() "
                         "or use backend='ref' (or 'auto', which takes the reference step when a gradient is needed)")
    b, d = u.shape
    n = A.shape[1]
    ng = d // group_size
    control = p.control
    periodic = control and int(control_period) > 1
    f32 = dict(device=u.device, dtype=torch.float32)
    if control:
        eta = eta if eta is not None else torch.zeros(ng, **f32)
        lam = lam if lam is not None else torch.zeros(ng, **f32)
        w_r = w_r if w_r is not None else torch.ones(d, **f32)
    # the kernel needs contiguous float32 state and an int64 phase; other layouts run on a copy that is
    # written back (the phase is only read and written with control at P > 1)
    work = [s if (s.dtype == torch.float32 and s.is_contiguous()) else s.float().contiguous() for s in state[:4]]
    ph = state[4]
    if periodic and not (ph.dtype == torch.int64 and ph.is_contiguous()):
        ph = ph.to(torch.int64).contiguous()
    work.append(ph)
    gp, bg, np_, n_blocks, num_warps = _blocking(d, group_size, n, b)
    y = torch.empty(b, d, device=u.device, dtype=u.dtype)
    dummy = torch.empty(1, **f32)
    o = lambda x: x if x is not None else dummy  # noqa: E731
    m = mask.to(torch.int8).contiguous() if mask is not None else None
    u, delta, B, C, z, alpha = (_rows(x) for x in (u, delta, B, C, z, alpha))
    cfg = _Cfg(tau=tau, control=control, softplus=bool(delta_softplus), sigma_w=float(sigma_w),
               sigma_v=float(sigma_v), has_D=D is not None, has_bias=delta_bias is not None, has_z=z is not None,
               has_alpha=alpha is not None, has_mask=m is not None)
    _conba_step_kernel[(b, n_blocks)](
        u, delta, o(z), B, C, o(alpha), o(m), y,
        A.contiguous(), o(delta_bias), o(D), o(w_r), o(rho), o(eta), o(lam),
        work[0], work[1] if tau else dummy, work[2], work[3], work[4] if periodic else dummy,
        d, ng, n, int(t), int(control_period),
        u.stride(0), delta.stride(0), z.stride(0) if z is not None else 0, B.stride(0), C.stride(0),
        alpha.stride(0) if alpha is not None else 0, y.stride(0),
        float(k_max), float(sigma_w), float(sigma_v), _seed_key(seed),
        G=group_size, GP=gp, BG=bg, NP=np_, PERIODIC=periodic, **_flags(cfg), num_warps=num_warps,
    )
    for s, w in zip(state, work):
        if w is not s:
            s.copy_(w)
    return y
