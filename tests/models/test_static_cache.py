"""The static cache and the compiled decode step (issue 13).

- ``generate(cache_implementation="static")`` gives the dynamic cache's tokens (greedy, left-padded
  batch) for every member of the family, and really runs on a static MixConCache;
- the buffers are allocated once and written in place (same addresses from token to token);
- the decode step compiled with ``fullgraph=True`` (no graph break) under ``error_on_recompile`` gives
  the eager step's logits for every member, 8 steps after prompts of 3 lengths in 3 batches of one size
  (one graph); on CPU each Conba layer's step is the registered compiled op; generate's own compiled
  path (forced on CPU) gives the eager tokens;
- the Triton decode step through its torch.library registration, traced by the compiler;
- bad input raises ValueError naming what is allowed.
"""


import pytest
import torch
import torch.nn.functional as F

from helpers import member_config, conba_inputs, randomize_, tiny_config

from mixcon import MixConForCausalLM
from mixcon.models.cache import MixConCache
from mixcon.ops.moe import expert_counts, moe_grouped, route


member = member_config


MEMBERS = {
    "mixcon": lambda: tiny_config(control_period=4),  # attention + Conba (all mechanisms) + MoE: Jamba-shaped
    "mamba-like": lambda: tiny_config(attn_ratio="0:4", moe_every=0, control=False, delay=0, state_scaling=False,
                                      selection="linear"),
    "mixtral-like": lambda: tiny_config(attn_ratio="4:0", moe_every=1, moe_offset=0, use_rope=True),
    "mod": lambda: member("mod-tiny.json", use_rope=True),
    "mom": lambda: member("mom-tiny.json"),
    "smlp-learned": lambda: member("smlp-tiny.json", spatial_max_len=64, spatial_routing="learned",
                                   spatial_route_prefix=6),
    "all-kinds": lambda: tiny_config(layer_pattern="masc", mod_every=2, mod_offset=1, use_rope=True,
                                     spatial_max_len=64, mom_attn_modules=3, mom_ffn_modules=2),
}


