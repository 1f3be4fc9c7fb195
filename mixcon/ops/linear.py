"""F.linear for a decode token on CPU: a few rows against a weight streamed from memory.

At decode time every projection is a matrix–vector product whose cost is reading the weight. ATen's
CPU GEMV for one row streams it at ~8 GB/s on the 2-core machine here, on one thread whatever the
thread count; the compiled kernel (csrc/conba_cpu.cpp, ``linear_rows``: four output rows at a time,
split over torch's threads) reads it at ~10.5 GB/s on one thread and ~16.6 GB/s on two (a 1024×256
weight, 64 of them cycled so none stays in cache). Used for at most ``MAX_ROWS`` rows, on CPU, in
float32/float64, when no gradient is wanted and not under a trace; F.linear everywhere else, and
where the kernels cannot be built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .conba import cpu

MAX_ROWS = 4
_FLOATS = (torch.float32, torch.float64)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if (x.device.type == "cpu" and x.dtype in _FLOATS and weight.dtype == x.dtype and x.numel() <= MAX_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and not _tracing() and x.numel() > 0):
        mod = cpu.kernels()
        if mod is not None and weight.is_contiguous() and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous())):
            y = mod.linear_rows(x.reshape(-1, x.shape[-1]).contiguous(), weight, cpu.empty(x.dtype) if bias is None else bias)
            return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
