"""transformers' own common tests on every MixCon family member.

ModelTesterMixin (and ExportTesterMixin where shipped), GenerationTesterMixin and ConfigTester come
from the installed transformers version's source distribution (see hf_test_suite.py; nothing of
transformers is in this repository) and run on MixConForCausalLM / MixConModel built from the tiny
configs: configs/*tiny*.json and the Jamba, Mamba-1 and Mixtral special cases at tiny size.

What runs: the main member (``tiny``) runs transformers' whole suite, compile tests included, by
default (`FULL_MEMBERS`); the other members a core subset (`CORE`), and the rest of the suite with
``MIXCON_HF_COMMON=full`` (marked slow). Measured times: docs/evaluation.md. Every skip of ours names
the property of the architecture that makes the test inapplicable (`SKIPS`, `MEMBER_SKIPS`).
"""

from __future__ import annotations

import json
import os
import unittest
import unittest.mock

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from helpers import CONFIGS
from hf_test_suite import MISSING, NOT_FETCHED, load

from mixcon import MixConConfig, MixConForCausalLM, MixConModel

try:
    modeling, configuration, GenerationTesterMixin, HAS_GENERATION = load()
except Exception as exc:  # no registry access and no cached copy: say so rather than error
    pytest.skip(f"transformers' test files unavailable ({exc}); run `python tests/models/hf_test_suite.py` with "
                "access to the package registry, or set MIXCON_HF_TESTS_SRC", allow_module_level=True)
ModelTesterMixin, ids_tensor = modeling.ModelTesterMixin, modeling.ids_tensor
ConfigTester = configuration.ConfigTester


def _json(name, **overrides):
    kw = json.load(open(os.path.join(CONFIGS, name)))
    kw.pop("model_type")
    kw.update(overrides)
    return kw


_TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_key_value_heads=2,
             d_state=4, control_group=8, max_position_embeddings=512, num_experts=4, experts_per_token=2)
MEMBERS = {
    # one block of the shipped two (c C a C: attention, Conba, MLP and MoE): the second block repeats the
    # first, and the whole suite (exports and compiles included) runs in half the time
    "tiny": _json("tiny.json", n_blocks=1),
    # transformers' size rule (at most 2 layers of each kind): one block of two layers
    "dense": _json("dense-tiny.json", n_blocks=1, layers_per_block=2, layer_pattern="aa"),
    "mod": _json("mod-tiny.json"),
    "mom": _json("mom-tiny.json", layers_per_block=2, layer_pattern="mm"),
    "smlp": _json("smlp-tiny.json", spatial_max_len=32),  # its (time × time) weights: under 1M parameters
    # the special cases of docs/architecture.md at tiny size
    "jamba": dict(_TINY, n_blocks=1, layers_per_block=8, attn_ratio="1:7", moe_every=2, moe_offset=1,
                  moe_renormalize=False, router_z_loss_coef=0.0, selection="linear", ssm_norm=True, delay=0,
                  state_scaling=False, control=False),
    "mamba": dict(_TINY, intermediate_size=0, n_blocks=1, layers_per_block=3, attn_ratio="0:3", moe_every=0,
                  selection="linear", delay=0, state_scaling=False, control=False, tie_word_embeddings=True,
                  num_key_value_heads=4),
    "mixtral": dict(_TINY, n_blocks=1, layers_per_block=2, attn_ratio="2:0", moe_every=1, moe_offset=0,
                    use_rope=True, router_z_loss_coef=0.0),
}
for kw in MEMBERS.values():
    kw.setdefault("pad_token_id", 0)
    # transformers' testers use ~7-token sequences: a controller sampling every 64 tokens (the default
    # period) would never act there, and its parameters would get no gradient; every 2 tokens it does
    kw.setdefault("control_period", 2)
FULL = os.environ.get("MIXCON_HF_COMMON", "") == "full"

# Tests that do not apply, each with the property of the architecture that rules it out.
_RECURRENT = ("a Conba layer's state is a recurrence over every token: it cannot be cropped or rewound, and "
              "its output at a position depends on the whole prefix, not only on the keys an attention mask keeps")
SKIPS = {
    # assisted / speculative decoding rewinds the cache to the accepted tokens
    "test_assisted_decoding_matches_greedy_search": _RECURRENT,
    "test_assisted_decoding_sample": _RECURRENT,
    "test_prompt_lookup_decoding_matches_greedy_search": _RECURRENT,
    "test_assisted_decoding_matches_greedy_search_0_random": _RECURRENT,
    "test_assisted_decoding_matches_greedy_search_1_same": _RECURRENT,
    "test_dola_decoding_sample": "DoLa contrasts intermediate layers through the LM head; a hybrid's Conba layers "
                                 "have no premature-layer distribution to contrast (transformers skips it for "
                                 "recurrent models)",
    "test_contrastive_generate": _RECURRENT,
    "test_contrastive_generate_dict_outputs_use_cache": _RECURRENT,
    "test_contrastive_generate_low_memory": _RECURRENT,
}
_MOD_WEIGHTS = ("a Mixture-of-Depths layer attends among the tokens its router selected; its weights are reported "
                "at those tokens' places in (time, past + time), a copy the forward does not read, so no gradient "
                "reaches it")
