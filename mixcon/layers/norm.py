import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled in the input dtype (as Llama, Mixtral and Jamba do)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm: x · rsqrt(mean(x²) + ε) in one call, the same values as the four-op form and faster
        # per decode token (docs/kernels.md, "Compiled on CPU")
        dtype = x.dtype
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.variance_epsilon)
        return self.weight * x.to(dtype)
