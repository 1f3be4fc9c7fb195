"""MixCon served by vLLM (mixcon/serve) against this project's `generate`, on CPU: eager, float32.

Each model (a MixCon with attention, Conba with every mechanism and MoE layers; the Jamba member:
Conba reduced to Mamba) is exported with `save_pretrained` and loaded by one vLLM engine (module
scope: an engine takes seconds to start). Chunked prefill is forced with a 16-token step budget, so
the longer prompts reach a Conba layer in pieces with the state carried between them; the control
period is 5, so the controller acts several times in every sequence and mid-piece.

Needs vLLM (`bash tools/setup.sh vllm`); skipped without it.
"""

import os

import pytest

# before vLLM is imported: the CPU build's KV space (GiB), no thread pinning (shared machine), and the
# engine in this process (apply_model can then read the layers, and nothing is spawned)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (bash tools/setup.sh vllm)")
pytestmark = pytest.mark.slow  # two engines start (about 5 s each on 2 cores), ~1 min in all

import torch  # noqa: E402

from helpers import randomize_, tiny_config, token_lists  # noqa: E402

from mixcon import MixConForCausalLM  # noqa: E402

STEP_BUDGET = 16  # max_num_batched_tokens: prompts longer than this are prefilled in pieces
MAX_TOKENS = 12
MODELS = {
    # attention at layer 2 of each block of 4, MoE every 2nd FFN; delay, scaling, control (P = 5)
    "mixcon": dict(head_dim=32, control_period=5),
    # Jamba: Conba with every mechanism off, linear selection, norms on δ/B/C, top-K not renormalised
    "jamba": dict(head_dim=32, layer_pattern="ccac", selection="linear", ssm_norm=True, delay=0,
                  state_scaling=False, control=False, moe_renormalize=False),
}


PROMPTS = token_lists(1, (3, 22, 9, 37))  # 22 and 37 > STEP_BUDGET: split by chunked prefill
OTHER = token_lists(2, (30, 5, 17, 2))


@pytest.fixture(scope="module", params=sorted(MODELS))
def served(request, tmp_path_factory):
    """(the transformers model's greedy tokens for PROMPTS, the transformers model, the vLLM engine)
    for one exported tiny model."""
    name = request.param
    torch.manual_seed(0)
    model = randomize_(MixConForCausalLM(tiny_config(**MODELS[name])).eval())
    out = tmp_path_factory.mktemp(name)
    model.save_pretrained(out)
    llm = vllm.LLM(model=str(out), skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
                   max_model_len=64, max_num_seqs=4, max_num_batched_tokens=STEP_BUDGET,
                   enable_chunked_prefill=True, enable_prefix_caching=False, num_gpu_blocks_override=12,
                   seed=0)
    yield _generate_hf(model, PROMPTS), model, llm
    # the engine's process groups go now, not whenever the object is collected (after the next
    # engine has set up its own)
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    cleanup_dist_env_and_memory()


def _generate_hf(model, prompts, n=MAX_TOKENS):
    """This project's greedy `generate` on a left-padded batch."""
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, L:].tolist()


def _generate_vllm(llm, prompts, n=1):
    # vLLM refuses n > 1 with temperature 0; top_k = 1 samples the argmax, greedy by another road
    heat = dict(temperature=0.0) if n == 1 else dict(temperature=1.0, top_k=1)
    sp = vllm.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, n=n, **heat)
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [[list(o.token_ids) for o in r.outputs] for r in res]


def _conba_layers(model):
    from mixcon.serve.vllm_model import VllmConbaMixer

    return [m for m in model.modules() if isinstance(m, VllmConbaMixer)]


def _record_slots(llm):
    """Patch every Conba layer to log (slot, fresh) of each prefill piece it reads; → the log."""
    log = []

    def patch(model):
        for layer in _conba_layers(model):
            read = layer._read

            def logged(slots, idx, fresh=None, _read=read):
                if fresh is not None:
                    log.append((int(idx[0]), bool(fresh[0])))
                return _read(slots, idx, fresh)

            layer._read = logged
        return len(_conba_layers(model))

    assert llm.apply_model(patch)[0] > 0
    return log


def test_greedy_tokens_equal_generate(served):
    want, model, llm = served
    log = _record_slots(llm)
    got = _generate_vllm(llm, PROMPTS)
    assert [r[0] for r in got] == want
    # the long prompts reached the Conba layers in pieces: a prefill continued a slot's state
    assert any(not fresh for _, fresh in log), "chunked prefill did not split a prompt"


def test_n_greater_than_one(served):
    want, model, llm = served
    got = _generate_vllm(llm, PROMPTS[1:3], n=2)
    want = want[1:3]
    assert [r[0] for r in got] == want
    assert [r[1] for r in got] == want  # the second sequence of each prompt: its own slot, same tokens


def test_reused_slot_starts_clean(served):
    """One engine, three batches: the third repeats the first after another batch left its states in
    the slots; it must give the same tokens, so a slot taken by a new sequence was reset."""
    want, model, llm = served
    log = _record_slots(llm)
    first = _generate_vllm(llm, PROMPTS)
    mark = len(log)
    _generate_vllm(llm, OTHER)
    mark2 = len(log)
    again = _generate_vllm(llm, PROMPTS)
    assert again == first
    assert [r[0] for r in again] == want
    fresh = lambda part: {slot for slot, f in part if f}
    # with 12 blocks the slots are reused: the repeat took slots that held another batch's states
    assert fresh(log[mark2:]) & fresh(log[mark:mark2]), "no slot was reused: the test proves nothing"


def test_state_declared_once(served):
    """The model's state shapes/dtypes (from the config) agree with every Conba layer's, and hold
    everything a Conba layer carries (conv window, h, delay line, k, e, phase)."""
    import types

    from mixcon.serve.vllm_model import MixConForCausalLM as VllmMixCon

    _, model, llm = served
    vc = types.SimpleNamespace(model_config=types.SimpleNamespace(hf_config=model.config),
                               parallel_config=types.SimpleNamespace(tensor_parallel_size=1))
    shapes = VllmMixCon.get_mamba_state_shape_from_config(vc)
    dtypes = VllmMixCon.get_mamba_state_dtype_from_config(vc)
    layers = llm.apply_model(lambda m: [(tuple(l.get_state_shape()), tuple(l.get_state_dtype()),
                                         tuple(tuple(t.shape[1:]) for t in l.kv_cache))
                                        for l in _conba_layers(m)])[0]
    assert len(layers) == model.config.layers_block_type.count("conba")
    for shape, dtype, bound in layers:
        assert shape == shapes and dtype == dtypes and bound == shapes
    c = model.config
    d, N = c.d_inner, c.d_state
    expected = [(d, c.d_conv - 1), (d, N)]
    if c.delay:
        expected.append((c.delay, d, N))
    if c.control:
        expected += [(d // c.control_group,), (d,), (1,)]
    assert list(shapes) == expected
