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
  positions, the next ones P, and the controller acts at each block's end. When the phases differ
  (a split scan of a padded batch), blocks of P positions hold at most one instant per row: the
  block is solved with the old held signal up to the last row's instant, the errors are read
  there, and the block is solved again with each row's new signal from after its instant
  (adding the response to the signal's change, by linearity, would cost the same second solve).
- **The block's recurrence** runs in `_BlockScan`, a custom autograd function: Ā = exp(Δ A),
  the inputs Δ ũ B and C·h are computed for the whole block at once, and only the recurrence
  loops over the block's steps, one or two in-place multiply-adds on (batch, N, d_inner) slices;
  its backward is the reverse-time adjoint, with Ā recomputed. The controller (tanh, the group
  norm, the clamp) runs once per block with plain autograd. On CPU this beats an associative
  (Hillis–Steele) scan over the block (docs/kernels.md, the chunk_torch table): that makes log2(P) passes
  of fresh full-size tensors (τ × τ companion products with the delay) where the loop makes one in
  place.
- Without control the sequence is one linear recurrence, run in blocks of `BLOCK` steps only
  to keep the working set small.

Where a C++ compiler is present the blocks run compiled (cpu.py; faster than the PyTorch blocks, docs/kernels.md,
"Compiled on CPU"):
each task keeps one (row, 64-channel tile) state in cache over the whole time line, so no
(L, b, N, d) tensor is formed, forward or backward (the backward recomputes the states from
checkpoints). With a gradient, one kernel call per control period, the controller in autograd as
above — except at P = 1, where the whole line is one call with the per-step controller and its adjoint
inside the kernels (cpu.p1_scan). Without one (a prefill), the whole compacted line of raw inputs goes to a single call that
also runs the softplus, the controller at every row's own instants, D u and the gate. The compiled
kernels draw the training noise themselves from its keys (noise.py's, bit for bit): only the step keys
(L, b) and ζ (L, b, d) are formed here. Without a compiler the PyTorch blocks below run, with the same
results (the noise materialised per block by `_block_noise`). Blocks stop each row at its last real
step, so the running state is the final state.

Numerics: float32 accumulation (float64 for float64 inputs), as the reference; no cumulative
products or exp of sums are formed, so a large Δ cannot overflow.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import acc_dtype
from .naive import _per_channel, _prepare
from .noise import normal_from_key, step_key
from .params import ConbaParams, ConbaState, empty_state, keyword_interface

__all__ = ["conba_scan_chunk_torch"]

BLOCK = 64  # time steps per block without control in the PyTorch path (chosen by measurement: docs/kernels.md)
COMPILED = True  # run blocks in the compiled CPU kernel (cpu.py) where it builds; False: always PyTorch


class _BlockScan(torch.autograd.Function):
    """One block of the plant with its input known: for t in the block (time-major; the state
    laid out (N, d_inner), channels innermost),

        a_t = coef_t · exp(Δ_t A),  h_t = a_t ⊙ h_{t−1} + r_t ⊙ h_{t−τ} + (Δ_t ũ_t) B_t + ξ_t,
        y_t = Σ_n C_t[n] h_t[n, ·]

    dt, ut, coef, r: (L, b, d) (coef, r may be None: 1, and no delay); At: (N, d) = Aᵀ; B, C:
    (L, b, N); xi: (L, b, N, d) or None (scaled process noise, no gradient); h0: (b, N, d), the
    state h_{−1} for the a-term; dl0: (τ, b, N, d), dl0[i] = h_{−1−i} for the r-term (the
    reference keeps h and the delay line as separate inputs). Returns y (L, b, d), h (L, b, N, d).

    Ā, the inputs and C·h are computed for the whole block at once; only the recurrence itself
    loops over the block's steps, one or two in-place multiply-adds on (b, N, d) slices. The
    backward is the reverse-time adjoint with the same structure; Ā is recomputed, not stored.
    """

    @staticmethod
    def forward(ctx, dt, ut, coef, r, At, B, C, xi, h0, dl0, tau):
        ctx.set_materialize_grads(False)  # an unused h gets no (L, b, N, d) zero gradient
        L = dt.shape[0]
        a = _decay(dt, At, coef)
        dtu = dt * ut
        h = torch.mul(dtu[:, :, None, :], B[..., None])  # the input, then the state
        if xi is not None:
            h.add_(xi)
        for t in range(L):
            ht = h[t]
            ht.addcmul_(a[t], h[t - 1] if t > 0 else h0)
            if tau > 0:
                ht.addcmul_(r[t, :, None, :], h[t - tau] if t >= tau else dl0[tau - 1 - t])
        y = torch.matmul(C[:, :, None, :], h).squeeze(2)
        ctx.tau = tau
        ctx.save_for_backward(dt, ut, dtu, coef, r, At, B, C, h, h0, dl0)
        return y, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gh):
        dt, ut, dtu, coef, r, At, B, C, h, h0, dl0 = ctx.saved_tensors
        tau = ctx.tau
        L = dt.shape[0]
        e = _decay(dt, At, None)  # exp(Δ_t A), recomputed
        a = e * coef[:, :, None, :] if coef is not None else e
        # λ_t = ∂Loss/∂h_t through every later step: λ_t = ∂_t + a_{t+1} λ_{t+1} + r_{t+τ} λ_{t+τ}
        lam = torch.mul(gy[:, :, None, :], C[..., None]) if gy is not None else torch.zeros_like(h)
        if gh is not None:
            lam.add_(gh)
        for t in range(L - 2, -1, -1):
            lt = lam[t]
            lt.addcmul_(a[t + 1], lam[t + 1])
            if tau > 0 and t + tau < L:
                lt.addcmul_(r[t + tau, :, None, :], lam[t + tau])
        gC = torch.matmul(h, gy[..., None]).squeeze(-1) if gy is not None else torch.zeros_like(C)
        g_dtu = torch.matmul(B[:, :, None, :], lam).squeeze(2)
        gB = torch.matmul(lam, dtu[..., None]).squeeze(-1)
        q = torch.empty_like(lam)  # λ_t ⊙ h_{t−1} ⊙ exp(Δ_t A): ∂/∂coef_t before the sum over n
        torch.mul(lam[0], h0, out=q[0])
        torch.mul(lam[1:], h[:-1], out=q[1:])
        q.mul_(e)
        gcoef = q.sum(2) if coef is not None else None
        if coef is not None:
            q.mul_(coef[:, :, None, :])  # ∂/∂(Δ_t A)
        g_dta = (q * At).sum(2)
        gAt = (q * dt[:, :, None, :]).sum((0, 1))
        gr = gdl0 = None
        if tau > 0:
            gr = torch.empty_like(r)
            for t in range(min(tau, L)):
                gr[t] = (lam[t] * dl0[tau - 1 - t]).sum(1)
            if L > tau:
                gr[tau:] = (lam[tau:] * h[: L - tau]).sum(2)
            gdl0 = torch.zeros_like(dl0)
            for i in range(tau):
                t = tau - 1 - i  # dl0[i] = h_{−1−i} is h_{t−τ} at step t
                if t < L:
                    gdl0[i] = r[t, :, None, :] * lam[t]
        gh0 = a[0] * lam[0]
        gdt = g_dta + g_dtu * ut
        gut = g_dtu * dt
        return gdt, gut, gcoef, gr, gAt, gB, gC, None, gh0, gdl0, None


def _decay(dt, At, coef):
    """coef_t · exp(Δ_t A) as (L, b, N, d)."""
    a = torch.mul(dt[:, :, None, :], At)
    a.exp_()
    if coef is not None:
        a.mul_(coef[:, :, None, :])
    return a


def _block_scan(dt, ut, coef, r, At, B, C, xi, h0, dl0, tau):
    if tau == 0:
        r = dl0 = None
    return _BlockScan.apply(dt, ut, coef, r, At, B, C, xi, h0, dl0, tau)


def _use_compiled(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether the work runs in the compiled kernels (cpu.py): on CPU, accumulating in float32/float64
    (``dtype``, default x's), where they build."""
    if not COMPILED or x.device.type != "cpu" or (dtype or x.dtype) not in (torch.float32, torch.float64):
        return False
    from .cpu import kernels

    return kernels() is not None


def _records_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def _solve_block(dt, ut, coef, r, At, B, C, xi, h0, dl0, tau, steps, out=None):
    """(y (L, b, d), h_last (b, N, d), dl_last (τ, b, N, d)) of one block in which row b runs its first
    ``steps[b]`` steps (None: all L): h_last = h_{steps−1} (h0 when none), dl_last[i] = h_{steps−1−i}
    (reaching back into dl0). The compiled kernel where it is available, else `_BlockScan`."""
    if _use_compiled(dt):
        from .cpu import block_scan

        return block_scan(dt, ut, coef, r, At, B, C, xi, h0, dl0, tau, steps, out)
    y, h = _block_scan(dt, ut, coef, r, At, B, C, xi, h0, dl0, tau)
    L, b, n, d = h.shape
    if steps is not None:
        steps = steps.clamp(max=L)
    if steps is None:
        dl = torch.cat([h[max(0, L - tau):].flip(0), dl0[: max(0, tau - L)]], 0) if tau > 0 else dl0
        return y, h[L - 1], dl
    ext_h = torch.cat([h0[None], h], 0)  # index steps_b: the state after the row's last step
    h_last = ext_h.gather(0, steps[None, :, None, None].expand(1, b, n, d))[0]
    if tau == 0:
        return y, h_last, dl0
    ext_d = torch.cat([dl0.flip(0), h], 0)  # ext_d[τ + p] = h_p, ext_d[τ − 1 − i] = h_{−1−i}
    idx = tau + steps[None, :] - 1 - torch.arange(tau, device=h.device)[:, None]  # (τ, b)
    return y, h_last, ext_d.gather(0, idx[:, :, None, None].expand(tau, b, n, d))


def _line_noise(seed, src_t, d, n, sigma_w, sigma_v, acc, compiled):
    """(σ_w ξ, σ_v ζ) of the whole compacted line (positions src_t (L, b)), each None when its σ is 0. Compiled:
    ξ as `cpu.NoiseKeys` (the kernels draw it, it is never formed) and ζ (L, b, d) from the kernels' own
    draw; else both from `_block_noise`. Either is sliced along the line's time per block."""
    if sigma_w == 0.0 and sigma_v == 0.0:
        return None, None
    if compiled:
        from . import cpu

        keys = step_key(seed, torch.arange(src_t.shape[1], dtype=torch.int64, device=src_t.device), src_t).contiguous()
        xi = cpu.NoiseKeys(keys, sigma_w) if sigma_w > 0.0 else None
        zeta = sigma_v * cpu.noise(keys, d, n, n).to(acc) if sigma_v > 0.0 else None
        return xi, zeta
    xi, zeta = _block_noise(seed, src_t, d, n, src_t.device)
    return (sigma_w * xi.to(acc) if sigma_w > 0.0 else None, sigma_v * zeta.to(acc) if sigma_v > 0.0 else None)


def _block_noise(seed, src_t, d, n, device):
    """(ξ (L, b, N, d), ζ (L, b, d)) keyed by (seed, b, t) with t = src_t (L, b), the original
    positions (docs/conba.md: the noise is a pure function of its key; lanes as in noise.py)."""
    b_idx = torch.arange(src_t.shape[1], dtype=torch.int64, device=device)
    key = step_key(seed, b_idx, src_t)[:, :, None, None]  # (L, b, 1, 1)
    c = torch.arange(d, dtype=torch.int64, device=device)[None, :]
    lane = c * (n + 1) + torch.arange(n + 1, dtype=torch.int64, device=device)[:, None]  # (N + 1, d)
    z = normal_from_key(key, lane)
    return z[:, :, :n], z[:, :, n]


@keyword_interface("u", "delta")
def conba_scan_chunk_torch(u, delta, B, C, params: ConbaParams, *, z=None, alpha=None, mask=None,
                           initial_state: Optional[ConbaState] = None, return_final_state=False):
    """Same arguments and results as `naive.conba_scan_ref` (arguments already validated by
    `conba_scan`); one control period per block."""
    p = params
    A, D, delta_bias, delta_softplus, rho, tau = p.A, p.D, p.delta_bias, p.delta_softplus, p.rho, p.tau
    k0, eta, lam, w_r, k_max, group_size = p.k0, p.eta, p.lam, p.w_r, p.k_max, p.group_size
    sigma_w, sigma_v, seed, control_period = p.sigma_w, p.sigma_v, p.seed, p.control_period
    b, T, d = u.shape
    n = A.shape[1]
    G = group_size
    ng = d // G
    P = control_period
    acc = acc_dtype(u)
    dev = u.device
    control = eta is not None or k0 is not None
    if initial_state is None:
        initial_state = empty_state(b, d, n, tau, G, k0 if control else None, dev, acc)
    phase0 = initial_state.phase
    if control and bool(((phase0 < 0) | (phase0 >= P)).any()):
        # a phase outside 0 … P − 1 (a state from another period) never samples in the reference
        from .naive import conba_scan_ref

        return conba_scan_ref(u, delta, B, C, p, z=z, alpha=alpha, mask=mask, initial_state=initial_state,
                              return_final_state=return_final_state)
    # the state is laid out (N, d_inner) inside: h (b, N, d), the delay line (τ, b, N, d)
    h_init = initial_state.h.to(acc).transpose(1, 2)
    dl_init = initial_state.line.to(acc).permute(1, 0, 3, 2)  # dl[i] = h_{-1-i}
    k, e = initial_state.k.to(acc), initial_state.e.to(acc)

    # --- the compacted, time-major line: real steps of each row gathered to the left ---------
    if mask is None:
        Tc = T
        R = None  # every row has T real steps
        dst = None
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

    noisy = sigma_w > 0.0 or sigma_v > 0.0
    if Tc > 0 and _use_compiled(u, acc) and not _records_grad(
            u, delta, A, B, C, D, z, delta_bias, alpha, rho, k0, eta, lam, w_r, *initial_state[:4]):
        # a prefill (no gradient): the whole line, its controller and the gate in one compiled call
        from .cpu import prefill

        xi, zeta = _line_noise(seed, src_t, d, n, sigma_w, sigma_v, acc, True)
        out = prefill(line(delta), delta_bias, delta_softplus, line(u), line(alpha) if alpha is not None else None,
                      rho, A.to(acc).t(), line(B), line(C), D, line(z) if z is not None else None, xi, zeta, h_init,
                      dl_init, tau, R, G, control, k, e, phase0, P, eta, lam, w_r, k_max)
        if out is not None:
            y_l, h_run, dl_run, k, e = out
            return _finish(y_l, h_run, dl_run, k, e, mask, dst, None, acc, u, b, T, d, control, None, None, None,
                           return_final_state, R, phase0, P)
    dt, A32, control, eta_f, lam_f, w_r_f = _prepare(
        delta, delta_bias, delta_softplus, A, eta, lam, w_r, k0, d, ng, dev, acc
    )
    u_l, dt_l, B_l, C_l = line(u), line(dt), line(B), line(C)
    # a_t = coef_t exp(Δ_t A) with coef = α_t (1 − ρ), and r_t = α_t ρ, per channel
    coef = _per_channel(line(alpha), G) if alpha is not None else None  # (Tc, b, d)
    r_l = None
    if tau > 0:
        rho_c = _per_channel(rho.to(acc), G)
        r_l = coef * rho_c if coef is not None else rho_c.expand(Tc, b, d)
        coef = coef * (1.0 - rho_c) if coef is not None else (1.0 - rho_c).expand(Tc, b, d)
    D_u = D.to(acc) * u_l if D is not None else None
    At = A32.t()

    fused = _use_compiled(u_l)
    # compiled, ξ is drawn inside the kernels (NoiseKeys) and ζ once for the line; else per block in PyTorch
    xi_line, zeta_line = _line_noise(seed, src_t, d, n, sigma_w, sigma_v, acc, True) if fused else (None, None)

    def noise(s, L):
        """σ_w ξ (L, b, N, d) — or its NoiseKeys — and σ_v ζ (L, b, d) at line positions [s, s+L), or Nones."""
        if not noisy:
            return None, None
        if fused:
            return (xi_line[s:s + L] if xi_line is not None else None,
                    zeta_line[s:s + L] if zeta_line is not None else None)
        return _line_noise(seed, src_t[s:s + L], d, n, sigma_w, sigma_v, acc, False)

    if control and P == 1 and fused and Tc > 0:
        # the per-step controller (every step a sampling instant) inside the kernels: the whole line in one call,
        # forward and backward, instead of a block and the controller's autograd per step
        from .cpu import p1_scan

        extra_l = D_u
        if zeta_line is not None:
            extra_l = zeta_line if extra_l is None else extra_l + zeta_line
        out = p1_scan(dt_l, u_l, coef, r_l, At, B_l, C_l, xi_line, h_init, dl_init, tau, R, extra_l, w_r_f, eta_f,
                      lam_f, k, e, G, k_max)
        if out is not None:
            y_l, h_run, dl_run, k, e = out
            if extra_l is not None:
                y_l = y_l + extra_l
            return _finish(y_l, h_run, dl_run, k, e, mask, dst, z, acc, u, b, T, d, control,
                           eta_f, lam_f, w_r_f, return_final_state, R, phase0, P)

    ys, extras = [], []
    # without a gradient the kernel writes every block's y into one buffer (no concatenation)
    y_buf = u_l.new_empty(Tc, b, d) if fused and not _records_grad(u_l, dt_l, coef, r_l, B_l, C_l, h_init, dl_init) \
        else None
    view = lambda s_, L_: y_buf[s_:s_ + L_] if y_buf is not None else None  # noqa: E731
    if not control:  # one linear recurrence: the kernel runs it whole; blocks keep PyTorch's working set small
        starts = [0] if fused and Tc > 0 else list(range(0, Tc, BLOCK))
        uniform = True
    elif b == 0 or bool((phase0 == phase0[0]).all()):  # blocks cut at the common sampling instants
        starts = [0] + list(range(P - (int(phase0[0]) if b else 0), Tc, P)) if Tc > 0 else []
        uniform = True
    else:  # blocks of P positions, at most one instant per row in each
        starts = list(range(0, Tc, P))
        uniform = False
    lengths = [e_ - s_ for s_, e_ in zip(starts, starts[1:] + [Tc])]
    # per-block views made once (split), so that no block's gradient is a full-size tensor
    split = lambda x: x.split(lengths, 0) if x is not None else [None] * len(lengths)  # noqa: E731
    head = lambda x, m: x if x is None or m == x.shape[0] else x[:m]  # noqa: E731
    blocks = zip(starts, lengths, split(u_l), split(dt_l), split(coef), split(r_l), split(B_l),
                 split(C_l), split(D_u))
    bidx = torch.arange(b, device=dev)
    Rb = R if R is not None else torch.full((b,), Tc, dtype=torch.long, device=dev)
    h_run, dl_run = h_init, dl_init
    for s, L, u_j, dt_j, coef_j, r_j, B_j, C_j, Du_j in blocks:
        xi, zeta = noise(s, L)
        extra = Du_j
        if zeta is not None:
            extra = zeta if extra is None else extra + zeta
        steps = torch.clamp(Rb - s, 0, L) if R is not None else None  # each row's real steps in the block
        if not control:
            y, h_run, dl_run = _solve_block(dt_j, u_j, coef_j, r_j, At, B_j, C_j, xi, h_run, dl_run, tau, steps,
                                            view(s, L))
        else:
            f_old = _per_channel(k, G) * torch.tanh(e)
            inst = s + torch.remainder(P - 1 - phase0 - s, P)  # (b,) each row's first instant ≥ s
            has = (inst < s + L) & (inst < Rb)
            o = torch.clamp(inst - s, max=L - 1)
            resolve = not uniform and bool((has & (o < L - 1)).any())  # an instant before the end
            Lm = int(o.max()) + 1 if resolve else L  # the error is needed up to the last instant
            y, h_new, dl_new = _solve_block(head(dt_j, Lm), head(u_j, Lm) - f_old, head(coef_j, Lm), head(r_j, Lm),
                                            At, head(B_j, Lm), head(C_j, Lm), head(xi, Lm), h_run, dl_run, tau,
                                            steps, view(s, Lm))
            y_o = y[o, bidx] + (extra[o, bidx] if extra is not None else 0.0)
            e_at = y_o - w_r_f * u_j[o, bidx]  # tracking error at the instant (b, d)
            rms = torch.sqrt((e_at.view(b, ng, G) ** 2).sum(-1) + 1e-12) / math.sqrt(G)
            k_upd = torch.clamp((1.0 - lam_f) * k + eta_f * rms, 0.0, k_max)
            k = torch.where(has[:, None], k_upd, k)
            e = torch.where(has[:, None], e_at, e)
            if resolve:
                # the new held signal acts after each row's instant: solve the block again with it
                f_new = _per_channel(k, G) * torch.tanh(e)
                after = (torch.arange(s, s + L, device=dev)[:, None] > inst[None, :])[..., None]  # (L, b, 1)
                y, h_new, dl_new = _solve_block(dt_j, u_j - torch.where(after, f_new, f_old), coef_j, r_j, At, B_j,
                                                C_j, xi, h_run, dl_run, tau, steps, view(s, L))
            h_run, dl_run = h_new, dl_new
        if y_buf is None:
            ys.append(y)
        if zeta is not None:
            extras.append(extra)

    if y_buf is not None:
        y_l = y_buf
    else:
        y_l = torch.cat(ys, 0) if ys else u_l.new_zeros(0, b, d)  # (Tc, b, d)
    # D u (+ σ_v ζ), added once over the line (the errors at the instants added their own above)
    extra_l = torch.cat(extras, 0) if extras else D_u
    if extra_l is not None:
        y_l = y_l + extra_l
    return _finish(y_l, h_run, dl_run, k, e, mask, dst, z, acc, u, b, T, d, control,
                   eta_f, lam_f, w_r_f, return_final_state, R, phase0, P)


def _finish(y_l, h_run, dl_run, k, e, mask, dst, z, acc, u, b, T, d, control, eta_f, lam_f, w_r_f,
            return_final_state, R, phase0, P):
    """The line's y back to (b, T, d) (padding 0), the gate, and the final state."""
    dev = y_l.device
    y = y_l.transpose(0, 1)  # (b, Tc, d)
    if mask is not None:
        y = torch.cat([y, y.new_zeros(b, 1, d)], 1).gather(1, dst[..., None].expand(b, T, d))
    if z is not None:
        y = y * F.silu(z.to(acc))
    if control and eta_f is not None and torch.is_grad_enabled():
        # The loop (naive.py) computes every step's error and gain update and keeps them by a
        # torch.where, so η, λ and w_r get a (zero) gradient even when no sampling instant falls in
        # the sequence; here they would get none, and an optimiser or DDP would see them as unused
        # (no AdamW state to checkpoint, a DDP reduction error). Keep them in the graph, as the loop does.
        y = y + 0.0 * (eta_f.sum() + lam_f.sum() + w_r_f.sum())
    y = y.to(u.dtype)
    if not return_final_state:
        return y

    if control:
        real = R if R is not None else torch.full((b,), T, dtype=torch.long, device=dev)
        phase = torch.remainder(phase0 + real, P)
    else:
        phase = phase0
    # every block stops each row at its last real step: the running state is the final one
    # contiguous in the state's own layout: the decode step updates it in place (cpu.decode_step)
    return y, ConbaState(h_run.transpose(1, 2).contiguous(), dl_run.permute(1, 0, 3, 2).contiguous(), k, e, phase)
