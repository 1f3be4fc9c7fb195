"""Pure tensor functions: no nn.Module, no config (imports flow models → layers → ops)."""

import torch


def tracing() -> bool:
    """Whether torch.compile or torch.export is tracing: the compiled CPU kernels (pybind calls) and
    the data-dependent CPU paths then step aside for plain PyTorch."""
    compiler = getattr(torch, "compiler", None)
    return any(getattr(compiler, f, lambda: False)() for f in ("is_compiling", "is_exporting"))
