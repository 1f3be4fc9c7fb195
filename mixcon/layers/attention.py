"""Grouped-query softmax attention, optional RoPE, with a KV cache.

Two implementations, chosen by ``config._attn_implementation`` (transformers' switch): "sdpa" (the
default: `attend`, PyTorch's fused kernels, no weights) and "eager" (`eager_attend`: the softmax
written out, which returns the attention weights; also used whenever ``output_attentions`` asks for
them, since SDPA cannot return them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from .linear import Linear


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (batch, 1, time, head_dim) for positions (batch, time).

    Computed on the fly rather than stored as a buffer: a non-persistent buffer comes back as
    garbage when transformers loads on the meta device, and this costs a few µs."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (b, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


def attend(q, k, v, attn_mask=None, dropout_p: float = 0.0):
    """SDPA over grouped-query heads: q (b, H, T, hd), k/v (b, KV, S, hd), S ≥ T the last T keys
    being the queries' own. attn_mask: bool (b, 1, T, S), or None for plain causal attention.

    Nothing of size T × S is built without a mask, and the KV heads are never copied: a decode
    step or a prefill from an empty cache runs flash attention with ``enable_gqa``; a chunk after
    a cache uses the lower-right causal bias (query i sees keys ≤ S − T + i), and it and an
    explicit mask (padding) run once per query head of a KV group (the KV heads as they are)."""
    T, S = q.shape[-2], k.shape[-2]
    rep = q.shape[1] // k.shape[1]
    if attn_mask is None and (T == 1 or T == S):
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout_p, enable_gqa=rep > 1)
    if attn_mask is None:
        attn_mask = causal_lower_right(T, S)
    if rep == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    b, H, _, hd = q.shape
    qg = q.view(b, H // rep, rep, T, hd)  # query head h reads KV head h // rep
    out = torch.stack([F.scaled_dot_product_attention(qg[:, :, r], k, v, attn_mask=attn_mask, dropout_p=dropout_p)
                       for r in range(rep)], dim=2)
    return out.view(b, H, T, hd)


def eager_attend(q, k, v, attn_mask=None, dropout_p: float = 0.0):
    """The same attention as `attend`, written out: → (out (b, H, T, hd), weights (b, H, T, S))."""
    T, S = q.shape[-2], k.shape[-2]
    rep = q.shape[1] // k.shape[1]
    if rep > 1:  # query head h reads KV head h // rep, as in `attend`
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if attn_mask is None:
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~attn_mask, float("-inf"))
    acc = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    weights = torch.softmax(scores, dim=-1, dtype=acc).to(q.dtype)
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(weights, v), weights


def attention_impl(config, output_attentions: bool = False) -> str:
    """"eager" when the config asks for it or the caller wants the weights, else "sdpa"."""
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    return "eager" if output_attentions or impl == "eager" else "sdpa"


class MixConAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        h = config.hidden_size
        self.q_proj = Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(self, x, attn_mask=None, rope=None, past_key_values=None, impl: str = "sdpa",
                return_weights: bool = False):
        """x (b, T, hidden); attn_mask: bool (b, 1, T, past + T) or None (causal, see `attend`);
        rope: (cos, sin) or None; past_key_values: the model's cache or None; impl: "sdpa" or "eager".
        → out (b, T, hidden), or with ``return_weights`` (out, weights (b, H, T, past + T) with
        impl="eager", else None)."""
        b, T, _ = x.shape
        q = self.q_proj(x).view(b, T, self.num_heads, self.head_dim).transpose(1, 2)  # (b, H, T, hd)
        k = self.k_proj(x).view(b, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (b, KV, T, hd)
        v = self.v_proj(x).view(b, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # (b, KV, past + T, hd)
        p = self.dropout if self.training else 0.0
        weights = None
        if impl == "eager":
            out, weights = eager_attend(q, k, v, attn_mask, p)
        else:
            out = attend(q, k, v, attn_mask, p)  # (b, H, T, hd)
        out = self.o_proj(out.transpose(1, 2).reshape(b, T, self.num_heads * self.head_dim))
        return (out, weights) if return_weights else out
