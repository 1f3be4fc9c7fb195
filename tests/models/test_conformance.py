"""The transformers conventions MixCon used to miss (issue 14), one test each: attention weights and
the attention implementation switch, the config's output flags, tuple outputs, the loss's
shift_labels / num_items_in_batch, the cache's layer list, export without host syncs, the sparse
all-MLP's reload, and bad inputs refused with a ValueError; and what transformers' generation tests
found: the caches' transformers types (DynamicCache / StaticCache) and static-cache attention weights."""

import json

import pytest
import torch

from helpers import CONFIGS, randomize_, tiny_config
from mixcon import MixConCache, MixConConfig, MixConForCausalLM
from mixcon.models.cache import ConbaLayer, RoutedAttentionLayer, SpatialLayer
from transformers.cache_utils import DynamicLayer


def make(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return randomize_(MixConForCausalLM(tiny_config(**kw)), scale=0.1).eval().to(dtype)


def ids_for(model, b=2, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (b, T), generator=g)


def reference_weights(layer, h):
    """softmax(q kᵀ / √d) with a causal mask, computed here from the layer's projections."""
    att = layer.mixer
    b, T, _ = h.shape
    q = att.q_proj(h).view(b, T, att.num_heads, att.head_dim).transpose(1, 2)
    k = att.k_proj(h).view(b, T, att.num_kv_heads, att.head_dim).transpose(1, 2)
    k = k.repeat_interleave(att.num_heads // att.num_kv_heads, dim=1)
    s = q @ k.transpose(-1, -2) / att.head_dim ** 0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return s.softmax(-1)


def test_output_attentions_gives_the_softmax_weights_of_each_attention_layer():
    model = make()
    ids = ids_for(model)
    with torch.no_grad():
        out = model(ids, output_attentions=True, output_hidden_states=True)
        plain = model(ids)
    attn_layers = [i for i, k in enumerate(model.config.layers_block_type) if k == "attention"]
    assert len(out.attentions) == len(attn_layers) == 2
    for w, i in zip(out.attentions, attn_layers):
        layer = model.model.layers[i]
        with torch.no_grad():
            ref = reference_weights(layer, layer.input_layernorm(out.hidden_states[i]))
        assert w.shape == (2, 4, 9, 9) and torch.allclose(w, ref, atol=1e-12)
    assert torch.allclose(out.logits, plain.logits, atol=1e-10)  # eager and SDPA: the same function
    assert plain.attentions is None


def test_config_attn_implementation_eager_runs_the_eager_path():
    model = make(attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    calls = []
    import mixcon.layers.attention as A

    orig = A.eager_attend
    A.eager_attend = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        with torch.no_grad():
            eager = model(ids_for(model)).logits
    finally:
        A.eager_attend = orig
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        sdpa = model(ids_for(model)).logits
    assert len(calls) == 2 and torch.allclose(eager, sdpa, atol=1e-10)


def test_generate_returns_attentions_when_asked():
    model = make(torch.float32)
    ids = ids_for(model, T=5)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, output_attentions=True,
                         return_dict_in_generate=True, pad_token_id=0)
    assert len(out.attentions) == 3  # one entry per generated token
    first, step = out.attentions[0], out.attentions[1]
    assert len(first) == 2 and first[0].shape == (2, 4, 5, 5)
    assert step[0].shape == (2, 4, 1, 6)  # the decode step attends to the whole cached prefix
    assert torch.allclose(step[0].sum(-1), torch.ones(2, 4, 1), atol=1e-5)


def test_mom_rounds_and_routed_attention_report_weights():
    mom = MixConForCausalLM(MixConConfig(**{k: v for k, v in json.load(open(f"{CONFIGS}/mom-tiny.json")).items()
                                            if k != "model_type"})).eval()
    ids = ids_for(mom, T=6)
    with torch.no_grad():
        w = mom(ids, output_attentions=True).attentions
    assert len(w) == 4 and all(x.shape == (2, 4, 6, 6) for x in w)
    assert torch.allclose(w[0].sum(-1), torch.ones(2, 4, 6), atol=1e-5)
    mod = make(torch.float32, mod_every=2, mod_offset=0)
    with torch.no_grad():
        w = mod(ids_for(mod), output_attentions=True).attentions
    rows = w[0].sum(-1)  # a routed layer: rows sum to 1 where the token was processed, 0 elsewhere
    assert w[0].shape == (2, 4, 9, 9)
    assert torch.all((rows - 1).abs().lt(1e-5) | rows.abs().lt(1e-7)) and rows.abs().gt(0.5).any()


def test_config_output_hidden_states_and_return_dict_are_honoured():
    model = make()
    ids = ids_for(model)
    model.config.output_hidden_states = True
    with torch.no_grad():
        out = model(ids)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    model.config.output_hidden_states = False
    with torch.no_grad():
        assert model(ids).hidden_states is None
        as_tuple = model(ids, return_dict=False)
        model.config.return_dict = False
        from_config = model(ids)
        ref = model(ids, return_dict=True).to_tuple()  # the fields that are set, in order
    for t in (as_tuple, from_config):
        assert isinstance(t, tuple) and len(t) == len(ref)
        assert all(torch.equal(a, b) for a, b in zip(t, ref) if isinstance(a, torch.Tensor))
    with torch.no_grad():
        base = model.model(ids, return_dict=False)
    assert isinstance(base, tuple) and base[0].shape == (2, 9, model.config.hidden_size)


def test_loss_takes_shift_labels_and_the_full_row_labels():
    model = make()
    ids = ids_for(model, T=10)
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        logits = model(ids).logits
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                labels[:, 1:].reshape(-1), ignore_index=-100)
        a = model(ids, labels=labels).loss
        shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
        b = model(ids, shift_labels=shifted).loss
        # labels one longer than the input: the ids with the token after the last one
        c = model(ids[:, :-1], labels=labels).loss
        ref_c = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                  labels[:, 1:].reshape(-1), ignore_index=-100)
    # transformers' loss takes the cross-entropy in float32
    assert abs(a.item() - ref.item()) < 1e-6 and abs(b.item() - ref.item()) < 1e-6
    assert abs(c.item() - ref_c.item()) < 1e-6  # the same targets as labels=ids on the full input