_PACKED = ("a Conba layer runs over the tokens in sequence order: a per-query (4-D) mask cannot keep one packed "
           "sequence's tokens out of another's recurrent state (the model refuses a 4-D mask with a ValueError; "
           "members whose every layer attends take it)")
MEMBER_SKIPS = {  # member → {test: the property of that member that rules it out}
    "mod": {"test_retain_grad_hidden_states_attentions": _MOD_WEIGHTS, "test_custom_4d_attention_mask": _PACKED},
    "tiny": {"test_custom_4d_attention_mask": _PACKED},
    "jamba": {"test_custom_4d_attention_mask": _PACKED},
}
# The main member runs every test by default; the others CORE, and the rest only when full.
FULL_MEMBERS = {"tiny"}
CORE = {
    "test_config", "test_save_load", "test_forward_signature",
    "test_training", "test_training_gradient_checkpointing", "test_hidden_states_output", "test_attention_outputs",
    "test_past_key_values_format", "test_retain_grad_hidden_states_attentions", "test_resize_tokens_embeddings",
    "test_load_save_without_tied_weights", "test_can_init_all_missing_weights", "test_batching_equivalence",
    "test_greedy_generate_dict_outputs", "test_greedy_generate_dict_outputs_use_cache", "test_sample_generate",
    "test_beam_search_generate", "test_left_padding_compatibility", "test_generate_continue_from_past_key_values",
    "test_determinism", "test_inputs_embeds", "test_torch_export", "test_model_is_small",
    "test_transformers_test_files_present", "test_num_layers_is_small",
    # generation (with transformers' generation tests present): the static cache's type and shapes, beam
    # reordering of the cache, continuing from embeddings, padding inside a continued recurrent forward
    "test_generate_from_inputs_embeds_with_static_cache", "test_beam_search_generate_dict_outputs_use_cache",
    "test_generate_continue_from_inputs_embeds", "test_recurrent_layers_mask_padding_on_continued_forward",
}


