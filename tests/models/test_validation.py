"""Property-based: every broken config and every broken input is refused with a ValueError that names
what is wrong (hypothesis, a fixed and derandomised budget so CI runs the same examples each time)."""

import functools
import json
import math
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import CONFIGS
from mixcon import MixConConfig, MixConForCausalLM
from mixcon.models.configuration_mixcon import BASE_KEYS, FIELDS

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

TINY = {k: v for k, v in json.load(open(os.path.join(CONFIGS, "tiny.json"))).items() if k != "model_type"}
VOCAB = TINY["vocab_size"]


def bad_values(name):
    """Values that break field ``name`` whatever the other fields are."""
    kind, allowed = FIELDS[name]
    not_number = [None, "3", [1], {"a": 1}]
    if kind == "int":
        lo, hi = allowed
        out = [lo - 1, lo - 7, lo + 0.5, float(lo + 1), True, False, math.nan] + not_number
        return out + ([hi + 1] if hi is not None else [])
    if kind == "float":
        lo, hi, lo_open, hi_open = allowed
        out = [math.nan, math.inf, -math.inf, lo - 0.5, lo - 1e9, True, False] + not_number
        return out + ([lo] if lo_open else []) + ([hi + 0.5] if hi != math.inf else []) + ([hi] if hi_open and hi != math.inf else [])
    if kind == "bool":
        return ["yes", "no", "", 0, 1, 1.0, None, [True]]
    if kind == "choice":
        return ["", "nope", allowed[0].upper(), 1, None, True]
    if kind in ("str",):
        return [3, None, 2.0, True]
    if kind == "opt-str":
        return [3, 2.0, True, ["a"]]
    if kind == "auto-int":
        return ["manual", 0, -1, 1.5, True, None]
    if kind == "opt-int":
        return [0, -1, 2.5, "8", True]
    if kind == "token":
        return [-1, VOCAB, VOCAB + 10, 1.5, "1", True] + ([[]] if name == "eos_token_id" else [])
    raise AssertionError(kind)


BROKEN_FIELDS = [(name, v) for name in FIELDS for v in bad_values(name)]


@SETTINGS
@given(st.sampled_from(BROKEN_FIELDS))
def test_a_broken_field_is_refused_naming_the_field(case):
    name, value = case
    with pytest.raises(ValueError, match=name):
        MixConConfig(**{**TINY, name: value})


def test_every_field_has_broken_values_checked():
    assert {name for name, _ in BROKEN_FIELDS} == set(FIELDS)


def _typos(name):
    return {name[:i] + name[i + 1:] for i in range(len(name))} | {name + "s", name.upper()}


TYPOS = sorted({(t, f) for f in FIELDS for t in _typos(f)} - {(k, f) for f in FIELDS for k in set(FIELDS) | BASE_KEYS})


@SETTINGS
@given(st.sampled_from(TYPOS))
def test_an_unknown_key_is_refused_with_the_nearest_field(case):
    typo, field = case
    with pytest.raises(ValueError, match=f"unknown MixConConfig field '{typo}'") as err:
        MixConConfig(**{**TINY, typo: TINY.get(field, 1)})
    assert "did you mean" in str(err.value) or len(typo) < 4


def test_the_issue_examples():
    cases = {
        "hiden_size": (dict(hiden_size=64), "did you mean hidden_size"),
        "use_rope='no'": (dict(use_rope="no"), "use_rope"),
        "experts_per_token=1.5": (dict(experts_per_token=1.5), "experts_per_token"),
        "pad id outside": (dict(pad_token_id=VOCAB), "pad_token_id"),
        "rms_norm_eps nan": (dict(rms_norm_eps=math.nan), "rms_norm_eps"),
        "dt_init_floor inf": (dict(dt_init_floor=math.inf), "dt_init_floor"),
        "router_jitter_noise -1": (dict(router_jitter_noise=-1.0), "router_jitter_noise"),
        "initializer_range nan": (dict(initializer_range=math.nan), "initializer_range"),
        "attention_dropout 1.5": (dict(attention_dropout=1.5), "attention_dropout"),
        "no MoE layer": (dict(moe_every=20, moe_offset=9), "place no MoE layer"),
        "MoE behind dense_layers": (dict(moe_every=4, moe_offset=1, dense_layers=6), "place no MoE layer"),
    }
    for name, (kw, msg) in cases.items():
        with pytest.raises(ValueError, match=msg):
            MixConConfig(**{**TINY, **kw})


@pytest.mark.parametrize("body", ["[1, 2]", '"hidden_size"', "3"])
def test_a_config_file_that_is_not_an_object_is_refused(body, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(body)
    with pytest.raises(ValueError, match="JSON object"):
        MixConConfig.from_json_file(str(path))


def test_a_saved_config_with_a_typo_is_refused_on_load(tmp_path):
    MixConConfig(**TINY).save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["hiden_size"] = cfg.pop("hidden_size")
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="did you mean hidden_size"):
        MixConConfig.from_pretrained(tmp_path)


def test_valid_configs_still_round_trip():
    for name in sorted(os.listdir(CONFIGS)):
        if name.endswith(".json"):
            kw = {k: v for k, v in json.load(open(os.path.join(CONFIGS, name))).items() if k != "model_type"}
            c = MixConConfig(**kw)
            assert MixConConfig.from_dict(c.to_dict()).to_dict() == c.to_dict()


# ---------------------------------------------------------------------------- inputs
@functools.lru_cache(maxsize=1)
def model():
    torch.manual_seed(0)
    return MixConForCausalLM(MixConConfig(**TINY)).eval()


