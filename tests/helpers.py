"""Shared test helpers: tiny configs, random Conba inputs, error metrics."""

import json
import os
import sys
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "mixcon", "configs")


def member_config(name, **overrides):
    """The shipped config ``configs/<name>`` with ``overrides`` applied."""
    from mixcon import MixConConfig

    kw = json.load(open(os.path.join(CONFIGS, name)))
    kw.pop("model_type")
    kw.update(overrides)
    return MixConConfig(**kw)


def tiny_config(**overrides):
    return member_config("tiny.json", **overrides)


def randomize_(model, scale=0.3):
    """Weights far from their init so that every path carries signal (init is near-identity)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand_like(p) * 4 + 0.5))
            elif "layernorm" in name or "norm" in name.split(".")[-2]:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("dt_proj.bias"):
                p.copy_(torch.randn_like(p) * 0.5 - 2.0)
            else:
                p.add_(torch.randn_like(p) * scale)
    return model


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp(min=1e-30)).item()


def conba_inputs(b=2, T=13, d=16, n=4, G=8, dtype=torch.float32, device="cpu", mechanisms="all", seed=0):
    """Random (never zero) inputs for conba_scan with the chosen mechanisms on."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    ng = d // G
    x = dict(
        u=r(b, T, d), delta=r(b, T, d) * 0.5, A=-(torch.rand(d, n, generator=g) * 2 + 0.3),
        B=r(b, T, n), C=r(b, T, n), D=r(d), z=r(b, T, d), delta_bias=r(d) * 0.3 - 1.0,
        delta_softplus=True, group_size=G,
    )
    mech = {"scaling", "delay", "control", "noise"} if mechanisms == "all" else set(mechanisms)
    if "scaling" in mech:
        x["alpha"] = torch.sigmoid(r(b, T, ng) + 2.0)
    if "delay" in mech:
        x["rho"] = torch.rand(ng, generator=g) * 0.5 + 0.1
        x["tau"] = 2
    if "control" in mech:
        x.update(k0=torch.rand(ng, generator=g) * 0.5, eta=torch.rand(ng, generator=g) * 0.5 + 0.1,
                 lam=torch.rand(ng, generator=g) * 0.3 + 0.05, w_r=r(d) * 0.5 + 1.0, k_max=0.8)
    if "noise" in mech:
        x.update(sigma_w=0.05, sigma_v=0.05, seed=1234)
    for k, v in x.items():
        if isinstance(v, torch.Tensor):
            x[k] = v.to(device=device, dtype=dtype if k in ("u", "delta", "B", "C", "z", "alpha") else torch.float32)
    return x


def mamba_selective_scan_ref():
    """mamba_ssm's selective_scan_ref, or None when mamba_ssm is not installed.
    Its module imports the compiled extension at the top, so a stub stands in for it."""
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    except Exception:
        return None
    return selective_scan_ref


# ------------------------------------------------------------- kernel tests: a kernel against the reference
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_MECHANISMS = ["none", "scaling", "delay", "control", "noise", "all"]
# the inputs of conba_scan that carry a time axis (a decode step takes them without it)
SEQ_INPUTS = ("u", "delta", "B", "C", "z", "alpha", "mask")


