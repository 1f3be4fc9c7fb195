"""Fused Conba kernels in Triton, per step: the prefill scan for P = 1, its backward, and the decode step
(every P).

The recurrence of docs/conba.md (step 6) feeds the output back into the next step's input,
so it is not associative and cannot use Mamba's parallel scan. These kernels run it
sequentially in time and in parallel over (batch, block of control groups): a control group's
channels share their gain, and groups never talk to each other, so one program owns whole
groups and needs no communication but a sum over the group for the gain update.

Layout inside a program: the state is a register tile ``[N, groups, G]`` (state index first),
one warp per 32 channels (8 channels per one-warp program at small batch, see `_channels`). The
delay line (τ ≤ 4) lives in registers (``D0..D3``), the gain per group, the error per channel.
The next step's inputs are loaded before the current step's arithmetic, so their latency overlaps
the dependency chain. The helpers the kernels share are in `fused_recurrent_common.py`, the host
side shared with the chunk-parallel scan (`chunk.py`) in `host.py`.

Backward: the forward saves the full state every ``CHECKPOINT_INTERVAL`` steps. The backward walks
the segments between checkpoints from last to first; for each it recomputes the segment's forward
from its checkpoint, writing the pre-step states (h, the delay line's last entry, k, e) to a
per-program scratch, then runs the reverse-time adjoint over the segment. Noise is regenerated
from its counter-based key (noise.py), never stored. Per-(batch, time) gradients of B and C and
the per-parameter gradients are written as per-program partials and summed afterwards
(deterministic, no atomics).

Numerics: every recurrence quantity is float32 whatever the input dtype; tanh, softplus and its
log1p are written with exact-path formulas (no libdevice), so the same code runs in Triton's
interpreter on CPU, where the tests check it against the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _mix32, _normal, _softplus, _tanh
from .fused_recurrent_common import (_dlast, _fwd_step, _load_params, _load_state, _load_step, _store_state,
                                     _tile)
from .host import ARG_GROUPS as _SCAN_GROUPS
from .host import (CHECKPOINT_INTERVAL, ScanConfig, _rows, _seed_key, bwd_buffers, empty_scan, fwd_buffers,
                   input_grads, kernel_groups, scan_args, start_state, state_group)
from .params import ConbaParams, ConbaState, keyword_interface

ARG_GROUPS = _SCAN_GROUPS["fused_recurrent"]  # the kernels' grouped arguments (host.py; kernel_report reads them here)


# ---------------------------------------------------------------------------------- forward
@triton.jit
def _conba_fwd_kernel(
    ins, prm, strides, scalars, dims, carries,  # grouped as in the backward (ARG_GROUPS)
    state0,  # initial state (b, d, N), (b, τ, d, N), (b, ng), (b, d)
    y_ptr,
    stateT,  # final state, same shapes
    G: tl.constexpr, GP: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr, CHECKPOINT_INTERVAL: tl.constexpr,
    TAU: tl.constexpr, CONTROL: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr,
    NOISE_W: tl.constexpr, NOISE_V: tl.constexpr, SAVE: tl.constexpr,
):
    u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, al_ptr, m_ptr = ins
    A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr = prm
    s_u_b, s_u_t, s_dt_b, s_dt_t, s_z_b, s_z_t, s_B_b, s_B_t, s_C_b, s_C_t, s_al_b, s_al_t = strides
    k_max, sigma_w, sigma_v, seed_key = scalars
    T, d, NG, N, n_ck = dims
    ck_h_ptr, ck_line_ptr, ck_k_ptr, ck_e_ptr = carries
    h0_ptr, line0_ptr, k0_ptr, e0_ptr = state0
    hT_ptr, lineT_ptr, kT_ptr, eT_ptr = stateT
    pid_b = tl.program_id(0).to(tl.int64)  # batch offsets (b·T·d, checkpoints) can pass 2^31
    pid_g = tl.program_id(1)
    offs_n, offs_g, nmask, gmask, cmask, ch, smask, sidx, lane_w, lane_v, kb = _tile(
        pid_b, pid_g, N, NG, seed_key, G, GP, BG, NP)

    A, bias, Dp, wr, rho, eta, lam = _load_params(
        A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr, sidx, smask, ch, cmask, offs_g, gmask,
        BG, GP, TAU, CONTROL, HAS_BIAS, HAS_D)

    sd = d * N
    h, D0, D1, D2, D3, k, e = _load_state(h0_ptr, line0_ptr, k0_ptr, e0_ptr, pid_b, sd, NG, d, sidx, smask,
                                          offs_g, gmask, ch, cmask, TAU, CONTROL, NP, BG, GP)

    u_b = u_ptr + pid_b * s_u_b
    dt_b = dt_ptr + pid_b * s_dt_b
    z_b = z_ptr + pid_b * s_z_b
    B_b = B_ptr + pid_b * s_B_b
    C_b = C_ptr + pid_b * s_C_b
    al_b = al_ptr + pid_b * s_al_b
    m_b = m_ptr + pid_b * T
    y_b = y_ptr + pid_b * s_u_b  # y is allocated like a contiguous u

    # prefetch step 0
    u, dt_in, z, Bv, Cv, a, m = _load_step(u_b, dt_b, z_b, B_b, C_b, al_b, m_b, 0, T,
                                           s_u_t, s_dt_t, s_z_t, s_B_t, s_C_t, s_al_t,
                                           ch, cmask, offs_n, nmask, offs_g, gmask, HAS_Z, HAS_ALPHA, HAS_MASK)
    for t in range(0, T):
        if SAVE:
            is_ck = (t % CHECKPOINT_INTERVAL) == 0
            _store_state(ck_h_ptr, ck_line_ptr, ck_k_ptr, ck_e_ptr, pid_b * n_ck + t // CHECKPOINT_INTERVAL, sd, NG, d,
                         h, D0, D1, D2, D3, k, e, sidx, smask & is_ck, offs_g, gmask & is_ck, ch, cmask & is_ck,
                         TAU, CONTROL)
        # issue the next step's loads before this step's dependency chain
        u_n, dt_n, z_n, B_n, C_n, a_n, m_n = _load_step(u_b, dt_b, z_b, B_b, C_b, al_b, m_b, t + 1, T,
                                                        s_u_t, s_dt_t, s_z_t, s_B_t, s_C_t, s_al_t,
                                                        ch, cmask, offs_n, nmask, offs_g, gmask,
                                                        HAS_Z, HAS_ALPHA, HAS_MASK)
        key = _mix32(kb ^ tl.cast(t, tl.uint32))
        y, h, D0, D1, D2, D3, k, e = _fwd_step(
            h, D0, D1, D2, D3, k, e, u, dt_in, z, Bv, Cv, a, m, m,
            A, bias, Dp, wr, rho, eta, lam, k_max, sigma_w, sigma_v, key, lane_w, lane_v, smask, cmask,
            G, TAU, CONTROL, HAS_ALPHA, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z, NOISE_W, NOISE_V)
        tl.store(y_b + t * s_u_t + ch, y.to(y_ptr.dtype.element_ty), mask=cmask)
        u, dt_in, z, Bv, Cv, a, m = u_n, dt_n, z_n, B_n, C_n, a_n, m_n

    _store_state(hT_ptr, lineT_ptr, kT_ptr, eT_ptr, pid_b, sd, NG, d, h, D0, D1, D2, D3, k, e,
                 sidx, smask, offs_g, gmask, ch, cmask, TAU, CONTROL)


# ---------------------------------------------------------------------------------- backward
@triton.jit
def _conba_bwd_kernel(
    ins, prm, strides, scalars, dims, carries,  # the forward's groups (ARG_GROUPS)
    gy_ptr, n_cb,
    gstateT,  # gradients of the final state (fp32)
    scratch,  # (b, CHECKPOINT_INTERVAL, ...) of pre-step states
    gins,  # per-step gradients (u, Δ, z, α), contiguous like their inputs
    gBC,  # partials (b, T, n_cb, N) fp32
    gprm,  # partials of prm's members: (b, d, N), (b, d) × 3, (b, ng) × 3, fp32
    gstate0,  # gradients of the initial state (fp32)
    G: tl.constexpr, GP: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr, CHECKPOINT_INTERVAL: tl.constexpr,
    TAU: tl.constexpr, CONTROL: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr,
    NOISE_W: tl.constexpr, NOISE_V: tl.constexpr, HAS_GFINAL: tl.constexpr,
):
    u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, al_ptr, m_ptr = ins
    A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr = prm
    s_u_b, s_u_t, s_dt_b, s_dt_t, s_z_b, s_z_t, s_B_b, s_B_t, s_C_b, s_C_t, s_al_b, s_al_t = strides
    k_max, sigma_w, sigma_v, seed_key = scalars
    T, d, NG, N, n_ck = dims
    ck_h_ptr, ck_line_ptr, ck_k_ptr, ck_e_ptr = carries
    ghT_ptr, glineT_ptr, gkT_ptr, geT_ptr = gstateT
    sc_h_ptr, sc_line_ptr, sc_k_ptr, sc_e_ptr = scratch
    gu_ptr, gdt_ptr, gz_ptr, gal_ptr = gins
    gB_ptr, gC_ptr = gBC
    gA_ptr, gbias_ptr, gD_ptr, gwr_ptr, grho_ptr, geta_ptr, glam_ptr = gprm
    gh0_ptr, gline0_ptr, gk0_ptr, ge0_ptr = gstate0
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
        gh, gD0, gD1, gD2, gD3, gk, ge = _load_state(ghT_ptr, glineT_ptr, gkT_ptr, geT_ptr, pid_b, sd, NG, d, sidx,
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
    dt_b = dt_ptr + pid_b * s_dt_b
    z_b = z_ptr + pid_b * s_z_b
    B_b = B_ptr + pid_b * s_B_b
    C_b = C_ptr + pid_b * s_C_b
    al_b = al_ptr + pid_b * s_al_b
    m_b = m_ptr + pid_b * T
    sc_h = sc_h_ptr + pid_b * CHECKPOINT_INTERVAL * sd
    sc_line = sc_line_ptr + pid_b * CHECKPOINT_INTERVAL * sd
    sc_k = sc_k_ptr + pid_b * CHECKPOINT_INTERVAL * NG
    sc_e = sc_e_ptr + pid_b * CHECKPOINT_INTERVAL * d

    for si in range(0, n_ck):
        sg = n_ck - 1 - si  # segments between checkpoints, last to first
        t0 = sg * CHECKPOINT_INTERVAL
        t1 = tl.minimum(t0 + CHECKPOINT_INTERVAL, T)
        # --- recompute the segment's forward from its checkpoint, keeping the pre-step states
        h, D0, D1, D2, D3, k, e = _load_state(ck_h_ptr, ck_line_ptr, ck_k_ptr, ck_e_ptr, pid_b * n_ck + sg, sd,
                                              NG, d, sidx, smask, offs_g, gmask, ch, cmask, TAU, CONTROL, NP, BG, GP)
        for t in range(t0, t1):
            s = t - t0
            tl.store(sc_h + s * sd + sidx, h, mask=smask)
            if TAU > 0:
                tl.store(sc_line + s * sd + sidx, _dlast(D0, D1, D2, D3, TAU), mask=smask)
            if CONTROL:
                tl.store(sc_k + s * NG + offs_g, k, mask=gmask)
                tl.store(sc_e + s * d + ch, e, mask=cmask)
            u, dt_in, z, Bv, Cv, a, m = _load_step(u_b, dt_b, z_b, B_b, C_b, al_b, m_b, t, T,
                                                   s_u_t, s_dt_t, s_z_t, s_B_t, s_C_t, s_al_t,
                                                   ch, cmask, offs_n, nmask, offs_g, gmask,
                                                   HAS_Z, HAS_ALPHA, HAS_MASK)
            key = _mix32(kb ^ tl.cast(t, tl.uint32))
            y, h, D0, D1, D2, D3, k, e = _fwd_step(
                h, D0, D1, D2, D3, k, e, u, dt_in, z, Bv, Cv, a, m, m,
                A, bias, Dp, wr, rho, eta, lam, k_max, sigma_w, sigma_v, key, lane_w, lane_v, smask, cmask,
                G, TAU, CONTROL, HAS_ALPHA, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z, NOISE_W, NOISE_V)
        tl.debug_barrier()
        # --- reverse-time adjoint over the segment
        for tt in range(0, t1 - t0):
            t = t1 - 1 - tt
            s = t - t0
            hprev = tl.load(sc_h + s * sd + sidx, mask=smask, other=0.0)
            if TAU > 0:
                hdel = tl.load(sc_line + s * sd + sidx, mask=smask, other=0.0)
            else:
                hdel = hprev
            if CONTROL:
                k = tl.load(sc_k + s * NG + offs_g, mask=gmask, other=0.0)
                e = tl.load(sc_e + s * d + ch, mask=cmask, other=0.0)
            u, dt_in, z, Bv, Cv, a, m = _load_step(u_b, dt_b, z_b, B_b, C_b, al_b, m_b, t, T,
                                                   s_u_t, s_dt_t, s_z_t, s_B_t, s_C_t, s_al_t,
                                                   ch, cmask, offs_n, nmask, offs_g, gmask,
                                                   HAS_Z, HAS_ALPHA, HAS_MASK)
            go = tl.load(gy_ptr + pid_b * s_u_b + t * s_u_t + ch, mask=cmask, other=0.0).to(tl.float32)
            key = _mix32(kb ^ tl.cast(t, tl.uint32))
            # recompute the step's intermediates
            x = dt_in
            if HAS_BIAS:
                x = dt_in + bias
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
                gline_new = r3 * ghp
            else:
                gh_prev = dA * ghp
                gdA = ghp * hprev
                grho_t = tl.zeros([BG], tl.float32)
                gline_new = gh_prev
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
                    gD0 = tl.where(m3, gline_new, gD0)
                elif TAU == 2:
                    gD0 = tl.where(m3, gD1, gD0)
                    gD1 = tl.where(m3, gline_new, gD1)
                elif TAU == 3:
                    gD0 = tl.where(m3, gD1, gD0)
                    gD1 = tl.where(m3, gD2, gD1)
                    gD2 = tl.where(m3, gline_new, gD2)
                else:
                    gD0 = tl.where(m3, gD1, gD0)
                    gD1 = tl.where(m3, gD2, gD1)
                    gD2 = tl.where(m3, gD3, gD2)
                    gD3 = tl.where(m3, gline_new, gD3)
            gh = tl.where(m3, gh_prev, gh)
            gro = pid_b * s_u_b + t * s_u_t + ch  # gradient tensors are contiguous like u
            tl.store(gu_ptr + gro, tl.where(m, gu, 0.0).to(gu_ptr.dtype.element_ty), mask=cmask)
            tl.store(gdt_ptr + gro, tl.where(m, gx, 0.0).to(gdt_ptr.dtype.element_ty), mask=cmask)
            if HAS_Z:
                tl.store(gz_ptr + gro, tl.where(m, gz, 0.0).to(gz_ptr.dtype.element_ty), mask=cmask)
            if HAS_ALPHA:
                tl.store(gal_ptr + (pid_b * T + t) * NG + offs_g, tl.where(mg, gal_t, 0.0).to(gal_ptr.dtype.element_ty),
                         mask=gmask)
            part = ((pid_b * T + t) * n_cb + pid_g) * N + offs_n
            tl.store(gB_ptr + part, gB_t, mask=nmask)
            tl.store(gC_ptr + part, gC_t, mask=nmask)
        tl.debug_barrier()

    _store_state(gh0_ptr, gline0_ptr, gk0_ptr, ge0_ptr, pid_b, sd, NG, d, gh, gD0, gD1, gD2, gD3, gk, ge,
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
    u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, al_ptr, m_ptr, y_ptr,
    A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr,
    h_ptr, line_ptr, k_ptr, e_ptr, ph_ptr,  # the state, read and written in place (ph: int64 phase)
    d, NG, N, t_idx, period,
    s_u_b, s_dt_b, s_z_b, s_B_b, s_C_b, s_al_b, s_y_b,
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
    u, dt_in, z, Bv, Cv, a, m = _load_step(u_ptr + pid_b * s_u_b, dt_ptr + pid_b * s_dt_b, z_ptr + pid_b * s_z_b,
                                           B_ptr + pid_b * s_B_b, C_ptr + pid_b * s_C_b, al_ptr + pid_b * s_al_b,
                                           m_ptr + pid_b, 0, 1, 0, 0, 0, 0, 0, 0,
                                           ch, cmask, offs_n, nmask, offs_g, gmask, HAS_Z, HAS_ALPHA, HAS_MASK)
    h, D0, D1, D2, D3, k, e = _load_state(h_ptr, line_ptr, k_ptr, e_ptr, pid_b, sd, NG, d, sidx, smask,
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
        h, D0, D1, D2, D3, k, e, u, dt_in, z, Bv, Cv, a, m, ctl,
        A, bias, Dp, wr, rho, eta, lam, k_max, sigma_w, sigma_v, key, lane_w, lane_v, smask, cmask,
        G, TAU, CONTROL, HAS_ALPHA, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z, NOISE_W, NOISE_V)
    tl.store(y_ptr + pid_b * s_y_b + ch, y.to(y_ptr.dtype.element_ty), mask=cmask)
    _store_state(h_ptr, line_ptr, k_ptr, e_ptr, pid_b, sd, NG, d, h, D0, D1, D2, D3, k, e,
                 sidx, smask, offs_g, gmask, ch, cmask, TAU, CONTROL)


# ---------------------------------------------------------------------------------- Python side
# channels per program (whole groups, a power of two; None: by batch, see _channels), the cap on warps,
# and the backward's channels per warp (the forward has one warp per 32 channels). `mixcon bench conba-tune`
# sweeps them on a GPU; docs/kernels.md ("Spills") has the backward's spills at either setting.
TUNING = dict(channels=None, max_warps=4, bwd_channels_per_warp=32)


def _channels(batch: int, d: int) -> int:
    """Channels per program: 8 (one-warp programs, several per SM: a step is a latency-bound chain) until
    32-channel programs number 512 or more (batch ≥ 4 at d_inner 4096), then 32 — the measured crossover
    (docs/kernels.md, "Channels per program")."""
    if TUNING["channels"] is not None:
        return TUNING["channels"]
    return 32 if batch * d // 32 >= 512 else 8


def _blocking(d: int, group_size: int, n: int, batch: int = 1, backward: bool = False):
    """(GP, BG, NP, n_cb, num_warps): whole groups of about `_channels` channels per program,
    one warp per 32 channels (the backward: per TUNING["bwd_channels_per_warp"])."""
    gp = triton.next_power_of_2(group_size)
    ng = d // group_size
    ch = _channels(batch, d)
    bg = max(1, min(ch // gp if gp <= ch else 1, triton.next_power_of_2(ng)))
    per_warp = TUNING["bwd_channels_per_warp"] if backward else 32
    num_warps = max(1, min(TUNING["max_warps"], (bg * gp) // per_warp))
    return gp, bg, triton.next_power_of_2(n), triton.cdiv(ng, bg), num_warps


def fused_recurrent_conba_fwd(cfg: ScanConfig, args: tuple, save: bool):
    """Launch the forward over ``args`` (host.scan_args' order): y, the final state (h, line, k, e) and, with
    ``save``, the state at every checkpoint for the backward (dummies otherwise)."""
    u, A = args[0], args[2]
    b, T, d = u.shape
    n = A.shape[1]
    G, tau = cfg.group_size, cfg.tau
    ng = d // G
    gp, bg, np_, n_cb, num_warps = _blocking(d, G, n, b)
    n_ck = triton.cdiv(T, cfg.checkpoint_interval)
    y, final, dummy = fwd_buffers(cfg, u, n)
    f32 = dict(device=u.device, dtype=torch.float32)
    ck = (dummy,) * 4
    if save:
        ck = (torch.empty(b, n_ck, d, n, **f32), torch.empty(b, n_ck, tau, d, n, **f32) if tau else dummy,
              torch.empty(b, n_ck, ng, **f32) if cfg.control else dummy,
              torch.empty(b, n_ck, d, **f32) if cfg.control else dummy)
    ins, prm, strides, scalars, state0 = kernel_groups(cfg, args, dummy)
    _conba_fwd_kernel[(b, n_cb)](
        ins, prm, strides, scalars, (T, d, ng, n, n_ck), ck, state0, y, state_group(cfg, final, dummy),
        G=G, GP=gp, BG=bg, NP=np_, CHECKPOINT_INTERVAL=cfg.checkpoint_interval, SAVE=save, **cfg.flags(),
        num_warps=num_warps,
    )
    return y, final, ck


def fused_recurrent_conba_bwd(cfg: ScanConfig, args: tuple, checkpoints, gy, gfinal) -> tuple:
    """Launch the backward: ``args`` the forward's inputs (host.scan_args' order; the initial state is not
    read), ``checkpoints`` its saved states, ``gy`` and ``gfinal`` (h, line, k, e) the gradients of the output
    and the final state (None: zero). Returns the gradients of ``args``."""
    u, delta, A, z, alpha = args[0], args[1], args[2], args[6], args[8]
    b, T, d = u.shape
    n = A.shape[1]
    G, tau = cfg.group_size, cfg.tau
    ng = d // G
    gp, bg, np_, n_cb, num_warps = _blocking(d, G, n, b, backward=True)
    gy, gstateT, has_gfinal, gins, gBC, gprm, gstate0, dummy = bwd_buffers(cfg, u, delta, z, alpha, n, n_cb, gy,
                                                                           gfinal)
    f32 = dict(device=u.device, dtype=torch.float32)
    rows = cfg.checkpoint_interval  # the kernel strides the per-row scratch by the interval, even when T is shorter
    sc = (torch.empty(b, rows, d, n, **f32), torch.empty(b, rows, d, n, **f32) if tau else dummy,
          torch.empty(b, rows, ng, **f32) if cfg.control else dummy,
          torch.empty(b, rows, d, **f32) if cfg.control else dummy)
    ins, prm, strides, scalars, _ = kernel_groups(cfg, args, dummy)
    _conba_bwd_kernel[(b, n_cb)](
        ins, prm, strides, scalars, (T, d, ng, n, triton.cdiv(T, cfg.checkpoint_interval)), tuple(checkpoints),
        gy, n_cb, gstateT, sc, gins, gBC, gprm, state_group(cfg, gstate0, dummy),
        G=G, GP=gp, BG=bg, NP=np_, CHECKPOINT_INTERVAL=cfg.checkpoint_interval, HAS_GFINAL=has_gfinal,
        **cfg.flags(), num_warps=num_warps,
    )
    return input_grads(cfg, args, gins, gBC, gprm, gstate0)


class _FusedRecurrentScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, *args):
        y, final, ck = fused_recurrent_conba_fwd(cfg, args, save=True)
        u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, h0, line0, k_init, e0, mask = args
        ctx.cfg = cfg
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, mask, *ck)
        ctx.set_materialize_grads(False)
        return (y, *final)

    @staticmethod
    def backward(ctx, gy, ghT, glineT, gkT, geT):
        u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, mask, *ck = ctx.saved_tensors
        args = (u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, None, None, None, None, mask)
        return (None, *fused_recurrent_conba_bwd(ctx.cfg, args, ck, gy, (ghT, glineT, gkT, geT)))


@keyword_interface("u", "delta")
def conba_scan_fused_recurrent(u, delta, B, C, params: ConbaParams, *, z=None, alpha=None, mask=None,
                               initial_state=None, return_final_state=False, checkpoint_interval=None):
    """The fused scan (arguments as `mixcon.ops.conba.conba_scan`, already validated there).
    ``checkpoint_interval``: steps between the forward's saved states for the backward (default
    host.CHECKPOINT_INTERVAL). These kernels are the per-step controller: with control on,
    ``params.control_period`` must be 1 (`conba_scan_chunk` serves P > 1)."""
    p = params
    if p.control and p.control_period != 1:
        raise ValueError(f"conba_scan_fused_recurrent runs the per-step controller (control_period=1), got "
                         f"control_period={p.control_period}; use conba_scan_chunk (or conba_scan) for P > 1")
    state0, phase = start_state(u, p, initial_state)
    # the per-step controller (P = 1): every real step is a sampling instant, so the phase stays 0 (and
    # without control it passes through)
    phase = phase.clone()
    if u.shape[1] == 0:
        return empty_scan(u, state0, phase, return_final_state)
    args, needs_grad = scan_args(u, delta, B, C, p, z, alpha, mask, state0)
    cfg = ScanConfig.of(p, z, alpha, mask, checkpoint_interval=int(checkpoint_interval or CHECKPOINT_INTERVAL))
    if needs_grad:
        y, hT, lineT, kT, eT = _FusedRecurrentScan.apply(cfg, *args)
    else:
        y, (hT, lineT, kT, eT), _ = fused_recurrent_conba_fwd(cfg, args, save=False)
    if not p.control:  # k and e pass through untouched (and so do their gradients), as in the reference
        kT, eT = state0[2], state0[3]
    if return_final_state:
        return y, ConbaState(hT, lineT, kT, eT, phase)
    return y


@keyword_interface("state", "u", "delta")
def conba_step_fused_recurrent(state, u, delta, B, C, params: ConbaParams, *, z=None, alpha=None, mask=None, t=0):
    """The fused decode step: updates ``state`` (float32; the phase int64) in place and returns y
    (batch, d_inner). Every control period P: with control and P > 1 the kernel advances the phase and
    updates the gain only when the token closes a period (`_conba_step_kernel`). No host
    synchronisation and fixed shapes, so it can be captured in a CUDA graph (with a fixed ``t``, which
    only keys the noise). The kernel has no backward: with a gradient required it raises."""
    p = params
    A, D, delta_bias, rho, tau = p.A, p.D, p.delta_bias, p.rho, p.tau
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
    gp, bg, np_, n_cb, num_warps = _blocking(d, group_size, n, b)
    y = torch.empty(b, d, device=u.device, dtype=u.dtype)
    dummy = torch.empty(1, **f32)
    o = lambda x: x if x is not None else dummy  # noqa: E731
    m = mask.to(torch.int8).contiguous() if mask is not None else None
    u, delta, B, C, z, alpha = (_rows(x) for x in (u, delta, B, C, z, alpha))
    flags = ScanConfig.of(p, z, alpha, m).flags()
    _conba_step_kernel[(b, n_cb)](
        u, delta, o(z), B, C, o(alpha), o(m), y,
        A.contiguous(), o(delta_bias), o(D), o(w_r), o(rho), o(eta), o(lam),
        work[0], work[1] if tau else dummy, work[2], work[3], work[4] if periodic else dummy,
        d, ng, n, int(t), int(control_period),
        u.stride(0), delta.stride(0), z.stride(0) if z is not None else 0, B.stride(0), C.stride(0),
        alpha.stride(0) if alpha is not None else 0, y.stride(0),
        float(k_max), float(sigma_w), float(sigma_v), _seed_key(seed),
        G=group_size, GP=gp, BG=bg, NP=np_, PERIODIC=periodic, **flags, num_warps=num_warps,
    )
    for s, w in zip(state, work):
        if w is not s:
            s.copy_(w)
    return y
