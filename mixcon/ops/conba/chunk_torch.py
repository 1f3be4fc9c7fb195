"""Conba's scan on CPU, one control period per block (docs/conba.md, step 6, "Kernel contract").

Pure PyTorch, differentiable (autograd plus one custom function); the loop in `naive.py` stays
the oracle. Between two sampling instants the held signal f is known, so the plant is a linear
recurrence with known inputs (order τ with the delay):

    h_t = a_t ⊙ h_{t−1} + r_t ⊙ h_{t−τ} + x_t,
    a_t = α_t (1 − ρ) Ā_t,   r_t = α_t ρ,   x_t = Δ_t B_t (u_t − f) (+ σ_w ξ_t)

How a block is computed:

- **Masks cost nothing special.** A masked step leaves the state and the delay line exactly as
  they were, so it is removed: each row's real steps are gathered to the left of a compacted
  time line (noise still keyed by the original position), solved there, and the outputs are put
  back (0 on padding). Positions past a row's last real step are never read back.
- **Sampling instants.** On the compacted line row b samples at positions p with
  (phase_b + p + 1) % P == 0. When every row starts at the same phase (no initial state, or one
  from an unpadded scan) the blocks are cut at those instants: the first block has P − phase
  positions, the next ones P, and the controller acts at each block's end. When the phases differ,
  blocks of P positions hold at most one instant per row; the block is solved with the old held
  signal, the error read at each row's instant, and by linearity the response (from a zero
  state) to the correction input −Δ_t B_t (f_new − f_old) after the instant is added.
- **The block's recurrence** runs in `_LinRec`: a loop over the block's steps of one or two
  in-place multiply-adds on (batch, d_inner, N) slices (cache-resident), with a hand-written
  backward (the reverse-time adjoint, same shape). Everything else — Ā, the inputs, C·h, the
  errors, the gain law — is vectorised over the block with autograd. On CPU this beats an
  associative (Hillis–Steele) scan over the period: that does log2(P) passes of companion
  matrix products (τ × τ with the delay) over the block's data where the loop does one, and the
  block is too small for the loop's per-op overhead to matter (measured: README, "Kernels").
- Without control the whole sequence is one linear recurrence, solved in one call.

Numerics: float32 accumulation (float64 for float64 inputs), as the reference; no cumulative
products or exp of sums are formed, so a large Δ cannot overflow.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .naive import ConbaState, _per_channel, _prepare, acc_dtype, empty_state
from .noise import normal_from_key, step_key

__all__ = ["conba_scan_chunk_torch"]


class _LinRec(torch.autograd.Function):
    """h_t = a_t ⊙ h_{t−1} + r_t ⊙ h_{t−τ} + x_t over a time-major block.

    a, x: (L, b, d, N); r: (L, b, d, 1) or None (τ = 0); h0: (b, d, N), the state h_{−1} for
    the a-term; dl0: (τ, b, d, N) with dl0[i] = h_{−1−i}, the delay line for the r-term (the
    reference keeps both: h and delay[:, 0] are equal in value but are separate inputs).
    Returns h (L, b, d, N).
    """

    @staticmethod
    def forward(ctx, a, r, x, h0, dl0, tau):
        L = x.shape[0]
        h = torch.empty_like(x)
        for t in range(L):
            torch.addcmul(x[t], a[t], h[t - 1] if t > 0 else h0, out=h[t])
            if tau > 0:
                s = t - tau
                h[t].addcmul_(r[t], h[s] if s >= 0 else dl0[tau - 1 - t])
        ctx.tau = tau
        ctx.save_for_backward(a, r, h, h0, dl0)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh):
        a, r, h, h0, dl0 = ctx.saved_tensors
        tau = ctx.tau
        L = h.shape[0]
        lam = gh.contiguous().clone()  # λ_t = dLoss/dh_t, through every later step
        for t in range(L - 2, -1, -1):
            lam[t].addcmul_(a[t + 1], lam[t + 1])
            if tau > 0 and t + tau < L:
                lam[t].addcmul_(r[t + tau], lam[t + tau])
        need_a, need_r, need_x, need_h0, need_dl0 = ctx.needs_input_grad[:5]
        ga = gr = gh0 = gdl0 = None
        if need_a:
            ga = torch.empty_like(lam)
            torch.mul(lam[0], h0, out=ga[0])
            torch.mul(lam[1:], h[:-1], out=ga[1:])
        if need_r and tau > 0:
            gr = lam.new_zeros(r.shape)
            for t in range(min(tau, L)):
                gr[t] = (lam[t] * dl0[tau - 1 - t]).sum(-1, keepdim=True)
            if L > tau:
                gr[tau:] = (lam[tau:] * h[: L - tau]).sum(-1, keepdim=True)
        if need_h0:
            gh0 = a[0] * lam[0]
        if need_dl0 and tau > 0:
            gdl0 = torch.zeros_like(dl0)
            for i in range(tau):
                t = tau - 1 - i  # dl0[i] = h_{-1-i} is h_{t-τ} at step t
                if t < L:
                    gdl0[i] = r[t] * lam[t]
        return ga, gr, lam if need_x else None, gh0, gdl0, None


def _linrec(a, r, x, h0, dl0, tau):
    if tau == 0:
        r = dl0 = None
    return _LinRec.apply(a, r, x, h0, dl0, tau)


def _block_noise(seed, src_t, d, n, device):
    """(ξ (L, b, d, N), ζ (L, b, d)) keyed by (seed, b, t) with t = src_t (L, b), the original
    positions (docs/conba.md: the noise is a pure function of its key)."""
    b_idx = torch.arange(src_t.shape[1], dtype=torch.int64, device=device)
    key = step_key(seed, b_idx, src_t)[:, :, None, None]  # (L, b, 1, 1)
    c = torch.arange(d, dtype=torch.int64, device=device)[:, None]
    lane = c * (n + 1) + torch.arange(n + 1, dtype=torch.int64, device=device)[None, :]
    z = normal_from_key(key, lane)
    return z[..., :n], z[..., n]


def conba_scan_chunk_torch(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    alpha=None, rho=None, tau=0, k0=None, eta=None, lam=None, w_r=None, k_max=1.0,
    group_size=8, sigma_w=0.0, sigma_v=0.0, seed=0, initial_state: Optional[ConbaState] = None,
    return_final_state=False, mask=None, control_period=1,
):
    """Same arguments and results as `naive.conba_scan_ref` (arguments already validated by
    `conba_scan`); one control period per block."""
    b, T, d = u.shape
    n = A.shape[1]
    G = group_size
    ng = d // G
    P = control_period
    acc = acc_dtype(u)
    dev = u.device
    dt, A32, control, eta_f, lam_f, w_r_f = _prepare(
        delta, delta_bias, delta_softplus, A, eta, lam, w_r, k0, d, ng, dev, acc
    )
    if initial_state is None:
        initial_state = empty_state(b, d, n, tau, G, k0 if control else None, dev, acc)
    phase0 = initial_state.phase
    if control and bool(((phase0 < 0) | (phase0 >= P)).any()):
        # a phase outside 0 … P − 1 (a state from another period) never samples in the reference
        from .naive import conba_scan_ref

        return conba_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, alpha, rho, tau,
                              k0, eta, lam, w_r, k_max, G, sigma_w, sigma_v, seed, initial_state,
                              return_final_state, mask, P)
    h_init = initial_state.h.to(acc)
    dl_init = initial_state.delay.to(acc).transpose(0, 1)  # (τ, b, d, N): dl[i] = h_{-1-i}
    k, e = initial_state.k.to(acc), initial_state.e.to(acc)

    # --- the compacted, time-major line: real steps of each row gathered to the left ---------
    if mask is None:
        Tc = T
        R = None  # every row has T real steps
        src_t = torch.arange(T, device=dev)[:, None].expand(T, b)

        def line(x):  # (b, T, F) → (T, b, F)
            return x.to(acc).transpose(0, 1).contiguous()
    else:
        m = mask.to(torch.bool)
        R = m.sum(1)  # real steps per row
        Tc = int(R.max()) if b > 0 else 0
        pos = torch.cumsum(m.long(), 1) - 1  # compacted position of each real step
        src = torch.full((b, Tc + 1), T, dtype=torch.long, device=dev)  # T → a zero row
        bi = torch.arange(b, device=dev)[:, None].expand(b, T)
        src[bi[m], pos[m]] = torch.arange(T, device=dev)[None].expand(b, T)[m]
        src = src[:, :Tc]
        src_t = src.t()
        dst = torch.where(m, pos, torch.full_like(pos, Tc))  # back: padding reads a zero row

        def line(x):
            x = x.to(acc)
            x = torch.cat([x, x.new_zeros(b, 1, x.shape[-1])], 1)
            return x.gather(1, src[..., None].expand(b, Tc, x.shape[-1])).transpose(0, 1).contiguous()

    u_l, dt_l, B_l, C_l = line(u), line(dt), line(B), line(C)
    # a_t = α_t (1 − ρ) exp(Δ_t A), r_t = α_t ρ (per channel)
    coef = None
    if alpha is not None:
        coef = _per_channel(line(alpha), G)  # (Tc, b, d)
    r_l = None
    if tau > 0:
        rho_c = _per_channel(rho.to(acc), G)
        r_l = (coef * rho_c if coef is not None else rho_c.expand(Tc, b, d))[..., None]
        coef = coef * (1.0 - rho_c) if coef is not None else (1.0 - rho_c).expand(Tc, b, d)
    a_l = torch.exp(dt_l[..., None] * A32)
    if coef is not None:
        a_l = a_l * coef[..., None]
    D_u = D.to(acc) * u_l if D is not None else None
    noisy = sigma_w > 0.0 or sigma_v > 0.0

    def block_inputs(s, L, f):
        """x (L, b, d, N) for positions [s, s+L) with held signal f (b, d) (None: f = 0), and the
        observation noise σ_v ζ (L, b, d) or None."""
        ut = u_l[s:s + L] if f is None else u_l[s:s + L] - f
        x = (dt_l[s:s + L] * ut)[..., None] * B_l[s:s + L, :, None, :]
        zeta = None
        if noisy:
            xi, zeta = _block_noise(seed, src_t[s:s + L], d, n, dev)
            if sigma_w > 0.0:
                x = x + sigma_w * xi.to(acc)
            zeta = sigma_v * zeta.to(acc) if sigma_v > 0.0 else None
        return x, zeta

    def output(h, s, L, zeta):
        y = torch.matmul(h, C_l[s:s + L, :, :, None]).squeeze(-1)  # Σ_n C_t[n] h_t[c, n]
        if D_u is not None:
            y = y + D_u[s:s + L]
        if zeta is not None:
            y = y + zeta
        return y

    hs, ys = [], []
    h_run, dl_run = h_init, dl_init
    if not control or Tc == 0:
        if Tc > 0:
            x, zeta = block_inputs(0, Tc, None)
            h = _linrec(a_l, r_l, x, h_init, dl_init, tau)
            hs.append(h)
            ys.append(output(h, 0, Tc, zeta))
    else:
        eta_g, lam_g = eta_f, lam_f
        uniform = bool((phase0 == phase0[0]).all())
        if uniform:  # blocks cut at the common sampling instants
            first = P - int(phase0[0])
            starts = [0] + list(range(first, Tc, P))
        else:  # blocks of P, at most one instant per row in each
            starts = list(range(0, Tc, P))
        bounds = list(zip(starts, starts[1:] + [Tc]))
        bidx = torch.arange(b, device=dev)
        Rb = R if R is not None else torch.full((b,), Tc, dtype=torch.long, device=dev)
        for s, end in bounds:
            L = end - s
            f_old = _per_channel(k, G) * torch.tanh(e)
            x, zeta = block_inputs(s, L, f_old)
            h = _linrec(a_l[s:end], r_l[s:end] if r_l is not None else None, x, h_run, dl_run, tau)
            y = output(h, s, L, zeta)
            # each row's sampling instant in this block, if it has one
            inst = s + torch.remainder(P - 1 - phase0 - s, P)  # (b,) first instant ≥ s
            has = (inst < end) & (inst < Rb)
            o = torch.clamp(inst - s, max=L - 1)
            e_at = y[o, bidx] - w_r_f * u_l[s + o, bidx]  # tracking error at the instant (b, d)
            rms = torch.sqrt((e_at.view(b, ng, G) ** 2).sum(-1) + 1e-12) / math.sqrt(G)
            k_upd = torch.clamp((1.0 - lam_g) * k + eta_g * rms, 0.0, k_max)
            k = torch.where(has[:, None], k_upd, k)
            e = torch.where(has[:, None], e_at, e)
            if bool((has & (o < L - 1)).any()):
                # the new held signal acts after the instant: add the response to its change
                f_new = _per_channel(k, G) * torch.tanh(e)
                after = (torch.arange(s, end, device=dev)[:, None] > inst[None, :]).to(acc)  # (L, b)
                xc = -((dt_l[s:end] * (f_new - f_old)) * after[..., None])[..., None] * B_l[s:end, :, None, :]
                zero_h = h_run.new_zeros(h_run.shape)
                hc = _linrec(a_l[s:end], r_l[s:end] if r_l is not None else None, xc, zero_h,
                             dl_run.new_zeros(dl_run.shape), tau)
                h = h + hc
                y = y + torch.matmul(hc, C_l[s:end, :, :, None]).squeeze(-1)
            hs.append(h)
            ys.append(y)
            h_run = h[L - 1]
            if tau > 0:
                dl_run = torch.cat([h[max(0, L - tau):].flip(0), dl_run[: max(0, tau - L)]], 0)

    y_l = torch.cat(ys, 0) if ys else u_l.new_zeros(0, b, d)  # (Tc, b, d)
    y = y_l.transpose(0, 1)  # (b, Tc, d)
    if mask is not None:
        y = torch.cat([y, y.new_zeros(b, 1, d)], 1).gather(1, dst[..., None].expand(b, T, d))
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(u.dtype)
    if not return_final_state:
        return y

    if control:
        real = R if R is not None else torch.full((b,), T, dtype=torch.long, device=dev)
        phase = torch.remainder(phase0 + real, P)
    else:
        phase = phase0
    if mask is None:
        if Tc > 0:
            h_fin = hs[-1][-1] if not control else h_run
            if not control and tau > 0:
                hl = hs[-1]
                dl_run = torch.cat([hl[max(0, Tc - tau):].flip(0), dl_init[: max(0, tau - Tc)]], 0)
        else:
            h_fin = h_init
        dl_fin = dl_run
    else:
        h_all = torch.cat(hs, 0) if hs else h_init.new_zeros(0, b, d, n)
        ext_h = torch.cat([h_init[None], h_all], 0)  # index R_b: the state after the last real step
        h_fin = ext_h.gather(0, R[None, :, None, None].expand(1, b, d, n))[0]
        if tau > 0:
            ext_d = torch.cat([dl_init.flip(0), h_all], 0)  # ext_d[τ + p] = h_p, ext_d[τ − 1 − i] = h_{−1−i}
            idx = tau + R[None, :] - 1 - torch.arange(tau, device=dev)[:, None]  # (τ, b)
            dl_fin = ext_d.gather(0, idx[:, :, None, None].expand(tau, b, d, n))
        else:
            dl_fin = dl_init
    return y, ConbaState(h_fin, dl_fin.transpose(0, 1), k, e, phase)
