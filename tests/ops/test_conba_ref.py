"""The reference Conba scan against the spec's reductions (docs/conba.md, "Reductions")."""

import pytest
import torch

from helpers import conba_inputs, mamba_selective_scan_ref, rel_rms
from mixcon.ops.conba import ConbaState, conba_scan, conba_step, empty_state
from mixcon.ops.conba.noise import conba_noise, normal_from_key, normal_from_key_ref

MECHANISMS = [(), ("scaling",), ("delay",), ("control",), ("noise",), "all"]
# control periods: 1 = the per-step controller; 4 acts several times in a test sequence; 64 with
# a sequence long enough to reach two sampling instants (docs/conba.md, step 6)
PERIODS = [1, 4, 64]
T_FOR = {1: 13, 4: 21, 64: 150}


def test_mamba_reduction_matches_mamba_ssm_reference():
    ref = mamba_selective_scan_ref()
    if ref is None:
        pytest.skip("mamba_ssm is not installed (pip install --no-deps mamba-ssm, see README)")
    x = conba_inputs(b=3, T=29, d=24, n=5, mechanisms=())
    y = conba_scan(**x, backend="ref")
    t = lambda a: a.transpose(1, 2).contiguous()
    y_ref = ref(t(x["u"]), t(x["delta"]), x["A"], t(x["B"]), t(x["C"]), x["D"], t(x["z"]),
                x["delta_bias"], delta_softplus=True)
    assert rel_rms(y, t(y_ref)) < 1e-6
    # without D, z and bias too, and without softplus
    y = conba_scan(x["u"], x["delta"].abs(), x["A"], x["B"], x["C"], backend="ref")
    y_ref = ref(t(x["u"]), t(x["delta"].abs()), x["A"], t(x["B"]), t(x["C"]))
    assert rel_rms(y, t(y_ref)) < 1e-6


def _final_state_close(s1, s2, tol=1e-5):
    for f, a, b in zip(ConbaState._fields, s1, s2):
        assert a.shape == b.shape, f
        if a.numel() == 0:
            continue
        if not a.is_floating_point():  # the phase: an exact count
            assert torch.equal(a, b), f
            continue
        assert rel_rms(a, b) < tol or (a - b).abs().max() < 1e-6, f


@pytest.mark.parametrize("P", PERIODS)
@pytest.mark.parametrize("mech", MECHANISMS, ids=lambda m: "+".join(m) if m != "all" else "all")
def test_step_by_step_equals_scan(mech, P):
    if P > 1 and "control" not in mech and mech != "all":
        pytest.skip("the period only acts on the controller")
    x = conba_inputs(T=T_FOR[P], mechanisms=mech)
    y, final = conba_scan(**x, return_final_state=True, backend="ref", control_period=P)
    b, T, d = x["u"].shape
    per_token = {k: x[k] for k in ("u", "delta", "B", "C", "z", "alpha") if k in x}
    rest = {k: v for k, v in x.items() if k not in per_token}
    state = empty_state(b, d, x["A"].shape[1], x.get("tau", 0), x["group_size"], x.get("k0"))
    ys = [conba_step(state, **{k: v[:, t] for k, v in per_token.items()}, **rest, t=t, backend="ref",
                     control_period=P)
          for t in range(T)]
    assert rel_rms(torch.stack(ys, 1), y) < 1e-6
    _final_state_close(state, final)
    if "control" in mech or mech == "all":
        assert torch.equal(final.phase, torch.full((b,), T % P))


@pytest.mark.parametrize("P", PERIODS)
@pytest.mark.parametrize("mech", MECHANISMS[:-2] + ["all"], ids=str)
def test_split_scan_with_initial_state_equals_one_scan(mech, P):
    if P > 1 and mech not in (("control",), "all"):
        pytest.skip("the period only acts on the controller")
    x = conba_inputs(T=T_FOR[P], mechanisms=[m for m in ("scaling", "delay", "control")] if mech == "all" else mech)
    y, final = conba_scan(**x, return_final_state=True, backend="ref", control_period=P)
    seq = ("u", "delta", "B", "C", "z", "alpha")
    cut = {1: 8, 4: 10, 64: 97}[P]  # in the middle of a period for P > 1
    first = {k: (v[:, :cut] if k in seq else v) for k, v in x.items()}
    second = {k: (v[:, cut:] if k in seq else v) for k, v in x.items()}
    y1, s1 = conba_scan(**first, return_final_state=True, backend="ref", control_period=P)
    if P > 1:
        assert (s1.phase == cut % P).all() and cut % P != 0
    y2, s2 = conba_scan(**second, initial_state=s1, return_final_state=True, backend="ref", control_period=P)
    assert rel_rms(torch.cat([y1, y2], 1), y) < 1e-6
    _final_state_close(s2, final)


