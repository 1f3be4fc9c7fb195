"""The compiled CPU kernels (mixcon/ops/conba/cpu.py, mixcon/ops/cpu/csrc/) against the float64 loop in
naive.py and against the PyTorch block scan they replace: the block scan with its gradients, the
whole chunk_torch scan both ways, memory under no_grad, large steps, and the decode step across
sampling instants."""

import pytest
import torch

from helpers import conba_inputs, largest_output, rel_rms, scan_with_grads
from mixcon.ops.conba import ConbaState, chunk_torch, conba_scan, conba_scan_ref, conba_step, conba_step_ref, cpu
from mixcon.ops.conba import empty_state
from mixcon.ops.conba.chunk_torch import _block_scan, conba_scan_chunk_torch

pytestmark = pytest.mark.skipif(cpu.kernels() is None, reason="the CPU kernels could not be built (no compiler)")

SEQ = ("u", "delta", "B", "C", "z", "alpha")


def _block_inputs(L, b, d, N, tau, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(dt=torch.nn.functional.softplus(r(L, b, d)), ut=r(L, b, d),
                coef=torch.rand(L, b, d, generator=g, dtype=dtype) * 0.5 + 0.5,
                r=torch.rand(L, b, d, generator=g, dtype=dtype) * 0.3, At=-torch.rand(N, d, generator=g, dtype=dtype) * 2,
                B=r(L, b, N), C=r(L, b, N), h0=r(b, N, d), dl0=r(tau, b, N, d))


def _pytorch_block(x, tau, steps):
    """(y, h_last, dl_last) from the PyTorch block scan, each row stopped at its steps."""
    y, h = _block_scan(x["dt"], x["ut"], x["coef"], x["r"], x["At"], x["B"], x["C"], None, x["h0"],
                       x["dl0"] if tau else None, tau)
    L = y.shape[0]
    ext_h = torch.cat([x["h0"][None], h], 0)
    h_last = torch.stack([ext_h[int(s), i] for i, s in enumerate(steps)])
    ext_d = torch.cat([x["dl0"].flip(0), h], 0)  # ext_d[τ + p] = h_p
    dl = torch.stack([torch.stack([ext_d[tau + int(s) - 1 - i, bi] for bi, s in enumerate(steps)]) for i in range(tau)]) \
        if tau else x["dl0"]
    keep = (torch.arange(L)[:, None] < steps[None, :])[..., None]  # the kernel's y is 0 past a row's steps
    return y * keep, h_last, dl


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau", [0, 1, 2, 4])
def test_block_scan_and_every_gradient(tau, dtype):
    """Rows stopped at different steps (0, mid-segment, past a recompute checkpoint, the whole block),
    the final state and delay line as outputs, gradients of every input."""
    L, b, d, N = 77, 4, 40, 5  # d: one full tile and a part one in float64; N odd
    x = _block_inputs(L, b, d, N, tau, dtype)
    steps = torch.tensor([L, 0, 2, 45])
    x1 = {k: v.clone().requires_grad_() for k, v in x.items()}
    x2 = {k: v.clone().requires_grad_() for k, v in x.items()}
    out1 = _pytorch_block(x1, tau, steps)
    out2 = cpu.block_scan(x2["dt"], x2["ut"], x2["coef"], x2["r"], x2["At"], x2["B"], x2["C"], None, x2["h0"],
                          x2["dl0"], tau, steps)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, c in zip(out1, out2):
        assert a.shape == c.shape and (a.numel() == 0 or rel_rms(c, a) < tol)
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(o.shape, generator=g, dtype=dtype) for o in out1]
    sum(((o * w).sum() for o, w in zip(out1, weights)), torch.zeros((), dtype=dtype)).backward()
    sum(((o * w).sum() for o, w in zip(out2, weights)), torch.zeros((), dtype=dtype)).backward()
    for k in x:
        a, c = x1[k].grad, x2[k].grad
        if k in ("r", "dl0") and tau == 0:  # no delay: r unused, the delay line empty
            assert c is None or c.numel() == 0
            continue
        assert c is not None and torch.isfinite(c).all() and rel_rms(c, a) < tol * 10, (k, rel_rms(c, a))