def test_gradient_accumulation_with_num_items_in_batch_equals_one_big_batch():
    """What Trainer does with k accumulation steps: each micro-batch's loss with num_items_in_batch =
    the label tokens of all k, gradients summed, no division by k. The sum must be the gradient of the
    whole batch's loss (token-mean cross-entropy + the auxiliary losses weighted by tokens)."""
    model = make(torch.float64, router_aux_loss_coef=0.1)
    model.train()
    ids = ids_for(model, b=4, T=8, seed=3)
    labels = ids.clone()
    labels[1, :5] = -100  # micro-batches with different token counts
    labels[2, :2] = -100
    n_first, n_second = int((labels[:2, 1:] != -100).sum()), int((labels[2:, 1:] != -100).sum())
    assert n_first != n_second

    def grads(loss_fn):
        model.zero_grad()
        loss_fn().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    def whole():
        out = model(ids, labels=labels)
        ce = out.loss - out.aux_loss
        # the aux losses of the two halves, weighted by their tokens, as the accumulation sums them
        aux = sum(model(ids[s], labels=labels[s]).aux_loss * n / (n_first + n_second)
                  for s, n in ((slice(0, 2), n_first), (slice(2, 4), n_second)))
        return ce + aux

    def accumulated():
        n = torch.tensor(n_first + n_second)
        return sum(model(ids[s], labels=labels[s], num_items_in_batch=n).loss for s in (slice(0, 2), slice(2, 4)))

    g_whole, g_acc = grads(whole), grads(accumulated)
    # (transformers' loss computes the cross-entropy in float32: agreement to float32 roundoff)
    assert (g_acc - g_whole).abs().max() < 1e-5 * g_whole.abs().max()
    # without num_items_in_batch each half is a mean over its own tokens: k × too large, roughly
    g_naive = grads(lambda: model(ids[:2], labels=labels[:2]).loss + model(ids[2:], labels=labels[2:]).loss)
    assert (g_naive - g_whole).abs().max() > 0.3 * g_whole.abs().max()


def test_trainer_sees_a_model_that_normalises_with_num_items_in_batch():
    import inspect

    params = inspect.signature(MixConForCausalLM.forward).parameters
    assert any(p.kind == p.VAR_KEYWORD for p in params.values())  # Trainer then passes num_items_in_batch


