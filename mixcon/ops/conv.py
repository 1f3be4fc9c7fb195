"""Causal depthwise conv1d (+ optional SiLU) over time-major inputs, with a rolling state.

`causal_conv1d` runs a sequence: x (batch, time, channels), weight (channels, width), bias
(channels,), optional initial_state (batch, channels, width − 1) holding the previous inputs.
`causal_conv1d_step` runs one token and updates the state in place. The `causal_conv1d`
package's CUDA kernel is used when it is importable and the input is on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu

try:  # optional fast path; its import fails without the compiled extension
    from causal_conv1d import causal_conv1d_fn as _cc1d_fn  # type: ignore
except Exception:  # pragma: no cover - depends on the machine
    _cc1d_fn = None


def _compiled_applies(x, weight, bias, initial_state) -> bool:
    """The compiled CPU conv (mixcon/ops/cpu, ``conv_prefill``) for a sequence: see `cpu.applies`."""
    return cpu.applies(x, weight, bias, initial_state)


def causal_conv1d(x, weight, bias=None, initial_state=None, activation=None, return_final_state=False):
    """y[b, t, c] = act(bias[c] + Σ_j weight[c, j] · x[b, t − (W − 1) + j, c]), x < 0 from the state."""
    if activation not in (None, "silu"):
        raise ValueError(f"activation={activation!r} must be None or 'silu'")
    b, T, ch = x.shape
    width = weight.shape[-1]
    if weight.shape != (ch, width):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected (channels={ch}, width)")
    if _compiled_applies(x, weight, bias, initial_state):
        e = cpu.empty(x.dtype)
        y, final = cpu.kernels().conv_prefill(
            x.contiguous(), weight.contiguous(), e if bias is None else bias.contiguous(),
            e if initial_state is None else initial_state.contiguous(), activation == "silu")
        return (y, final) if return_final_state else y
    xt = x.transpose(1, 2)  # (b, ch, T)
    if initial_state is None:
        initial_state = xt.new_zeros(b, ch, width - 1)
        use_fast = _cc1d_fn is not None and x.is_cuda and not return_final_state
    else:
        use_fast = False
    if use_fast:
        y = _cc1d_fn(xt, weight, bias, activation=activation)  # (b, ch, T)
        return y.transpose(1, 2)
    xp = torch.cat([initial_state.to(xt.dtype), xt], dim=-1)  # (b, ch, W − 1 + T)
    y = F.conv1d(xp, weight.unsqueeze(1), bias, groups=ch)  # (b, ch, T)
    if activation == "silu":
        y = F.silu(y)
    y = y.transpose(1, 2)
    if return_final_state:
        return y, xp[..., xp.shape[-1] - (width - 1):].contiguous()
    return y


def causal_conv1d_step(conv_state, x, weight, bias=None, activation=None):
    """One token: x (batch, channels); conv_state (batch, channels, W − 1) is shifted in place."""
    window = torch.cat([conv_state, x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)  # (b, ch, W)
    y = (window * weight.to(window.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(y.dtype)
    conv_state.copy_(window[..., 1:])
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)