def _conba(P, mech, tau=2, b=4, T=None, dtype=torch.float64, seed=0):
    x = conba_inputs(b=b, T=T or {1: 13, 4: 23, 64: 150}[P], d=24, n=5, mechanisms=mech, dtype=dtype, seed=seed)
    for k, v in x.items():
        if torch.is_tensor(v) and k not in SEQ:
            x[k] = v.to(dtype)
    if "rho" in x:
        x["tau"] = tau
    if "eta" in x:
        x["eta"], x["k_max"] = x["eta"] * 0.3, 3.0
    return x


def _mask(b, T):
    m = torch.ones(b, T)
    m[1, :5] = 0
    m[0, 7:9] = 0
    m[3] = 0
    return m


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "pytorch"])
@pytest.mark.parametrize("P, tau", [(1, 3), (4, 4), (64, 2), (4, 0)])
def test_scan_with_masks_state_and_gradients(P, tau, compiled, monkeypatch):
    """chunk_torch with and without the kernel: every mechanism, left padding, a hole, an empty row and
    an initial state with per-row phases, against the float64 loop, outputs, final state, gradients."""
    monkeypatch.setattr(chunk_torch, "COMPILED", compiled)
    x = _conba(P, "all", tau=tau)
    b, T, d = x["u"].shape
    n, ng = x["A"].shape[1], d // x["group_size"]
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    state = ConbaState(r(b, d, n), r(b, tau, d, n), torch.rand(b, ng, generator=g, dtype=torch.float64), r(b, d),
                       torch.tensor([0, 1, P - 1, 2]) % P)
    mask = _mask(b, T)

    y1, s1, g1 = scan_with_grads(conba_scan_ref, x, state, mask, P)
    y2, s2, g2 = scan_with_grads(conba_scan_chunk_torch, x, state, mask, P)
    assert rel_rms(y2, y1) < 1e-12 and torch.all(y2[mask == 0] == 0)
    for f, a, c in zip(ConbaState._fields, s1, s2):
        assert a.shape == c.shape and (torch.equal(a, c) if f == "phase" else a.numel() == 0 or rel_rms(c, a) < 1e-12)
    assert s2.h.is_contiguous() and s2.line.is_contiguous()  # the decode step updates them in place
    with torch.no_grad():  # the prefill path: every block written into one buffer
        y3, s3 = conba_scan_chunk_torch(**x, mask=mask, initial_state=ConbaState(*[t.clone() for t in state]),
                                        return_final_state=True, control_period=P)
    assert rel_rms(y3, y1) < 1e-12 and all(torch.equal(a, c) or rel_rms(c, a) < 1e-12 for a, c in zip(s1, s3))
    for k, a in g1.items():
        c = g2[k]
        if a is None or not a.abs().sum():
            assert c is None or not c.abs().sum(), k
        else:
            assert rel_rms(c, a) < 1e-10, (k, rel_rms(c, a))


@pytest.mark.parametrize("control", [True, False])
def test_nothing_of_size_time_by_state(control):
    """Under no_grad no op makes a (T, b, N, d) tensor (the compiled kernel is opaque to the dispatch
    mode, so its scratch is not counted: it holds tiles of 32 steps); with a gradient, autograd saves
    nothing that size either."""
    T, b, d, n = 256, 2, 16, 8
    x = conba_inputs(b=b, T=T, d=d, n=n, mechanisms=("scaling", "delay", "control") if control else ("scaling",))
    full = T * b * n * d
    with torch.no_grad(), largest_output() as seen:
        conba_scan(**x, control_period=64)
    assert seen.numel <= T * b * d < full
    saved = []
    xs = {k: (v.requires_grad_() if torch.is_tensor(v) and k in SEQ else v) for k, v in x.items()}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = conba_scan(**xs, control_period=64)
    y.sum().backward()
    assert max(saved) <= T * b * d < full


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_steps_stay_finite(dtype):
    """Δ from 30 to ~1000 after softplus: exp(Δ·A) underflows to 0, nothing overflows, forward or backward."""
    x = _conba(4, "all", tau=3, dtype=dtype)
    x["delta"] = x["delta"].abs() * 300 + 30.0
    for k in ("u", "delta", "B", "C"):
        x[k].requires_grad_(True)
    y = conba_scan(**x, control_period=4)
    y_ref = conba_scan_ref(**{k: (v.detach().double() if torch.is_tensor(v) and v.is_floating_point() else v)
                              for k, v in x.items()}, control_period=4)
    assert torch.isfinite(y).all() and rel_rms(y, y_ref) < (1e-12 if dtype == torch.float64 else 1e-5)
    y.square().sum().backward()
    assert all(torch.isfinite(x[k].grad).all() for k in ("u", "delta", "B", "C"))


