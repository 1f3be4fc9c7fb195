"""The fused Triton Conba kernels against the reference (docs/conba.md, "Kernel contract").

On CPU these run through Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py); on a
machine with a CUDA GPU the same tests run the compiled kernels there. The shapes are small; they
are chosen odd on purpose: T not a multiple of the checkpoint interval, d_inner not a multiple of
the channel block, N not a power of two, some groups padded.
Every tensor the kernels allocate is pre-filled with NaN, so an element a kernel forgets to
write shows up as NaN.
"""

import pytest
import torch

pytest.importorskip("triton")

from helpers import SEQ_INPUTS as SEQ  # noqa: E402
from helpers import KERNEL_DEVICE as DEVICE  # noqa: E402
from helpers import KERNEL_MECHANISMS as MECHANISMS  # noqa: E402
from helpers import compare_to_reference, conba_inputs, kernel_inputs, nan_prefill, random_state, rel_rms  # noqa: E402
from mixcon.ops.conba import ConbaState, conba_scan, conba_step, dispatch, empty_state  # noqa: E402
from mixcon.ops.conba import fused_recurrent as fr  # noqa: E402



@pytest.fixture(autouse=True)
def _nan_prefilled_outputs(monkeypatch):
    nan_prefill(monkeypatch, fr)
    yield


def _inputs(mech, T=13, d=24, **kw):
    return kernel_inputs(mech, T=T, d=d, **kw)


def _init_state(x, seed=0):
    return random_state(x, 1, seed)  # phase 0: these kernels are the P = 1 controller


def _ref(x, st):
    return conba_scan(**x, initial_state=st, return_final_state=True, backend="ref")


def _fused(interval):
    return lambda x, st: fr.conba_scan_fused_recurrent(**x, initial_state=st, return_final_state=True,
                                                       checkpoint_interval=interval)


def _compare(x, tol, init=None, interval=4):
    """The fused kernels against the reference (helpers.compare_to_reference: float64 oracle in fp32)."""
    compare_to_reference(x, tol, _fused(interval), _ref, init)

@pytest.mark.parametrize("mech", MECHANISMS)
def test_forward_backward_fp32_each_mechanism(mech):
    x = _inputs(mech)
    _compare(x, 1e-5, init=_init_state(x))


def test_without_initial_state_all_mechanisms_k0_gradient():
    x = _inputs("all", T=11)
    _compare(x, 1e-5)  # k0 is a leaf here: its gradient comes through the initial gain


@pytest.mark.parametrize("tau,G", [(1, 8), (3, 4), (4, 6)])
def test_delay_lengths_and_group_sizes(tau, G):
    x = _inputs("all", T=10, d=4 * G, tau=tau, G=G)
    _compare(x, 1e-5, init=_init_state(x), interval=3)


def test_bf16_inputs():
    x = _inputs("all", dtype=torch.bfloat16, T=12)
    # the kernel and the reference both read bf16 and accumulate in float32; outputs and
    # gradients are rounded to bf16
    _compare(x, 1e-2, init=_init_state(x))


def test_longer_sequence_several_checkpoints():
    x = _inputs("all", b=1, T=37, d=40, n=16)
    _compare(x, 1e-5, interval=16)


def test_sequence_shorter_than_the_checkpoint_interval_several_rows():
    """The backward's per-row scratch holds a whole checkpoint interval even when T is shorter (rows
    past the first were once written out of bounds)."""
    x = _inputs("all", b=3, T=7)
    _compare(x, 1e-5, init=_init_state(x), interval=16)


def test_no_grad_forward_and_no_mask():
    x = _inputs("all")
    del x["mask"]
    with torch.no_grad():
        y_r, s_r = conba_scan(**x, return_final_state=True, backend="ref")
        y_t, s_t = conba_scan(**x, return_final_state=True, backend="triton")
    assert rel_rms(y_t, y_r) <= 1e-5
    for a, b in zip(s_t, s_r):
        assert b.numel() == 0 or rel_rms(a, b) <= 1e-5


@pytest.mark.parametrize("mech", ["none", "all"])
def test_decode_steps_equal_scan(mech):
    x = _inputs(mech, T=9)
    y, fin = conba_scan(**x, return_final_state=True, backend="ref")
    b, T, d = x["u"].shape
    per = {k: x[k] for k in SEQ if k in x}
    rest = {k: v for k, v in x.items() if k not in per}
    state = empty_state(b, d, x["A"].shape[1], x.get("tau", 0), x["group_size"], x.get("k0"), DEVICE)
    with torch.no_grad():
        ys = [conba_step(state, **{k: v[:, t] for k, v in per.items()}, **rest, t=t, backend="triton")
              for t in range(T)]
    assert rel_rms(torch.stack(ys, 1), y) <= 1e-5
    for f, a, b in zip(ConbaState._fields, state, fin):
        assert b.numel() == 0 or rel_rms(a, b) <= 1e-5 or (a - b).abs().max() < 1e-6, f


