"""The fused Triton decode step (fused_recurrent._conba_step_kernel) at every control period P against
the reference (docs/conba.md, "Decode state"; issue 24).

The step keeps the period's phase in the state, holds the gain and the sampled error between two
sampling instants and updates them when a real token closes the period; a padded token leaves the
whole state (the phase included) as it was. Decoding token by token must equal one scan of the same
sequence, across sampling instants, with the delay on (τ = 2), a left-padded row, noise on and off.
On CPU through Triton's interpreter, so the shapes are tiny: 2 rows, 2 control groups, N = 5.
"""

import pytest
import torch

pytest.importorskip("triton")

from helpers import KERNEL_DEVICE as DEVICE  # noqa: E402
from helpers import SEQ_INPUTS as SEQ, kernel_inputs, nan_prefill, random_state, rel_rms  # noqa: E402
from mixcon.ops import conba as api  # noqa: E402
from mixcon.ops.conba import ConbaState, conba_scan, conba_step  # noqa: E402
from mixcon.ops.conba import fused_recurrent as fr  # noqa: E402



@pytest.fixture(autouse=True)
def _nan_prefilled_outputs(monkeypatch):
    nan_prefill(monkeypatch, fr)
    yield


def _split(x):
    per = {k: x[k] for k in SEQ if k in x}
    return per, {k: v for k, v in x.items() if k not in per}


def _clone(st):
    return ConbaState(*(s.clone() for s in st))


def _decode(x, state, t0, P, backend="triton"):
    """Tokens t0 … T − 1 of ``x`` one at a time through `conba_step` (``state`` updated in place)."""
    per, rest = _split(x)
    with torch.no_grad():
        ys = [conba_step(state, **{k: v[:, t] for k, v in per.items()}, **rest, t=t, backend=backend,
                         control_period=P) for t in range(t0, x["u"].shape[1])]
    return torch.stack(ys, 1)


# P = 1 and 8 decode every token from a random state (phase anywhere in the period); P = 64 prefills
# 60 tokens with one scan and decodes across the instants after 64 and 128 real steps (4·P decoded
# tokens would cost minutes in the interpreter: two instants inside the decoded part do the job).
CASES = [(1, 9, 0), (8, 34, 0), (64, 131, 60)]


@pytest.mark.parametrize("noise", [False, True], ids=["quiet", "noise"])
@pytest.mark.parametrize("P,T,prefill", CASES, ids=[f"P{c[0]}" for c in CASES])
def test_decode_token_by_token_equals_one_scan(P, T, prefill, noise):
    x = kernel_inputs("all", b=2, T=T, d=16, n=5)  # τ = 2, α, control, D, z, softplus; row 0 left-padded
    if not noise:
        x["sigma_w"] = x["sigma_v"] = 0.0
    init = random_state(x, P, seed=P)
    if prefill:  # both rows meet the instants after 64 and 128 real steps inside the decoded part
        x["mask"].fill_(1)
        x["mask"][0, :3] = 0
        x["mask"][1, 100] = 0
        init.phase.zero_()
    y_ref, fin_ref = conba_scan(**x, initial_state=_clone(init), return_final_state=True, backend="ref",
                                control_period=P)
    state = _clone(init)
    if prefill:
        pre = {k: (v[:, :prefill] if k in SEQ else v) for k, v in x.items()}
        with torch.no_grad():
            _, st = conba_scan(**pre, initial_state=state, return_final_state=True, backend="ref", control_period=P)
        state = _clone(st)
    e_before = state.e.clone()
    y = _decode(x, state, prefill, P)
    assert not torch.isnan(y).any()
    assert rel_rms(y, y_ref[:, prefill:]) <= 1e-5
    for f, a, b in zip(ConbaState._fields, state, fin_ref):
        if not b.is_floating_point():
            assert torch.equal(a, b), f"{f}: {a.tolist()} != {b.tolist()}"
        elif b.numel():
            assert rel_rms(a, b) <= 1e-5 or (a - b).abs().max() < 1e-6, f
    # not vacuous: the controller sampled inside the decoded part (the held error moved) in every row
    assert ((state.e - e_before).abs().amax(-1) > 1e-4).all()


