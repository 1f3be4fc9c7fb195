"""Reference Conba scan and decode step: docs/conba.md, step 6, written as a loop over time.

This file is the oracle for every fused kernel and the CPU path of the model. It favours
plain, checkable code over speed. Everything in the recurrence is computed in float32
whatever the input dtype (docs/conba.md: "Every quantity in step 6 accumulates in float32"),
or in float64 for float64 inputs, so that the reference is a float64 oracle for tests.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import acc_dtype
from .noise import conba_noise
from .params import ConbaParams, ConbaState, empty_state, keyword_interface


def _per_channel(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(..., n_groups) → (..., d_inner): each group's value repeated over its G channels."""
    return x.repeat_interleave(group_size, dim=-1)


def _one_step(
    h, line, k, e, phase,  # state before the step (float32; phase int64)
    u_t, dt_t, B_t, C_t,  # (b, d), (b, d) after bias/softplus, (b, N), (b, N); float32
    A, D, alpha_t, rho, tau, control, eta, lam, w_r, k_max, group_size,
    sigma_w, sigma_v, seed, t, mask_t, control_period=1,
):
    """One step of docs/conba.md (6). Returns (y_t, h, line, k, e, phase) after the step."""
    dA = torch.exp(dt_t[:, :, None] * A[None])  # Ā_t (b, d, N)
    if control:
        # ũ_t = u_t − f with the held signal f = k[g] · tanh(e) set at the last sampling instant
        # (with P = 1: k_t · tanh(e_{t−1})): output feedback through a saturating actuator
        u_ctl = u_t - _per_channel(k, group_size) * torch.tanh(e)
    else:
        u_ctl = u_t
    h_new = dA * h
    if tau > 0:
        rho_c = _per_channel(rho.to(h.dtype), group_size)[None, :, None]
        h_new = (1.0 - rho_c) * h_new + rho_c * line[:, tau - 1]  # line[:, tau-1] = h_{t-τ}
    if alpha_t is not None:
        h_new = _per_channel(alpha_t, group_size)[:, :, None] * h_new
    h_new = h_new + (dt_t * u_ctl)[:, :, None] * B_t[:, None, :]
    xi = zeta = None
    if sigma_w > 0.0 or sigma_v > 0.0:
        xi, zeta = conba_noise(seed, u_t.shape[0], t, u_t.shape[1], A.shape[1], device=u_t.device)
    if sigma_w > 0.0:
        h_new = h_new + sigma_w * xi.to(h.dtype)
    y = (h_new * C_t[:, None, :]).sum(-1)
    if D is not None:
        y = y + D.to(h.dtype) * u_t
    if sigma_v > 0.0:
        y = y + sigma_v * zeta.to(h.dtype)  # the error below sees the noisy measurement
    m = mask_t.to(torch.bool) if mask_t is not None else None
    if control:
        e_t = y - w_r * u_t  # tracking error, measured every step
        G = group_size
        e_grp = e_t.view(e_t.shape[0], -1, G)
        err_rms = torch.sqrt((e_grp * e_grp).sum(-1) + 1e-12) / math.sqrt(G)
        k_upd = torch.clamp((1.0 - lam) * k + eta * err_rms, 0.0, k_max)
        # the controller's clock counts real steps; every P-th one is a sampling instant
        phase_new = phase + (m.long() if m is not None else 1)
        sample = phase_new == control_period  # (b,); never true on a padded step
        k_new = torch.where(sample[:, None], k_upd, k)
        e_new = torch.where(sample[:, None], e_t, e)
        phase_new = torch.where(sample, torch.zeros_like(phase_new), phase_new)
    else:
        e_new, k_new, phase_new = e, k, phase
    line_new = torch.cat([h_new[:, None], line[:, :-1]], dim=1) if tau > 0 else line
    if m is not None:
        # A padded step leaves h, the delay line, k, e and the phase exactly as they were
        # (k, e and the phase above already); its output is 0.
        h_new = torch.where(m[:, None, None], h_new, h)
        if tau > 0:
            line_new = torch.where(m[:, None, None, None], line_new, line)
        y = torch.where(m[:, None], y, torch.zeros_like(y))
    return y, h_new, line_new, k_new, e_new, phase_new


def _prepare(delta, delta_bias, delta_softplus, A, eta, lam, w_r, k0, d_inner, n_groups, device, acc):
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)
    if delta_softplus:
        dt = F.softplus(dt)
    control = eta is not None or k0 is not None
    zeros_g = torch.zeros(n_groups, dtype=acc, device=device)
    eta_f = eta.to(acc) if eta is not None else zeros_g
    lam_f = lam.to(acc) if lam is not None else zeros_g
    w_r_f = w_r.to(acc) if w_r is not None else torch.ones(d_inner, dtype=acc, device=device)
    return dt, A.to(acc), control, eta_f, lam_f, w_r_f


