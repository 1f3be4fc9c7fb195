"""Shared test helpers: tiny configs, random Conba inputs, error metrics."""

import json
import os
import sys
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


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