def test_split_scan_with_state_equals_one_scan():
    x = _inputs("all", T=12)
    x["sigma_w"] = x["sigma_v"] = 0.0  # noise is keyed by the time index inside one call
    with torch.no_grad():
        y, fin = conba_scan(**x, return_final_state=True, backend="triton")
        first = {k: (v[:, :5] if k in SEQ else v) for k, v in x.items()}
        second = {k: (v[:, 5:] if k in SEQ else v) for k, v in x.items()}
        y1, s1 = conba_scan(**first, return_final_state=True, backend="triton")
        y2, s2 = conba_scan(**second, initial_state=s1, return_final_state=True, backend="triton")
    assert rel_rms(torch.cat([y1, y2], 1), y) <= 1e-5
    assert rel_rms(s2.h, fin.h) <= 1e-5


def test_model_with_triton_backend_matches_reference():
    from helpers import randomize_, tiny_config
    from mixcon import MixConForCausalLM

    torch.manual_seed(0)
    # one block (three Conba layers, one attention layer) at width 32, a control period that samples
    # three times inside the 13 tokens: the model's plumbing of the backend, at the interpreter's pace
    cfg = tiny_config(conba_backend="ref", n_blocks=1, hidden_size=32, control_period=4)
    model = randomize_(MixConForCausalLM(cfg), scale=0.1).eval().to(DEVICE)  # well-conditioned in fp32
    ids = torch.randint(0, cfg.vocab_size, (2, 13), device=DEVICE)
    mask = torch.ones(2, 13, dtype=torch.long, device=DEVICE)
    mask[1, :2] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        for m in model.modules():
            if hasattr(m, "backend"):
                m.backend = "triton"
        fused = model(ids, attention_mask=mask).logits
    assert rel_rms(fused[mask.bool()], ref[mask.bool()]) <= 1e-5


@pytest.mark.gpu
def test_gpu_auto_backend_and_realistic_shape_bf16():
    assert dispatch("auto", torch.device("cuda"), 1) == "fused_recurrent"
    assert dispatch("auto", torch.device("cuda"), 8) == "chunk"
    x = _inputs("all", b=2, T=700, d=512, n=16, dtype=torch.bfloat16)
    _compare(x, 1e-2, init=_init_state(x))


@pytest.mark.gpu
def test_gpu_batch_offsets_past_int32():
    """Three rows of 2^30 elements: the last row's offsets pass 2^31 (64-bit batch offsets)."""
    b, T, d = 3, 2**17, 2**13
    x = conba_inputs(b=1, T=64, d=d, n=16, G=8, dtype=torch.bfloat16, device=DEVICE, seed=3)
    x["sigma_w"] = x["sigma_v"] = 0.0
    g = torch.Generator(device=DEVICE).manual_seed(4)
    for k in ("u", "delta", "z"):
        x[k] = (torch.randn(b, T, d, device=DEVICE, generator=g) * (0.5 if k == "delta" else 1.0)).bfloat16()
    for k in ("B", "C"):
        x[k] = torch.randn(b, T, 16, device=DEVICE, generator=g).bfloat16()
    x["alpha"] = torch.sigmoid(torch.randn(b, T, d // 8, device=DEVICE, generator=g) + 2).bfloat16()
    with torch.no_grad():
        y = conba_scan(**x, backend="triton")
        last = {k: (v[2:] if k in SEQ else v) for k, v in x.items()}
        y_last = conba_scan(**last, backend="triton")
    assert torch.equal(y[2:], y_last)
    with pytest.raises(ValueError, match="2\\^31"):
        conba_scan(**{k: (v.view(1, b * T, -1) if k in SEQ else v) for k, v in x.items()}, backend="triton")


def test_launcher_forms_no_noise(monkeypatch):
    """The P = 1 kernels with training noise: the launcher passes the seed's key, the kernels hash ξ and ζ
    themselves, forward and backward (regenerated there): no noise is drawn in PyTorch, and no tensor
    larger than the same scan forms without noise."""
    from helpers import launcher_forms_no_noise

    launcher_forms_no_noise(monkeypatch, lambda xs: fr.conba_scan_fused_recurrent(**xs), _inputs("all"))
