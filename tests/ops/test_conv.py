"""The causal depthwise conv (mixcon/ops/conv.py): the compiled CPU prefill against ATen's route and
against a direct loop, the rolling state, and the step."""

import pytest
import torch

from mixcon.ops import conv
from mixcon.ops import cpu


def _loop(x, w, bias, state, silu):
    b, T, ch = x.shape
    K = w.shape[1]
    xp = torch.cat([state if state is not None else x.new_zeros(b, ch, K - 1), x.transpose(1, 2)], -1)
    y = torch.stack([(xp[..., t:t + K] * w).sum(-1) + (bias if bias is not None else 0) for t in range(T)], 1)
    return (torch.nn.functional.silu(y) if silu else y), xp[..., T:]


@pytest.mark.skipif(cpu.kernels() is None, reason="the CPU kernels could not be built (no compiler)")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 2, 3, 17, 70])
@pytest.mark.parametrize("with_state, with_bias, silu", [(True, True, True), (False, True, True), (True, False, False)])
def test_compiled_prefill_equals_aten_and_loop(dtype, T, with_state, with_bias, silu, monkeypatch):
    g = torch.Generator().manual_seed(T)
    b, ch, K = 2, 19, 4
    x = torch.randn(b, T, ch, generator=g, dtype=dtype)
    w = torch.randn(ch, K, generator=g, dtype=dtype)
    bias = torch.randn(ch, generator=g, dtype=dtype) if with_bias else None
    state = torch.randn(b, ch, K - 1, generator=g, dtype=dtype) if with_state else None
    act = "silu" if silu else None
    calls = []
    real = conv._compiled_applies
    monkeypatch.setattr(conv, "_compiled_applies", lambda *a: calls.append(real(*a)) or calls[-1])
    y, fin = conv.causal_conv1d(x, w, bias, state, act, return_final_state=True)
    assert calls == [True]
    monkeypatch.setattr(conv, "_compiled_applies", lambda *a: False)
    y_aten, fin_aten = conv.causal_conv1d(x, w, bias, state, act, return_final_state=True)
    y_loop, fin_loop = _loop(x, w, bias, state, silu)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, r in ((y, y_aten), (y, y_loop), (fin, fin_aten), (fin, fin_loop)):
        assert a.shape == r.shape and (a - r).abs().max() < tol
    # the final state continues the sequence: two halves == the whole
    if T > 2:
        h = T // 2
        y1, s1 = conv.causal_conv1d(x[:, :h], w, bias, state, act, return_final_state=True)
        y2 = conv.causal_conv1d(x[:, h:], w, bias, s1, act)
        assert (torch.cat([y1, y2], 1) - y_loop).abs().max() < tol


def test_gradient_takes_aten(monkeypatch):
    x = torch.randn(1, 8, 4, requires_grad=True)
    w = torch.randn(4, 3)
    assert not conv._compiled_applies(x, w, None, None)
    with torch.no_grad():
        assert conv._compiled_applies(x, w, None, None) == (cpu.kernels() is not None)
    assert not conv._compiled_applies(x.detach().bfloat16(), w.bfloat16(), None, None)