def test_cache_layers_say_what_they_hold():
    cfg = tiny_config(layer_pattern="cacs", mod_every=4, mod_offset=1, spatial_max_len=64)
    cache = MixConCache(cfg)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [ConbaLayer, RoutedAttentionLayer, ConbaLayer, SpatialLayer] * 2
    model = MixConForCausalLM(cfg).eval()
    with torch.no_grad():
        model(ids_for(model, T=5), past_key_values=cache, use_cache=True)
    for layer, kind in zip(cache.layers, cfg.layers_block_type):
        if kind == "conba":
            assert set(layer.state) == {"conv", "ssm"} and layer.keys is None and layer.get_seq_length() == 0
        elif kind == "spatial":
            assert {"v", "pos"} <= set(layer.state)
        else:
            assert isinstance(layer, DynamicLayer) and layer.keys.shape[0] == 2
    assert cache.get_seq_length() == 5 and cache.batch_size == 2
    with pytest.raises(TypeError, match="Conba"):
        cache.layers[0].update(torch.zeros(1), torch.zeros(1))


def test_export_traces_the_forward_without_host_syncs():
    # MoE dispatch sorts tokens by expert (data-dependent sizes, mixcon/ops/moe.py): a dense FFN here
    model = make(torch.float32, moe_every=0)
    model.config.use_cache = False
    ids = ids_for(model, T=6)

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, mask):
            return self.m(x, attention_mask=mask, use_cache=False).logits

    mask = torch.ones_like(ids)
    ep = torch.export.export(Logits(model), (ids, mask), strict=False)
    with torch.no_grad():
        assert torch.allclose(ep.module()(ids, mask), model(ids, attention_mask=mask).logits, atol=1e-5)


def test_sparse_all_mlp_with_learned_routing_reloads(tmp_path):
    kw = {k: v for k, v in json.load(open(f"{CONFIGS}/smlp-tiny.json")).items() if k != "model_type"}
    kw.update(spatial_routing="learned", spatial_route_prefix=4, spatial_max_len=32)
    torch.manual_seed(0)
    model = randomize_(MixConForCausalLM(MixConConfig(**kw)), scale=0.1).eval()
    model.save_pretrained(tmp_path)
    loaded = MixConForCausalLM.from_pretrained(tmp_path).eval()
    for name, buf in loaded.named_buffers():
        if name.endswith("chunk_expert"):
            mixer = loaded.get_submodule(name.rsplit(".", 1)[0])
            assert torch.equal(buf, torch.arange(mixer.width) // (mixer.width // mixer.n_experts))
    ids = ids_for(model, T=12)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def _bad_inputs():
    V = 512
    ids = torch.randint(3, V, (2, 6))
    return {
        "empty sequence": (dict(input_ids=ids[:, :0]), "empty"),
        "batch 0": (dict(input_ids=ids[:0]), "empty"),
        "int8 ids": (dict(input_ids=ids.to(torch.int8).clamp(min=0)), "torch.long"),
        "float ids": (dict(input_ids=ids.float()), "torch.long"),
        "legacy tuple cache": (dict(input_ids=ids, past_key_values=((torch.zeros(2, 2, 3, 16),) * 2,) * 8),
                               "legacy tuple"),
        "1-D labels": (dict(input_ids=ids, labels=ids[0]), "labels has shape"),
        "flattened labels": (dict(input_ids=ids, labels=torch.randint(0, V, (1, 13))), "labels has shape"),
        "out-of-vocabulary labels": (dict(input_ids=ids, labels=ids.clone().fill_(V)), "labels hold 512"),
        "negative labels": (dict(input_ids=ids, labels=ids.clone().fill_(-5)), "labels hold -5"),
        "float labels": (dict(input_ids=ids, labels=ids.float()), "labels must be an integer"),
        "integer mask holding 2": (dict(input_ids=ids, attention_mask=torch.full_like(ids, 2)), "holds 2"),
        "integer mask holding -1": (dict(input_ids=ids, attention_mask=-torch.ones_like(ids)), "holds -1"),
        "float mask holding 0.5": (dict(input_ids=ids, attention_mask=torch.full((2, 6), 0.5)), "holds 0.5"),
        "mask of the wrong shape": (dict(input_ids=ids, attention_mask=torch.ones(2, 5)), "attention_mask has shape"),
        "ids out of vocabulary": (dict(input_ids=ids.clone().fill_(V)), "outside the vocabulary"),
        "shift_labels of the wrong shape": (dict(input_ids=ids, shift_labels=ids[:, :3]), "shift_labels has shape"),
        "labels with logits_to_keep": (dict(input_ids=ids, labels=ids, logits_to_keep=1), "logits_to_keep"),
        "a list as input_ids": (dict(input_ids=[[1, 2, 3]]), "input_ids must be a"),
    }


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_value_error(case):
    model = make(torch.float32)
    kwargs, msg = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=msg):
        model(**kwargs)


