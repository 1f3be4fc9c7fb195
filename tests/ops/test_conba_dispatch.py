"""`ops.conba.dispatch`: the one decision `conba_scan` and `conba_step` take, and the path it names is
the path that runs (each implementation is wrapped to record its calls, then run for real)."""

import importlib.util

import pytest
import torch

from helpers import conba_inputs, random_state
from mixcon.ops import conba as api
from mixcon.ops.conba import conba_scan, conba_step, dispatch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture
def ran(monkeypatch):
    """The paths that ran, in order: every implementation the dispatcher can reach, recorded."""
    from mixcon.ops.conba import chunk_torch, cpu

    log = []

    def record(module, name, path):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: log.append(path) or real(*a, **k))

    record(chunk_torch, "conba_scan_chunk_torch", "chunk_torch")
    record(api, "conba_scan_ref", "ref")
    record(api, "conba_step_ref", "ref")
    record(cpu, "decode_step", "cpu")
    if HAS_TRITON:
        from mixcon.ops.conba import chunk, fused_recurrent

        record(chunk, "conba_scan_chunk", "chunk")
        record(fused_recurrent, "conba_scan_fused_recurrent", "fused_recurrent")
        record(fused_recurrent, "conba_step_fused_recurrent", "fused_recurrent")
    return log


def _tokens(x):
    per = ("u", "delta", "B", "C", "z", "alpha")
    return {k: (v[:, 0] if k in per else v) for k, v in x.items() if k != "mask"}


def test_the_table():
    assert dispatch("ref", CPU, 8) == "ref"
    assert dispatch("auto", CPU, 8) == "chunk_torch"  # not "ref": the CPU path runs for every period
    assert dispatch("auto", CPU, 1) == "chunk_torch"
    assert dispatch("chunk_torch", CPU, 8) == "chunk_torch"
    with pytest.raises(ValueError, match="is not one of"):
        dispatch("cuda", CPU)
    if HAS_TRITON:
        assert dispatch("triton", CPU, 8) == "chunk" and dispatch("triton", CPU, 1) == "fused_recurrent"
        assert dispatch("auto", CUDA, 8) == "chunk" and dispatch("auto", CUDA, 1) == "fused_recurrent"
        assert dispatch("auto", CUDA, 8, step=True) == "fused_recurrent"
        assert dispatch("auto", CUDA, 8, step=True, needs_grad=True) == "ref"  # the fused step has no backward
        assert dispatch("triton", CUDA, 8, step=True, needs_grad=True) == "fused_recurrent"  # which raises
    else:
        assert dispatch("auto", CUDA, 8) == "ref"


def test_a_trace_takes_the_loop_on_cpu(monkeypatch):
    monkeypatch.setattr(api, "_tracing", lambda: True)
    assert dispatch("auto", CPU, 8) == "ref"  # chunk_torch's data-dependent blocks cannot be traced
    assert dispatch("chunk_torch", CPU, 8) == "chunk_torch"  # asked for by name: it runs (eagerly)


@pytest.mark.parametrize("backend", ["auto", "ref", "chunk_torch"] + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("P", [1, 4])
def test_a_scan_runs_what_dispatch_says(ran, backend, P):
    x = conba_inputs(b=2, T=9, d=16, n=4, mechanisms="all", seed=1)
    x["control_period"] = P
    with torch.no_grad():
        conba_scan(**x, backend=backend)
    assert ran == [dispatch(backend, CPU, P)]


@pytest.mark.parametrize("case", ["plain", "noisy", "grad", "float64 state"])
def test_a_decode_step_runs_what_dispatch_says(ran, case):
    from mixcon.ops.cpu import built

    x = conba_inputs(b=2, T=3, d=16, n=4, mechanisms=("scaling", "delay", "control"), seed=2)
    x["control_period"] = 4
    if case == "noisy":
        x.update(sigma_w=0.1, sigma_v=0.1, seed=3)
    state = random_state(x, P=4, seed=1)
    if case == "float64 state":
        state = type(state)(*(s.double() if s.is_floating_point() else s for s in state))
    tok = _tokens(x)
    if case == "grad":
        tok["u"] = tok["u"].clone().requires_grad_()
    params = api.ConbaParams(**{k: v for k, v in tok.items() if k in api.params.FIELDS})
    want = dispatch("auto", CPU, 4, step=True, state=state, params=params, dtype=tok["u"].dtype,
                    needs_grad=case == "grad")
    conba_step(state, **tok, backend="auto")
    assert ran == [want]
    if case == "plain":
        assert want == ("cpu" if built() else "ref")
    else:
        assert want == "ref"