class MixConModelTester:
    def __init__(self, parent, config_kwargs, batch_size=2, seq_length=7, is_training=True):
        self.parent = parent
        self.config_kwargs = config_kwargs
        self.batch_size, self.seq_length, self.is_training = batch_size, seq_length, is_training
        cfg = self.get_config()
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.hidden_size
        # `attentions` holds one entry per layer that attends (attention layers, MoM rounds), as in
        # transformers' hybrid models; hidden states one per layer plus the final one
        self.num_hidden_layers = sum(k in ("attention", "mom") for k in cfg.layers_block_type)
        self.expected_num_hidden_layers = cfg.num_hidden_layers + 1
        self.num_attention_heads = cfg.num_attention_heads
        self.pad_token_id = cfg.pad_token_id

    def get_config(self):
        return MixConConfig(**self.config_kwargs)

    def prepare_config_and_inputs_for_common(self):
        # token ids from 1 on: 0 is the pad token, which generate() would read as padding
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 1) + 1
        attention_mask = torch.ones_like(input_ids)
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class _MixConCommon(ModelTesterMixin, GenerationTesterMixin):
    member: str = ""
    all_model_classes = (MixConModel, MixConForCausalLM)
    all_generative_model_classes = (MixConForCausalLM,)
    pipeline_model_mapping = {}
    test_resize_position_embeddings = False

    def setUp(self):
        # what an in-tree model gets from transformers' auto mappings: MixConModel is a base model
        # (no loss: the training tests skip it) and MixConForCausalLM a causal LM (labels = ids)
        for names, cls in ((modeling.MODEL_MAPPING_NAMES, "MixConModel"),
                           (modeling.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "MixConForCausalLM")):
            patcher = unittest.mock.patch.dict(names, {"mixcon": cls})
            patcher.start()
            self.addCleanup(patcher.stop)
        self.model_tester = MixConModelTester(self, MEMBERS[self.member])
        # the Mamba-1 and sparse all-MLP members have no layer that attends: no attention weights exist
        self.has_attentions = self.model_tester.num_hidden_layers > 0
        self.config_tester = ConfigTester(self, config_class=MixConConfig, hidden_size=32,
                                          **{k: v for k, v in MEMBERS[self.member].items() if k != "hidden_size"})
        name = self._testMethodName
        reason = SKIPS.get(name) or MEMBER_SKIPS.get(self.member, {}).get(name)
        if reason:
            self.skipTest(reason)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_recurrent_layers_mask_padding_on_continued_forward(self):
        """transformers runs it on models whose config declares recurrent ``layer_types`` (its names for
        layer kinds); MixCon's kinds are ``layers_block_type``, given to it under that name for this test."""
        upstream = getattr(super(), "test_recurrent_layers_mask_padding_on_continued_forward", None)
        if upstream is None:
            self.skipTest("not in this transformers version's GenerationTesterMixin")
        prepare = self.model_tester.prepare_config_and_inputs_for_common

        def with_layer_types():
            config, inputs = prepare()
            config.layer_types = ["full_attention" if k in ("attention", "mom") else "linear_attention"
                                  for k in config.layers_block_type]
            return config, inputs

        with unittest.mock.patch.object(self.model_tester, "prepare_config_and_inputs_for_common", with_layer_types):
            upstream()

    def _check_past_key_values_for_generate(self, batch_size, past_key_values, seq_length, config):
        """transformers' check reads every layer that is not one of its own `LinearAttentionLayer`s as keys
        and values (and asks models with another cache to override it, as its MiniMax tests do): a
        MixConCache's layers are checked here by what the config says each one holds. ``seq_length``: the
        tokens cached (a static cache: its max_cache_len slots)."""
        from mixcon.models.cache import (ConbaLayer, RoutedAttentionLayer, SpatialLayer, StaticAttentionLayer,
                                         StaticRoutedAttentionLayer)
        from mixcon import MixConCache
        self.assertIsInstance(past_key_values, MixConCache)
        self.assertEqual(len(past_key_values.layers), config.num_hidden_layers)
        b, kv, hd, d = batch_size, config.num_key_value_heads, config.head_dim, config.d_inner
        for kind, mod, layer in zip(config.layers_block_type, config.layers_mod_type, past_key_values.layers):
            if kind in ("attention", "mom"):
                routed = mod == "layer"
                static_cls = StaticRoutedAttentionLayer if routed else StaticAttentionLayer
                self.assertIsInstance(layer, static_cls if past_key_values.is_static else
                                      RoutedAttentionLayer if routed else DynamicLayer)
                n = layer.keys.shape[2]
                # a Mixture-of-Depths layer caches only the tokens its router selected (at most all of them)
                if routed:
                    self.assertLessEqual(n, seq_length)
                    self.assertEqual(tuple(layer.key_positions.shape), (b, n))
                else:
                    self.assertEqual(n, seq_length)
                self.assertEqual(tuple(layer.keys.shape), (b, kv, n, hd))
                self.assertEqual(tuple(layer.values.shape), (b, kv, n, hd))
            elif kind == "conba":
                self.assertIsInstance(layer, ConbaLayer)
                h, delay, k, e, phase = layer.state["ssm"]
                self.assertEqual(tuple(layer.state["conv"].shape), (b, d, config.d_conv - 1))
                self.assertEqual(tuple(h.shape), (b, d, config.d_state))
                self.assertEqual(tuple(delay.shape), (b, config.delay, d, config.d_state))
                self.assertEqual(tuple(k.shape), (b, d // config.control_group))
                self.assertEqual((tuple(e.shape), tuple(phase.shape)), ((b, d), (b,)))
            else:  # spatial: the gate inputs and positions of every past token
                self.assertIsInstance(layer, SpatialLayer)
                self.assertEqual(tuple(layer.state["v"].shape), (b, seq_length, config.spatial_width))
                self.assertEqual(tuple(layer.state["pos"].shape), (b, seq_length))

    def test_transformers_test_files_present(self):
        if MISSING:
            self.skipTest("transformers' source distribution does not ship " + "; ".join(MISSING)
                          + (", and its release tag's copy could not be fetched: " + "; ".join(NOT_FETCHED)
                             if NOT_FETCHED else "")
                          + " (set MIXCON_HF_TESTS_SRC to a transformers checkout's tests/ folder to run them)")


def _member_class(member: str, selection: str):
    """selection: "all", "core" (CORE only) or "rest" (everything but CORE)."""
    attrs = {"member": member}
    if selection != "all":
        for cls in _MixConCommon.__mro__:
            for name in vars(cls):
                core = name in CORE
                if name.startswith("test_") and callable(vars(cls)[name]) and (core != (selection == "core")):
                    attrs[name] = None  # not collected
    cls = type(f"Test{member.capitalize()}{'' if selection == 'all' else selection.capitalize()}",
               (_MixConCommon, unittest.TestCase), attrs)
    return pytest.mark.slow(cls) if selection == "rest" else cls


# The rest of transformers' suite is defined (so collected) for the other members only with
# MIXCON_HF_COMMON=full: collecting ~1,200 tests only to skip them cost time and hid the skips that mean something.
for _m in MEMBERS:
    for _sel in ("all",) if _m in FULL_MEMBERS else ("core", "rest") if FULL else ("core",):
        _c = _member_class(_m, _sel)
        globals()[_c.__name__] = _c
del _c, _m, _sel
