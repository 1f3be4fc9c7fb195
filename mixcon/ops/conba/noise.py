"""Counter-based Gaussian noise for Conba (docs/conba.md, step 6, "Noise").

The noise ξ_t[c, n] (process) and ζ_t[c] (observation) must be regenerable by a
backward pass without storing it, so it is a pure function of the key
(seed, batch, time, channel, state-index): a 32-bit integer hash (Wang/"lowbias32"
mixing) turned into two uniforms and then a normal by Box-Muller. The Triton kernels
implement the same arithmetic on uint32, and the compiled CPU kernels (mixcon/ops/cpu/csrc/noise.h) the
same bit for bit (with the log, sqrt and cos torch itself calls); this file is the definition.

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


def normal_from_key_ref(key: torch.Tensor, lane: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 for each (key, lane); shapes broadcast. The definition."""
    h1 = mix32(lane ^ key)
    h2 = mix32(h1 ^ SECOND_DRAW_SALT)
    u1 = ((h1 >> 8).to(torch.float32) + 0.5) * (2.0**-24)  # in (0, 1): log is finite
    u2 = (h2 >> 8).to(torch.float32) * (2.0**-24)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def _as_i32(x: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 → the same 32 bits as int32 (two's complement)."""
    return (x - ((x >> 31) << 32)).to(torch.int32)


def _mix32_i32_(x: torch.Tensor) -> torch.Tensor:
    """`mix32` in place on int32 tensors holding uint32 bits: int32 products wrap to the same low 32
    bits, and the shifts are made logical by masking off the copied sign bits."""
    x.bitwise_xor_(torch.bitwise_and(x >> 16, 0xFFFF))
    x.mul_(0x7FEB352D)
    x.bitwise_xor_(torch.bitwise_and(x >> 15, 0x1FFFF))
    x.mul_(0x846CA68B - (1 << 32))
    x.bitwise_xor_(torch.bitwise_and(x >> 16, 0xFFFF))
    return x


def normal_from_key(key: torch.Tensor, lane: torch.Tensor) -> torch.Tensor:
    """`normal_from_key_ref`, bit for bit, on 32-bit integers in place: the hash of a whole block of
    process noise (time × batch × state × channels) is the dear part of a noisy scan on CPU, and
    int64 tensors with a mask after every product cost ~17× more there."""
    h1 = _mix32_i32_(torch.bitwise_xor(_as_i32(lane), _as_i32(key)))
    h2 = _mix32_i32_(torch.bitwise_xor(h1, SECOND_DRAW_SALT))  # the salt is < 2**31: the same bits in int32
    u1 = torch.bitwise_and(h1 >> 8, 0xFFFFFF).to(torch.float32).add_(0.5).mul_(2.0**-24)  # in (0, 1)
    u2 = torch.bitwise_and(h2 >> 8, 0xFFFFFF).to(torch.float32).mul_(2.0 * math.pi * 2.0**-24)
    return u1.log_().mul_(-2.0).sqrt_().mul_(u2.cos_())


def conba_noise(seed: int, batch: int, t: int, d_inner: int, d_state: int, device=None):
    """(ξ_t of shape (batch, d_inner, N), ζ_t of shape (batch, d_inner)) for one time step."""
    b = torch.arange(batch, dtype=torch.int64, device=device)
    key = step_key(seed, b, t)[:, None, None]  # (batch, 1, 1)
    c = torch.arange(d_inner, dtype=torch.int64, device=device)[:, None]
    n = torch.arange(d_state + 1, dtype=torch.int64, device=device)[None, :]
    lane = c * (d_state + 1) + n  # (d_inner, N + 1)
    z = normal_from_key(key, lane[None])  # (batch, d_inner, N + 1)
    return z[..., :d_state], z[..., d_state]
