"""The op interface (mixcon/ops/conba/params.py): `ConbaParams` and the flat keyword interface kept by
`keyword_interface` give the same results, bit for bit, on every CPU path (the loop, chunk_torch, the
compiled CPU decode step), and the same messages for bad parameters; the dataclass is frozen."""

import dataclasses

import pytest
import torch

from helpers import conba_inputs, rel_rms
from mixcon.ops.conba import ConbaParams, ConbaState, conba_scan, conba_scan_ref, conba_step, conba_step_ref, cpu
from mixcon.ops.conba import empty_state
from mixcon.ops.conba.chunk_torch import conba_scan_chunk_torch
from mixcon.ops.conba.params import FIELDS

P = 4
SEQ = ("u", "delta", "B", "C", "z", "alpha")


def _inputs(dtype=torch.float32, noise=True, b=3, d=16, n=5):
    """Every mechanism on (τ = 2, control at period P, scaling, noise), T = 4P + 3 tokens, and a mask
    with a left-padded row and a hole."""
    mech = ("scaling", "delay", "control") + (("noise",) if noise else ())
    x = conba_inputs(b=b, T=4 * P + 3, d=d, n=n, dtype=dtype, mechanisms=mech, seed=7)
    x["control_period"] = P
    mask = torch.ones(b, 4 * P + 3, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, 6:8] = 0
    return x, mask


def _split(x):
    """(per-token inputs, ConbaParams) from a flat keyword dict."""
    per = {k: x[k] for k in SEQ if k in x}
    return per, ConbaParams(**{k: v for k, v in x.items() if k in FIELDS})


def _state(x, b, seed=3):
    """A random initial state (phases differ per row), so the state path is exercised too."""
    d, n = x["u"].shape[-1], x["A"].shape[1]
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if x["u"].dtype == torch.float64 else torch.float32
    s = empty_state(b, d, n, x["tau"], x["group_size"], x["k0"], dtype=acc)
    for f in s[:4]:
        f.copy_(torch.randn(f.shape, generator=g, dtype=acc) * 0.3)
    s.k.abs_()
    s.phase.copy_(torch.arange(b) % P)
    return s


def _clone(s):
    return ConbaState(*[f.clone() for f in s])


def _same(a, b):
    """Bit-identical outputs and states."""
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _same(u, v)
    else:
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_params_is_frozen_and_knows_its_control():
    p = ConbaParams(-torch.rand(16, 4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.tau = 2
    assert not p.control and not p.noisy
    q = p.replace(eta=torch.rand(2), sigma_v=0.1)
    assert q.control and q.noisy and q.A is p.A and p.eta is None  # replace copies, p is untouched
    assert ConbaParams(p.A, k0=torch.rand(2)).control
    assert [f.name for f in dataclasses.fields(ConbaParams)] == list(FIELDS)
    assert p == p and p != p.replace() and {p: 1}[p] == 1  # identity: no element-wise tensor comparison


@pytest.mark.parametrize("fn", [conba_scan_ref, conba_scan_chunk_torch,
                                lambda *a, **k: conba_scan(*a, backend="ref", **k),
                                lambda *a, **k: conba_scan(*a, backend="auto", **k)],
                         ids=["ref", "chunk_torch", "public-ref", "public-auto"])
@pytest.mark.parametrize("with_state", [False, True])
def test_scan_params_form_equals_keyword_form(fn, with_state):
    x, mask = _inputs()
    b = x["u"].shape[0]
    per, p = _split(x)
    st = _state(x, b) if with_state else None
    kw = dict(mask=mask, return_final_state=True)
    flat = fn(**x, initial_state=_clone(st) if st is not None else None, **kw)
    new = fn(per["u"], per["delta"], per["B"], per["C"], p, z=per["z"], alpha=per["alpha"],
             initial_state=_clone(st) if st is not None else None, **kw)
    by_name = fn(**per, params=p, initial_state=_clone(st) if st is not None else None, **kw)
    _same(new, flat)
    _same(by_name, flat)
    assert not torch.equal(flat[1].k, x["k0"].expand(b, -1))  # the controller acted: the test sees it
    # the params path against the float64 loop
    x64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in x.items()}
    per64, p64 = _split(x64)
    st64 = ConbaState(*[f.double() if f.is_floating_point() else f for f in st]) if st is not None else None
    ref = conba_scan_ref(per64.pop("u"), per64.pop("delta"), per64.pop("B"), per64.pop("C"), p64, **per64,
                         initial_state=st64, **kw)
    assert rel_rms(new[0], ref[0]) < 1e-5 and rel_rms(new[1].h, ref[1].h) < 1e-5


def test_flat_positional_form_still_works():
    """The old positional order (u, delta, A, B, C, D, z, delta_bias, delta_softplus, alpha, rho, tau, k0, eta,
    lam, w_r, k_max, group_size, sigma_w, sigma_v, seed) then keywords."""
    x, mask = _inputs()
    pos = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "alpha", "rho",
                          "tau", "k0", "eta", "lam", "w_r", "k_max", "group_size", "sigma_w", "sigma_v", "seed")]
    for fn in (conba_scan_ref, conba_scan_chunk_torch, conba_scan):
        _same(fn(*pos, mask=mask, control_period=P, return_final_state=True),
              fn(**x, mask=mask, return_final_state=True))
    with pytest.raises(TypeError, match="positional"):
        conba_scan_ref(*pos, None)
    with pytest.raises(TypeError, match="multiple values for argument 'A'"):
        conba_scan_ref(*pos[:3], A=x["A"])
    with pytest.raises(TypeError, match="missing required argument"):
        conba_scan_ref(x["u"], x["delta"], B=x["B"], C=x["C"])


