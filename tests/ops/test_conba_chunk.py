"""The chunk-parallel Conba scan (mixcon/ops/conba/chunk.py, control period P > 1) against the
reference (docs/conba.md, "Kernel contract").

On CPU through Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py), compiled on a CUDA GPU
when there is one. The interpreter runs a scan's combine once per element, so the shapes are small;
they are odd on purpose: T not a multiple of the block or of P, d_inner not a multiple of the
program's channel block, N = 5, groups with padded lanes, masks that leave a row empty, initial
states with a non-zero phase and an h that differs from its delay line's first entry. Every tensor
the kernels allocate is pre-filled with NaN, so an element a kernel forgets to write shows up.
"""

import pytest
import torch

pytest.importorskip("triton")

from helpers import conba_inputs, rel_rms  # noqa: E402
from mixcon.ops.conba import ConbaState, conba_scan  # noqa: E402
from mixcon.ops.conba import chunk as ck  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SEQ = ("u", "delta", "B", "C", "z", "alpha", "mask")
MECHANISMS = ["none", "scaling", "delay", "control", "noise", "all"]


@pytest.fixture(autouse=True)
def _nan_prefilled_outputs(monkeypatch):
    """torch.empty inside the kernel module returns NaN-filled tensors."""
    real_empty = torch.empty

    def nan_empty(*size, **kw):
        t = real_empty(*size, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(ck.torch, "empty", nan_empty)
    yield


def _inputs(mech, b=2, T=21, d=16, n=5, G=8, dtype=torch.float32, tau=None, seed=0, mask=True):
    m = "all" if mech == "all" else (() if mech == "none" else (mech,))
    x = conba_inputs(b=b, T=T, d=d, n=n, G=G, dtype=dtype, device=DEVICE, mechanisms=m, seed=seed)
    if tau is not None:
        x["tau"] = tau
    if mask:
        g = torch.Generator().manual_seed(seed + 1)
        x["mask"] = (torch.rand(b, T, generator=g) > 0.2).float()
        x["mask"][0, :3] = 0  # a left-padded row
        x["mask"] = x["mask"].to(DEVICE)
    return x


def _init_state(x, P, seed=0):
    """A random state: h differs from the delay line's first entry, the phase is anywhere in 0 … P − 1."""
    b, T, d = x["u"].shape
    n, tau, ng = x["A"].shape[1], x.get("tau", 0), d // x["group_size"]
    g = torch.Generator().manual_seed(seed + 2)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    st = ConbaState(r(b, d, n), r(b, tau, d, n), torch.rand(b, ng, generator=g) * 0.5, r(b, d) * 0.3,
                    torch.randint(0, P, (b,), generator=g))
    return ConbaState(*(s.to(DEVICE) for s in st))


def _run(x, backend, P, init=None, bt=None, grad=True, seed=0):
    """Output, final state and (with ``grad``) the gradient of every floating input of a random loss."""
    x = {k: (v.detach().clone().requires_grad_(grad and k != "mask") if isinstance(v, torch.Tensor) else v)
         for k, v in x.items()}
    st = None if init is None else ConbaState(
        *(s.detach().clone().requires_grad_(grad and s.is_floating_point()) for s in init))
    with torch.set_grad_enabled(grad):
        if backend == "ref":
            y, fin = conba_scan(**x, initial_state=st, return_final_state=True, backend="ref", control_period=P)
        else:
            y, fin = ck.conba_scan_chunk(**x, initial_state=st, return_final_state=True, control_period=P, block_t=bt)
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


def _compare(x, tol, P, init=None, bt=None, grad=True):
    """Kernel vs the reference on the same inputs. In float32 both are also measured against the
    reference in float64 (the oracle): the kernel must be within ``tol`` of it, or no worse than three
    times the float32 reference's own error where a sum is ill-conditioned (as in test_conba_triton)."""
    y_r, fin_r, g_r = _run(x, "ref", P, init, grad=grad)
    y_t, fin_t, g_t = _run(x, "chunk", P, init, bt, grad=grad)
    oracle = None
    if x["u"].dtype == torch.float32:
        x64 = {k: (v.double() if isinstance(v, torch.Tensor) and k != "mask" else v) for k, v in x.items()}
        oracle = _run(x64, "ref", P, None if init is None else ConbaState(
            *(s.double() if s.is_floating_point() else s for s in init)), grad=grad)

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


# ---------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("mech", MECHANISMS)
def test_forward_each_mechanism_P4(mech):
    x = _inputs(mech)
    _compare(x, 1e-5, 4, init=_init_state(x, 4), grad=False)


@pytest.mark.parametrize("tau,G,d", [(1, 8, 16), (3, 4, 20), (4, 6, 24)])
def test_forward_delay_lengths_odd_groups(tau, G, d):
    """d = 20 with G = 4: five groups, two per program, the last program half empty; G = 6: padded lanes."""
    x = _inputs("all", T=19, d=d, G=G, tau=tau)
    _compare(x, 1e-5, 4, init=_init_state(x, 4), bt=2, grad=False)


def test_forward_P64_blocks_shorter_than_the_period():
    """P = 64 with blocks of 16: instants fall inside blocks, T is no multiple of either."""
    x = _inputs("all", b=2, T=100, d=8)
    _compare(x, 1e-5, 64, init=_init_state(x, 64), bt=16, grad=False)


def test_forward_no_mask_default_block_and_empty_rows():
    x = _inputs("all", T=11, mask=False)
    _compare(x, 1e-5, 4, grad=False)
    x = _inputs("all", b=3, T=9)
    x["mask"][2] = 0  # a row with no real step: everything passes through
    _compare(x, 1e-5, 4, init=_init_state(x, 4), grad=False)