def test_each_token_equals_the_reference_step_and_a_padded_token_changes_nothing():
    """Step by step against `conba_step_ref` from the same state, the whole state compared after every
    token; the token that closes a period, and a padded token there, checked on their own."""
    P = 8
    x = kernel_inputs("all", b=2, T=20, d=16, n=5)
    x["mask"][1, 7] = 0  # row 1: a padded token when its phase is 7 (it must not sample)
    init = random_state(x, P, seed=5)
    init.phase.copy_(torch.tensor([7, 0]))  # row 0 samples on its first real token, row 1 after 8
    per, rest = _split(x)
    s_ref, s_fused = _clone(init), _clone(init)
    sampled = set()
    with torch.no_grad():
        for t in range(x["u"].shape[1]):
            tok = {k: v[:, t] for k, v in per.items()}
            before = _clone(s_fused)
            y_r = conba_step(s_ref, **tok, **rest, t=t, backend="ref", control_period=P)
            y_f = conba_step(s_fused, **tok, **rest, t=t, backend="triton", control_period=P)
            assert rel_rms(y_f, y_r) <= 1e-5, t
            assert torch.equal(s_fused.phase, s_ref.phase), t
            for f in ("h", "line", "k", "e"):
                a, b = getattr(s_fused, f), getattr(s_ref, f)
                assert rel_rms(a, b) <= 1e-5 or (a - b).abs().max() < 1e-6, (t, f)
            for r in range(2):
                if tok["mask"][r] == 0:  # a padded token: the row's state exactly as it was
                    assert all(torch.equal(getattr(s_fused, f)[r], getattr(before, f)[r]) for f in ConbaState._fields)
                elif s_fused.phase[r] == 0:
                    sampled.add(r)
                    assert not torch.equal(s_fused.k[r], before.k[r])
                else:
                    assert torch.equal(s_fused.k[r], before.k[r]) and torch.equal(s_fused.e[r], before.e[r])
    assert sampled == {0, 1}


def test_phase_of_another_dtype_and_layout_is_written_back():
    """An int32 phase (or a non-contiguous one) runs on an int64 copy that is written back."""
    x = kernel_inputs("control", b=2, T=1, d=8, n=3, mask=False)
    per, rest = _split(x)
    tok = {k: v[:, 0] for k, v in per.items()}
    init = random_state(x, 4, seed=1)
    init.phase.copy_(torch.tensor([3, 1]))
    st = ConbaState(*init[:4], init.phase.to(torch.int32))
    ref = _clone(init)
    with torch.no_grad():
        conba_step(st, **tok, **rest, backend="triton", control_period=4)
        conba_step(ref, **tok, **rest, backend="ref", control_period=4)
    assert st.phase.dtype == torch.int32 and st.phase.tolist() == ref.phase.tolist() == [0, 2]
    assert rel_rms(st.k, ref.k) <= 1e-6


def test_dispatch_every_period_uses_the_kernel_and_triton_never_falls_back(monkeypatch):
    """backend="triton" (and "auto" where it resolves to Triton, i.e. on CUDA) launches the fused step for
    every P; with a gradient required "triton" raises and "auto" takes the reference step."""
    launches = []
    real = fr.conba_step_fused_recurrent
    # the dispatcher calls the backend as (state, u, delta, B, C, params, ...): the period is the params'
    monkeypatch.setattr(fr, "conba_step_fused_recurrent",
                        lambda *a, **k: launches.append(a[5].control_period) or real(*a, **k))
    x = kernel_inputs("control", b=1, T=1, d=8, n=3, mask=False)
    per, rest = _split(x)
    tok = {k: v[:, 0] for k, v in per.items()}
    off = {k: v for k, v in rest.items() if k not in ("k0", "eta", "lam", "w_r", "k_max")}

    def state(P):
        return random_state(x, P, seed=2)

    with torch.no_grad():
        for P in (1, 8, 64):
            conba_step(state(P), **tok, **rest, backend="triton", control_period=P)
        conba_step(state(8), **tok, **off, backend="triton", control_period=8)
        # as on CUDA: "auto" resolves to Triton, and the compiled CPU step (CPU tensors only) does not apply
        real_dispatch = api.dispatch
        monkeypatch.setattr(api, "dispatch", lambda b, d, *a, **k: real_dispatch(b, torch.device("cuda"), *a, **k))
        conba_step(state(64), **tok, **rest, backend="auto", control_period=64)
    assert launches == [1, 8, 64, 8, 64]
    grad = {k: (v.clone().requires_grad_() if k == "u" else v) for k, v in tok.items()}
    with pytest.raises(ValueError, match="no backward"):
        conba_step(state(8), **grad, **rest, backend="triton", control_period=8)
    st_a, st_r = state(8), state(8)
    y_a = conba_step(st_a, **grad, **rest, backend="auto", control_period=8)  # the reference step, with a graph
    y_r = conba_step(st_r, **grad, **rest, backend="ref", control_period=8)
    assert y_a.requires_grad and torch.equal(y_a, y_r)
    assert launches == [1, 8, 64, 8, 64, 8]  # the one that raised, and no launch for "auto" with a gradient


