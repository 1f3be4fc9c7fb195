"""Conba's plant on CPU, compiled: the Python side of the fused block scan (forward and backward), the
prefill, the decode step and a whole layer's decode token, whose C++ is in mixcon/ops/cpu/csrc/ (built and
loaded by `mixcon.ops.cpu`; `kernels()` is its module, or None where it cannot be built: callers then run
the pure-PyTorch path, chunk_torch.py and naive.py, which gives the same results).

A task of the kernels holds one (row, tile of channels) state in cache and runs the whole time line over
it: nothing of size (L, batch, N, d_inner) is formed, forward or backward (the backward recomputes the
states from checkpoints every 32 steps). Why, and what it measured: docs/kernels.md, "Compiled on CPU".

The layer's decode token (`decode_layer`) takes the layer's tensors by name: `DECODE_WEIGHTS`, checked
against the names the kernel reads (its ``decode_weights()``) once when the module is loaded.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import acc_dtype
from .. import cpu as _cpu
from ..cpu import applies, empty, kernels
from .params import keyword_interface

__all__ = ["kernels", "applies", "empty", "block_scan", "p1_scan", "decode_step", "decode_layer", "DECODE_WEIGHTS",
           "find_decode_weights", "check_decode_weights", "NoiseKeys", "noise"]

# With training noise the forward keeps its states (L, b, N, d) for the backward instead of the backward
# drawing every ξ again (why: docs/kernels.md, "Training noise on CPU"). False: the backward recomputes the
# states and draws the noise again.
KEEP_NOISY_STATES = True


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def _c(x: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return _empty(like) if x is None else x.contiguous()


class NoiseKeys:
    """The process noise of a block for the compiled kernels, which draw it themselves (noise.py's hash and
    lanes, bit for bit) step by step and tile by tile, forward and again in the backward: the step keys
    ``keys`` (L, b) (noise.step_key of each position's original time, int64) and σ_w. Sliced along time
    like the (L, b, N, d) noise tensor it stands for."""

    __slots__ = ("keys", "sigma")

    def __init__(self, keys: torch.Tensor, sigma: float):
        self.keys, self.sigma = keys, float(sigma)

    @property
    def shape(self):
        return self.keys.shape

    def __getitem__(self, index):
        return NoiseKeys(self.keys[index], self.sigma)


def noise(keys: torch.Tensor, d_inner: int, d_state: int, n: int) -> torch.Tensor:
    """(L, b, d_inner) float32 standard normals of state index ``n`` (n = d_state: the observation noise ζ)
    for step keys (L, b) — chunk_torch._block_noise's ``z[:, :, n]``, bit for bit, without the other lanes."""
    return kernels().noise(keys.contiguous(), int(d_inner), int(d_state), int(n))


def _noise_args(xi, like):
    """(keys, σ_w) for the kernels: none → an empty key tensor."""
    if xi is None:
        return steps_none(like), 0.0
    return xi.keys.contiguous(), xi.sigma


class _FusedBlockScan(torch.autograd.Function):
    """(y, h_last, dl_last) of the block scan (csrc/scan_fwd.cpp, scan_bwd.cpp): row b runs its first steps[b]
    steps, y is 0 after them, h_last = h_{steps−1} (h0 when none) and dl_last[i] = h_{steps−1−i}
    (from the delay line dl0 before the block). ``xi``: a `NoiseKeys` or None.

    Without noise the backward recomputes the states from checkpoints (nothing of size (L, b, N, d) is
    kept). With noise, recomputing them means drawing every ξ again — the dear part of a noisy step — so
    the forward keeps its states (L, b, N, d) and the backward reads them, unless `KEEP_NOISY_STATES` is
    False."""

    @staticmethod
    def forward(ctx, dt, ut, coef, r, At, B, C, xi, h0, dl0, steps, tau):
        ctx.set_materialize_grads(False)
        args = [_c(x, dt) for x in (dt, ut, coef, r, At, B, C)]
        keys, sigma = _noise_args(xi, dt)
        state = [_c(x, dt) for x in (h0, dl0)]
        st = steps.contiguous() if steps is not None else steps_none(dt)
        keep = xi is not None and KEEP_NOISY_STATES
        hs = dt.new_empty(dt.shape[0], dt.shape[1], At.shape[0], dt.shape[2]) if keep else _empty(dt)
        y, h_last, dl_last = kernels().scan_fwd(*args, keys, sigma, *state, st, tau, _empty(dt), hs)
        ctx.save_for_backward(*args, keys, *state, st, hs)
        ctx.tau, ctx.sigma = tau, sigma
        ctx.has = (coef is not None, r is not None)
        return y, h_last, dl_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gh, gdl):
        *args, keys, h0, dl0, st, hs = ctx.saved_tensors
        like = args[0]
        gdt, gu, gcoef, gr, gAt, gB, gC, gh0, gdl0 = kernels().scan_bwd(
            *args, keys, ctx.sigma, h0, dl0, st, ctx.tau, _c(gy, like), _c(gh, like),
            _c(gdl, like) if ctx.tau > 0 else _empty(like), hs)
        has_coef, has_r = ctx.has
        return (gdt, gu, gcoef if has_coef else None, gr if has_r else None, gAt, gB, gC, None, gh0,
                gdl0 if ctx.tau > 0 else None, None, None)