def test_held_signal_follows_the_sampling_instants():
    """The zero-order hold written out independently: before the first sampling instant f = 0, so
    the output is the scan without control; at the instant the gain takes one λ-tracking update
    from that step's error, and the held signal changes the outputs only after it."""
    x = conba_inputs(T=24, mechanisms=("control",))
    ctl = {k: x.pop(k) for k in ("k0", "eta", "lam", "w_r", "k_max")}
    P = 10
    y_off = conba_scan(**x, backend="ref")
    y, fin = conba_scan(**x, **ctl, control_period=P, return_final_state=True, backend="ref")
    assert rel_rms(y[:, :P], y_off[:, :P]) < 1e-7  # f = k0·tanh(0) = 0 until step P has been seen
    assert rel_rms(y[:, P:], y_off[:, P:]) > 1e-3
    # the gain after the two sampling instants (steps 10 and 20), from the errors at those steps
    ungated = {**x, "z": None}
    y_raw = conba_scan(**ungated, **ctl, control_period=P, backend="ref")  # y before the silu(z) gate
    G = x["group_size"]
    k = ctl["k0"].expand(2, -1)
    for t in (P - 1, 2 * P - 1):
        e_t = y_raw[:, t] - ctl["w_r"] * x["u"][:, t]
        rms = (e_t.view(2, -1, G).pow(2).sum(-1) + 1e-12).sqrt() / G ** 0.5
        k = torch.clamp((1 - ctl["lam"]) * k + ctl["eta"] * rms, 0.0, ctl["k_max"])
    assert torch.allclose(fin.k, k, atol=1e-6)
    assert torch.allclose(fin.e, y_raw[:, 2 * P - 1] - ctl["w_r"] * x["u"][:, 2 * P - 1], atol=1e-6)
    assert torch.equal(fin.phase, torch.full((2,), 24 - 2 * P))


def test_mechanisms_are_noops_at_neutral_values_and_change_output_when_on():
    base = conba_inputs(mechanisms=())
    y0 = conba_scan(**base, backend="ref")
    b, T, d = base["u"].shape
    ng = d // base["group_size"]
    neutral = {
        "scaling": dict(alpha=torch.ones(b, T, ng)),
        "delay": dict(rho=torch.zeros(ng), tau=3),
        "control": dict(k0=torch.zeros(ng), eta=torch.zeros(ng), lam=torch.rand(ng), w_r=torch.randn(d)),
        "noise": dict(sigma_w=0.0, sigma_v=0.0, seed=7),
    }
    on = conba_inputs(mechanisms="all")
    active = {
        "scaling": dict(alpha=on["alpha"]),
        "delay": dict(rho=on["rho"], tau=2),
        "control": {k: on[k] for k in ("k0", "eta", "lam", "w_r", "k_max")},
        "noise": dict(sigma_w=0.05, sigma_v=0.05, seed=1),
    }
    for name in neutral:
        assert torch.equal(conba_scan(**{**base, **neutral[name]}, backend="ref"), y0), name
        y_on = conba_scan(**{**base, **active[name]}, backend="ref")
        assert rel_rms(y_on, y0) > 1e-3, f"{name} on did not change the output"


def test_control_gain_adapts_within_bounds():
    x = conba_inputs(T=40, mechanisms=("control",))
    _, final = conba_scan(**x, return_final_state=True, backend="ref")
    assert (final.k >= 0).all() and (final.k <= x["k_max"] + 1e-6).all()
    assert not torch.allclose(final.k, x["k0"].expand_as(final.k))  # the law moved the gain
    assert final.e.abs().sum() > 0


