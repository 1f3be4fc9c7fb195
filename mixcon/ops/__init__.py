"""Pure tensor functions: no nn.Module, no config (imports flow models → layers → ops)."""

import torch


def tracing() -> bool:
    """Whether torch.compile, torch.export or FX symbolic tracing is tracing. The compiled CPU kernels
    (pybind calls), the data-dependent CPU paths and the models' data-dependent input checks then step
    aside for plain PyTorch (each would read a value back to the host: a graph break or an export
    failure)."""
    compiler = getattr(torch, "compiler", None)
    if any(getattr(compiler, f, lambda: False)() for f in ("is_compiling", "is_exporting")):
        return True
    try:
        from torch.fx._symbolic_trace import is_fx_symbolic_tracing
    except ImportError:  # pragma: no cover - older torch
        return False
    return is_fx_symbolic_tracing()


def acc_dtype(x) -> torch.dtype:
    """The accumulation dtype of every scan, reduction and routing softmax for a tensor (or a dtype)
    ``x``: float64 for float64 inputs (the exact oracles of the tests), float32 otherwise
    (docs/conba.md, step 6)."""
    return torch.float64 if (x if isinstance(x, torch.dtype) else x.dtype) == torch.float64 else torch.float32


def to_acc(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its accumulation dtype (`acc_dtype`); ``x`` itself where it already is."""
    return x.to(acc_dtype(x))