def test_a_cache_from_another_batch_size_is_refused():
    model = make(torch.float32)
    cache = MixConCache(model.config)
    with torch.no_grad():
        model(ids_for(model, b=3, T=4), past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="batch of 3 sequences but the input has 2"):
            model(ids_for(model, b=2, T=1), past_key_values=cache, use_cache=True)


def test_value_checks_are_skipped_while_compiling(monkeypatch):
    """Under torch.compile/export the data-dependent checks must not run (each is a host sync)."""
    import mixcon.models.inputs as M

    model = make(torch.float32)
    seen = []
    monkeypatch.setattr(M, "check_values", lambda *a: seen.append(1))
    model(ids_for(model))
    assert seen == [1]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    model(ids_for(model))
    assert seen == [1]


def test_caches_are_transformers_dynamic_and_static_caches():
    """transformers' generation tests (and code that tells caches apart by type) expect generate's
    default cache to be a DynamicCache and ``cache_implementation="static"``'s a StaticCache."""
    import copy

    from transformers.cache_utils import DynamicCache, StaticCache

    cfg = tiny_config()
    dyn, static = MixConCache(cfg), MixConCache(cfg, max_cache_len=12, batch_size=2)
    assert isinstance(dyn, MixConCache) and isinstance(dyn, DynamicCache) and not isinstance(dyn, StaticCache)
    assert isinstance(static, MixConCache) and isinstance(static, StaticCache) and not isinstance(static, DynamicCache)
    assert not dyn.is_static and static.is_static and type(copy.deepcopy(static)) is type(static)
    model = make()
    ids = ids_for(model, T=5)
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    a = model.generate(ids, **kw)
    b = model.generate(ids, cache_implementation="static", **kw)
    assert isinstance(a.past_key_values, DynamicCache) and isinstance(b.past_key_values, StaticCache)
    assert isinstance(a.past_key_values, MixConCache) and isinstance(b.past_key_values, MixConCache)
    assert torch.equal(a.sequences, b.sequences)
    # DynamicCache's iteration: (keys, values, sliding window) per layer, None for the Conba layers
    keys = [k for k, _, _ in a.past_key_values]
    assert [k is not None for k in keys] == [kind == "attention" for kind in cfg.layers_block_type]


@pytest.mark.parametrize("routed", [False, True], ids=["attention", "mixture-of-depths"])
def test_static_cache_attention_weights_span_its_slots(routed):
    """With a static cache the weights of every step are over its max_cache_len slots (as transformers'
    StaticCache gives them): the dynamic cache's weights, then zeros at the slots not written yet. A
    Mixture-of-Depths layer's weights were refused with a static cache."""
    model = make(**(dict(mod_every=2, mod_offset=0) if routed else {}))
    ids = ids_for(model, T=5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in one row
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
              output_attentions=True, pad_token_id=0)
    dyn = model.generate(ids, **kw)
    static = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(dyn.sequences, static.sequences)
    M = static.past_key_values.max_cache_len
    assert M >= 5 + 3 and len(static.attentions) == len(dyn.attentions) == 4
    routed_seen = False
    for step, (d_step, s_step) in enumerate(zip(dyn.attentions, static.attentions)):
        q = 5 if step == 0 else 1
        for d, s in zip(d_step, s_step):
            S = d.shape[-1]
            assert S == 5 + step and s.shape == (2, 4, q, M)
            assert torch.allclose(s[..., :S], d, atol=1e-12) and not s[..., S:].any()
            rows = d.sum(-1)
            routed_seen |= bool(rows.abs().lt(1e-12).any())  # a query the router skipped: a zero row
    assert routed_seen == routed


