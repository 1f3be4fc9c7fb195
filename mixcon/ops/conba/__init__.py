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

from .naive import ConbaState, conba_scan_ref, conba_step_ref, empty_state

__all__ = ["ConbaState", "conba_scan", "conba_step", "empty_state", "conba_scan_ref", "conba_step_ref"]

BACKENDS = ("auto", "ref", "triton", "chunk_torch")
MAX_DELAY = 4


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
    """Whether "auto" runs `chunk_torch` on CPU: always — measured faster than the loop for every
    period, 2.1–2.4× at P = 1 (blocks of one step) and 2.5–135× where the scan is linear between
    sampling instants (control off or P > 1; README, "Kernels"). The loop stays the oracle ("ref").
    Under torch.compile / torch.export the loop runs instead: chunk_torch compacts masks and splits
    blocks by values read from the data, which a trace cannot follow."""
    return not _tracing()


def _tracing() -> bool:
    compiler = getattr(torch, "compiler", None)
    return any(getattr(compiler, f, lambda: False)() for f in ("is_compiling", "is_exporting"))


def _check(name, x, shape, allow_none=True):
    if x is None:
        if allow_none:
            return
        raise ValueError(f"{name} is required")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if not (x.is_floating_point() or name == "mask"):
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")


def _validate(u, delta, A, B, C, D, z, delta_bias, alpha, rho, tau, k0, eta, lam, w_r, group_size,
              mask, initial_state, lead, control_period=1):
    """Shared argument checks; ``lead`` is (batch, T) for a scan and (batch,) for a step."""
    if isinstance(control_period, bool) or not isinstance(control_period, int) or control_period < 1:
        raise ValueError(f"control_period={control_period!r} must be an int >= 1 (real steps between two "
                         f"actions of the controller; 1 = act every step)")
    if u.dim() != len(lead) + 1:
        raise ValueError(f"u must have {len(lead) + 1} dims {(*('batch', 'time')[:len(lead)], 'd_inner')}, got {tuple(u.shape)}")
    d = u.shape[-1]
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A has shape {tuple(A.shape)}, expected (d_inner={d}, N)")
    n = A.shape[1]
    if not isinstance(group_size, int) or group_size < 1 or d % group_size != 0:
        raise ValueError(f"group_size={group_size!r} must be a positive int dividing d_inner={d}")
    if not isinstance(tau, int) or not 0 <= tau <= MAX_DELAY:
        raise ValueError(f"tau={tau!r} must be an int in [0, {MAX_DELAY}]")
    ng = d // group_size
    _check("u", u, (*lead, d), allow_none=False)
    _check("delta", delta, (*lead, d), allow_none=False)
    _check("B", B, (*lead, n), allow_none=False)
    _check("C", C, (*lead, n), allow_none=False)
    _check("z", z, (*lead, d))
    _check("alpha", alpha, (*lead, ng))
    for name, x in (("D", D), ("delta_bias", delta_bias), ("w_r", w_r)):
        _check(name, x, (d,))
    for name, x in (("rho", rho), ("k0", k0), ("eta", eta), ("lam", lam)):
        _check(name, x, (ng,))
    if tau > 0 and rho is None:
        raise ValueError("tau > 0 needs rho (shape (d_inner // group_size,)); pass tau=0 for no delay")
    if mask is not None:
        _check("mask", mask, lead)
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


def conba_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    alpha: Optional[torch.Tensor] = None,
    rho: Optional[torch.Tensor] = None,
    tau: int = 0,
    k0: Optional[torch.Tensor] = None,
    eta: Optional[torch.Tensor] = None,
    lam: Optional[torch.Tensor] = None,
    w_r: Optional[torch.Tensor] = None,
    k_max: float = 1.0,
    group_size: int = 8,
    sigma_w: float = 0.0,
    sigma_v: float = 0.0,
    seed: int = 0,
    initial_state: Optional[ConbaState] = None,
    return_final_state: bool = False,
    backend: str = "auto",
    mask: Optional[torch.Tensor] = None,
    control_period: int = 1,
):
    """Conba's selective scan over a whole sequence.

    Args:
        u, delta, z: (batch, time, d_inner). B, C: (batch, time, N). A: (d_inner, N), negative.
        D, delta_bias, w_r: (d_inner,). alpha: (batch, time, d_inner // group_size), in (0, 1].
        rho, k0, eta, lam: (d_inner // group_size,), already in their ranges (rho, lam in [0, 1),
            eta ≥ 0). Control is on when ``k0`` or ``eta`` is given; the delay when ``tau > 0``.
        sigma_w, sigma_v: process / observation noise scales (0 = off), keyed by ``seed``.
        mask: optional (batch, time), 1 for a real token, 0 for padding: padded steps are skipped.
        control_period: P, real steps between two sampling instants of the controller (it holds
            its signal in between); 1 = the per-step controller.
        initial_state: a `ConbaState` to start from (default: the empty state with k = k0).
    Returns:
        y (batch, time, d_inner) in u's dtype — gated by silu(z) when z is given — and, with
        ``return_final_state``, the final `ConbaState` (float32).

    Example::

        y = conba_scan(u, delta, A, B, C, D, z, delta_bias=b_dt, delta_softplus=True)
    """
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        raise ValueError(f"u must be a (batch, time, d_inner) tensor, got {getattr(u, 'shape', type(u))}")
    _validate(u, delta, A, B, C, D, z, delta_bias, alpha, rho, tau, k0, eta, lam, w_r, group_size,
              mask, initial_state, tuple(u.shape[:2]), control_period)
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, alpha=alpha, rho=rho,
                  tau=tau, k0=k0, eta=eta, lam=lam, w_r=w_r, k_max=k_max, group_size=group_size,
                  sigma_w=sigma_w, sigma_v=sigma_v, seed=seed, initial_state=initial_state,
                  return_final_state=return_final_state, mask=mask)
    control = k0 is not None or eta is not None
    resolved = resolve_backend(backend, u.device)
    if resolved == "chunk_torch" or (backend == "auto" and u.device.type == "cpu" and _auto_cpu(control, control_period)):
        from .chunk_torch import conba_scan_chunk_torch

        return conba_scan_chunk_torch(u, delta, A, B, C, **kwargs, control_period=control_period)
    if resolved == "triton" and control_period > 1:
        # the held signal (and, without control, any P > 1): the chunk-parallel scan
        from .chunk import conba_scan_chunk

        return conba_scan_chunk(u, delta, A, B, C, **kwargs, control_period=control_period)
    if resolved == "triton":  # P = 1: the per-step kernels
        from .fused_recurrent import conba_scan_triton

        return conba_scan_triton(u, delta, A, B, C, **kwargs)
    return conba_scan_ref(u, delta, A, B, C, **kwargs, control_period=control_period)


