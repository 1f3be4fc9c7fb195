"""Triton helpers both chunk-parallel kernels use (`chunk_fwd.py`, `chunk_bwd.py`): a program's tile
indices, a block's inputs and step coefficients, the parameters, the companion state's loads and stores,
the sampling instant and the controller's gain update. chunk.py's docstring describes the algorithm.
"""

import triton
import triton.language as tl

from .common import _mix32, _normal, _softplus


# ---------------------------------------------------------------------------------- helpers
@triton.jit
def _gsum(x, BG: tl.constexpr, GP: tl.constexpr):
    """[BG·GP] per channel → [BG] per control group (sum)."""
    return tl.sum(tl.reshape(x, [BG, GP]), axis=1)


@triton.jit
def _gbc(x, BG: tl.constexpr, GP: tl.constexpr):
    """[BG] per group → [BG·GP] per channel (each group's value over its channels)."""
    return tl.reshape(tl.broadcast_to(x[:, None], [BG, GP]), [BG * GP])


@triton.jit
def _row(x, sel):
    """The tile's row where ``sel`` ([BT, 1, 1] or [BT, 1], true at one position) holds."""
    return tl.sum(tl.where(sel, x, 0.0), axis=0)


@triton.jit
def _load_S(base, sd, sidx, smask, MS: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr):
    """A companion state stored as MS slabs of (d, N) at ``base`` (zeros beyond MS)."""
    S0 = tl.load(base + sidx, mask=smask, other=0.0)
    S1 = tl.zeros([BC, NP], tl.float32)
    S2 = tl.zeros([BC, NP], tl.float32)
    S3 = tl.zeros([BC, NP], tl.float32)
    if MS > 1:
        S1 = tl.load(base + sd + sidx, mask=smask, other=0.0)
    if MS > 2:
        S2 = tl.load(base + 2 * sd + sidx, mask=smask, other=0.0)
    if MS > 3:
        S3 = tl.load(base + 3 * sd + sidx, mask=smask, other=0.0)
    return S0, S1, S2, S3


@triton.jit
def _store_S(base, sd, sidx, smask, S0, S1, S2, S3, MS: tl.constexpr):
    tl.store(base + sidx, S0, mask=smask)
    if MS > 1:
        tl.store(base + sd + sidx, S1, mask=smask)
    if MS > 2:
        tl.store(base + 2 * sd + sidx, S2, mask=smask)
    if MS > 3:
        tl.store(base + 3 * sd + sidx, S3, mask=smask)


@triton.jit
def _tile(pid_b, pid_c, N, NG, G: tl.constexpr, GP: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr,
          BT: tl.constexpr):
    """Indices of one program's tile: groups [pid_c·BG, +BG) of batch row pid_b, BC = BG·GP channel
    lanes (GP ≥ G: padded lanes masked), NP ≥ N state lanes, BT time positions."""
    BC: tl.constexpr = BG * GP
    offs_i = tl.arange(0, BT)
    offs_n = tl.arange(0, NP)
    offs_l = tl.arange(0, BC)
    offs_g = pid_c * BG + tl.arange(0, BG)
    grp = pid_c * BG + offs_l // GP  # each lane's control group
    jl = offs_l % GP
    cmask = (jl < G) & (grp < NG)
    ch = grp * G + jl
    nmask = offs_n < N
    gmask = offs_g < NG
    smask = cmask[:, None] & nmask[None, :]
    sidx = ch[:, None] * N + offs_n[None, :]
    lane_w = (ch[:, None] * (N + 1) + offs_n[None, :]).to(tl.uint32)  # noise lanes, see noise.py
    lane_v = (ch * (N + 1) + N).to(tl.uint32)
    return offs_i, offs_n, offs_g, grp, cmask, ch, nmask, gmask, smask, sidx, lane_w, lane_v