def build(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = MEMBERS[name]()
    cfg.pad_token_id = 0
    return randomize_(MixConForCausalLM(cfg), scale=0.1).eval().to(dtype)


def left_padded(V, b=3, T=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    if b > 2:
        mask[2, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("name", list(MEMBERS))
def test_generate_static_equals_dynamic_tokens(name):
    model = build(name)
    ids, mask = left_padded(model.config.vocab_size)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kw)
    out = model.generate(ids, cache_implementation="static", return_dict_in_generate=True, **kw)
    cache = out.past_key_values
    assert isinstance(cache, MixConCache) and cache.is_static and cache.is_compileable
    assert cache.get_seq_length() == ids.shape[1] + 6 - 1  # the last token is sampled, not fed back
    assert torch.equal(out.sequences, dynamic), (out.sequences[:, 8:], dynamic[:, 8:])


def _prefilled(model, ids, mask, max_len):
    cache = MixConCache(model.config, max_cache_len=max_len, batch_size=ids.shape[0])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return cache, out.logits[:, -1].argmax(-1, keepdim=True)


def _buffers(cache):
    out = []
    for layer in cache.layers:
        for x in (getattr(layer, "keys", None), getattr(layer, "values", None), getattr(layer, "key_positions", None)):
            if isinstance(x, torch.Tensor):
                out.append(x)
        for v in getattr(layer, "state", {}).values():
            out += [v] if isinstance(v, torch.Tensor) else [t for t in v if isinstance(t, torch.Tensor)]
    return out


def test_static_buffers_are_written_in_place_and_match_the_dynamic_cache():
    model = build("all-kinds")
    ids, mask = left_padded(model.config.vocab_size, b=2, T=7)
    static, nxt = _prefilled(model, ids, mask, max_len=12)
    ptrs = [x.data_ptr() for x in _buffers(static)]
    assert len(ptrs) > 10 and static.get_seq_length() == 7
    with torch.no_grad():
        dyn = model(ids, attention_mask=mask, use_cache=True)
        dcache, am = dyn.past_key_values, mask
        for step in range(3):
            am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
            ref = model(nxt, attention_mask=am, past_key_values=dcache, use_cache=True).logits
            got = model(nxt, attention_mask=am, past_key_values=static, use_cache=True).logits
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
            nxt = ref[:, -1].argmax(-1, keepdim=True)
    assert [x.data_ptr() for x in _buffers(static)] == ptrs
    assert static.get_seq_length() == 10 and static.batch_size == 2


def _recording_backend(targets):
    """aot_eager (which functionalises the in-place cache writes, as inductor does), recording the
    functions each graph calls."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return aot_eager(gm, example_inputs)
    return backend


@pytest.mark.parametrize("name", list(MEMBERS))
def test_compiled_decode_step_one_graph_across_prompt_lengths_steps_and_batches(name):
    """The decode step compiled once with fullgraph=True (a graph break raises) under
    error_on_recompile (a recompile raises): three batches of the same size with prompts of 5, 9 and
    13 tokens (left-padded, each a new static cache), 8 steps each, give the eager step's logits.
    On CPU each Conba layer's step is the registered compiled op (one opaque call in the graph)."""
    from mixcon.ops.conba import cpu

    model = build(name, dtype=torch.float32)
    V, M, b = model.config.vocab_size, 24, 2
    torch._dynamo.reset()
    targets = []
    step = torch.compile(model.forward, fullgraph=True, backend=_recording_backend(targets))
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for i, T in enumerate((5, 9, 13)):
            ids, mask = left_padded(V, b=b, T=T, seed=i)
            eager_cache, nxt = _prefilled(model, ids, mask, M)
            comp_cache, _ = _prefilled(model, ids, mask, M)
            am = F.pad(mask, (0, M - T))  # what create_masks_for_generate passes: a fixed (b, max_cache_len) mask
            pos = mask.sum(1, keepdim=True)
            for t in range(8):
                am[:, T + t] = 1
                ref = model(nxt, attention_mask=am, position_ids=pos + t, past_key_values=eager_cache).logits
                got = step(nxt, attention_mask=am, position_ids=pos + t, past_key_values=comp_cache).logits
                # float32; aot_eager's decompositions round differently from the eager ops (~1e-5 seen)
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=5e-5)
                nxt = ref[:, -1].argmax(-1, keepdim=True)
            for kind, a, e in zip(model.config.layers_block_type, comp_cache.layers, eager_cache.layers):
                if kind == "conba":  # the state written in place by the compiled step, as by the eager one
                    for x, y in zip(a.state["ssm"], e.state["ssm"]):
                        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
                    torch.testing.assert_close(a.state["conv"], e.state["conv"], rtol=1e-4, atol=1e-5)
    n_conba = model.config.layers_block_type.count("conba")
    if cpu.kernels() is not None:
        assert targets.count("mixcon.conba_decode_layer.default") == n_conba


def test_cpu_decode_layer_op_schema_and_fake():
    """The registered CPU layer step: its schema (in-place writes declared) and its fake implementation."""
    from mixcon.ops.conba import cpu
    from mixcon.ops.conba.library import conba_decode_layer_op

    if cpu.kernels() is None:
        pytest.skip("the compiled CPU kernels cannot be built here (no C++ compiler or ninja)")
    model = build("mixcon", dtype=torch.float32)
    ids, mask = left_padded(model.config.vocab_size, b=2, T=6)
    cache, _ = _prefilled(model, ids, mask, 12)
    conba = model.config.layers_block_type.index("conba")
    mixer, state = model.model.layers[conba].mixer, cache.layers[conba].state
    captured = {}
    real = cpu.decode_layer
    try:  # the arguments the layer hands the kernel, taken from one eager decode token
        cpu.decode_layer = lambda *a: captured.setdefault("args", a) and None
        with torch.no_grad():
            mixer(torch.randn(2, 1, model.config.hidden_size), state={k: v for k, v in state.items()})
    finally:
        cpu.decode_layer = real
    xz, m, conv, s, w, *rest = captured["args"]
    args = (xz, torch.tensor([1, 0]), conv.clone(), *(x.clone() for x in s), w, *rest[:5], float(rest[5]),
            float(rest[6]))
    torch.library.opcheck(conba_decode_layer_op, args, test_utils=("test_schema", "test_faketensor"))


def test_generate_compiled_path_on_cpu_equals_eager():
    """generate's own compiled decode (what it does on a GPU), forced on CPU with the eager backend."""
    from transformers.generation.configuration_utils import CompileConfig

    model = build("mixcon", dtype=torch.float32)
    ids, mask = left_padded(model.config.vocab_size, b=2, T=6)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    cc = CompileConfig(fullgraph=True, backend="eager")
    cc._compile_all_devices = True
    torch._dynamo.reset()
    compiled = model.generate(ids, cache_implementation="static", compile_config=cc, **kw)
    assert getattr(model, "_compiled_call", None) is not None  # generate really took the compiled path
    assert torch.equal(compiled, model.generate(ids, **kw))
    # a second and third call (new caches, shorter prompts, the same batch size) reuse the graph
    with torch._dynamo.config.patch(error_on_recompile=True):
        for T in (4, 5):
            short, short_mask = ids[:, -T:], mask[:, -T:]
            kw["attention_mask"] = short_mask
            got = model.generate(short, cache_implementation="static", compile_config=cc, **kw)
            assert torch.equal(got, model.generate(short, **kw))


def test_conba_triton_step_is_traceable_through_its_registered_op():
    from mixcon.ops.conba import conba_step, empty_state
    from mixcon.ops.conba.library import conba_step_op

    x = conba_inputs(b=2, T=1, d=16, n=4, mechanisms=("scaling", "delay", "control"))
    step = {k: (v[:, 0] if isinstance(v, torch.Tensor) and v.dim() == 3 else v) for k, v in x.items()}

    def state():
        s = empty_state(2, 16, 4, step["tau"], 8, step["k0"])
        s.h.normal_(generator=torch.Generator().manual_seed(3))
        return s

    s_ref, s_op = state(), state()
    torch._dynamo.reset()
    with torch.no_grad():
        y_ref = conba_step(s_ref, backend="ref", **step)
        y = torch.compile(lambda s: conba_step(s, backend="triton", **step), fullgraph=True, backend="aot_eager")(s_op)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(s_op, s_ref):  # the state written in place, as the eager step does
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    s = state()
    args = (*s, step["u"], step["delta"], step["A"], step["B"], step["C"], step["D"], step["z"], step["delta_bias"],
            True, step["alpha"], step["rho"], step["tau"], step["k0"], step["eta"], step["lam"], step["w_r"],
            step["k_max"], 8, 0.0, 0.0, 0, None, 0, 1)
    torch.library.opcheck(conba_step_op, args, test_utils=("test_schema", "test_faketensor"))


def test_moe_under_compile_equals_eager_and_counts_match_bincount():
    g = torch.Generator().manual_seed(0)
    E, D, Fh = 4, 16, 24
    x = torch.randn(6, D, generator=g)
    gu, dn = torch.randn(E, 2 * Fh, D, generator=g) * 0.2, torch.randn(E, D, Fh, generator=g) * 0.2
    w, idx = route(torch.randn(6, E, generator=g), 2)
    assert torch.equal(expert_counts(idx, E), torch.bincount(idx.reshape(-1), minlength=E))
    torch._dynamo.reset()
    got = torch.compile(moe_grouped, fullgraph=True, backend="eager")(x, gu, dn, w, idx)
    torch.testing.assert_close(got, moe_grouped(x, gu, dn, w, idx), rtol=1e-5, atol=1e-6)


def test_static_cache_bad_input_raises():
    model = build("mixcon", dtype=torch.float32)
    ids, mask = left_padded(model.config.vocab_size, b=2, T=6)
    with pytest.raises(ValueError, match="max_cache_len"):
        MixConCache(model.config, max_cache_len=0)
    with pytest.raises(ValueError, match="max_cache_len=4"):
        model(ids, past_key_values=MixConCache(model.config, max_cache_len=4, batch_size=2))
    with pytest.raises(ValueError, match="spatial_max_len"):
        MixConCache(MEMBERS["smlp-learned"](), max_cache_len=65)
    with pytest.raises(ValueError, match="'static'"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="offloaded_static",
                       pad_token_id=0)
    cache = MixConCache(model.config, max_cache_len=9, batch_size=2)
    model(ids, attention_mask=mask, past_key_values=cache)
    with pytest.raises(ValueError, match="holds a batch of 2"):
        model(ids[:1, :1], past_key_values=cache)


def test_beam_search_and_several_sequences_on_the_static_cache():
    """generate expands the batch (beams, return sequences) before the first forward: the static
    cache is built for the expanded batch, beams are reordered in place."""
    model = build("mixcon")
    ids, mask = left_padded(model.config.vocab_size, b=2, T=6)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, num_beams=2,
              num_return_sequences=2)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kw), model.generate(ids, **kw))