class _FusedP1Scan(torch.autograd.Function):
    """The block scan of a whole line with the per-step controller (control period 1) inside the kernels
    (csrc/scan.h, Ctl1): f_t = k_t tanh(e_{t−1}) subtracted from u_t, the error e_t = y_t + extra_t −
    w_r u_t and the gain law after every step. Returns (y, h_last, dl_last, k, e) — y without ``extra``
    (D u + σ_v ζ), k and e after each row's last step. The kernels keep k_t and e_t of every step (the size
    of y) for the backward, which runs the controller's adjoint inside the plant's."""

    @staticmethod
    def forward(ctx, dt, ut, coef, r, At, B, C, xi, h0, dl0, steps, tau, extra, w_r, eta, lam, k0, e0, G, k_max):
        ctx.set_materialize_grads(False)
        args = [_c(x, dt) for x in (dt, ut, coef, r, At, B, C)]
        keys, sigma = _noise_args(xi, dt)
        state = [_c(x, dt) for x in (h0, dl0)]
        ctl = [_c(x, dt) for x in (extra, w_r, eta, lam, k0, e0)]
        st = steps.contiguous() if steps is not None else steps_none(dt)
        keep = xi is not None and KEEP_NOISY_STATES
        hs = dt.new_empty(dt.shape[0], dt.shape[1], At.shape[0], dt.shape[2]) if keep else _empty(dt)
        y, h_last, dl_last, kT, eT, K, E = kernels().p1_fwd(*args, keys, sigma, *state, st, tau, hs, ctl, G, k_max)
        ctx.save_for_backward(*args, keys, *state, st, hs, *ctl, K, E)
        ctx.tau, ctx.sigma, ctx.G, ctx.k_max = tau, sigma, G, k_max
        ctx.has = (coef is not None, r is not None, extra is not None, w_r is not None, eta is not None,
                   lam is not None)
        return y, h_last, dl_last, kT, eT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gh, gdl, gk, ge):
        saved = ctx.saved_tensors
        args, (keys, h0, dl0, st, hs), ctl = saved[:7], saved[7:12], saved[12:]
        like = args[0]
        out = kernels().p1_bwd(*args, keys, ctx.sigma, h0, dl0, st, ctx.tau, _c(gy, like), _c(gh, like),
                               _c(gdl, like) if ctx.tau > 0 else _empty(like), hs,
                               [*ctl, _c(gk, like), _c(ge, like)], ctx.G, ctx.k_max)
        gdt, gu, gcoef, gr, gAt, gB, gC, gh0, gdl0, g_extra, gw_r, geta, glam, gk0, ge0 = out
        has_coef, has_r, has_extra, has_wr, has_eta, has_lam = ctx.has
        return (gdt, gu, gcoef if has_coef else None, gr if has_r else None, gAt, gB, gC, None, gh0,
                gdl0 if ctx.tau > 0 else None, None, None, g_extra if has_extra else None, gw_r if has_wr else None,
                geta if has_eta else None, glam if has_lam else None, gk0, ge0, None, None)


def p1_scan(dt, ut, coef, r, At, B, C, xi, h0, dl0, tau, steps, extra, w_r, eta, lam, k0, e0, G, k_max):
    """The whole compacted line with the per-step controller (P = 1) in the kernels, forward and backward
    (`_FusedP1Scan`), or None where a tile would split a control group (then the blocks run)."""
    tile = 64 if dt.dtype == torch.float32 else 32
    if tile % G or kernels() is None or not hasattr(kernels(), "p1_fwd"):
        return None
    if tau == 0:
        r, dl0 = None, None
    return _FusedP1Scan.apply(dt, ut, coef, r, At, B, C, xi, h0, dl0, steps, tau, extra, w_r, eta, lam, k0, e0,
                              int(G), float(k_max))


