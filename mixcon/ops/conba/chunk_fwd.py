"""The forward of the chunk-parallel Conba scan (chunk.py describes the algorithm): `_fwd_block`, one
block from its start carry (the backward recomputes blocks with it too), the kernel that walks a row's
blocks, and its launcher `chunk_conba_fwd`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_algebra import _scan_fwd
from .chunk_common import _block, _controller, _gbc, _instant, _load_params, _load_S, _row, _store_S, _tile
from .common import _mix32, _tanh
from .host import ARG_GROUPS as _SCAN_GROUPS
from .host import ScanConfig, fwd_buffers, kernel_groups, state_group

ARG_GROUPS = _SCAN_GROUPS["chunk"]  # the kernels' grouped arguments (host.py; kernel_report reads them here)


# ---------------------------------------------------------------------------------- one block
@triton.jit
def _fwd_block(S0, S1, S2, S3, kg, e, blk, t0, T, ph_b, t1, cdiff, period,
               u_b, dt_b, z_b, B_b, C_b, al_b, m_b, s_u_t, s_dt_t, s_z_t, s_B_t, s_C_t, s_al_t,
               offs_i, offs_n, nmask, grp, ch, cmask, smask, first, last,
               A, bias, Dp, wr, rho_c, eta, lam, k_max, kb, lane_w, lane_v, sigma_w, sigma_v,
               G: tl.constexpr, GP: tl.constexpr, BG: tl.constexpr, BT: tl.constexpr, MS: tl.constexpr,
               TAU: tl.constexpr, CONTROL: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr,
               SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr,
               NOISE_W: tl.constexpr, NOISE_V: tl.constexpr, FIX_H: tl.constexpr, ALIGNED: tl.constexpr):
    """One block of the forward from its start carry (companion state S, gain, sampled error): the gated
    output [BT, BC] and the carry after the block."""
    BC: tl.constexpr = BG * GP
    NV: tl.constexpr = 1 if ALIGNED else (2 if CONTROL else 1)
    tt, real, u, dt_in, dt, z, Bv, Cv, al, dA, a, r, xi, zeta = _block(
        u_b, dt_b, z_b, B_b, C_b, al_b, m_b, t0, T, s_u_t, s_dt_t, s_z_t, s_B_t, s_C_t, s_al_t,
        offs_i, offs_n, nmask, grp, ch, cmask, smask, A, bias, rho_c, kb, lane_w, lane_v, sigma_w, sigma_v,
        TAU, HAS_ALPHA, HAS_BIAS, SOFTPLUS, HAS_Z, HAS_MASK, NOISE_W, NOISE_V)
    real3 = real[:, None, None]
    dB = dt[:, :, None] * Bv[:, None, :]  # Δ_t B_t
    f_old = tl.zeros([BC], tl.float32)
    if CONTROL:
        f_old = _gbc(kg, BG, GP) * _tanh(e)
    x = tl.where(real3, dB * (u - f_old[None, :])[:, :, None] + xi, 0.0)
    if FIX_H:
        x = x + tl.where((tt == t1)[:, None, None], a * cdiff[None, :, :], 0.0)
    w = x * 0.0
    inst = offs_i < 0
    after = inst
    has = False
    if CONTROL:
        ph = tl.load(ph_b + blk)
        inst, after, has = _instant(real, ph, period, offs_i)
        w = tl.where(after[:, None, None], -dB, 0.0)
    if TAU == 1:
        ae = a + r[:, :, None]  # h_(t−1) and h_(t−τ) are the same
    else:
        ae = a
    v0, v1, v2, v3, w0, w1, w2, w3 = _scan_fwd(ae, tl.broadcast_to(r[:, :, None], a.shape), real3, x, w,
                                               S0, S1, S2, S3, first, MS, NV)
    yb = tl.sum(v0 * Cv[:, None, :], axis=2) + zeta
    if HAS_D:
        yb = yb + Dp[None, :] * u
    if CONTROL:
        es, ss, rr, pre, kn = _controller(yb - wr[None, :] * u, inst, kg, eta, lam, k_max, cmask, G, BG, GP)
        if NV == 2:  # the steps after the instant see the new signal
            df = tl.where(has & cmask, _gbc(kn, BG, GP) * _tanh(es) - f_old, 0.0)
            df3 = df[None, :, None]
            yb = yb + df[None, :] * tl.sum(w0 * Cv[:, None, :], axis=2)
            v0 = v0 + df3 * w0
            v1 = v1 + df3 * w1
            v2 = v2 + df3 * w2
            v3 = v3 + df3 * w3
        kg = tl.where(has, kn, kg)
        e = tl.where(has, es, e)
    if HAS_Z:
        yb = yb * (z * tl.sigmoid(z))
    yb = tl.where(real[:, None], yb, 0.0)
    S0 = _row(v0, last)
    if MS > 1:
        S1 = _row(v1, last)
    if MS > 2:
        S2 = _row(v2, last)
    if MS > 3:
        S3 = _row(v3, last)
    return tt, yb, S0, S1, S2, S3, kg, e


# ---------------------------------------------------------------------------------- kernel
@triton.jit
def _chunk_fwd_kernel(
    ins, prm, strides, scalars, dims, clock, carries,  # grouped as in the backward (ARG_GROUPS)
    state0,  # initial state (b, d, N), (b, τ, d, N), (b, ng), (b, d)
    y_ptr,
    stateT,  # final state, same shapes
    G: tl.constexpr, GP: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, MS: tl.constexpr,
    TAU: tl.constexpr, CONTROL: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr,
    NOISE_W: tl.constexpr, NOISE_V: tl.constexpr, FIX_H: tl.constexpr, SAVE: tl.constexpr, SEG: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, al_ptr, m_ptr = ins
    A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr = prm
    s_u_b, s_u_t, s_dt_b, s_dt_t, s_z_b, s_z_t, s_B_b, s_B_t, s_C_b, s_C_t, s_al_b, s_al_t = strides
    k_max, sigma_w, sigma_v, seed_key = scalars
    T, d, NG, N, n_blk, n_ck, period = dims
    ph_ptr, t1_ptr = clock
    ck_s_ptr, ck_k_ptr, ck_e_ptr = carries
    h0_ptr, line0_ptr, k0_ptr, e0_ptr = state0
    hT_ptr, lineT_ptr, kT_ptr, eT_ptr = stateT
    BC: tl.constexpr = BG * GP
    pid_b = tl.program_id(0).to(tl.int64)  # batch offsets can pass 2^31
    pid_c = tl.program_id(1)
    offs_i, offs_n, offs_g, grp, cmask, ch, nmask, gmask, smask, sidx, lane_w, lane_v = _tile(
        pid_b, pid_c, N, NG, G, GP, BG, NP, BT)
    kb = _mix32(seed_key.to(tl.uint32, bitcast=True) ^ pid_b.to(tl.uint32))
    A, bias, Dp, wr, rho_c, eta, lam = _load_params(
        A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr, sidx, smask, ch, cmask, grp, offs_g, gmask,
        BC, BG, TAU, CONTROL, HAS_BIAS, HAS_D)
    sd = d * N
    first = (offs_i == 0)[:, None, None]
    last = (offs_i == BT - 1)[:, None, None]
    # the companion state: h for τ = 0, the delay line (h_t, …, h_(t−τ+1)) for τ > 0
    if TAU == 0:
        S0, S1, S2, S3 = _load_S(h0_ptr + pid_b * sd, sd, sidx, smask, 1, NP, BC)
    else:
        S0, S1, S2, S3 = _load_S(line0_ptr + pid_b * TAU * sd, sd, sidx, smask, MS, NP, BC)
    t1 = -1
    cdiff = tl.zeros([BC, NP], tl.float32)
    h0 = cdiff
    if FIX_H:  # the state's h may differ from its delay line's first entry: the first real step's a·h term
        h0 = tl.load(h0_ptr + pid_b * sd + sidx, mask=smask, other=0.0)
        cdiff = h0 - S0
        t1 = tl.load(t1_ptr + pid_b)
    kg = tl.zeros([BG], tl.float32)
    e = tl.zeros([BC], tl.float32)
    if CONTROL:
        kg = tl.load(k0_ptr + pid_b * NG + offs_g, mask=gmask, other=0.0)
        e = tl.load(e0_ptr + pid_b * d + ch, mask=cmask, other=0.0)

    u_b = u_ptr + pid_b * s_u_b
    dt_b = dt_ptr + pid_b * s_dt_b
    z_b = z_ptr + pid_b * s_z_b
    B_b = B_ptr + pid_b * s_B_b
    C_b = C_ptr + pid_b * s_C_b
    al_b = al_ptr + pid_b * s_al_b
    m_b = m_ptr + pid_b * T
    ph_b = ph_ptr + pid_b * n_blk
    y_b = y_ptr + pid_b * s_u_b  # y is allocated like a contiguous u

    for blk in range(0, n_blk):
        t0 = blk * BT
        if SAVE:  # the carry at every SEG-th block's start (masked stores: no branch)
            is_ck = (blk % SEG) == 0
            row = pid_b * n_ck + blk // SEG
            _store_S(ck_s_ptr + row * MS * sd, sd, sidx, smask & is_ck, S0, S1, S2, S3, MS)
            if CONTROL:
                tl.store(ck_k_ptr + row * NG + offs_g, kg, mask=gmask & is_ck)
                tl.store(ck_e_ptr + row * d + ch, e, mask=cmask & is_ck)
        tt, yb, S0n, S1n, S2n, S3n, kg, e = _fwd_block(
            S0, S1, S2, S3, kg, e, blk, t0, T, ph_b, t1, cdiff, period,
            u_b, dt_b, z_b, B_b, C_b, al_b, m_b, s_u_t, s_dt_t, s_z_t, s_B_t, s_C_t, s_al_t,
            offs_i, offs_n, nmask, grp, ch, cmask, smask, first, last,
            A, bias, Dp, wr, rho_c, eta, lam, k_max, kb, lane_w, lane_v, sigma_w, sigma_v,
            G, GP, BG, BT, MS, TAU, CONTROL, HAS_ALPHA, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z, HAS_MASK,
            NOISE_W, NOISE_V, FIX_H, ALIGNED)
        S0, S1, S2, S3 = S0n, S1n, S2n, S3n
        tl.store(y_b + tt[:, None] * s_u_t + ch[None, :], yb.to(y_ptr.dtype.element_ty),
                 mask=(tt < T)[:, None] & cmask[None, :])

    if TAU == 0:
        tl.store(hT_ptr + pid_b * sd + sidx, S0, mask=smask)
    else:
        _store_S(lineT_ptr + pid_b * TAU * sd, sd, sidx, smask, S0, S1, S2, S3, MS)
        hT = S0
        if FIX_H:
            hT = tl.where(t1 >= 0, S0, h0)  # no real step at all: h untouched
        tl.store(hT_ptr + pid_b * sd + sidx, hT, mask=smask)
    if CONTROL:
        tl.store(kT_ptr + pid_b * NG + offs_g, kg, mask=gmask)
        tl.store(eT_ptr + pid_b * d + ch, e, mask=cmask)


# ---------------------------------------------------------------------------------- launcher
def chunk_conba_fwd(cfg: ScanConfig, blocking: tuple, args: tuple, ph, t1, save: bool):
    """Launch the forward over ``args`` (host.scan_args' order) with the clock of ``cfg``'s blocks (``ph``: the
    phase at each block's start, ``t1``: each row's first real step) and ``blocking`` (chunk._blocking's
    tile). Returns y, the final state (h, line, k, e) and, with ``save``, the carries at every checkpoint for
    the backward (dummies otherwise)."""
    u, A = args[0], args[2]
    b, T, d = u.shape
    n = A.shape[1]
    G, tau = cfg.group_size, cfg.tau
    ms, ng = max(tau, 1), d // G
    gp, bg, np_, n_cb, num_warps = blocking
    n_blk = triton.cdiv(T, cfg.block_t)
    seg = cfg.checkpoint_interval // cfg.block_t  # blocks per saved carry
    n_ck = triton.cdiv(n_blk, seg)
    y, final, dummy = fwd_buffers(cfg, u, n)
    f32 = dict(device=u.device, dtype=torch.float32)
    ck = (dummy,) * 3
    if save:
        ck = (torch.empty(b, n_ck, ms, d, n, **f32), torch.empty(b, n_ck, ng, **f32) if cfg.control else dummy,
              torch.empty(b, n_ck, d, **f32) if cfg.control else dummy)
    ins, prm, strides, scalars, state0 = kernel_groups(cfg, args, dummy)
    _chunk_fwd_kernel[(b, n_cb)](
        ins, prm, strides, scalars, (T, d, ng, n, n_blk, n_ck, cfg.period), (ph, t1), ck,
        state0, y, state_group(cfg, final, dummy),
        G=G, GP=gp, BG=bg, NP=np_, BT=cfg.block_t, MS=ms, SAVE=save, SEG=seg, **cfg.flags(), num_warps=num_warps,
    )
    return y, final, ck