def _decode_cases():
    for P in (1, 4, 64):
        for mech in ("all", ("control",), ("scaling", "delay"), ()):
            yield P, mech
    yield 4, ("delay",)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("P, mech", list(_decode_cases()), ids=str)
def test_decode_step_equals_the_loop(P, mech, dtype):
    """Token by token across several sampling instants (T ≥ 2P), with a padded prefix, a hole and a
    fully padded row: the same outputs and the same state after every token as conba_step_ref."""
    x = _conba(P, mech, tau=3, dtype=dtype, T=max(2 * P + 5, 13))
    x = {k: v for k, v in x.items() if k not in ("sigma_w", "sigma_v", "seed")}
    b, T, d = x["u"].shape
    mask = _mask(b, T)
    per = {k: x[k] for k in SEQ if k in x}
    rest = {k: v for k, v in x.items() if k not in per}
    mk = lambda: empty_state(b, d, x["A"].shape[1], x.get("tau", 0), x["group_size"], x.get("k0"), dtype=dtype)  # noqa: E731
    s_ref, s_new = mk(), mk()
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    for t in range(T):
        tok = {k: v[:, t] for k, v in per.items()}
        y_ref = conba_step_ref(s_ref, **tok, **rest, mask=mask[:, t], t=t, control_period=P)
        with torch.no_grad():
            y_new = conba_step(s_new, **tok, **rest, mask=mask[:, t], t=t, control_period=P)
        assert y_new.dtype == y_ref.dtype and rel_rms(y_new, y_ref) < tol, t
        for f, a, c in zip(ConbaState._fields, s_ref, s_new):
            if f == "phase":
                assert torch.equal(a, c), (t, a, c)
            elif a.numel() and a.abs().sum():
                assert rel_rms(c, a) < tol, (t, f, rel_rms(c, a))
    if "control" in mech or mech == "all":
        assert not torch.equal(s_new.k, x["k0"].expand(b, -1))  # the gain law acted