def steps_none(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.long, device=like.device)


def block_scan(dt, ut, coef, r, At, B, C, xi, h0, dl0, tau, steps=None, out=None):
    """The fused block scan; see `_FusedBlockScan`. ``xi``: the process noise as a `NoiseKeys`, or None.
    dl0 (τ, b, N, d) is ignored when τ = 0. ``out``: a contiguous (L, b, d) tensor that receives y, used
    only when no gradient is recorded (a prefill writes every block into one buffer instead of
    concatenating them)."""
    if tau == 0:
        r, dl0 = None, None
    xs = (dt, ut, coef, r, At, B, C, h0, dl0)
    if out is not None and not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)):
        st = steps.contiguous() if steps is not None else steps_none(dt)
        a = [_c(x, dt) for x in xs]
        return kernels().scan_fwd(*a[:7], *_noise_args(xi, dt), *a[7:], st, tau, out, _empty(dt))
    return _FusedBlockScan.apply(dt, ut, coef, r, At, B, C, xi, h0, dl0, steps, tau)


def step_applies(state, params, dtype: torch.dtype) -> bool:
    """Whether `decode_step` can take this step (`ops.conba.dispatch` asks): the kernels built, a control
    group of at most 64 channels, the state on CPU, contiguous, in the accumulation dtype of inputs of
    ``dtype``, its phase int64. Noise, gradients and tracing are the dispatcher's own conditions."""
    acc = acc_dtype(dtype)
    return (kernels() is not None and params.group_size <= 64 and state.phase.dtype == torch.long
            and state.phase.is_contiguous()
            and all(s.dtype == acc and s.is_contiguous() and s.device.type == "cpu" for s in state[:4]))


@keyword_interface("state", "u", "delta")
def decode_step(state, u, delta, B, C, params, *, z=None, alpha=None, mask=None):
    """`naive.conba_step_ref` (noise off — ``params``' sigma_w, sigma_v are not read — no gradient) in
    one compiled call, where `step_applies`; the state is updated in place. Returns y (b, d) in u's
    dtype."""
    p = params
    group_size = p.group_size
    mod = kernels()
    acc = acc_dtype(u)
    e = u.new_empty(0, dtype=acc)
    c = lambda x: e if x is None else x.to(acc).contiguous()  # noqa: E731
    m = mask.to(torch.long).contiguous() if mask is not None else e.long()
    y = torch.empty(u.shape, dtype=acc)
    mod.step(state.h, state.line, state.k, state.e, state.phase, c(u), c(delta), c(p.A), c(B), c(C), c(p.D), c(z),
             c(p.delta_bias), bool(p.delta_softplus), c(alpha), c(p.rho), int(p.tau), p.control, c(p.eta),
             c(p.lam), c(p.w_r), float(p.k_max), int(group_size), m, int(p.control_period), y)
    return y.to(u.dtype)


def prefill(delta, delta_bias, softplus, u, alpha, rho, At, B, C, D, z, xi, zeta, h0, dl0, tau, steps, G, control,
            k0, e0, phase0, P, eta, lam, w_r, k_max):
    """A whole compacted line in one call, forward only (no gradient), from the raw per-token inputs
    (time-major (L, b, ·); alpha per group): Δ = softplus(δ + bias), the decay, the delay line, the
    held signal and each row's sampling instants ((phase0 + t + 1) % P == 0) with the error and gain
    law, y + D u (+ ζ), gated by silu(z). ``xi``: the process noise as a `NoiseKeys` (drawn in the
    kernel) or None; ``zeta``: σ_v ζ (L, b, d) or None. Returns (y, h_last, dl_last, k, e), or None
    where a tile would split a control group (then the block path runs)."""
    tile = 64 if delta.dtype == torch.float32 else 32
    if tile % G:
        return None
    if tau == 0:
        rho, dl0 = None, None
    like = delta
    st = steps.contiguous() if steps is not None else steps_none(like)
    ph = phase0.contiguous() if control else like.new_empty(0, dtype=torch.long)
    return kernels().prefill(
        _c(delta, like), _c(delta_bias.to(like.dtype) if delta_bias is not None else None, like), bool(softplus),
        _c(u, like), _c(alpha, like), _c(rho.to(like.dtype) if rho is not None else None, like), _c(At, like),
        _c(B, like), _c(C, like), _c(D.to(like.dtype) if D is not None else None, like), _c(z, like),
        *_noise_args(xi, like), _c(zeta, like), _c(h0, like), _c(dl0, like), st, int(tau), int(G), bool(control),
        _c(k0, like), _c(e0, like),
        ph, int(P), *(_c(x.to(like.dtype) if x is not None else None, like) for x in (eta, lam, w_r)), float(k_max))