_NOT_STEP = ("sigma_w", "sigma_v", "seed", "t")  # the compiled step runs without noise


def _cpu_step_applies(state, kwargs, *tensors) -> bool:
    """Whether a CPU decode step can run compiled: no noise, no gradient wanted, not under a trace."""
    if kwargs["sigma_w"] > 0.0 or kwargs["sigma_v"] > 0.0 or _tracing():
        return False
    if torch.is_grad_enabled():
        xs = (*tensors, *state[:4], *(v for v in kwargs.values() if isinstance(v, torch.Tensor)))
        if any(x.requires_grad for x in xs):
            return False
    return True


def conba_step(
    state: ConbaState,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    alpha: Optional[torch.Tensor] = None,
    rho: Optional[torch.Tensor] = None,
    tau: int = 0,
    k0: Optional[torch.Tensor] = None,
    eta: Optional[torch.Tensor] = None,
    lam: Optional[torch.Tensor] = None,
    w_r: Optional[torch.Tensor] = None,
    k_max: float = 1.0,
    group_size: int = 8,
    sigma_w: float = 0.0,
    sigma_v: float = 0.0,
    seed: int = 0,
    backend: str = "auto",
    mask: Optional[torch.Tensor] = None,
    t: int = 0,
    control_period: int = 1,
):
    """One decode step of Conba: the per-token arguments of `conba_scan` without the time axis
    (u, delta, z: (batch, d_inner); B, C: (batch, N); alpha: (batch, d_inner // G); mask: (batch,)).
    Updates ``state`` in place and returns y (batch, d_inner). ``t`` is the time index that keys
    the noise; ``control_period`` as in `conba_scan` (the state's phase says where in the period
    this token falls)."""
    if not isinstance(u, torch.Tensor) or u.dim() != 2:
        raise ValueError(f"u must be a (batch, d_inner) tensor, got {getattr(u, 'shape', type(u))}")
    _validate(u, delta, A, B, C, D, z, delta_bias, alpha, rho, tau, k0, eta, lam, w_r, group_size,
              mask, state, (u.shape[0],), control_period)
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, alpha=alpha, rho=rho,
                  tau=tau, k0=k0, eta=eta, lam=lam, w_r=w_r, k_max=k_max, group_size=group_size,
                  sigma_w=sigma_w, sigma_v=sigma_v, seed=seed, mask=mask, t=t)
    if u.device.type == "cpu" and backend in ("auto", "chunk_torch") and _cpu_step_applies(state, kwargs, u, delta, A, B, C):
        from .cpu import decode_step  # every control period: one compiled call (cpu.py)

        y = decode_step(state, u, delta, A, B, C, **{k: v for k, v in kwargs.items() if k not in _NOT_STEP},
                        control_period=control_period)
        if y is not None:
            return y
    if resolve_backend(backend, u.device) == "triton" and not (backend == "auto" and _needs_grad(kwargs, u, delta, A, B, C)):
        # the fused step serves every control period (the phase advances inside the kernel); it has no
        # backward: "auto" takes the reference step when a gradient is needed, "triton" raises
        if torch.compiler.is_compiling():  # the registered op: traceable, capturable (library.py)
            from .library import conba_step_compiled

            return conba_step_compiled(state, u, delta, A, B, C, **kwargs, control_period=control_period)
        from .fused_recurrent import conba_step_triton

        return conba_step_triton(state, u, delta, A, B, C, **kwargs, control_period=control_period)
    return conba_step_ref(state, u, delta, A, B, C, **kwargs, control_period=control_period)


def _needs_grad(kwargs, *tensors) -> bool:
    xs = (*tensors, *(v for v in kwargs.values() if isinstance(v, torch.Tensor)))
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)