def test_decode_step_dispatch(monkeypatch):
    """The compiled step runs without noise and without a gradient; noise or a gradient takes the loop."""
    calls = []
    real = cpu.decode_step
    monkeypatch.setattr(cpu, "decode_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _conba(4, ("control", "delay"), dtype=torch.float32)
    b, T, d = x["u"].shape
    tok = {k: x[k][:, 0] for k in SEQ if k in x}
    rest = {k: v for k, v in x.items() if k not in tok}
    state = empty_state(b, d, x["A"].shape[1], x["tau"], x["group_size"], x["k0"])
    conba_step(state, **tok, **rest, control_period=4)
    assert calls == [1]
    conba_step(state, **tok, **rest, control_period=4, sigma_w=0.1, seed=3)  # noise: the loop
    conba_step(state, **tok, **rest, control_period=4, backend="ref")
    assert calls == [1]
    u = tok["u"].clone().requires_grad_()
    y = conba_step(state, **{**tok, "u": u}, **rest, control_period=4)  # a gradient wanted: the loop
    assert calls == [1]
    y.sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


def _mixer(dtype, **over):
    from mixcon.layers.conba import ConbaMixer
    from mixcon.models.configuration_mixcon import MixConConfig

    cfg = MixConConfig(hidden_size=32, d_state=8, n_blocks=1, layers_per_block=2, attn_ratio="0:2", moe_every=0,
                       vocab_size=64, num_attention_heads=2, num_key_value_heads=1, **over)
    torch.manual_seed(1)
    m = ConbaMixer(cfg, 0)
    m.reset_parameters()
    with torch.no_grad():  # every parameter off its initial value (sel_out, w_r, k0 start at 0)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.to(dtype).eval()


LAYER_CASES = {
    "all, P=4": dict(control_period=4),
    "all, P=1": dict(control_period=1),
    "linear selection, ssm_norm, τ=0": dict(selection="linear", ssm_norm=True, delay=0, control_period=3),
    "control only": dict(state_scaling=False, delay=0, control_period=4),
    "mamba": dict(state_scaling=False, delay=0, control=False, selection="linear"),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_decode_layer_equals_the_pytorch_step(case, dtype, monkeypatch):
    """ConbaMixer's decode token through the compiled layer step (cpu.decode_layer: conv, selection,
    Δ, parameter transforms, step, gate in one call) against the same layer's PyTorch step, token by
    token across ≥ 4 sampling instants with a padded prefix and a hole: the same outputs, conv window
    and Conba state after every token; and against the uncached forward of the whole sequence."""
    m = _mixer(dtype, **LAYER_CASES[case])
    P = m.control_period
    b, T = 3, 4 * P + 6
    x = torch.randn(b, T, m.hidden_size, dtype=dtype, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(b, T, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, 5] = 0  # a hole
    calls = []
    real = cpu.decode_layer
    monkeypatch.setattr(cpu, "decode_layer", lambda *a, **k: calls.append(1) or real(*a, **k))

    def states():
        conv, ssm = m.empty_state(b, x.device)
        return {"conv": conv.to(dtype), "ssm": ConbaState(*(s.to(dtype) if s.is_floating_point() else s for s in ssm))}

    fused, plain = states(), states()
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    ys = []
    with torch.no_grad():
        for t in range(T):
            y_f = m(x[:, t:t + 1], mask[:, t:t + 1], fused)
            with monkeypatch.context() as mp:
                mp.setattr(type(m), "_fused_step_applies", lambda self, x: False)
                y_p = m(x[:, t:t + 1], mask[:, t:t + 1], plain)
            assert rel_rms(y_f, y_p) < tol, (t, rel_rms(y_f, y_p))
            assert rel_rms(fused["conv"], plain["conv"]) < tol
            for f, a, c in zip(ConbaState._fields, plain["ssm"], fused["ssm"]):
                if f == "phase":
                    assert torch.equal(a, c), t
                elif a.numel():
                    assert rel_rms(c, a) < tol, (t, f)
            ys.append(y_f)
        full = m(x, mask)
    assert len(calls) == T
    keep = mask.bool()
    assert rel_rms(torch.cat(ys, 1)[keep], full[keep]) < (1e-10 if dtype == torch.float64 else 1e-4)
    if m.control:
        k0 = m.empty_state(b, x.device)[1].k.to(dtype)
        assert not torch.allclose(fused["ssm"].k, k0)  # the gain law acted


def test_decode_layer_dispatch(monkeypatch):
    """The compiled layer step runs in eval without a gradient; training noise, a wanted gradient or
    the reference backend take the PyTorch step."""
    m = _mixer(torch.float32, control_period=2, process_noise=0.1)
    calls = []
    real = cpu.decode_layer
    monkeypatch.setattr(cpu, "decode_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 1, m.hidden_size)
    conv, ssm = m.empty_state(2, x.device)
    st = {"conv": conv, "ssm": ssm}
    with torch.no_grad():
        m(x, None, st)
    assert calls == [1]
    m(x, None, st)  # parameters want a gradient
    m.train()
    with torch.no_grad():
        m(x, None, st)  # training noise
    m.eval()
    m.backend = "ref"
    with torch.no_grad():
        m(x, None, st)
    assert calls == [1]



def test_loader_builds_from_every_source():
    """mixcon/ops/cpu builds the module from every file of csrc/ and names the build by all of them (a
    header left out of the digest would let a changed header reuse a stale build)."""
    import os

    from mixcon.ops import cpu as loader

    assert sorted(os.listdir(loader.CSRC)) == sorted(loader.SOURCES + loader.HEADERS)
    assert loader.built() and cpu.kernels() is loader.kernels()

def test_decode_weights_contract():
    """The layer hands the decode kernel its tensors by name: the kernel's own list (the order it reads them)
    is DECODE_WEIGHTS, and a disagreement is a clear error at load, not one tensor read for another."""
    from mixcon.ops import cpu as loader

    assert tuple(cpu.kernels().decode_weights()) == cpu.DECODE_WEIGHTS
    assert cpu.check_decode_weights in loader._checks  # registered: run once when the module is loaded
    swapped = list(cpu.DECODE_WEIGHTS)
    swapped[1], swapped[2] = swapped[2], swapped[1]

    class Swapped:
        def decode_weights(self):
            return swapped

    with pytest.raises(RuntimeError, match="DECODE_WEIGHTS"):
        cpu.check_decode_weights(Swapped())


@pytest.mark.parametrize("case", ["all, P=4", "linear selection, ssm_norm, τ=0", "mamba"])
def test_decode_weights_found_by_name(case):
    """Every name of DECODE_WEIGHTS is a parameter of the layer (or the derived A) where its mechanism is
    on, and absent where it is off; find_decode_weights returns those very tensors, in that order."""
    m = _mixer(torch.float32, **LAYER_CASES[case])
    params = dict(m.named_parameters())
    A = torch.zeros(1)
    absent = cpu.empty(torch.float32)
    w = cpu.find_decode_weights(m, {"A": A}, absent)
    assert len(w) == len(cpu.DECODE_WEIGHTS)
    for name, t in zip(cpu.DECODE_WEIGHTS, w):
        if name == "A":
            assert t is A
        elif name in params:
            assert t is params[name], name
        else:
            assert t is absent, name
    on = {n for n, t in zip(cpu.DECODE_WEIGHTS, w) if t is not absent}
    assert {"conv1d.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A", "D"} <= on
    assert ("sel_gate.weight" in on) == (m.selection == "swiglu")
    assert ("dt_layernorm.weight" in on) == bool(m.ssm_norm)
    assert ("rho_raw" in on) == (m.tau > 0) and ("w_r" in on) == bool(m.control)
    assert ("alpha_bias" in on) == bool(m.state_scaling)


# ------------------------------------------------------------------------------------- training noise
def test_kernel_noise_is_noise_py_bit_for_bit():
    """The kernels' draw (cpu.noise, the same code the scan kernels run per step and tile) against
    chunk_torch._block_noise (noise.py) on random seeds, positions and sizes: every lane, bit for bit.
    Positions up to 2^31 and seeds with the top bit set, d_inner off the tile width, N odd and 1."""
    from mixcon.ops.conba.chunk_torch import _block_noise
    from mixcon.ops.conba.noise import step_key

    g = torch.Generator().manual_seed(0)
    for L, b, d, n in [(7, 3, 40, 5), (5, 2, 128, 16), (3, 1, 200, 1), (2, 4, 9, 8)]:
        src_t = torch.randint(0, 2**31, (L, b), generator=g)
        src_t[0, 0] = 0
        seed = int(torch.randint(0, 2**32, (1,), generator=g))
        xi, zeta = _block_noise(seed, src_t, d, n, "cpu")
        keys = step_key(seed, torch.arange(b), src_t).contiguous()
        for j in range(n + 1):
            ref = zeta if j == n else xi[:, :, j]
            assert torch.equal(cpu.noise(keys, d, n, j), ref), (L, b, d, n, j)


def test_noise_transforms_match_torch_on_every_input():
    """sqrt(−2 log u1) and cos u2 as the kernels compute them against torch's ops (those of
    noise.normal_from_key) over all 2^24 values each uniform can take: the draw is bit for bit
    noise.py's on this machine whatever the hash gives."""
    import math

    k = torch.arange(2**24, dtype=torch.int64)
    u1 = (k.to(torch.float32) + 0.5) * 2.0**-24
    u2 = k.to(torch.float32) * (2.0 * math.pi * 2.0**-24)
    r, c = cpu.kernels().noise_transforms(u1, u2)
    assert torch.equal(r, u1.clone().log_().mul_(-2.0).sqrt_())
    assert torch.equal(c, u2.clone().cos_())


@pytest.mark.parametrize("keep", [True, False], ids=["kept-states", "regenerated"])
@pytest.mark.parametrize("P", [4, 64])
def test_noise_is_drawn_in_the_kernels(P, keep, monkeypatch):
    """Compiled, neither the prefill nor a training step forms noise in PyTorch (noise.py's hash is never
    called and no op returns a (T, b, N, d) tensor but the states a noisy training forward keeps for its
    backward); the results still match the float64 loop, with masks, forward and every gradient, whether
    the backward reads the kept states or recomputes them, drawing the noise again."""
    from mixcon.ops.conba import noise as noise_mod

    monkeypatch.setattr(cpu, "KEEP_NOISY_STATES", keep)

    x = _conba(P, "all", tau=2)
    b, T, d = x["u"].shape
    n = x["A"].shape[1]
    mask = _mask(b, T)
    state = empty_state(b, d, n, 2, x["group_size"], x["k0"], dtype=torch.float64)
    y_ref, s_ref, g_ref = scan_with_grads(conba_scan_ref, x, state, mask, P)

    def refuse(*a, **k):
        raise AssertionError("noise formed in PyTorch")

    monkeypatch.setattr(noise_mod, "normal_from_key", refuse)
    monkeypatch.setattr(chunk_torch, "normal_from_key", refuse)
    monkeypatch.setattr(chunk_torch, "_block_noise", refuse)
    with torch.no_grad(), largest_output() as seen:
        y = conba_scan_chunk_torch(**x, mask=mask, control_period=P)
    assert seen.numel <= b * (T + 1) * d < T * b * n * d  # (the compacted line's gather adds a zero row)
    assert rel_rms(y, y_ref) < 1e-12
    y2, _, g2 = scan_with_grads(conba_scan_chunk_torch, x, state, mask, P)
    assert rel_rms(y2, y_ref) < 1e-12
    for k, a in g_ref.items():
        if a is not None and a.abs().sum():
            assert rel_rms(g2[k], a) < 1e-10, k


def test_noisy_training_keeps_states_not_noise():
    """A noisy training step saves for its backward the states of each block (the one (L, b, N, d) tensor
    per block) and the step keys (L, b), no noise; without noise nothing of that size (as before)."""
    T, b, d, n = 64, 2, 16, 8
    x = conba_inputs(b=b, T=T, d=d, n=n, mechanisms=("scaling", "delay", "noise"))
    xs = {k: (v.requires_grad_() if torch.is_tensor(v) and k in SEQ else v) for k, v in x.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = conba_scan(**xs, control_period=64)
    y.sum().backward()
    big = [t for t in saved if t.numel() >= T * b * n * d]
    assert len(big) == 1 and big[0].shape == (T, b, n, d) and big[0].is_floating_point()
    assert any(t.dtype == torch.int64 and t.shape == (T, b) for t in saved)  # the keys


def test_per_step_controller_runs_in_one_call(monkeypatch):
    """At P = 1 a training scan runs its whole line in one kernel call, the controller and its adjoint
    inside (cpu.p1_scan), not a block and the controller's autograd per step; against the float64 loop
    with masks, an initial gain and error, noise and every gradient."""
    calls = []
    p1 = cpu.p1_scan
    monkeypatch.setattr(cpu, "p1_scan", lambda *a, **k: calls.append(1) or p1(*a, **k))
    monkeypatch.setattr(cpu, "block_scan", lambda *a, **k: pytest.fail("a block per step"))
    x = _conba(1, "all", tau=3, T=19)
    b, T, d = x["u"].shape
    g = torch.Generator().manual_seed(2)
    state = empty_state(b, d, x["A"].shape[1], 3, x["group_size"], dtype=torch.float64)
    state = state._replace(k=torch.rand(b, d // x["group_size"], generator=g, dtype=torch.float64),
                           e=torch.randn(b, d, generator=g, dtype=torch.float64))
    mask = _mask(b, T)
    y1, s1, g1 = scan_with_grads(conba_scan_ref, x, state, mask, 1)
    y2, s2, g2 = scan_with_grads(conba_scan_chunk_torch, x, state, mask, 1)
    assert calls == [1]
    tol = 1e-12
    assert rel_rms(y2, y1) < tol
    for f, a, c in zip(ConbaState._fields, s1, s2):
        assert torch.equal(a, c) if f == "phase" else rel_rms(c, a) < tol, f
    for k, a in g1.items():
        if a is not None and a.abs().sum():
            assert rel_rms(g2[k], a) < tol * 100, (k, rel_rms(g2[k], a))
