"""Conba is a live state space at step 0 (docs/conba.md, "Initialisation (normative)").

Two checks for every member that has Conba layers:
- at initialisation, each Conba parameter's RMS gradient relative to in_proj's lies within
  FACTOR of the same ratios of transformers' `MambaForCausalLM` of the same sizes, built here;
- a short training run on a task that needs memory (copy a segment seen earlier) lowers the loss
  and moves every parameter of step 6 and of the selection network.
"""

import math

import pytest
import torch

from helpers import member_config, tiny_config
from mixcon import MixConForCausalLM


OFF = dict(delay=0, state_scaling=False, control=False, selection="linear")
MEMBERS = {  # every member with Conba layers, at the tiny sizes
    "mixcon": lambda: tiny_config(),
    "mixcon-live-control": lambda: tiny_config(control_init="live"),  # issue 27's initialisation option
    "mod": lambda: member_config("mod-tiny.json"),
    "jamba": lambda: tiny_config(attn_ratio="1:3", ssm_norm=True, moe_renormalize=False, **OFF),
    "mamba": lambda: tiny_config(attn_ratio="0:4", moe_every=0, intermediate_size=0, **OFF),
}

# Mamba's own ratios at these sizes span 2e-3 (A_log) to 2 (out_proj). A Conba parameter passes
# when its ratio lies within FACTOR of that range (for a parameter Mamba has: of Mamba's ratio
# for it). Measured (members below, seeds 0-2, 24 and 64 tokens): the farthest are λ (up to 121×
# below Mamba's smallest: its gradient is −k and the gain starts at 0, rising by η = 0.01 per
# step), α's bias (76×: sigmoid'(6.9) = 1e-3) and w_r (64×); dt_proj.weight is 20–30× below
# Mamba's (our in_proj/x_proj start at PyTorch's default, transformers' Mamba at normal(0.1)),
# and with ssm_norm x_proj is 52× above. All of them move in the training test. Before the
# initialisation of docs/conba.md these ratios were 1e-15 to 1e-24, or exactly 0, so 300×
# separates a live layer from a dead one by ten orders of magnitude.
FACTOR = 300.0
MECHANISMS = ("alpha_bias", "rho_raw", "eta_raw", "lam_raw", "k0", "w_r")  # step 6
STATE_SPACE = ("A_log", "D", "dt_proj.weight", "dt_proj.bias")
SELECTION = ("x_proj.weight", "sel_gate.weight", "sel_value.weight", "sel_out.weight")


def _rms(t):
    return t.double().pow(2).mean().sqrt().item()


def _grad_ratios(model, ids, prefix_of_layer):
    """{layer: {param: rms(grad) / rms(grad of in_proj)}} after one backward of the LM loss."""
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    out = {}
    for name, p in model.named_parameters():
        layer, sep, rest = name.partition(".mixer.")
        if sep and layer.startswith(prefix_of_layer) and p.grad is not None:
            out.setdefault(layer, {})[rest] = _rms(p.grad)
    return {layer: {k: v / g["in_proj.weight"] for k, v in g.items()}
            for layer, g in out.items() if "in_proj.weight" in g and "A_log" in g}


def _mamba_ratios(c, ids):
    from transformers import MambaConfig, MambaForCausalLM

    mc = MambaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, state_size=c.d_state,
                     num_hidden_layers=c.num_hidden_layers, expand=c.expand, conv_kernel=c.d_conv,
                     time_step_rank=c.dt_rank)
    torch.manual_seed(0)
    ratios = _grad_ratios(MambaForCausalLM(mc), ids, "backbone.layers")
    per_param = {}
    for r in ratios.values():
        for k, v in r.items():
            per_param.setdefault(k, []).append(v)
    return {k: (min(v), max(v)) for k, v in per_param.items()}


@pytest.mark.parametrize("member", MEMBERS)
def test_every_conba_parameter_gets_a_gradient_like_mambas_at_init(member):
    c = MEMBERS[member]()
    assert "conba" in c.layers_block_type
    g = torch.Generator().manual_seed(1)
    # long enough for the sampled-data controller (docs/conba.md, step 6) to act 8 times at the config's
    # period: before its first sampling instant the held signal is 0 and η, λ get no gradient
    T = 8 * c.control_period + 8 if c.control else 24
    ids = torch.randint(0, c.vocab_size, (2, T), generator=g)
    # Mamba has no controller: 64 tokens give its ratios (its reference path loops over time in
    # Python, 3× slower than ours at 520 tokens)
    mamba = _mamba_ratios(c, ids[:, :64])
    lo_all = min(lo for lo, _ in mamba.values())
    hi_all = max(hi for _, hi in mamba.values())
    torch.manual_seed(0)
    model = MixConForCausalLM(c)
    ours = _grad_ratios(model, ids, "model.layers")
    assert len(ours) == c.layers_block_type.count("conba")
    zero_by_design = {"sel_gate.weight", "sel_value.weight"}  # sel_out = 0 at init: checked after one step
    failures = []
    for layer, ratios in ours.items():
        for name, r in ratios.items():
            if name in zero_by_design:
                continue
            lo, hi = mamba.get(name, (lo_all, hi_all))
            if not (lo / FACTOR <= r <= hi * FACTOR):
                failures.append(f"{layer}.{name}: {r:.1e} not in [{lo / FACTOR:.1e}, {hi * FACTOR:.1e}]")
    assert not failures, "\n".join(failures)
    expected = set(STATE_SPACE) | {"x_proj.weight"}
    expected |= {"alpha_bias"} if c.state_scaling else set()
    expected |= {"rho_raw"} if c.delay else set()
    expected |= {"eta_raw", "lam_raw", "k0", "w_r"} if c.control else set()
    expected |= {"sel_out.weight"} if c.selection == "swiglu" else set()
    for ratios in ours.values():
        assert expected <= set(ratios)

    if c.selection == "swiglu":
        # W_g and W_v get a gradient proportional to W_o, which starts at 0 (so that a new Conba selects
        # as Mamba does): exactly 0 at init, nonzero once one optimiser step has moved W_o. That they
        # then learn is checked by the training test below.
        for ratios in ours.values():
            assert all(ratios[name] == 0 for name in zero_by_design)
        torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0).step()
        for layer, ratios in _grad_ratios(model, ids, "model.layers").items():
            assert all(0 < ratios[name] < math.inf for name in zero_by_design), (layer, ratios)