# The tensors of a Conba layer that its decode token (`decode_layer`) takes, in this order, by their names
# in the layer (mixcon/layers/conba.py, ConbaMixer): a parameter's path, or "A" = −exp(A_log), which the
# layer derives. One absent from the layer (its mechanism off) is passed as `empty(dtype)`. The kernel's
# own list (mixcon/ops/cpu/csrc/layer_decode.cpp, MIXCON_DECODE_WEIGHTS) must be this one: checked at load.
DECODE_WEIGHTS = ("conv1d.weight", "conv1d.bias", "x_proj.weight", "sel_gate.weight", "sel_value.weight",
                  "sel_out.weight", "dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight",
                  "dt_proj.weight", "dt_proj.bias", "A", "D", "alpha_bias", "rho_raw", "eta_raw", "lam_raw", "w_r")
_DECODE_PATHS = tuple((name, *name.rpartition(".")[::2]) for name in DECODE_WEIGHTS)  # (name, submodule, attribute)


def find_decode_weights(layer: torch.nn.Module, derived: dict, absent: torch.Tensor) -> list:
    """`DECODE_WEIGHTS` of ``layer``, in order: ``derived[name]`` where given (the layer's "A"), else the
    parameter of that name, looked up in the modules' parameter dicts (once per layer and token: nn.Module's
    attribute lookup would cost more than the rest of the hand-off), else ``absent``."""
    mods, own = layer._modules, layer._parameters
    out = []
    for name, owner, attr in _DECODE_PATHS:
        t = derived.get(name)
        if t is None:
            params = own if not owner else getattr(mods.get(owner), "_parameters", None)
            t = params.get(attr) if params is not None else None
        out.append(absent if t is None else t)
    return out


@_cpu.after_load
def check_decode_weights(mod) -> None:
    """The kernel's decode weights (its ``decode_weights()``) against `DECODE_WEIGHTS`: a clear error if
    they disagree, which would hand the kernel one tensor for another."""
    names = tuple(mod.decode_weights())
    if names != DECODE_WEIGHTS:
        raise RuntimeError(f"mixcon: the compiled layer decode (mixcon/ops/cpu/csrc/layer_decode.cpp, "
                           f"MIXCON_DECODE_WEIGHTS) reads its weights as {names}, but DECODE_WEIGHTS "
                           f"(mixcon/ops/conba/cpu.py) is {DECODE_WEIGHTS}: the two must name the same tensors "
                           f"in the same order")


def decode_layer(xz, mask, conv_state, state, weights: list, dt_rank: int, tau: int, group_size: int,
                 control_period: int, control: bool, k_max: float, eps: float):
    """A Conba layer's decode token from in_proj's output ``xz`` (b, 2·d_inner) to the gated y
    (b, d_inner) that goes into out_proj, in one compiled call (ConbaMixer._step: mask, conv step,
    selection, Δ, parameter transforms, `conba_step`); ``conv_state`` and ``state`` are updated in
    place. ``weights``: the tensors named by DECODE_WEIGHTS, in that order (`find_decode_weights`;
    `empty(dtype)` where that part is off), contiguous, on CPU, of the state's dtype (the kernel checks).
    Returns None where the call does not apply (no module, a group wider than 64, xz or the state not
    float32/float64 of one dtype): then run the PyTorch step. Called once per layer and token, so it checks little: the
    weights' checks are the kernel's."""
    mod = kernels()
    acc = state.h.dtype
    if mod is None or group_size > 64 or xz.dtype != acc or acc not in (torch.float32, torch.float64):
        return None
    m = mask.to(torch.long).contiguous() if mask is not None else empty(torch.long)
    return mod.decode_layer(xz, m, conv_state, state.h, state.line, state.k, state.e, state.phase, weights,
                            dt_rank, tau, group_size, control_period, control, k_max, eps)