@pytest.mark.parametrize("P", PERIODS)
def test_padded_steps_are_skipped_exactly(P):
    """A left-padded sequence gives the same outputs on its tokens and the same final state
    (padded steps do not count towards the control period: the sampling instants fall after
    the same tokens as for the sequence alone)."""
    T = T_FOR[P] + 2
    x = conba_inputs(b=2, T=T, mechanisms="all")
    x.pop("sigma_w"), x.pop("sigma_v")
    pad = 4 if P != 4 else 3  # not a multiple of the period
    seq = ("u", "delta", "B", "C", "z", "alpha")
    y, final = conba_scan(**x, return_final_state=True, backend="ref", control_period=P)
    padded = {k: (torch.cat([torch.randn_like(v[:, :pad]), v], 1) if k in seq else v) for k, v in x.items()}
    mask = torch.ones(2, T + pad)
    mask[:, :pad] = 0
    yp, fp = conba_scan(**padded, mask=mask, return_final_state=True, backend="ref", control_period=P)
    assert torch.all(yp[:, :pad] == 0)
    assert rel_rms(yp[:, pad:], y) < 1e-6
    _final_state_close(fp, final)
    # padding in the middle leaves the state as it was across the gap
    mid = mask.clone()
    mid[:, :pad] = 1
    mid[0, 10:12] = 0
    _, s_mid = conba_scan(**padded, mask=mid, return_final_state=True, backend="ref", control_period=P)
    _, s_all = conba_scan(**padded, return_final_state=True, backend="ref", control_period=P)
    assert not torch.allclose(s_mid.h[0], s_all.h[0]) and torch.allclose(s_mid.h[1], s_all.h[1])
    if P > 1:
        assert s_mid.phase[0] == (s_all.phase[0] - 2) % P and s_mid.phase[1] == s_all.phase[1]


def test_noise_is_keyed_and_standard_normal():
    xi, zeta = conba_noise(seed=3, batch=4, t=5, d_inner=256, d_state=16)
    xi2, zeta2 = conba_noise(seed=3, batch=4, t=5, d_inner=256, d_state=16)
    assert torch.equal(xi, xi2) and torch.equal(zeta, zeta2)
    xi3, _ = conba_noise(seed=4, batch=4, t=5, d_inner=256, d_state=16)
    xi4, _ = conba_noise(seed=3, batch=4, t=6, d_inner=256, d_state=16)
    assert not torch.allclose(xi, xi3) and not torch.allclose(xi, xi4)
    assert not torch.allclose(xi[0], xi[1])
    allz = torch.cat([xi.flatten(), zeta.flatten()])
    assert abs(allz.mean().item()) < 0.03 and abs(allz.std().item() - 1) < 0.03
    # decorrelated streams: process noise vs observation noise of the same channel
    assert abs(torch.corrcoef(torch.stack([xi[..., 0].flatten(), zeta.flatten()]))[0, 1]) < 0.1


def test_fast_noise_hash_is_the_definition_bit_for_bit():
    """normal_from_key (int32, in place) against normal_from_key_ref (the int64 definition) on random
    32-bit keys and lanes, including ones with the top bit set (the sign of the int32 copy)."""
    g = torch.Generator().manual_seed(0)
    key = torch.randint(0, 2**32, (33, 5, 1), generator=g)
    lane = torch.randint(0, 2**32, (1, 5, 257), generator=g)
    key[0, 0, 0], lane[0, 0, 0] = 2**32 - 1, 2**31
    fast, ref = normal_from_key(key, lane), normal_from_key_ref(key, lane)
    assert fast.dtype == ref.dtype == torch.float32 and fast.shape == ref.shape
    assert torch.equal(fast, ref)


def test_gradients_flow_to_every_input():
    x = conba_inputs(T=9, mechanisms=("scaling", "delay", "control"))
    grads = [k for k, v in x.items() if isinstance(v, torch.Tensor)]
    for k in grads:
        x[k] = x[k].clone().requires_grad_(True)
    y = conba_scan(**x, backend="ref")
    (y * torch.randn_like(y)).sum().backward()
    for k in grads:
        assert x[k].grad is not None and torch.isfinite(x[k].grad).all() and x[k].grad.abs().sum() > 0, k


@pytest.mark.parametrize("bad, msg", [
    (dict(B=torch.randn(2, 13, 5)), "B has shape"),
    (dict(group_size=5), "group_size"),
    (dict(tau=5, rho=torch.rand(2)), "tau"),
    (dict(tau=2), "needs rho"),
    (dict(alpha=torch.rand(2, 13, 3)), "alpha has shape"),
    (dict(backend="cuda"), "backend"),
    (dict(control_period=0), "control_period"),
    (dict(control_period=2.0), "control_period"),
])
def test_bad_arguments_raise_value_error(bad, msg):
    x = conba_inputs(mechanisms=())
    x.update(bad)
    with pytest.raises(ValueError, match=msg):
        conba_scan(**x)
