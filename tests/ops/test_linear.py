"""The few-row CPU linear (mixcon/ops/linear.py, mixcon/ops/cpu ``linear_rows``) against F.linear, and where it
must not run."""

import pytest
import torch
import torch.nn.functional as F

from mixcon.layers.linear import Linear
from mixcon.ops import linear as lin
from mixcon.ops import cpu

pytestmark = pytest.mark.skipif(cpu.kernels() is None, reason="the CPU kernels could not be built (no compiler)")


@pytest.fixture
def calls(monkeypatch):
    seen = []
    mod = cpu.kernels()

    class Spy:
        def __getattr__(self, name):
            f = getattr(mod, name)
            return (lambda *a: seen.append(name) or f(*a)) if name == "linear_rows" else f

    monkeypatch.setattr(cpu, "_module", Spy())
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 37), (2, 1, 64), (4, 64), (3, 1, 1, 8)], ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out", [1, 5, 130])
def test_equals_f_linear(dtype, shape, bias, out, calls):
    g = torch.Generator().manual_seed(out + shape[-1])
    x = torch.randn(*shape, generator=g, dtype=dtype)
    w = torch.randn(out, shape[-1], generator=g, dtype=dtype)
    b = torch.randn(out, generator=g, dtype=dtype) if bias else None
    y = lin.linear(x, w, b)
    ref = F.linear(x, w, b)
    assert calls == ["linear_rows"]
    assert y.shape == ref.shape and y.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (y - ref).abs().max() <= tol * (1 + ref.abs().max())


def test_falls_back(calls):
    w = torch.randn(8, 16)
    lin.linear(torch.randn(5, 16), w)  # more rows than MAX_ROWS
    lin.linear(torch.randn(1, 16, dtype=torch.bfloat16), w.bfloat16())  # not float32/64
    lin.linear(torch.randn(1, 16, requires_grad=True), w)  # a gradient wanted
    lin.linear(torch.randn(1, 16), w.t().contiguous().t())  # a weight that is not contiguous
    assert calls == []
    with torch.no_grad():
        lin.linear(torch.randn(1, 16, requires_grad=True), w)
    assert calls == ["linear_rows"]


def test_module_is_an_nn_linear_with_gradients():
    torch.manual_seed(0)
    m = Linear(16, 8)
    ref = torch.nn.Linear(16, 8)
    ref.load_state_dict(m.state_dict())
    assert isinstance(m, torch.nn.Linear) and set(m.state_dict()) == {"weight", "bias"}
    x = torch.randn(1, 16)
    m(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert torch.allclose(m.weight.grad, ref.weight.grad) and torch.allclose(m.bias.grad, ref.bias.grad)
