"""F.linear for a decode token on CPU: a few rows against a weight streamed from memory.

At decode time every projection is a matrix–vector product whose cost is reading the weight. The
compiled kernel (mixcon/ops/cpu/csrc/dense.cpp, ``linear_rows``: four output rows at a time, split over
torch's threads) reads it faster than ATen's one-row GEMV, which runs on one thread whatever the thread
count (measured: docs/kernels.md, "Compiled on CPU"). Used for at most ``MAX_ROWS`` rows, on CPU, in
float32/float64, when no gradient is wanted and not under a trace; F.linear everywhere else, and where the
kernels cannot be built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu

MAX_ROWS = 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if (0 < x.numel() <= MAX_ROWS * x.shape[-1] and cpu.applies(x, weight, bias) and weight.is_contiguous()
            and (bias is None or bias.is_contiguous())):
        y = cpu.kernels().linear_rows(x.reshape(-1, x.shape[-1]).contiguous(), weight,
                                      cpu.empty(x.dtype) if bias is None else bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
