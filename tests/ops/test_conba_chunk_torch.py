"""The per-period CPU scan (mixcon/ops/conba/chunk_torch.py) against the loop in naive.py, the
float64 oracle: outputs, final state (phase exact) and every gradient, on random inputs."""

import pytest
import torch

from helpers import conba_inputs, rel_rms, scan_with_grads
from mixcon.ops.conba import ConbaState, chunk_torch, conba_scan, conba_scan_ref
from mixcon.ops.conba.chunk_torch import conba_scan_chunk_torch

MECHANISMS = [(), ("scaling",), ("delay",), ("control",), ("noise",), "all"]
T_FOR = {1: 13, 4: 23, 64: 150}  # T not a multiple of P; at P = 64 two sampling instants
SEQ = ("u", "delta", "B", "C", "z", "alpha")
ids = lambda m: "+".join(m) if isinstance(m, tuple) else str(m)  # noqa: E731


def _inputs(P, mech, tau=2, b=3, d=24, n=5, T=None, dtype=torch.float64, seed=0):
    """Odd sizes (3 control groups, N = 5); the gain law kept inside its clamp (η scaled down,
    k_max raised) so that η, λ and k0 all carry a gradient."""
    x = conba_inputs(b=b, T=T or T_FOR[P], d=d, n=n, mechanisms=mech, dtype=dtype, seed=seed)
    for k, v in x.items():
        if torch.is_tensor(v) and k not in SEQ:
            x[k] = v.to(dtype if dtype == torch.float64 else torch.float32)
    if "rho" in x:
        x["tau"] = tau
    if "eta" in x:
        x["eta"] = x["eta"] * 0.3
        x["k_max"] = 3.0
    return x


def _state(x, phases, seed=1):
    b, _, d = x["u"].shape
    n, ng, tau = x["A"].shape[1], d // x["group_size"], x.get("tau", 0)
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return ConbaState(r(b, d, n), r(b, tau, d, n), torch.rand(b, ng, generator=g, dtype=torch.float64),
                      r(b, d), torch.tensor(phases, dtype=torch.long))


def _mask(b, T):
    """Left padding of different lengths, a hole, and a row with no real step at all."""
    m = torch.ones(b, T)
    m[1, :5] = 0
    m[0, 7:9] = 0
    if b > 3:
        m[3] = 0
    return m


def _assert_same(a, b, y_tol=1e-12):
    (y1, s1), (y2, s2) = a, b
    assert rel_rms(y2, y1) < y_tol
    for field, u, v in zip(ConbaState._fields, s2, s1):
        assert u.shape == v.shape, field
        if field == "phase":
            assert u.dtype == torch.long and torch.equal(u, v), (u, v)
        elif u.numel():
            assert rel_rms(u, v) < y_tol or (u - v).abs().max() < 1e-14, field


def _cases():
    for mech in MECHANISMS:
        for P in (1, 4, 64):
            for tau in ((0, 1, 3, 4) if mech in (("delay",), "all") else (0,)):
                yield mech, P, tau


@pytest.mark.parametrize("mech, P, tau", list(_cases()),
                         ids=lambda v: ids(v) if isinstance(v, (tuple, str)) else str(v))
def test_matches_the_loop(mech, P, tau):
    x = _inputs(P, mech, tau)
    ref = conba_scan_ref(**x, return_final_state=True, control_period=P)
    out = conba_scan_chunk_torch(**x, return_final_state=True, control_period=P)
    _assert_same(ref, out)
    if "control" in mech or mech == "all":
        assert torch.equal(out[1].phase, torch.full((3,), T_FOR[P] % P))


@pytest.mark.parametrize("P", [4, 64])
@pytest.mark.parametrize("phases", ["zero", "uniform", "per-row"])
@pytest.mark.parametrize("mech", [("control",), "all", ("scaling", "delay")], ids=ids)
def test_masks_and_initial_state(mech, phases, P):
    """Left padding, holes and an empty row; an initial state whose phase is non-zero, the same
    for every row or different per row (then the blocks hold instants mid-block)."""
    x = _inputs(P, mech, tau=3, b=4)
    mask = _mask(4, x["u"].shape[1])
    ph = {"zero": [0, 0, 0, 0], "uniform": [P - 2] * 4, "per-row": [0, 1, P - 1, 2]}[phases]
    state = _state(x, ph)
    ref = conba_scan_ref(**x, mask=mask, initial_state=state, return_final_state=True, control_period=P)
    out = conba_scan_chunk_torch(**x, mask=mask, initial_state=state, return_final_state=True, control_period=P)
    _assert_same(ref, out)
    assert torch.all(out[0][mask == 0] == 0)
    assert torch.equal(out[1].h[3], state.h[3]) and torch.equal(out[1].phase[3], state.phase[3])  # no real step