@pytest.mark.parametrize("kind", ["additive", "bool"])
def test_a_4d_mask_packs_sequences_behind_a_shared_prefix(kind):
    """transformers' models take a 4-D mask (one row of keys per query): three sequences that share a
    prefix, packed as prefix + their last tokens, give each sequence's own logits. Only a model whose
    every layer attends can honour it; a hybrid's Conba layers refuse it (ValueError)."""
    model = make(layer_pattern="aaaa", moe_every=2, moe_offset=1)  # attention layers (with MoE), GQA
    ids = ids_for(model, b=3, T=4)
    ids[1:, :3] = ids[0, :3]  # the same three-token prefix, different last tokens
    packed = torch.cat([ids[0, :3], ids[:, 3]])[None]  # (1, 6)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    allowed[4, 3] = allowed[5, 3] = allowed[5, 4] = False  # the last tokens do not see each other
    mask = allowed if kind == "bool" else (~allowed).double() * torch.finfo(torch.float64).min
    position_ids = torch.tensor([[0, 1, 2, 3, 3, 3]])
    with torch.no_grad():
        ref = model(ids).logits[:, -1]  # each sequence on its own
        out = model(packed, attention_mask=mask[None, None], position_ids=position_ids).logits[0, 3:]
        out_eager = model(packed, attention_mask=mask[None, None], position_ids=position_ids,
                          output_attentions=True)
    assert torch.allclose(out, ref, atol=1e-10) and torch.allclose(out_eager.logits[0, 3:], ref, atol=1e-10)
    assert not out_eager.attentions[0][0, :, 5, 3:5].any()  # masked keys get no weight
    hybrid = make()
    with pytest.raises(ValueError, match="4-D attention_mask.*conba"):
        hybrid(packed, attention_mask=mask[None, None], position_ids=position_ids)
    with pytest.raises(ValueError, match="4-D attention_mask has shape"):
        model(packed, attention_mask=mask[None, None, :5], position_ids=position_ids)


def test_first_output_is_the_logits_without_labels():
    """``model(ids)[0]`` (and the tuple's first entry) is the logits when no loss is asked for, as in
    transformers' MoE models: the auxiliary loss comes with labels or ``output_router_logits``."""
    model = make()  # MoE layers (and a Conba controller): an auxiliary loss exists
    ids = ids_for(model, T=6)
    with torch.no_grad():
        out = model(ids)
        tup = model(ids, return_dict=False)
        asked = model(ids, output_router_logits=True)
        with_labels = model(ids, labels=ids)
    assert out.aux_loss is None and out[0].shape == (2, 6, model.config.vocab_size)
    assert torch.equal(out[0], out.logits) and torch.equal(tup[0], out.logits)
    assert asked.aux_loss is not None and asked.aux_loss > 0
    assert torch.allclose(asked.aux_loss, with_labels.aux_loss, atol=1e-12)
    model.config.output_router_logits = True
    with torch.no_grad():
        assert torch.allclose(model(ids).aux_loss, asked.aux_loss, atol=1e-12)


def test_an_output_walked_through_its_attributes_ends():
    """transformers' exporters collect an output's tensors by walking attributes (`get_leaf_tensors`):
    the cache must not refer back to itself (its per-layer views did, and the walk never ended)."""
    get_leaf_tensors = pytest.importorskip("transformers.exporters.utils").get_leaf_tensors
    model = make(layer_pattern="cacs", mod_every=4, mod_offset=1, spatial_max_len=64)
    with torch.no_grad():
        out = model(ids_for(model, T=5), use_cache=True)
    leaves = get_leaf_tensors(out)
    cache = out.past_key_values
    held = [layer.keys for layer in cache.layers if getattr(layer, "keys", None) is not None]
    held += [t for layer in cache.layers for t in getattr(layer, "state", {}).values() if torch.is_tensor(t)]
    assert torch.equal(leaves["logits"], out.logits) and len(held) > 0
    assert all(any(t is x for x in leaves.values()) for t in held)  # every cached tensor is reached once
    assert cache.conba_states[0]["conv"].shape[0] == 2 and cache.key_positions[1] is not None