def test_params_path_passes_the_same_object_through(monkeypatch):
    """A call with a ConbaParams is not rebound: the backend receives the very object."""
    import mixcon.ops.conba as api

    x, mask = _inputs()
    per, p = _split(x)
    seen = []
    monkeypatch.setattr(api, "conba_scan_ref", lambda u, delta, B, C, params, **k: seen.append(params) or u)
    api.conba_scan(per["u"], per["delta"], per["B"], per["C"], p, z=per["z"], alpha=per["alpha"], backend="ref")
    assert seen and seen[0] is p


@pytest.mark.parametrize("path", ["ref", "compiled"])
def test_step_params_form_equals_keyword_form(path, monkeypatch):
    """Token by token over 4P + 3 tokens across sampling instants, with a mask, τ > 0 and control: the
    same y and state after every token. "compiled": the CPU decode step (no noise, no gradient)."""
    if path == "compiled" and cpu.kernels() is None:
        pytest.skip("the CPU kernels could not be built (no compiler)")
    x, mask = _inputs(noise=path == "ref")
    b, T, _ = x["u"].shape
    per, p = _split(x)
    rest = {k: v for k, v in x.items() if k not in per}
    s_flat, s_new, s_direct = _state(x, b), _state(x, b), _state(x, b)
    calls = []
    real = cpu.decode_step
    monkeypatch.setattr(cpu, "decode_step", lambda *a, **k: calls.append("dispatched") or real(*a, **k))
    with torch.no_grad():
        for t in range(T):
            tok = {k: v[:, t] for k, v in per.items()}
            if path == "ref":
                y_flat = conba_step_ref(s_flat, **tok, **rest, mask=mask[:, t], t=t)
                y_new = conba_step_ref(s_new, tok["u"], tok["delta"], tok["B"], tok["C"], p, z=tok["z"],
                                       alpha=tok["alpha"], mask=mask[:, t], t=t)
                y_pub = conba_step(s_direct, **tok, params=p, mask=mask[:, t], t=t, backend="ref")
            else:
                y_flat = conba_step(s_flat, **tok, **rest, mask=mask[:, t], t=t)
                y_new = conba_step(s_new, tok["u"], tok["delta"], tok["B"], tok["C"], p, z=tok["z"],
                                   alpha=tok["alpha"], mask=mask[:, t], t=t)
                y_pub = real(s_direct, **tok, **rest, mask=mask[:, t])  # the backend's own keyword adapter
                calls.append(y_pub is not None)
            _same(y_new, y_flat)
            _same(y_pub, y_flat)
            _same(tuple(s_new), tuple(s_flat))
            _same(tuple(s_direct), tuple(s_flat))
    assert all(calls) and calls.count("dispatched") == (2 * T if path == "compiled" else 0)
    # the same tokens as one scan of the loop
    ys = conba_scan_ref(**x, mask=mask, initial_state=_state(x, b), return_final_state=True)
    assert rel_rms(y_new, ys[0][:, -1]) < 1e-5
    assert not torch.equal(s_new.k, _state(x, b).k)


BAD = [
    (dict(group_size=5), "group_size=5 must be a positive int dividing d_inner=16"),
    (dict(tau=5), r"tau=5 must be an int in \[0, 4\]"),
    (dict(rho=None), "tau > 0 needs rho"),
    (dict(control_period=0), "control_period=0 must be an int >= 1"),
    (dict(control_period=2.0), "control_period=2.0 must be an int >= 1"),
    (dict(A=-torch.rand(15, 5)), r"A has shape \(15, 5\), expected \(d_inner=16, N\)"),
    (dict(D=torch.rand(15)), r"D has shape \(15,\), expected \(16,\)"),
    (dict(k0=torch.rand(3)), r"k0 has shape \(3,\), expected \(2,\)"),
    (dict(eta=[0.1, 0.2]), "eta must be a torch.Tensor, got list"),
    (dict(w_r=torch.ones(16, dtype=torch.long)), "w_r must be a floating tensor"),
]


@pytest.mark.parametrize("bad, msg", BAD, ids=[b[1][:24] for b in BAD])
def test_bad_params_give_the_same_message(bad, msg):
    x, mask = _inputs(noise=False)
    x.update(bad)
    per, p = _split(x)
    messages = []
    for call in (lambda: conba_scan(**x, mask=mask),
                 lambda: conba_scan(per["u"], per["delta"], per["B"], per["C"], p, z=per["z"], alpha=per["alpha"]),
                 lambda: conba_step(empty_state(3, 16, 5, 2, 8), **{k: v[:, 0] for k, v in per.items()}, params=p),
                 lambda: p.validate(16)):
        with pytest.raises(ValueError, match=msg) as err:
            call()
        messages.append(str(err.value))
    assert len(set(messages)) == 1, messages


def test_params_must_be_conba_params():
    x, _ = _inputs(noise=False)
    per, p = _split(x)
    with pytest.raises(ValueError, match="params must be a ConbaParams, got dict"):
        conba_scan(**per, params=p.as_kwargs())