@triton.jit
def _block(u_b, dt_b, z_b, B_b, C_b, al_b, m_b, t0, T, s_u_t, s_dt_t, s_z_t, s_B_t, s_C_t, s_al_t,
           offs_i, offs_n, nmask, grp, ch, cmask, smask, A, bias, rho_c, kb, lane_w, lane_v, sigma_w, sigma_v,
           TAU: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
           HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr, NOISE_W: tl.constexpr, NOISE_V: tl.constexpr):
    """A block's inputs as tiles and the step coefficients computed from them (float32)."""
    tt = t0 + offs_i
    inb = tt < T
    cm2 = inb[:, None] & cmask[None, :]
    nm2 = inb[:, None] & nmask[None, :]
    u = tl.load(u_b + tt[:, None] * s_u_t + ch[None, :], mask=cm2, other=0.0).to(tl.float32)
    dt_in = tl.load(dt_b + tt[:, None] * s_dt_t + ch[None, :], mask=cm2, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_b + tt[:, None] * s_z_t + ch[None, :], mask=cm2, other=0.0).to(tl.float32)
    else:
        z = u
    Bv = tl.load(B_b + tt[:, None] * s_B_t + offs_n[None, :], mask=nm2, other=0.0).to(tl.float32)
    Cv = tl.load(C_b + tt[:, None] * s_C_t + offs_n[None, :], mask=nm2, other=0.0).to(tl.float32)
    if HAS_ALPHA:  # per channel: each lane reads its group's value
        al = tl.load(al_b + tt[:, None] * s_al_t + grp[None, :], mask=cm2, other=1.0).to(tl.float32)
    else:
        al = tl.full(u.shape, 1.0, tl.float32)
    if HAS_MASK:
        real = inb & (tl.load(m_b + tt, mask=inb, other=0) != 0)
    else:
        real = inb
    if HAS_BIAS:
        dt_in = dt_in + bias[None, :]
    if SOFTPLUS:
        dt = _softplus(dt_in)
    else:
        dt = dt_in
    dA = tl.exp(dt[:, :, None] * A[None, :, :])
    if TAU > 0:
        a = (al * (1.0 - rho_c[None, :]))[:, :, None] * dA
        r = al * rho_c[None, :]
    else:
        a = al[:, :, None] * dA
        r = al * 0.0
    xi = dA * 0.0
    zeta = u * 0.0
    if NOISE_W or NOISE_V:
        key = _mix32(kb ^ tt.to(tl.uint32))
        if NOISE_W:
            xi = tl.where(smask[None, :, :], sigma_w * _normal(key[:, None, None], lane_w[None, :, :]), 0.0)
        if NOISE_V:
            zeta = tl.where(cmask[None, :], sigma_v * _normal(key[:, None], lane_v[None, :]), 0.0)
    return tt, real, u, dt_in, dt, z, Bv, Cv, al, dA, a, r, xi, zeta


@triton.jit
def _load_params(A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr, sidx, smask, ch, cmask, grp, offs_g, gmask,
                 BC: tl.constexpr, BG: tl.constexpr, TAU: tl.constexpr, CONTROL: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr):
    """Per-channel ([BC]) and per-group ([BG]) parameters of this program (zeros when absent)."""
    A = tl.load(A_ptr + sidx, mask=smask, other=0.0).to(tl.float32)
    bias = tl.zeros([BC], tl.float32)
    Dp = tl.zeros([BC], tl.float32)
    wr = tl.zeros([BC], tl.float32)
    rho_c = tl.zeros([BC], tl.float32)
    eta = tl.zeros([BG], tl.float32)
    lam = tl.zeros([BG], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    if HAS_D:
        Dp = tl.load(D_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    if TAU > 0:
        rho_c = tl.load(rho_ptr + grp, mask=cmask, other=0.0).to(tl.float32)
    if CONTROL:
        wr = tl.load(wr_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
        eta = tl.load(eta_ptr + offs_g, mask=gmask, other=0.0).to(tl.float32)
        lam = tl.load(lam_ptr + offs_g, mask=gmask, other=0.0).to(tl.float32)
    return A, bias, Dp, wr, rho_c, eta, lam


@triton.jit
def _instant(real, ph, period, offs_i):
    """Where the row's sampling instant falls in the block (at most one: BT ≤ P): the real step at which
    phase + (real steps so far) reaches P; ``after``: the real steps past it, which see the new signal."""
    cnt = tl.cumsum(real.to(tl.int32), axis=0)
    inst = real & ((cnt + ph) == period)
    after = real & ((cnt + ph) > period)
    has = tl.sum(inst.to(tl.int32), axis=0) > 0
    return inst, after, has


@triton.jit
def _controller(e_all, inst, kg, eta, lam, k_max, cmask, G: tl.constexpr, BG: tl.constexpr, GP: tl.constexpr):
    """The gain update at the instant: the sampled error e* (per channel), its group norm and the new gain."""
    es = tl.where(cmask, _row(e_all, inst[:, None]), 0.0)
    ss = tl.sqrt(_gsum(es * es, BG, GP) + 1e-12)  # [BG]
    rr = ss / tl.sqrt(G * 1.0)
    pre = (1.0 - lam) * kg + eta * rr
    kn = tl.minimum(tl.maximum(pre, 0.0), k_max)
    return es, ss, rr, pre, kn