def test_periodic_step_traces_through_its_registered_op():
    """torch.compile (fullgraph, aot_eager: functionalised as inductor does) of the fused step at P = 4
    across a sampling instant: the phase and the gain, written in place by the op, equal the reference."""
    from mixcon.ops.conba.library import conba_step_op

    P = 4
    x = kernel_inputs("all", b=2, T=1, d=16, n=4, mask=False)
    x["sigma_w"] = x["sigma_v"] = 0.0
    per, rest = _split(x)
    tok = {k: v[:, 0] for k, v in per.items()}
    init = random_state(x, P, seed=3)
    init.phase.copy_(torch.tensor([3, 1]))  # row 0 samples now, row 1 does not
    s_ref, s_op = _clone(init), _clone(init)
    torch._dynamo.reset()
    with torch.no_grad():
        y_ref = conba_step(s_ref, **tok, **rest, backend="ref", control_period=P)
        step = torch.compile(lambda s: conba_step(s, **tok, **rest, backend="triton", control_period=P),
                             fullgraph=True, backend="aot_eager")
        y = step(s_op)
    assert rel_rms(y, y_ref) <= 1e-5
    assert s_op.phase.tolist() == s_ref.phase.tolist() == [0, 2]
    for f in ("h", "line", "k", "e"):
        assert rel_rms(getattr(s_op, f), getattr(s_ref, f)) <= 1e-5, f
    assert not torch.equal(s_op.k[0], init.k[0]) and torch.equal(s_op.k[1], init.k[1])
    s = _clone(init)
    args = (*s, tok["u"], tok["delta"], rest["A"], tok["B"], tok["C"], rest["D"], tok["z"], rest["delta_bias"], True,
            tok["alpha"], rest["rho"], rest["tau"], rest["k0"], rest["eta"], rest["lam"], rest["w_r"], rest["k_max"],
            rest["group_size"], 0.0, 0.0, 0, None, 0, P)
    torch.library.opcheck(conba_step_op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
def test_gpu_cuda_graph_decode_at_a_short_period_equals_the_reference():
    """On a GPU: the model's static-cache decode compiled with mode="reduce-overhead" (a CUDA graph, the
    fused step inside it) at P = 4, eight tokens (two sampling instants), against the reference backend."""
    import torch.nn.functional as F

    from helpers import randomize_, tiny_config
    from mixcon import MixConForCausalLM
    from mixcon.models.cache import MixConCache

    torch.manual_seed(0)
    cfg = tiny_config(control_period=4)
    cfg.pad_token_id = 0
    model = randomize_(MixConForCausalLM(cfg), scale=0.1).eval().cuda()
    ids = torch.randint(3, cfg.vocab_size, (2, 6), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    M = 16

    def prefilled():
        cache = MixConCache(model.config, max_cache_len=M, batch_size=2)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        return cache, out.logits[:, -1].argmax(-1, keepdim=True)

    ref_cache, nxt = prefilled()
    comp_cache, _ = prefilled()
    am = F.pad(mask, (0, M - 6))
    pos = mask.sum(1, keepdim=True)
    torch._dynamo.reset()
    step = torch.compile(model.forward, fullgraph=True, mode="reduce-overhead")
    layers = [m for m in model.modules() if hasattr(m, "backend")]
    with torch.no_grad():
        for t in range(8):
            am[:, 6 + t] = 1
            for m in layers:
                m.backend = "ref"
            ref = model(nxt, attention_mask=am, position_ids=pos + t, past_key_values=ref_cache).logits
            for m in layers:
                m.backend = "auto"
            torch.compiler.cudagraph_mark_step_begin()
            got = step(nxt, attention_mask=am, position_ids=pos + t, past_key_values=comp_cache).logits.clone()
            torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
            nxt = ref[:, -1].argmax(-1, keepdim=True)
    conba = model.config.layers_block_type.index("conba")
    a, b = comp_cache.layers[conba].state["ssm"], ref_cache.layers[conba].state["ssm"]
    assert torch.equal(a.phase, b.phase)
    torch.testing.assert_close(a.k, b.k, rtol=1e-4, atol=1e-5)
