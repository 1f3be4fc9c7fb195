"""Counter-based Gaussian noise for Conba (docs/conba.md, step 6, "Noise").

The noise ξ_t[c, n] (process) and ζ_t[c] (observation) must be regenerable by a
backward pass without storing it, so it is a pure function of the key
(seed, batch, time, channel, state-index): a 32-bit integer hash (Wang/"lowbias32"
mixing) turned into two uniforms and then a normal by Box-Muller. The Triton kernels
implement the same arithmetic on uint32; this file is the definition.

Index layout inside one (seed, b, t): ``lane = c * (N + 1) + n`` with n in [0, N) for
ξ and n == N for ζ, so the two streams never share a key.
"""

from __future__ import annotations

import math

import torch

M32 = 0xFFFFFFFF
SEED_SALT = 0x9E3779B9
SECOND_DRAW_SALT = 0x68E31DA4


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (products wrap; low 32 bits kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    x = x ^ (x >> 16)
    return x


def step_key(seed: int, batch_idx: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """Key of one (seed, b, t), int64 holding uint32; ``batch_idx`` int64 of any shape."""
    s = mix32(torch.tensor((int(seed) ^ SEED_SALT) & M32, dtype=torch.int64, device=batch_idx.device))
    kb = mix32(s ^ (batch_idx & M32))
    t = torch.as_tensor(t, dtype=torch.int64, device=batch_idx.device)
    return mix32(kb ^ (t & M32))


def normal_from_key(key: torch.Tensor, lane: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 for each (key, lane); shapes broadcast."""
    h1 = mix32(lane ^ key)
    h2 = mix32(h1 ^ SECOND_DRAW_SALT)
    u1 = ((h1 >> 8).to(torch.float32) + 0.5) * (2.0**-24)  # in (0, 1): log is finite
    u2 = (h2 >> 8).to(torch.float32) * (2.0**-24)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def conba_noise(seed: int, batch: int, t: int, d_inner: int, d_state: int, device=None):
    """(ξ_t of shape (batch, d_inner, N), ζ_t of shape (batch, d_inner)) for one time step."""
    b = torch.arange(batch, dtype=torch.int64, device=device)
    key = step_key(seed, b, t)[:, None, None]  # (batch, 1, 1)
    c = torch.arange(d_inner, dtype=torch.int64, device=device)[:, None]
    n = torch.arange(d_state + 1, dtype=torch.int64, device=device)[None, :]
    lane = c * (d_state + 1) + n  # (d_inner, N + 1)
    z = normal_from_key(key, lane[None])  # (batch, d_inner, N + 1)
    return z[..., :d_state], z[..., d_state]