def nan_prefill(monkeypatch, module):
    """``torch.empty`` inside a kernel module returns NaN-filled tensors, so an element a kernel
    forgets to write shows up as NaN."""
    real_empty = torch.empty

    def nan_empty(*size, **kw):
        t = real_empty(*size, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(module.torch, "empty", nan_empty)


def kernel_inputs(mech, b=2, T=13, d=16, n=5, G=8, dtype=torch.float32, tau=None, seed=0, mask=True):
    """`conba_inputs` on KERNEL_DEVICE for one of KERNEL_MECHANISMS, with a random 0/1 mask whose
    first row is left-padded."""
    m = "all" if mech == "all" else (() if mech == "none" else (mech,))
    x = conba_inputs(b=b, T=T, d=d, n=n, G=G, dtype=dtype, device=KERNEL_DEVICE, mechanisms=m, seed=seed)
    if tau is not None:
        x["tau"] = tau
    if mask:
        g = torch.Generator().manual_seed(seed + 1)
        x["mask"] = (torch.rand(b, T, generator=g) > 0.2).float()
        x["mask"][0, :3] = 0  # a left-padded row
        x["mask"] = x["mask"].to(KERNEL_DEVICE)
    return x


def random_state(x, P=1, seed=0):
    """A random ConbaState for inputs ``x``: h differs from the delay line's first entry, the phase
    anywhere in 0 … P − 1 (0 for P = 1)."""
    from mixcon.ops.conba import ConbaState

    b, T, d = x["u"].shape
    n, tau, ng = x["A"].shape[1], x.get("tau", 0), d // x["group_size"]
    g = torch.Generator().manual_seed(seed + 2)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    st = ConbaState(r(b, d, n), r(b, tau, d, n), torch.rand(b, ng, generator=g) * 0.5, r(b, d) * 0.3,
                    torch.randint(0, P, (b,), generator=g))
    return ConbaState(*(s.to(KERNEL_DEVICE) for s in st))


def run_with_grads(x, scan, init=None, grad=True, seed=0):
    """``scan(x, state) -> (y, final state)`` on fresh leaves: the output, the final state and (with
    ``grad``) the gradient of every floating input and initial-state field of a random loss."""
    from mixcon.ops.conba import ConbaState

    x = {k: (v.detach().clone().requires_grad_(grad and k != "mask") if isinstance(v, torch.Tensor) else v)
         for k, v in x.items()}
    st = None if init is None else ConbaState(
        *(s.detach().clone().requires_grad_(grad and s.is_floating_point()) for s in init))
    with torch.set_grad_enabled(grad):
        y, fin = scan(x, st)
    if not grad:
        return y, fin, {}
    g = torch.Generator().manual_seed(seed + 3)
    w = lambda t: torch.randn(t.shape, generator=g).to(t.device)  # noqa: E731
    loss = (y.float() * w(y)).sum()
    loss = loss + sum((s * w(s)).sum() for s in fin if s.is_floating_point())
    loss.backward()
    grads = {k: v.grad for k, v in x.items() if isinstance(v, torch.Tensor) and k != "mask"}
    if st is not None:
        grads.update({"state." + f: s.grad for f, s in zip(ConbaState._fields, st) if s.is_floating_point()})
    return y, fin, grads


def compare_to_reference(x, tol, kernel, reference, init=None, grad=True):
    """``kernel`` against ``reference`` (both ``(x, state) -> (y, final state)``) on the same inputs:
    output, final state (integer fields exactly) and every gradient. In float32 both are also measured
    against the reference in float64 (the oracle): the kernel must be within ``tol`` of it, or no worse
    than three times the float32 reference's own error where a sum is ill-conditioned (the gradients
    of λ and η sum many terms of both signs; on an H100 the kernel's λ gradient once measured 2.8e-5
    against the reference's 1.2e-5, summation order alone)."""
    from mixcon.ops.conba import ConbaState

    y_r, fin_r, g_r = run_with_grads(x, reference, init, grad)
    y_t, fin_t, g_t = run_with_grads(x, kernel, init, grad)
    oracle = None
    if x["u"].dtype == torch.float32:
        x64 = {k: (v.double() if isinstance(v, torch.Tensor) and k != "mask" else v) for k, v in x.items()}
        oracle = run_with_grads(x64, reference, None if init is None else ConbaState(
            *(s.double() if s.is_floating_point() else s for s in init)), grad)

    def close(name, got, ref, o=None):
        if o is None:
            err = rel_rms(got, ref)
            assert err <= tol, f"{name}: {err:.2e} > {tol:g}"
            return
        err, err_ref = rel_rms(got, o), rel_rms(ref, o)
        assert err <= max(tol, 3 * err_ref), f"{name}: {err:.2e} from the float64 oracle (fp32 reference {err_ref:.2e})"

    assert not torch.isnan(y_t).any()
    close("y", y_t, y_r, None if oracle is None else oracle[0])
    for i, (f, a, b) in enumerate(zip(ConbaState._fields, fin_t, fin_r)):
        assert a.shape == b.shape, f
        if not b.is_floating_point():
            assert torch.equal(a.cpu(), b.cpu()), f"final state.{f}: {a.tolist()} != {b.tolist()}"
        elif b.numel() and (a - b).abs().max() > 1e-6:
            close(f"final state.{f}", a, b, None if oracle is None else oracle[1][i])
    assert g_r.keys() == g_t.keys()
    for k in g_r:
        if g_r[k] is None:
            assert g_t[k] is None or g_t[k].abs().max() == 0, k
            continue
        assert g_t[k] is not None, f"no gradient for {k}"
        if g_r[k].numel() == 0:
            continue
        assert not torch.isnan(g_t[k]).any(), k
        assert g_r[k].abs().max() > 0, f"{k}: the reference gradient is zero; the test would be vacuous"
        close(f"d/d{k}", g_t[k], g_r[k], None if oracle is None else oracle[2][k])


def scan_with_grads(fn, x, state, mask, P):
    """``fn`` (a conba_scan backend) on fresh leaves of ``x`` and ``state`` at control period ``P``: the
    output, the final state and the gradient of every floating input and of the initial state's h,
    delay line, gain and error under a random loss of the output and those final-state fields."""
    from mixcon.ops.conba import ConbaState

    x = {k: (v.detach().clone().requires_grad_(True) if torch.is_tensor(v) and v.is_floating_point() else v)
         for k, v in x.items()}
    st = ConbaState(*[s.detach().clone().requires_grad_(s.is_floating_point()) for s in state])
    y, fin = fn(**x, mask=mask, initial_state=st, return_final_state=True, control_period=P)
    g = torch.Generator().manual_seed(5)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    for f in fin[:4]:
        loss = loss + (f * torch.randn(f.shape, generator=g, dtype=f.dtype)).sum()
    loss.backward()
    grads = {k: v.grad for k, v in x.items() if torch.is_tensor(v) and v.requires_grad}
    grads.update({"state." + f: s.grad for f, s in zip(ConbaState._fields[:4], st)})
    return y, fin, grads



def largest_output():
    """A dispatch mode that records, as ``numel``, the largest tensor any op returns inside it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor):
                    self.numel = max(self.numel, o.numel())
            return out

    return LargestOutput()


def launcher_forms_no_noise(monkeypatch, scan, x):
    """Run ``scan(x)`` forward and backward with training noise on, noise.py's PyTorch draw refused and
    every op's output watched, then the same with the noise off: the launcher (Python around the kernels)
    hashes no noise and forms no tensor larger than it forms without noise. Returns both sizes."""
    from mixcon.ops.conba import noise as noise_mod

    def run(inputs):
        xs = {k: (v.detach().clone().requires_grad_(True) if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in inputs.items()}
        with largest_output() as seen:
            scan(xs).square().sum().backward()
        assert all(torch.isfinite(xs[k].grad).all() for k in ("u", "delta", "B", "C"))
        return seen.numel

    quiet = run({**x, "sigma_w": 0.0, "sigma_v": 0.0})

    def refuse(*a, **k):
        raise AssertionError("noise formed in PyTorch")

    for name in ("normal_from_key", "normal_from_key_ref", "conba_noise"):
        monkeypatch.setattr(noise_mod, name, refuse)
    assert x["sigma_w"] > 0 and x["sigma_v"] > 0
    noisy = run(x)
    assert noisy <= quiet, (noisy, quiet)
    return noisy, quiet


def token_lists(seed, lengths, low=3, high=512):
    """Random prompts as lists of token ids (one list per length), a pure function of ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (n,), generator=g).tolist() for n in lengths]


def dies_at_call(fn, n):
    """``fn`` that raises KeyboardInterrupt (a kill) at its ``n``-th call, to stop a run part-way."""
    calls = []

    def wrapper(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return fn(*a, **k)

    return wrapper
