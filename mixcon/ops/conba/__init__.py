"""Conba's selective scan with control (docs/conba.md, step 6): the public op API.

`conba_scan` runs a whole sequence, `conba_step` one decode token. The ``backend`` asked for
is ``"ref"`` (the pure-PyTorch loop in `naive.py`, the oracle), ``"triton"`` (the fused kernels),
``"chunk_torch"`` (the CPU path) or ``"auto"`` (Triton on a CUDA device when it is importable,
chunk_torch on CPU); `dispatch` turns it into the path that runs — ``"chunk"`` (`chunk.py`,
chunk-parallel, a Triton scan with P > 1), ``"fused_recurrent"`` (`fused_recurrent.py`, per step),
``"chunk_torch"`` (`chunk_torch.py`, one control period per block, compiled where a C++ compiler is
present), ``"cpu"`` (the compiled decode step, `cpu.py`) or ``"ref"`` — and both functions run
exactly what it says.

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

__all__ = ["ConbaParams", "ConbaState", "conba_scan", "conba_step", "dispatch", "empty_state", "conba_scan_ref",
           "conba_step_ref", "MAX_DELAY", "PATHS"]


def _triton_available() -> bool:
    """Triton importable and the fused kernels present."""
    return (importlib.util.find_spec("triton") is not None
            and importlib.util.find_spec(__name__ + ".fused_recurrent") is not None)


PATHS = ("ref", "chunk_torch", "cpu", "chunk", "fused_recurrent")


def dispatch(backend: str, device: torch.device, control_period: int = 1, *, step: bool = False,
             state: Optional[ConbaState] = None, params: Optional[ConbaParams] = None, dtype=torch.float32,
             needs_grad: bool = False) -> str:
    """The path a scan (or, with ``step=True``, a decode step) runs: the one decision `conba_scan` and
    `conba_step` take, so what it returns is what runs.

    - ``"chunk_torch"``: a scan on CPU (chunk_torch.py: one control period per block, its blocks
      compiled where the CPU kernels are built); ``"auto"`` takes it for every period, faster than the
      loop for all of them (docs/kernels.md, the chunk_torch table), except under torch.compile /
      torch.export, which cannot follow its data-dependent blocking: the loop runs there.
    - ``"cpu"``: a decode step on CPU in one compiled call (cpu.py), where it applies: the kernels
      built, no noise, no gradient, not under a trace, the state in the accumulation dtype.
    - ``"chunk"``: a Triton scan with P > 1 (chunk.py, chunk-parallel over the held signal).
    - ``"fused_recurrent"``: a Triton scan with P = 1, and every Triton decode step
      (fused_recurrent.py). ``"auto"`` on CUDA takes Triton when it is importable; a step that needs a
      gradient takes the loop there (the fused step has no backward; ``"triton"`` raises instead).
    - ``"ref"``: the loop (naive.py), the oracle: asked for, or where nothing above applies.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "triton" and not _triton_available():
        raise ValueError("backend='triton' needs the triton package and mixcon's fused Conba kernels; use 'ref'")
    if backend == "ref":
        return "ref"
    if backend == "chunk_torch" or (backend == "auto" and device.type == "cpu"):
        if step:
            if device.type != "cpu" or needs_grad or _tracing() or params is None or params.noisy:
                return "ref"
            from .cpu import step_applies

            return "cpu" if state is not None and step_applies(state, params, dtype) else "ref"
        return "chunk_torch" if backend == "chunk_torch" or not _tracing() else "ref"
    if backend == "auto" and not (device.type == "cuda" and _triton_available()):
        return "ref"
    if step:  # "triton", or "auto" on CUDA
        return "ref" if backend == "auto" and needs_grad else "fused_recurrent"
    return "chunk" if control_period > 1 else "fused_recurrent"


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
            raise ValueError("the state must be a ConbaState(h, line, k, e, phase)")
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
    path = dispatch(backend, u.device, params.control_period)
    if path == "chunk_torch":
        from .chunk_torch import conba_scan_chunk_torch

        return conba_scan_chunk_torch(u, delta, B, C, params, **kw)
    if path == "chunk":  # the held signal (and, without control, any P > 1): the chunk-parallel scan
        from .chunk import conba_scan_chunk

        return conba_scan_chunk(u, delta, B, C, params, **kw)
    if path == "fused_recurrent":  # P = 1: the per-step kernels
        from .fused_recurrent import conba_scan_fused_recurrent

        return conba_scan_fused_recurrent(u, delta, B, C, params, **kw)
    return conba_scan_ref(u, delta, B, C, params, **kw)


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
    kw = dict(z=z, alpha=alpha, mask=mask, t=t)
    path = dispatch(backend, u.device, params.control_period, step=True, state=state, params=params, dtype=u.dtype,
                    needs_grad=_needs_grad(params, u, delta, B, C, z, alpha, *state[:4]))
    if path == "cpu":  # every control period: one compiled call (cpu.py)
        from .cpu import decode_step

        return decode_step(state, u, delta, B, C, params, z=z, alpha=alpha, mask=mask)
    if path == "fused_recurrent":
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