B, T = 2, 5
GOOD = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))
ID_DTYPES_BAD = [torch.int8, torch.int16, torch.uint8, torch.bool, torch.float32, torch.float16]


@st.composite
def broken_inputs(draw):
    """(kwargs, the text the error must contain)."""
    kind = draw(st.sampled_from(["shape", "dtype", "ids", "mask", "labels_shape", "labels_value", "mask_shape",
                                 "label_dtype", "position_ids", "position_dtype", "logits_to_keep"]))
    if kind == "position_ids":  # the tiny config has no RoPE: the shape is checked all the same
        shape = draw(st.sampled_from([(B, T - 1), (B, T + 1), (B + 1, T), (T,), (B * T,), (B, T, 1), (2, 1, T)]))
        return dict(input_ids=GOOD, position_ids=torch.zeros(shape, dtype=torch.long)), "position_ids has shape"
    if kind == "position_dtype":
        return (dict(input_ids=GOOD, position_ids=torch.zeros(B, T, dtype=draw(st.sampled_from(ID_DTYPES_BAD)))),
                "position_ids must be an integer")
    if kind == "logits_to_keep":
        k = draw(st.one_of(st.integers(-2**40, -1), st.sampled_from(
            [True, False, 1.0, "2", torch.tensor([[0, 1]]), torch.tensor([0.0, 1.0]), torch.tensor([True, False])])))
        return dict(input_ids=GOOD, logits_to_keep=k), "logits_to_keep"
    if kind == "shape":
        b, t = draw(st.sampled_from([(0, T), (B, 0), (0, 0)]))
        return dict(input_ids=torch.zeros(b, t, dtype=torch.long)), "empty"
    if kind == "dtype":
        return dict(input_ids=GOOD.to(draw(st.sampled_from(ID_DTYPES_BAD)))), "input_ids must be an integer"
    if kind == "ids":
        v = draw(st.one_of(st.integers(VOCAB, 2**40), st.integers(-2**40, -1)))
        ids = GOOD.clone()
        ids[draw(st.integers(0, B - 1)), draw(st.integers(0, T - 1))] = v
        return dict(input_ids=ids), "outside the vocabulary"
    if kind == "mask":
        v = draw(st.one_of(st.integers(2, 1000), st.integers(-1000, -1),
                           st.floats(0.01, 0.99), st.floats(1.01, 1e6)))
        dtype = torch.long if isinstance(v, int) else torch.float32
        mask = torch.ones(B, T, dtype=dtype)
        mask[draw(st.integers(0, B - 1)), draw(st.integers(0, T - 1))] = v
        return dict(input_ids=GOOD, attention_mask=mask), "attention_mask holds"
    if kind == "mask_shape":
        shape = draw(st.sampled_from([(B, T - 1), (B, T + 2), (B + 1, T), (T,), (B, 1, T)]))
        return dict(input_ids=GOOD, attention_mask=torch.ones(shape, dtype=torch.long)), "attention_mask has shape"
    if kind == "labels_shape":
        shape = draw(st.sampled_from([(B * T,), (1, B * T), (1, B * T + 1), (B, T - 1), (B, T + 2), (B + 1, T),
                                      (B, T, 1)]))
        return dict(input_ids=GOOD, labels=torch.zeros(shape, dtype=torch.long)), "labels has shape"
    if kind == "label_dtype":
        return dict(input_ids=GOOD, labels=GOOD.to(draw(st.sampled_from(ID_DTYPES_BAD)))), "labels must be an integer"
    v = draw(st.one_of(st.integers(VOCAB, 2**40), st.integers(-2**40, -101), st.integers(-99, -1)))
    labels = GOOD.clone()
    labels[draw(st.integers(0, B - 1)), draw(st.integers(0, T - 1))] = v
    return dict(input_ids=GOOD, labels=labels), "labels hold"


@SETTINGS
@given(broken_inputs())
def test_a_broken_input_is_a_clear_value_error(case):
    kwargs, msg = case
    with torch.no_grad(), pytest.raises(ValueError, match=msg):
        model()(**kwargs)


def test_position_ids_and_logits_to_keep_that_are_allowed():
    """(batch, time) or (1, time) positions; logits_to_keep 0 (all), k (the last k, k > time: all) or
    a 1-D tensor of positions."""
    with torch.no_grad():
        full = model()(GOOD).logits
        pos = torch.arange(T)[None]
        torch.testing.assert_close(model()(GOOD, position_ids=pos).logits, full)
        torch.testing.assert_close(model()(GOOD, position_ids=pos.expand(B, T)).logits, full)
        torch.testing.assert_close(model()(GOOD, logits_to_keep=2).logits, full[:, -2:])
        torch.testing.assert_close(model()(GOOD, logits_to_keep=T + 3).logits, full)
        torch.testing.assert_close(model()(GOOD, logits_to_keep=torch.tensor([0, 3])).logits, full[:, [0, 3]])


def test_the_config_module_is_a_leaf():
    """configuration_mixcon.py imports nothing of the model (the parameter counts live in sizes.py)."""
    import ast

    import mixcon.models.configuration_mixcon as c

    tree = ast.parse(open(c.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m.startswith(("mixcon", ".")) for m in imported), imported
    assert not hasattr(c, "active_parameters")


def test_the_config_repeats_the_ops_limits_exactly():
    """The config is a leaf (it travels beside the weights), so it repeats the ops' backend list and
    largest delay: the two copies must agree, or the config would accept what the kernels refuse."""
    import mixcon.models.configuration_mixcon as c
    from mixcon.ops.conba import params

    assert c.CONBA_BACKENDS == params.BACKENDS
    assert c.MAX_DELAY == params.MAX_DELAY
