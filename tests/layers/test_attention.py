"""`attend`: grouped-query SDPA without T × S masks or KV-head copies, against the plain formula."""

import pytest
import torch

from mixcon.layers.attention import attend
from mixcon.models.masks import build_attention_mask


def _reference(q, k, v, allowed):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v


@pytest.mark.parametrize("T,S,heads,kv", [(1, 9, 6, 2), (7, 7, 6, 3), (5, 12, 4, 2), (5, 12, 4, 4)])
@pytest.mark.parametrize("padded", [False, True])
def test_attend_matches_repeated_heads_and_dense_mask(T, S, heads, kv, padded):
    b, hd = 2, 8
    q, k, v = torch.randn(b, heads, T, hd), torch.randn(b, kv, S, hd), torch.randn(b, kv, S, hd)
    keep = torch.ones(b, S, dtype=torch.long)
    keep[1, :2] = 0  # a left-padded row
    mask = build_attention_mask(keep if padded else None, T, S - T, "cpu")
    allowed = build_attention_mask(keep if padded else torch.ones_like(keep), T, S - T, "cpu")
    assert (mask is None) != padded
    out = attend(q, k, v, mask)
    assert out.shape == q.shape
    torch.testing.assert_close(out, _reference(q, k, v, allowed), rtol=1e-5, atol=1e-5)
