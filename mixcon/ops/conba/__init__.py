"""Conba's selective scan with control (docs/conba.md, step 6): the public op API.

`conba_scan` runs a whole sequence, `conba_step` one decode token. Both dispatch to a
backend: ``"ref"`` (the pure-PyTorch loop in `naive.py`, the oracle), ``"triton"`` (the fused
kernels: `chunk.py`, chunk-parallel, for a control period P > 1; `fused_recurrent.py`, per step,
for P = 1), ``"chunk_torch"`` (`chunk_torch.py`: one control period per block, the CPU path; its
blocks, a prefill and the decode step run compiled (`cpu.py`) where a C++ compiler is present, pure
PyTorch otherwise), or ``"auto"`` (Triton on a CUDA device when it is importable; ``chunk_torch`` on
CPU — see `_auto_cpu`).

With none of the extras given (alpha, rho/tau, k0/eta/lam/w_r, noise, mask) `conba_scan` is
exactly Mamba-1's selective scan, in time-major layout.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from .. import tracing as _tracing
from .naive import conba_scan_ref, conba_step_ref
from .params import BACKENDS, MAX_DELAY, ConbaParams, ConbaState, check_tensor, empty_state, keyword_interface

__all__ = ["ConbaParams", "ConbaState", "conba_scan", "conba_step", "empty_state", "conba_scan_ref",
           "conba_step_ref", "MAX_DELAY"]


def _triton_available() -> bool:
    """Triton importable and the fused kernels present."""
    return (importlib.util.find_spec("triton") is not None
            and importlib.util.find_spec(__name__ + ".fused_recurrent") is not None)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "ref"
    if backend == "triton" and not _triton_available():
        raise ValueError("backend='triton' needs the triton package and mixcon's fused Conba kernels; use 'ref'")
    return backend


def _auto_cpu(control: bool, control_period: int) -> bool:
    """Whether "auto" runs `chunk_torch` on CPU: always — faster than the loop for every period,
    P = 1 (blocks of one step) included (docs/kernels.md, the chunk_torch table). The loop stays the oracle
    ("ref").
    Under torch.compile / torch.export the loop runs instead: chunk_torch compacts masks and splits
    blocks by values read from the data, which a trace cannot follow."""
    return not _tracing()


def _validate(u, delta, B, C, params, z, alpha, mask, initial_state, lead):
    """Shared argument checks; ``lead`` is (batch, T) for a scan and (batch,) for a step. The
    parameters' own checks are `ConbaParams.validate`; the per-token inputs and the state are here."""
    if not isinstance(params, ConbaParams):
        raise ValueError(f"params must be a ConbaParams, got {type(params).__name__}")
    params.validate_period()
    if u.dim() != len(lead) + 1:
        raise ValueError(f"u must have {len(lead) + 1} dims {(*('batch', 'time')[:len(lead)], 'd_inner')}, got {tuple(u.shape)}")
    d = u.shape[-1]
    params.validate(d)
    n = params.A.shape[1]
    tau = params.tau
    ng = d // params.group_size
    check_tensor("u", u, (*lead, d), allow_none=False)
    check_tensor("delta", delta, (*lead, d), allow_none=False)
    check_tensor("B", B, (*lead, n), allow_none=False)
    check_tensor("C", C, (*lead, n), allow_none=False)
    check_tensor("z", z, (*lead, d))
    check_tensor("alpha", alpha, (*lead, ng))
    if mask is not None:
        check_tensor("mask", mask, lead)
    if initial_state is not None:
        b = lead[0]
        expected = ConbaState((b, d, n), (b, tau, d, n), (b, ng), (b, d), (b,))
        if not isinstance(initial_state, tuple) or len(initial_state) != len(ConbaState._fields):
            raise ValueError("the state must be a ConbaState(h, delay, k, e, phase)")
        if initial_state.phase.is_floating_point():
            raise ValueError(f"state.phase must be an integer tensor (real steps since the last sampling "
                             f"instant), got {initial_state.phase.dtype}")
        for field, x, shape in zip(ConbaState._fields, initial_state, expected):
            if tuple(x.shape) != tuple(shape):
                raise ValueError(f"state.{field} has shape {tuple(x.shape)}, expected {tuple(shape)}")