@pytest.mark.parametrize("P", [4, 64])
def test_split_mid_period_equals_one_scan(P):
    """A left-padded batch scanned in two parts, cut in the middle of a period (the second part
    starts from per-row phases), equals one scan, and the loop."""
    x = _inputs(P, "all", tau=2, b=4)
    T = x["u"].shape[1]
    mask = _mask(4, T)
    cut = {4: 10, 64: 97}[P]
    one = conba_scan_chunk_torch(**x, mask=mask, return_final_state=True, control_period=P)
    first = {k: (v[:, :cut] if k in SEQ else v) for k, v in x.items()}
    second = {k: (v[:, cut:] if k in SEQ else v) for k, v in x.items()}
    y1, s1 = conba_scan_chunk_torch(**first, mask=mask[:, :cut], return_final_state=True, control_period=P)
    assert len(set(s1.phase.tolist())) > 1  # the rows are at different points of their periods
    # the noise is keyed by position in the call: compare without it across calls
    y2, s2 = conba_scan_chunk_torch(**second, mask=mask[:, cut:], initial_state=s1, return_final_state=True,
                                    control_period=P)
    x_quiet = {**x, "sigma_w": 0.0, "sigma_v": 0.0}
    first_q = {k: (v[:, :cut] if k in SEQ else v) for k, v in x_quiet.items()}
    second_q = {k: (v[:, cut:] if k in SEQ else v) for k, v in x_quiet.items()}
    one_q = conba_scan_chunk_torch(**x_quiet, mask=mask, return_final_state=True, control_period=P)
    y1q, s1q = conba_scan_chunk_torch(**first_q, mask=mask[:, :cut], return_final_state=True, control_period=P)
    y2q, s2q = conba_scan_chunk_torch(**second_q, mask=mask[:, cut:], initial_state=s1q, return_final_state=True,
                                      control_period=P)
    _assert_same(one_q, (torch.cat([y1q, y2q], 1), s2q))
    # with noise, each part against the loop from the same state
    _assert_same(conba_scan_ref(**second, mask=mask[:, cut:], initial_state=s1, return_final_state=True,
                                control_period=P), (y2, s2))
    _assert_same(conba_scan_ref(**x, mask=mask, return_final_state=True, control_period=P), one)


def _grad_cases():
    """Every mechanism alone at two settings; the controller's (and all together) at six, since
    the period, the phases and τ ≤ P or τ > P only change its path."""
    for mech in MECHANISMS:
        periodic = mech in (("control",), "all")
        for case in [(4, 2, "uniform"), (64, 2, "uniform"), (4, 3, "per-row"), (64, 1, "per-row"),
                     (1, 3, "uniform"), (4, 4, "per-row")]:
            if periodic or case in ((64, 2, "uniform"), (4, 3, "per-row")):
                yield (mech, *case)


@pytest.mark.parametrize("mech, P, tau, phases", list(_grad_cases()),
                         ids=lambda v: ids(v) if isinstance(v, (tuple, str)) else str(v))
def test_every_gradient_matches_the_loop(mech, P, tau, phases):
    """Inputs, parameters and the initial state (h, delay line, k, e), through masks."""
    x = _inputs(P, mech, tau=tau, b=4, T=T_FOR[P] + 3)
    ph = [P - 2] * 4 if phases == "uniform" else [0, 1, P - 1, 2]
    state = _state(x, [p % P for p in ph])
    mask = _mask(4, x["u"].shape[1])
    g_ref = scan_with_grads(conba_scan_ref, x, state, mask, P)[2]
    g_out = scan_with_grads(conba_scan_chunk_torch, x, state, mask, P)[2]
    assert g_ref.keys() == g_out.keys()
    for k in g_ref:
        a, b = g_out[k], g_ref[k]
        if b is None or not b.abs().sum():
            assert a is None or not a.abs().sum(), k
            continue
        assert a is not None and rel_rms(a, b) < 1e-10, (k, rel_rms(a, b))
    if mech in (("control",), "all"):
        for k in ("eta", "lam", "w_r", "state.k", "state.e"):  # (k0 is unused: k comes from the state)
            assert g_ref[k].abs().sum() > 0, k  # the gain law is live in this test


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_low_precision_inputs_accumulate_in_float32(dtype, tol):
    x = _inputs(64, "all", dtype=dtype)
    x64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in x.items()}
    y = conba_scan_chunk_torch(**x, control_period=64)
    assert y.dtype == dtype
    assert rel_rms(y, conba_scan_ref(**x64, control_period=64)) < tol
    assert rel_rms(y, conba_scan_ref(**x, control_period=64)) < tol


def test_large_steps_stay_finite():
    """Δ ~ 30 after softplus: exp(Δ·A) underflows, nothing overflows (no cumulative exp)."""
    x = _inputs(4, "all", dtype=torch.float32)
    x["delta"] = x["delta"] * 5 + 30.0
    for k in ("u", "delta", "B"):
        x[k].requires_grad_(True)
    y = conba_scan_chunk_torch(**x, control_period=4)
    y_ref = conba_scan_ref(**{k: (v.detach() if torch.is_tensor(v) else v) for k, v in x.items()}, control_period=4)
    assert torch.isfinite(y).all() and rel_rms(y, y_ref) < 1e-5
    y.square().sum().backward()
    assert all(torch.isfinite(x[k].grad).all() for k in ("u", "delta", "B"))


def test_dispatch(monkeypatch):
    calls = []
    real = chunk_torch.conba_scan_chunk_torch
    monkeypatch.setattr(chunk_torch, "conba_scan_chunk_torch", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _inputs(4, ("control",), dtype=torch.float32)
    y = conba_scan(**x, control_period=4)  # auto on CPU, control on, P > 1
    assert calls == [1] and rel_rms(y, conba_scan_ref(**x, control_period=4)) < 1e-6
    conba_scan(**x, control_period=1)  # the per-step controller too (blocks of one step)
    assert calls == [1, 1]
    conba_scan(**x, control_period=1, backend="chunk_torch")
    conba_scan(**_inputs(4, ("scaling",), dtype=torch.float32))  # control off: one linear recurrence
    assert calls == [1, 1, 1, 1]
    conba_scan(**x, control_period=4, backend="ref")  # the loop, the oracle
    assert calls == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="backend"):
        conba_scan(**x, control_period=4, backend="chunk")
