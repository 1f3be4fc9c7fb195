"""`ConbaParams`: a Conba layer's parameters and settings, the one argument every scan and step takes.

The op interface is ``fn(u, delta, B, C, params, *, z=None, alpha=None, mask=None, ...)`` for a scan
(``fn(state, u, delta, B, C, params, ...)`` for a decode step): the per-token inputs stay call
arguments, everything fixed for a layer lives in `ConbaParams`. `keyword_interface` lets each
function also take the flat keyword interface (``u, delta, A, B, C, D, z, delta_bias=..., ...``)
that the public API and the tests have always used: it builds the `ConbaParams` and calls through.
`ConbaState` is what a decode step carries from token to token (and a scan takes and returns).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch

__all__ = ["ConbaParams", "ConbaState", "empty_state", "keyword_interface", "MAX_DELAY", "BACKENDS"]

MAX_DELAY = 4  # the largest delay τ the kernels carry (docs/conba.md, step 6)
# the backends `conba_scan` / `conba_step` take (and the config's ``conba_backend``): see ops/conba/__init__.py
BACKENDS = ("auto", "ref", "triton", "chunk_torch")


def check_tensor(name, x, shape, allow_none=True):
    """None (where allowed) or a floating tensor of ``shape`` (``mask``: any dtype); else a ValueError."""
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


@dataclass(frozen=True, eq=False)  # eq=False: identity, not an element-wise comparison of tensors
class ConbaParams:
    """What a Conba layer fixes for a whole call (docs/conba.md, step 6); shapes with d = d_inner,
    N the state size, G = ``group_size``:

    A: (d, N), negative.  D, delta_bias, w_r: (d,) or None.  rho, k0, eta, lam: (d // G,) or None,
    already in their ranges (rho, lam in [0, 1), eta ≥ 0).  delta_softplus: Δ ← softplus(Δ + bias).
    tau: the delay (0 = none; needs rho when > 0).  Control is on when k0 or eta is given
    (`control`); k_max bounds its gain, control_period P is the real steps between two sampling
    instants (1 = act every step).  sigma_w, sigma_v: process / observation noise (0 = off), keyed
    by ``seed``.

    Example::

        p = ConbaParams(A, D=D, delta_bias=b_dt, delta_softplus=True)
        y = conba_scan(u, delta, B, C, p, z=z)
    """

    A: torch.Tensor
    D: Optional[torch.Tensor] = None
    delta_bias: Optional[torch.Tensor] = None
    delta_softplus: bool = False
    rho: Optional[torch.Tensor] = None
    tau: int = 0
    k0: Optional[torch.Tensor] = None
    eta: Optional[torch.Tensor] = None
    lam: Optional[torch.Tensor] = None
    w_r: Optional[torch.Tensor] = None
    k_max: float = 1.0
    group_size: int = 8
    control_period: int = 1
    sigma_w: float = 0.0
    sigma_v: float = 0.0
    seed: int = 0

    @property
    def control(self) -> bool:
        """Whether the output-feedback controller runs (k0 or eta given)."""
        return self.k0 is not None or self.eta is not None

    @property
    def noisy(self) -> bool:
        return self.sigma_w > 0.0 or self.sigma_v > 0.0

    def tensors(self) -> tuple:
        """The tensor parameters that are given (for gradient and device checks)."""
        return tuple(x for x in (self.A, self.D, self.delta_bias, self.rho, self.k0, self.eta, self.lam, self.w_r)
                     if x is not None)

    def replace(self, **changes) -> "ConbaParams":
        """A copy with ``changes`` (the dataclass is frozen)."""
        return ConbaParams(**{**self.as_kwargs(), **changes})

    def as_kwargs(self) -> dict:
        """The fields as the flat keyword interface names them."""
        return {f: getattr(self, f) for f in FIELDS}

    def validate_period(self) -> None:
        cp = self.control_period
        if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
            raise ValueError(f"control_period={cp!r} must be an int >= 1 (real steps between two "
                             f"actions of the controller; 1 = act every step)")

    def validate(self, d_inner: int) -> None:
        """The parameters' own checks for a layer of width ``d_inner``: one ValueError naming the
        first field that is wrong and what is allowed."""
        self.validate_period()
        d, A, G, tau = d_inner, self.A, self.group_size, self.tau
        if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != d:
            raise ValueError(f"A has shape {tuple(getattr(A, 'shape', ()))}, expected (d_inner={d}, N)")
        if isinstance(G, bool) or not isinstance(G, int) or G < 1 or d % G != 0:
            raise ValueError(f"group_size={G!r} must be a positive int dividing d_inner={d}")
        if isinstance(tau, bool) or not isinstance(tau, int) or not 0 <= tau <= MAX_DELAY:
            raise ValueError(f"tau={tau!r} must be an int in [0, {MAX_DELAY}]")
        check_tensor("A", A, A.shape, allow_none=False)
        ng = d // G
        for name in ("D", "delta_bias", "w_r"):
            check_tensor(name, getattr(self, name), (d,))
        for name in ("rho", "k0", "eta", "lam"):
            check_tensor(name, getattr(self, name), (ng,))
        if tau > 0 and self.rho is None:
            raise ValueError("tau > 0 needs rho (shape (d_inner // group_size,)); pass tau=0 for no delay")


FIELDS = tuple(f.name for f in fields(ConbaParams))
_FIELD_SET = frozenset(FIELDS)
# the flat interface's positional order after the leading inputs (u, delta or state, u, delta); every
# scan and step shared it up to ``seed``, later arguments differ per function and go by keyword
_POSITIONAL = ("A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "alpha", "rho", "tau", "k0", "eta", "lam",
               "w_r", "k_max", "group_size", "sigma_w", "sigma_v", "seed")


def keyword_interface(*lead: str):
    """Decorator: ``fn(*lead, B, C, params, **kw)`` also callable with the flat interface
    ``fn(*lead, A, B, C, D, z, delta_bias, ..., seed, **kw)`` (positional up to ``seed``, or keywords):
    the parameter fields are gathered into a `ConbaParams`, with the dataclass's defaults (one default
    per field, whichever scan is called). A call that passes a
    `ConbaParams` (as the argument after C, or ``params=``) goes straight through: one type check, no
    binding."""

    n = len(lead) + 2  # the index of params in the new form (of C in the flat one)
    names = (*lead, *_POSITIONAL)

    def wrap(fn):
        @functools.wraps(fn)
        def adapter(*args, **kwargs):
            if (len(args) > n and isinstance(args[n], ConbaParams)) or "params" in kwargs:
                return fn(*args, **kwargs)
            if len(args) > len(names):
                raise TypeError(f"{fn.__name__}() takes at most {len(names)} positional arguments in the flat "
                                f"interface (up to seed), got {len(args)}; pass the rest by keyword")
            bound = dict(zip(names, args))
            for k, v in kwargs.items():
                if k in bound:
                    raise TypeError(f"{fn.__name__}() got multiple values for argument {k!r}")
                bound[k] = v
            missing = [k for k in (*lead, "A", "B", "C") if k not in bound]
            if missing:
                raise TypeError(f"{fn.__name__}() missing required argument(s): {', '.join(missing)}")
            params = ConbaParams(**{k: bound.pop(k) for k in FIELDS if k in bound})
            first = [bound.pop(k) for k in (*lead, "B", "C")]
            return fn(*first, params, **bound)

        return adapter  # functools.wraps: adapter.__wrapped__ is the params-only function

    return wrap


class _ConbaStateFields(NamedTuple):
    h: torch.Tensor
    line: torch.Tensor
    k: torch.Tensor
    e: torch.Tensor
    phase: torch.Tensor


class ConbaState(_ConbaStateFields):
    """Decode state of one Conba scan (docs/conba.md, "Decode state"); float32 (float64 for float64 inputs).

    h:     (batch, d_inner, N)         the latest state h_t
    line:  (batch, tau, d_inner, N)    the delay line: line[:, j] = h_{t-j} for j = 0..tau-1 (line[:, 0] == h)
    k:     (batch, d_inner // G)       the control gain set at the last sampling instant
    e:     (batch, d_inner)            the tracking error sampled at that instant (held signal
                                       f = k · tanh(e))
    phase: (batch,) int64              real steps since that instant, 0 … P − 1

    With P = 1 (the per-step controller) every real step is a sampling instant: k is k_{t+1},
    e is e_t of the latest step and the phase stays 0. Without control k, e and the phase pass
    through untouched.

    ``ConbaState(h, line, k, e, phase)``, or ``ConbaState(iterable of the five)`` as a plain tuple type is
    called: code that rebuilds every tuple it walks as ``type(x)(generator)`` (transformers' exporters
    cast a cache's tensors that way) gets a ConbaState back.
    """

    __slots__ = ()

    def __new__(cls, *fields, **named):
        if len(fields) == 1 and not named and not isinstance(fields[0], torch.Tensor):
            fields = tuple(fields[0])
        return super().__new__(cls, *fields, **named)


def empty_state(batch, d_inner, d_state, tau=0, group_size=8, k0=None, device=None,
                dtype=torch.float32) -> ConbaState:
    """The state before the first token: h = 0, delay line 0, k = k_0, e = 0, phase 0."""
    n_groups = d_inner // group_size
    h = torch.zeros(batch, d_inner, d_state, dtype=dtype, device=device)
    line = torch.zeros(batch, tau, d_inner, d_state, dtype=dtype, device=device)
    if k0 is None:
        k = torch.zeros(batch, n_groups, dtype=dtype, device=device)
    else:
        k = k0.to(device=device, dtype=dtype).expand(batch, n_groups).clone()  # keeps k0 in the graph
    e = torch.zeros(batch, d_inner, dtype=dtype, device=device)
    phase = torch.zeros(batch, dtype=torch.long, device=device)
    return ConbaState(h, line, k, e, phase)