@keyword_interface("u", "delta")
def conba_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    params: ConbaParams,
    *,
    z: Optional[torch.Tensor] = None,
    alpha: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    initial_state: Optional[ConbaState] = None,
    return_final_state: bool = False,
    backend: str = "auto",
):
    """Conba's selective scan over a whole sequence.

    Args:
        u, delta, z: (batch, time, d_inner). B, C: (batch, time, N).
        params: the layer's `ConbaParams` (A, D, delta_bias, the mechanisms' parameters, the
            control period, noise). Or, instead, the flat keyword interface ``conba_scan(u, delta,
            A, B, C, D, z, delta_bias=..., ...)`` with the same names (`keyword_interface`).
        alpha: (batch, time, d_inner // group_size), in (0, 1].
        mask: optional (batch, time), 1 for a real token, 0 for padding: padded steps are skipped.
        initial_state: a `ConbaState` to start from (default: the empty state with k = k0).
    Returns:
        y (batch, time, d_inner) in u's dtype — gated by silu(z) when z is given — and, with
        ``return_final_state``, the final `ConbaState` (float32).

    Example::

        y = conba_scan(u, delta, B, C, ConbaParams(A, D=D, delta_bias=b_dt, delta_softplus=True), z=z)
        y = conba_scan(u, delta, A, B, C, D, z, delta_bias=b_dt, delta_softplus=True)  # the same
    """
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        raise ValueError(f"u must be a (batch, time, d_inner) tensor, got {getattr(u, 'shape', type(u))}")
    _validate(u, delta, B, C, params, z, alpha, mask, initial_state, tuple(u.shape[:2]))
    kw = dict(z=z, alpha=alpha, mask=mask, initial_state=initial_state, return_final_state=return_final_state)
    P = params.control_period
    resolved = resolve_backend(backend, u.device)
    if resolved == "chunk_torch" or (backend == "auto" and u.device.type == "cpu" and _auto_cpu(params.control, P)):
        from .chunk_torch import conba_scan_chunk_torch

        return conba_scan_chunk_torch(u, delta, B, C, params, **kw)
    if resolved == "triton" and P > 1:
        # the held signal (and, without control, any P > 1): the chunk-parallel scan
        from .chunk import conba_scan_chunk

        return conba_scan_chunk(u, delta, B, C, params, **kw)
    if resolved == "triton":  # P = 1: the per-step kernels
        from .fused_recurrent import conba_scan_fused_recurrent

        return conba_scan_fused_recurrent(u, delta, B, C, params, **kw)
    return conba_scan_ref(u, delta, B, C, params, **kw)


def _cpu_step_applies(state, params, *tensors) -> bool:
    """Whether a CPU decode step can run compiled: no noise, no gradient wanted, not under a trace."""
    return not (params.noisy or _tracing() or _needs_grad(params, *tensors, *state[:4]))


@keyword_interface("state", "u", "delta")
def conba_step(
    state: ConbaState,
    u: torch.Tensor,
    delta: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    params: ConbaParams,
    *,
    z: Optional[torch.Tensor] = None,
    alpha: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    t: int = 0,
    backend: str = "auto",
):
    """One decode step of Conba: the per-token arguments of `conba_scan` without the time axis
    (u, delta, z: (batch, d_inner); B, C: (batch, N); alpha: (batch, d_inner // G); mask: (batch,))
    and the same ``params`` (or flat keywords). Updates ``state`` in place and returns y
    (batch, d_inner). ``t`` is the time index that keys the noise; the state's phase says where in
    the control period this token falls."""
    if not isinstance(u, torch.Tensor) or u.dim() != 2:
        raise ValueError(f"u must be a (batch, d_inner) tensor, got {getattr(u, 'shape', type(u))}")
    _validate(u, delta, B, C, params, z, alpha, mask, state, (u.shape[0],))
    if u.device.type == "cpu" and backend in ("auto", "chunk_torch") and _cpu_step_applies(
            state, params, u, delta, B, C, z, alpha):
        from .cpu import decode_step  # every control period: one compiled call (cpu.py)

        y = decode_step(state, u, delta, B, C, params, z=z, alpha=alpha, mask=mask)
        if y is not None:
            return y
    kw = dict(z=z, alpha=alpha, mask=mask, t=t)
    if resolve_backend(backend, u.device) == "triton" and not (
            backend == "auto" and _needs_grad(params, u, delta, B, C, z, alpha)):
        # the fused step serves every control period (the phase advances inside the kernel); it has no
        # backward: "auto" takes the reference step when a gradient is needed, "triton" raises
        if torch.compiler.is_compiling():  # the registered op: traceable, capturable (library.py)
            from .library import conba_step_compiled

            return conba_step_compiled(state, u, delta, B, C, params, **kw)
        from .fused_recurrent import conba_step_fused_recurrent

        return conba_step_fused_recurrent(state, u, delta, B, C, params, **kw)
    return conba_step_ref(state, u, delta, B, C, params, **kw)


def _needs_grad(params, *tensors) -> bool:
    """Whether autograd wants a gradient of any of ``tensors`` (None ones skipped) or of ``params``."""
    xs = (*tensors, *params.tensors())
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)
