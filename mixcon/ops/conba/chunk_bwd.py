"""The backward of the chunk-parallel Conba scan (chunk.py describes the algorithm): `_bwd_block`, one
block's adjoint from its start carry and the adjoint of the carry after it, the kernel that walks a row's
checkpoint segments from last to first (recomputing each segment's blocks forward first), and its
launcher `chunk_conba_bwd`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_algebra import _scan_bwd, _scan_fwd
from .chunk_common import (_block, _controller, _gbc, _gsum, _instant, _load_params, _load_S, _row, _store_S,
                           _tile)
from .chunk_fwd import _fwd_block
from .common import _mix32, _tanh
from .host import ARG_GROUPS as _SCAN_GROUPS
from .host import ScanConfig, bwd_buffers, input_grads, kernel_groups, state_group

ARG_GROUPS = _SCAN_GROUPS["chunk"]  # the kernels' grouped arguments (host.py; kernel_report reads them here)


# ---------------------------------------------------------------------------------- helpers
@triton.jit
def _prev(x, first, s, idx):
    """x shifted one position later along the block: row t holds x[t − 1], row 0 holds ``s``."""
    return tl.where(first, s[None, :, :], tl.gather(x, idx, 0))


@triton.jit
def _instant_bwd(gfn, gk, ge, th_s, kc_new, pre, k_max, eta, lam, kg, ss, rr, es, has, cmask,
                 G: tl.constexpr, BG: tl.constexpr, GP: tl.constexpr):
    """Adjoints at the instant, given δf's (gfn) and those of the carry after the block (gk, ge): the sampled
    error's, the η and λ increments, and the carry's before the block (the gain's, the error's)."""
    gkn = gk + _gsum(tl.where(cmask, gfn * th_s, 0.0), BG, GP)
    ges = ge + gfn * kc_new * (1.0 - th_s * th_s)
    gpre = tl.where((pre >= 0.0) & (pre <= k_max), gkn, 0.0)
    ges = ges + _gbc(eta * gpre / (ss * tl.sqrt(G * 1.0)), BG, GP) * es
    ges = tl.where(has & cmask, ges, 0.0)
    return (ges, tl.where(has, rr * gpre, 0.0), tl.where(has, -kg * gpre, 0.0), tl.where(has, (1.0 - lam) * gpre, gk),
            tl.where(has, 0.0, ge))


# ---------------------------------------------------------------------------------- one block
@triton.jit
def _bwd_block(S0, S1, S2, S3, kg, e, G0, G1, G2, G3, gk, ge, gA, gcd, gbias, gDp, gwr, grho, geta, glam,
               blk, t0, T, ph_ptr, pid_b, n_blk, t1, cdiff, period,
               u_b, dt_b, z_b, B_b, C_b, al_b, m_b, s_u_t, s_dt_t, s_z_t, s_B_t, s_C_t, s_al_t,
               gy_ptr, s_u_b, gu_ptr, gdt_ptr, gz_ptr, gal_ptr, gB_ptr, gC_ptr, pid_c, n_cb, N, NG,
               offs_i, offs_n, offs_g, nmask, gmask, grp, ch, cmask, smask, smask3, first, last,
               zero3, idxp, idxn, idxn1,
               A, bias, Dp, wr, rho_c, eta, lam, k_max, kb, lane_w, lane_v, sigma_w, sigma_v,
               G: tl.constexpr, GP: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr,
               MS: tl.constexpr, TAU: tl.constexpr, CONTROL: tl.constexpr, HAS_ALPHA: tl.constexpr,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr,
               NOISE_W: tl.constexpr, NOISE_V: tl.constexpr, FIX_H: tl.constexpr, ALIGNED: tl.constexpr):
    """One block of the backward (blocks go last to first): recomputes the block's forward from its start carry
    (companion state S, gain kg, sampled error e), solves the adjoint over the block from the carry's adjoint
    after it (G, gk, ge), stores the per-position gradients and adds the block's terms to the accumulators
    (gA, gcd, gbias, gDp, gwr, grho, geta, glam). Returns the carry's adjoint before the block and the
    accumulators."""
    BC: tl.constexpr = BG * GP
    NV: tl.constexpr = 1 if ALIGNED else (2 if CONTROL else 1)
    tt, real, u, dt_in, dt, z, Bv, Cv, al, dA, a, r, xi, zeta = _block(
        u_b, dt_b, z_b, B_b, C_b, al_b, m_b, t0, T, s_u_t, s_dt_t, s_z_t, s_B_t, s_C_t, s_al_t,
        offs_i, offs_n, nmask, grp, ch, cmask, smask, A, bias, rho_c, kb, lane_w, lane_v, sigma_w, sigma_v,
        TAU, HAS_ALPHA, HAS_BIAS, SOFTPLUS, HAS_Z, HAS_MASK, NOISE_W, NOISE_V)
    real2 = real[:, None]
    real3 = real[:, None, None]
    dB = dt[:, :, None] * Bv[:, None, :]
    f_old = tl.zeros([BC], tl.float32)
    if CONTROL:
        f_old = _gbc(kg, BG, GP) * _tanh(e)
    x = tl.where(real3, dB * (u - f_old[None, :])[:, :, None] + xi, 0.0)
    if FIX_H:
        x = x + tl.where((tt == t1)[:, None, None], a * cdiff[None, :, :], 0.0)
    w = zero3
    inst = offs_i < 0
    after = inst
    has = False
    if CONTROL:
        ph = tl.load(ph_ptr + pid_b * n_blk + blk)
        inst, after, has = _instant(real, ph, period, offs_i)
        w = tl.where(after[:, None, None], -dB, 0.0)
    r3 = tl.broadcast_to(r[:, :, None], [BT, BC, NP])
    if TAU == 1:
        ae = a + r3
    else:
        ae = a
    v0, v1, v2, v3, w0, w1, w2, w3 = _scan_fwd(ae, r3, real3, x, w, S0, S1, S2, S3, first, MS, NV)
    yb = tl.sum(v0 * Cv[:, None, :], axis=2) + zeta
    if HAS_D:
        yb = yb + Dp[None, :] * u
    df = tl.zeros([BC], tl.float32)
    if CONTROL:
        es, ss, rr, pre, kn = _controller(yb - wr[None, :] * u, inst, kg, eta, lam, k_max, cmask, G, BG, GP)
        kc_new = _gbc(kn, BG, GP)
        th_s = _tanh(es)
        if NV == 2:
            df = tl.where(has & cmask, kc_new * th_s - f_old, 0.0)
            df3 = df[None, :, None]
            yb = yb + df[None, :] * tl.sum(w0 * Cv[:, None, :], axis=2)
            v0 = v0 + df3 * w0
            v1 = v1 + df3 * w1
            v2 = v2 + df3 * w2
            v3 = v3 + df3 * w3
    # the state before each position: h_(t−1) and h_(t−τ)
    hprev = _prev(v0, first, S0, idxp)
    if TAU == 2:
        hdel = _prev(v1, first, S1, idxp)
    elif TAU == 3:
        hdel = _prev(v2, first, S2, idxp)
    elif TAU == 4:
        hdel = _prev(v3, first, S3, idxp)
    else:
        hdel = hprev
    # --- output gate
    cm2 = (tt < T)[:, None] & cmask[None, :]
    go = tl.load(gy_ptr + pid_b * s_u_b + tt[:, None] * s_u_t + ch[None, :], mask=cm2, other=0.0).to(tl.float32)
    if HAS_Z:
        sz = tl.sigmoid(z)
        gy = go * (z * sz)
        gz = go * yb * (sz * (1.0 + z * (1.0 - sz)))
    else:
        gy = go
        gz = go
    gy = tl.where(real2, gy, 0.0)
    # --- the adjoint recurrence, reversed over the block: λ_t = src_t e1 + M_(t+1)^T λ_(t+1)
    an = tl.gather(ae, idxn, 0)
    rn = tl.gather(r3, idxn, 0)
    realn = (tl.gather(real.to(tl.int32), idxn1, 0) != 0)[:, None, None]
    src = Cv[:, None, :] * gy[:, :, None]
    srcB = tl.where(inst[:, None, None], Cv[:, None, :] + zero3, 0.0)
    if CONTROL:
        if NV == 1:  # aligned: the instant is the block's last step, no step sees δf: its adjoint is 0
            ges, dgeta, dglam, gk, ge = _instant_bwd(tl.zeros([BC], tl.float32), gk, ge, th_s, kc_new, pre,
                                                     k_max, eta, lam, kg, ss, rr, es, has, cmask, G, BG, GP)
            src = src + tl.where(inst[:, None, None], Cv[:, None, :] * ges[None, :, None], 0.0)
    L0, L1, L2, L3, B0, B1, B2, B3 = _scan_bwd(an, rn, realn, src, G0, G1, G2, G3, srcB, last, MS, NV)
    gyp = gy
    if CONTROL:
        if NV == 2:
            # the instant: δf's adjoint from the steps after it, then the error's (through the gain and
            # the signal), whose response is the scan's second column
            gfn = tl.sum(tl.sum(tl.where(after[:, None, None], -L0 * dB, 0.0), axis=2), axis=0)
            ges, dgeta, dglam, gk, ge = _instant_bwd(gfn, gk, ge, th_s, kc_new, pre, k_max, eta, lam, kg,
                                                     ss, rr, es, has, cmask, G, BG, GP)
            ges3 = ges[None, :, None]
            L0 = L0 + ges3 * B0
            L1 = L1 + ges3 * B1
            L2 = L2 + ges3 * B2
            L3 = L3 + ges3 * B3
        geta = geta + dgeta
        glam = glam + dglam
        gyp = gy + tl.where(inst[:, None], ges[None, :], 0.0)
    # --- per-position gradients
    uf = u - f_old[None, :] - tl.where(after[:, None], df[None, :], 0.0)  # ũ_t
    sB = tl.sum(L0 * Bv[:, None, :], axis=2)
    gdt = tl.where(real2, sB * uf, 0.0)
    gu = tl.where(real2, sB * dt, 0.0)
    if HAS_D:
        gu = gu + gyp * Dp[None, :]
    gDp = gDp + tl.sum(gyp * u, axis=0)
    if CONTROL:
        gu = gu - tl.where(inst[:, None], (ges * wr)[None, :], 0.0)
        gwr = gwr - tl.sum(tl.where(inst[:, None], ges[None, :] * u, 0.0), axis=0)
        gfo = -tl.sum(tl.where(real2 & (~after[:, None]), sB * dt, 0.0), axis=0)
        th_o = _tanh(e)
        gk = gk + _gsum(tl.where(cmask, gfo * th_o, 0.0), BG, GP)
        ge = ge + tl.where(cmask, gfo * _gbc(kg, BG, GP) * (1.0 - th_o * th_o), 0.0)
    keep = real3 & smask3
    gB_t = tl.sum(tl.where(keep, L0 * (dt * uf)[:, :, None], 0.0), axis=1)
    gC_t = tl.sum(tl.where(keep, gyp[:, :, None] * v0, 0.0), axis=1)
    gae = tl.where(keep, L0 * hprev, 0.0)
    ga = gae
    if TAU == 1:
        gr = gae
    else:
        gr = tl.where(keep, L0 * hdel, 0.0)
    if FIX_H:
        t1m = (tt == t1)[:, None, None]
        ga = ga + tl.where(t1m & smask3, L0 * cdiff[None, :, :], 0.0)
        gcd = gcd + tl.sum(tl.where(t1m, L0 * a, 0.0), axis=0)
    gadA = tl.sum(ga * dA, axis=2)
    if TAU > 0:
        grs = tl.sum(gr, axis=2)
        gdA = ga * (al * (1.0 - rho_c[None, :]))[:, :, None]
        gal = gadA * (1.0 - rho_c[None, :]) + grs * rho_c[None, :]
        grho = grho + tl.sum(al * (grs - gadA), axis=0)
    else:
        gdA = ga * al[:, :, None]
        gal = gadA
    gdAe = tl.where(smask3, gdA * dA, 0.0)
    gdt = gdt + tl.sum(gdAe * A[None, :, :], axis=2)
    gA = gA + tl.sum(gdAe * dt[:, :, None], axis=0)
    if SOFTPLUS:
        gx = gdt * tl.where(dt_in > 20.0, 1.0, tl.sigmoid(dt_in))
    else:
        gx = gdt
    gx = tl.where(real2, gx, 0.0)
    gbias = gbias + tl.sum(gx, axis=0)
    gro = pid_b * s_u_b + tt[:, None] * s_u_t + ch[None, :]  # gradient tensors are contiguous like u
    tl.store(gu_ptr + gro, gu.to(gu_ptr.dtype.element_ty), mask=cm2)
    tl.store(gdt_ptr + gro, gx.to(gdt_ptr.dtype.element_ty), mask=cm2)
    if HAS_Z:
        tl.store(gz_ptr + gro, tl.where(real2, gz, 0.0).to(gz_ptr.dtype.element_ty), mask=cm2)
    if HAS_ALPHA:
        galg = tl.sum(tl.reshape(tl.where(cmask[None, :], gal, 0.0), [BT, BG, GP]), axis=2)
        tl.store(gal_ptr + (pid_b * T + tt[:, None]) * NG + offs_g[None, :], galg.to(gal_ptr.dtype.element_ty),
                 mask=(tt < T)[:, None] & gmask[None, :])
    part = ((pid_b * T + tt[:, None]) * n_cb + pid_c) * N + offs_n[None, :]
    nm2 = (tt < T)[:, None] & nmask[None, :]
    tl.store(gB_ptr + part, gB_t, mask=nm2)
    tl.store(gC_ptr + part, gC_t, mask=nm2)
    # --- the carry's adjoint before the block: M_0^T λ_0
    R0 = _row(L0, first)
    a0 = _row(ae, first)
    real0 = tl.sum(tl.where(offs_i == 0, real.to(tl.int32), 0), axis=0) > 0
    if MS == 1:
        G0 = tl.where(real0, a0 * R0, R0)
    else:
        R1 = _row(L1, first)
        r0 = _row(r3, first)
        if MS == 2:
            G0 = tl.where(real0, a0 * R0 + R1, R0)
            G1 = tl.where(real0, r0 * R0, R1)
        elif MS == 3:
            R2 = _row(L2, first)
            G0 = tl.where(real0, a0 * R0 + R1, R0)
            G1 = tl.where(real0, R2, R1)
            G2 = tl.where(real0, r0 * R0, R2)
        else:
            R2 = _row(L2, first)
            R3 = _row(L3, first)
            G0 = tl.where(real0, a0 * R0 + R1, R0)
            G1 = tl.where(real0, R2, R1)
            G2 = tl.where(real0, R3, R2)
            G3 = tl.where(real0, r0 * R0, R3)
    return G0, G1, G2, G3, gk, ge, gA, gcd, gbias, gDp, gwr, grho, geta, glam


# ---------------------------------------------------------------------------------- kernel
@triton.jit
def _chunk_bwd_kernel(
    ins, prm, strides, scalars, dims, clock, carries,  # the forward's groups (ARG_GROUPS)
    h0_ptr, gy_ptr, n_cb,
    scratch,  # (b, SEG, ...): the start carries of one segment's blocks
    gstateT,  # gradients of the final state (fp32)
    gins,  # per-step gradients (u, Δ, z, α), contiguous like their inputs
    gBC,  # partials (b, T, n_cb, N) fp32
    gprm,  # partials of prm's members: (b, d, N), (b, d) × 3, (b, ng) × 3, fp32
    gstate0,  # gradients of the initial state (fp32)
    G: tl.constexpr, GP: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, MS: tl.constexpr,
    TAU: tl.constexpr, CONTROL: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr,
    NOISE_W: tl.constexpr, NOISE_V: tl.constexpr, FIX_H: tl.constexpr, HAS_GFINAL: tl.constexpr,
    SEG: tl.constexpr, ALIGNED: tl.constexpr,
):
    u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, al_ptr, m_ptr = ins
    A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr = prm
    s_u_b, s_u_t, s_dt_b, s_dt_t, s_z_b, s_z_t, s_B_b, s_B_t, s_C_b, s_C_t, s_al_b, s_al_t = strides
    k_max, sigma_w, sigma_v, seed_key = scalars
    T, d, NG, N, n_blk, n_ck, period = dims
    ph_ptr, t1_ptr = clock
    ck_s_ptr, ck_k_ptr, ck_e_ptr = carries
    sc_s_ptr, sc_k_ptr, sc_e_ptr = scratch
    ghT_ptr, glineT_ptr, gkT_ptr, geT_ptr = gstateT
    gu_ptr, gdt_ptr, gz_ptr, gal_ptr = gins
    gB_ptr, gC_ptr = gBC
    gA_ptr, gbias_ptr, gD_ptr, gwr_ptr, grho_ptr, geta_ptr, glam_ptr = gprm
    gh0_ptr, gline0_ptr, gk0_ptr, ge0_ptr = gstate0
    BC: tl.constexpr = BG * GP
    pid_b = tl.program_id(0).to(tl.int64)
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
    zero3 = tl.zeros([BT, BC, NP], tl.float32)
    idxp = tl.maximum(offs_i - 1, 0)[:, None, None] + zero3.to(tl.int32)  # previous position
    idxn = tl.minimum(offs_i + 1, BT - 1)[:, None, None] + zero3.to(tl.int32)  # next position
    idxn1 = tl.minimum(offs_i + 1, BT - 1)
    smask3 = smask[None, :, :]

    t1 = -1
    cdiff = tl.zeros([BC, NP], tl.float32)
    gh0 = tl.zeros([BC, NP], tl.float32)
    if FIX_H:
        t1 = tl.load(t1_ptr + pid_b)
        h0 = tl.load(h0_ptr + pid_b * sd + sidx, mask=smask, other=0.0)
        cdiff = h0 - tl.load(ck_s_ptr + pid_b * n_ck * MS * sd + sidx, mask=smask, other=0.0)
    # the adjoint of the carry after the current block, seeded by the final state's gradients
    G0 = tl.zeros([BC, NP], tl.float32)
    G1 = G0
    G2 = G0
    G3 = G0
    gk = tl.zeros([BG], tl.float32)
    ge = tl.zeros([BC], tl.float32)
    if HAS_GFINAL:
        if TAU == 0:
            G0 = tl.load(ghT_ptr + pid_b * sd + sidx, mask=smask, other=0.0)
        else:
            G0, G1, G2, G3 = _load_S(glineT_ptr + pid_b * TAU * sd, sd, sidx, smask, MS, NP, BC)
            ghT = tl.load(ghT_ptr + pid_b * sd + sidx, mask=smask, other=0.0)
            if FIX_H:  # with no real step the final h is the initial one
                G0 = G0 + tl.where(t1 >= 0, ghT, 0.0)
                gh0 = tl.where(t1 >= 0, 0.0, ghT)
            else:
                G0 = G0 + ghT
        if CONTROL:
            gk = tl.load(gkT_ptr + pid_b * NG + offs_g, mask=gmask, other=0.0)
            ge = tl.load(geT_ptr + pid_b * d + ch, mask=cmask, other=0.0)
    gA = tl.zeros([BC, NP], tl.float32)
    gcd = tl.zeros([BC, NP], tl.float32)
    gbias = tl.zeros([BC], tl.float32)
    gDp = tl.zeros([BC], tl.float32)
    gwr = tl.zeros([BC], tl.float32)
    grho = tl.zeros([BC], tl.float32)
    geta = tl.zeros([BG], tl.float32)
    glam = tl.zeros([BG], tl.float32)

    u_b = u_ptr + pid_b * s_u_b
    dt_b = dt_ptr + pid_b * s_dt_b
    z_b = z_ptr + pid_b * s_z_b
    B_b = B_ptr + pid_b * s_B_b
    C_b = C_ptr + pid_b * s_C_b
    al_b = al_ptr + pid_b * s_al_b
    m_b = m_ptr + pid_b * T
    ph_b = ph_ptr + pid_b * n_blk

    for si in range(0, n_ck):
        sg = n_ck - 1 - si  # segments of SEG blocks, last to first
        b0 = sg * SEG
        nb = tl.minimum(n_blk - b0, SEG)
        # --- the segment's forward from its checkpoint, keeping each block's start carry
        ckr = pid_b * n_ck + sg
        S0, S1, S2, S3 = _load_S(ck_s_ptr + ckr * MS * sd, sd, sidx, smask, MS, NP, BC)
        kg = tl.zeros([BG], tl.float32)
        e = tl.zeros([BC], tl.float32)
        if CONTROL:
            kg = tl.load(ck_k_ptr + ckr * NG + offs_g, mask=gmask, other=0.0)
            e = tl.load(ck_e_ptr + ckr * d + ch, mask=cmask, other=0.0)
        _store_S(sc_s_ptr + pid_b * SEG * MS * sd, sd, sidx, smask, S0, S1, S2, S3, MS)
        if CONTROL:
            tl.store(sc_k_ptr + pid_b * SEG * NG + offs_g, kg, mask=gmask)
            tl.store(sc_e_ptr + pid_b * SEG * d + ch, e, mask=cmask)
        for j in range(1, nb):
            blk = b0 + j - 1
            tt, yb, S0n, S1n, S2n, S3n, kg, e = _fwd_block(
                S0, S1, S2, S3, kg, e, blk, blk * BT, T, ph_b, t1, cdiff, period,
                u_b, dt_b, z_b, B_b, C_b, al_b, m_b, s_u_t, s_dt_t, s_z_t, s_B_t, s_C_t, s_al_t,
                offs_i, offs_n, nmask, grp, ch, cmask, smask, first, last,
                A, bias, Dp, wr, rho_c, eta, lam, k_max, kb, lane_w, lane_v, sigma_w, sigma_v,
                G, GP, BG, BT, MS, TAU, CONTROL, HAS_ALPHA, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z, HAS_MASK,
                NOISE_W, NOISE_V, FIX_H, ALIGNED)
            S0, S1, S2, S3 = S0n, S1n, S2n, S3n
            srow = pid_b * SEG + j
            _store_S(sc_s_ptr + srow * MS * sd, sd, sidx, smask, S0, S1, S2, S3, MS)
            if CONTROL:
                tl.store(sc_k_ptr + srow * NG + offs_g, kg, mask=gmask)
                tl.store(sc_e_ptr + srow * d + ch, e, mask=cmask)
        tl.debug_barrier()
        for jj in range(0, nb):
            j = nb - 1 - jj
            blk = b0 + j
            t0 = blk * BT
            srow = pid_b * SEG + j
            # --- recompute the block's forward from its start carry
            S0, S1, S2, S3 = _load_S(sc_s_ptr + srow * MS * sd, sd, sidx, smask, MS, NP, BC)
            kg = tl.zeros([BG], tl.float32)
            e = tl.zeros([BC], tl.float32)
            if CONTROL:
                kg = tl.load(sc_k_ptr + srow * NG + offs_g, mask=gmask, other=0.0)
                e = tl.load(sc_e_ptr + srow * d + ch, mask=cmask, other=0.0)
            G0, G1, G2, G3, gk, ge, gA, gcd, gbias, gDp, gwr, grho, geta, glam = _bwd_block(
                S0, S1, S2, S3, kg, e, G0, G1, G2, G3, gk, ge, gA, gcd, gbias, gDp, gwr, grho, geta, glam,
                blk, t0, T, ph_ptr, pid_b, n_blk, t1, cdiff, period,
                u_b, dt_b, z_b, B_b, C_b, al_b, m_b, s_u_t, s_dt_t, s_z_t, s_B_t, s_C_t, s_al_t,
                gy_ptr, s_u_b, gu_ptr, gdt_ptr, gz_ptr, gal_ptr, gB_ptr, gC_ptr, pid_c, n_cb, N, NG,
                offs_i, offs_n, offs_g, nmask, gmask, grp, ch, cmask, smask, smask3, first, last,
                zero3, idxp, idxn, idxn1,
                A, bias, Dp, wr, rho_c, eta, lam, k_max, kb, lane_w, lane_v, sigma_w, sigma_v,
                G, GP, BG, NP, BT, MS, TAU, CONTROL, HAS_ALPHA, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z, HAS_MASK,
                NOISE_W, NOISE_V, FIX_H, ALIGNED)
        tl.debug_barrier()  # the next segment rewrites the scratch

    if TAU == 0:
        tl.store(gh0_ptr + pid_b * sd + sidx, G0, mask=smask)
    else:
        if FIX_H:
            G0 = G0 - gcd
            gh0 = gh0 + gcd
        _store_S(gline0_ptr + pid_b * TAU * sd, sd, sidx, smask, G0, G1, G2, G3, MS)
        tl.store(gh0_ptr + pid_b * sd + sidx, gh0, mask=smask)
    if CONTROL:
        tl.store(gk0_ptr + pid_b * NG + offs_g, gk, mask=gmask)
        tl.store(ge0_ptr + pid_b * d + ch, ge, mask=cmask)
        tl.store(gwr_ptr + pid_b * d + ch, gwr, mask=cmask)
        tl.store(geta_ptr + pid_b * NG + offs_g, geta, mask=gmask)
        tl.store(glam_ptr + pid_b * NG + offs_g, glam, mask=gmask)
    tl.store(gA_ptr + pid_b * sd + sidx, gA, mask=smask)
    tl.store(gbias_ptr + pid_b * d + ch, gbias, mask=cmask)
    tl.store(gD_ptr + pid_b * d + ch, gDp, mask=cmask)
    if TAU > 0:
        tl.store(grho_ptr + pid_b * NG + offs_g, _gsum(tl.where(cmask, grho, 0.0), BG, GP), mask=gmask)


# ---------------------------------------------------------------------------------- launcher
def chunk_conba_bwd(cfg: ScanConfig, blocking: tuple, args: tuple, ph, t1, carries, gy, gfinal) -> tuple:
    """Launch the backward: ``cfg`` and ``ph`` are the backward's (its blocks may be shorter than the forward's;
    its checkpoint_interval is the forward's), ``args`` the forward's inputs (host.scan_args' order; the initial
    line, k and e are not read), ``carries`` the forward's saved carries, ``gy`` and ``gfinal`` (h, line, k, e)
    the gradients of the output and the final state (None: zero). Returns the gradients of ``args``."""
    u, delta, A, z, alpha, h0 = args[0], args[1], args[2], args[6], args[8], args[13]
    b, T, d = u.shape
    n = A.shape[1]
    G, tau = cfg.group_size, cfg.tau
    ms, ng = max(tau, 1), d // G
    gp, bg, np_, n_cb, num_warps = blocking
    n_blk = triton.cdiv(T, cfg.block_t)
    seg = cfg.checkpoint_interval // cfg.block_t  # the backward's blocks between two of the forward's saved carries
    gy, gstateT, has_gfinal, gins, gBC, gprm, gstate0, dummy = bwd_buffers(cfg, u, delta, z, alpha, n, n_cb, gy,
                                                                           gfinal)
    f32 = dict(device=u.device, dtype=torch.float32)
    sc = (torch.empty(b, seg, ms, d, n, **f32), torch.empty(b, seg, ng, **f32) if cfg.control else dummy,
          torch.empty(b, seg, d, **f32) if cfg.control else dummy)
    ins, prm, strides, scalars, _ = kernel_groups(cfg, args, dummy)
    _chunk_bwd_kernel[(b, n_cb)](
        ins, prm, strides, scalars, (T, d, ng, n, n_blk, triton.cdiv(n_blk, seg), cfg.period), (ph, t1),
        tuple(carries), h0, gy, n_cb, sc, gstateT, gins, gBC, gprm, state_group(cfg, gstate0, dummy),
        G=G, GP=gp, BG=bg, NP=np_, BT=cfg.block_t, MS=ms, HAS_GFINAL=has_gfinal, SEG=seg, **cfg.flags(),
        num_warps=num_warps,
    )
    return input_grads(cfg, args, gins, gBC, gprm, gstate0)