def test_static_cache_is_the_default_on_cuda_only():
    from transformers import GenerationConfig

    from mixcon.models.modeling_mixcon import _auto_static

    assert _auto_static("cuda", GenerationConfig(max_new_tokens=4), {})
    assert _auto_static(torch.device("cuda:0"), GenerationConfig(do_sample=True), {})
    assert not _auto_static("cpu", GenerationConfig(), {})
    assert not _auto_static("cuda", GenerationConfig(num_beams=2), {})
    assert not _auto_static("cuda", GenerationConfig(use_cache=False), {})
    assert not _auto_static("cuda", GenerationConfig(), {"past_key_values": object()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the Triton decode kernel need a GPU")
def test_cuda_graph_decode_equals_eager_and_generate_takes_the_fast_path():
    """On a GPU: the decode step compiled by inductor and captured in a CUDA graph (reduce-overhead),
    the Conba Triton step inside it, against the eager step; and plain generate() builds the static
    cache and compiles by itself."""
    torch.manual_seed(0)
    cfg = MEMBERS["all-kinds"]()
    cfg.pad_token_id = 0
    model = randomize_(MixConForCausalLM(cfg), scale=0.1).eval().cuda()
    ids, mask = left_padded(cfg.vocab_size, b=2, T=7)
    ids, mask = ids.cuda(), mask.cuda()
    M = 16
    eager_cache, nxt = _prefilled(model, ids, mask, M)
    comp_cache, _ = _prefilled(model, ids, mask, M)
    am = F.pad(mask, (0, M - 7))
    pos = mask.sum(1, keepdim=True)
    torch._dynamo.reset()
    step = torch.compile(model.forward, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        for t in range(4):  # warm-up, capture, replays
            am[:, 7 + t] = 1
            ref = model(nxt, attention_mask=am, position_ids=pos + t, past_key_values=eager_cache).logits
            torch.compiler.cudagraph_mark_step_begin()
            got = step(nxt, attention_mask=am, position_ids=pos + t, past_key_values=comp_cache).logits.clone()
            torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
            nxt = ref[:, -1].argmax(-1, keepdim=True)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    assert out.past_key_values.is_static and getattr(model, "_compiled_call", None) is not None
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             cache_implementation="dynamic")
    assert torch.equal(out.sequences, dynamic)