@keyword_interface("u", "delta")
def conba_scan_ref(u, delta, B, C, params: ConbaParams, *, z=None, alpha=None, mask=None,
                   initial_state: Optional[ConbaState] = None, return_final_state=False, return_internals=False):
    """Reference Conba scan. Shapes as in `mixcon.ops.conba.conba_scan`; returns y (b, T, d)
    in u's dtype, and the final `ConbaState` when ``return_final_state``.

    ``return_internals``: also return (last) a dict of the controller's per-step signals, in the
    accumulation dtype: ``f`` (b, T, d) the held control signal subtracted from u_t at step t,
    ``k`` (b, T + 1, n_groups) the gain before step 0 and after every step, ``e`` (b, T, d) the
    tracking error y_t − w_r·u_t measured at step t (before the gate z; 0 where masked) and
    ``y_ssm`` (b, T, d) the output before the gate. Without control f = e = 0 and k = 0."""
    p = params
    A, D, rho, tau, k0, eta, lam, w_r = p.A, p.D, p.rho, p.tau, p.k0, p.eta, p.lam, p.w_r
    group_size, control_period = p.group_size, p.control_period
    b, T, d = u.shape
    n_groups = d // group_size
    acc = acc_dtype(u)
    dt, A32, control, eta_f, lam_f, w_r_f = _prepare(
        delta, p.delta_bias, p.delta_softplus, A, eta, lam, w_r, k0, d, n_groups, u.device, acc
    )
    if initial_state is None:
        initial_state = empty_state(b, d, A.shape[1], tau, group_size, k0 if control else None, u.device, acc)
    h, line, k, e = (s.to(acc) for s in initial_state[:4])
    phase = initial_state.phase
    u32, B32, C32 = u.to(acc), B.to(acc), C.to(acc)
    alpha32 = alpha.to(acc) if alpha is not None else None
    ys, fs, ks = [], [], [k]
    for t in range(T):
        if return_internals:
            fs.append(_per_channel(k, group_size) * torch.tanh(e) if control else torch.zeros_like(u32[:, t]))
        y, h, line, k, e, phase = _one_step(
            h, line, k, e, phase, u32[:, t], dt[:, t], B32[:, t], C32[:, t], A32, D,
            alpha32[:, t] if alpha32 is not None else None, rho, tau, control, eta_f, lam_f,
            w_r_f, p.k_max, group_size, p.sigma_w, p.sigma_v, p.seed, t,
            mask[:, t] if mask is not None else None, control_period,
        )
        ys.append(y)
        if return_internals:
            ks.append(k)
    y = torch.stack(ys, dim=1) if ys else u32.new_zeros(b, 0, d)  # (b, T, d)
    internals = None
    if return_internals:
        err = y - w_r_f * u32 if control else torch.zeros_like(y)
        if mask is not None:
            err = err * mask[..., None].to(acc)
        internals = dict(f=torch.stack(fs, dim=1) if fs else u32.new_zeros(b, 0, d), k=torch.stack(ks, dim=1),
                         e=err, y_ssm=y)
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(u.dtype)
    out = (y, ConbaState(h, line, k, e, phase)) if return_final_state else (y,)
    if return_internals:
        out = out + (internals,)
    return out if len(out) > 1 else out[0]


@keyword_interface("state", "u", "delta")
def conba_step_ref(state: ConbaState, u, delta, B, C, params: ConbaParams, *, z=None, alpha=None, mask=None, t=0):
    """One decode step. u, delta, z: (b, d); B, C: (b, N); alpha: (b, d // G); mask: (b,).
    Updates ``state`` in place and returns y (b, d) in u's dtype. ``t`` keys the noise."""
    p = params
    A, group_size = p.A, p.group_size
    b, d = u.shape
    n_groups = d // group_size
    acc = acc_dtype(u)
    dt, A32, control, eta_f, lam_f, w_r_f = _prepare(
        delta, p.delta_bias, p.delta_softplus, A, p.eta, p.lam, p.w_r, p.k0, d, n_groups, u.device, acc
    )
    y, h, line, k, e, phase = _one_step(
        state.h.to(acc), state.line.to(acc), state.k.to(acc), state.e.to(acc), state.phase,
        u.to(acc), dt, B.to(acc), C.to(acc), A32, p.D,
        alpha.to(acc) if alpha is not None else None, p.rho, p.tau, control, eta_f, lam_f, w_r_f,
        p.k_max, group_size, p.sigma_w, p.sigma_v, p.seed, t, mask, p.control_period,
    )
    state.h.copy_(h)
    state.line.copy_(line)
    state.k.copy_(k)
    state.e.copy_(e)
    state.phase.copy_(phase)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(u.dtype)