def _copy_batch(g, b=8, L=6, gap=6, V=64):
    """[segment][filler][1][segment]: the second copy (the loss's only targets) needs memory."""
    seg = torch.randint(3, V, (b, L), generator=g)
    fill = torch.randint(3, V, (b, gap), generator=g)
    ids = torch.cat([seg, fill, torch.ones(b, 1, dtype=torch.long), seg], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -L:] = seg
    return ids, labels


@pytest.mark.parametrize("control_init", ["spec", "live"])  # live: issue 27's option (k0 = 0.5, λ₁ = 0.005)
def test_short_training_moves_every_mechanism_and_the_selection(control_init):
    # a Conba-only tiny model, so every bit of memory the task needs has to pass through Conba
    # control period 4, so the controller acts several times in these 19-token sequences (the default,
    # 64, needs sequences of hundreds of tokens: the init test above and the study cover it)
    c = tiny_config(n_blocks=1, layers_per_block=2, layer_pattern="cc", control_period=4, control_init=control_init)
    torch.manual_seed(0)
    model = MixConForCausalLM(c).train()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, steps = 3e-3, 20
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    held_out = _copy_batch(torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(input_ids=held_out[0], labels=held_out[1]).loss.item()
    for _ in range(steps):
        ids, labels = _copy_batch(g)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(input_ids=held_out[0], labels=held_out[1]).loss.item()
    assert after < before - 1.0, (before, after)  # 6.2 → ~4.3 measured
    # Adam moves a parameter by at most ~lr per step, so lr · steps is the most it can travel.
    # Measured: every parameter below moves 0.13–0.30 of that; before docs/conba.md's
    # initialisation the mechanisms moved < 0.02 of it (ρ, α's bias and w_r bit-identical over 150 steps).
    least = 0.05 * lr * steps
    for i in range(c.num_hidden_layers):
        mixer = model.model.layers[i].mixer
        for name in MECHANISMS + STATE_SPACE + SELECTION:
            key = f"model.layers.{i}.mixer.{name}"
            moved = _rms(model.get_parameter(key).detach() - start[key])
            assert moved > least, f"{key} moved {moved:.1e} (< {least:.1e})"
        # the gain law's clamp at 0 never binds (initial gain |k0|), so k0, η and λ keep a gradient in
        # every control group (a negative k0 used to be clamped to 0 and stop learning for good)
        for name in ("k0", "eta_raw", "lam_raw"):
            assert (getattr(mixer, name).grad != 0).all(), (i, name, getattr(mixer, name).grad)


def test_swiglu_selection_starts_as_mambas_linear_selection():
    """sel_out = 0: a new SwiGLU-mode Conba (mechanisms off) equals the linear-mode one with the same weights."""
    off = dict(delay=0, state_scaling=False, control=False)
    torch.manual_seed(0)
    swiglu = MixConForCausalLM(tiny_config(selection="swiglu", **off)).eval()
    linear = MixConForCausalLM(tiny_config(selection="linear", **off)).eval()
    missing, unexpected = linear.load_state_dict(swiglu.state_dict(), strict=False)
    assert not missing and unexpected and all(".sel_" in k for k in unexpected)
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        a, b = swiglu(ids).logits, linear(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name, p in swiglu.named_parameters():
        if name.endswith("sel_out.weight"):
            assert torch.count_nonzero(p) == 0
        if name.endswith(("sel_gate.weight", "sel_value.weight", "x_proj.weight")):
            bound = 1 / math.sqrt(p.shape[1])  # nn.Linear's default: U(±1/sqrt(fan_in))
            assert p.abs().max() <= bound and p.std() > 0.5 * bound / math.sqrt(3)


def test_from_pretrained_keeps_the_loaded_conba_weights(tmp_path):
    """The Conba initialisation runs through _init_weights with transformers' guarded initialisers,
    so loading a checkpoint does not overwrite a loaded tensor."""
    torch.manual_seed(0)
    model = MixConForCausalLM(tiny_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # far from any initialisation
    model.save_pretrained(tmp_path)
    loaded = MixConForCausalLM.from_pretrained(tmp_path)
    sd = loaded.state_dict()
    for name, p in model.state_dict().items():
        assert torch.equal(sd[name], p), name
