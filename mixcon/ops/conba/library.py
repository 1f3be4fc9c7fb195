"""The fused Conba decode step as a torch.library custom op, so torch.compile can trace through it.

`conba_step_fused_recurrent` launches a Triton kernel from Python with Python-side argument handling;
traced by torch.compile that would be a graph break (or, in a CUDA graph, no capture at all). Registered
here as ``mixcon::conba_step`` (with a fake implementation giving y's shape), the compiler keeps it as
one opaque call inside the graph: the decode step compiles with ``fullgraph=True`` and runs captured in
a CUDA graph (``mode="reduce-overhead"``). The op writes the state (h, delay line, k, e) in place, as
the step does; it is declared to do so (``mutates_args``), so functionalisation keeps the writes.

The op serves every control period: with control at P > 1 the kernel advances the phase (also written
in place, and declared so) and updates the gain only at sampling instants.

`conba_step` (``mixcon.ops.conba``) calls `conba_step_compiled` for the Triton backend while
compiling; eager calls keep the direct launch (the dispatcher adds a few µs a call). Inference only:
with gradients required the dispatcher's "auto" runs the reference step (plain PyTorch, which the
compiler traces) and an explicit "triton" raises.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _needs_grad  # the package's own check (it imports this module lazily, after itself)
from .params import ConbaParams, ConbaState, keyword_interface

__all__ = ["conba_step_op", "conba_step_compiled", "conba_decode_layer_op", "cpu_kernels_built"]


@torch.library.custom_op("mixcon::conba_step", mutates_args=("h", "line", "k", "e", "phase"))
def conba_step_op(
    h: Tensor, line: Tensor, k: Tensor, e: Tensor, phase: Tensor,
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
    alpha: Optional[Tensor], rho: Optional[Tensor], tau: int,
    k0: Optional[Tensor], eta: Optional[Tensor], lam: Optional[Tensor], w_r: Optional[Tensor],
    k_max: float, group_size: int, sigma_w: float, sigma_v: float, seed: int,
    mask: Optional[Tensor], t: int, control_period: int,
) -> Tensor:
    """One fused decode step (see `fused_recurrent.conba_step_fused_recurrent`): y (batch, d_inner); the
    state tensors h, line, k, e and (with control at P > 1) the phase are updated in place."""
    from .fused_recurrent import conba_step_fused_recurrent

    params = ConbaParams(A, D=D, delta_bias=delta_bias, delta_softplus=delta_softplus, rho=rho, tau=tau, k0=k0,
                         eta=eta, lam=lam, w_r=w_r, k_max=k_max, group_size=group_size, control_period=control_period,
                         sigma_w=sigma_w, sigma_v=sigma_v, seed=seed)
    return conba_step_fused_recurrent(ConbaState(h, line, k, e, phase), u, delta, B, C, params, z=z, alpha=alpha,
                                      mask=mask, t=t)


@conba_step_op.register_fake
def _(h, line, k, e, phase, u, delta, A, B, C, D, z, delta_bias, delta_softplus, alpha, rho, tau, k0, eta, lam,
      w_r, k_max, group_size, sigma_w, sigma_v, seed, mask, t, control_period):
    return torch.empty_like(u)


@keyword_interface("state", "u", "delta")
def conba_step_compiled(state: ConbaState, u, delta, B, C, params: ConbaParams, *, z=None, alpha=None, mask=None,
                        t=0):
    """`conba_step_fused_recurrent`'s interface, through the registered op (which has no backward: with a
    gradient required it raises, as the eager kernel does). A custom op takes tensors and scalars
    only, so ``params`` is unpacked into the op's arguments here."""
    p = params
    if _needs_grad(p, u, delta, B, C, z, alpha):
        raise ValueError("conba_step (triton): the fused decode step has no backward; run it under torch.no_grad() "
                         "or use backend='ref' (or 'auto', which takes the reference step when a gradient is needed)")
    return conba_step_op(*state, u, delta, p.A, B, C, p.D, z, p.delta_bias, bool(p.delta_softplus), alpha, p.rho,
                         int(p.tau), p.k0, p.eta, p.lam, p.w_r, float(p.k_max), int(p.group_size), float(p.sigma_w),
                         float(p.sigma_v), int(p.seed), mask, int(t), int(p.control_period))


# ---------------------------------------------------------------------------------------------------------
# The compiled CPU layer step (cpu.py `decode_layer`, mixcon/ops/cpu/csrc/layer_decode.cpp) as a custom op:
# a pybind call that torch.compile would otherwise not trace (a graph break). Registered, it is one opaque
# call in the decode graph on CPU, as the Triton step is on a GPU; the conv window and the state (h, delay
# line, k, e, phase) are written in place and declared so (``mutates_args``). The kernels must be built
# before tracing (`cpu.kernels()`, which a static-cache prefill on CPU does): the op itself never builds them.

def cpu_kernels_built() -> bool:
    """Whether the compiled CPU kernels are built (never builds them: safe to call under a trace)."""
    from .. import cpu

    return cpu.built()


@torch.library.custom_op("mixcon::conba_decode_layer", mutates_args=("conv_state", "h", "line", "k", "e", "phase"))
def conba_decode_layer_op(
    xz: Tensor, mask: Tensor, conv_state: Tensor, h: Tensor, line: Tensor, k: Tensor, e: Tensor, phase: Tensor,
    weights: list[Tensor], dt_rank: int, tau: int, group_size: int, control_period: int, control: bool,
    k_max: float, eps: float,
) -> Tensor:
    """A Conba layer's decode token, in_proj's output ``xz`` (b, 2·d_inner) → the gated y (b, d_inner):
    `cpu.decode_layer` (``mask``: (b,) int64, or empty for no padding; ``weights``: cpu.DECODE_WEIGHTS)."""
    from . import cpu

    return cpu.kernels().decode_layer(xz, mask, conv_state, h, line, k, e, phase, weights, dt_rank, tau,
                                      group_size, control_period, control, k_max, eps)


@conba_decode_layer_op.register_fake
def _(xz, mask, conv_state, h, line, k, e, phase, weights, dt_rank, tau, group_size, control_period, control,
      k_max, eps):
    return xz.new_empty(xz.shape[0], xz.shape[1] // 2)
