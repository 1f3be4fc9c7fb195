import glob
import json
import math
import os

import pytest
import torch

from helpers import CONFIGS, tiny_config
from mixcon import MixConConfig, MixConForCausalLM
from mixcon.models.configuration_mixcon import default_pattern


@pytest.mark.parametrize("a, L, offsets", [(1, 8, [4]), (2, 8, [2, 6]), (4, 8, [1, 3, 5, 7]), (8, 8, list(range(8))),
                                           (0, 8, []), (3, 7, [1, 3, 5])])
def test_default_attention_offsets(a, L, offsets):
    pat = default_pattern(a, L)
    assert [i for i, ch in enumerate(pat) if ch == "a"] == offsets


def test_resolved_layout_paper_config():
    c = MixConConfig(n_blocks=4, layers_per_block=8, attn_ratio="2:6", moe_every=2, moe_offset=1)
    assert len(c.layers_block_type) == 32 == c.num_hidden_layers
    assert [i for i, k in enumerate(c.layers_block_type) if k == "attention"] == [2, 6, 10, 14, 18, 22, 26, 30]
    assert c.layers_ffn_type == ["moe" if i % 2 == 1 else "mlp" for i in range(32)]


def test_layer_pattern_overrides_ratio():
    c = MixConConfig(n_blocks=2, layers_per_block=4, layer_pattern="acca", moe_every=0)
    assert c.layers_block_type == ["attention", "conba", "conba", "attention"] * 2
    assert c.attn_ratio == "2:2" and c.layers_ffn_type == ["mlp"] * 8


def test_config_round_trips_through_dict():
    c = tiny_config(delay=3, control=False)
    c2 = MixConConfig.from_dict(c.to_dict())
    assert c2.layers_block_type == c.layers_block_type and c2.delay == 3 and c2.control is False


@pytest.mark.parametrize("kw, field", [
    (dict(attn_ratio="3:6"), "attn_ratio"),
    (dict(attn_ratio="two:six"), "attn_ratio"),
    (dict(layer_pattern="acxa", layers_per_block=4), "layer_pattern"),
    (dict(layer_pattern="aca"), "layer_pattern"),
    (dict(moe_every=2, moe_offset=2), "moe_offset"),
    (dict(moe_every=-1), "moe_every"),
    (dict(num_experts=4, experts_per_token=5), "experts_per_token"),
    (dict(control_group=7), "control_group"),
    (dict(delay=5), "delay"),
    (dict(selection="mlp"), "selection"),
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads"),
    (dict(k_max=0.0), "k_max"),
    (dict(process_noise=-0.1), "process_noise"),
    (dict(n_blocks=0), "n_blocks"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(moe_impl="fast"), "moe_impl"),
    (dict(intermediate_size=0, moe_every=2), "moe_every"),
    (dict(layers_block_type=["attention"] * 8), "layers_block_type"),
])
def test_invalid_config_raises_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**kw)


def expected_parameters(c) -> int:
    """Independent count from the architecture docs (not from the modules)."""
    h, V, F = c.hidden_size, c.vocab_size, c.intermediate_size
    d, N, R, K = c.expand * h, c.d_state, c.dt_rank, c.d_conv
    ng = d // c.control_group
    total = V * h + (0 if c.tie_word_embeddings else V * h) + h
    hd = c.head_dim
    attn = 2 * h * c.num_attention_heads * hd + 2 * h * c.num_key_value_heads * hd
    if "mom" in c.layers_block_type:  # the pool, once
        total += c.mom_attn_modules * attn + c.mom_ffn_modules * 3 * h * F
    for i, (mixer, ffn, mod) in enumerate(zip(c.layers_block_type, c.layers_ffn_type, c.layers_mod_type)):
        total += h  # input norm
        if mod != "none":
            total += h  # the scalar router
            if c.mod_decision == "predictor":
                p = max(8, h // 4)
                total += h * p + p + p + 1
        if mixer == "attention":
            total += attn
        elif mixer == "mom":  # second norm, two router MLPs
            rh = c.mom_router_hidden
            total += h + h * rh + rh * (c.mom_attn_modules + 1) + h * rh + rh * (c.mom_ffn_modules + 1)
        elif mixer == "spatial":
            W, L = c.expand * h, c.spatial_max_len
            E = 1 if i < c.dense_layers else c.spatial_experts
            total += 2 * h * W + 2 * W + E * L * L + E * L + W * h
            if E > 1 and c.spatial_routing == "learned":
                P = min(c.spatial_route_prefix, L)
                total += P * E + E
        else:
            n_sel = R + 2 * N + (ng if c.state_scaling else 0)
            total += 2 * h * d + (2 * d if c.proj_bias else 0)  # in_proj
            total += d * K + (d if c.conv_bias else 0)
            S = c.selection_hidden
            total += d * n_sel  # x_proj (Mamba's linear selection), in both modes
            total += (2 * d * S + S * n_sel) if c.selection == "swiglu" else 0  # + the SwiGLU correction
            total += R * d + d  # dt_proj
            total += (R + 2 * N) if c.ssm_norm else 0
            total += d * N + d  # A_log, D
            total += ng * (int(c.state_scaling) + int(c.delay > 0) + 3 * int(c.control)) + (d if c.control else 0)
            total += d * h + (h if c.proj_bias else 0)
        if ffn != "none":
            total += h
        if ffn == "mlp":
            total += 3 * h * F
        elif ffn == "moe":
            total += c.num_experts * 3 * h * F + h * c.num_experts
    return total


CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIGS, "*.json")))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_builds_with_the_expected_parameter_count(path):
    kw = json.load(open(path))
    assert kw.pop("model_type") == "mixcon"
    c = MixConConfig(**kw)
    with torch.device("meta"):
        model = MixConForCausalLM(c)
    model.tie_weights()  # transformers 5.0 does not tie inside post_init on the meta device
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_parameters(c)


def test_shipped_sizes_are_what_their_names_say():
    def active(name):
        kw = json.load(open(os.path.join(CONFIGS, name + ".json")))
        kw.pop("model_type")
        c = MixConConfig(**kw)
        inactive = c.layers_ffn_type.count("moe") * (c.num_experts - c.experts_per_token) * 3 * c.hidden_size * c.intermediate_size
        return expected_parameters(c), expected_parameters(c) - inactive

    assert 120e6 < active("mixcon-150m")[1] < 180e6
    assert 0.9e9 < active("mixcon-1b")[1] < 1.3e9
    assert 4.5e9 < active("mixcon-paper")[1] < 5.5e9  # "about 5B active"
    assert abs(active("jamba-v0.1")[0] / 51.6e9 - 1) < 0.01 and abs(active("jamba-v0.1")[1] / 12.1e9 - 1) < 0.02
    assert abs(active("mixtral-8x7b")[0] / 46.7e9 - 1) < 0.01 and abs(active("mixtral-8x7b")[1] / 12.9e9 - 1) < 0.01
    assert abs(active("mamba-130m")[0] / 129e6 - 1) < 0.02
